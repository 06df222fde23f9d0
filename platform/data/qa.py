"""The QA split: question -> answer items over the training facts, tokenized for recall metrics.

A `QAItem` holds the strings (`prompt`, `answer`, which `person` and `attribute`) and their ids.
`prompt_ids` start with EOS (the document boundary the model saw before biographies) followed by
the prompt's tokens; `answer_ids` are the tokens the model must produce next: the tokens of
" " + answer as they appear in the training text right after the prompt (with the word tokenizer
exactly one id). Answer NLL scores `answer_ids` given `prompt_ids`; exact match compares a greedy
continuation of `len(answer_ids)` tokens with them. `select_items(items, limit)` is the one rule
that picks which `limit` items an evaluation scores (the training loop's and `memlayers eval`'s).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from memlayers.platform.data.facts import QAPair
from memlayers.platform.data.tokenizers import Tokenizer


@dataclass(frozen=True)
class QAItem:
    prompt: str
    answer: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    person: str = ""
    attribute: str = ""


def tokenize_pairs(pairs: Sequence[QAPair], tokenizer: Tokenizer) -> list[QAItem]:
    """QA items for `pairs`: the answer ids are read off the tokenized full sentence."""
    items = []
    for pair in pairs:
        prompt_ids = tokenizer.encode(pair.prompt)
        sentence_ids = tokenizer.encode(f"{pair.prompt} {pair.answer}")
        if sentence_ids[:len(prompt_ids)] != prompt_ids:
            raise ValueError(f"qa: the prompt {pair.prompt!r} does not tokenize as a prefix of its sentence")
        answer_ids = sentence_ids[len(prompt_ids):]
        items.append(QAItem(prompt=pair.prompt, answer=pair.answer,
                            prompt_ids=(tokenizer.eos_id, *prompt_ids), answer_ids=tuple(answer_ids),
                            person=pair.person, attribute=pair.attribute))
    return items


SAMPLE_SEED = 0  # which items a limited evaluation scores: the same in every run and every tool


def select_items(items: Sequence[QAItem], limit: int | None) -> list[QAItem]:
    """`limit` items drawn without replacement by a fixed seed, in split order; all if None.

    Not every k-th item: the split lists each person's attributes together, so a stride that is a
    multiple of the attribute count scores one attribute only (8,000 pairs of 4 attributes with
    limit 2,000 gave stride 4: every item asked the same relation)."""
    if not items or limit == 0:
        return []
    if limit is None or limit >= len(items):
        return list(items)
    chosen = sorted(random.Random(SAMPLE_SEED).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def save_qa(items: Sequence[QAItem], path: Path) -> None:
    path.write_text(json.dumps([asdict(item) for item in items]))


def load_qa(path: Path) -> list[QAItem]:
    if not path.exists():
        return []
    return [QAItem(**{**row, "prompt_ids": tuple(row["prompt_ids"]), "answer_ids": tuple(row["answer_ids"])})
            for row in json.loads(path.read_text())]
