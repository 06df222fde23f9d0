"""Optimizers and the learning-rate schedule of a training run.

Two groups, as in the paper: AdamW for every non-value parameter (weight decay on matrices,
none on norms, gains and sub-keys' 1-D tensors; `CpuAdamW`: torch's AdamW, its CPU step in one
C++ call, the same numbers), and the value tables in their own optimizer
(`memlayers.kernels.value_optim`: lazy Adam or row-wise Adagrad on row-sparse gradients, or the
paper-faithful dense AdamW) with their own lr. Both follow one schedule: linear warmup, then
cosine or linear decay to `min_lr_ratio` of the peak, or constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from memlayers.kernels.dense_adamw import CpuAdamW
from memlayers.kernels.value_optim import clip_value_grad_norm_, make_value_optimizer
from memlayers.platform.train.run_config import TrainConfig


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    warmup = int(cfg.warmup * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


@dataclass
class Optimizers:
    dense: torch.optim.Optimizer
    values: torch.optim.Optimizer | None
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]
    dense_params: list[nn.Parameter]
    value_params: list[nn.Parameter]

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)
        if self.values is not None:
            self.values.zero_grad(set_to_none=True)

    def clip(self, cfg: TrainConfig, value_clipper=None) -> tuple[float, float]:
        """Clip dense and value gradients separately; returns their norms before clipping.

        `value_clipper(max_norm) -> norm` replaces the local value clipping (sharded tables
        need the norm summed over their memory-parallel group).
        """
        dense_norm = nn.utils.clip_grad_norm_(self.dense_params, cfg.grad_clip)
        if not self.value_params:
            return float(dense_norm), 0.0
        if value_clipper is not None:
            return float(dense_norm), float(value_clipper(cfg.value_grad_clip))
        return float(dense_norm), float(clip_value_grad_norm_(self.value_params, cfg.value_grad_clip))

    def step(self) -> None:
        self.dense.step()
        if self.values is not None:
            self.values.step()
        for scheduler in self.schedulers:
            scheduler.step()

    def state_dict(self, values: bool = True) -> dict:
        """`values=False` leaves out the value optimizer (sharded tables save it with their shards)."""
        return {"dense": self.dense.state_dict(),
                "values": self.values.state_dict() if self.values is not None and values else None,
                "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        self.dense.load_state_dict(state["dense"])
        if self.values is not None and state["values"] is not None:
            self.values.load_state_dict(state["values"])
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)


def build_optimizers(model: nn.Module, cfg: TrainConfig, total_steps: int) -> Optimizers:
    """AdamW (dense) + the value optimizer, both on one warmup/decay schedule."""
    value_ids = {id(p) for p in model.value_parameters()}
    value_params = [p for p in model.parameters() if id(p) in value_ids]
    dense_params = [p for p in model.parameters() if id(p) not in value_ids and p.requires_grad]
    decay = [p for p in dense_params if p.ndim >= 2]
    no_decay = [p for p in dense_params if p.ndim < 2]
    dense = CpuAdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=cfg.lr, betas=tuple(cfg.betas))
    values = make_value_optimizer(cfg.value_optimizer, value_params, lr=cfg.value_lr) if value_params else None

    def schedule(step: int) -> float:
        return lr_factor(step, total_steps, cfg)

    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in (dense, values) if opt is not None]
    return Optimizers(dense, values, schedulers, dense_params, value_params)
