"""Evaluation: validation loss and factual recall (answer NLL, greedy exact match) on QA items.

QA items come from the data pipeline: `prompt_ids` (starting at a document boundary) and
`answer_ids`. Sequences are right-padded, which leaves every real position unchanged under the
causal mask. Answer NLL is the summed negative log-likelihood of the answer tokens given the
prompt, averaged over items; exact match decodes len(answer) tokens greedily and compares.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.platform.data.loader import TokenLoader


@torch.no_grad()
def validation_loss(model: nn.Module, val_ids, seq_len: int, batch_size: int, batches: int,
                    device: torch.device) -> float:
    """Mean cross-entropy over the first `batches` batches of a fixed-order validation stream."""
    loader = TokenLoader(val_ids, seq_len, batch_size, seed=0)
    total = 0.0
    count = min(batches, max(1, loader.n_sequences // batch_size))
    for _ in range(count):
        inputs, targets = loader.next_batch()
        logits = model(inputs.to(device))
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten()))
    return total / count


def _padded(sequences: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    rows = [list(s) + [pad] * (width - len(s)) for s in sequences]
    return torch.tensor(rows, dtype=torch.long, device=device)


@torch.no_grad()
def qa_metrics(model: nn.Module, items: Sequence, device: torch.device, pad_id: int = 0,
               batch_size: int = 256) -> dict[str, float]:
    """{'qa_answer_nll', 'qa_exact_match'} over `items`."""
    if not items:
        return {}
    nll_sum, exact = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        prompts = [list(item.prompt_ids) for item in batch]
        answers = [list(item.answer_ids) for item in batch]
        # teacher-forced answer likelihood
        logits = model(_padded([p + a[:-1] for p, a in zip(prompts, answers)], pad_id, device))
        logprobs = logits.log_softmax(-1)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            positions = torch.arange(len(p) - 1, len(p) - 1 + len(a), device=device)
            nll_sum -= float(logprobs[row, positions, torch.tensor(a, device=device)].sum())
        # greedy decoding of len(answer) tokens
        generated: list[list[int]] = [[] for _ in batch]
        for j in range(max(len(a) for a in answers)):
            active = [i for i, a in enumerate(answers) if j < len(a)]
            inputs = _padded([prompts[i] + generated[i] for i in active], pad_id, device)
            logits = model(inputs)
            for row, i in enumerate(active):
                generated[i].append(int(logits[row, len(prompts[i]) + j - 1].argmax()))
        exact += sum(g == a for g, a in zip(generated, answers))
    return {"qa_answer_nll": nll_sum / len(items), "qa_exact_match": exact / len(items)}
