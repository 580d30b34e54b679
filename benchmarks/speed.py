"""Speed and memory of every method on MiniLM: train step, peak memory, adapter size, calibration, inference.

All step timings come from ONE process on identical batches (RTE training batches of 16, max_length 128,
dynamic padding): every method's model is built first, then the methods take turns, round by round in a
shuffled order, so background load hits all of them alike; warm-up rounds are excluded and the median step is
reported. A train step is forward + backward + AdamW step (+ AdaLoRA's ``update_and_allocate``).

Peak memory is measured in a fresh subprocess per method (``--memory-worker``): on a CPU the process's RSS
high-water mark (``VmHWM``, reset via ``/proc/self/clear_refs`` after loading the base model and batches,
glibc told to return freed blocks at once); on a GPU ``torch.cuda.max_memory_allocated``. Reported: the
absolute peak during training and the increase over the loaded base model (what the method adds: trainable
copies, gradients, optimizer state, activations, temporaries).

Also: trainable parameters, adapter file bytes (``save_pretrained``), SAM/fisher calibration time per batch,
inference time of the merged model (``merge_and_unload``) against the base model, and of the unmerged adapter.
Ratios are to full fine-tuning and to LoRA r=8 on every Linear (``lora``).

    python benchmarks/speed.py                       # -> benchmarks/results/speed.jsonl + speed.md
    python benchmarks/speed.py --methods full,lora,sam --rounds 4
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BERT_BASE_RANDOM,
    RESULTS_DIR,
    MemoryMeter,
    append_jsonl,
    fmt,
    interleaved_times,
    load_classifier,
    machine_info,
    machine_line,
    md_table,
    median,
    mib,
    model_label,
    quantile,
    resolve_device,
    return_freed_memory_to_os,
    run_json_worker,
    sync,
    timed,
    tokenizer_source,
)

TASK = "rte"
# step time / full fine-tuning measured on this project's CPU before (SPEC section 8), for comparison
SPEC_ANCHORS = {"lora_qv": 0.67, "lora": 0.81, "ia3": 0.67, "prefix": 0.72, "shira": 0.87, "supertuning": 0.85}
TARGETS = {"sam_step_vs_full": 0.72, "sam_peak_vs_lora": 1.05, "merged_vs_base": 1.00}


# ---------------------------------------------------------------------------------------------------- set-up
def load_batches(model_path: str, num_batches: int, batch_size: int, max_length: int, data_dir: str | None):
    """``num_batches`` fixed RTE training batches (seeded choice of rows, dynamic padding)."""
    import datasets
    from glue import get_collator, load_task, tokenize_task
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(model_path))
    train = load_task(TASK, data_dir)["train"]
    rows = train.shuffle(seed=0).select(range(min(len(train), num_batches * batch_size)))
    data = tokenize_task(datasets.DatasetDict({"train": rows}), tokenizer, TASK, max_length=max_length)["train"]
    collate = get_collator(TASK, tokenizer)
    return [
        collate([data[j] for j in range(i, min(i + batch_size, len(data)))]) for i in range(0, len(data), batch_size)
    ]


def load_base(model_path: str):
    return load_classifier(model_path, num_labels=2)  # same task head for every method


def to_device(batches: list[dict], device: str) -> list[dict]:
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def build(method: str, base, batches: list[dict], args) -> tuple[Any, dict[str, Any], list]:
    """Wrap ``base`` (in place) for ``method``; calibrate SAM/fisher on ``args.calib_batches`` batches."""
    from glue import build_peft_model

    import peft_sam

    t0 = time.perf_counter()
    model, info = build_peft_model(
        method,
        base,
        TASK,
        p=args.p,
        seed=0,
        num_calibration_batches=args.calib_batches,
        total_steps=args.adalora_total_steps,
    )
    meta: dict[str, Any] = {"build_seconds": time.perf_counter() - t0, "calibration_seconds_per_batch": None}
    if info.needs_calibration:
        stream = (batches[i % len(batches)] for i in range(args.calib_batches))
        sync(args.device)
        t0 = time.perf_counter()
        sel = peft_sam.select_parameters(model, stream, num_batches=args.calib_batches, show_progress=False)
        sync(args.device)
        meta["calibration_seconds_per_batch"] = (time.perf_counter() - t0) / sel.num_batches
        meta["calibration_batches"] = sel.num_batches
    params = []
    for prm in {id(p): p for p in model.parameters()}.values():
        if prm.requires_grad and prm.numel() == 0:
            prm.requires_grad_(False)  # as the training loop does (e.g. BitFit's empty weight slots)
        if prm.requires_grad:
            params.append(prm)
    meta["trainable_params"] = sum(p.numel() for p in params)
    meta["total_params"] = info.total_params
    meta["needs_update_and_allocate"] = info.needs_update_and_allocate
    return model, meta, params


def make_step(model, params: list, lr: float, update_and_allocate: bool, device: str) -> Callable[[dict], float]:
    """A closure running one train step on a batch and returning its wall time in seconds."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    counter = {"step": 0}

    def train_step(batch: dict) -> None:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        if update_and_allocate:
            model.base_model.update_and_allocate(counter["step"])
        optimizer.zero_grad(set_to_none=True)
        counter["step"] += 1

    def step(batch: dict) -> float:
        return timed(lambda: train_step(batch), device)

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def adapter_bytes(model, is_peft: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="peft_sam_speed_") as tmp:
        model.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).iterdir() if f.suffix in (".safetensors", ".bin"))


