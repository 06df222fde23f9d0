"""The C++ CPU ops give the torch path's results: product-key search (scores, rows, ties, gradients),
the memory/PEER layers built on it, the bag's weight gradient, the counting-sort segments, and a
warned fallback to the torch path when the extension cannot be built."""

import pytest
import torch

from memlayers.kernels import bag_cpu, bag_torch, cpu_ops, pk_search
from memlayers.kernels.lookup import embedding_bag
from memlayers.kernels.segments import segments_of
from memlayers.models.config import MemoryConfig, PeerConfig
from memlayers.models.memory import MemoryLayer
from memlayers.models.peer import PeerLayer
from memlayers.models.product_keys import product_key_topk_torch

SHAPES = [(1, 8, 4, 3), (3, 16, 8, 5), (4, 12, 6, 12), (2, 32, 4, 16), (1, 64, 2, 32), (2, 13, 3, 4)]


def _queries(heads, n, half, tokens=20, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def make(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    return make(tokens, heads, half), make(tokens, heads, half), make(heads, n, half), make(heads, n, half)


@pytest.fixture(params=["scored-in-op", "scored-by-bmm"])
def scoring(request, monkeypatch):
    """Run the fused search with the sub-key scores computed inside the op and by batched matmuls."""
    if request.param == "scored-by-bmm":
        monkeypatch.setattr(pk_search, "SCORED_IN_OP_ELEMENTS", 0)


@pytest.mark.parametrize("heads,n,half,topk", SHAPES)
def test_fused_search_equals_the_torch_path_in_scores_rows_and_gradients(heads, n, half, topk, scoring):
    inputs = _queries(heads, n, half)
    assert pk_search.applies(*inputs)
    results = {}
    for name, search in (("cpp", pk_search.product_key_search), ("torch", product_key_topk_torch)):
        scores, rows = search(*inputs, topk)
        grad = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1), dtype=scores.dtype)
        results[name] = (scores, rows, torch.autograd.grad(scores, inputs, grad))
    (s_c, r_c, g_c), (s_t, r_t, g_t) = results["cpp"], results["torch"]
    torch.testing.assert_close(s_c, s_t, rtol=0, atol=1e-12)
    assert torch.equal(r_c, r_t)
    for a, b in zip(g_c, g_t):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("heads,n,half,topk", SHAPES[:4])
def test_the_qk_normed_search_equals_rms_norm_then_the_torch_path(heads, n, half, topk, scoring):
    gen = torch.Generator().manual_seed(2)
    q_TH2Q = torch.randn(20, heads, 2, half, generator=gen, dtype=torch.float64).requires_grad_()
    keys_2HnQ = torch.randn(2, heads, n, half, generator=gen, dtype=torch.float64).requires_grad_()
    gain_Q = (0.5 + torch.rand(half, generator=gen, dtype=torch.float64)).requires_grad_()
    inputs = (q_TH2Q, keys_2HnQ, gain_Q)
    scale, eps = 0.7, 1e-6
    s_c, r_c = pk_search.normed_product_key_search(q_TH2Q, keys_2HnQ, gain_Q, scale, topk, eps)
    qn = torch.nn.functional.rms_norm(q_TH2Q, (half,), weight=gain_Q * scale, eps=eps)
    kn = torch.nn.functional.rms_norm(keys_2HnQ, (half,), eps=eps)
    s_t, r_t = product_key_topk_torch(qn[:, :, 0], qn[:, :, 1], kn[0], kn[1], topk)
    torch.testing.assert_close(s_c, s_t, rtol=0, atol=1e-12)
    assert torch.equal(r_c, r_t)
    grad = torch.randn(s_c.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(s_c, inputs, grad), torch.autograd.grad(s_t, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _canonical_topk(q1, q2, k1, k2, topk):
    """Brute force over all n*n keys, ties ranked by (sub-key rank in half 1, then in half 2),
    each half's ranks by (score desc, index asc): the order the fused search promises."""
    s1 = torch.einsum("thq,hnq->thn", q1, k1)
    s2 = torch.einsum("thq,hnq->thn", q2, k2)
    n = s1.shape[-1]
    out_s, out_r = torch.empty(*s1.shape[:2], topk, dtype=s1.dtype), torch.empty(*s1.shape[:2], topk, dtype=torch.long)
    for t in range(s1.shape[0]):
        for h in range(s1.shape[1]):
            rank1 = {a: r for r, a in enumerate(sorted(range(n), key=lambda a: (-s1[t, h, a].item(), a)))}
            rank2 = {b: r for r, b in enumerate(sorted(range(n), key=lambda b: (-s2[t, h, b].item(), b)))}
            keys = sorted(((-(s1[t, h, a] + s2[t, h, b]).item(), rank1[a], rank2[b], a * n + b)
                           for a in range(n) for b in range(n)))[:topk]
            out_s[t, h] = torch.tensor([-key[0] for key in keys], dtype=s1.dtype)
            out_r[t, h] = torch.tensor([key[3] for key in keys])
    return out_s, out_r


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads,n,half,topk", [(2, 8, 2, 4), (1, 12, 3, 7), (2, 6, 1, 6), (1, 40, 2, 16),
                                               (1, 32, 1, 16), (1, 64, 2, 16)])  # k = 16, n % 16 = 0: fp32's lane bound
