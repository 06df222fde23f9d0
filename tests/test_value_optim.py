"""Row-sparse value optimizers: lazy Adam vs dense Adam, row Adagrad, clipping, state round trips."""

import copy

import pytest
import torch

from memlayers.kernels import cpu_ops, value_optim
from memlayers.kernels.value_optim import LazyAdam, RowAdagrad, clip_value_grad_norm_, make_value_optimizer
from memlayers.models.config import MemoryConfig
from memlayers.models.memory import MemoryLayer

BETAS, EPS, LR = (0.9, 0.95), 1e-8, 1e-2


def _sparse(rows, values, shape):
    return torch.sparse_coo_tensor(rows, values, shape, check_invariants=True)


def _memory_layer(sparse_grad: bool) -> MemoryLayer:
    torch.manual_seed(0)
    layer = MemoryLayer(16, MemoryConfig(slots=256, heads=2, topk=4, key_dim=8, sparse_grad=sparse_grad))
    layer.init_weights(0.02, 0.02)
    # only the values train: the slots a batch reads then depend on the batch alone, and the
    # output is linear in the values, so both copies see the same gradients at every step
    for name, p in layer.named_parameters():
        p.requires_grad_(name == "values.weight")
    return layer


def _train_values(steps: int = 4):
    """Train a lazy-Adam copy (sparse grads) and a dense-Adam copy on the same batches."""
    lazy, dense = _memory_layer(True), _memory_layer(False)
    initial = lazy.values.weight.detach().clone()
    opt_lazy = LazyAdam([lazy.values.weight], lr=LR, betas=BETAS, eps=EPS)
    opt_dense = torch.optim.Adam([dense.values.weight], lr=LR, betas=BETAS, eps=EPS, foreach=False)
    gen = torch.Generator().manual_seed(1)
    read_steps = torch.zeros(256, dtype=torch.long)
    grads = []
    for _ in range(steps):
        x, target = torch.randn(2, 8, 16, generator=gen), torch.randn(2, 8, 16, generator=gen)
        for layer, opt in ((lazy, opt_lazy), (dense, opt_dense)):
            opt.zero_grad()
            (layer(x) * target).sum().backward()
            opt.step()
        assert torch.equal(lazy.last_slots_TR, dense.last_slots_TR)
        read_steps[lazy.last_slots_TR.unique()] += 1
        grads.append(dense.values.weight.grad.clone())
    return initial, lazy.values.weight.detach(), dense.values.weight.detach(), read_steps, grads, opt_lazy


@pytest.fixture(params=[False, True], ids=["one-chunk", "chunks-of-3-rows"])
def chunked(request, monkeypatch):
    """Run the optimizers both in one chunk and in many (the row-chunk loop must not change results)."""
    if request.param:
        monkeypatch.setattr(value_optim, "ROW_CHUNK_ELEMENTS", 3 * 16)


@pytest.fixture(params=["auto", "torch"])
def cpu_ops_mode(request, monkeypatch):
    """Run LazyAdam with its C++ row update (where it applies) and on the torch path: the same bits."""
    monkeypatch.setenv(cpu_ops.ENV, request.param)


def test_lazy_adam_equals_dense_adam_on_rows_read_every_step(chunked, cpu_ops_mode):
    initial, lazy, dense, read_steps, _, _ = _train_values(steps=4)
    every, never = read_steps == 4, read_steps == 0
    assert every.sum() > 0 and never.sum() > 0
    assert torch.equal(lazy[every], dense[every])          # bit for bit
    assert not torch.equal(lazy[every], initial[every])
    assert torch.equal(lazy[never], initial[never]) and torch.equal(dense[never], initial[never])


