"""Task files in NVIDIA RULER's own JSONL format, read as :class:`~leank.data.tasks.Sample`.

One JSON object per line with ``input`` (the prompt, model template already applied by
RULER's ``prepare.py``) and ``outputs`` (reference strings); optional ``answer_prefix``
(newer RULER keeps it out of ``input``), ``length`` and ``index``. The prompt given to the
model is ``input + answer_prefix``, unchanged. The metric follows RULER: ``any``
(``string_match_part``) for the QA tasks, ``all`` (``string_match_all``) for the others.

    samples = load_ruler_jsonl("ruler/4096/data/niah_single_1/validation.jsonl")
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LeanKError
from .tasks import Metric, Sample

_SPLIT_NAMES = ("validation", "test")


def task_from_path(path: Path) -> str:
    """RULER's task name: the folder of ``<task>/validation.jsonl``, else the file stem."""
    return path.parent.name if path.stem in _SPLIT_NAMES else path.stem


def ruler_metric(task: str) -> Metric:
    """RULER scores its QA tasks with ``string_match_part`` (``any``), the rest with ``all``."""
    return "any" if task.startswith("qa") else "all"


def _record_sample(
    record: object, where: str, *, task: str, metric: Metric, line_index: int, length: int | None
) -> Sample:
    if not isinstance(record, dict):
        raise LeanKError(f"{where}: expected a JSON object, got {type(record).__name__}; RULER JSONL has one per line")
    for field in ("input", "outputs"):
        if field not in record:
            raise LeanKError(f"{where}: missing field {field!r}; RULER JSONL lines need 'input' and 'outputs'")
    prompt, outputs = record["input"], record["outputs"]
    answer_prefix = record.get("answer_prefix", "")
    if not isinstance(prompt, str) or not isinstance(answer_prefix, str):
        raise LeanKError(f"{where}: 'input' and 'answer_prefix' must be strings")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
        raise LeanKError(f"{where}: 'outputs' must be a non-empty list of strings, got {outputs!r}")
    index, record_length = record.get("index", line_index), record.get("length", 0)
    if not isinstance(index, int) or not isinstance(record_length, int):
        raise LeanKError(f"{where}: 'index' and 'length' must be integers")
    return Sample(
        task=task,
        index=index,
        length=record_length if length is None else length,
        context=prompt,
        query="",
        answer_prefix=answer_prefix,
        outputs=list(outputs),
        metric=metric,
        prompt=prompt + answer_prefix,
    )


def load_ruler_jsonl(
    path: str | Path,
    *,
    task: str | None = None,
    metric: Metric | None = None,
    length: int | None = None,
) -> list[Sample]:
    """The samples of a RULER JSONL file, in file order.

    ``task``: defaults to :func:`task_from_path`. ``metric``: ``all`` or ``any``, overriding
    :func:`ruler_metric`. ``length``: the length bucket to record on every sample; by default
    each record's own ``length`` field (RULER's prompt + generation budget), 0 if absent.
    The whole prompt is in ``Sample.context``; ``query`` is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise LeanKError(f"RULER task file {path} does not exist: pass the path of a .jsonl file")
    task = task or task_from_path(path)
    if metric not in (None, "all", "any"):
        raise LeanKError(f"unknown metric {metric!r}: use 'all' (string_match_all) or 'any' (string_match_part)")
    metric = metric or ruler_metric(task)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise LeanKError(f"cannot read {path} ({err}): RULER JSONL is UTF-8 text") from err
    samples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LeanKError(f"{where}: not valid JSON ({err.msg}); RULER JSONL has one JSON object per line") from err
        samples.append(_record_sample(record, where, task=task, metric=metric, line_index=len(samples), length=length))
    if not samples:
        raise LeanKError(f"{path} has no samples: a RULER task file has one JSON object per line")
    return samples
