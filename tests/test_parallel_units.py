"""Memory parallelism pieces that run in one process: mesh, volumes, accounting, sharding, checkpoints, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from memlayers.config_schema import ConfigError
from memlayers.kernels.sharded_values import ShardedValueTable, column_range, comm_bytes_per_token
from memlayers.models.config import MemoryConfig, ModelConfig
from memlayers.models.presets import build_config
from memlayers.models.transformer import Transformer
from memlayers.models.values import ValueTable
from memlayers.platform.train.mesh import mesh_layout, shard_memory
from memlayers.platform.train.rank_memory import memory_per_rank
from memlayers.platform.train.shard_checkpoint import load_values, save_sharded_values


def test_mesh_puts_memory_parallel_groups_on_consecutive_ranks():
    mesh = mesh_layout(4, 2, rank=3)
    assert mesh.mp_groups() == [[0, 1], [2, 3]] and mesh.dp_groups() == [[0, 2], [1, 3]]
    assert (mesh.data_parallel, mesh.mp_rank, mesh.dp_rank) == (2, 1, 1)
    assert mesh_layout(4, 4).mp_groups() == [[0, 1, 2, 3]] and mesh_layout(4, 4).dp_groups() == [[0], [1], [2], [3]]
    with pytest.raises(ConfigError, match="resources.memory_parallel"):
        mesh_layout(4, 3)


def test_columns_split_evenly_or_refuse():
    assert [column_range(32, 4, r) for r in range(4)] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    with pytest.raises(ValueError, match="divisible"):
        column_range(30, 4, 0)


def test_communication_volume_column_vs_row():
    # the paper's 8B shape: V = 4096 in bf16, 4 heads x top-32 = 128 reads, P = 8
    column = comm_bytes_per_token(128, 4096, 8, layout="column", value_bytes=2)
    assert column == 7 * 12 * 128 + 2 * 7 / 8 * 4096 * 2 == 25088
    assert comm_bytes_per_token(128, 4096, 8, layout="row", value_bytes=2) > 4 * column
    # row sharding wins only for narrow values: V * b < 6K
    assert (comm_bytes_per_token(128, 256, 8, layout="row", value_bytes=2)
            < comm_bytes_per_token(128, 256, 8, value_bytes=2))
    assert (comm_bytes_per_token(128, 512, 8, layout="row", value_bytes=2)
            > comm_bytes_per_token(128, 512, 8, value_bytes=2))
    assert comm_bytes_per_token(128, 4096, 1) == 0


def test_memory_per_rank_divides_the_table_and_its_adam_state():
    cfg = build_config("8b", "memory_plus", memory_slots="16m")
    one, eight = memory_per_rank(cfg, 1), memory_per_rank(cfg, 8)
    assert one.value_params == 4096 ** 3 and eight.value_params == 4096 ** 3 // 8
    assert eight.param_bytes == 4 * 4096 ** 3 // 8
    assert eight.optimizer_bytes == 2 * 4 * 4096 ** 3 // 8 + 4 * 4096 ** 2  # 2 moments + int32 step per row
    assert eight.total_bytes == eight.param_bytes + eight.optimizer_bytes
    assert memory_per_rank(cfg, 8, "row_adagrad").optimizer_bytes == 4 * 4096 ** 2  # one float per row
    assert memory_per_rank(build_config("tiny", "dense"), 2).total_bytes == 0
    with pytest.raises(ValueError, match="divisible"):
        memory_per_rank(build_config("micro", "memory_plus", memory_slots="4k"), 5)  # dim 48


@pytest.mark.parametrize("sparse_grad", [True, False])
def test_a_single_shard_is_the_plain_table(sparse_grad):
    torch.manual_seed(0)
    plain = ValueTable(64, 8, sparse_grad=sparse_grad)
    plain.init_weights()
    shard = ShardedValueTable.from_full(plain.weight.detach(), sparse_grad=sparse_grad)
    assert (shard.shards, shard.columns, shard.value_dim, shard.slots) == (1, (0, 8), 8, 64)
    slots = torch.randint(0, 64, (5, 3))
    weights = torch.rand(5, 3, requires_grad=True)
    (plain(slots, weights) ** 2).sum().backward()
    expected_weights_grad = weights.grad.clone()
    weights.grad = None
    (shard(slots, weights) ** 2).sum().backward()
    assert shard.weight.grad.is_sparse == sparse_grad
    torch.testing.assert_close(shard.weight.grad.to_dense(), plain.weight.grad.to_dense())
    torch.testing.assert_close(weights.grad, expected_weights_grad)


def pkm_config() -> ModelConfig:
    return ModelConfig(family="pkm", vocab_size=61, dim=16, n_layers=4, n_heads=2, max_seq_len=16,
                       memory=MemoryConfig(slots=64, heads=2, topk=4, n_layers=2))


def test_shard_memory_replaces_shared_and_per_layer_tables_in_place():
    torch.manual_seed(0)
    for cfg in (pkm_config(), build_config("nano", "memory_plus", memory_slots=256, memory={"heads": 2, "topk": 4})):
        model = Transformer(cfg)
        tokens = torch.randint(0, 61, (2, 8))
        before = model(tokens)
        tables = model.value_tables()
        shard_memory(model, None)
        assert all(isinstance(t, ShardedValueTable) for t in model.value_tables())
        assert len(model.value_tables()) == len(tables) == (2 if cfg.family == "pkm" else 1)
        assert len(list(model.parameters())) == len(list(Transformer(cfg).parameters()))  # shared table once
        torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)
        with pytest.raises(ValueError, match="already sharded"):
            shard_memory(model, None)


def test_a_model_built_on_meta_gets_empty_shards_to_initialise():
    cfg = build_config("nano", "memory_plus", memory_slots=256, memory={"heads": 2, "topk": 4})
    with torch.device("meta"):
        model = Transformer(cfg)
    shard_memory(model, None)
    assert model.memory_values.weight.device.type == "meta" and model.memory_values.weight.shape == (256, 32)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.memory_values.weight.std().item() == pytest.approx(32 ** -0.5, rel=0.1)
    assert torch.isfinite(model(torch.randint(0, 61, (1, 8)))).all()


def test_values_round_trip_with_optimizer_state_and_refuse_mixed_writes(tmp_path):
    from memlayers.kernels.value_optim import LazyAdam

    torch.manual_seed(0)
    model = Transformer(pkm_config())
    optimizer = LazyAdam(model.value_parameters(), lr=0.1)
    model.loss(torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (2, 8)))[0].backward()
    optimizer.step()
    files = save_sharded_values(model, tmp_path, optimizer)
    assert [f.name for f in files] == ["values-t0-p1-r0.pt", "values-t1-p1-r0.pt"]
    saved = torch.load(files[0], weights_only=True)
    assert (saved["p"], saved["rank"], saved["columns"]) == (1, 0, [0, 16])

    torch.manual_seed(1)
    other = Transformer(pkm_config())
    other_opt = LazyAdam(other.value_parameters(), lr=0.1)
    load_values(other, tmp_path, other_opt)
    for a, b in zip(model.value_tables(), other.value_tables()):
        assert torch.equal(a.weight, b.weight)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[a.weight][key], other_opt.state[b.weight][key])

    (tmp_path / "values-t0-p2-r0.pt").write_bytes(files[0].read_bytes())
    with pytest.raises(ValueError, match="several P"):
        load_values(other, tmp_path)
    (tmp_path / "values-t0-p2-r0.pt").unlink()
    bigger = pkm_config()
    bigger.memory = MemoryConfig(slots=256, heads=2, topk=4, n_layers=2)
    with pytest.raises(ValueError, match="the model's is 256 x 16"):
        load_values(Transformer(bigger), tmp_path)


def test_bench_cli_registers_json_and_p_options():
    import argparse

    from memlayers.platform.bench import parallel as bench_parallel

    parser = argparse.ArgumentParser()
    bench_parallel.register(parser)
    args = parser.parse_args(["--json", "--p", "1", "2", "--steps", "2"])
    assert args.json and args.p == [1, 2] and args.steps == 2 and args.func is bench_parallel.run
    defaults = parser.parse_args([])
    assert defaults.p == [1, 2, 4] and not defaults.json
    assert math.isqrt(defaults.slots) ** 2 == defaults.slots


def test_bench_json_reports_counted_bytes_for_each_p(capsys):
    from memlayers.platform.cli.main import main

    code = main(["bench", "parallel", "--json", "--p", "1", "2", "--steps", "1", "--dim", "16", "--slots", "256",
                 "--heads", "2", "--topk", "4", "--batch", "1", "--seq-len", "8"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [sorted(r) for r in rows] == [["bytes_per_token", "p", "step_ms"]] * 2
    assert [r["p"] for r in rows] == [1, 2] and all(r["step_ms"] > 0 for r in rows)
    # 3 memory layers call the shared table per step
    assert rows[0]["bytes_per_token"] == 0
    assert rows[1]["bytes_per_token"] == pytest.approx(3 * comm_bytes_per_token(8, 16, 2))
