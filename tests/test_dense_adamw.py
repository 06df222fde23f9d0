"""CpuAdamW: torch's AdamW with its CPU step in one C++ call, bit for bit torch's own step."""

import pytest
import torch

from memlayers.kernels import cpu_ops
from memlayers.kernels.dense_adamw import CpuAdamW

SHAPES = [(37, 8), (8,), (12, 5, 3), (40_000,)]  # the last spans several chunks of the op's parallel loop


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for shape in SHAPES]


def _groups(params, weight_decay):
    return [{"params": params[:2], "weight_decay": weight_decay}, {"params": params[2:], "weight_decay": 0.0}]


def _train(opt, params, steps, seed, schedule=True):
    """`steps` steps on seeded gradients of scales 1e-4 .. 10, one parameter left without a gradient
    every third step, the lr warming up by a LambdaLR."""
    gen = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 7)) if schedule else None
    for step in range(steps):
        for i, p in enumerate(params):
            scale = 10.0 ** float(torch.randint(-4, 2, (), generator=gen))
            p.grad = None if (step % 3 == 2 and i == 1) else torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
        opt.step()
        if sched is not None:
            sched.step()


def _same(opt_a, params_a, opt_b, params_b) -> bool:
    return (all(torch.equal(a, b) for a, b in zip(params_a, params_b))
            and all(torch.equal(opt_a.state[a][k], opt_b.state[b][k])
                    and opt_a.state[a][k].dtype == opt_b.state[b][k].dtype
                    for a, b in zip(params_a, params_b) for k in ("step", "exp_avg", "exp_avg_sq")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_cpp_step_gives_torch_adamws_bits(monkeypatch, dtype, weight_decay):
    monkeypatch.setenv(cpu_ops.ENV, "cpp")
    ours, theirs = _params(dtype), _params(dtype)
    opt_ours = CpuAdamW(_groups(ours, weight_decay), lr=5e-3, betas=(0.9, 0.95))
    opt_theirs = torch.optim.AdamW(_groups(theirs, weight_decay), lr=5e-3, betas=(0.9, 0.95))
    _train(opt_ours, ours, 60, seed=1)
    _train(opt_theirs, theirs, 60, seed=1)
    assert _same(opt_ours, ours, opt_theirs, theirs)


def _takes_cpp_step(opt) -> bool:
    return all(opt._ops_for(group) is not None for group in opt.param_groups)


def test_the_cpp_step_runs_where_it_applies_and_torch_steps_elsewhere(monkeypatch):
    params = _params(torch.float32)
    for p in params:
        p.grad = torch.ones_like(p)
    monkeypatch.setenv(cpu_ops.ENV, "cpp")
    assert _takes_cpp_step(CpuAdamW(params))
    assert not _takes_cpp_step(CpuAdamW(params, amsgrad=True))
    assert not _takes_cpp_step(CpuAdamW(params, foreach=True))
    half = [torch.randn(4, dtype=torch.bfloat16, requires_grad=True)]
    half[0].grad = torch.ones_like(half[0])
    opt = CpuAdamW(half)
    assert not _takes_cpp_step(opt)  # bf16: torch's step
    opt.step()
    assert int(opt.state[half[0]]["step"]) == 1
    monkeypatch.setenv(cpu_ops.ENV, "torch")
    assert not _takes_cpp_step(CpuAdamW(params))


@pytest.mark.parametrize("options", [{"amsgrad": True}, {"maximize": True}])
def test_other_options_take_torchs_step_with_torchs_numbers(monkeypatch, options):
    monkeypatch.setenv(cpu_ops.ENV, "cpp")
    ours, theirs = _params(torch.float32), _params(torch.float32)
    opt_ours, opt_theirs = CpuAdamW(ours, lr=1e-2, **options), torch.optim.AdamW(theirs, lr=1e-2, **options)
    _train(opt_ours, ours, 10, seed=2, schedule=False)
    _train(opt_theirs, theirs, 10, seed=2, schedule=False)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_state_dicts_load_across_torchs_adamw_and_continue_identically(monkeypatch):
    monkeypatch.setenv(cpu_ops.ENV, "cpp")
    ours, theirs = _params(torch.float32), _params(torch.float32)
    opt_ours = CpuAdamW(_groups(ours, 0.1), lr=5e-3)
    opt_theirs = torch.optim.AdamW(_groups(theirs, 0.1), lr=5e-3)
    _train(opt_ours, ours, 5, seed=3, schedule=False)
    _train(opt_theirs, theirs, 5, seed=3, schedule=False)
    # swap: each optimizer continues from the other's state (torch's AdamW from ours and back)
    resumed_theirs = torch.optim.AdamW(_groups(ours, 0.1), lr=5e-3)
    resumed_theirs.load_state_dict(opt_ours.state_dict())
    resumed_ours = CpuAdamW(_groups(theirs, 0.1), lr=5e-3)
    resumed_ours.load_state_dict(opt_theirs.state_dict())
    _train(resumed_theirs, ours, 5, seed=4, schedule=False)
    _train(resumed_ours, theirs, 5, seed=4, schedule=False)
    assert _same(resumed_theirs, ours, resumed_ours, theirs)


def test_sparse_gradients_are_refused_as_torchs_adamw_refuses_them():
    p = torch.zeros(4, 3, requires_grad=True)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 3), (4, 3), check_invariants=True)
    with pytest.raises(RuntimeError, match="sparse"):
        CpuAdamW([p]).step()


def test_a_closure_runs_first_and_step_hooks_once_on_either_path(monkeypatch):
    monkeypatch.setenv(cpu_ops.ENV, "cpp")
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # torch's own AdamW patched its step's hooks
    for options in ({}, {"amsgrad": True}):
        ours, theirs = _params(torch.float32), _params(torch.float32)
        opt_ours, opt_theirs = CpuAdamW(ours, **options), torch.optim.AdamW(theirs, **options)
        calls = []
        opt_ours.register_step_pre_hook(lambda *_, calls=calls: calls.append("pre"))
        opt_ours.register_step_post_hook(lambda *_, calls=calls: calls.append("post"))

        def closure(params):
            loss = sum((p * p).sum() for p in params)
            loss.backward()
            return loss
        ours_loss = opt_ours.step(lambda ours=ours: closure(ours))
        assert float(ours_loss.detach()) == float(opt_theirs.step(lambda theirs=theirs: closure(theirs)).detach())
        assert calls == ["pre", "post"]
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
