"""Which memory slots sparse memory finetuning updates: TF-IDF of slot reads (Lin et al. 2025).

A slot's term frequency is its share of the current batch's reads (every layer, head and top-k
read of the table); its inverse document frequency comes from a background sample of the
pretraining data, one document per sequence: idf = log((D + 1) / (df + 1)) with D background
sequences and df of them reading the slot. Slots the batch reads but the pretraining data reads
everywhere score ~0; slots the batch reads and the background rarely does score high.

`top_slots(scores, t)` keeps the t highest positive scores; ties go to the smaller slot index
(a stable descending sort), so the selection is a function of the counts alone.
`SparseRows` applies it at every step: a hook on the value table drops every other row from the
row-sparse gradient before the optimizer sees it, so unselected rows get no update and no state.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def read_counts(slots: torch.Tensor, n_slots: int) -> torch.Tensor:
    """How often each of `n_slots` slots is read in `slots` (any shape) -> (N,) int64."""
    return torch.bincount(slots.reshape(-1).long(), minlength=n_slots)


@torch.no_grad()
def document_frequency(model: nn.Module, table: nn.Module, sequences_DS: torch.Tensor,
                       batch_size: int = 64) -> torch.Tensor:
    """(N,) int64: how many of the D sequences read each slot of `table` (any of its layers)."""
    df_N = torch.zeros(table.slots, dtype=torch.int64)
    for start in range(0, sequences_DS.shape[0], batch_size):
        chunk_BS = sequences_DS[start:start + batch_size]
        model(chunk_BS)
        seen_BN = torch.zeros(chunk_BS.shape[0], table.slots, dtype=torch.bool)
        for read_table, slots_TR in model.table_reads():
            if read_table is table and slots_TR is not None:
                seen_BN.scatter_(1, slots_TR.reshape(chunk_BS.shape[0], -1).long().cpu(), True)
        df_N += seen_BN.sum(0)
    return df_N


def tfidf_scores(counts_N: torch.Tensor, df_N: torch.Tensor, documents: int) -> torch.Tensor:
    """(N,) float64 TF-IDF of each slot: counts / total reads x log((documents + 1) / (df + 1))."""
    counts = counts_N.to(torch.float64)
    tf = counts / counts.sum().clamp_min(1.0)
    idf = torch.log(torch.tensor(float(documents + 1), dtype=torch.float64) / (df_N.to(torch.float64) + 1.0))
    return tf * idf


def top_slots(scores_N: torch.Tensor, t: int) -> torch.Tensor:
    """The (at most) t slots of highest positive score, best first; ties: the smaller slot first."""
    order = torch.sort(scores_N, descending=True, stable=True).indices[:t]
    return order[scores_N[order] > 0]


class SparseRows:
    """Per step, keep only the top-t TF-IDF rows of a value table's row-sparse gradient.

    `reads()` returns the slots the step's forward read from the table (any shape); `df_N` and
    `documents` describe the background sample. `selected_N` marks every slot ever selected."""

    def __init__(self, weight: nn.Parameter, reads: Callable[[], torch.Tensor], df_N: torch.Tensor,
                 documents: int, t: int) -> None:
        self.reads, self.df_N, self.documents, self.t = reads, df_N, documents, t
        self.selected_N = torch.zeros(weight.shape[0], dtype=torch.bool)
        self.last: torch.Tensor = torch.empty(0, dtype=torch.long)
        self.handle = weight.register_post_accumulate_grad_hook(self._filter)

    def select(self) -> torch.Tensor:
        counts_N = read_counts(self.reads().cpu(), self.df_N.numel())
        self.last = top_slots(tfidf_scores(counts_N, self.df_N, self.documents), self.t)
        self.selected_N[self.last] = True
        return self.last

    def _filter(self, weight: torch.Tensor) -> None:
        grad = weight.grad
        if grad is None:
            return
        keep = self.select().to(grad.device)
        if grad.is_sparse:
            grad = grad.coalesce()
            mask = torch.isin(grad.indices()[0], keep)
            weight.grad = torch.sparse_coo_tensor(grad.indices()[:, mask], grad.values()[mask], grad.shape,
                                                  is_coalesced=True, check_invariants=False)
        else:
            mask_N = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
            mask_N[keep] = True
            grad[~mask_N] = 0


@torch.no_grad()
def answer_slots(model: nn.Module, table: nn.Module, items, pad_id: int, batch_size: int = 256) -> torch.Tensor:
    """(N,) bool: the slots of `table` read where the model predicts the answer of each QA item
    (the prompt's last position): the slots the facts of `items` use."""
    used_N = torch.zeros(table.slots, dtype=torch.bool)
    for start in range(0, len(items), batch_size):
        prompts = [list(item.prompt_ids) for item in items[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        tokens_BS = torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts], dtype=torch.long,
                                 device=next(model.parameters()).device)
        model(tokens_BS)
        rows = torch.tensor([b * width + len(p) - 1 for b, p in enumerate(prompts)])
        for read_table, slots_TR in model.table_reads():
            if read_table is table and slots_TR is not None:
                used_N[slots_TR[rows.to(slots_TR.device)].reshape(-1).long().cpu()] = True
    return used_N
