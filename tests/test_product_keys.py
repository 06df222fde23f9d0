"""Product-key search returns exactly the top-k of scoring all n*n full keys."""

import torch

from memlayers.models.config import MemoryConfig
from memlayers.models.memory import MemoryLayer
from memlayers.models.product_keys import candidate_pairs, product_key_topk


def brute_force_topk(q1, q2, keys1, keys2, topk):
    # full key of slot (a, b) is concat(keys1[a], keys2[b]); score = q1.keys1[a] + q2.keys2[b]
    full_THnn = (torch.einsum("thp,hap->tha", q1, keys1)[..., :, None]
                 + torch.einsum("thp,hbp->thb", q2, keys2)[..., None, :])
    return full_THnn.flatten(-2).topk(topk, dim=-1)


def test_product_search_equals_brute_force_over_all_full_keys():
    gen = torch.Generator().manual_seed(0)
    for heads, n, half, topk in [(1, 8, 4, 3), (3, 16, 8, 5), (4, 12, 6, 12), (2, 32, 4, 16), (1, 64, 2, 32)]:
        q1, q2 = (torch.randn(20, heads, half, generator=gen, dtype=torch.float64),
                  torch.randn(20, heads, half, generator=gen, dtype=torch.float64))
        k1, k2 = (torch.randn(heads, n, half, generator=gen, dtype=torch.float64),
                  torch.randn(heads, n, half, generator=gen, dtype=torch.float64))
        scores, slots = product_key_topk(torch.stack([q1, q2], 2), torch.stack([k1, k2]), topk)
        ref_scores, ref_slots = brute_force_topk(q1, q2, k1, k2, topk)
        torch.testing.assert_close(scores, ref_scores)
        assert torch.equal(slots, ref_slots)


def test_memory_layer_search_matches_brute_force_with_qk_norm():
    torch.manual_seed(1)
    layer = MemoryLayer(32, MemoryConfig(slots=100, heads=2, topk=4), key_dim=8, qk_norm=True, gated=True)
    layer.init_weights(0.02, 0.01)
    x_TD = torch.randn(7, 32)
    scores, slots = layer.search(x_TD)
    # score every one of the 100 slots explicitly through the layer's own normalised halves
    q = layer.query(x_TD).view(7, 2, 8)

    def rms(v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)

    scale = layer.query_gain_Q * layer.temperature / 4
    s1 = torch.einsum("thp,hnp->thn", rms(q[..., :4]) * scale, rms(layer.keys_2HnQ[0]))
    s2 = torch.einsum("thp,hnp->thn", rms(q[..., 4:]) * scale, rms(layer.keys_2HnQ[1]))
    full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)
    ref_scores, ref_slots = full.topk(4, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(slots, ref_slots)


def test_candidate_pairs_keep_only_pairs_that_can_reach_the_top_k():
    rows, cols = candidate_pairs(16, torch.device("cpu"))
    assert len(rows) == sum(16 // (i + 1) for i in range(16)) == 50
    assert bool(((rows + 1) * (cols + 1) <= 16).all())
