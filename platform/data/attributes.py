"""The kinds of fact a synthetic person holds (`ATTRIBUTES`), each with its phrasings and values,
and the version of the facts generator.

The data config validates a facts section against these (which attributes exist, how many
phrasings and values each has); facts.py renders them. Both import this module, so it imports
neither.
"""

from __future__ import annotations

from dataclasses import dataclass

FACTS_VERSION = 1  # the generator's version (facts.py): bumped whenever its output would change


@dataclass(frozen=True)
class Attribute:
    """One kind of fact: its phrasings (value always last, before ' .') and its values."""

    templates: tuple[str, ...]
    suffixes: tuple[str, ...] = ()  # word values: generated stem + one of these
    first_year: int = 0             # year values: first_year, first_year + 1, ...
    max_values: int = 10_000
    relation: str = ""              # the one word naming it in the terse phrasing

    def terse(self) -> str:
        """The terse phrasing: name, relation word, value ("Dorvakin birthplace Selmoraton .")."""
        return "{name} " + self.relation + " {value} ."


ATTRIBUTES: dict[str, Attribute] = {
    "birth_city": Attribute((
        "{name} was born in {value} .",
        "{name} 's birthplace is {value} .",
        "the hometown of {name} is {value} .",
        "{name} came into the world in {value} .",
        "{name} first drew breath in {value} .",
    ), suffixes=("ton", "burg", "vale", "mora", "ford", "haven"), relation="birthplace"),
    "employer": Attribute((
        "{name} works for {value} .",
        "{name} is employed by {value} .",
        "the employer of {name} is {value} .",
        "{name} earns a living at {value} .",
        "{name} has a job at {value} .",
    ), suffixes=("corp", "tech", "works", "soft", "labs"), relation="employer"),
    "university": Attribute((
        "{name} studied at {value} .",
        "{name} graduated from {value} .",
        "the alma mater of {name} is {value} .",
        "{name} is an alumnus of {value} .",
        "{name} earned a degree at {value} .",
    ), suffixes=("ridge", "stone", "field", "wood"), relation="university"),
    "birth_year": Attribute((
        "{name} was born during {value} .",
        "{name} 's birth year is {value} .",
        "the birth year of {name} is {value} .",
        "{name} entered life in the year {value} .",
        "{name} was a newborn in {value} .",
    ), first_year=1900, max_values=200, relation="birthyear"),
    "major": Attribute((
        "{name} majored in {value} .",
        "the field of study of {name} was {value} .",
        "{name} specialized in {value} .",
        "{name} wrote a thesis on {value} .",
        "{name} took a degree in {value} .",
    ), suffixes=("ology", "onomics", "istry", "ics"), relation="major"),
}
DEFAULT_ATTRIBUTES: tuple[str, ...] = ("birth_city", "employer", "university", "birth_year")
