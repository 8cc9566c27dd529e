"""RULER's metrics, as its ``eval/synthetic/constants.py`` and ``eval/evaluate.py`` define them.

A prediction is first cleaned by :func:`postprocess_pred`; references are matched as
case-insensitive substrings. Scores are percentages rounded to 2 decimals, like RULER's.

    score("all", predictions, [sample.outputs for sample in samples])
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from ..errors import LeanKError

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str) -> str:
    """Strip, turn every control character (newline, tab, ...) into a newline, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _check(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if not preds or len(preds) != len(refs):
        raise LeanKError(f"need one reference list per prediction, got {len(preds)} predictions and {len(refs)}")
    if any(len(ref) == 0 for ref in refs):
        raise LeanKError("every sample needs at least one reference string")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of references found in the prediction, x100."""
    _check(preds, refs)
    total = sum(sum(r.lower() in pred.lower() for r in ref) / len(ref) for pred, ref in zip(preds, refs, strict=True))
    return round(total / len(preds) * 100, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of 1 if any reference is found in the prediction, x100."""
    _check(preds, refs)
    total = sum(max(float(r.lower() in pred.lower()) for r in ref) for pred, ref in zip(preds, refs, strict=True))
    return round(total / len(preds) * 100, 2)


METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "all": string_match_all,
    "any": string_match_part,
}


def score(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's task score: postprocess each raw prediction, then apply ``metric``
    (``all`` = string_match_all, ``any`` = string_match_part)."""
    if metric not in METRICS:
        raise LeanKError(f"unknown metric {metric!r}: use 'all' (string_match_all) or 'any' (string_match_part)")
    return METRICS[metric]([postprocess_pred(p) for p in predictions], references)
