"""Learning-rate sweep: each method at the rate its own validation score picks (issue 17, SPEC section 8).

A rate guessed once per method moves a method by more than the gaps between methods, so before any comparison
each method trains at every rate of its grid (``LR_GRIDS``: 5 rates spanning a factor of ~20 around the method
table's default) on the quality protocol (``quality.make_config``: same tasks, epochs, batch, p, seed handling),
one seed. Selection reads the **validation** split only: the runs are made with ``evaluate_test=False``, so the
official dev file (the test split) is never opened. The chosen rate of a method is the one with the best mean
validation score over the swept tasks (ties: the smaller rate); a method gets a choice only once every rate of
its grid has a row on every task.

Rows go to ``results/lr_sweep.jsonl`` (one per task, method, rate; resumable like the quality grid, and a rate's
row has the config hash the quality grid gives the same run). ``--report`` writes ``results/lr_sweep.md`` (the
validation score of every rate tried, the choice per method) and ``results/lr_sweep.png``.

    python benchmarks/lr_sweep.py                              # CB and RTE; full, SAM, LoRA, MPO, CaliSr-S(LoRA)
    python benchmarks/lr_sweep.py --tasks cb --methods sam,lora
    python benchmarks/lr_sweep.py --workers 8                  # 8 processes share the sweep (e.g. on one GPU)
    python benchmarks/lr_sweep.py --dry-run                    # list the runs (done / to do)
    python benchmarks/lr_sweep.py --report                     # table + plot from the JSONL
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, machine_info, md_table, read_jsonl  # noqa: E402

# Per method, the rates tried: ~20x around the method table's default (CaliSr: its wrapped adapter's rate; its
# W_extra trains at full fine-tuning's rate, as in the quality grid).
_SPARSE = (2e-4, 5e-4, 1e-3, 2e-3, 5e-3)
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "full": (5e-6, 1e-5, 2e-5, 5e-5, 1e-4),
    "sam": _SPARSE,
    "fisher": _SPARSE,
    "magnitude": _SPARSE,
    "random": _SPARSE,
    "bitfit": _SPARSE,
    "supertuning": _SPARSE,
    "lora": _SPARSE,
    "lora_qv": _SPARSE,
    "adalora": _SPARSE,
    "shira": _SPARSE,
    "adapter": _SPARSE,
    "mpo": (1e-4, 2e-4, 5e-4, 1e-3, 2e-3),
    "ia3": (1e-3, 2e-3, 5e-3, 1e-2, 2e-2),
    "prefix": (1e-3, 2e-3, 5e-3, 1e-2, 2e-2),
    "calisr_lora_s": _SPARSE,
    "calisr_lora_d": _SPARSE,
    "calisr_mpo_s": (1e-4, 2e-4, 5e-4, 1e-3, 2e-3),
    "calisr_sam_s": _SPARSE,
}
# the five methods the README ranks; two tasks of different size
SWEEP: dict[str, Any] = {"tasks": ["cb", "rte"], "methods": ["full", "sam", "lora", "mpo", "calisr_lora_s"], "seed": 0}
OUT = RESULTS_DIR / "lr_sweep.jsonl"


def plan_sweep(tasks: list[str], methods: list[str], seed: int) -> list[dict[str, Any]]:
    """Sweep cells (the quality grid's cells, each with its own ``lr``), cheap tasks first."""
    from quality import plan

    cells = []
    for cell in plan(tasks, methods, [seed], perturb=False):
        cells += [{**cell, "lr": lr} for lr in LR_GRIDS[cell["method"]]]
    return cells


def val_scores(rows: list[dict[str, Any]]) -> dict[tuple[str, str, float], float]:
    """(task, method, lr) -> validation score of the best validation step (the last row of a cell wins)."""
    return {(r["task"], r["method"], float(r["lr"])): float(r["val_score"]) for r in rows}


def choose(rows: list[dict[str, Any]], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: mean validation score over ``tasks`` for each rate; the chosen rate (None until complete)."""
    scores = val_scores(rows)
    out: dict[str, dict[str, Any]] = {}
    for method in sorted({m for _, m, _ in scores}, key=lambda m: list(LR_GRIDS).index(m) if m in LR_GRIDS else 99):
        grid = LR_GRIDS.get(method, ())
        means = {}
        for lr in grid:
            vals = [scores.get((t, method, lr)) for t in tasks]
            if all(v is not None for v in vals):
                means[lr] = sum(vals) / len(vals)
        complete = bool(grid) and len(means) == len(grid)
        best = max(means, key=lambda lr: (means[lr], -lr)) if complete else None
        out[method] = {"means": means, "chosen": best, "complete": complete}
    return out


def sweep_hash(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    """Identifies a sweep's outcome: its tasks, the chosen rates and the configurations of the rows they rest on."""
    from common import config_hash

    chosen = {m: info["chosen"] for m, info in choose(rows, tasks).items() if info["complete"]}
    return config_hash({"tasks": tasks, "chosen": chosen, "rows": sorted(r["config_hash"] for r in rows)})


def lr_source(method: str, lr: float, path: Path = OUT, tasks: list[str] | None = None) -> str:
    """What a quality row's rate rests on: ``lr_sweep:<hash>`` when the committed sweep chose ``lr`` for ``method``,
    else ``a priori`` (a rate set by hand)."""
    tasks = tasks or SWEEP["tasks"]
    rows = read_jsonl(path)
    info = choose(rows, tasks).get(method)
    if info and info["complete"] and math.isclose(info["chosen"], lr):
        return f"lr_sweep:{sweep_hash(rows, tasks)}"
    return "a priori"


def _default_lr(method: str) -> float:
    from quality import learning_rate

    return learning_rate(method)


def validation_sizes(tasks: list[str], seed: int = 42) -> dict[str, int]:
    """Examples in each task's validation split (the quality protocol's 10 % of the official train file)."""
    from glue.data import load_task

    return {t: len(load_task(t, seed=seed, include_test=False)["val"]) for t in tasks}


def sweep_markdown(rows: list[dict[str, Any]], tasks: list[str], val_sizes: dict[str, int] | None = None) -> str:
    """The validation score of every rate tried, per task, and the choice per method."""
    scores = val_scores(rows)
    choice = choose(rows, tasks)
    lines = [
        "## Learning-rate sweep (validation score; the test split is never read)",
        "",
        f"One seed; {len(rows)} runs; tasks {', '.join(tasks)}. A method's rate is chosen by its mean validation score "
        "over the tasks (ties: the smaller rate) once every rate of its grid has run on every task. `*`: the method "
        "table's rate when the sweep ran.",
        "",
    ]
    if val_sizes:
        sizes = ", ".join(f"{t} {n}" for t, n in val_sizes.items())
        lines += [
            f"Validation examples: {sizes}. On a split of n examples one prediction moves accuracy by 100/n points, "
            "so on a small split several rates tie and the choice rests on a few examples.",
            "",
        ]
    body = []
    for method, info in choice.items():
        grid = LR_GRIDS.get(method, ())
        default = _default_lr(method)
        for task in [*tasks, "mean"]:
            cells = []
            for lr in grid:
                v = info["means"].get(lr) if task == "mean" else scores.get((task, method, lr))
                text = "–" if v is None else f"{v:.1f}"
                if task == "mean" and lr == info["chosen"]:
                    text = f"**{text}**"
                cells.append(f"{lr:g}{'*' if math.isclose(lr, default) else ''}: {text}")
            chosen = f"{info['chosen']:g}" if info["chosen"] is not None else "(incomplete)"
            body.append([method if task == tasks[0] else "", task, *cells, chosen if task == "mean" else ""])
    width = max((len(LR_GRIDS.get(m, ())) for m in choice), default=0)
    lines.append(md_table(["method", "task", *[f"rate {i + 1}" for i in range(width)], "chosen"], body))
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    """Validation score against learning rate (log axis), one panel per task and one for the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = val_scores(rows)
    choice = choose(rows, tasks)
    panels = [*tasks, "mean"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(choice)}  # one colour per method in every panel
    for ax, task in zip(axes[0], panels, strict=True):
        for method, info in choice.items():
            pts = (
                sorted(info["means"].items())
                if task == "mean"
                else sorted((lr, v) for (t, m, lr), v in scores.items() if t == task and m == method)
            )
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[method])
            if task == "mean" and info["chosen"] is not None:
                ax.plot([info["chosen"]], [info["means"][info["chosen"]]], marker="*", ms=14, color=colors[method])
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"{task} (validation)" if task != "mean" else "mean over tasks (star: chosen)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation score")
    handles = [plt.Line2D([], [], color=c, marker="o", label=m) for m, c in colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path, tasks: list[str]) -> str:
    rows = read_jsonl(out)
    split_seeds = {r["config"]["split_seed"] for r in rows}
    sizes = validation_sizes(tasks, seed=split_seeds.pop()) if len(split_seeds) == 1 else None
    md = sweep_markdown(rows, tasks, sizes)
    out.with_suffix(".md").write_text(md)
    if rows:
        plot_sweep(rows, tasks, out.with_suffix(".png"))
    return md


def main(argv: list[str] | None = None) -> int:
    from quality import _csv, _run_workers, grid_methods, run_grid

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", help=f"comma-separated (default: {','.join(SWEEP['tasks'])})")
    parser.add_argument("--methods", help=f"comma-separated (default: {','.join(SWEEP['methods'])})")
    parser.add_argument("--seed", type=int, default=SWEEP["seed"])
    parser.add_argument("--out", help="JSONL file (default: benchmarks/results/lr_sweep.jsonl)")
    parser.add_argument("--model", help="hub id or path (default: the packaged MiniLM)")
    parser.add_argument("--data-dir")
    parser.add_argument("--max-train-samples", type=int, help="smoke runs only (changes the config hash)")
    parser.add_argument("--max-eval-samples", type=int, help="smoke runs only (changes the config hash)")
    parser.add_argument("--max-steps", type=int, help="smoke runs only (changes the config hash)")
    parser.add_argument("--num-calibration-batches", type=int, help="smoke runs only (changes the config hash)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, do nothing")
    parser.add_argument("--report", action="store_true", help="only write lr_sweep.md / .png from the JSONL")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the sweep")
    parser.add_argument("--claim-dir", help="with --workers: folder of the cells' claims (default: a fresh one)")
    args = parser.parse_args(argv)

    tasks = _csv(args.tasks) or SWEEP["tasks"]
    methods = _csv(args.methods) or SWEEP["methods"]
    for m in methods:
        if m not in grid_methods() or m not in LR_GRIDS:
            parser.error(f"no learning-rate grid for {m!r}; choose from {sorted(LR_GRIDS)}")
    smoke = [args.max_train_samples, args.max_eval_samples, args.max_steps, args.num_calibration_batches, args.model]
    if any(v is not None for v in smoke) and not args.out and not args.report:
        parser.error(
            "smoke-run flags (--max-*, --num-calibration-batches, --model) need --out: the committed sweep "
            "file holds the protocol's runs only (choose() reads the last row per task, method and rate)"
        )
    out = Path(args.out) if args.out else OUT
    if args.report:
        print(report(out, tasks))
        return 0
    if args.workers > 1 and not args.dry_run:
        code = _run_workers(args.workers, argv if argv is not None else sys.argv[1:], args.claim_dir, Path(__file__))
        report(out, tasks)
        return code
    overrides = {
        "evaluate_test": False,  # selection by validation only: the test split is never opened
        "max_train_samples": args.max_train_samples,
        "max_eval_samples": args.max_eval_samples,
        "max_steps": args.max_steps,
        "num_calibration_batches": args.num_calibration_batches,
    }
    print(f"machine: {machine_info()}", flush=True)
    counts = run_grid(
        plan_sweep(tasks, methods, args.seed),
        out,
        tier="lr_sweep",
        model=args.model,
        data_dir=args.data_dir,
        overrides=overrides,
        dry_run=args.dry_run,
        claim_dir=Path(args.claim_dir) if args.claim_dir else None,
        log=lambda s: print(s, flush=True),
    )
    print(f"finished: {counts}", flush=True)
    if not args.dry_run and args.claim_dir is None:
        report(out, tasks)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
