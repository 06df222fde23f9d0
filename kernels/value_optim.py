"""Optimizers and gradient utilities for memory value tables with row-sparse gradients.

A value table (N, V) read by `embedding_bag(..., sparse_grad=True)` gets a sparse `.grad` holding
only the U rows read this step. The optimizers here touch only those rows, so a step costs
O(U * V) whatever N is (the state tensors are allocated once, at the first step).

- `LazyAdam`: Adam (decoupled weight decay, as AdamW) applied to the rows read this step only.
  Semantics vs dense Adam: the moments of a row that is not read are NOT decayed, and the step
  count is kept PER ROW (it counts the steps that read that row). Each row therefore follows
  exactly the Adam trajectory it would have if the optimizer saw only the steps that read it:
  a row read at every step gets exactly dense Adam's update (same arithmetic, bit for bit), and
  a row read for the first time late in training gets a fully bias-corrected first update
  (with a global step count its first update would be ~(1 - beta1) / sqrt(1 - beta2) times too
  small). Dense Adam instead keeps moving unread rows along their decaying momentum. State:
  two (N, V) moment tensors and an (N,) int32 step count. Dense gradients are accepted and
  treated as "every row read", which makes it equal to `torch.optim.AdamW`. On CPU fp32/fp64
  tables with the C++ ops (`memlayers.kernels.cpu_ops`), the rows of a sparse gradient are updated
  in place in one pass (`lazy_adam_rows_`), with the same arithmetic as the torch path.
- `RowAdagrad`: one accumulator per row (the mean over the row of the squared gradient), the
  row-wise Adagrad used for large embedding tables: state is (N,) floats (fp32; fp64 for a fp64
  table), so a 4M x 512 table
  needs 16 MB of optimizer state instead of 16 GB for Adam's moments. On CPU (as `LazyAdam`) the
  rows of a sparse gradient are updated in place by one C++ op (`row_adagrad_rows_`).
- `make_value_optimizer`: "lazy_adam", "row_adagrad" or "adamw" (the paper-faithful dense AdamW,
  which needs dense value gradients: `sparse_grad=False`).
- `clip_value_grad_norm_`: clip the value gradients separately (sparse or dense), as the paper does.
- `allreduce_value_grads_`: average row-sparse gradients over data-parallel ranks by an
  all-gather of (indices, rows) (DDP cannot reduce sparse gradients on NCCL; the value tables are
  kept out of DDP and reduced with this). Works on gloo and NCCL.

Shape suffixes: see docs/shapes.md (a chunk of the U rows with a gradient keeps the letter U).
"""

from __future__ import annotations

import functools
from typing import Iterable, Iterator

import torch

from memlayers.kernels import cpu_ops
from memlayers.kernels.bag_torch import accumulate_dtype  # fp32, or fp64 for a fp64 table

ParamsT = Iterable[torch.Tensor] | Iterable[dict]


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    """A coalesced view of a sparse gradient, without the sort and copy when its rows are already unique.

    Autograd drops the "coalesced" flag when it stores a sparse gradient in `.grad`, although the
    lookup's gradient is coalesced: an O(U) check of strictly increasing rows avoids re-sorting it.
    Gradients summed from several reads of a table (shared by layers) are coalesced for real.
    """
    if grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    if grad.sparse_dim() == 1 and bool((rows[1:] > rows[:-1]).all()):
        return torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape,
                                       is_coalesced=True, check_invariants=False)
    return grad.coalesce()


