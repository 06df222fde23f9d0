"""AdamW for the dense parameters, with its CPU step in one C++ call.

`CpuAdamW` is `torch.optim.AdamW` (same arguments, state and state dicts) whose step, for a group
of CPU fp32/fp64 parameters with dense gradients and AdamW's default options (no amsgrad,
maximize, capturable, differentiable, foreach or fused), runs as `cpu_ops.adamw_`: the for-loop
step that torch takes on CPU, op for op in its arithmetic, so the parameters, moments and step
counts are the same bit for bit (the tests hold it over many steps, with and without weight
decay). torch's for-loop step costs ~10 small ops per parameter (measured: ~0.9 ms a step for the
~20 tensors of a nano model, a tenth of a quickstart step); the C++ call is one for the group.
Anything else (CUDA, other dtypes, other options, the C++ ops off or not built, a torch build
whose CPU kernels do not fuse multiply-adds) takes torch's own step.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import _get_scalar_dtype

from memlayers.kernels import cpu_ops
from memlayers.kernels.value_optim import torch_fuses_multiply_adds

_TORCH_PATH_OPTIONS = ("amsgrad", "maximize", "capturable", "differentiable", "foreach", "fused")


class CpuAdamW(torch.optim.AdamW):
    """torch.optim.AdamW with the CPU step of `cpu_ops.adamw_` where it applies (module docstring)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # first, as torch's step: the closure may set the gradients
            with torch.enable_grad():
                loss = closure()
        groups = [self._ops_for(group) for group in self.param_groups]
        if any(ops is None for ops in groups):
            self._torch_step()
            return loss
        for group, ops in zip(self.param_groups, groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state_of(p) for p in params]
            beta1, beta2 = group["betas"]
            ops.adamw_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                       [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                       group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        return loss

    def _torch_step(self) -> None:
        """torch's AdamW step, without a second run of the step hooks (this step already ran them)."""
        step = torch.optim.AdamW.step
        step = getattr(step, "__wrapped__", step) if getattr(step, "hooked", False) else step
        step(self)

    def _ops_for(self, group: dict):
        """The C++ ops when this group's step can run as `adamw_`, else None (torch's step)."""
        if any(group.get(option) for option in _TORCH_PATH_OPTIONS) or not group.get("decoupled_weight_decay", True):
            return None
        if not all(isinstance(x, float) for x in (group["lr"], *group["betas"], group["eps"], group["weight_decay"])):
            return None  # tensor hyper-parameters: torch's step
        params = [p for p in group["params"] if p.grad is not None]
        if not params:  # nothing to step here (without the C++ ops, torch's step, which skips it too)
            return cpu_ops.ops()
        if not torch_fuses_multiply_adds():
            return None
        tensors = []
        for p in params:
            if p.grad.is_sparse or p.is_complex() or not p.is_contiguous() or p.grad.dtype != p.dtype:
                return None
            if type(p.data) is not torch.Tensor:  # a tensor subclass (FSDP's DTensor shards): torch's step
                return None
            state = self.state.get(p)
            moments = [state.get(key) for key in ("exp_avg", "exp_avg_sq")] if state else []
            if state and not (isinstance(state.get("step"), torch.Tensor) and all(
                    isinstance(t, torch.Tensor) and t.is_contiguous() and t.dtype == p.dtype for t in moments)):
                return None
            tensors += [p, *moments, *([state["step"]] if state else [])]
        return cpu_ops.applies(*tensors)  # CPU fp32/fp64 tensors, the C++ ops on

    def _state_of(self, p: torch.Tensor) -> dict:
        """The parameter's state, created as torch's AdamW creates it at its first step."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state
