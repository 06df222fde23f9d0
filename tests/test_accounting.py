"""Parameter and FLOP accounting: the 8B reference figure, hand counts, memory costs no FLOPs."""

import json
import subprocess
import sys

import pytest
import torch

from memlayers.models.accounting import account
from memlayers.models.config import MemoryConfig, ModelConfig, MoEConfig, PeerConfig
from memlayers.models.presets import BASES, build_config
from memlayers.models.transformer import Transformer

V, D, L, H, G, F, S = 50, 32, 2, 4, 2, 48, 16   # vocab, dim, layers, heads, kv heads, ffn, seq
E = D // H


def hand_config(family: str) -> ModelConfig:
    extra = {}
    if family in ("pkm", "memory_plus"):
        extra["memory"] = MemoryConfig(slots=64, heads=2, topk=4, key_dim=8, n_layers=1)
    if family == "moe":
        extra["moe"] = MoEConfig(experts=4, topk=2, expert_ffn_dim=24)
    if family == "peer":
        extra["peer"] = PeerConfig(experts=64, heads=2, topk=4, key_dim=8, n_layers=1)
    return ModelConfig(family=family, vocab_size=V, dim=D, n_layers=L, n_heads=H, n_kv_heads=G,
                       ffn_dim=F, max_seq_len=S, **extra)


# written out by hand, term by term, for the shapes above
ATTN_P = D * H * E + 2 * D * G * E + H * E * D                    # 1024 + 1024 + 1024
ATTN_F = 2 * ATTN_P + 2 * 2 * H * E * (S + 1) // 2                 # projections + mixing
DENSE_P, DENSE_F = 3 * D * F, 2 * 3 * D * F
EMB, HEAD_F, NORMS = 2 * V * D, 2 * D * V, L * 2 * D + D
HAND = {
    "dense": dict(total=EMB + NORMS + L * (ATTN_P + DENSE_P), values=0, active=EMB + NORMS + L * (ATTN_P + DENSE_P),
                  fwd=L * (ATTN_F + DENSE_F) + HEAD_F),
    "moe": dict(total=EMB + NORMS + L * (ATTN_P + D * 4 + 4 * 3 * D * 24), values=0,
                active=EMB + NORMS + L * (ATTN_P + D * 4 + 2 * 3 * D * 24),
                fwd=L * (ATTN_F + 2 * D * 4 + 2 * 2 * 3 * D * 24) + HEAD_F),
    # one memory layer (layer 1): query D*2*8, sub-keys 2 heads * 8 sub-keys * 8 dims, values 64*D
    "pkm": dict(total=EMB + NORMS + L * ATTN_P + DENSE_P + D * 2 * 8 + 2 * 8 * 8 + 64 * D, values=64 * D,
                active=EMB + NORMS + L * ATTN_P + DENSE_P + D * 2 * 8 + 2 * 8 * 8 + 2 * 4 * D,
                fwd=L * ATTN_F + DENSE_F + 2 * D * 2 * 8 + 2 * 2 * 8 * 8 + 2 * 2 * 4 * D + HEAD_F),
    # memory_plus adds the query gain (4), gate and output (2*D*D) and their FLOPs (4*D*D)
    "memory_plus": dict(total=EMB + NORMS + L * ATTN_P + DENSE_P + D * 2 * 8 + 2 * 8 * 8 + 4 + 2 * D * D + 64 * D,
                        values=64 * D,
                        active=EMB + NORMS + L * ATTN_P + DENSE_P + D * 2 * 8 + 2 * 8 * 8 + 4 + 2 * D * D + 2 * 4 * D,
                        fwd=L * ATTN_F + DENSE_F + 2 * D * 2 * 8 + 2 * 2 * 8 * 8 + 2 * 2 * 4 * D + 4 * D * D + HEAD_F),
}


@pytest.mark.parametrize("family", list(HAND))
def test_hand_computed_counts_match(family):
    acc, hand = account(hand_config(family)), HAND[family]
    assert acc.total_params == hand["total"]
    assert acc.memory_value_params == hand["values"]
    assert acc.active_params == hand["active"]
    assert acc.embedding_params == EMB
    assert acc.forward_flops_per_token == hand["fwd"]
    assert acc.train_flops_per_token == 3 * hand["fwd"]


