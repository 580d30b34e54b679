"""How many calibration batches SAM needs: masks from N batches compared with the reference code's 600 (issue 17).

The quality grid calibrates on 100 batches (a CPU compromise); the reference code and ``SAMConfig`` use 600. For
each ``--batches`` value this runs the harness's calibration (the same seeded batch sequence as
``glue.train_and_evaluate``: the first 100 batches of a 600-batch run are the 100-batch run's batches) on the task's
training split and records the chosen entries; then reports, per N, the overlap with the mask of the largest N
(shared entries / entries), overall and for the tensors where it is lowest. The validation score of a run at 600 is a
quality-grid run with ``--num-calibration-batches 600`` (see the results README).

    python benchmarks/calibration_batches.py --task cb --batches 100,600
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, append_jsonl, machine_info, md_table, model_label  # noqa: E402


def masks(task: str, batches: int, *, model: str, seed: int, batch_size: int, p: float) -> dict[str, set[int]]:
    """The SAM entries (per tensor) that ``batches`` calibration batches of the harness choose."""
    import torch
    from glue import get_collator, get_spec, load_task, tokenize_task
    from glue.training import _calibration_batches, load_base_model
    from peft import get_peft_model
    from transformers import AutoTokenizer

    import peft_sam
    from peft_sam.tuners.sam.mask_functions import find_candidates

    spec = get_spec(task)
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = tokenize_task(load_task(task, include_test=False), tokenizer, spec, max_length=128)
    torch.manual_seed(seed)  # the harness seeds before building the model: the same task head
    net = get_peft_model(load_base_model(model, spec), peft_sam.SAMConfig(p=p, task_type="SEQ_CLS"))
    calib = _calibration_batches(data["train"], get_collator(spec, tokenizer), batch_size, batches, seed, 0, 1)
    with torch.random.fork_rng():
        peft_sam.select_parameters(net, calib, num_batches=batches, show_progress=False)
    out = {}
    for c in find_candidates(net, "default"):
        found = c.layer.entries("default", c.tensor_name)
        out[f"{c.name}.{c.tensor_name}"] = set() if found is None else set(found[0].tolist())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="cb")
    parser.add_argument("--batches", default="100,600", help="comma-separated calibration batch counts")
    parser.add_argument("--model", help="hub id or path (default: the packaged MiniLM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.005)
    parser.add_argument("--out", default=str(RESULTS_DIR / "calibration_batches.jsonl"))
    args = parser.parse_args(argv)
    if args.model is None:
        from glue.training import default_model_path

        args.model = default_model_path()
    counts = sorted(int(b) for b in args.batches.split(","))
    found, seconds = {}, {}
    for n in counts:
        start = time.perf_counter()
        found[n] = masks(args.task, n, model=args.model, seed=args.seed, batch_size=args.batch_size, p=args.p)
        seconds[n] = time.perf_counter() - start
    ref = found[counts[-1]]
    rows = []
    for n in counts:
        shared = sum(len(found[n][k] & ref[k]) for k in ref)
        total = sum(len(ref[k]) for k in ref)
        per_tensor = {k: len(found[n][k] & ref[k]) / len(ref[k]) for k in ref if ref[k]}
        worst = sorted(per_tensor.items(), key=lambda kv: kv[1])[:3]
        row = {
            "task": args.task, "model": model_label(args.model), "seed": args.seed, "p": args.p,
            "batch_size": args.batch_size, "batches": n, "reference_batches": counts[-1], "entries": total,
            "shared_with_reference": shared, "overlap": shared / total, "lowest_tensors": worst,
            "seconds": seconds[n], "machine": machine_info(),
        }  # fmt: skip
        append_jsonl(args.out, row)
        rows.append(row)
    table = md_table(
        ["task", "calibration batches", "entries", f"shared with {counts[-1]}", "overlap", "lowest tensors", "seconds"],
        [
            [r["task"], r["batches"], f"{r['entries']:,}", f"{r['shared_with_reference']:,}", f"{r['overlap']:.3f}",
             ", ".join(f"{k.split('bert.')[-1]} {v:.2f}" for k, v in r["lowest_tensors"]), f"{r['seconds']:.0f}"]
            for r in rows
        ],
    )  # fmt: skip
    md_path = Path(args.out).with_suffix(".md")
    previous = md_path.read_text() if md_path.exists() else "## SAM masks: calibration batches\n\n"
    md_path.write_text(previous + table + "\n\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
