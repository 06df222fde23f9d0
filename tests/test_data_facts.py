"""Synthetic facts: seeded worlds, biographies, held-out renderings and the QA split."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from memlayers.platform.data import DataConfig, FactsConfig, prepare_data
from memlayers.platform.data.attributes import ATTRIBUTES, FACTS_VERSION
from memlayers.platform.data.facts import VALUE, documents, generate_world, qa_pairs
from memlayers.platform.data.qa import select_items

SMALL = {"people": 40, "values_per_attribute": 12, "renderings": 4}


def small_cfg(**changes) -> DataConfig:
    facts = {**SMALL, **changes.pop("facts", {})}
    return DataConfig.from_dict({"facts": facts, "val_fraction": 0.25, **changes})


def test_world_is_deterministic_by_seed_and_differs_across_seeds():
    a = generate_world(FactsConfig(**SMALL, seed=1))
    b = generate_world(FactsConfig(**SMALL, seed=1))
    c = generate_world(FactsConfig(**SMALL, seed=2))
    assert a == b
    assert a.names != c.names
    assert a.values != c.values
    assert list(documents(a, 0, range(2))) == list(documents(b, 0, range(2)))
    assert list(documents(a, 0, range(2))) != list(documents(c, 0, range(2)))


def test_names_and_values_are_unique_single_words():
    world = generate_world(FactsConfig(people=3000))
    words = list(world.names) + [v for values in world.values.values() for v in values]
    assert len(set(world.names)) == 3000
    assert len(set(words)) == len(words)
    assert all(re.fullmatch(r"[A-Za-z0-9]+", w) for w in words)
    assert world.values["birth_year"][:2] == ("1900", "1901")
    counts = np.bincount(world.facts["birth_city"], minlength=100)
    assert counts.min() > 0  # every value is used by someone at this size


def test_biography_holds_every_fact_once_and_rotates_templates():
    cfg = FactsConfig(**SMALL)
    world = generate_world(cfg)
    docs = list(documents(world, 0, range(cfg.renderings)))
    assert len(docs) == cfg.people * cfg.renderings
    person = 0
    name = world.names[person]
    mine = [d for d in docs if d.split()[0] == name or f" {name} " in d]
    assert len(mine) == cfg.renderings
    for doc in mine:
        sentences = doc.split(" . ")
        assert len(sentences) == len(world.attributes)
        for attribute in world.attributes:
            assert f" {world.value(person, attribute)} ." in doc + " "
    # with renderings >= templates, every phrasing of birth_city appears for this person
    prefixes = {t.split(VALUE)[0].format(name=name).strip() for t in ATTRIBUTES["birth_city"].templates[:3]}
    assert all(any(p in d for d in mine) for p in prefixes)


def test_qa_prompts_are_unambiguous_across_attributes():
    stems = [t.split(VALUE)[0] for a in ATTRIBUTES.values() for t in a.templates]
    assert len(set(stems)) == len(stems)
    assert all(t.endswith(VALUE + " .") for a in ATTRIBUTES.values() for t in a.templates)


def test_qa_answers_are_single_tokens_that_follow_their_prompt_in_training(tmp_path):
    cfg = small_cfg()
    data = prepare_data(cfg, tmp_path)
    tok = data.tokenizer
    assert len(data.qa) == cfg.facts.people * len(cfg.facts.attributes)
    assert len({(q.person, q.attribute) for q in data.qa}) == len(data.qa)
    train = "," + ",".join(map(str, data.train_ids.tolist())) + ","
    for item in data.qa:
        assert len(item.answer_ids) == 1
        assert tok.decode(item.answer_ids) == item.answer
        assert item.prompt_ids[0] == tok.eos_id
        assert tok.decode(item.prompt_ids) == item.prompt
        needle = "," + ",".join(map(str, item.prompt_ids[1:] + item.answer_ids)) + ","
        assert needle in train, item
    world = generate_world(cfg.facts)
    values = {(world.names[p], a): world.value(p, a) for p in range(cfg.facts.people) for a in world.attributes}
    assert all(values[(q.person, q.attribute)] == q.answer for q in data.qa)


def test_a_limited_qa_evaluation_asks_every_relation(tmp_path):
    data = prepare_data(small_cfg(), tmp_path)   # 40 people x 4 attributes, listed person by person
    chosen = select_items(data.qa, 40)          # a stride of 4 would ask one relation only
    assert len(chosen) == 40 and len({(q.person, q.attribute) for q in chosen}) == 40
    assert {q.attribute for q in chosen} == set(small_cfg().facts.attributes)
    assert chosen == select_items(data.qa, 40) and chosen == [q for q in data.qa if q in chosen]  # fixed, in order
    assert select_items(data.qa, None) == list(data.qa) and select_items(data.qa, 0) == []


def test_validation_is_held_out_renderings_of_the_same_facts(tmp_path):
    cfg = small_cfg()
    data = prepare_data(cfg, tmp_path)
    assert data.meta["val_documents"] == cfg.facts.people * 1  # round(0.25 * 4) renderings
    assert data.meta["train_documents"] == cfg.facts.people * cfg.facts.renderings
    val_text = data.tokenizer.decode(data.val_ids)
    assert data.tokenizer.unk_id not in set(data.val_ids.tolist())  # no new words
    for q in qa_pairs(generate_world(cfg.facts), cfg.seed)[:20]:
        assert q.person in val_text and f" {q.answer} ." in val_text
    eos = data.tokenizer.eos_id
    assert data.train_ids[-1] == eos and data.val_ids[-1] == eos
    assert int((data.train_ids == eos).sum()) == data.meta["train_documents"]


def test_corpus_size_follows_renderings_and_fingerprint_tracks_the_world(tmp_path):
    a = prepare_data(small_cfg(facts={"renderings": 2}), tmp_path)
    b = prepare_data(small_cfg(facts={"renderings": 6}), tmp_path)
    assert 2.7 < len(b.train_ids) / len(a.train_ids) < 3.3
    assert a.fingerprint != b.fingerprint
    same = prepare_data(small_cfg(facts={"renderings": 2}, seq_len=32), tmp_path)
    assert same.fingerprint == a.fingerprint  # seq_len does not change the tokens
    other = prepare_data(small_cfg(facts={"renderings": 2, "seed": 5}), tmp_path)
    assert other.fingerprint != a.fingerprint
    assert not np.array_equal(other.train_ids[:200], a.train_ids[:200])


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_qa_with_subword_tokenizers(tmp_path, tokenizer):
    cfg = small_cfg(tokenizer=tokenizer, vocab_size=300)
    data = prepare_data(cfg, tmp_path)
    train = "," + ",".join(map(str, data.train_ids.tolist())) + ","
    tok = data.tokenizer
    for item in data.qa[:25]:
        assert tok.decode(item.answer_ids) == " " + item.answer
        # the sentence opens a document (after EOS) or follows another one (after a space);
        # either way the answer is tokenized exactly as in the QA item
        at_start = "," + ",".join(map(str, item.prompt_ids + item.answer_ids)) + ","
        mid_ids = tok.encode(f" {item.prompt} {item.answer}")
        assert tuple(mid_ids[-len(item.answer_ids):]) == item.answer_ids
        mid = "," + ",".join(map(str, mid_ids)) + ","
        assert at_start in train or mid in train, item


GOLDEN = {1: "8cb33ad7d023a94b15e358b03ef06fbce5f92ea87e8e17f8ce104425f227fc56"}


def test_generator_output_is_pinned_to_its_version():
    """If this fails, the generator's output changed: bump FACTS_VERSION and record the new digest."""
    cfg = FactsConfig(people=50, attributes=tuple(ATTRIBUTES), values_per_attribute=20, templates_per_attribute=5)
    world = generate_world(cfg)
    text = "\n".join(documents(world, 0, range(6))) + repr(qa_pairs(world, 0))
    assert hashlib.sha256(text.encode()).hexdigest() == GOLDEN[FACTS_VERSION]


