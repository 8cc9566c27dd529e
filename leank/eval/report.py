"""``leank report RESULTS_DIR``: the tables and plots of an evaluation directory.

    write_report("runs/eval")   # → report.md, accuracy_vs_sparsity.png, accuracy_vs_kv_bytes.png, agreement_….png

Reads every ``<method>/<task>/<length>/metrics.json`` the runner wrote, so a partially
finished directory reports what is done (missing cells show ``–``; each average says how
many tasks it covers), and ``agreement.json`` when it exists. Plots use matplotlib's Agg
renderer (no display needed); without matplotlib the report is written without them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .._io import atomic_write, atomic_write_text
from ..data.tasks import TASKS
from ..errors import LeanKError

ACCURACY_PLOT = "accuracy_vs_sparsity.png"
FRONTIER_PLOT = "accuracy_vs_kv_bytes.png"
AGREEMENT_PLOT = "agreement_vs_sparsity.png"
LINESTYLES = ("-", "--", "-.", ":")


def collect_results(results_dir: str | Path) -> list[dict]:
    """The metrics of every finished run under ``results_dir``, in path order."""
    results = []
    for path in sorted(Path(results_dir).glob("*/*/*/metrics.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise LeanKError(f"{path} is not valid JSON ({err}): delete it to re-run that configuration") from None
        missing = [k for k in RESULT_KEYS if k not in result] if isinstance(result, dict) else list(RESULT_KEYS)
        if missing:
            raise LeanKError(f"{path} is not a result of `leank eval` (no {', '.join(missing)}): delete it to "
                             "re-run that configuration")
        results.append(result)
    return results


# The fields of a metrics.json the report reads.
RESULT_KEYS = ("method", "family", "task", "length", "score", "n", "sparsity", "kv_bytes_per_sample",
               "dense_kv_bytes_per_sample", "kv_bytes_kind", "seconds", "model", "device", "gpu", "dtype",
               "versions")


def _method_key(result: dict) -> tuple:
    return (result["method"] != "full", result["family"], result["sparsity"], result["method"])


def _task_key(task: str) -> tuple:
    order = list(TASKS)
    return (0, order.index(task), task) if task in order else (1, 0, task)


def ordered_methods(results: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in sorted(results, key=_method_key)))


def averages(results: list[dict]) -> dict[tuple[str, int], dict]:
    """Per (method, length): mean score over its tasks, their count, family and sparsity."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in results:
        groups[r["method"], r["length"]].append(r)
    return {
        key: {"score": sum(r["score"] for r in rs) / len(rs), "tasks": len(rs), "family": rs[0]["family"],
              "sparsity": rs[0]["sparsity"]}
        for key, rs in groups.items()
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def accuracy_tables(results: list[dict]) -> str:
    """Per length: task × method scores with sample counts, an average row, and each method's
    sparsity, KV bytes and time."""
    means = averages(results)
    parts = []
    for length in sorted({r["length"] for r in results}):
        rows = [r for r in results if r["length"] == length]
        methods = ordered_methods(rows)
        tasks = sorted({r["task"] for r in rows}, key=_task_key)
        cell = {(r["task"], r["method"]): r for r in rows}
        lines = [f"### {length} tokens", "", "| task | " + " | ".join(methods) + " |",
                 "|---|" + "---:|" * len(methods)]
        for task in tasks:
            cells = [f"{cell[task, m]['score']:.1f} (n={cell[task, m]['n']})" if (task, m) in cell else "–"
                     for m in methods]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        avg = [f"**{means[m, length]['score']:.1f}** ({means[m, length]['tasks']}/{len(tasks)} tasks)"
               for m in methods]
        lines += ["| **average** | " + " | ".join(avg) + " |", ""]
        lines += ["| method | K sparsity | KV MiB / sample | KV vs dense | bytes | generate s |",
                  "|---|---:|---:|---:|---|---:|"]
        for m in methods:
            rs = [r for r in rows if r["method"] == m]
            n = sum(r["n"] for r in rs)
            held = sum(r["kv_bytes_per_sample"] * r["n"] for r in rs)
            dense = sum(r["dense_kv_bytes_per_sample"] * r["n"] for r in rs)
            lines.append(f"| {m} | {rs[0]['sparsity']:.1%} | {_mib(held / n)} | {held / dense:.1%} | "
                         f"{rs[0]['kv_bytes_kind']} | {sum(r['seconds'] for r in rs):.0f} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def kv_fractions(results: list[dict]) -> dict[tuple[str, int], float]:
    """Per (method, length): KV bytes held over the dense cache's, summed over its samples."""
    held: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in results:
        pair = held[r["method"], r["length"]]
        pair[0] += r["kv_bytes_per_sample"] * r["n"]
        pair[1] += r["dense_kv_bytes_per_sample"] * r["n"]
    return {key: h / d for key, (h, d) in held.items() if d}


def frontier_table(results: list[dict]) -> str:
    """Accuracy against the fraction of dense KV bytes kept: one row per method and length,
    fewest bytes first (the accuracy–memory frontier)."""
    means, fractions = averages(results), kv_fractions(results)
    lines = ["| length | method | KV bytes vs dense | compression | average score | tasks | bytes |",
             "|---:|---|---:|---:|---:|---:|---|"]
    kinds = {(r["method"], r["length"]): r["kv_bytes_kind"] for r in results}
    for (method, length), frac in sorted(fractions.items(), key=lambda item: (item[0][1], item[1])):
        mean = means[method, length]
        lines.append(f"| {length} | {method} | {frac:.1%} | {1 / frac:.2f}× | {mean['score']:.1f} | "
                     f"{mean['tasks']} | {kinds[method, length]} |")
    return "\n".join(lines)


def plot_frontier(results: list[dict], path: Path) -> None:
    """Average score against the fraction of dense KV bytes: a point per method, a colour per
    method family, a marker per length."""
    fig, (ax,) = _figure()
    means, fractions = averages(results), kv_fractions(results)
    lengths = sorted({r["length"] for r in results})
    families = list(dict.fromkeys(r["family"] for r in sorted(results, key=_method_key)))
    markers = "os^Dv"
    for (method, length), frac in fractions.items():
        mean = means[method, length]
        i, j = families.index(mean["family"]), lengths.index(length)
        ax.scatter(frac, mean["score"], color=f"C{i}", marker=markers[j % len(markers)],
                   label=f"{mean['family']} @ {length}")
        ax.annotate(method.split(":")[-1][:18], (frac, mean["score"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize="small")
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("KV-cache bytes, fraction of the dense cache (scales and zero points included)")
    ax.set_ylabel("score, average over tasks")
    ax.set_title("Accuracy vs KV bytes")
    ax.grid(alpha=0.3)
    _save(fig, path)


def agreement_table(agreement: dict) -> str:
    s = agreement["settings"]
    lines = [f"Prefill {s['length']} tokens, then {s['steps']} teacher-forced steps, {s['windows']} windows "
             "(mean ± standard error over windows).", "",
             "| method | K sparsity | KL(full ‖ method), nats | top-1 agreement |", "|---|---:|---:|---:|"]
    for e in agreement["methods"]:
        lines.append(f"| {e['method']} | {e['sparsity']:.1%} | {e['kl_mean']:.4f} ± {e['kl_stderr']:.4f} | "
                     f"{e['top1_mean']:.3f} ± {e['top1_stderr']:.3f} |")
    return "\n".join(lines)


def have_matplotlib() -> bool:
    """Whether the plots can be drawn (matplotlib is optional: the results and report are not)."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


NO_MATPLOTLIB = "plots skipped: matplotlib is not installed (pip install 'leank[plots]'); the tables are complete"


def _figure(ncols: int = 1):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LeanKError("plots need matplotlib: pip install 'leank[plots]'") from None
    fig = Figure(figsize=(6.5 * ncols, 4.5), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_accuracy(results: list[dict], path: Path) -> None:
    """Average score over tasks against K sparsity: a line per method family and length;
    the full cache as a horizontal line."""
    fig, (ax,) = _figure()
    lengths = sorted({r["length"] for r in results})
    families = list(dict.fromkeys(r["family"] for r in sorted(results, key=_method_key)))
    colors = {f: f"C{i}" for i, f in enumerate(families)}
    curves: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for (_, length), mean in averages(results).items():
        curves[mean["family"], length].append((mean["sparsity"], mean["score"]))
    for (family, length), points in sorted(curves.items(), key=lambda item: (families.index(item[0][0]), item[0][1])):
        style = LINESTYLES[lengths.index(length) % len(LINESTYLES)]
        label = f"{family} @ {length}"
        if family == "full":
            ax.axhline(points[0][1], color="black", linestyle=style, linewidth=1, label=label)
        else:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", color=colors[family], linestyle=style, label=label)
    ax.set_xlim(-0.02, 1.0)
    ax.set_xlabel("K channels pruned (sparsity)")
    ax.set_ylabel("score, average over tasks")
    ax.set_title("Accuracy vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def plot_agreement(agreement: dict, path: Path) -> None:
    """KL divergence and top-1 agreement against K sparsity, a line per method family."""
    fig, (ax_kl, ax_top1) = _figure(2)
    families: dict[str, list[dict]] = defaultdict(list)
    for e in agreement["methods"]:
        families[e["family"]].append(e)
    for i, (family, entries) in enumerate(families.items()):
        entries = sorted(entries, key=lambda e: e["sparsity"])
        xs = [e["sparsity"] for e in entries]
        for ax, key in ((ax_kl, "kl"), (ax_top1, "top1")):
            ax.errorbar(xs, [e[f"{key}_mean"] for e in entries], yerr=[e[f"{key}_stderr"] for e in entries],
                        marker="o", capsize=3, color=f"C{i}", label=family)
    ax_kl.set_ylabel("KL(full ‖ method), nats / token")
    ax_top1.set_ylabel("top-1 agreement with full")
    for ax in (ax_kl, ax_top1):
        ax.set_xlim(-0.02, 1.0)
        ax.set_xlabel("K channels pruned (sparsity)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    s = agreement["settings"]
    fig.suptitle(f"Decode agreement with the full cache ({s['model']}, {s['length']}-token context)")
    _save(fig, path)


def write_report(results_dir: str | Path, *, notes: list[str] | None = None) -> Path:
    """Write ``report.md`` and, when matplotlib is installed, the plots into ``results_dir``;
    return the report's path. Without matplotlib the report is written without figures and
    a note saying so is appended to ``notes``."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise LeanKError(f"results directory {results_dir} does not exist: pass the --out of a `leank eval` run")
    results = collect_results(results_dir)
    agreement_path = results_dir / "agreement.json"
    try:
        agreement = json.loads(agreement_path.read_text(encoding="utf-8")) if agreement_path.is_file() else None
    except ValueError as err:
        raise LeanKError(f"{agreement_path} is not valid JSON ({err}): delete it to measure the agreement "
                         "again") from None
    if not results and agreement is None:
        raise LeanKError(f"{results_dir} holds no finished runs (<method>/<task>/<length>/metrics.json): "
                         "run `leank eval` first")
    plots = have_matplotlib()
    if not plots and notes is not None:
        notes.append(NO_MATPLOTLIB)
    models = sorted({r["model"] for r in results} | ({agreement["settings"]["model"]} if agreement else set()))
    sections = [f"# Evaluation report: {', '.join(models)}", ""]
    if results:
        envs = sorted({f"{r['gpu'] or r['device']}, {r['dtype']}, torch {r['versions']['torch']}, "
                       f"transformers {r['versions']['transformers']}" for r in results})
        sections += [f"Scores are RULER's metrics in percent (n = samples). Run on: {'; '.join(envs)}.", ""]
        commands = sorted({r["command"] for r in results if r.get("command")})
        sections += [f"Command: `{c}`" for c in commands] + ([""] if commands else [])
        sections += ["## Task scores", "", accuracy_tables(results), ""]
        if plots:
            plot_accuracy(results, results_dir / ACCURACY_PLOT)
            sections += [f"![accuracy vs sparsity]({ACCURACY_PLOT})", ""]
        sections += ["## Accuracy vs KV bytes", "", frontier_table(results), ""]
        if plots:
            plot_frontier(results, results_dir / FRONTIER_PLOT)
            sections += [f"![accuracy vs KV bytes]({FRONTIER_PLOT})", ""]
    if agreement:
        sections += ["## Decode agreement with the full cache", "", agreement_table(agreement), ""]
        if plots:
            plot_agreement(agreement, results_dir / AGREEMENT_PLOT)
            sections += [f"![agreement vs sparsity]({AGREEMENT_PLOT})", ""]
    return atomic_write_text(results_dir / "report.md", "\n".join(sections))
