"""The training loop of a finetuning cell: a pretrained model learns new facts by one method.

`FinetuneLoop` is the training loop (`train/loop.py`) with four differences, set up in this order
when it is built (so a resumed run, which then loads its own checkpoint, repeats them exactly):
1. the weights are the source checkpoint's (`run.finetune.checkpoint`, read with weights_only);
2. measured on that source model: the retention references (old-fact recall, held-out loss, the
   new facts' recall before learning them), the slots the old facts read at their answer
   position, and for `sparse_memory` the background document frequency of every slot;
3. the method (`method.py`) freezes, adapts and builds the optimizers of what trains;
4. the training stream is the new population's documents (`data.py`).

Every evaluation logs new-fact recall (`new_qa_exact_match`), old-fact recall
(`old_qa_exact_match`), `forgetting` (old recall's relative drop from the source, the paper's
"F1 drop"), the held-out loss of the pretraining distribution (`val_loss`) and slot statistics:
value rows changed since the source, how many of them the old facts use, how many were selected.
"""

from __future__ import annotations

import torch

from memlayers.platform.data.loader import TokenLoader
from memlayers.platform.data.prepare import PreparedData
from memlayers.platform.data.qa import select_items
from memlayers.platform.finetune.data import new_facts
from memlayers.platform.finetune.method import apply_method, finetune_optimizers
from memlayers.platform.finetune.slots import SparseRows, answer_slots, document_frequency
from memlayers.platform.train.checkpoint import load_state
from memlayers.platform.train.evaluate import qa_metrics, validation_loss
from memlayers.platform.train.loop import RunLoop
from memlayers.platform.train.run_config import RunConfig


class FinetuneLoop(RunLoop):
    def __init__(self, cfg: RunConfig, data: PreparedData, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None) -> None:
        super().__init__(cfg, data, rank=rank, world_size=world_size, device=device)
        if world_size > 1:
            raise ValueError("resources.workers: a finetuning cell trains on one worker")
        run = cfg.finetune
        source = load_state(run.checkpoint, 0, map_location=self.device)["model"]
        self.model.load_state_dict(source)
        self.new = new_facts(cfg.data, data.tokenizer, run.new_people, run.renderings)
        self.old_qa = select_items(data.qa, run.old_qa_items)
        table = self.model.value_tables()[0] if self.model.value_tables() else None
        self.source_values = table.weight.detach().clone() if table is not None else None
        self.model.eval()
        self.old_slots_N = answer_slots(self.model, table, self.old_qa, data.tokenizer.pad_id) if table else None
        self.reference = {f"{k}_source": v for k, v in self._measure().items()
                          if k in ("old_qa_exact_match", "new_qa_exact_match", "val_loss")}
        self.sparse: SparseRows | None = None
        if run.method == "sparse_memory":
            background = TokenLoader(data.train_ids, cfg.data.seq_len, run.background, seed=0).next_batch()[0]
            df_N = document_frequency(self.model, table, background.to(self.device))
            self.sparse = SparseRows(table.weight, lambda: self._reads(table), df_N, background.shape[0], run.top_t)
        dense, values = apply_method(self.model, run)
        self.model.to(self.device)  # adapters are created on the weights' device; a no-op otherwise
        self.optimizers = finetune_optimizers(dense, values, cfg.train, self.plan.steps, run.value_optimizer)
        self.loader = TokenLoader(self.new.train_ids, cfg.data.seq_len, cfg.train.batch_size, seed=cfg.train.seed)

    def _reads(self, table) -> torch.Tensor:
        return torch.cat([rows_TR.reshape(-1) for t, rows_TR in self.model.table_reads()
                          if t is table and rows_TR is not None])

    @torch.no_grad()
    def _measure(self) -> dict[str, float]:
        pad = self.data.tokenizer.pad_id
        metrics = {"val_loss": validation_loss(self.model, self.data.val_ids, self.cfg.data.seq_len,
                                               self.cfg.train.batch_size, self.cfg.train.eval_batches, self.device)}
        for prefix, items in (("old_", self.old_qa), ("new_", self.new.qa)):
            metrics.update({prefix + k: v for k, v in qa_metrics(self.model, items, self.device, pad_id=pad).items()})
        return metrics

    def state_dict(self, *args, **kwargs) -> dict:
        state = super().state_dict(*args, **kwargs)
        if self.sparse is not None:  # the slot statistics span the whole run, resumes included
            state["slots_selected"] = self.sparse.selected_N.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.sparse is not None and "slots_selected" in state:
            self.sparse.selected_N.copy_(state["slots_selected"])

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with self.autocast():
            metrics = {**self._measure(), **self.reference}
        source_old = self.reference["old_qa_exact_match_source"]
        metrics["forgetting"] = (source_old - metrics["old_qa_exact_match"]) / source_old if source_old > 0 else 0.0
        if self.source_values is not None:
            changed_N = (self.model.value_tables()[0].weight.detach() != self.source_values).any(dim=1).cpu()
            metrics.update(slots_changed=float(changed_N.sum()), old_fact_slots=float(self.old_slots_N.sum()),
                           slots_changed_old=float((changed_N & self.old_slots_N).sum()))
        if self.sparse is not None:
            metrics["slots_selected"] = float(self.sparse.selected_N.sum())
        return metrics
