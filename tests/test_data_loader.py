"""TokenLoader: packing, per-rank shards, deterministic shuffle, epochs and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memlayers.platform.data import TokenLoader

T = 8


def stream(n: int = 1001) -> np.ndarray:
    return np.arange(n, dtype=np.int32)  # token i == position i: starts are easy to read back


def starts(inputs_BT: torch.Tensor) -> list[int]:
    return [int(s) // T for s in inputs_BT[:, 0]]


def test_batches_are_packed_shifted_int64():
    loader = TokenLoader(stream(), seq_len=T, batch_size=4)
    inputs_BT, targets_BT = loader.next_batch()
    assert inputs_BT.shape == targets_BT.shape == (4, T)
    assert inputs_BT.dtype == targets_BT.dtype == torch.int64
    assert torch.equal(targets_BT[:, :-1], inputs_BT[:, 1:])
    assert torch.equal(targets_BT[:, -1], inputs_BT[:, -1] + 1)
    assert all(int(s) % T == 0 for s in inputs_BT[:, 0])


def test_ranks_read_disjoint_shards_that_cover_the_epoch():
    n_seq = (1001 - 1) // T  # 125 sequences
    world, batch = 3, 5
    loaders = [TokenLoader(stream(), T, batch, rank=r, world_size=world, seed=7) for r in range(world)]
    seen: list[set[int]] = [set() for _ in range(world)]
    steps = n_seq // (batch * world)  # 8 full steps stay inside epoch 0
    for _ in range(steps):
        for r, loader in enumerate(loaders):
            seen[r].update(starts(loader.next_batch()[0]))
    for a in range(world):
        for b in range(a + 1, world):
            assert not seen[a] & seen[b]
    assert sum(len(s) for s in seen) == steps * batch * world
    # the next step finishes epoch 0: together the ranks have read every sequence once
    for r, loader in enumerate(loaders):
        seen[r].update(starts(loader.next_batch()[0]))
    assert set().union(*seen) == set(range(n_seq))
    assert loaders[0].epoch == 1


def test_order_is_shuffled_deterministically_by_seed_and_epoch():
    a = TokenLoader(stream(), T, 125, seed=1)
    b = TokenLoader(stream(), T, 125, seed=1)
    c = TokenLoader(stream(), T, 125, seed=2)
    epoch0 = starts(a.next_batch()[0])
    assert epoch0 == starts(b.next_batch()[0])
    assert epoch0 != starts(c.next_batch()[0])
    assert sorted(epoch0) == list(range(125)) and epoch0 != list(range(125))
    epoch1 = starts(a.next_batch()[0])
    assert sorted(epoch1) == list(range(125)) and epoch1 != epoch0
    assert a.epoch == 2


def test_resume_from_state_dict_reproduces_the_next_batches():
    first = TokenLoader(stream(), T, 6, rank=1, world_size=2, seed=3)
    for _ in range(13):  # crosses an epoch boundary (125 sequences / 12 per step)
        first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch() for _ in range(15)]
    resumed = TokenLoader(stream(), T, 6, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (resumed.next_batch() for _ in range(15))):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_resume_with_another_world_size_continues_the_global_order():
    ref = [TokenLoader(stream(), T, 4, rank=r, world_size=2, seed=0) for r in range(2)]
    for _ in range(3):
        for loader in ref:
            loader.next_batch()
    state = ref[0].state_dict()
    following = [s for loader in ref for s in starts(loader.next_batch()[0])]
    single = TokenLoader(stream(), T, 8, seed=0)
    single.load_state_dict(state)
    assert starts(single.next_batch()[0]) == following


def test_state_from_another_stream_is_refused():
    state = TokenLoader(stream(1001), T, 2).state_dict()
    with pytest.raises(ValueError, match="n_tokens"):
        TokenLoader(stream(2001), T, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(stream(1001), T, 2, seed=1).load_state_dict(state)


def test_batch_larger_than_an_epoch_and_torch_input():
    loader = TokenLoader(torch.arange(33, dtype=torch.int32), seq_len=T, batch_size=10)
    inputs_BT, _ = loader.next_batch()  # 4 sequences per epoch: the batch spans 3 epochs
    assert inputs_BT.shape == (10, T)
    assert loader.epoch == 2 and loader.position == 2
    with pytest.raises(ValueError, match="one sequence"):
        TokenLoader(np.arange(5), seq_len=T, batch_size=1)