def merged_copy(model, is_peft: bool):
    """``merge_and_unload`` of a copy (None where the method cannot merge, e.g. prefix tuning)."""
    if not is_peft:
        return copy.deepcopy(model)
    try:
        return copy.deepcopy(model).merge_and_unload()
    except Exception:  # noqa: BLE001 - PEFT raises different errors for non-mergeable adapters
        return None


def time_forward(model, batch: dict, device: str) -> float:
    import torch

    def forward() -> None:
        with torch.inference_mode():
            model(**batch)

    return timed(forward, device)


# ---------------------------------------------------------------------------------------- memory (subprocess)
def memory_worker(method: str, args) -> dict[str, Any]:
    """Peak memory of ``method`` in this (fresh) process; see the module docstring."""
    return_freed_memory_to_os()
    from glue import METHODS

    device = args.device
    meter = MemoryMeter(device)
    batches = to_device(
        load_batches(args.model, args.num_batches, args.batch_size, args.max_length, args.data_dir), device
    )
    base = load_base(args.model).to(device)
    baseline = meter.reset()
    model, meta, params = build(method, base, batches, args)
    build_peak = meter.peak()
    meter.reset()
    step = make_step(model, params, METHODS[method].default_lr, meta["needs_update_and_allocate"], device)
    steps = 0
    for _ in range(args.memory_steps):
        for batch in batches:
            step(batch)
            steps += 1
    peak = meter.peak()
    return {
        "method": method,
        "meter": meter.kind,
        "baseline_bytes": baseline,
        "build_peak_bytes": build_peak,
        "train_peak_bytes": peak,
        "train_peak_delta_bytes": peak - baseline,
        "memory_steps": steps,
    }


def run_memory_worker(method: str, args) -> dict[str, Any] | None:
    argv = [
        "--memory-worker", method,
        "--model", args.model, "--device", args.device, "--num-batches", str(args.num_batches),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--p", str(args.p),
        "--calib-batches", str(args.calib_batches), "--memory-steps", str(args.memory_steps),
        "--adalora-total-steps", str(args.adalora_total_steps),
    ]  # fmt: skip
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return run_json_worker(
        Path(__file__).resolve(), argv, f"memory worker for {method}", env={"TOKENIZERS_PARALLELISM": "false"}
    )


