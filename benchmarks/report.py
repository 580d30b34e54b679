"""Tables and plots from the benchmark JSONL files alone (nothing is re-run).

    python benchmarks/report.py                       # benchmarks/results/{quality,perturbation}.{md,png}
    python benchmarks/report.py --results-dir DIR --no-plots

Quality: mean ± std over seeds of the test score (the task's metric of the SAM paper, 0-100) per task and
method, and the average over tasks (only for methods with every task present). When a (task, method, seed)
appears with several config hashes, the newest row wins and the table says so. The markdown is also printed,
ready to paste into the README.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, fmt, md_table, mean_std, read_jsonl  # noqa: E402

TASK_ORDER = ["cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc"]
TASK_TITLES = {
    "cola": "CoLA (MCC)",
    "stsb": "STS-B (P+S)/2",
    "mrpc": "MRPC (acc+F1)/2",
    "rte": "RTE (acc)",
    "cb": "CB (acc+F1)/2",
    "copa": "COPA (acc)",
    "wsc": "WSC (acc)",
}
METHOD_ORDER = [
    "full", "sam", "fisher", "magnitude", "random", "bitfit", "lora", "lora_qv", "ia3", "prefix", "adalora",
    "shira", "supertuning", "mpo", "adapter",
]  # fmt: skip


def _order(items: set[str], preferred: list[str]) -> list[str]:
    return [x for x in preferred if x in items] + sorted(items - set(preferred))


def latest_rows(rows: list[dict[str, Any]], key_fields: tuple[str, ...]) -> tuple[list[dict[str, Any]], int]:
    """The last row per key (rows are append-only, so later = newer); also how many rows were superseded."""
    last: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        last[tuple(row.get(k) for k in key_fields)] = row
    return list(last.values()), len(rows) - len(last)


def quality_table(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Markdown for quality.jsonl rows; also returns the aggregated numbers (for the plot and tests).

    A method with rows at several learning rates (a rate chosen by the sweep after rows at a guessed one) gets one line
    per rate, ``method (lr X)``: rows at different rates are never averaged together.
    """
    rates: dict[str, set] = defaultdict(set)
    for r in rows:
        rates[r["method"]].add(r.get("lr"))
    rows = [
        {**r, "method": f"{r['method']} (lr {r['lr']:g})"} if len(rates[r["method"]]) > 1 else r for r in rows
    ]
    rows, superseded = latest_rows(rows, ("task", "method", "seed"))
    tasks = _order({r["task"] for r in rows}, TASK_ORDER)
    methods = _order({r["method"] for r in rows}, METHOD_ORDER)
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    trainable: dict[str, list[float]] = defaultdict(list)
    wall: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        scores[(r["task"], r["method"])].append(float(r["test_score"]))
        trainable[r["method"]].append(float(r["trainable_percent"]))
        wall[(r["task"], r["method"], _device(r))].append(float(r["wall_seconds"]))
    agg: dict[str, Any] = {"tasks": tasks, "methods": methods, "cells": {}, "average": {}}
    body = []
    for m in methods:
        line = [f"**{m}**", fmt(sum(trainable[m]) / len(trainable[m]), 3) if trainable[m] else "n/a"]
        means = []
        for t in tasks:
            mu, sd, n = mean_std(scores.get((t, m), []))
            agg["cells"][(t, m)] = (mu, sd, n)
            if n:
                means.append(mu)
                line.append(f"{mu:.1f} ± {sd:.1f} ({n})")
            else:
                line.append("–")
        if means and len(means) == len(tasks):
            avg = sum(means) / len(means)
            agg["average"][m] = avg
            line.append(f"**{avg:.1f}**")
        else:
            line.append("–")
        body.append(line)
    header = ["method", "trainable %", *[TASK_TITLES.get(t, t) for t in tasks], "average"]
    table = md_table(header, body)

    # cost table: wall seconds per run (mean), per task and device (GPU runs shared one GPU with 13 others)
    devices = sorted({_device(r) for r in rows})

    def cost_cell(t: str, m: str) -> str:
        parts = [f"{mean_std(wall[(t, m, d)])[0]:.0f} ({d})" for d in devices if wall.get((t, m, d))]
        return " / ".join(parts) or "n/a"

    cost = md_table(["method", *tasks], [[m, *[cost_cell(t, m) for t in tasks]] for m in methods])
    seeds = sorted({r["seed"] for r in rows})
    notes = [
        f"Test score (official dev set) of the best validation step, mean ± std over seeds (number of seeds); "
        f"{len(rows)} runs, seeds {seeds}. Average: mean of the per-task means, for methods with every task.",
    ]
    if superseded:
        notes.append(f"{superseded} older rows with the same (task, method, seed) were superseded by newer ones.")
    by_device = defaultdict(int)
    for r in rows:
        by_device[_device(r)] += 1
    notes.append("Runs per device: " + ", ".join(f"{d} {n}" for d, n in sorted(by_device.items())) + ".")
    hashes = defaultdict(set)
    for r in rows:  # the seed is part of each row's config; a cell mixes configurations if anything else differs
        config = {k: v for k, v in (r.get("config") or {}).items() if k != "seed"}
        hashes[(r["task"], r["method"])].add(json.dumps(config, sort_keys=True, default=str))
    mixed = sorted(f"{t}/{m}" for (t, m), h in hashes.items() if len(h) > 1)
    if mixed:
        notes.append("Cells mixing several configurations: " + ", ".join(mixed) + ".")
    parts = ["## Quality (test score)", "", *notes, "", table, "", "### Wall time per run (s)", "", cost, ""]
    calisr = calisr_table(rows)
    if calisr:
        parts += ["### CaliSr: switch step per group and cost of the stable-rank measurements", "", calisr, ""]
    return "\n".join(parts), agg


