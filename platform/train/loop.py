"""The training loop of one worker: model, data, optimizers, schedule, metrics, state.

`RunLoop` is plain PyTorch (no Ray): the Ray Train worker (worker.py) drives it, and tests
and benchmarks drive it in-process. With `torch.distributed` initialised and world size > 1
it builds the data-parallel x memory-parallel mesh (`platform/parallel.py`): the dense
parameters go to DDP (gloo on CPU, NCCL on GPU); value tables are left out of DDP — split by
columns over `resources.memory_parallel` ranks when that is > 1 — and their row-sparse
gradients are averaged by hand, since DDP cannot all-reduce sparse gradients on NCCL.
Everything a resumed run needs — model, optimizers, schedulers, data position, RNG, value
shards — is written by `save(directory)` and read back by `load(directory)`. A loop sets the
process's CPU allocator to keep freed memory (`memlayers.kernels.allocator`): without it the
step's logits and their gradients are page-faulted in afresh every step (~20% of a nano step).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from memlayers.config_schema import ConfigError
from memlayers.kernels.allocator import keep_freed_memory
from memlayers.kernels.usage import SlotUsage
from memlayers.models.accounting import Accounting, account
from memlayers.models.config import ModelConfig
from memlayers.models.moe import load_imbalance
from memlayers.models.transformer import Transformer
from memlayers.platform.data.loader import TokenLoader
from memlayers.platform.data.prepare import PreparedData
from memlayers.platform.data.qa import select_items
from memlayers.platform.train.budget import budget_steps
from memlayers.platform.train.checkpoint import load_state, save_state
from memlayers.platform.train.commit import is_marker, write_commit_marker
from memlayers.platform.train.evaluate import qa_metrics, validation_loss
from memlayers.platform.train.fsdp import apply_fsdp, full_state, load_full_state
from memlayers.platform.train.mesh import ParallelPlan, setup_parallel, value_param_names
from memlayers.platform.train.optim import build_optimizers
from memlayers.platform.train.run_config import RunConfig
from memlayers.platform.train.shard_checkpoint import load_values


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run cannot continue."""


@dataclass(frozen=True)
class Plan:
    """How long a run is: steps, tokens, FLOPs, from its budget and the model's accounting."""

    model: ModelConfig
    accounting: Accounting
    steps: int
    tokens_per_step: int

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def train_flops(self) -> float:
        return float(self.tokens) * self.accounting.train_flops_per_token


def plan_run(cfg: RunConfig, vocab_size: int) -> Plan:
    """Resolve the budget (steps, tokens or FLOPs) into a step count."""
    model_cfg = cfg.model.build(vocab_size, cfg.data.seq_len)
    if model_cfg.memory is not None:  # dense AdamW on values needs dense gradients
        model_cfg.memory.sparse_grad = cfg.train.value_optimizer != "adamw"
    acc = account(model_cfg, cfg.data.seq_len)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    kind, value = cfg.train.budget()
    steps = budget_steps(kind, value, tokens_per_step, acc.train_flops_per_token)
    if steps < 1:
        raise ConfigError(f"train.{kind}", f"{value:g} FLOPs buy no step (one step costs "
                          f"{acc.train_flops_per_token * tokens_per_step:.3g})")
    return Plan(model_cfg, acc, steps, tokens_per_step)


