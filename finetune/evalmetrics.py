"""Scores for a generated answer against a reference answer: exact match, token F1 and ROUGE-L.

Pure Python (no numpy, no torch), so the web process can recompute or aggregate scores. Text is normalised the
way the SQuAD evaluation script does it before comparing: lower case, punctuation removed, the articles
"a", "an" and "the" removed, whitespace collapsed. Every score is a float in [0, 1].
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

METRICS = ("exact_match", "token_f1", "rouge_l")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = {ch for ch in string.punctuation}


def normalize(text: str) -> str:
    """Lower case, no punctuation (ASCII or Unicode), no articles, single spaces."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    text = "".join(
        " " if (ch in _PUNCTUATION or unicodedata.category(ch).startswith("P")) else ch for ch in text
    )
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def exact_match(prediction: str, reference: str) -> float:
    return 1.0 if normalize(prediction) == normalize(reference) else 0.0


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over the multiset of normalised tokens."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return 1.0 if pred == ref else 0.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, in O(len(a) * len(b)) time and O(min) memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            current[j] = previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure (Lin, 2004) over normalised tokens; beta=1 weighs precision and recall equally."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return 1.0 if pred == ref else 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def score(prediction: str, reference: str | None) -> dict:
    """All three scores, or an empty dict when there is no reference to compare with."""
    if reference is None or (isinstance(reference, str) and not reference.strip()):
        return {}
    prediction = prediction or ""
    return {
        "exact_match": exact_match(prediction, reference),
        "token_f1": token_f1(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
    }


def summarize(scored: list[dict]) -> dict:
    """Mean of each score over the items that have it, plus how many items were scored."""
    summary: dict = {}
    for name in METRICS:
        values = [item[name] for item in scored if isinstance(item.get(name), (int, float))]
        if values:
            summary[name] = sum(values) / len(values)
    summary["scored"] = sum(1 for item in scored if any(name in item for name in METRICS))
    return summary