def rows_of_grad(grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """-> (rows_U, grad_UV): the rows with a gradient and their gradient; rows None = all rows (dense)."""
    if not grad.is_sparse:
        return None, grad
    grad = coalesced(grad)
    return grad._indices()[0], grad._values()


def _check(name: str, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


ROW_CHUNK_ELEMENTS = 1 << 22  # rows per optimizer chunk x V: 16 MB of fp32, cache-sized temporaries

Rows = slice | torch.Tensor


def _row_chunks(rows_U: torch.Tensor | None, grad_UV: torch.Tensor) -> Iterator[tuple[Rows, torch.Tensor]]:
    """(rows, grad rows) in chunks: small temporaries that stay in cache and are never page-faulted."""
    step = max(1, ROW_CHUNK_ELEMENTS // max(1, grad_UV[0].numel() if grad_UV.shape[0] else 1))
    for lo in range(0, grad_UV.shape[0], step):
        hi = min(grad_UV.shape[0], lo + step)
        yield (slice(lo, hi) if rows_U is None else rows_U[lo:hi]), grad_UV[lo:hi]


def _take(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The rows of a state tensor: a view (dense: updated in place) or a gathered copy."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _put(t: torch.Tensor, rows: Rows, x: torch.Tensor) -> None:
    """Write gathered rows back (views were updated in place)."""
    if not isinstance(rows, slice):
        t.index_copy_(0, rows, x)


def _add(t: torch.Tensor, rows: Rows, x: torch.Tensor) -> None:
    """t[rows] += x in one pass over the rows (a coalesced sparse add: no gather of t first)."""
    if isinstance(rows, slice):
        t[rows].add_(x)
    else:
        t.add_(torch.sparse_coo_tensor(rows[None], x, t.shape, is_coalesced=True, check_invariants=False))


class _RowOptimizer(torch.optim.Optimizer):
    """Steps every parameter with a gradient through `_update(p, group)`."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        raise NotImplementedError


class LazyAdam(_RowOptimizer):
    """Adam on the rows present in the (sparse) gradient only; per-row step counts (module docstring)."""

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        _check("lr", lr >= 0, f"must be >= 0, got {lr}")
        _check("betas", all(0 <= b < 1 for b in betas), f"must be in [0, 1), got {betas}")
        _check("eps", eps >= 0, f"must be >= 0, got {eps}")
        _check("weight_decay", weight_decay >= 0, f"must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _update(self, p: torch.Tensor, group: dict) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(p.shape[0], dtype=torch.int32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        rows_U, grad_UV = rows_of_grad(p.grad)
        ops = _fused_rows_op(p, [state["exp_avg"], state["exp_avg_sq"]], rows_U, state["step"])
        if ops is not None:
            ops.lazy_adam_rows_(p.detach(), state["exp_avg"], state["exp_avg_sq"], state["step"], rows_U, grad_UV,
                                lr, beta1, beta2, eps, wd)
            return
        for rows, g_UV in _row_chunks(rows_U, grad_UV):
            steps_U = _take(state["step"], rows).add_(1)
            _put(state["step"], rows, steps_U)
            m_UV, v_UV = _take(state["exp_avg"], rows), _take(state["exp_avg_sq"], rows)
            m_UV.lerp_(g_UV, 1 - beta1)
            v_UV.mul_(beta2).addcmul_(g_UV, g_UV, value=1 - beta2)
            # per-row form of torch Adam's p.addcdiv_(m, sqrt(v) / sqrt(bc2) + eps, value=-lr / bc1)
            steps64_U = steps_U.to(torch.float64)
            neg_step_size_U = (-lr / (1 - beta1 ** steps64_U)).to(p.dtype)
            bc2_sqrt_U = (1 - beta2 ** steps64_U).sqrt().to(p.dtype)
            denom_UV = (v_UV.sqrt() / bc2_sqrt_U[:, None]).add_(eps)
            update_UV = m_UV.mul(neg_step_size_U[:, None]).div_(denom_UV)
            if wd != 0:  # decoupled decay first, as AdamW: needs the rows themselves
                p_UV = _take(p, rows).mul_(1 - lr * wd).add_(update_UV)
                _put(p, rows, p_UV)
            else:
                _add(p, rows, update_UV)
            _put(state["exp_avg"], rows, m_UV)
            _put(state["exp_avg_sq"], rows, v_UV)


@functools.lru_cache(maxsize=None)
def torch_fuses_multiply_adds() -> bool:
    """True when torch's CPU lerp and addcmul round as one fused multiply-add (its AVX2/AVX-512 kernels)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _fused_rows_op(p: torch.Tensor, states: list[torch.Tensor], rows_U: torch.Tensor | None,
                   step_N: torch.Tensor | None = None):
    """The C++ ops when an optimizer's row update can run as one C++ op (`lazy_adam_rows_`,
    `row_adagrad_rows_`) with the torch path's arithmetic, else None.

    It applies to sparse gradients of contiguous CPU fp32/fp64 tables whose state has the layout
    the optimizer creates (`states`, and `step_N` int32 counts), when torch's own kernels use fused
    multiply-adds (as the C++ updates do where torch does).
    """
    if rows_U is None or not torch_fuses_multiply_adds() or (step_N is not None and step_N.dtype != torch.int32):
        return None
    tensors = [p, *states, *([] if step_N is None else [step_N])]
    if not all(t.is_contiguous() and t.device == p.device for t in tensors):
        return None
    return cpu_ops.applies(p, *states)


class RowAdagrad(_RowOptimizer):
    """Adagrad with one accumulator per row: G[n] += mean_v g[n, v]^2; p[n] -= lr * g[n] / (sqrt(G[n]) + eps)."""

    def __init__(self, params: ParamsT, lr: float = 1e-3, eps: float = 1e-10) -> None:
        _check("lr", lr >= 0, f"must be >= 0, got {lr}")
        _check("eps", eps >= 0, f"must be >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, eps=eps))

    def _update(self, p: torch.Tensor, group: dict) -> None:
        state, acc = self.state[p], accumulate_dtype(p.dtype)
        if not state:
            state["sum"] = torch.zeros(p.shape[0], dtype=acc, device=p.device)
        elif state["sum"].dtype != acc:  # load_state_dict casts float state to the table's dtype
            state["sum"] = state["sum"].to(acc)
        rows_U, grad_UV = rows_of_grad(p.grad)
        ops = _fused_rows_op(p, [state["sum"]], rows_U)
        if ops is not None:
            ops.row_adagrad_rows_(p.detach(), state["sum"], rows_U, grad_UV, group["lr"], group["eps"])
            return
        for rows, g_UV in _row_chunks(rows_U, grad_UV):
            mean_sq_U = torch.linalg.vector_norm(g_UV, dim=1, dtype=acc).square_().div_(p.shape[1])
            sum_U = _take(state["sum"], rows).add_(mean_sq_U)
            _put(state["sum"], rows, sum_U)
            scale_U = (-group["lr"] / (sum_U.sqrt() + group["eps"])).to(p.dtype)
            _add(p, rows, g_UV * scale_U[:, None])


def make_value_optimizer(kind: str, params: ParamsT, lr: float = 1e-3, **kwargs) -> torch.optim.Optimizer:
    """The optimizer of the value tables: "lazy_adam", "row_adagrad" or "adamw" (dense, paper-faithful)."""
    if kind == "lazy_adam":
        return LazyAdam(params, lr=lr, **kwargs)
    if kind == "row_adagrad":
        return RowAdagrad(params, lr=lr, **kwargs)
    if kind == "adamw":
        kwargs.setdefault("betas", (0.9, 0.95))
        kwargs.setdefault("weight_decay", 0.0)
        return torch.optim.AdamW(params, lr=lr, **kwargs)
    raise ValueError(f"kind: must be one of 'lazy_adam', 'row_adagrad', 'adamw', got {kind!r}")


def _with_grads(params) -> list[torch.Tensor]:
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    return [p for p in params if p.grad is not None]


def clip_value_grad_norm_(params: Iterable[torch.Tensor] | torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale the (sparse or dense) gradients so their global 2-norm is at most `max_norm`; -> the norm before.

    Sparse gradients are coalesced first (a row read by several layers then counts once, summed).
    """
    grads = []
    for p in _with_grads(params):
        if p.grad.is_sparse:
            p.grad = coalesced(p.grad)
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    if not grads:
        return torch.tensor(0.0)
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=acc) for g in grads]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if coef.device.type == "cpu" and float(coef) == 1.0:  # within the norm: x * 1 is x, skip a pass (no sync on CPU)
        return norm
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm


def allreduce_value_grads_(params: Iterable[torch.Tensor] | torch.Tensor, group=None) -> None:
    """Average value gradients over the ranks of `group` in place (sparse: all-gather of rows; dense: all-reduce).

    Every rank must pass the same parameters in the same order. A parameter whose gradient is
    sparse on one rank and None on another counts as an empty sparse gradient there; the result
    is identical on all ranks (same gathered rows, coalesced in rank order).
    """
    import torch.distributed as dist  # deferred: only distributed runs need it

    params = [params] if isinstance(params, torch.Tensor) else list(params)
    world = dist.get_world_size(group)
    if world == 1 or not params:
        return
    device = params[0].device
    dense = torch.tensor([int(p.grad is not None and not p.grad.is_sparse) for p in params], device=device)
    dist.all_reduce(dense, op=dist.ReduceOp.MAX, group=group)
    for p, is_dense in zip(params, dense.tolist()):
        if is_dense:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad, group=group)
            p.grad = grad.div_(world)
        else:
            p.grad = _allgather_sparse(p, world, group).div_(world)


def _allgather_sparse(p: torch.Tensor, world: int, group) -> torch.Tensor:
    import torch.distributed as dist  # deferred: only distributed runs need it

    if p.grad is None:
        rows_U, grad_UV = torch.zeros(0, dtype=torch.int64, device=p.device), p.new_zeros(0, *p.shape[1:])
    else:
        grad = coalesced(p.grad)
        rows_U, grad_UV = grad._indices()[0], grad._values()
    count = torch.tensor([rows_U.numel()], device=p.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    pad = max(counts) - rows_U.numel()  # every rank sends as many rows as the one with the most
    padded_rows = torch.cat([rows_U, rows_U.new_zeros(pad)])
    padded_grads = torch.cat([grad_UV, grad_UV.new_zeros(pad, *grad_UV.shape[1:])])
    all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
    all_grads = [torch.empty_like(padded_grads) for _ in range(world)]
    dist.all_gather(all_rows, padded_rows, group=group)
    dist.all_gather(all_grads, padded_grads, group=group)
    rows = torch.cat([r[:c] for r, c in zip(all_rows, counts)])
    grads = torch.cat([g[:c] for g, c in zip(all_grads, counts)])
    return torch.sparse_coo_tensor(rows[None], grads, p.shape, check_invariants=False).coalesce()
