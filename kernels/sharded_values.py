"""Memory parallelism: a value table split by columns across a process group.

`ShardedValueTable` stands in for `memlayers.models.values.ValueTable` (same `.weight`, `.slots`,
`.value_dim`, `.sparse_grad`, `forward(slots_TR, weights_TR) -> y_TV`) when the table is too big
for one device. Each of the P ranks of a memory-parallel group holds the columns
[m*X, (m+1)*X) of the (N, V) table (X = V/P), as in the paper, and keeps its own tokens:

forward (per call of the table)
    1. all-gather the group's reads: slot ids and weights of all M = P*T tokens, packed into one
       int32 buffer (slot id, fp32 weight bits) per read;
    2. local embedding bag on this rank's column shard for ALL group tokens -> (M, X), through
       `memlayers.kernels.lookup.embedding_bag` (row-sparse or dense value gradients);
    3. all-to-all: block d of the (M, X) result (rank d's tokens) goes to rank d; each rank
       concatenates the P blocks it receives along V -> its own tokens' (T, V).
backward
    3'. the inverse all-to-all of the output gradient: (T, V) split along V -> (M, X) gradient
        of this rank's columns for all group tokens;
    2'. the bag's backward: value gradients stay on the shard (only the rows read, sparse COO
        with `sparse_grad=True`); the weight gradient <grad_y, row> is a dot product over V, so
        each rank has a partial sum over its X columns for all M tokens;
    1'. reduce-scatter of those (M, R) partial sums: each rank gets the full sums of its tokens.

The three steps are autograd Functions (`_GatherReads`, `_ExchangeColumns`) around the ordinary
lookup, so the table composes with anything autograd does (shared across layers, bf16 autocast,
sparse or dense gradients). All ranks of a group must call the table the same number of times
with the same T and R (the same micro-batch shape), as with any collective. The all-to-all is
`all_to_all_single` (gloo on CPU in torch 2.13, NCCL on GPU); a backend that refuses it falls
back to an all-gather of the whole buffer (P times the traffic), chosen once per group.

Communication per token per table call (bytes SENT by a rank; received is the same)
-----------------------------------------------------------------------------------
R reads per token (heads * topk), V value dim, b bytes per activation element (4 fp32, 2 bf16):

    column sharding (this module; each rank N x V/P):
        ids+weights all-gather      (P-1) * 8R
        output all-to-all           (P-1)/P * V * b
        output-gradient all-to-all  (P-1)/P * V * b
        weight-grad reduce-scatter  (P-1) * 4R
        total                       (P-1) * 12R  +  2 (P-1)/P * V * b

    row sharding (each rank N/P x V), reads routed to the rank that owns the row:
        ids+weights to the owners   (P-1)/P * 8R
        partial outputs back        h * V * b     h = ranks other than self that own a row read
        output gradients out        h * V * b          by the token: mean h = (P-1)(1 - (1-1/P)^R)
        weight grads back           (P-1)/P * 4R       under uniform reads, <= min(R, P-1)
        total                       (P-1)/P * 12R  +  2 h * V * b

`comm_bytes_per_token` evaluates both; `CommStats` counts what the Functions actually issue
(the benchmark `memlayers bench parallel` prints the counted bytes).

When row sharding is better. Column sharding moves each token's output across ranks once,
(P-1)/P * V * b <= V * b, but all-gathers every read id, which grows as (P-1) * 12R. Row
sharding moves ids only to their owners but returns a partial V-vector from every owner a token
touches, ~min(R, P-1) of them. With R >= P (the usual case: Memory+ reads heads*topk = 4*32 =
128 rows per token, so h ~ P-1) the difference is column - row = (P-1)^2/P * (12R - 2 V b): row
sharding wins only when V * b < 6R, narrow values read by many slots (V < 384 in bf16 at R = 128).
Row sharding also wins when R << P (few
reads on very many ranks: at most R partial vectors per token), and it keeps every row whole on
one rank, so per-row optimizer statistics (row-wise Adagrad's accumulator, per-row norms) need
no communication, while column sharding must reduce them over the group. For the paper's shapes
(V = 1024..4096, R = 128, P <= 8) column sharding sends less: e.g. V = 4096, bf16, R = 128,
P = 8 -> column 10.8 KB + 14.3 KB = 25 KB per token; row 1.3 KB + 2*7*8 KB = 116 KB. Column
sharding is also what we defend on the engineering side: its shapes are static (no routing, no
variable-size all-to-all), its work and memory are balanced whatever slots are hot (a row-sharded
table puts a hot row's traffic on one rank, like an unbalanced MoE), and element-wise optimizers
(Adam, LazyAdam, SGD) are exact on column shards. Its costs: every rank sorts and bags the
reads of all M tokens (lookup work per rank stays T*R*V, but index work grows with P), and the
per-rank row segment is X = V/P elements (keep X * b >= 128 bytes for efficient GPU gathers).

Shape suffixes: see docs/shapes.md (P ranks, T tokens of this rank, M = P*T tokens of the group,
R reads per token, N slots, V value dim, X = V/P columns per rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from memlayers.kernels.lookup import embedding_bag

INT32_SLOTS = 2 ** 31  # slot ids below this travel as int32 (64m slots = 2**26)


# ---- bookkeeping ------------------------------------------------------------------------------
@dataclass
class CommStats:
    """Bytes this rank sends, per collective, counted from the tensors the Functions issue.

    A collective over P ranks on a buffer of B bytes sends (P-1) * B (all-gather: this rank's
    input goes to every other rank) or (P-1)/P * B (all-to-all, reduce-scatter: the blocks of
    the other ranks leave, this rank's own block stays).
    """

    bytes_sent: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    tokens: int = 0  # tokens of this rank that went through the table (forward calls)

    def add(self, op: str, nbytes: int) -> None:
        self.bytes_sent[op] = self.bytes_sent.get(op, 0) + int(nbytes)
        self.calls[op] = self.calls.get(op, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()
        self.tokens = 0


def column_range(value_dim: int, shards: int, rank: int) -> tuple[int, int]:
    """Columns [lo, hi) of shard `rank` of `shards` (value_dim must divide evenly)."""
    if value_dim % shards:
        raise ValueError(f"memory_parallel: value dim {value_dim} must be divisible by the {shards} shards")
    width = value_dim // shards
    return rank * width, (rank + 1) * width


def comm_bytes_per_token(reads: int, value_dim: int, shards: int, *, layout: str = "column",
                         value_bytes: int = 4) -> float:
    """Bytes a rank sends per token per table call (forward + backward), as in the module docstring."""
    p, r, v = shards, reads, value_dim
    if p == 1:
        return 0.0
    if layout == "column":
        return (p - 1) * 12 * r + 2 * (p - 1) / p * v * value_bytes
    if layout == "row":
        owners = (p - 1) * (1 - (1 - 1 / p) ** r)
        return (p - 1) / p * 12 * r + 2 * owners * v * value_bytes
    raise ValueError(f"layout: must be 'column' or 'row', got {layout!r}")


# ---- collectives ------------------------------------------------------------------------------
def _all_gather(x: torch.Tensor, group, shards: int) -> torch.Tensor:
    out = x.new_empty((shards * x.shape[0], *x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group, shards: int) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // shards, *x.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x.contiguous(), group=group)
    return out


_NATIVE_ALL_TO_ALL: dict[int, bool] = {}  # id(group) -> all_to_all_single works there


def _all_to_all(blocks: torch.Tensor, group, shards: int, rank: int, stats: CommStats, op: str) -> torch.Tensor:
    """blocks[d] goes to rank d; returns out with out[s] = what rank s sent to this rank."""
    blocks = blocks.contiguous()
    key = id(group)
    if _NATIVE_ALL_TO_ALL.get(key, True):
        out = torch.empty_like(blocks)
        try:
            dist.all_to_all_single(out, blocks, group=group)
            _NATIVE_ALL_TO_ALL[key] = True
            stats.add(op, blocks.numel() * blocks.element_size() * (shards - 1) // shards)
            return out
        except (RuntimeError, NotImplementedError):
            if key in _NATIVE_ALL_TO_ALL:  # it worked before: a real error
                raise
            _NATIVE_ALL_TO_ALL[key] = False
    return _all_to_all_by_gather(blocks, group, shards, rank, stats, op)


def _all_to_all_by_gather(blocks: torch.Tensor, group, shards: int, rank: int, stats: CommStats,
                          op: str) -> torch.Tensor:
    """All-to-all through an all-gather of every rank's whole buffer (for backends without it)."""
    everything = _all_gather(blocks.unsqueeze(0), group, shards)  # (P_src, P_dst, ...)
    stats.add(op, blocks.numel() * blocks.element_size() * (shards - 1))
    return everything[:, rank].contiguous()


def force_all_to_all_fallback(group, enabled: bool = True) -> None:
    """Use (or stop using) the all-gather fallback for `group` (for tests of that path)."""
    if enabled:
        _NATIVE_ALL_TO_ALL[id(group)] = False
    else:
        _NATIVE_ALL_TO_ALL.pop(id(group), None)


# ---- autograd pieces ---------------------------------------------------------------------------
def _pack(slots_TR: torch.Tensor, weights_TR: torch.Tensor, slots: int) -> torch.Tensor:
    """(T, 2R) buffer: slot ids then the weights' bits (int32 + fp32, or int64 + fp64 for huge N)."""
    if slots < INT32_SLOTS:
        return torch.cat([slots_TR.to(torch.int32), weights_TR.float().view(torch.int32)], dim=1)
    return torch.cat([slots_TR.to(torch.int64), weights_TR.double().view(torch.int64)], dim=1)


def _unpack(packed_M2R: torch.Tensor, weights_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    r = packed_M2R.shape[1] // 2
    float_dtype = torch.float32 if packed_M2R.dtype == torch.int32 else torch.float64
    slots_MR = packed_M2R[:, :r].long()
    weights_MR = packed_M2R[:, r:].contiguous().view(float_dtype).to(weights_dtype)
    return slots_MR, weights_MR


class _GatherReads(torch.autograd.Function):
    """(T, R) reads of this rank -> (M, R) reads of the group; backward reduce-scatters weight grads."""

    @staticmethod
    def forward(ctx, slots_TR, weights_TR, table_slots, group, shards, stats):
        packed_T2R = _pack(slots_TR, weights_TR, table_slots)
        packed_M2R = _all_gather(packed_T2R, group, shards)
        stats.add("gather_reads", packed_T2R.numel() * packed_T2R.element_size() * (shards - 1))
        slots_MR, weights_MR = _unpack(packed_M2R, weights_TR.dtype)
        ctx.group, ctx.shards, ctx.stats = group, shards, stats
        ctx.mark_non_differentiable(slots_MR)
        return slots_MR, weights_MR

    @staticmethod
    def backward(ctx, _grad_slots, grad_weights_MR):
        if grad_weights_MR is None or not ctx.needs_input_grad[1]:
            return None, None, None, None, None, None
        grad_weights_MR = grad_weights_MR.contiguous()
        grad_TR = _reduce_scatter(grad_weights_MR, ctx.group, ctx.shards)
        nbytes = grad_weights_MR.numel() * grad_weights_MR.element_size()
        ctx.stats.add("reduce_scatter_weight_grads", nbytes * (ctx.shards - 1) // ctx.shards)
        return None, grad_TR, None, None, None, None


class _ExchangeColumns(torch.autograd.Function):
    """(M, X): group tokens x my columns  ->  (T, V): my tokens x all columns (and back in backward)."""

    @staticmethod
    def forward(ctx, y_MX, group, shards, rank, stats):
        m, x = y_MX.shape
        t = m // shards
        recv_PTX = _all_to_all(y_MX.view(shards, t, x), group, shards, rank, stats, "all_to_all_outputs")
        ctx.group, ctx.shards, ctx.rank, ctx.stats = group, shards, rank, stats
        return recv_PTX.permute(1, 0, 2).reshape(t, shards * x)

    @staticmethod
    def backward(ctx, grad_y_TV):
        t, v = grad_y_TV.shape
        p = ctx.shards
        send_PTX = grad_y_TV.reshape(t, p, v // p).permute(1, 0, 2)
        recv_PTX = _all_to_all(send_PTX, ctx.group, p, ctx.rank, ctx.stats, "all_to_all_output_grads")
        return recv_PTX.reshape(p * t, v // p), None, None, None, None


# ---- the table ----------------------------------------------------------------------------------
class ShardedValueTable(nn.Module):
    """This rank's column shard (N, V/P) of an (N, V) value table shared by a memory-parallel group.

    `group=None` uses the default process group when torch.distributed is initialised, else a
    single shard (P = 1, no communication).
    """

    def __init__(self, slots: int, value_dim: int, group=None, sparse_grad: bool = True) -> None:
        super().__init__()
        distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        self.shards = dist.get_world_size(group) if distributed else 1
        self.shard_rank = dist.get_rank(group) if distributed else 0
        self.slots, self.value_dim, self.sparse_grad = slots, value_dim, sparse_grad
        self.columns = column_range(value_dim, self.shards, self.shard_rank)
        self.weight = nn.Parameter(torch.empty(slots, self.columns[1] - self.columns[0]))
        self.comm = CommStats()

    @classmethod
    def from_full(cls, weight_NV: torch.Tensor, group=None, sparse_grad: bool = True) -> "ShardedValueTable":
        """The shard of this rank cut from a full (N, V) table (same dtype and device)."""
        table = cls(weight_NV.shape[0], weight_NV.shape[1], group, sparse_grad).to(weight_NV.device, weight_NV.dtype)
        lo, hi = table.columns
        with torch.no_grad():
            table.weight.copy_(weight_NV[:, lo:hi])
        return table

    def init_weights(self) -> None:
        # the full table's init is i.i.d. per element, so a shard is initialised on its own
        nn.init.normal_(self.weight, std=self.value_dim ** -0.5)

    def forward(self, slots_TR: torch.Tensor, weights_TR: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the rows `slots_TR` over ALL V columns -> (T, V) for this rank's tokens."""
        if self.shards == 1:
            return embedding_bag(self.weight, slots_TR, weights_TR, sparse_grad=self.sparse_grad)
        lead, r = slots_TR.shape[:-1], slots_TR.shape[-1]
        slots_2d, weights_2d = slots_TR.reshape(-1, r), weights_TR.reshape(-1, r)
        self.comm.tokens += slots_2d.shape[0]
        slots_MR, weights_MR = _GatherReads.apply(slots_2d, weights_2d, self.slots, self.group,
                                                  self.shards, self.comm)
        y_MX = embedding_bag(self.weight, slots_MR, weights_MR, sparse_grad=self.sparse_grad)
        y_TV = _ExchangeColumns.apply(y_MX, self.group, self.shards, self.shard_rank, self.comm)
        return y_TV.view(*lead, self.value_dim)

    def extra_repr(self) -> str:
        return (f"slots={self.slots}, value_dim={self.value_dim}, shard={self.shard_rank}/{self.shards}, "
                f"columns={self.columns}, sparse_grad={self.sparse_grad}")
