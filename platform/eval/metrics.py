"""Scores of one generated answer: the harness's exact match and TriviaQA's token F1.

`exact_match` is lm-evaluation-harness's own (`exact_match_hf_evaluate`, with the task's
`ignore_case`, `ignore_punctuation` and `regexes_to_ignore`), taken as the best over the gold
answers as the harness does for a list of targets. `token_f1` is the SQuAD/TriviaQA F1: both
sides lower-cased, punctuation and the articles a/an/the removed, whitespace collapsed, then
the F1 of the bag of words; the best over the gold answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

from lm_eval.api.metrics import exact_match_hf_evaluate

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, targets: Sequence[str], *, ignore_case: bool = True,
                ignore_punctuation: bool = True, regexes_to_ignore: Sequence[str] | None = None) -> float:
    """1.0 if the prediction equals one of `targets` after the harness's normalisation."""
    return max((float(exact_match_hf_evaluate([prediction], [target], regexes_to_ignore=regexes_to_ignore,
                                              ignore_case=ignore_case,
                                              ignore_punctuation=ignore_punctuation)["exact_match"])
                for target in targets), default=0.0)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def _f1(prediction: str, target: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(target).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, targets: Sequence[str]) -> float:
    """The best bag-of-words F1 of the prediction against any of `targets`."""
    return max((_f1(prediction, target) for target in targets), default=0.0)
