"""Step time and peak memory of ONE square Linear layer against width and trained fraction p.

Per width d (default 256 ... 4096) a layer y = x W^T + b with x of N = 2048 tokens (x needs a gradient, as
inside a network) is trained for a few steps: forward, ``y.backward(g)`` with a fixed g, AdamW step. Variants:

* ``sam``: a SAM layer (``peft_sam.SAMConfig`` on the Linear's weight; W0 + Delta kept in the weight, the entries'
  gradient by a sampled product) with K = int(p d^2) trained entries (random positions, or ``--mask rows``: all in
  a random quarter of the rows, closer to what gradient selection picks), for every p;
* ``supertuning``: PEFT ``SupertuningConfig(sparsity=1-p)`` (top-|W| entries), for every p;
* ``lora`` (PEFT LoRA r=8, dropout 0) and ``shira`` (PEFT SHiRA r=8), on an ``nn.Sequential(nn.Linear)``;
* ``full``: the dense Linear, every entry trained.

Timing: all variants of one width live in one process and take turns round by round (shuffled order), median
over the timed rounds. Memory: a fresh subprocess per width, each variant measured in turn as the peak RSS
(``VmHWM``) over its build and steps minus the RSS before (x and g already allocated), or
``torch.cuda.max_memory_allocated`` on a GPU.

    python benchmarks/scaling.py                    # -> benchmarks/results/scaling.{jsonl,md,png}
    python benchmarks/scaling.py --widths 256,512 --ps 0.005 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    MemoryMeter,
    append_jsonl,
    fmt,
    interleaved_times,
    machine_info,
    machine_line,
    md_table,
    median,
    read_jsonl,
    resolve_device,
    return_freed_memory_to_os,
    run_json_worker,
    timed,
)

SAM_STRATEGIES = ("gather", "dense", "auto")
PER_P = ["sam", "supertuning"]
PER_WIDTH = ["full", "lora", "shira"]
LR = 1e-3


class Variant:
    """One trainable layer: ``forward(x)`` and the parameters AdamW updates."""

    def __init__(self, name: str, p: float | None, width: int, device: str, mask: str, seed: int = 0) -> None:
        import torch
        from torch import nn

        self.name, self.p, self.width = name, p, width
        gen = torch.Generator().manual_seed(seed)
        base = nn.Linear(width, width)
        with torch.no_grad():
            base.weight.copy_(torch.randn(width, width, generator=gen) / math.sqrt(width))
        base = base.to(device)
        self.trainable = 0
        if name == "full":
            self.module = base
            self.params = list(base.parameters())
        elif name == "sam":
            import peft

            import peft_sam

            k = max(1, int(p * width * width))
            if mask == "rows":  # all entries in a random quarter of the rows (gradient masks concentrate)
                rows = torch.randperm(width, generator=gen)[: max(1, width // 4)]
                flat_in_rows = torch.randperm(rows.numel() * width, generator=gen)[:k]
                idx = rows[flat_in_rows // width] * width + flat_in_rows % width
            else:
                idx = torch.randperm(width * width, generator=gen)[:k]
            cfg = peft_sam.SAMConfig(p=p, selection="random", target_modules=["0"], include_bias=False)
            self.module = peft.get_peft_model(nn.Sequential(base), cfg)
            layer = next(m for m in self.module.modules() if isinstance(m, peft_sam.SAMLayer))
            layer.set_entries("default", "weight", idx.to(device))
            self.params = [q for q in self.module.parameters() if q.requires_grad]
        else:
            import peft

            if name == "lora":
                cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["0"])
            elif name == "shira":
                cfg = peft.ShiraConfig(r=8, target_modules=["0"], random_seed=seed)
            elif name == "supertuning":
                cfg = peft.SupertuningConfig(sparsity=1.0 - p, target_modules=["0"])
            else:
                raise ValueError(name)
            self.module = peft.get_peft_model(nn.Sequential(base), cfg)
            self.params = [q for q in self.module.parameters() if q.requires_grad]
        if not hasattr(self, "_forward"):
            self._forward = self.module
        self.trainable = sum(q.numel() for q in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)

    def step(self, x, grad_out) -> None:
        y = self._forward(x)
        y.backward(grad_out)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        x.grad = None


def variant_keys(ps: list[float], extra_ps: list[float], available: set[str]) -> list[tuple[str, float | None]]:
    keys: list[tuple[str, float | None]] = [(n, None) for n in PER_WIDTH if n in available]
    for p in sorted(set(ps) | set(extra_ps)):
        for n in PER_P:
            if n not in available:
                continue
            if p in extra_ps and p not in ps:
                continue
            keys.append((n, p))
    return keys


def _inputs(width: int, tokens: int, device: str):
    import torch

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, width, generator=gen).to(device).requires_grad_(True)
    g = (torch.randn(tokens, width, generator=gen) / tokens).to(device)
    return x, g


def time_width(width: int, keys, args) -> dict[tuple[str, float | None], dict[str, Any]]:
    """Median step time of every variant of one width, interleaved."""
    x, g = _inputs(width, args.tokens, args.device)
    variants = {k: Variant(k[0], k[1], width, args.device, args.mask) for k in keys}
    times = interleaved_times(
        keys,
        lambda k: [timed(lambda: variants[k].step(x, g), args.device)],
        rounds=args.rounds,
        warmup=args.warmup,
        rng=random.Random(width),
    )
    out = {k: {"step_seconds": median(times[k]), "trainable": variants[k].trainable, "n": len(times[k])} for k in keys}
    variants.clear()
    gc.collect()
    return out


def memory_width(width: int, keys, args) -> dict[str, Any]:
    """(In a fresh process) peak memory of each variant over build + ``--memory-steps`` steps, in bytes."""
    return_freed_memory_to_os()
    meter = MemoryMeter(args.device)
    x, g = _inputs(width, args.tokens, args.device)
    result = {}
    for name, p in keys:
        base = meter.reset()
        v = Variant(name, p, width, args.device, args.mask)
        for _ in range(args.memory_steps):
            v.step(x, g)
        result[f"{name}|{p}"] = meter.peak() - base
        del v
        gc.collect()
    return result


def run_memory_subprocess(width: int, args) -> dict[str, Any]:
    argv = [
        "--memory-worker", str(width),
        "--ps", ",".join(map(str, args.ps)), "--crossover-ps", ",".join(map(str, args.crossover_ps)),
        "--tokens", str(args.tokens), "--device", args.device, "--mask", args.mask,
        "--memory-steps", str(args.memory_steps), "--methods", ",".join(args.methods),
    ]  # fmt: skip
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return run_json_worker(Path(__file__).resolve(), argv, f"memory worker for width {width}") or {}


def render(rows: list[dict[str, Any]], info: dict[str, Any], args) -> str:
    widths = sorted({r["width"] for r in rows})
    ps = sorted({r["p"] for r in rows if r["p"] is not None and r["p"] in args.ps})
    p_ref = 0.005 if 0.005 in ps else (ps[0] if ps else None)

    def cell(method, width, p, key, scale):
        for r in rows:
            if r["method"] == method and r["width"] == width and r["p"] == p:
                v = r.get(key)
                return fmt(v * scale if v is not None else None, 1 if scale == 1000 else 1)
        return "–"

    methods_ref = [(m, None) for m in PER_WIDTH] + [(m, p_ref) for m in PER_P]
    present = {(r["method"], r["p"]) for r in rows}
    methods_ref = [k for k in methods_ref if k in present]
    t_time = md_table(
        ["variant", *[str(w) for w in widths]],
        [[f"{m}" + (f" (p={p})" if p is not None else ""), *[cell(m, w, p, "step_seconds", 1000) for w in widths]]
         for m, p in methods_ref],
    )  # fmt: skip
    t_mem = md_table(
        ["variant", *[str(w) for w in widths]],
        [[f"{m}" + (f" (p={p})" if p is not None else ""), *[cell(m, w, p, "peak_bytes", 2**-20) for w in widths]]
         for m, p in methods_ref],
    )  # fmt: skip
    all_p = sorted({r["p"] for r in rows if r["p"] is not None})
    sections = []
    for w in widths:
        body = []
        for p in all_p:
            body.append(
                [str(p), *[cell(m, w, p, "step_seconds", 1000) for m in PER_P],
                 *[cell(m, w, p, "peak_bytes", 2**-20) for m in PER_P]]
            )  # fmt: skip
        sections += [
            f"#### width {w}",
            "",
            md_table(["p", *[f"{m} ms" for m in PER_P], *[f"{m} MiB" for m in PER_P]], body),
            "",
        ]
    lines = [
        "## Scaling of one layer (step time and peak memory)",
        "",
        f"Measured {machine_line(info)}; load average at the end {info.get('loadavg_end')}.",
        f"Square Linear of width d, N = {args.tokens} tokens, x needs a gradient; step = forward + backward + "
        f"AdamW. Median of {args.rounds} interleaved rounds after {args.warmup} warm-up round(s); device "
        f"{args.device}; SAM mask positions: {args.mask}. LoRA r=8 (dropout 0), SHiRA r=8, Super-Tuning "
        "sparsity 1-p (all PEFT on nn.Sequential(Linear)). Peak memory: fresh process per width, increase of the "
        f"{'CUDA allocator peak' if args.device.startswith('cuda') else 'RSS high-water mark'} over build + "
        f"{args.memory_steps} steps, above the process with x and g allocated (so it includes W0).",
        "",
        f"### Step time (ms) against width, p = {p_ref} for the sparse variants",
        "",
        t_time,
        "",
        f"### Peak memory (MiB) against width, p = {p_ref}",
        "",
        t_mem,
        "",
        "### Against p (SAM, Super-Tuning)",
        "",
        *sections,
    ]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, ps: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["width"] for r in rows})
    p_ref = 0.005 if 0.005 in ps else ps[0]
    w_ref = 1024 if 1024 in widths else widths[-1]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    styles = {"full": "k-", "lora": "C0-", "shira": "C1-", "supertuning": "C2-", "sam": "C3-"}
    for col, (key, label, scale) in enumerate(
        (("step_seconds", "step time (ms)", 1000), ("peak_bytes", "peak memory (MiB)", 2**-20))
    ):
        ax = axes[0, col]
        for m, style in styles.items():
            pts = sorted(
                (r["width"], r[key] * scale)
                for r in rows
                if r["method"] == m and r.get(key) is not None and (r["p"] is None or r["p"] == p_ref)
            )
            if pts:
                ax.plot(*zip(*pts), style, marker="o", ms=3, label=m)
        _log_axes(ax, "width d", label, f"{label} vs width (sparse: p = {p_ref})", x_base=2)
        ax = axes[1, col]
        for m, style in styles.items():
            if m in PER_WIDTH:
                vals = [r[key] for r in rows if r["method"] == m and r["width"] == w_ref and r.get(key) is not None]
                if vals:
                    ax.axhline(vals[0] * scale, color=style[:2] if style[0] == "C" else "k", ls="-", lw=0.8, label=m)
                continue
            pts = sorted(
                (r["p"], r[key] * scale)
                for r in rows
                if r["method"] == m and r["width"] == w_ref and r.get(key) is not None
            )
            if pts:
                ax.plot(*zip(*pts), style, marker="o", ms=3, label=m)
        _log_axes(ax, "trained fraction p", label, f"{label} vs p (width {w_ref})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_axes(ax, xlabel: str, ylabel: str, title: str, x_base: float = 10) -> None:
    """Log-log axes with labels, title, grid and legend (every panel of :func:`plot`)."""
    ax.set_xscale("log", base=x_base)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="256,512,1024,2048,4096")
    parser.add_argument("--ps", default="0.001,0.005,0.01,0.05,0.1")
    parser.add_argument("--crossover-ps", default="", help="extra p values (sparse variants only)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--methods", default=",".join(PER_WIDTH + PER_P))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory", choices=["subprocess", "none"], default="subprocess")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--mask", choices=["uniform", "rows"], default="uniform")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--tag", default="", help="suffix of the output names (scaling<tag>.md ...)")
    parser.add_argument("--render-only", action="store_true", help="only rebuild scaling.md/.png from the JSONL")
    parser.add_argument("--memory-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    args.widths = [int(w) for w in args.widths.split(",")]
    args.ps = _floats(args.ps)
    args.crossover_ps = _floats(args.crossover_ps) if args.crossover_ps else []
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        import peft

        if not hasattr(peft, "SupertuningConfig") and "supertuning" in args.methods:
            args.methods.remove("supertuning")
            print("Super-Tuning not available in this PEFT; skipped", flush=True)
    except ImportError:
        pass
    keys = variant_keys(args.ps, args.crossover_ps, set(args.methods))

    if args.memory_worker:
        Path(args.worker_out).write_text(json.dumps(memory_width(args.memory_worker, keys, args)))
        return 0

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"scaling{args.tag}.jsonl"
    info = machine_info()
    if not args.render_only:
        print(f"machine: {machine_line(info)}", flush=True)
        for width in args.widths:
            t0 = time.perf_counter()
            timed = time_width(width, keys, args)
            mem = run_memory_subprocess(width, args) if args.memory == "subprocess" else {}
            run = {**info, "loadavg_end": [round(v, 2) for v in os.getloadavg()]}
            for (name, p), res in timed.items():  # written per width: an interrupted run keeps what it did
                append_jsonl(
                    jsonl,
                    {
                        "width": width,
                        "method": name,
                        "p": p,
                        "tokens": args.tokens,
                        "mask": args.mask,
                        "device": args.device,
                        "step_seconds": res["step_seconds"],
                        "trainable": res["trainable"],
                        "rounds": res["n"],
                        "warmup": args.warmup,
                        "peak_bytes": mem.get(f"{name}|{p}"),
                        "run": run,
                    },
                )
            summary = ", ".join(
                f"{n}{'' if p is None else f'@{p}'} {timed[(n, p)]['step_seconds'] * 1000:.1f}ms"
                for n, p in keys
                if p in (None, 0.005)
            )
            print(f"width {width} ({time.perf_counter() - t0:.0f} s): {summary}", flush=True)
    # the report covers every width in the JSONL (newest row per width/variant/p), so runs can be split
    latest: dict[tuple, dict[str, Any]] = {}
    for r in read_jsonl(jsonl):
        if r.get("mask") == args.mask and r.get("tokens") == args.tokens:
            latest[(r["width"], r["method"], r["p"])] = r
    if args.render_only and latest:  # describe the rows as they were measured, not this call's flags
        first = next(iter(latest.values()))
        args.device, args.rounds = first["device"], first["rounds"]
        args.warmup = first.get("warmup", "(not recorded)")
    rows = sorted(latest.values(), key=lambda r: (r["width"], r["method"], r["p"] or 0.0))
    if not rows:
        print(f"no rows in {jsonl}")
        return 1
    runs = {r["run"]["date"]: r["run"] for r in rows}
    info = runs[max(runs)]
    if len(runs) > 1:
        info = {**info, "date": " / ".join(sorted(runs))}
    info["loadavg_end"] = sorted({str(r["run"].get("loadavg_end")) for r in rows})
    md = render(rows, info, args)
    (out / f"scaling{args.tag}.md").write_text(md, encoding="utf-8")
    plot(rows, out / f"scaling{args.tag}.png", args.ps)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
