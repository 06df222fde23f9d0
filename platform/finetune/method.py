"""A finetuning method applied to a pretrained model: what trains, and the optimizers of only that.

`apply_method(model, run)` freezes what the method leaves alone (requires_grad False), adds the
LoRA adapters for `lora`, and returns the trainable parameters split into non-value weights and
value tables. `finetune_optimizers` builds the optimizers over those alone, so a frozen weight
never gets optimizer state: AdamW (the training loop's, weight decay on matrices) for non-value
weights, lazy Adam or SGD for value rows (both touch only the rows a gradient holds). Where only
value rows train, their optimizer takes the loop's first slot, whose lr the loop logs.
"""

from __future__ import annotations

import torch
from torch import nn

from memlayers.kernels.dense_adamw import CpuAdamW
from memlayers.kernels.value_optim import make_value_optimizer
from memlayers.models.lora import add_lora
from memlayers.models.transformer import Transformer
from memlayers.platform.finetune.config import MEMORY_METHODS, FinetuneRun
from memlayers.platform.train.optim import Optimizers, lr_factor
from memlayers.platform.train.run_config import TrainConfig


def apply_method(model: Transformer, run: FinetuneRun) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Freeze, adapt; -> (trainable non-value parameters, trainable value tables)."""
    values = model.value_parameters()
    if run.method in MEMORY_METHODS and not values:
        raise ValueError(f"finetune.method: {run.method} trains memory values; the source model has none")
    for p in model.parameters():
        p.requires_grad_(run.method == "full")
    if run.method == "lora":
        add_lora(model, run.lora.targets, run.lora.rank, run.lora.alpha)  # adapters are created trainable
    if run.method in MEMORY_METHODS:
        for p in values:
            p.requires_grad_(True)
    value_ids = {id(p) for p in values}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in value_ids]
    return dense, [p for p in values if p.requires_grad]


def finetune_optimizers(dense_params: list[nn.Parameter], value_params: list[nn.Parameter], cfg: TrainConfig,
                        total_steps: int, value_optimizer: str) -> Optimizers:
    """Optimizers over the trainable parameters only, on the training loop's warmup/decay schedule."""
    values = None
    if value_params:
        kind = "lazy_adam" if value_optimizer == "adam" else "sgd"
        values = (make_value_optimizer(kind, value_params, lr=cfg.value_lr) if kind == "lazy_adam"
                  else torch.optim.SGD(value_params, lr=cfg.value_lr))
    if dense_params:
        groups = [{"params": [p for p in dense_params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in dense_params if p.ndim < 2], "weight_decay": 0.0}]
        dense = CpuAdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas))
    elif values is not None:
        dense, values = values, None
    else:
        raise ValueError("finetune.method: nothing to train")
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total_steps, cfg))
                  for opt in (dense, values) if opt is not None]
    return Optimizers(dense, values, schedulers, dense_params, value_params)
