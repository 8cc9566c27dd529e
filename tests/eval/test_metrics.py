"""RULER's metrics on hand-computed cases."""

from __future__ import annotations

import pytest

from leank.errors import LeanKError
from leank.eval.metrics import postprocess_pred, score, string_match_all, string_match_part


def test_string_match_all_is_the_mean_fraction_found():
    preds = ["The numbers are 123 and 456.", "only 123 here", "nothing", "ABC-def"]
    refs = [["123", "456"], ["123", "456"], ["1"], ["abc-DEF"]]
    # Per sample: 2/2, 1/2, 0/1, 1/1 (case-insensitive) -> mean 0.625.
    assert string_match_all(preds, refs) == 62.5


def test_string_match_part_is_any_reference_found():
    preds = ["Paris is the capital", "I do not know", "it was LONDON"]
    refs = [["Paris", "Lyon"], ["Rome"], ["Berlin", "london"]]
    assert string_match_part(preds, refs) == 66.67  # 2 of 3, rounded to 2 decimals like RULER


def test_single_reference_metrics_agree():
    preds, refs = ["a 7 b", "x", "y 7"], [["7"], ["7"], ["7"]]
    assert string_match_all(preds, refs) == string_match_part(preds, refs) == 66.67


def test_substring_not_token_match():
    assert string_match_all(["12345678"], [["1234567"]]) == 100.0
    assert string_match_all(["1234 567"], [["1234567"]]) == 0.0


def test_postprocess_pred():
    assert postprocess_pred("  \n 123\tand\x00456\r\n ") == "123\nand\n456"
    assert postprocess_pred("\x07") == ""
    assert postprocess_pred("Ünïcode stays") == "Ünïcode stays"


def test_score_postprocesses_then_applies_the_metric():
    assert score("all", [" 1\t2 "], [["1\n2"]]) == 100.0
    assert score("any", ["no", "yes: b"], [["a"], ["a", "b"]]) == 50.0
    with pytest.raises(LeanKError, match="unknown metric"):
        score("exact", ["a"], [["a"]])


@pytest.mark.parametrize(("preds", "refs"), [([], []), (["a", "b"], [["a"]]), (["a"], [[]])])
def test_malformed_inputs(preds, refs):
    with pytest.raises(LeanKError):
        string_match_all(preds, refs)
    with pytest.raises(LeanKError):
        string_match_part(preds, refs)