def _device(row: dict[str, Any]) -> str:
    name = row.get("device") or "cpu"
    return "cpu" if name == "cpu" else name.replace("NVIDIA ", "")


def calisr_table(rows: list[dict[str, Any]]) -> str:
    """One line per CaliSr run: switch step of each group (of the total), measurements, their share of the time."""
    body = []
    for r in sorted(rows, key=lambda r: (r["task"], r["method"], r["seed"])):
        info = r.get("calisr")
        if not info:
            continue
        switched = ", ".join(
            f"{g} {'-' if s is None else s}" for g, s in sorted((info.get("switched_at") or {}).items())
        )
        share = info.get("measure_share")
        body.append(
            [
                r["task"],
                r["method"],
                r["seed"],
                f"{r['test_score']:.1f}",
                f"{switched} (of {r['steps']})",
                info.get("measurements", 0),
                "n/a" if share is None else f"{100 * share:.1f} %",
                _device(r),
            ]
        )
    header = ["task", "method", "seed", "test", "switch step per group", "SR measurements", "measuring / train"]
    header.append("device")
    return md_table(header, body) if body else ""


def perturbation_table(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    rows, superseded = latest_rows(rows, ("task", "method", "seed", "drop_seed"))
    tasks = _order({r["task"] for r in rows}, TASK_ORDER)
    methods = _order({r["method"] for r in rows}, METHOD_ORDER)
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        scores[(r["task"], r["method"])].append(float(r["test_score"]))
    agg = {"tasks": tasks, "methods": methods, "scores": dict(scores)}
    body = []
    for m in methods:
        line = [f"**{m}**"]
        for t in tasks:
            vals = scores.get((t, m), [])
            mu, sd, n = mean_std(vals)
            line.append(f"{mu:.1f} ± {sd:.1f} [{min(vals):.1f}, {max(vals):.1f}] ({n})" if n else "–")
        body.append(line)
    table = md_table(["method", *[TASK_TITLES.get(t, t) for t in tasks]], body)
    parts = component_table(rows, tasks, methods)
    paired = paired_table(rows, tasks, methods)
    md = "\n".join(
        [
            "## Data perturbation (test score)",
            "",
            "Each run trains on the training split with a different random 10 % removed (drop seeds); mean ± std "
            "[min, max] (number of perturbed training sets). A smaller std means a method less sensitive to "
            "which examples it sees (SAM paper, section 'stability')."
            + (f" {superseded} superseded rows ignored." if superseded else ""),
            "",
            table,
            "",
            *_section(
                "Mean of each part of the composite scores over the same runs (e.g. CB's accuracy and "
                "macro-F1): a small spread can come from never predicting a rare class (a low macro-F1).",
                parts,
            ),
            *_section(
                "SAM against each method on the same training set (paired by drop seed): mean ± std of the "
                "difference in test score, and on how many sets SAM scores higher / the same / lower.",
                paired,
            ),
        ]
    )
    return md, agg


def _section(text: str, table: str) -> list[str]:
    """A paragraph and its table as markdown lines, or nothing when the table is empty."""
    return [text, "", table, ""] if table else []


def paired_table(rows: list[dict[str, Any]], tasks: list[str], methods: list[str], reference: str = "sam") -> str:
    """``reference`` minus each other method, per task, over the drop seeds both ran (the sets are identical)."""
    score = {(r["task"], r["method"], r["seed"], r["drop_seed"]): float(r["test_score"]) for r in rows}
    body = []
    for t in tasks:
        ref = sorted((k[2:], v) for k, v in score.items() if k[:2] == (t, reference))
        for m in methods:
            if m == reference:
                continue
            diffs = [v - score[(t, m, *run)] for run, v in ref if (t, m, *run) in score]
            mu, sd, n = mean_std(diffs)
            if n:
                wins, ties = sum(d > 0 for d in diffs), sum(d == 0 for d in diffs)
                body.append(
                    [
                        t.upper(),
                        f"{reference} - {m}",
                        f"{mu:+.1f} ± {sd:.1f} ({n})",
                        f"{wins} / {ties} / {n - wins - ties}",
                    ]
                )
    return md_table(["task", "difference", "mean ± std (sets)", "higher / same / lower"], body) if body else ""


def component_table(rows: list[dict[str, Any]], tasks: list[str], methods: list[str]) -> str:
    """Mean of each test metric behind a composite score (tasks whose rows carry more than ``score``)."""
    names = {
        t: sorted({k for r in rows if r["task"] == t for k in (r.get("test") or {}) if k != "score"}) for t in tasks
    }
    columns = [(t, k) for t in tasks if len(names[t]) > 1 for k in names[t]]
    if not columns:
        return ""
    body = []
    for m in methods:
        line = [f"**{m}**"]
        for t, k in columns:
            cell = [r for r in rows if r["task"] == t and r["method"] == m and k in r.get("test", {})]
            mu, _, n = mean_std(r["test"][k] for r in cell)
            line.append(f"{mu:.1f}" if n else "–")
        body.append(line)
    return md_table(["method", *[f"{t.upper()} {k.replace('_', '-')}" for t, k in columns]], body)


def plot_quality(agg: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, _ = latest_rows(rows, ("task", "method", "seed"))
    tasks, methods = agg["tasks"], agg["methods"]
    ncols = min(4, len(tasks))
    nrows = (len(tasks) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        for i, m in enumerate(methods):
            vals = [float(r["test_score"]) for r in rows if r["task"] == t and r["method"] == m]
            if not vals:
                continue
            mu, sd, _ = agg["cells"][(t, m)]
            color = "C3" if m == "sam" else ("C0" if m == "full" else "C7")
            ax.bar(i, mu, color=color, alpha=0.35, width=0.7)
            ax.errorbar(i, mu, yerr=sd, color=color, capsize=3, lw=1.2)
            ax.scatter([i] * len(vals), vals, s=9, color=color, zorder=3)
        ax.set_title(TASK_TITLES.get(t, t), fontsize=10)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=8)
        lo = min((float(r["test_score"]) for r in rows if r["task"] == t), default=0.0)
        ax.set_ylim(max(0.0, lo - 10.0) if lo > 0 else lo - 5.0, None)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    fig.suptitle("Test score per method (bar: mean, whisker: std, dots: seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_perturbation(agg: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, methods = agg["tasks"], agg["methods"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(5.5, 4.0 * len(tasks)), 3.4), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        data = [agg["scores"].get((t, m), []) for m in methods]
        keep = [i for i, d in enumerate(data) if d]
        ax.boxplot([data[i] for i in keep], positions=keep, widths=0.6)
        for i in keep:
            ax.scatter([i] * len(data[i]), data[i], s=9, color="C3" if methods[i] == "sam" else "C0", zorder=3)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods)
        ax.set_title(TASK_TITLES.get(t, t), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Test score over training sets with a random 10 % removed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="reads and writes here")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    res = Path(args.results_dir)
    found = False
    for name, build, plot in (
        ("quality", quality_table, "quality"),
        ("perturbation", perturbation_table, "perturbation"),
    ):
        rows = read_jsonl(res / f"{name}.jsonl")
        if not rows:
            continue
        found = True
        md, agg = build(rows)
        (res / f"{name}.md").write_text(md, encoding="utf-8")
        print(md)
        if not args.no_plots:
            png = res / f"{name}.png"
            if plot == "quality":
                plot_quality(agg, rows, png)
            else:
                plot_perturbation(agg, png)
            print(f"(plot: {png})\n")
    if not found:
        print(f"no quality.jsonl / perturbation.jsonl rows in {res}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
