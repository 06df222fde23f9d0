"""Slot-usage diagnostics against hand-computed small cases."""

import math

import pytest
import torch

from memlayers.kernels import cpu_ops
from memlayers.kernels.usage import SlotUsage


def _metrics(n, *steps, window=100):
    usage = SlotUsage(n, window=window)
    for slots in steps:
        usage.update(torch.tensor(slots))
    return usage.metrics()


def test_uniform_reads():
    m = _metrics(4, [0, 1], [2, 3])
    assert m == pytest.approx({"slot_fraction_read": 1.0, "slot_kl_uniform": 0.0, "slot_gini": 0.0}, abs=1e-12)


def test_one_slot_takes_every_read():
    m = _metrics(4, [2, 2, 2], [2])
    assert m["slot_fraction_read"] == 0.25
    assert m["slot_kl_uniform"] == pytest.approx(math.log(4))
    assert m["slot_gini"] == pytest.approx(0.75)   # (N - 1) / N


def test_skewed_reads():
    # counts [1, 3, 0, 0]: p = [1/4, 3/4]; KL = 1/4 log(1) + 3/4 log(3); sorted [0, 0, 1, 3]:
    # Gini = sum_i (2i - N - 1) x_i / (N sum x) = (1*1 + 3*3) / (4 * 4) = 0.625
    m = _metrics(4, [[1, 0], [1, 1]])
    assert m["slot_fraction_read"] == 0.5
    assert m["slot_kl_uniform"] == pytest.approx(0.75 * math.log(3))
    assert m["slot_gini"] == pytest.approx(0.625)


def test_window_forgets_old_steps_and_reset_clears():
    usage = SlotUsage(5, window=2)
    for slots in ([0, 0], [1], [2]):
        usage.update(torch.tensor(slots))
    # step [0, 0] left the window: counts [0, 1, 1, 0, 0]
    assert torch.equal(usage.counts_N, torch.tensor([0, 1, 1, 0, 0], dtype=torch.int32))
    assert usage.metrics()["slot_fraction_read"] == pytest.approx(0.4)
    usage.reset()
    assert usage.metrics() == {"slot_fraction_read": 0.0, "slot_kl_uniform": 0.0, "slot_gini": 0.0}


@pytest.mark.parametrize("mode", ["cpp", "torch"])
def test_out_of_range_slots_are_refused_and_nothing_is_counted(mode, monkeypatch):
    monkeypatch.setenv(cpu_ops.ENV, mode)
    usage = SlotUsage(3)
    usage.update(torch.tensor([0, 2]))
    for bad in ([1, 3], [-1, 0]):
        with pytest.raises(ValueError, match=r"slots: must be in \[0, 3\)"):
            usage.update(torch.tensor(bad))
    assert torch.equal(usage.counts_N, torch.tensor([1, 0, 1], dtype=torch.int32)) and len(usage._steps) == 1


def test_the_cpp_counts_equal_the_torch_counts_step_by_step(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    steps = [torch.randint(0, 40, (6, 5), generator=gen) for _ in range(9)]
    counts = {}
    for mode in ("cpp", "torch"):
        monkeypatch.setenv(cpu_ops.ENV, mode)
        usage, counts[mode] = SlotUsage(40, window=4), []
        for slots in steps:
            usage.update(slots if mode == "cpp" else slots.to(torch.int32))
            counts[mode].append(usage.counts_N.clone())
    assert all(torch.equal(a, b) for a, b in zip(counts["cpp"], counts["torch"]))
    assert int(counts["cpp"][-1].sum()) == 4 * 30


def test_steps_kept_as_histograms_or_as_slots_count_alike(monkeypatch):
    """A step that reads at least N slots is kept as a histogram (C++ path), a smaller one as its
    slots; leaving the window, either is removed exactly, whichever path removes it."""
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randint(0, 16, (reads,), generator=gen) for reads in (20, 5, 40, 3, 16, 7, 25, 1)]
    counts = {}
    for schedule in ("cpp", "torch", "alternating"):
        usage, counts[schedule] = SlotUsage(16, window=3), []
        for i, slots in enumerate(steps):
            mode = schedule if schedule != "alternating" else ("cpp", "torch")[i % 2]
            monkeypatch.setenv(cpu_ops.ENV, mode)
            usage.update(slots)
            counts[schedule].append(usage.counts_N.clone())
    expected = [torch.bincount(torch.cat(steps[max(0, i - 2):i + 1]), minlength=16).int() for i in range(len(steps))]
    for schedule in counts:
        assert all(torch.equal(a, b) for a, b in zip(counts[schedule], expected)), schedule


def test_out_of_range_slots_are_refused():
    with pytest.raises(ValueError, match="window"):
        SlotUsage(3, window=0)
