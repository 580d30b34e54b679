"""SAM calibration memory on one process vs FSDP2 shards (gloo processes on CPU): score bytes per rank.

Runs ``select_parameters`` on the same batches once in a single process and once on ``--world`` spawned processes
with every encoder layer and the root ``fully_shard``-ed, and records per rank: the float64 score accumulators it
held (counted, the same on every run), its peak resident memory (``VmHWM``), the number of entries chosen and a hash of
them (the sharded run must choose what one process chooses). Dropout is off so that both runs see the same gradients.
Also prints the memory arithmetic of calibrating a model of ``--arith-params`` parameters (default: Llama-2-7B).

    python benchmarks/fsdp_calibration.py                        # MiniLM, RTE batches, world 2
    python benchmarks/fsdp_calibration.py --world 4 --batches 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, _proc_status_kib, append_jsonl, machine_info, md_table, mib, model_label  # noqa: E402

LLAMA2_7B_PARAMS = 6_738_415_616


def _batches(model: str, n: int, batch_size: int, max_length: int) -> list[dict]:
    from glue import get_collator, get_spec, load_task, tokenize_task
    from transformers import AutoTokenizer

    spec = get_spec("rte")
    data = load_task("rte", include_test=False)
    data["train"] = data["train"].select(range(n * batch_size))
    tok = tokenize_task(data, AutoTokenizer.from_pretrained(model), spec, max_length=max_length)["train"]
    collate = get_collator(spec, AutoTokenizer.from_pretrained(model))
    return [collate([tok[i] for i in range(b * batch_size, (b + 1) * batch_size)]) for b in range(n)]


def _build(model_path: str, p: float):
    import torch
    from glue import load_base_model
    from peft import get_peft_model

    import peft_sam

    torch.manual_seed(0)  # the task head is initialised at random: the same head in every process
    model = get_peft_model(load_base_model(model_path, "rte"), peft_sam.SAMConfig(p=p, task_type="SEQ_CLS"))
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _entries_hash(model) -> str:
    from peft_sam.tuners.sam.mask_functions import find_candidates

    digest = hashlib.sha256()
    for c in find_candidates(model, "default"):
        found = c.layer.entries("default", c.tensor_name)
        digest.update(f"{c.name}.{c.tensor_name}".encode())
        if found is not None:
            digest.update(found[0].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _calibrate(model, batches) -> dict[str, Any]:
    import peft_sam

    start = time.perf_counter()
    summary = peft_sam.select_parameters(model, batches, num_batches=len(batches), show_progress=False)
    return {
        "score_bytes": summary.score_bytes,
        "selected": summary.num_selected,
        "candidates": summary.num_candidates,
        "entries_sha": _entries_hash(model),
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": _proc_status_kib("VmHWM") * 1024,
    }


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, batches, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _build(args.model, args.p)
        for layer in model.base_model.model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        result = _calibrate(model, batches)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def arithmetic(num_params: int, world: int, weight_bytes: int = 2) -> list[list[str]]:
    """Calibration memory (GB) per process: weights and gradients in the model's dtype, float64 score sums."""
    gb = 1e9
    rows = []
    for n in (1, world):
        w = num_params * weight_bytes / n / gb
        g = num_params * weight_bytes / n / gb
        s = num_params * 8 / n / gb
        rows.append([str(n), f"{w:.1f}", f"{g:.1f}", f"{s:.1f}", f"{w + g + s:.1f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or path (default: the packaged MiniLM)")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--p", type=float, default=0.005)
    parser.add_argument("--arith-params", type=int, default=LLAMA2_7B_PARAMS)
    parser.add_argument("--arith-world", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS_DIR / "fsdp_calibration.jsonl"))
    args = parser.parse_args(argv)
    if args.model is None:
        from glue.training import default_model_path

        args.model = default_model_path()

    batches = _batches(args.model, args.batches, args.batch_size, args.max_length)
    single = _calibrate(_build(args.model, args.p), batches)
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(args.world, port, args, batches, tmp), nprocs=args.world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]

    info = machine_info()
    base = {"model": model_label(args.model), "p": args.p, "batches": args.batches, "batch_size": args.batch_size}
    rows = [{**base, "world": 1, "rank": 0, **single}]
    rows += [{**base, "world": args.world, "rank": r, **res} for r, res in enumerate(ranks)]
    for row in rows:
        append_jsonl(args.out, {**row, "machine": info})
    table = md_table(
        ["processes", "rank", "score accumulators (MiB)", "share of 1 process", "peak RSS (MiB)", "entries", "same"],
        [
            [r["world"], r["rank"], f"{mib(r['score_bytes']):.1f}", f"{r['score_bytes'] / single['score_bytes']:.3f}",
             f"{mib(r['peak_rss_bytes']):.0f}", f"{r['selected']:,}",
             "yes" if r["entries_sha"] == single["entries_sha"] else "NO"]
            for r in rows
        ],
    )  # fmt: skip
    arith = md_table(
        ["processes", "weights (GB)", "gradients (GB)", "score sums, float64 (GB)", "total (GB)"],
        arithmetic(args.arith_params, args.arith_world),
    )
    md = "\n".join(
        [
            "## SAM calibration on FSDP2 shards",
            "",
            f"{base['model']}, p = {args.p}, {args.batches} RTE batches of {args.batch_size} x <= {args.max_length} "
            f"tokens, dropout off; one process vs {args.world} gloo processes, every encoder layer and the root "
            "`fully_shard`-ed. Score accumulators are counted (float64, one per candidate entry this rank holds); "
            "peak RSS includes the model, the batches and the Python runtime.",
            "",
            table,
            "",
            f"Memory arithmetic for {args.arith_params / 1e9:.2f} B parameters in bf16 (per process, before "
            f"activations and the one or two unsharded blocks FSDP holds in flight):",
            "",
            arith,
            "",
        ]
    )
    Path(args.out).with_suffix(".md").write_text(md)
    print(md)
    return 0 if all(r["entries_sha"] == single["entries_sha"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