# ------------------------------------------------------------------------------------------------------ main
def run(args) -> list[dict[str, Any]]:
    import torch
    from glue import METHODS

    say = lambda s: print(s, flush=True)  # noqa: E731
    info = machine_info()
    say(f"machine: {machine_line(info)}")
    device = args.device
    batches = to_device(
        load_batches(args.model, args.num_batches, args.batch_size, args.max_length, args.data_dir), device
    )
    lengths = [int(b["input_ids"].shape[1]) for b in batches]
    say(f"{len(batches)} batches of {args.batch_size}, padded lengths {lengths}")
    base = load_base(args.model).to(device)

    # ---- build every method (SAM/fisher calibration timed here)
    models: dict[str, Any] = {}
    metas: dict[str, dict[str, Any]] = {}
    steps: dict[str, Callable] = {}
    for m in args.methods:
        model, meta, params = build(m, copy.deepcopy(base), batches, args)
        meta["is_peft"] = m != "full"
        models[m], metas[m] = model, meta
        steps[m] = make_step(model, params, METHODS[m].default_lr, meta["needs_update_and_allocate"], device)
        calib = meta["calibration_seconds_per_batch"]
        say(
            f"built {m}: {meta['trainable_params']:,} trainable"
            + (f"; calibration {calib * 1000:.0f} ms/batch" if calib else "")
        )

    # ---- train steps, interleaved
    rng = random.Random(0)
    t_start = time.perf_counter()
    times = interleaved_times(
        args.methods,
        lambda m: [steps[m](batch) for batch in batches],
        rounds=args.rounds,
        warmup=args.warmup,
        rng=rng,
        after_round=lambda r: say(
            f"round {r + 1}/{args.warmup + args.rounds}{' (warm-up)' if r < args.warmup else ''} done"
        ),
    )
    train_wall = time.perf_counter() - t_start
    for m in args.methods:
        steps[m].optimizer.state.clear()  # type: ignore[attr-defined]
    steps.clear()

    # ---- adapter bytes
    for m in args.methods:
        metas[m]["adapter_bytes"] = adapter_bytes(models[m], metas[m]["is_peft"])

    # ---- inference: base vs merged vs unmerged adapter, interleaved
    runners: dict[str, Any] = {"base": copy.deepcopy(base).eval()}
    for m in args.methods:
        merged = merged_copy(models[m], metas[m]["is_peft"])
        if merged is not None:
            runners[f"merged:{m}"] = merged.eval()
        if metas[m]["is_peft"]:
            runners[f"adapter:{m}"] = models[m].eval()
    with torch.inference_mode():
        inf_times = interleaved_times(
            list(runners),
            lambda k: [time_forward(runners[k], batch, device) for batch in batches],
            rounds=args.rounds,
            warmup=args.warmup,
            rng=rng,
        )
    runners.clear()
    models.clear()

    # ---- memory, one fresh process per method
    mem: dict[str, dict[str, Any] | None] = {}
    if args.memory == "subprocess":
        for m in args.memory_methods or args.methods:
            say(f"memory: {m}")
            mem[m] = run_memory_worker(m, args)

    end_load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    base_inf = median(inf_times["base"])
    rows = []
    for m in args.methods:
        meta = metas[m]
        mm = mem.get(m) or {}
        rows.append(
            {
                "method": m,
                "device": device,
                "step_seconds_median": median(times[m]),
                "step_seconds_p25": quantile(times[m], 0.25),
                "step_seconds_p75": quantile(times[m], 0.75),
                "steps_timed": len(times[m]),
                "trainable_params": meta["trainable_params"],
                "total_params": meta["total_params"],
                "adapter_bytes": meta["adapter_bytes"],
                "calibration_seconds_per_batch": meta["calibration_seconds_per_batch"],
                "inference_base_seconds": base_inf,
                "inference_merged_seconds": median(inf_times[f"merged:{m}"]) if f"merged:{m}" in inf_times else None,
                "inference_adapter_seconds": median(inf_times[f"adapter:{m}"]) if f"adapter:{m}" in inf_times else None,
                "memory_meter": mm.get("meter"),
                "peak_bytes": mm.get("train_peak_bytes"),
                "peak_delta_bytes": mm.get("train_peak_delta_bytes"),
                "baseline_bytes": mm.get("baseline_bytes"),
                "build_peak_bytes": mm.get("build_peak_bytes"),
            }
        )
    by = {r["method"]: r for r in rows}
    for r in rows:
        for ref in ("full", "lora"):
            if ref not in by:
                continue
            r[f"step_vs_{ref}"] = r["step_seconds_median"] / by[ref]["step_seconds_median"]
            for key in ("peak_bytes", "peak_delta_bytes"):
                a, b = r.get(key), by[ref].get(key)
                r[f"{key.removesuffix('_bytes')}_vs_{ref}"] = a / b if a and b else None
        merged = r["inference_merged_seconds"]
        r["merged_vs_base"] = merged / base_inf if merged else None
        r["adapter_vs_base"] = r["inference_adapter_seconds"] / base_inf if r["inference_adapter_seconds"] else None
    run_info = {
        **info,
        "loadavg_end": [round(x, 2) for x in end_load] if end_load else None,
        "model": model_label(args.model),
        "task": TASK,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "padded_lengths": lengths,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "calib_batches": args.calib_batches,
        "p": args.p,
        "train_wall_seconds": train_wall,
    }
    for r in rows:
        r["run"] = run_info
    return rows


