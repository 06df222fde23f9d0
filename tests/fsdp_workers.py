"""Workers of the FSDP tests, run by `run_local` in gloo processes (module-level so they can be imported).

`train_side_by_side` trains a tiny model of one family twice from the same initialisation: a
single-process reference on the whole global batch, and an FSDP copy (value tables column-sharded
over `memory_parallel` ranks, left out of FSDP) on this rank's slice; it returns the worst loss and
parameter differences over the steps.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from memlayers.models.config import MemoryConfig, ModelConfig, MoEConfig, PeerConfig
from memlayers.models.transformer import Transformer
from memlayers.platform.train.fsdp import apply_fsdp, full_state
from memlayers.platform.train.mesh import setup_parallel
from memlayers.platform.train.optim import build_optimizers
from memlayers.platform.train.run_config import TrainConfig

VOCAB, SEQ, SEQ_PER_RANK = 29, 6, 1


def tiny(family: str) -> ModelConfig:
    extra = {"memory_plus": {"memory": MemoryConfig(slots=64, heads=2, topk=2, n_layers=1)},
             "pkm": {"memory": MemoryConfig(slots=64, heads=2, topk=2, n_layers=1)},
             "moe": {"moe": MoEConfig(experts=2, topk=1, balance_coef=0.0)},
             "peer": {"peer": PeerConfig(experts=64, heads=2, topk=2, n_layers=1)}}.get(family, {})
    return ModelConfig(family=family, vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, max_seq_len=SEQ, **extra)


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def train_side_by_side(rank: int, world: int, family: str, memory_parallel: int, steps: int) -> dict:
    torch.manual_seed(0)
    reference = Transformer(tiny(family))
    model = copy.deepcopy(reference)
    plan = setup_parallel(model, memory_parallel)
    apply_fsdp(model, plan, True, "cpu")
    tcfg = TrainConfig(steps=steps, lr=3e-3, value_lr=3e-3, warmup=0.0, schedule="constant")
    ref_opt, opt = build_optimizers(reference, tcfg, steps), build_optimizers(model, tcfg, steps)
    gen = torch.Generator().manual_seed(1)
    value_ids = {id(p) for p in plan.value_params}
    ref_params = dict(reference.named_parameters())
    worst = {"loss": 0.0, "params": 0.0}
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (world * SEQ_PER_RANK, SEQ + 1), generator=gen)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mine = slice(rank * SEQ_PER_RANK, (rank + 1) * SEQ_PER_RANK)
        # the reference reads the global batch slice by slice, each with the shapes a rank sees: the
        # same forward arithmetic, so near-ties in a top-k do not flip on batching round-off
        ref_loss = sum(reference.loss(inputs[r * SEQ_PER_RANK:(r + 1) * SEQ_PER_RANK],
                                      targets[r * SEQ_PER_RANK:(r + 1) * SEQ_PER_RANK])[0]
                       for r in range(world)) / world
        ref_loss.backward()
        loss, _ = model.loss(inputs[mine], targets[mine])
        loss.backward()
        plan.sync_value_grads()
        for o, clip in ((ref_opt, None), (opt, plan.clip_value_grads_)):
            o.clip(tcfg, clip)
            o.step()
            o.zero_grad()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(float(ref_loss.detach()))
        worst["loss"] = max(worst["loss"], abs(float(global_loss) / world - float(ref_loss)))
        for name, p in model.named_parameters():
            want = ref_params[name].detach()
            if id(p) in value_ids and memory_parallel > 1:
                lo, hi = next(t.columns for t in model.value_tables() if t.weight is p)
                want = want[:, lo:hi]
            worst["params"] = max(worst["params"], float((_full(p).detach() - want).abs().max()))
    model_state, _ = full_state(model, opt.dense)
    dense_names = [n for n, p in model.named_parameters() if id(p) not in value_ids]
    # cpu_offload: the full state lands on rank 0 only
    gathered = max(float((model_state[n] - ref_params[n].detach()).abs().max()) for n in dense_names) if rank == 0 \
        else float(len(model_state))
    sharded = sum(hasattr(p, "full_tensor") for p in model.parameters())
    return {"worst": worst, "losses": losses, "gathered": gathered, "sharded_params": sharded,
            "value_params": len(plan.value_params), "value_dtensors": sum(hasattr(p, "full_tensor")
                                                                          for p in plan.value_params)}


def train_families(rank: int, world: int, runs: tuple[tuple[str, int], ...], steps: int) -> dict:
    """`train_side_by_side` for each (family, memory_parallel) in one set of processes."""
    return {family: train_side_by_side(rank, world, family, memory_parallel, steps) for family, memory_parallel in runs}


def save_sharded_copy(rank: int, world: int, run: dict, cache: str, source: str, target: str) -> None:
    """A memory-parallel (P = world) RunLoop given the weights of the single-process checkpoint `source`,
    saved into `target` as shards (what a run trained at P = world writes)."""
    from pathlib import Path

    from memlayers.platform.data.prepare import prepare_data
    from memlayers.platform.train.checkpoint import load_state
    from memlayers.platform.train.loop import RunLoop
    from memlayers.platform.train.run_config import run_config_from_dict

    cfg = run_config_from_dict({**run, "resources": {"workers": world, "memory_parallel": world}})
    loop = RunLoop(cfg, prepare_data(cfg.data, Path(cache)), rank=rank, world_size=world)
    full = load_state(Path(source))["model"]
    table = loop.model.memory_values
    lo, hi = table.columns
    with torch.no_grad():
        table.weight.copy_(full.pop("memory_values.weight")[:, lo:hi])
    loop.model.load_state_dict(full, strict=False)
    loop.step = int(load_state(Path(source))["step"])
    loop.save(Path(target))
