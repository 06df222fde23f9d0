"""Text generation: greedy or sampled decoding of a batch of prompts, with a key/value cache.

`generate(model, prompts, max_new_tokens)` left-pads prompts of different lengths into one
batch, runs the prompt once through the model (filling the cache of `Transformer.new_cache`),
then feeds one token per step. Every feed-forward family (dense, MoE in eval mode, PKM, Memory+,
PEER) is position-wise, so only attention needs the cache. `use_cache=False` is the reference:
each prompt alone, the whole sequence re-run at every step; the two give the same tokens.

Sampling (`temperature > 0`) is Gumbel-max with one generator per row seeded `seed + row`, so a
row draws the same noise whether it is decoded alone or in a batch. A row stops at a token of
`stop_ids` (not returned) or when `stop(row, new_ids)` says so (the token that triggered it is
returned; stop strings are the caller's, who can decode). `top_k` keeps the k largest logits.

Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

StopFn = Callable[[int, list[int]], bool]


def _gumbel_W(generator: torch.Generator, vocab: int, device: torch.device) -> torch.Tensor:
    uniform_W = torch.rand(vocab, generator=generator, dtype=torch.float64).clamp_(1e-20, 1.0)
    return (-torch.log(-torch.log(uniform_W))).to(device)


def _pick(logits_BW: torch.Tensor, temperature: float, top_k: int | None,
          generators: list[torch.Generator] | None) -> torch.Tensor:
    """The next token of every row: argmax, or argmax of logits / T + Gumbel noise."""
    logits_BW = logits_BW.double()
    if top_k is not None and top_k < logits_BW.shape[-1]:
        kth_B1 = logits_BW.topk(top_k, dim=-1).values[:, -1:]
        logits_BW = logits_BW.masked_fill(logits_BW < kth_B1, float("-inf"))
    if temperature <= 0 or generators is None:
        return logits_BW.argmax(-1)
    noise_BW = torch.stack([_gumbel_W(g, logits_BW.shape[-1], logits_BW.device) for g in generators])
    return (logits_BW / temperature + noise_BW).argmax(-1)


def _generators(rows: Sequence[int], seed: int, temperature: float) -> list[torch.Generator] | None:
    if temperature <= 0:
        return None
    return [torch.Generator().manual_seed(seed + row) for row in rows]


def _finished(row: int, token: int, new: list[int], stop_ids: set[int], stop: StopFn | None) -> bool:
    if token in stop_ids:
        return True
    new.append(token)
    return stop is not None and stop(row, new)


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             stop_ids: Sequence[int] = (), stop: StopFn | None = None, pad_id: int = 0,
             use_cache: bool = True) -> list[list[int]]:
    """The new tokens of every prompt (see the module docstring); prompts must be non-empty."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    if not use_cache:
        return [_reference(model, list(p), row, max_new_tokens, temperature, top_k, seed, set(stop_ids), stop)
                for row, p in enumerate(prompts)]
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad_B = torch.tensor([width - len(p) for p in prompts], device=device)
    tokens_BS = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    cache = model.new_cache(pad_B, width + max_new_tokens)
    generators = _generators(range(len(prompts)), seed, temperature)
    logits_BW = model(tokens_BS, cache=cache)[:, -1]
    new: list[list[int]] = [[] for _ in prompts]
    active = [True] * len(prompts)
    for _ in range(max_new_tokens):
        next_B = _pick(logits_BW, temperature, top_k, generators)
        for row, token in enumerate(next_B.tolist()):
            if active[row] and (_finished(row, token, new[row], set(stop_ids), stop)
                                or len(new[row]) >= max_new_tokens):
                active[row] = False
        if not any(active):
            break
        logits_BW = model(next_B[:, None].to(device), cache=cache)[:, -1]
    return new


def _reference(model: nn.Module, prompt: list[int], row: int, max_new_tokens: int, temperature: float,
               top_k: int | None, seed: int, stop_ids: set[int], stop: StopFn | None) -> list[int]:
    """One prompt without a cache: the full sequence through the model at every step."""
    device = next(model.parameters()).device
    generators = _generators([row], seed, temperature)
    sequence, new = list(prompt), []
    for _ in range(max_new_tokens):
        logits_1W = model(torch.tensor([sequence], device=device))[:, -1]
        token = int(_pick(logits_1W, temperature, top_k, generators)[0])
        if _finished(row, token, new, stop_ids, stop):
            break
        sequence.append(token)
    return new
