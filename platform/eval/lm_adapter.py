"""`MemlayersLM`: a memlayers model as an lm-evaluation-harness `LM` (lm_eval 0.4).

The harness hands text; this adapter tokenizes with the run's own tokenizer and puts EOS (the
document boundary every training document followed) before every context, the way the training
loop's QA items start. A (context, continuation) pair is tokenized as the harness's HF model
does: trailing spaces of the context move to the continuation, the pair is encoded whole and
the continuation is what follows the context's tokens. `is_greedy` says whether the argmax at
every continuation position is the continuation's token, i.e. whether greedy decoding of
len(continuation) tokens produces it. Contexts too long for the model lose their oldest tokens.
`generate_until` decodes greedily (or samples, with `do_sample`) through `models.generate`
with the key/value cache and cuts the text at the first stop string. Prompt and generation share
the model's context: when the task's generation budget leaves too little room for the prompt, the
budget shrinks (the prompt keeps at least half the context) and the prompt keeps its end, where
the question is (`fit_context`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn

from memlayers.models.generate import generate
from memlayers.models.pretrained import load_pretrained, read_export_config
from memlayers.platform.data.tokenizers import Tokenizer, load_tokenizer

DEFAULT_MAX_GEN_TOKS = 32


class MemlayersLM(LM):
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, *, batch_size: int = 32,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 use_cache: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_gen_toks, self.use_cache, self.seed = batch_size, max_gen_toks, use_cache, seed
        self.max_length = max_length or model.cfg.max_seq_len
        self._device = next(model.parameters()).device  # LM.device reads it

    @classmethod
    def from_exported(cls, directory: str, device: str = "cpu", **options: Any) -> "MemlayersLM":
        """The adapter over a folder written by `memlayers export` (its model and tokenizer)."""
        tokenizer = load_tokenizer(read_export_config(directory)["tokenizer"], Path(directory))
        return cls(load_pretrained(directory, device), tokenizer, **options)

    # ---- tokenization --------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(EOS + context tokens, continuation tokens), split as the harness's HF model does."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.tokenizer.encode(context)
        whole = self.tokenizer.encode(context + continuation)
        return [self.tokenizer.eos_id, *context_ids], whole[len(context_ids):]

    # ---- scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), all greedy) for (context ids, continuation ids) pairs."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            inputs = [(pairs[i][0] + pairs[i][1])[:-1][-self.max_length:] for i in batch]
            width = max(len(s) for s in inputs)
            tokens_BS = torch.tensor([s + [self.tokenizer.pad_id] * (width - len(s)) for s in inputs],
                                     device=self.device)
            logprobs_BSW = self.model(tokens_BS).log_softmax(-1)
            for row, i in enumerate(batch):
                continuation = pairs[i][1]
                end = len(inputs[row])
                positions = torch.arange(end - len(continuation), end, device=self.device)
                target = torch.tensor(continuation, dtype=torch.long, device=self.device)
                chosen = logprobs_BSW[row, positions]
                out[i] = (float(chosen[torch.arange(len(continuation)), target].sum()),
                          bool((chosen.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        return self._score([self.encode_pair(*request.args[:2]) for request in requests])

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        results = []
        for request in requests:
            ids = self.tokenizer.encode(request.args[0])
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=self.tokenizer.eos_id, max_seq_len=self.max_length, context_len=1)]
            scores = self._score([(list(context), list(target)) for context, target in windows])
            results.append(sum(logprob for logprob, _ in scores))
        return results

    # ---- generation ------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):  # one decoding call per distinct set of options
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in groups.values():
            options = requests[indices[0]].args[1]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in batch], options)
                for i, text in zip(batch, texts):
                    out[i] = text
        return out  # type: ignore[return-value]

    def _generate(self, contexts: list[str], options: dict[str, Any]) -> list[str]:
        until = options.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(options.get("do_sample", False)) and float(options.get("temperature", 1.0)) > 0
        prompts, max_new = fit_context([[self.tokenizer.eos_id, *self.tokenizer.encode(c)] for c in contexts],
                                       int(options.get("max_gen_toks", self.max_gen_toks)), self.max_length)

        def stop(row: int, new: list[int]) -> bool:
            text = self.tokenizer.decode(new)
            return any(s in text for s in until)

        new_ids = generate(self.model, prompts, max_new,
                           temperature=float(options.get("temperature", 1.0)) if sample else 0.0,
                           seed=self.seed, stop_ids=[self.tokenizer.eos_id], stop=stop if until else None,
                           pad_id=self.tokenizer.pad_id, use_cache=self.use_cache)
        return [cut_at_stop(self.tokenizer.decode(ids), until) for ids in new_ids]


def fit_context(prompts: Sequence[list[int]], max_new: int, context: int) -> tuple[list[list[int]], int]:
    """Prompts (their last tokens) and a generation budget that fit the model's `context` together,
    prompts left-padded to the longest: the budget shrinks only as far as the prompts need, and
    the prompts keep at least half the context (at least one token) whatever the budget asked."""
    keep = max(context - max_new, context // 2, 1)
    prompts = [list(p[-keep:]) for p in prompts]
    longest = max((len(p) for p in prompts), default=0)
    return prompts, max(0, min(max_new, context - longest))


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text
