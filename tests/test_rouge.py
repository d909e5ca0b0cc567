"""ROUGE-L: the scorer is Google's ``rouge-score`` (checked against a hand-computed LCS value)."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from hetlora_core.rouge import rouge_l


@pytest.mark.parametrize("pred, ref, lcs, n_pred, n_ref", [
    ("the cat sat on the mat", "the cat is on the mat", 5, 6, 6),  # LCS "the cat on the mat"
    ("To be, or not to be", "not to be", 3, 6, 3),
    ("completely different", "nothing shared here", 0, 2, 3),
])
def test_rouge_l_of_known_pairs(pred: str, ref: str, lcs: int, n_pred: int, n_ref: int) -> None:
    p, r = lcs / n_pred, lcs / n_ref
    by_hand = 0.0 if lcs == 0 else 2 * p * r / (p + r)
    lib = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert rouge_l(pred, ref) == pytest.approx(by_hand, abs=1e-12) == pytest.approx(lib, abs=1e-12)
