"""The causality probe the model tests share: change the token after position t, compare outputs."""

from __future__ import annotations

from typing import Iterator

import torch


def later_token_changes(model: torch.nn.Module, vocab: int = 61,
                        positions: tuple[int, ...] = (0, 7, 14)) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(t, outputs, outputs with token t + 1 changed) for each t, on a fixed 2 x 16 batch."""
    tokens = torch.randint(0, vocab, (2, 16))
    for t in positions:
        changed = tokens.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % vocab
        with torch.no_grad():
            yield t, model(tokens), model(changed)
