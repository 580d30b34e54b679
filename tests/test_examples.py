"""Every script in examples/ runs end to end (tiny random BERT, a few MRPC pairs) and saves an adapter that loads back
with the same predictions as the trained model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import peft_sam

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("accelerate")
TINY = ["--max-train-samples", "24", "--max-eval-samples", "16", "--max-length", "48", "--batch-size", "8"]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / script), *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _accuracies(stdout: str) -> list[float]:
    return [float(line.rsplit(" ", 1)[1]) for line in stdout.splitlines() if "validation accuracy" in line]


@pytest.mark.parametrize(
    "script, extra",
    [
        ("sam_accelerate.py", ["--calibration-batches", "2", "--cpu"]),
        ("mpo_accelerate.py", ["--cpu"]),
        ("calisr_accelerate.py", ["--cpu"]),
    ],
)
def test_accelerate_examples_train_save_and_reload_the_same_model(script, extra, tiny_bert_dir, tmp_path):
    out = tmp_path / "adapter"
    stdout = _run(script, "--model", tiny_bert_dir, "--output-dir", str(out), *TINY, *extra)
    trained, reloaded = _accuracies(stdout)[-2:]
    assert reloaded == trained  # the file holds the whole adaptation
    assert (out / "adapter_model.safetensors").exists()
    if script == "calisr_accelerate.py":  # the controller measured stable ranks (JSONL, one event per line)
        events = [json.loads(line) for line in (out / "calisr.jsonl").read_text().splitlines()]
        assert any(e["event"] == "measure" for e in events)


def test_a_seeded_example_repeats_exactly(tiny_bert_dir, tmp_path):
    """Same --seed, same run (head initialisation, dropout, data order); another seed, another run."""
    runs = [
        _run("sam_accelerate.py", "--model", tiny_bert_dir, "--output-dir", str(tmp_path / str(i)), *TINY,
             "--calibration-batches", "2", "--cpu", "--seed", seed)
        for i, seed in enumerate(["3", "3", "4"])
    ]  # fmt: skip
    chosen = [[line for line in r.splitlines() if "SAM chose" in line or "accuracy" in line] for r in runs]
    assert chosen[0] == chosen[1]
    weights = [load_file(str(tmp_path / str(i) / "adapter_model.safetensors")) for i in range(3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0] if k in weights[2])


@pytest.mark.parametrize(
    "script, extra", [("sam_trainer.py", ["--calibration-batches", "2"]), ("calisr_trainer.py", [])]
)
def test_trainer_examples_train_and_save_an_adapter_that_loads(script, extra, tiny_bert_dir, tmp_path):
    stdout = _run(script, "--model", tiny_bert_dir, "--output-dir", str(tmp_path), *TINY, *extra)
    assert "eval_accuracy" in stdout
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model = peft_sam.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    pairs = (["a sentence", "another one"], ["a sentence", "a different one"])
    batch = tokenizer(*pairs, return_tensors="pt", padding=True)
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            plain = model(**batch).logits
    assert torch.isfinite(adapted).all() and not torch.equal(adapted, plain)  # the saved training is in the file