def test_two_word_names_share_words_but_never_a_pair():
    cfg = FactsConfig(people=400, name_words=2)
    world = generate_world(cfg)
    pairs = [tuple(n.split(" ")) for n in world.names]
    assert len(set(pairs)) == 400 and all(len(p) == 2 for p in pairs)
    firsts, lasts = {f for f, _ in pairs}, {last for _, last in pairs}
    assert len(firsts) == 20 and len(lasts) == 20           # ~sqrt(people) words per position
    assert not firsts & lasts and not (firsts | lasts) & {v for vs in world.values.values() for v in vs}
    assert max(sum(f == first for f, _ in pairs) for first in firsts) > 1   # no word names one person


def test_terse_phrasing_puts_the_name_right_before_the_relation(tmp_path):
    cfg = small_cfg(facts={"phrasing": "terse", "name_words": 2, "templates_per_attribute": 1})
    world = generate_world(cfg.facts)
    bio = next(documents(world, 0, range(1)))
    sentences = bio.split(" . ")
    assert len(sentences) == len(world.attributes)
    relations = {ATTRIBUTES[a].relation for a in world.attributes}
    assert all(len(s.rstrip(" .").split(" ")) == 4 and s.split(" ")[2] in relations for s in sentences)
    data = prepare_data(cfg, tmp_path)
    assert all(len(q.prompt_ids) == 4 and len(q.answer_ids) == 1 for q in data.qa)   # <eos> First Last relation
    with pytest.raises(ValueError, match="data.facts.templates_per_attribute"):
        DataConfig.from_dict({"facts": {"phrasing": "terse", "templates_per_attribute": 3}}).validate()
    with pytest.raises(ValueError, match="data.facts.phrasing"):
        DataConfig.from_dict({"facts": {"phrasing": "poetic"}}).validate()
    with pytest.raises(ValueError, match="data.facts.name_words"):
        DataConfig.from_dict({"facts": {"name_words": 3}}).validate()


def test_fact_documents_hold_one_fact_each_and_every_fact_once_per_rendering(tmp_path):
    cfg = small_cfg(facts={"phrasing": "terse", "name_words": 2, "templates_per_attribute": 1, "document": "fact"})
    world = generate_world(cfg.facts)
    docs = list(documents(world, 0, range(2)))
    per_rendering = cfg.facts.people * len(world.attributes)
    assert len(docs) == 2 * per_rendering
    first = docs[:per_rendering]
    assert all(d.count(" . ") == 0 and d.endswith(" .") for d in docs)
    expected = {f"{world.names[p]} {ATTRIBUTES[a].relation} {world.value(p, a)} ."
                for p in range(cfg.facts.people) for a in world.attributes}
    assert set(first) == expected and len(first) == len(expected)
    assert first != docs[per_rendering:]                      # each rendering in its own order
    data = prepare_data(cfg, tmp_path)
    assert data.meta["val_tokens"] > 0 and len(data.qa) == per_rendering
    with pytest.raises(ValueError, match="data.facts.document"):
        DataConfig.from_dict({"facts": {"document": "chapter"}}).validate()
