"""The one budget rule: a training budget (steps, tokens or FLOPs) -> a whole number of steps.

Study expansion (`study/cells.py`) and the training loop (`train/loop.py`) both call
`budget_steps`, so a cell's planned FLOPs and its run's FLOPs are the same number.
- steps: as given;
- tokens: the nearest whole number of steps, at least one;
- FLOPs (and each budget of an iso-FLOP sweep): as many whole steps as the budget pays for,
  never more (a FLOP budget is a ceiling, so FLOP-matched cells never exceed it); zero when
  one step costs more than the budget, which callers refuse by name.
"""

from __future__ import annotations

BUDGET_KINDS: tuple[str, ...] = ("tokens", "steps", "flops", "iso_flops")


def budget_steps(kind: str, value: float, tokens_per_step: int, train_flops_per_token: float) -> int:
    """Steps bought by a budget of `kind` ('steps' | 'tokens' | 'flops' | 'iso_flops')."""
    if kind == "steps":
        return max(1, round(value))
    if kind == "tokens":
        return max(1, round(value / tokens_per_step))
    if kind in ("flops", "iso_flops"):
        return int((value / train_flops_per_token) // tokens_per_step)
    raise ValueError(f"unknown budget kind {kind!r} (expected one of {', '.join(BUDGET_KINDS)})")