def render_markdown(rows: list[dict[str, Any]]) -> str:
    info = rows[0]["run"]
    by = {r["method"]: r for r in rows}
    have_full, have_lora = "full" in by, "lora" in by
    body = []
    for r in rows:
        body.append(
            [
                f"**{r['method']}**",
                f"{r['trainable_params']:,}",
                fmt(100 * r["trainable_params"] / r["total_params"], 3),
                fmt(r["adapter_bytes"] / 2**20, 2) if r["adapter_bytes"] else "n/a",
                f"{r['step_seconds_median'] * 1000:.0f} ({r['step_seconds_p25'] * 1000:.0f}–"
                f"{r['step_seconds_p75'] * 1000:.0f})",
                fmt(r.get("step_vs_full")) if have_full else "n/a",
                fmt(r.get("step_vs_lora")) if have_lora else "n/a",
                fmt(SPEC_ANCHORS.get(r["method"])),
                fmt(mib(r["peak_bytes"]), 0),
                fmt(mib(r["peak_delta_bytes"]), 0),
                fmt(r.get("peak_vs_full")),
                fmt(r.get("peak_vs_lora")),
                fmt(r.get("peak_delta_vs_lora")),
                fmt(r["calibration_seconds_per_batch"] * 1000, 0) if r["calibration_seconds_per_batch"] else "–",
                fmt(r.get("merged_vs_base")),
                fmt(r.get("adapter_vs_base")),
            ]
        )
    header = [
        "method", "trainable", "%", "adapter MiB", "step ms median (IQR)", "step / full", "step / LoRA",
        "SPEC anchor step / full", "peak MiB", "Δ peak MiB", "peak / full", "peak / LoRA", "Δ peak / LoRA Δ",
        "calib ms / batch", "merged inf / base", "unmerged inf / base",
    ]  # fmt: skip
    mem_kind = rows[0].get("memory_meter") or "not measured"
    lines = [
        "## Speed and memory (MiniLM, RTE train batches)",
        "",
        f"Measured {machine_line(info)}; load average at the end {info.get('loadavg_end')}.",
        f"Model {info['model']}, device {rows[0]['device']}, batches of {info['batch_size']} "
        f"(padded lengths {info['padded_lengths']}, max_length {info['max_length']}), p = {info['p']}. "
        f"Step = forward + backward + AdamW step; median over {info['rounds']} interleaved rounds × "
        f"{len(info['padded_lengths'])} batches after {info['warmup_rounds']} warm-up rounds "
        f"(methods in a shuffled order each round). Peak memory ({mem_kind}): a fresh process per method; "
        "'peak' = absolute high-water mark while training, 'Δ peak' = that minus the process after loading the "
        f"base model and batches. SAM/fisher calibration timed over {info['calib_batches']} batches. Inference: "
        "forward of the merged model (merge_and_unload) / of the unmerged adapter, over the base model's forward "
        "on the same batches, interleaved.",
        "",
        md_table(header, body),
        "",
    ]
    if "sam" in by:
        sam = by["sam"]
        checks = []
        if have_full:
            v = sam["step_vs_full"]
            checks.append(
                f"- SAM step ≤ {TARGETS['sam_step_vs_full']:.2f}× full FT: measured {v:.2f}× — "
                f"**{'met' if v <= TARGETS['sam_step_vs_full'] else 'NOT met'}**."
            )
        if have_lora and sam.get("peak_vs_lora"):
            v, d = sam["peak_vs_lora"], sam.get("peak_delta_vs_lora")
            checks.append(
                f"- SAM peak memory ≤ LoRA(all linear) + 5 %: absolute peak {v:.3f}× — "
                f"**{'met' if v <= TARGETS['sam_peak_vs_lora'] else 'NOT met'}**; on the increase over the loaded "
                f"base model {fmt(d, 3)}× — **{'met' if d and d <= TARGETS['sam_peak_vs_lora'] else 'NOT met'}**."
            )
        if sam.get("merged_vs_base"):
            v = sam["merged_vs_base"]
            checks.append(
                f"- Merged SAM inference = 1.00× base: measured {v:.2f}× (a merged SAM model is the plain base "
                "architecture, so any difference is timing noise)."
            )
        if checks:
            lines += ["### Targets of the issue", "", *checks, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from glue import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help=f"comma-separated (default: all of {list(METHODS)})")
    parser.add_argument("--model", help=f"default: the packaged MiniLM; {BERT_BASE_RANDOM!r}: a random bert-base size")
    parser.add_argument("--data-dir")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--num-batches", type=int, default=4, help="distinct batches per round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds")
    parser.add_argument("--p", type=float, default=0.005)
    parser.add_argument("--calib-batches", type=int, default=20, help="SAM/fisher calibration batches (timed)")
    parser.add_argument("--adalora-total-steps", type=int, default=423, help="AdaLoRA schedule (RTE, 3 epochs)")
    parser.add_argument("--memory", choices=["subprocess", "none"], default="subprocess")
    parser.add_argument("--memory-steps", type=int, default=2, help="passes over the batches per memory worker")
    parser.add_argument("--memory-methods", help="comma-separated subset measured for memory (default: --methods)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.model is None:
        from glue.training import default_model_path

        args.model = default_model_path()
    args.device = resolve_device(args.device)

    if args.memory_worker:
        result = memory_worker(args.memory_worker, args)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    args.methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    args.memory_methods = [m.strip() for m in args.memory_methods.split(",")] if args.memory_methods else None
    for m in args.methods + (args.memory_methods or []):
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {sorted(METHODS)}")
    rows = run(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in rows:
        append_jsonl(out_dir / "speed.jsonl", r)
    md = render_markdown(rows)
    (out_dir / "speed.md").write_text(md, encoding="utf-8")
    print(md)
    if any(math.isnan(r["step_seconds_median"]) for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
