"""PEER: exact expert search, the layer's formula, causality, learning, row-sparse expert gradients,
accounting by hand, presets and the family registry."""

import pytest
import torch
import torch.nn.functional as F
from causality import later_token_changes

from memlayers.config_schema import ConfigError, from_dict
from memlayers.kernels.value_optim import make_value_optimizer
from memlayers.models.accounting import account
from memlayers.models.config import FAMILIES, MEMORY_FAMILIES, MEMORY_PARALLEL_FAMILIES, ModelConfig, PeerConfig
from memlayers.models.peer import PeerLayer
from memlayers.models.presets import BASES, build_config
from memlayers.models.transformer import Transformer

VOCAB = 61


def tiny_peer(**peer) -> ModelConfig:
    options = dict(experts=256, heads=2, topk=4, n_layers=2, **peer)
    return ModelConfig(family="peer", vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, n_kv_heads=2,
                       max_seq_len=32, peer=PeerConfig(**options))


def _layer(**peer) -> PeerLayer:
    torch.manual_seed(1)
    layer = PeerLayer(32, PeerConfig(**{"experts": 100, "heads": 2, "topk": 4, "key_dim": 8, **peer}))
    layer.init_weights(0.02, 0.01)
    return layer


@pytest.mark.parametrize("qk_norm", [False, True])
def test_peer_search_equals_brute_force_over_all_experts(qk_norm):
    layer = _layer(qk_norm=qk_norm)
    x_TD = torch.randn(9, 32)
    scores, experts = layer.search(x_TD)
    # score all 100 experts: the full key of expert a * 10 + b is concat(sub-key a, sub-key b)
    q = layer.query(x_TD).view(9, 2, 2, 4)
    keys = layer.keys_2HnQ
    if qk_norm:
        rms = lambda v: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
        q = rms(q) * layer.query_gain_Q * layer.temperature / 4
        keys = rms(keys)
    full_keys = torch.cat([keys[0][:, :, None, :].expand(2, 10, 10, 4),
                           keys[1][:, None, :, :].expand(2, 10, 10, 4)], dim=-1).reshape(2, 100, 8)
    full = torch.einsum("thq,hnq->thn", q.reshape(9, 2, 8), full_keys)
    ref_scores, ref_experts = full.topk(4, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(experts, ref_experts)


@pytest.mark.parametrize("activation, score_norm", [("gelu", "softmax"), ("relu", "sigmoid")])
def test_peer_output_is_the_weighted_sum_of_single_neuron_experts(activation, score_norm):
    layer = _layer(activation=activation, score_norm=score_norm)
    x = torch.randn(1, 6, 32)
    out = layer(x)[0]
    scores, experts = layer.search(x[0])
    gates = torch.softmax(scores, -1) if score_norm == "softmax" else torch.sigmoid(scores)
    act = F.gelu if activation == "gelu" else F.relu
    u, v = layer.down.weight, layer.up.weight
    for t in range(6):
        expected = sum(gates[t, h, j] * act(x[0, t] @ u[experts[t, h, j]]) * v[experts[t, h, j]]
                       for h in range(2) for j in range(4))
        torch.testing.assert_close(out[t], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_changing_a_later_token_never_changes_earlier_outputs(mode):
    torch.manual_seed(0)
    model = Transformer(tiny_peer())
    model.train(mode == "train")
    for t, before, after in later_token_changes(model, VOCAB):
        torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


@pytest.mark.parametrize("kind", ["lazy_adam", "row_adagrad", "adamw"])
def test_one_step_with_the_value_optimizer_lowers_the_loss_on_a_fixed_batch(kind):
    torch.manual_seed(0)
    model = Transformer(tiny_peer(sparse_grad=kind != "adamw"))
    values = model.value_parameters()
    value_ids = {id(p) for p in values}
    dense = torch.optim.AdamW([p for p in model.parameters() if id(p) not in value_ids], lr=3e-3)
    tables = make_value_optimizer(kind, values, lr=3e-2)
    tokens = torch.randint(0, VOCAB, (4, 16))
    _, before = model.loss(tokens[:, :-1], tokens[:, 1:])
    before.backward()
    dense.step()
    tables.step()
    with torch.no_grad():
        _, after = model.loss(tokens[:, :-1], tokens[:, 1:])
    assert after < before


def test_gradients_reach_every_parameter_and_expert_tables_only_in_rows_read():
    torch.manual_seed(0)
    model = Transformer(tiny_peer())
    tokens = torch.randint(0, VOCAB, (2, 16))
    model.loss(tokens[:, :-1], tokens[:, 1:])[0].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        grad = param.grad.to_dense() if param.grad.is_sparse else param.grad
        assert grad.abs().sum() > 0, name
    layers = model.peer_layers()
    assert len(layers) == 2
    for layer in layers:
        read = set(layer.last_experts_TR.flatten().tolist())
        for table in layer.tables():
            assert table.weight.grad.is_sparse
            rows = set(torch.nonzero(table.weight.grad.to_dense().abs().sum(1)).flatten().tolist())
            assert rows and rows <= read


def test_expert_tables_are_value_tables_per_layer_or_one_shared_pair():
    own, shared = Transformer(tiny_peer()), Transformer(tiny_peer(shared_tables=True))
    assert len(own.value_tables()) == 4 and len(shared.value_tables()) == 2
    assert {id(p) for p in shared.value_parameters()} == {id(shared.peer_down.weight), id(shared.peer_up.weight)}
    names = sorted(name for name, _ in shared.named_parameters() if name.startswith("peer_"))
    assert names == ["peer_down.weight", "peer_up.weight"]   # held by reference in the layers: once
    for model in (own, shared):
        assert sum(p.numel() for p in model.value_parameters()) == account(model.cfg).memory_value_params
        assert sum(p.numel() for p in model.parameters()) == account(model.cfg).total_params
    reads = shared.table_reads()
    assert len(reads) == 4 and {id(t) for t, _ in reads} == {id(t) for t in shared.value_tables()}


# ---- accounting, by hand ------------------------------------------------------------------------
V, D, L, H, G, F_, S = 50, 32, 2, 4, 2, 48, 16   # vocab, dim, layers, heads, kv heads, ffn, seq
A = D // H                                      # attention head dim
N, n, PH, K, KD = 64, 8, 2, 4, 8                # experts, sub-keys, PEER heads, top-k, key dim


def test_hand_counted_accounting_of_a_tiny_peer_model():
    cfg = ModelConfig(family="peer", vocab_size=V, dim=D, n_layers=L, n_heads=H, n_kv_heads=G, ffn_dim=F_,
                      max_seq_len=S, peer=PeerConfig(experts=N, heads=PH, topk=K, key_dim=KD))
    assert cfg.peer_layers == [1]                               # one PEER layer replaces layer 1's FFN
    emb = 2 * V * D                                             # input table + output head: 3,200
    norms = L * 2 * D + D                                       # 160
    attn_p = D * H * A + 2 * D * G * A + H * A * D              # 1024 + 1024 + 1024 = 3,072
    attn_f = 2 * attn_p + 2 * 2 * H * A * (S + 1) // 2          # projections 6,144 + mixing 1,088 = 7,232
    dense_p, dense_f = 3 * D * F_, 2 * 3 * D * F_               # layer 0's SwiGLU: 4,608 / 9,216
    peer_p = D * PH * KD + PH * n * KD                          # query 512 + sub-keys 128 = 640
    tables = 2 * N * D                                          # u and v rows: 4,096
    peer_active = peer_p + PH * K * 2 * D                       # + the 8 experts' u_i, v_i: 1,152
    # query 1,024 + sub-key scoring 256 + x . u_i 512 + sum of g * act * v_i 512 = 2,304
    peer_f = 2 * D * PH * KD + 2 * PH * n * KD + 2 * PH * K * D + 2 * PH * K * D
    acc = account(cfg)
    assert acc.embedding_params == emb
    assert acc.memory_value_params == tables == 4096
    assert acc.total_params == emb + norms + L * attn_p + dense_p + peer_p + tables == 18_848
    assert acc.active_params == emb + norms + L * attn_p + dense_p + peer_active == 15_264
    assert acc.active_params < acc.total_params
    assert acc.forward_flops_per_token == L * attn_f + dense_f + peer_f + 2 * D * V == 29_184
    assert acc.train_flops_per_token == 3 * 29_184


# ---- presets, registry, config errors -------------------------------------------------------------
@pytest.mark.parametrize("base", list(BASES))
def test_peer_builds_at_every_base(base):
    cfg = build_config(base, "peer")
    acc = account(cfg)
    assert acc.memory_value_params == len(cfg.peer_layers) * 2 * cfg.peer.experts * cfg.dim
    assert acc.active_params < acc.total_params
    if base in ("pico", "134m"):
        with torch.device("meta"):
            model = Transformer(cfg)
        assert sum(p.numel() for p in model.parameters()) == acc.total_params


def test_peer_presets_take_their_size_and_options_like_memory_families():
    assert build_config("1.3b", "peer").peer.experts == 768 ** 2
    assert build_config("nano", "peer", memory_slots="4k").peer.experts == 4096
    assert build_config("nano", "peer", experts=4096).memory_size == 4096
    assert build_config("nano", "peer", memory={"heads": 2}).peer.heads == 2
    with pytest.raises(ConfigError, match="^experts"):
        build_config("nano", "peer", memory_slots="4k", experts=1024)


def test_peer_is_a_registered_memory_like_family_without_memory_parallelism():
    assert "peer" in FAMILIES and "peer" in MEMORY_FAMILIES and "peer" not in MEMORY_PARALLEL_FAMILIES


@pytest.mark.parametrize("data, field", [
    ({"family": "peer"}, "model.peer"),
    ({"family": "peer", "peer": {"experts": 1000}}, "model.peer.experts"),
    ({"family": "peer", "peer": {"experts": 64, "topk": 9}}, "model.peer.topk"),
    ({"family": "peer", "peer": {"activation": "tanh"}}, "model.peer.activation"),
    ({"family": "peer", "peer": {"score_norm": "none"}}, "model.peer.score_norm"),
    ({"family": "peer", "n_layers": 2, "peer": {"layers": [0, 5]}}, "model.peer.layers"),
    ({"family": "pkm", "memory": {"slots": 64, "topk": 4}, "peer": {}}, "model.peer"),
    ({"family": "peer", "peer": {}, "memory": {"slots": 64, "topk": 4}}, "model.memory"),
])
def test_an_invalid_peer_config_names_its_field(data, field):
    with pytest.raises(ConfigError) as error:
        from_dict(ModelConfig, data, "model")
    assert str(error.value).startswith(field + ":"), str(error.value)
