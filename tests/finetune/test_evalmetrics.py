"""Exact match, token F1 and ROUGE-L on outputs whose scores are worked out by hand."""
import math

import pytest

from finetune import evalmetrics as em


def test_normalize_follows_squad():
    assert em.normalize("  The  Cat, sat!  ") == "cat sat"
    assert em.normalize("An apple a day") == "apple day"
    assert em.normalize("Theory") == "theory"  # only whole-word articles go
    assert em.normalize("¡Hola — mundo!") == "hola mundo"  # Unicode punctuation too
    assert em.normalize("") == ""


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("Paris", "paris", 1.0),
        ("The Eiffel Tower.", "eiffel tower", 1.0),
        ("Paris, France", "Paris", 0.0),
        ("", "", 1.0),
    ],
)
def test_exact_match(prediction, reference, expected):
    assert em.exact_match(prediction, reference) == expected


def test_token_f1_known_values():
    # prediction tokens: cat sat on mat (4), reference: cat sat (2); common 2 -> P=0.5, R=1 -> F1=2/3
    assert em.token_f1("the cat sat on the mat", "the cat sat") == pytest.approx(2 / 3)
    # repeated tokens count as a multiset: pred [x, x, y] vs ref [x, y, y] -> common {x:1, y:1} = 2, P=R=2/3
    assert em.token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert em.token_f1("dog", "cat") == 0.0
    assert em.token_f1("", "cat") == 0.0
    assert em.token_f1("same words here", "here words same") == 1.0


def test_lcs_length():
    assert em.lcs_length("a b c d e".split(), "a c e".split()) == 3
    assert em.lcs_length("a b c".split(), "c b a".split()) == 1
    assert em.lcs_length([], ["x"]) == 0


def test_rouge_l_known_values():
    # Lin (2004) example: reference "police killed the gunman", candidate "police kill the gunman".
    # After normalisation ("the" dropped): ref [police killed gunman], cand [police kill gunman], LCS 2,
    # P = R = 2/3 -> F = 2/3.
    assert em.rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(2 / 3)
    # Word order matters for ROUGE-L but not for token F1.
    assert em.rouge_l("z y x", "x y z") == pytest.approx(1 / 3)
    assert em.token_f1("z y x", "x y z") == 1.0
    # Unequal lengths: pred 2 tokens, ref 4 tokens, LCS 2 -> P=1, R=0.5 -> F=2/3.
    assert em.rouge_l("w x", "w y x z") == pytest.approx(2 / 3)
    assert em.rouge_l("anything", "") == 0.0


def test_score_and_summary():
    scored = [em.score("Paris", "Paris"), em.score("Lyon", "Paris"), em.score("no reference", None)]
    assert scored[0] == {"exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0}
    assert scored[1] == {"exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0}
    assert scored[2] == {}
    summary = em.summarize(scored)
    assert summary == {"exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5, "scored": 2}
    assert em.summarize([]) == {"scored": 0}


def test_scores_are_bounded():
    for pred, ref in [("a b c", "c d e f"), ("x" * 5, "x"), ("one two two", "two one")]:
        for value in em.score(pred, ref).values():
            assert 0.0 <= value <= 1.0 and not math.isnan(value)
