"""Synthetic facts: fictional people with attributes, rendered as biographies, plus QA pairs.

The world (`generate_world`) is a list of people with unique names made of generated syllables:
one word each (`name_words: 1`), or a first and a last name drawn from two pools of about
sqrt(people) words (`name_words: 2`, see `_composite_names`). Each person holds one value per
attribute, drawn from that attribute's value list (generated one-word names of cities, companies,
universities, fields of study, or years). The world is decided by `FactsConfig.seed` through
counter-based hashes (draws.py), so it is the same on every machine and Python version;
`FACTS_VERSION` (attributes.py, beside the attributes) changes whenever the output of this module
would change, and it is part of the data fingerprint.

A biography (`biography`) is one sentence per attribute, in a shuffled order, each from one of
`templates_per_attribute` phrasings, e.g. "Dorvakin was born in Selmoraton ." With the word
tokenizer every name and value is one token and sentences are ~6.3 tokens. The terse phrasing
(`phrasing: terse`) states each fact as name, relation word, value: "Dorvakin birthplace
Selmoraton ." (4 tokens). There the value is predicted at the relation word with the name one
token back, so a model needs only a previous-token head to bring both into place and what is
left is storing the facts. With `document: fact` every fact is a document of its own (one
sentence between end-of-text tokens), so no model has to learn to copy a name into the next
sentence of a biography (on the quickstart's data this did not help the memory families: see
studies/quickstart.yaml). Renderings, their order and phrasings are decided by the data seed
(`DataConfig.seed`), the world by the facts seed.

Corpus size: `renderings` renderings of every fact, in biographies or one document per fact
(`documents_per_rendering`; rendering r of a fact uses template (offset + r) mod K, so every
phrasing of every fact appears once renderings >= K), for prose biographies about
people * renderings * (attributes * 6.3 + 1) word tokens (790k with the defaults). One pass shows
every fact `renderings` times: exposures per fact = renderings * epochs (e.g. ~85 exposures are
renderings=10 and ~8.5 epochs).

The validation split is extra renderings r >= renderings of the same facts: held-out orders and
phrasings, because recall is the point, not generalisation. The QA split (`qa_pairs`) asks every
(person, attribute) with the phrasing of its rendering 0, which is always in the training text:
prompt = the sentence up to the value, answer = the value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

from memlayers.platform.data.attributes import ATTRIBUTES
from memlayers.platform.data.config import FactsConfig
from memlayers.platform.data.draws import draw

VALUE = "{value}"

_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "st", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "s")


def _word(seed: int, *key: object) -> str:
    """A capitalised pseudo-word of 2-3 generated syllables."""
    bits = draw(seed, "word", *key)
    syllables = 2 + bits % 2
    bits //= 2
    parts = []
    for _ in range(syllables):
        for choices in (_ONSETS, _VOWELS, _CODAS):
            parts.append(choices[bits % len(choices)])
            bits //= len(choices)
    return "".join(parts).capitalize()


@dataclass(frozen=True)
class World:
    """People (one-word names) and, per attribute, its value list and each person's value."""

    names: tuple[str, ...]
    attributes: tuple[str, ...]
    values: dict[str, tuple[str, ...]]          # attribute -> its value list
    facts: dict[str, tuple[int, ...]]           # attribute -> value index per person
    templates_per_attribute: int
    phrasing: str = "prose"                     # prose | terse
    document: str = "biography"                 # biography | fact

    def value(self, person: int, attribute: str) -> str:
        return self.values[attribute][self.facts[attribute][person]]


def generate_world(cfg: FactsConfig) -> World:
    """The seeded world of `cfg`: unique names, value lists, one value per (person, attribute)."""
    used: set[str] = set()

    def fresh(purpose: str, index: int, suffixes: Sequence[str] = ()) -> str:
        for attempt in range(1000):
            stem = _word(cfg.seed, purpose, index, attempt)
            suffix = suffixes[draw(cfg.seed, "suffix", purpose, index, attempt) % len(suffixes)] if suffixes else ""
            word = stem + suffix
            if word not in used:
                used.add(word)
                return word
        raise RuntimeError(f"facts: cannot generate a new unique word for {purpose} #{index}")

    values: dict[str, tuple[str, ...]] = {}
    for name in cfg.attributes:
        attr = ATTRIBUTES[name]
        if attr.suffixes:
            values[name] = tuple(fresh(name, i, attr.suffixes) for i in range(cfg.values_per_attribute))
        else:
            values[name] = tuple(str(attr.first_year + i) for i in range(cfg.values_per_attribute))
            used.update(values[name])
    names = (_composite_names(cfg, fresh) if cfg.name_words == 2
             else tuple(fresh("person", p) for p in range(cfg.people)))
    facts = {name: tuple(draw(cfg.seed, "fact", name, p) % cfg.values_per_attribute
                         for p in range(cfg.people))
             for name in cfg.attributes}
    return World(names=names, attributes=tuple(cfg.attributes), values=values, facts=facts,
                 templates_per_attribute=cfg.templates_per_attribute, phrasing=cfg.phrasing,
                 document=cfg.document)


