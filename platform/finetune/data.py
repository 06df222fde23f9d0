"""The new knowledge of a finetuning run: a new population of the pretraining world, in its tokens.

The pretraining run's facts world (its data config) gives the relations, value lists and name
words; `facts.new_population` makes people who are not in it. Their documents (rendered as the
pretraining ones, `renderings` per person) are tokenized with the pretraining tokenizer, each
followed by EOS as `prepare_data` writes them; their QA pairs measure learning. A word the
tokenizer does not know is refused: the model could not learn or answer it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memlayers.platform.data import facts as facts_mod
from memlayers.platform.data.config import DataConfig
from memlayers.platform.data.qa import QAItem, tokenize_pairs
from memlayers.platform.data.tokenizers import Tokenizer


@dataclass
class NewFacts:
    train_ids: np.ndarray               # int32 tokens of the new documents
    qa: list[QAItem]                    # one question per (new person, relation)
    people: int


def new_facts(data: DataConfig, tokenizer: Tokenizer, people: int, renderings: int) -> NewFacts:
    """`people` new people of `data`'s world as training tokens and QA items."""
    if data.source != "facts":
        raise ValueError(f"data.source: a new population needs the synthetic facts source, got {data.source!r}")
    world = facts_mod.new_population(facts_mod.generate_world(data.facts), people, data.facts.seed)
    ids: list[int] = []
    for ids_doc in tokenizer.encode_batch(list(facts_mod.documents(world, data.seed, range(renderings)))):
        ids.extend(ids_doc)
        ids.append(tokenizer.eos_id)
    unknown = getattr(tokenizer, "unk_id", None)
    if unknown is not None and unknown in ids:
        raise ValueError("finetune.new_people: the new documents hold words the pretraining tokenizer does not know")
    return NewFacts(np.asarray(ids, dtype=np.int32), tokenize_pairs(facts_mod.qa_pairs(world, data.seed), tokenizer),
                    people)
