"""Memory parallelism on CPU with gloo: sharded training equals single-process training, checkpoints re-shard.

Each worker builds the same tiny Memory+ model twice (same seed): a single-process reference
trained on the whole global batch, and a copy sharded with `setup_parallel` (the trainer's path:
DDP over the world for dense parameters, value shards synced by hand, value clipping over the
memory-parallel group, the trainer's optimizers) trained on the rank's slice of the batch. After
each of several steps it compares logits, loss, every gradient and every updated parameter.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from memlayers.kernels.sharded_values import comm_bytes_per_token, force_all_to_all_fallback
from memlayers.kernels.value_optim import clip_value_grad_norm_
from memlayers.models.config import MemoryConfig, ModelConfig
from memlayers.models.transformer import Transformer
from memlayers.platform.cluster.local_launch import run_local
from memlayers.platform.train.mesh import setup_parallel, value_param_names
from memlayers.platform.train.optim import build_optimizers
from memlayers.platform.train.run_config import TrainConfig
from memlayers.platform.train.shard_checkpoint import load_values, save_sharded_values

TOL = 1e-5
REL_TOL = 1e-4
SEQ_PER_RANK, SEQ_LEN, STEPS = 2, 8, 3


def tiny_config(sparse_grad: bool) -> ModelConfig:
    return ModelConfig(family="memory_plus", vocab_size=61, dim=32, n_layers=2, n_heads=4, max_seq_len=16,
                       memory=MemoryConfig(slots=256, heads=2, topk=4, sparse_grad=sparse_grad))


def global_batch(world: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 61, (world * SEQ_PER_RANK, SEQ_LEN + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def dense(grad: torch.Tensor | None) -> torch.Tensor:
    return grad.to_dense() if grad is not None and grad.is_sparse else grad


def train_config(sparse_grad: bool) -> TrainConfig:
    return TrainConfig(steps=STEPS, lr=1e-2, value_lr=1e-2, warmup=0.0, schedule="constant",
                       value_optimizer="lazy_adam" if sparse_grad else "adamw")


def compare(rank: int, world: int, memory_parallel: int, sparse_grad: bool, fallback: bool) -> dict:
    """Train reference and sharded copies side by side; -> max abs differences, comm counts, the models."""
    cfg = tiny_config(sparse_grad)
    torch.manual_seed(0)
    reference = Transformer(cfg)
    model = copy.deepcopy(reference)
    plan = setup_parallel(model, memory_parallel)
    if fallback:
        force_all_to_all_fallback(plan.mp_group)
    ddp = plan.wrap_ddp(model)
    tcfg = train_config(sparse_grad)
    ref_opt, opt = build_optimizers(reference, tcfg, STEPS), build_optimizers(model, tcfg, STEPS)
    table = model.memory_values
    lo, hi = table.columns
    inputs, targets = global_batch(world)
    mine = slice(rank * SEQ_PER_RANK, (rank + 1) * SEQ_PER_RANK)
    keys = ("logits", "loss", "grads", "value_grad", "value_grad_norm", "params")
    errors, scales = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0.0)
    value_clip = None

    def worst(key: str, a: torch.Tensor, b: torch.Tensor) -> None:
        errors[key] = max(errors[key], float((a.detach() - b.detach()).abs().max()))
        scales[key] = max(scales[key], float(b.detach().abs().max()))

    ref_params = dict(reference.named_parameters())
    table.comm.reset()
    for _ in range(STEPS):
        ref_logits = reference(inputs)
        ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten())
        ref_loss.backward()
        logits = ddp(inputs[mine])
        loss = F.cross_entropy(logits.flatten(0, 1), targets[mine].flatten())
        loss.backward()
        plan.sync_value_grads()
        worst("logits", logits, ref_logits[mine])
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        worst("loss", global_loss / world, ref_loss)
        for name, p in model.named_parameters():
            if p is table.weight:
                worst("value_grad", dense(p.grad), dense(ref_params[name].grad)[:, lo:hi])
            else:
                worst("grads", p.grad, ref_params[name].grad)
        torch.nn.utils.clip_grad_norm_(ref_opt.dense_params, 1.0)
        torch.nn.utils.clip_grad_norm_(opt.dense_params, 1.0)
        ref_norm = clip_value_grad_norm_(ref_opt.value_params, float("inf"))
        value_clip = value_clip or 0.5 * float(ref_norm)  # clipping bites at least on the first step
        clip_value_grad_norm_(ref_opt.value_params, value_clip)
        worst("value_grad_norm", plan.clip_value_grads_(value_clip), ref_norm)
        ref_opt.step(), opt.step()
        ref_opt.zero_grad(), opt.zero_grad()
        for name, p in model.named_parameters():
            worst("params", p, ref_params[name][:, lo:hi] if p is table.weight else ref_params[name])
    summary = {"errors": errors, "relative": {k: errors[k] / scales[k] for k in keys}, "bytes": table.comm.total,
               "tokens": table.comm.tokens,
               "calls": dict(table.comm.calls), "columns": (lo, hi), "value_clip": value_clip,
               "shard_sum": float(table.weight.detach().sum())}
    return {"summary": summary, "model": model, "plan": plan, "opt": opt, "reference": reference, "ref_opt": ref_opt}


def eval_inputs() -> torch.Tensor:
    return torch.randint(0, 61, (4, SEQ_LEN), generator=torch.Generator().manual_seed(7))


def worker_p2(rank: int, world: int, ckpt: str) -> dict:
    """P = 2 (no data parallelism): both gradient modes; writes a checkpoint of the sparse run."""
    runs = {sparse: compare(rank, world, 2, sparse, fallback=False) for sparse in (True, False)}
    run = runs[True]
    save_sharded_values(run["model"], ckpt, run["opt"].values)
    if rank == 0:
        reference, names = run["reference"], value_param_names(run["model"], run["plan"].value_params)
        with torch.no_grad():
            logits = reference(eval_inputs())
        torch.save({"dense": {k: v for k, v in reference.state_dict().items() if k not in names},
                    "logits": logits, "value_state": dict(run["ref_opt"].values.state[reference.memory_values.weight])},
                   Path(ckpt) / "expected.pt")
    return {sparse: r["summary"] for sparse, r in runs.items()}


def load_checkpoint(ckpt: str | Path, memory_parallel: int | None, rows: slice) -> dict:
    """A fresh model (sharded when `memory_parallel`) loaded from the P=2 checkpoint vs the reference."""
    from memlayers.kernels.value_optim import LazyAdam

    expected = torch.load(Path(ckpt) / "expected.pt", weights_only=True)
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model = Transformer(tiny_config(True))
    if memory_parallel is not None:
        setup_parallel(model, memory_parallel)
    missing, unexpected = model.load_state_dict(expected["dense"], strict=False)
    table = model.memory_values
    lo, hi = getattr(table, "columns", (0, table.value_dim))
    optimizer = LazyAdam([table.weight])
    load_values(model, ckpt, optimizer)
    with torch.no_grad():
        logits = model(eval_inputs()[rows])
    state, ref_state = optimizer.state[table.weight], expected["value_state"]
    return {"missing": missing, "unexpected": unexpected,
            "logits": float((logits - expected["logits"][rows]).abs().max()),
            "exp_avg": float((state["exp_avg"] - ref_state["exp_avg"][:, lo:hi]).abs().max()),
            "exp_avg_sq": float((state["exp_avg_sq"] - ref_state["exp_avg_sq"][:, lo:hi]).abs().max()),
            "step_equal": bool(torch.equal(state["step"], ref_state["step"])),
            "rows_trained": int((ref_state["step"] > 0).sum())}


def worker_p4(rank: int, world: int, ckpt: str) -> dict:
    """P = 4: both gradient modes, then the P = 2 checkpoint loaded onto 4 shards."""
    out = {sparse: compare(rank, world, 4, sparse, fallback=False)["summary"] for sparse in (True, False)}
    out["checkpoint"] = load_checkpoint(ckpt, 4, slice(rank, rank + 1))
    return out


def worker_p2_dp2(rank: int, world: int) -> dict:
    """P = 2 x DP = 2; the dense-gradient run takes the all-gather fallback of the all-to-all."""
    return {sparse: compare(rank, world, 2, sparse, fallback=not sparse)["summary"] for sparse in (True, False)}


def assert_matches_reference(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        for sparse in (True, False):
            for key, error in result[sparse]["errors"].items():
                relative = result[sparse]["relative"][key]
                assert error < TOL, f"rank {rank} sparse_grad={sparse}: {key} differs by {error:.3g}"
                # gradients are small: also hold them to fp32 round-off relative to their size
                assert relative < REL_TOL, (f"rank {rank} sparse_grad={sparse}: {key} differs by {relative:.3g} "
                                            "of its size")


def bytes_per_token(summary: dict) -> float:
    return summary["bytes"] / summary["tokens"]


# ---- tests ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def p2_run(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("values-p2")
    return ckpt, run_local(worker_p2, 2, str(ckpt))


def test_p2_training_matches_the_single_process_model(p2_run):
    _, results = p2_run
    assert_matches_reference(results)
    assert [r[True]["columns"] for r in results] == [(0, 16), (16, 32)]
    assert results[0][True]["shard_sum"] != results[1][True]["shard_sum"]  # really different shards


def test_counted_bytes_per_token_follow_the_column_sharding_volume(p2_run):
    _, results = p2_run
    reads, value_dim = 2 * 4, 32
    for result in results:
        summary = result[True]
        assert set(summary["calls"]) == {"gather_reads", "all_to_all_outputs", "all_to_all_output_grads",
                                         "reduce_scatter_weight_grads"}
        # 2 memory layers share the table: 2 calls per step, each forward and backward
        assert summary["calls"]["gather_reads"] == 2 * STEPS
        assert bytes_per_token(summary) == pytest.approx(comm_bytes_per_token(reads, value_dim, 2))


def test_p2_checkpoint_loads_at_p1(p2_run):
    ckpt, _ = p2_run
    out = load_checkpoint(ckpt, None, slice(None))
    assert out["missing"] == ["memory_values.weight"] and not out["unexpected"]
    assert out["logits"] < TOL
    assert out["exp_avg"] < TOL and out["exp_avg_sq"] < TOL and out["step_equal"]
    assert out["rows_trained"] > 0


def test_p4_training_matches_and_the_p2_checkpoint_loads_at_p4(p2_run):
    ckpt, _ = p2_run
    results = run_local(worker_p4, 4, str(ckpt))
    assert_matches_reference(results)
    assert [r[True]["columns"] for r in results] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    for result in results:
        assert bytes_per_token(result[True]) == pytest.approx(comm_bytes_per_token(8, 32, 4))
        loaded = result["checkpoint"]
        assert loaded["logits"] < TOL
        assert loaded["exp_avg"] < TOL and loaded["exp_avg_sq"] < TOL and loaded["step_equal"]


def test_p2_times_dp2_matches_the_single_process_model():
    results = run_local(worker_p2_dp2, 4)
    assert_matches_reference(results)
    assert [r[True]["columns"] for r in results] == [(0, 16), (16, 32)] * 2
    # replicas of one shard stay identical; the two shards differ
    assert results[0][True]["shard_sum"] == results[2][True]["shard_sum"]
    assert results[0][True]["shard_sum"] != results[1][True]["shard_sum"]
    # the dense run went through the all-gather fallback: P times the all-to-all traffic
    fallback, native = results[0][False], results[0][True]
    assert bytes_per_token(fallback) > bytes_per_token(native)