def test_ties_are_ranked_deterministically_and_the_search_stays_exact(heads, n, half, topk, dtype, scoring):
    # small integer queries and keys: many equal sub-key scores and equal pair sums (exact in fp32 too)
    gen = torch.Generator().manual_seed(2)

    def ints(*shape):
        return torch.randint(-1, 2, shape, generator=gen).to(dtype)

    q1, q2, k1, k2 = ints(6, heads, half), ints(6, heads, half), ints(heads, n, half), ints(heads, n, half)
    scores, rows = pk_search.product_key_search(q1, q2, k1, k2, topk)
    ref_scores, ref_rows = _canonical_topk(q1, q2, k1, k2, topk)
    assert torch.equal(scores, ref_scores) and torch.equal(rows, ref_rows)
    torch_scores, _ = product_key_topk_torch(q1, q2, k1, k2, topk)
    assert torch.equal(scores, torch_scores)  # the torch path orders ties its own way, same scores
    again = pk_search.product_key_search(q1, q2, k1, k2, topk)
    assert torch.equal(again[1], rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,topk", [(40, 8), (64, 16)])
def test_nan_scores_are_never_selected(dtype, n, topk):
    q1, q2, k1, k2 = [t.detach().to(dtype) for t in _queries(2, n, 3, tokens=16)]
    k1[:, ::3] = float("nan")   # a third of each head's first-half sub-keys score NaN
    q1[0, 0] = float("nan")     # and every first-half score of one (token, head)
    scores, rows = pk_search.product_key_search(q1, q2, k1, k2, topk)
    s1 = torch.einsum("thq,hnq->thn", q1, k1).nan_to_num(nan=-torch.inf)   # NaN ranks below everything
    s2 = torch.einsum("thq,hnq->thn", q2, k2)
    ref_scores, ref_rows = (s1[..., :, None] + s2[..., None, :]).flatten(2).topk(topk, dim=-1)
    valid = torch.ones_like(scores, dtype=torch.bool)
    valid[0, 0] = False
    torch.testing.assert_close(scores[valid], ref_scores[valid])
    assert torch.equal(rows[valid], ref_rows[valid])
    assert scores[0, 0].isnan().all() and ((rows[0, 0] >= 0) & (rows[0, 0] < n * n)).all()  # NaN, valid rows


def test_fp32_search_matches_torch_scores_within_tolerance():
    inputs = [t.detach().float() for t in _queries(4, 128, 4, tokens=64)]
    s_c, r_c = pk_search.product_key_search(*inputs, 16)
    s_t, r_t = product_key_topk_torch(*inputs, 16)
    torch.testing.assert_close(s_c, s_t)
    assert (r_c == r_t).float().mean() > 0.99  # rows differ only where fp32 scores (near-)tie


def _layer_results(make_layer, monkeypatch, mode):
    """Output and gradients of an fp64 layer (its search runs in fp32, as the layers' searches do)."""
    monkeypatch.setenv(cpu_ops.ENV, mode)
    torch.manual_seed(0)
    layer = make_layer().double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
    grads = {name: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for name, p in layer.named_parameters()}
    return out.detach(), grads


LAYERS = {
    "memory_plus": lambda: _init(MemoryLayer(16, MemoryConfig(slots=64, heads=2, topk=4), key_dim=8,
                                             qk_norm=True, gated=True)),
    "pkm": lambda: _init(MemoryLayer(16, MemoryConfig(slots=64, heads=2, topk=4), key_dim=8,
                                     qk_norm=False, gated=False)),
    "peer": lambda: _init(PeerLayer(16, PeerConfig(experts=64, heads=2, topk=4, key_dim=8))),
}


def _init(layer):
    layer.init_weights(0.2, 0.2)
    return layer


@pytest.mark.parametrize("family", sorted(LAYERS))
def test_layers_give_the_torch_path_outputs_and_every_gradient(family, monkeypatch):
    out_c, grads_c = _layer_results(LAYERS[family], monkeypatch, "cpp")
    out_t, grads_t = _layer_results(LAYERS[family], monkeypatch, "torch")
    torch.testing.assert_close(out_c, out_t, rtol=1e-6, atol=1e-7)
    assert grads_c.keys() == grads_t.keys() and len(grads_c) >= 3
    for name in grads_c:
        torch.testing.assert_close(grads_c[name], grads_t[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bag_weight_gradient_and_counting_sort_match_torch(dtype):
    gen = torch.Generator().manual_seed(4)
    values, slots = torch.randn(50, 19, generator=gen, dtype=dtype), torch.randint(0, 50, (30, 7), generator=gen)
    grad_y = torch.randn(30, 19, generator=gen, dtype=dtype)
    ops = cpu_ops.ops()
    torch.testing.assert_close(ops.bag_weight_grad(values, slots, grad_y), bag_torch.weight_grad(values, slots, grad_y))
    fast = segments_of(slots, 50)
    keys, read = torch.sort(slots.reshape(-1), stable=True)
    unique, counts = torch.unique_consecutive(keys, return_counts=True)
    assert torch.equal(fast.read_L, read) and torch.equal(fast.unique_U, unique)
    assert torch.equal(fast.start_U1, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    assert torch.equal(fast.token_L, read // 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value_dim", [5, 19, 40, 100])
def test_the_value_gradient_without_a_sort_equals_the_sorted_segments(dtype, value_dim):
    gen = torch.Generator().manual_seed(9)
    slots, weights = torch.randint(0, 50, (30, 7), generator=gen), torch.rand(30, 7, generator=gen, dtype=dtype)
    grad_y = torch.randn(30, value_dim, generator=gen, dtype=dtype)
    unique, rows = bag_cpu.value_grad(grad_y, weights, slots, 50)
    segs = segments_of(slots, 50)
    assert torch.equal(unique, segs.unique_U)
    torch.testing.assert_close(rows, bag_torch.value_grad_rows(grad_y, weights, segs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value_dim", [5, 40])
def test_the_fused_bag_backward_gives_the_value_and_weight_gradients_of_the_two_passes(dtype, value_dim):
    gen = torch.Generator().manual_seed(11)
    values = torch.randn(50, value_dim, generator=gen, dtype=dtype)
    slots, weights = torch.randint(0, 50, (30, 7), generator=gen), torch.rand(30, 7, generator=gen, dtype=dtype)
    grad_y = torch.randn(30, value_dim, generator=gen, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        unique, rows, grad_w = bag_cpu.value_and_weight_grad(grad_y, weights, slots, values)
        assert bag_cpu.value_and_weight_grad(grad_y, weights, slots, values.to(torch.float16)) is None
        wide = torch.randn(50, bag_cpu.FUSED_MAX_VALUE_DIM + 1, dtype=dtype)
        assert bag_cpu.value_and_weight_grad(torch.randn(30, wide.shape[1], dtype=dtype), weights, slots, wide) is None
        torch.set_num_threads(2)
        assert bag_cpu.value_and_weight_grad(grad_y, weights, slots, values) is None  # the passes apart, in parallel
    finally:
        torch.set_num_threads(threads)
    unique_apart, rows_apart = bag_cpu.value_grad(grad_y, weights, slots, 50)
    assert torch.equal(unique, unique_apart) and torch.equal(rows, rows_apart)
    assert torch.equal(grad_w, cpu_ops.ops().bag_weight_grad(values, slots, grad_y))
    torch.testing.assert_close(grad_w, bag_torch.weight_grad(values, slots, grad_y))


@pytest.mark.parametrize("value_dim", [16, 32, 48, 64, 8, 40, 80])
def test_the_bag_forward_gives_f_embedding_bags_numbers_bit_for_bit(value_dim):
    gen = torch.Generator().manual_seed(12)
    values = torch.randn(300, value_dim, generator=gen)
    slots = torch.randint(0, 300, (70, 24), generator=gen)
    weights = torch.softmax(torch.randn(70, 24, generator=gen), dim=-1)
    y = bag_cpu.forward(values, slots, weights)
    assert torch.equal(y, torch.nn.functional.embedding_bag(slots, values, per_sample_weights=weights, mode="sum"))
    applies = value_dim % 16 == 0 and value_dim <= 64 and torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert (cpu_ops.ops().bag_forward(values, slots, weights) is not None) == applies  # else F.embedding_bag's
    assert torch.equal(bag_cpu.forward(values.double(), slots, weights.double()),
                       bag_torch.forward(values.double(), slots, weights.double()))
    assert bag_cpu.forward(values, slots[:0], weights[:0]).shape == (0, value_dim)
    with pytest.raises((RuntimeError, IndexError)):
        bag_cpu.forward(values, torch.full((2, 3), 300), weights[:2, :3])


def test_the_bag_auto_impl_on_cpu_equals_the_torch_impl():
    grad_y = torch.randn(9, 8, generator=torch.Generator().manual_seed(5))
    results = []
    for impl in ("auto", "torch"):
        values = torch.randn(40, 8, generator=torch.Generator().manual_seed(6)).requires_grad_()
        weights = torch.rand(9, 5, generator=torch.Generator().manual_seed(7)).requires_grad_()
        slots = torch.randint(0, 40, (9, 5), generator=torch.Generator().manual_seed(8))
        y = embedding_bag(values, slots, weights, impl=impl)
        y.backward(grad_y)
        results.append((y.detach(), values.grad.to_dense(), weights.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_a_failed_build_warns_once_and_keeps_the_torch_path(monkeypatch):
    monkeypatch.setattr(cpu_ops, "_state", {})
    monkeypatch.setattr(cpu_ops, "_build", lambda: (_ for _ in ()).throw(OSError("no compiler found")))
    monkeypatch.setenv(cpu_ops.ENV, "auto")
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert cpu_ops.ops() is None
    assert not pk_search.applies(torch.zeros(1))  # no second warning: the failure is remembered
    q1, q2, k1, k2 = _queries(2, 8, 2)
    layer_scores, _ = product_key_topk_torch(q1, q2, k1, k2, 3)
    from memlayers.models.product_keys import product_key_topk  # the dispatching entry point
    assert torch.equal(product_key_topk(torch.stack([q1, q2], 2), torch.stack([k1, k2]), 3)[0], layer_scores)
    monkeypatch.setenv(cpu_ops.ENV, "cpp")
    with pytest.raises(RuntimeError, match="could not be built"):
        cpu_ops.ops()


def test_the_mode_is_validated_and_cuda_or_bf16_tensors_never_take_the_cpu_ops(monkeypatch):
    monkeypatch.setenv(cpu_ops.ENV, "fast")
    with pytest.raises(ValueError, match=cpu_ops.ENV):
        cpu_ops.mode()
    monkeypatch.setenv(cpu_ops.ENV, "auto")
    assert not pk_search.applies(torch.zeros(2, dtype=torch.bfloat16))
    assert not pk_search.applies(torch.zeros(2, device="meta"))
    monkeypatch.setenv(cpu_ops.ENV, "torch")
    assert not pk_search.applies(torch.zeros(2))


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_process(monkeypatch):
    if cpu_ops.ops() is None:
        pytest.skip("the C++ CPU ops do not build on this machine")
    stale = cpu_ops.cache_dir() / "lock"  # what torch leaves when a build is killed half-way
    stale.touch()
    monkeypatch.setattr(cpu_ops, "_state", {})
    assert cpu_ops.ops() is not None  # loads the cached build instead of waiting on the stale file
    assert not stale.exists()