def _composite_names(cfg: FactsConfig, fresh) -> tuple[str, ...]:
    """Two-word names "First Last": F = ceil(sqrt(people)) first names and ceil(people / F) last
    names, every pair at most once, the pairs taken in a seeded order. Each first or last name is
    shared by ~sqrt(people) people, so no single word (and no single embedding) identifies a person."""
    firsts = [fresh("first", i) for i in range(math.isqrt(cfg.people - 1) + 1)]
    lasts = [fresh("last", j) for j in range(-(-cfg.people // len(firsts)))]
    pairs = sorted(((i, j) for i in range(len(firsts)) for j in range(len(lasts))),
                   key=lambda ij: draw(cfg.seed, "name", *ij))
    return tuple(f"{firsts[i]} {lasts[j]}" for i, j in pairs[:cfg.people])


def new_population(world: World, people: int, seed: int) -> World:
    """`people` people who are not in `world` and hold the same relations: "Last First" names (a last
    and a first name word of `world` in swapped order, so every word is in the pretraining
    vocabulary and no name equals one of `world`'s), pairs in a seeded order, values drawn afresh
    from the same value lists. Needs two-word names: one-word names would be words the
    pretraining text never showed."""
    if " " not in world.names[0]:
        raise ValueError("data.facts.name_words: a new population reuses the name words of pretraining: needs 2")
    firsts = sorted({name.split(" ")[0] for name in world.names})
    lasts = sorted({name.split(" ")[1] for name in world.names})
    if people > len(firsts) * len(lasts):
        raise ValueError(f"finetune.new_people: at most {len(firsts) * len(lasts)} for this world, got {people}")
    pairs = sorted(((j, i) for j in range(len(lasts)) for i in range(len(firsts))),
                   key=lambda ji: draw(seed, "new-name", *ji))[:people]
    names = tuple(f"{lasts[j]} {firsts[i]}" for j, i in pairs)
    n_values = len(next(iter(world.values.values())))
    facts = {name: tuple(draw(seed, "new-fact", name, p) % n_values for p in range(people))
             for name in world.attributes}
    return dataclasses.replace(world, names=names, facts=facts)


def _template(world: World, seed: int, person: int, attribute: str, rendering: int) -> str:
    if world.phrasing == "terse":
        return ATTRIBUTES[attribute].terse()
    offset = draw(seed, "template", person, attribute)
    templates = ATTRIBUTES[attribute].templates[:world.templates_per_attribute]
    return templates[(offset + rendering) % len(templates)]


def _sentence(world: World, seed: int, person: int, attribute: str, rendering: int) -> str:
    template = _template(world, seed, person, attribute, rendering)
    return template.format(name=world.names[person], value=world.value(person, attribute))


def biography(world: World, seed: int, person: int, rendering: int) -> str:
    """Rendering `rendering` of `person`: every fact once, shuffled order, rotating phrasings."""
    order = sorted(world.attributes, key=lambda a: draw(seed, "order", rendering, person, a))
    return " ".join(_sentence(world, seed, person, a, rendering) for a in order)


def documents_per_rendering(world: World) -> int:
    """People (one biography each), or facts when every fact is its own document."""
    return len(world.names) * (len(world.attributes) if world.document == "fact" else 1)


def documents(world: World, seed: int, renderings: range) -> Iterator[str]:
    """For each rendering in `renderings`: every person's biography, people in a seeded order, or
    (`document: fact`) every fact as a one-sentence document, facts in a seeded order."""
    people = range(len(world.names))
    for r in renderings:
        if world.document == "fact":
            facts = [(p, a) for p in people for a in world.attributes]
            for person, attribute in sorted(facts, key=lambda pa: draw(seed, "fact-document", r, *pa)):
                yield _sentence(world, seed, person, attribute, r)
        else:
            for person in sorted(people, key=lambda p: draw(seed, "document", r, p)):
                yield biography(world, seed, person, r)


@dataclass(frozen=True)
class QAPair:
    person: str
    attribute: str
    prompt: str   # the sentence up to (not including) the value, no trailing space
    answer: str   # the value: one word


def qa_pairs(world: World, seed: int) -> list[QAPair]:
    """One question per (person, attribute), phrased as in that fact's rendering 0."""
    pairs = []
    for person, name in enumerate(world.names):
        for attribute in world.attributes:
            template = _template(world, seed, person, attribute, rendering=0)
            prompt = template[:template.index(VALUE)].format(name=name).rstrip()
            pairs.append(QAPair(name, attribute, prompt, world.value(person, attribute)))
    return pairs
