"""Standard error of the 11-task average score, from the per-sample scores in this directory, and
the paired standard error of the gap between two methods (same samples).

    python benchmarks/results/eval_smollm2_100/standard_error.py full leank-mask-0.850-stage1 \
        ../train_smollm2_align8/eval/leank-mask-0.85

SE(average) = sqrt(sum over tasks of var(task scores) / n) / tasks; paired: the same over the
per-sample differences. Each method's directory is relative to this file's directory.
"""

import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scores(method: str, length: int) -> dict[str, list[float]]:
    out = {}
    for task_dir in sorted((HERE / method).iterdir()):
        path = task_dir / str(length) / "predictions.jsonl"
        if path.exists():
            rows = sorted((json.loads(line) for line in path.open()), key=lambda r: r["index"])
            out[task_dir.name] = [r["score"] for r in rows]
    return out


def se(per_task: dict[str, list[float]]) -> float:
    return math.sqrt(sum(statistics.pvariance(v) / len(v) for v in per_task.values())) / len(per_task)


for length in (4096, 8192):
    by = {m: scores(m, length) for m in sys.argv[1:]}
    if not all(by.values()):  # a method not run at this length
        continue
    for m, s in by.items():
        avg = statistics.fmean(statistics.fmean(v) for v in s.values())
        print(f"{length} {m}: average {avg:.2f}, SE {se(s):.2f} ({len(s)} tasks)")
    methods = list(by)
    for a, b in [*zip(methods, methods[1:], strict=False), *([(methods[0], methods[-1])] if len(methods) > 2 else [])]:
        diff = {t: [x - y for x, y in zip(by[a][t], by[b][t], strict=True)] for t in by[a]}
        print(f"{length} {a} - {b}: gap {statistics.fmean(statistics.fmean(v) for v in diff.values()):.2f}, "
              f"paired SE {se(diff):.2f}")