def test_lazy_adam_rows_read_sometimes_follow_adam_over_their_own_steps(chunked, cpu_ops_mode):
    steps = 4
    initial, lazy, dense, read_steps, grads, opt = _train_values(steps)
    sometimes = ((read_steps > 0) & (read_steps < steps)).nonzero().flatten()
    assert sometimes.numel() > 0
    assert torch.equal(opt.state[opt.param_groups[0]["params"][0]]["step"], read_steps.int())
    differs_from_dense = 0
    for row in sometimes.tolist():
        p = initial[row].clone().requires_grad_()
        adam = torch.optim.Adam([p], lr=LR, betas=BETAS, eps=EPS, foreach=False)
        for g in grads:
            if g[row].abs().sum() > 0:      # the steps that read this row
                p.grad = g[row].clone()
                adam.step()
        assert torch.equal(lazy[row], p.detach()), row
        differs_from_dense += not torch.equal(lazy[row], dense[row])
    assert differs_from_dense > 0   # dense Adam keeps moving unread rows: the semantics differ


def test_lazy_adam_on_dense_grads_equals_adamw(monkeypatch):
    monkeypatch.setattr(value_optim, "ROW_CHUNK_ELEMENTS", 2 * 5)   # chunks of 2 rows
    torch.manual_seed(3)
    a = torch.randn(6, 5, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    lazy = LazyAdam([a], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
    adamw = torch.optim.AdamW([b], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(6, 5)
        a.grad, b.grad = g.clone(), g.clone()
        lazy.step()
        adamw.step()
    assert torch.equal(a, b)


def test_the_cpp_row_update_gives_the_torch_paths_bits_with_weight_decay(monkeypatch):
    results = []
    for mode in ("cpp", "torch"):
        monkeypatch.setenv(cpu_ops.ENV, mode)
        gen = torch.Generator().manual_seed(5)
        p = torch.randn(30, 7, generator=gen).requires_grad_()
        opt = LazyAdam([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1)
        for rows in ([[1, 4, 9, 20]], [[0, 4, 29]], [[4, 9, 11, 12, 13]]):
            rows = torch.tensor(rows)
            p.grad = _sparse(rows, torch.randn(rows.shape[1], 7, generator=gen), (30, 7))
            opt.step()
        results.append((p.detach(), opt.state[p]))
    (p_cpp, state_cpp), (p_torch, state_torch) = results
    assert torch.equal(p_cpp, p_torch)
    assert all(torch.equal(state_cpp[key], state_torch[key]) for key in ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_cpp_row_adagrad_update_matches_the_torch_path(monkeypatch, dtype):
    results = []
    for mode in ("cpp", "torch"):
        monkeypatch.setenv(cpu_ops.ENV, mode)
        gen = torch.Generator().manual_seed(6)
        p = torch.randn(40, 33, generator=gen, dtype=dtype).requires_grad_()
        opt = RowAdagrad([p], lr=LR)
        for rows in ([[1, 4, 9, 20, 39]], [[0, 4, 29]]):
            rows = torch.tensor(rows)
            p.grad = _sparse(rows, torch.randn(rows.shape[1], 33, generator=gen, dtype=dtype), (40, 33))
            opt.step()
        results.append((p.detach(), opt.state[p]["sum"]))
    (p_cpp, sum_cpp), (p_torch, sum_torch) = results
    torch.testing.assert_close(sum_cpp, sum_torch)
    torch.testing.assert_close(p_cpp, p_torch)


def test_lazy_adam_weight_decay_touches_only_read_rows():
    p = torch.ones(4, 2, requires_grad=True)
    opt = LazyAdam([p], lr=0.1, weight_decay=0.5)
    p.grad = _sparse(torch.tensor([[2]]), torch.zeros(1, 2), (4, 2))
    opt.step()
    assert torch.allclose(p[2], torch.full((2,), 0.95)) and torch.equal(p[[0, 1, 3]], torch.ones(3, 2))


def test_uncoalesced_sparse_grad_sums_duplicates():
    """A table shared by two layers gets a sparse grad with repeated rows: they must be summed."""
    p1 = torch.zeros(5, 3, requires_grad=True)
    p2 = p1.detach().clone().requires_grad_()
    rows = torch.tensor([[1, 3, 1]])
    vals = torch.tensor([[1.0, 2, 3], [4, 5, 6], [0.5, 0.5, 0.5]])
    p1.grad = _sparse(rows, vals, (5, 3))
    p2.grad = p1.grad.to_dense()
    RowAdagrad([p1], lr=0.1).step()
    RowAdagrad([p2], lr=0.1).step()
    assert torch.allclose(p1, p2) and torch.equal(p1[[0, 2, 4]], torch.zeros(3, 3))


def test_row_adagrad_hand_computed(chunked, cpu_ops_mode):
    p = torch.zeros(3, 2, requires_grad=True)
    opt = RowAdagrad([p], lr=0.5, eps=0.0)
    p.grad = _sparse(torch.tensor([[1]]), torch.tensor([[3.0, 4.0]]), (3, 2))
    opt.step()   # G[1] = (9 + 16) / 2 = 12.5;  p[1] = -0.5 * [3, 4] / sqrt(12.5)
    assert torch.allclose(p[1], -0.5 * torch.tensor([3.0, 4.0]) / 12.5 ** 0.5)
    p.grad = _sparse(torch.tensor([[1, 2]]), torch.tensor([[1.0, 1.0], [0.0, 2.0]]), (3, 2))
    opt.step()   # G[1] = 13.5, G[2] = 2
    state = opt.state[p]["sum"]
    assert torch.allclose(state, torch.tensor([0.0, 13.5, 2.0]))
    assert torch.allclose(p[1], -0.5 * torch.tensor([3.0, 4.0]) / 12.5 ** 0.5 - 0.5 / 13.5 ** 0.5)
    assert torch.allclose(p[2], torch.tensor([0.0, -0.5 * 2 / 2 ** 0.5]))
    assert torch.equal(p[0], torch.zeros(2))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_row_adagrad_and_clipping_work_in_every_table_dtype(dtype, tol):
    p = torch.zeros(3, 2, dtype=dtype, requires_grad=True)
    opt = RowAdagrad([p], lr=0.5, eps=1e-30)   # eps > 0: the unread rows of the dense case stay 0
    p.grad = _sparse(torch.tensor([[1]]), torch.tensor([[3.0, 4.0]], dtype=dtype), (3, 2))
    norm = clip_value_grad_norm_([p], max_norm=1e6)   # norm 5: nothing clipped
    assert abs(float(norm) - 5.0) <= tol * 5
    opt.step()   # G[1] = (9 + 16) / 2 = 12.5;  p[1] = -0.5 * [3, 4] / sqrt(12.5)
    assert p.dtype == dtype
    assert opt.state[p]["sum"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = -0.5 * torch.tensor([3.0, 4.0], dtype=torch.float64) / 12.5 ** 0.5
    assert (p[1].detach().double() - expected).abs().max() <= tol
    dense = torch.zeros(3, 2, dtype=dtype, requires_grad=True)
    dense.grad = torch.zeros(3, 2, dtype=dtype)
    dense.grad[1] = torch.tensor([3.0, 4.0], dtype=dtype)
    RowAdagrad([dense], lr=0.5, eps=1e-30).step()
    assert torch.equal(dense.detach(), p.detach())


@pytest.mark.parametrize("kind", ["lazy_adam", "row_adagrad", "adamw"])
def test_state_dict_round_trip_continues_identically(kind):
    torch.manual_seed(4)
    sparse = kind != "adamw"
    a = torch.randn(8, 3, requires_grad=True)
    opt_a = make_value_optimizer(kind, [a], lr=0.05)

    def grad(rows, seed):
        g = torch.randn(len(rows), 3, generator=torch.Generator().manual_seed(seed))
        sp = _sparse(torch.tensor([rows]), g, (8, 3))
        return sp if sparse else sp.to_dense()

    a.grad = grad([0, 5], 1)
    opt_a.step()
    b = a.detach().clone().requires_grad_()
    fresh = a.detach().clone().requires_grad_()
    opt_b = make_value_optimizer(kind, [b], lr=0.05)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    opt_fresh = make_value_optimizer(kind, [fresh], lr=0.05)
    for seed in (2, 3):
        for param, opt in ((a, opt_a), (b, opt_b), (fresh, opt_fresh)):
            param.grad = grad([5, 6], seed)
            opt.step()
    assert torch.equal(a, b)
    assert not torch.equal(a[5], fresh[5])   # the restored state mattered


def test_make_value_optimizer_kinds():
    p = torch.zeros(2, 2, requires_grad=True)
    assert isinstance(make_value_optimizer("lazy_adam", [p]), LazyAdam)
    assert isinstance(make_value_optimizer("row_adagrad", [p]), RowAdagrad)
    adamw = make_value_optimizer("adamw", [p], lr=3e-3)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.95)
    assert adamw.defaults["lr"] == 3e-3
    with pytest.raises(ValueError, match="kind"):
        make_value_optimizer("sgd", [p])
    with pytest.raises(ValueError, match="betas"):
        LazyAdam([p], betas=(0.9, 1.0))


def test_clip_value_grad_norm_sparse_and_dense():
    p_sparse = torch.zeros(6, 2, requires_grad=True)
    p_dense = torch.zeros(3, 2, requires_grad=True)
    # rows 1 and 1 again (uncoalesced): the summed row is [3, 4]
    p_sparse.grad = _sparse(torch.tensor([[1, 4, 1]]),
                                            torch.tensor([[1.0, 2.0], [0.0, 12.0], [2.0, 2.0]]), (6, 2))
    p_dense.grad = torch.zeros(3, 2)
    p_dense.grad[0, 0] = 84.0
    norm = clip_value_grad_norm_([p_sparse, p_dense], max_norm=17.0)
    assert torch.isclose(norm, torch.tensor(85.0))   # sqrt(9 + 16 + 144 + 84^2) = 85
    assert p_sparse.grad.is_sparse
    total = torch.cat([p_sparse.grad.to_dense().flatten(), p_dense.grad.flatten()]).norm()
    assert torch.isclose(total, torch.tensor(17.0), rtol=1e-4)
    assert torch.allclose(p_sparse.grad.to_dense()[1], torch.tensor([0.6, 0.8]))
    small = clip_value_grad_norm_(p_dense, max_norm=1e6)
    assert torch.isclose(small, torch.tensor(84.0 / 5), rtol=1e-4)
    assert torch.isclose(p_dense.grad[0, 0], torch.tensor(84.0 / 5), rtol=1e-4)


@pytest.mark.parametrize("kind", ["lazy_adam", "row_adagrad"])
def test_a_training_step_does_no_table_sized_work(kind):
    """After the first step (which allocates the optimizer state), a step creates no tensor as large
    as the table and runs no op over a table-sized tensor except the row-indexed ones."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n_slots = 65536
    layer = MemoryLayer(16, MemoryConfig(slots=n_slots, heads=2, topk=4, key_dim=8))
    layer.init_weights(0.02, 0.02)
    table = layer.values.weight
    opt = make_value_optimizer(kind, [table], lr=1e-3)
    rest = torch.optim.AdamW([p for p in layer.parameters() if p is not table], lr=1e-3)
    big_inputs, big_outputs = set(), []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            if any(a.layout == torch.strided and a.numel() >= n_slots for a in flat_in):
                sparse_operand = any(a.is_sparse for a in flat_in)
                big_inputs.add(func.__name__ + (" (sparse operand)" if sparse_operand else ""))
            for o in torch.utils._pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor) and o.layout == torch.strided and o.numel() >= n_slots \
                        and o.untyped_storage().data_ptr() not in storages:
                    big_outputs.append(func.__name__)
            return out

    def step():
        opt.zero_grad()
        rest.zero_grad()
        layer(torch.randn(2, 4, 16)).pow(2).mean().backward()
        opt.step()
        rest.step()

    step()
    storages = {t.untyped_storage().data_ptr() for t in [table, *opt.state[table].values()]}
    with Watch():
        step()
    # row-indexed reads and writes only: the lookup's bags, row gathers/copies, adding sparse rows
    allowed = {"_embedding_bag.default", "_embedding_bag_forward_only.default",
               "_embedding_bag_per_sample_weights_backward.default", "index_select.default",
               "index_copy_.default", "add_.Tensor (sparse operand)", "detach.default"}
    assert not big_outputs, big_outputs
    assert big_inputs <= allowed, big_inputs - allowed