@pytest.mark.parametrize("family", list(HAND))
def test_counts_match_the_parameters_of_the_built_model(family):
    cfg = hand_config(family)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == account(cfg).total_params
    assert sum(p.numel() for p in model.value_parameters()) == account(cfg).memory_value_params


def test_memory_slots_change_training_flops_only_by_sub_key_scoring():
    small = build_config("373m", "memory_plus", memory_slots="64k")
    large = build_config("373m", "memory_plus", memory_slots="16m")
    layers, heads, key_dim = len(small.memory_layers), small.memory.heads, small.key_dim

    def scoring(cfg):
        return 3 * layers * 2 * heads * cfg.memory.sub_keys * key_dim

    delta = account(large).train_flops_per_token - account(small).train_flops_per_token
    assert delta == scoring(large) - scoring(small)
    assert account(large).memory_value_params == 256 * account(small).memory_value_params


def test_paper_bases_are_named_for_their_size_and_373m_has_the_reference_shape():
    assert BASES["373m"]["dim"] == 1024 and BASES["373m"]["n_layers"] == 24 and BASES["373m"]["n_heads"] == 16
    for name, expected in (("134m", 134e6), ("373m", 373e6), ("720m", 720e6), ("1.3b", 1.3e9), ("8b", 8.0e9)):
        assert abs(account(build_config(name, "dense")).total_params / expected - 1) < 0.05, name


def test_models_json_reports_the_8b_16m_value_parameters():
    out = subprocess.run([sys.executable, "-m", "memlayers.platform.cli.main", "models", "--json",
                          "--bases", "8b,nano", "--memory-sizes", "16m,4k"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    row = next(r for r in rows
               if r["preset"] == "8b" and r["family"] == "memory_plus" and r["memory_slots"] == 4096 ** 2)
    assert row["memory_value_params"] == 68_719_476_736
    assert {"preset", "family", "memory_slots", "total_params", "memory_value_params", "active_params",
            "train_flops_per_token"} <= set(row)
    dense = next(r for r in rows if r["preset"] == "8b" and r["family"] == "dense")
    assert dense["memory_slots"] == 0 and dense["memory_value_params"] == 0
    # per base: dense, moe, and every memory-like family (pkm, memory_plus, peer) at both sizes
    assert len(rows) == 2 * (2 + 3 * 2)
    peer = next(r for r in rows if r["preset"] == "8b" and r["family"] == "peer" and r["memory_slots"] == 4096 ** 2)
    assert peer["memory_value_params"] == 2 * 4096 ** 2 * 4096   # one PEER layer: u and v tables, N x D each


def _value_table_params(model: Transformer) -> int:
    """Parameters of every distinct value table the built model holds, found by module type."""
    from memlayers.models.values import ValueTable
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, ValueTable)}
    weights.update({id(layer.table.weight): layer.table.weight for layer in model.memory_layers()})
    weights.update({id(t.weight): t.weight for layer in model.peer_layers() for t in layer.tables()})
    return sum(w.numel() for w in weights.values())


SHARING = ([("dense", None), ("moe", None)] + [(f, s) for f in ("pkm", "memory_plus") for s in (None, True, False)]
           + [("peer", False), ("peer", True)])


@pytest.mark.parametrize("family, shared", SHARING)
def test_value_params_counted_equal_the_tables_the_model_builds(family, shared):
    cfg = hand_config(family)
    if cfg.memory is not None:   # two memory layers: shared or not makes a difference
        cfg.memory.n_layers, cfg.memory.shared_values = 2, shared
    if cfg.peer is not None:
        cfg.peer.n_layers, cfg.peer.shared_tables = 2, shared
    with torch.device("meta"):
        model = Transformer(cfg)
    acc = account(cfg)
    assert acc.memory_value_params == _value_table_params(model)
    assert acc.memory_value_params == sum(p.numel() for p in model.value_parameters())
    assert acc.total_params == sum(p.numel() for p in model.parameters())