class LossModule(nn.Module):
    """forward(inputs, targets) -> (loss, ce): the unit DDP wraps."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor):
        return self.model.loss(inputs_BT, targets_BT)


class RunLoop:
    def __init__(self, cfg: RunConfig, data: PreparedData, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None) -> None:
        self.cfg, self.data, self.rank, self.world_size = cfg, data, rank, world_size
        self.device = device or torch.device("cpu")
        keep_freed_memory()  # a step's large temporaries are reused, not page-faulted in again
        self.plan = plan_run(cfg, data.tokenizer.vocab_size)
        if cfg.train.batch_size % world_size:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the {world_size} workers")
        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(self.plan.model).to(self.device)
        self.wrapped: nn.Module = LossModule(self.model)
        self.parallel: ParallelPlan | None = None
        self.fsdp = False
        if world_size > 1 and dist.is_initialized():
            self.parallel = setup_parallel(self.model, cfg.resources.memory_parallel)
            if cfg.resources.fsdp:  # dense weights sharded (fsdp.py); value tables exactly as under DDP
                apply_fsdp(self.model, self.parallel, cfg.resources.fsdp, self.device.type)
                self.fsdp = True
            else:
                self.wrapped = self.parallel.wrap_ddp(self.wrapped,
                                                      find_unused_parameters=self.plan.model.family == "moe")
        self.optimizers = build_optimizers(self.model, cfg.train, self.plan.steps)
        self.loader = TokenLoader(data.train_ids, cfg.data.seq_len, cfg.train.batch_size // world_size,
                                  rank=rank, world_size=world_size, seed=cfg.train.seed)
        self.usage = [SlotUsage(t.slots) for t in self.model.value_tables()]
        self.step = 0
        self._window_start, self._window_tokens = time.perf_counter(), 0

    # ---- one optimizer step --------------------------------------------------------------
    def autocast(self):
        use_bf16 = self.cfg.train.dtype == "bf16" or (self.cfg.train.dtype == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        self.model.train()
        inputs, targets = (t.to(self.device) for t in self.loader.next_batch())
        with self.autocast():
            loss, ce = self.wrapped(inputs, targets)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite loss {float(loss)} at step {self.step + 1}")
        loss.backward()
        if self.parallel is not None and self.optimizers.value_params:
            self.parallel.sync_value_grads()
        grad_norm, value_grad_norm = self.optimizers.clip(
            self.cfg.train, self.parallel.clip_value_grads_ if self.parallel is not None else None)
        lr = self.optimizers.dense.param_groups[0]["lr"]
        self.optimizers.step()
        self.optimizers.zero_grad()
        self.step += 1
        self._window_tokens += self.plan.tokens_per_step
        return self._step_metrics(float(ce.detach()), lr, grad_norm, value_grad_norm)

    def _step_metrics(self, ce: float, lr: float, grad_norm: float, value_grad_norm: float) -> dict[str, float]:
        metrics = {"loss": ce, "lr": lr, "grad_norm": grad_norm, "tokens": float(self.step * self.plan.tokens_per_step),
                   "train_flops": float(self.step * self.plan.tokens_per_step
                                        * self.plan.accounting.train_flops_per_token)}
        if self.usage:
            metrics["value_grad_norm"] = value_grad_norm
            for usage, table in zip(self.usage, self.model.value_tables()):
                for read_table, rows_TR in self.model.table_reads():
                    if read_table is table and rows_TR is not None:
                        usage.update(rows_TR)
            if self.step % self.cfg.train.log_every == 0 or self.done:  # metrics() is O(slots)
                per_table = [u.metrics() for u in self.usage]
                for key in per_table[0]:
                    metrics[key] = sum(m[key] for m in per_table) / len(per_table)
        if self.model.moe_layers():
            metrics["moe_imbalance"] = (sum(load_imbalance(m.last_load_E) for m in self.model.moe_layers())
                                        / len(self.model.moe_layers()))
        return metrics

    def throughput(self) -> float:
        """Tokens/s (all workers) since the last call."""
        now = time.perf_counter()
        rate = self._window_tokens / max(now - self._window_start, 1e-9)
        self._window_start, self._window_tokens = now, 0
        return rate

    # ---- evaluation ----------------------------------------------------------------------
    def qa_items(self) -> list:
        return select_items(self.data.qa, self.cfg.train.qa_eval_items)

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with self.autocast():
            metrics = {"val_loss": validation_loss(self.model, self.data.val_ids, self.cfg.data.seq_len,
                                                   max(1, self.cfg.train.batch_size // self.world_size),
                                                   self.cfg.train.eval_batches, self.device)}
            metrics.update(qa_metrics(self.model, self.qa_items(), self.device, pad_id=self.data.tokenizer.pad_id))
        return metrics

    @property
    def done(self) -> bool:
        return self.step >= self.plan.steps

    # ---- state ----------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        return self.parallel is not None and self.parallel.memory_parallel > 1

    def state_dict(self, full: tuple[dict, dict] | None = None) -> dict:
        """Rank 0's state; with sharded tables, without the value shards and their optimizer. Under FSDP
        `full` is the gathered (model, dense optimizer) state (`fsdp.full_state`)."""
        model_state = self.model.state_dict() if full is None else full[0]
        if self.sharded:
            for name in value_param_names(self.model, self.parallel.value_params):
                model_state.pop(name, None)
        optimizers = self.optimizers.state_dict(values=not self.sharded)
        if full is not None:
            optimizers["dense"] = full[1]
        state = {"model": model_state, "optimizers": optimizers,
                 "loader": self.loader.state_dict(), "step": self.step, "rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state()
        return state

    def save(self, directory: Path) -> bool:
        """Write this rank's part of a checkpoint into `directory`; False if it has none."""
        wrote = False
        full = full_state(self.model, self.optimizers.dense) if self.fsdp else None  # a collective: every rank
        if self.rank == 0:  # the run config and tokenizer make the checkpoint loadable on its own
            save_state(self.state_dict(full), directory, 0, meta={"step": self.step, "world_size": self.world_size,
                                                              "memory_parallel": self.cfg.resources.memory_parallel,
                                                              "run": self.cfg.to_dict(),
                                                              "tokenizer": self.data.tokenizer.kind})
            self.data.tokenizer.save(Path(directory))
            wrote = True
        shards = self.parallel.save_values(self.model, directory, self.optimizers.values) if self.sharded else []
        wrote = bool(shards) or wrote
        if wrote:  # last: the marker vouches for the files above (a checkpoint without it is never loaded)
            write_commit_marker(Path(directory), self._own_files(Path(directory), shards), writer=self.rank)
        return wrote

    def _own_files(self, directory: Path, shards: list[Path]) -> list[str]:
        """The files this rank wrote into a checkpoint folder that other ranks write into at the same time:
        its value shards, and on rank 0 everything that is neither a shard nor a marker or temporary file."""
        own = [Path(f).relative_to(directory).as_posix() for f in shards]
        if self.rank == 0:
            own += [p.relative_to(directory).as_posix() for p in directory.rglob("*")
                    if p.is_file() and not p.name.startswith((".", "values-")) and not is_marker(p.name)]
        return sorted(set(own))

    def load(self, directory: Path) -> None:
        """Resume from a checkpoint directory written by `save` (any memory-parallel size)."""
        self.load_state_dict(load_state(directory, 0, map_location=self.device))
        if any(Path(directory).glob("values-t*-p*-r*.pt")):
            load_values(self.model, directory, self.optimizers.values)

    def load_state_dict(self, state: dict) -> None:
        # value tables may be missing: a sharded run saves them as shards (read by `load`)
        if self.fsdp:  # the full state scattered into this rank's shards (a collective: every rank loads)
            load_full_state(self.model, self.optimizers.dense, state["model"], state["optimizers"]["dense"])
            state = dict(state, optimizers=dict(state["optimizers"], dense=self.optimizers.dense.state_dict()))
        else:
            missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
            value_names = set(value_param_names(self.model, self.model.value_parameters()))
            if unexpected or set(missing) - value_names:
                raise RuntimeError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
        self.optimizers.load_state_dict(state["optimizers"])
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng_cuda"])
