"""The CaliSr switch (Algorithm 1 of the paper): measure stable ranks during training, switch groups to LFT.

A plain loop calls :meth:`CaliSrController.step` **instead of** ``optimizer.step()``::

    model = get_peft_model(base, CaliSrConfig(adapter=LoraConfig(...), variant="S"))
    optimizer = torch.optim.AdamW(calisr_param_groups(model, weight_decay=0.01), lr=2e-5)
    scheduler = get_linear_schedule_with_warmup(optimizer, ...)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    controller = CaliSrController(model, optimizer, steps_per_epoch=len(loader), total_steps=..., log_path=...)
    accelerator.register_for_checkpointing(controller)
    for batch in loader:
        accelerator.backward(model(**batch).loss)
        controller.step()          # the optimizer step, split in two on measurement steps
        scheduler.step()
        optimizer.zero_grad()

With the transformers ``Trainer`` add ``CaliSrCallback()`` to its callbacks (it installs the controller as the
optimizer's ``step``). On a measurement step (every ``sr_interval`` optimizer steps, while a group still trains
W_extra) the step is split without any extra forward/backward: step the core parameters (W_extra's gradients
hidden), measure SR(W_LFT) = SR(W_core_new + W_extra_old) per group; step W_extra (core gradients hidden), measure
SR(W_FFT) = SR(W_core_new + W_extra_new). With per-parameter optimizers (Adam, AdamW, SGD, ...) that skip parameters
without a gradient, the two halves are exactly one ordinary step. SRS = share of a group's recent measurements with
SR(W_LFT) < SR(W_FFT); SRS > delta switches the group (or the whole model, variant D) to LFT for good.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ...ops.stable_rank import certified_stable_ranks, stable_rank_batched
from .config import CaliSrConfig
from .layer import CaliSrLayer
from .model import _calisr_config, calisr_layers

STATE_VERSION = 1
# float64 entries (W-sized matrices) handled per batched svdvals call in a measurement (256 MiB)
_MEASURE_CHUNK_NUMEL = 2**25


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _short(name: str) -> str:
    for prefix in ("module.base_model.model.", "base_model.model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def unwrap_model(model: nn.Module) -> nn.Module:
    """The PeftModel inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    inner = optimizer
    # accelerate's AcceleratedOptimizer subclasses Optimizer but delegates to the real one in .optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"CaliSrController needs a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer)}.")
    return inner


def calisr_param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    no_decay: Sequence[str] = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight"),
    extra_weight_decay: float | None = None,
    **group_kwargs: Any,
) -> list[dict]:
    """Optimizer parameter groups for a CaliSr model: core and W_extra, each with and without weight decay.

    The controller works with any grouping, but separate groups make the split explicit and let W_extra have its own
    ``extra_weight_decay`` (default: ``weight_decay``); the W_extra of biases and norm weights (1-D tensors) gets no
    decay, as those tensors get none in full fine-tuning. Each group carries ``"calisr": "core" | "extra"``; empty
    groups are left out.
    """
    peft_model = unwrap_model(model)
    extras = {
        id(p)
        for _, layer in calisr_layers(peft_model)
        for adapter in layer.calisr_group
        for p in layer.extra_parameters(adapter)
    }
    decay, plain, extra, extra_plain = [], [], [], []
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in extras:  # W_extra of a bias or a norm weight (1-D): no decay, as full fine-tuning's tensor
            (extra if p.dim() > 1 else extra_plain).append(p)
        elif any(nd in name for nd in no_decay):
            plain.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "calisr": "core", **group_kwargs},
        {"params": plain, "weight_decay": 0.0, "calisr": "core", **group_kwargs},
        {
            "params": extra,
            "weight_decay": weight_decay if extra_weight_decay is None else extra_weight_decay,
            "calisr": "extra",
            **group_kwargs,
        },
        {"params": extra_plain, "weight_decay": 0.0, "calisr": "extra", **group_kwargs},
    ]
    return [g for g in groups if g["params"]]


SR_BACKENDS = ("svd", "gram", "certified")


@torch.no_grad()
def gram_stable_ranks(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stable ranks of same-shape matrices from float64 Gram matrices: ``||W||_F^2 / lambda_max(W^T W)``.

    Exact in float64 like ``svdvals`` (no truncation, no iteration): ``sigma_1^2`` is the largest eigenvalue of the
    Gram matrix of the smaller side, computed by ``eigvalsh``; forming the Gram matrix perturbs it by at most
    ``~n eps ||W||_F^2``, i.e. a relative error below ``n * eps * srank(W)`` (< 1e-11 for BERT-size matrices, typically
    1e-15), far below the 1e-7 relative SR differences CaliSr has to resolve. About 2.5x faster than svdvals on CPU
    (one GEMM plus a symmetric tridiagonalisation instead of a bidiagonalisation).
    """
    mats = torch.stack([w.detach().to(torch.float64) for w in weights])
    mats = mats.reshape(mats.shape[0], mats.shape[1], -1)
    gram = mats.mT @ mats if mats.shape[1] >= mats.shape[2] else mats @ mats.mT
    top = torch.linalg.eigvalsh(gram)[..., -1]
    fro2 = (mats * mats).sum(dim=(-2, -1))
    safe = torch.where(top > 0, top, torch.ones_like(top))
    return torch.where(top > 0, fro2 / safe, torch.zeros_like(fro2))


class CaliSrController:
    """Runs CaliSr's measurements and switches; call :meth:`step` instead of ``optimizer.step()``.

    Args:
        model: the PeftModel with a CaliSr adapter (DDP- or accelerate-wrapped is fine). Its ``find_unused_parameters``
            must be True under DDP: after a switch W_extra takes no part in the backward pass.
        optimizer: the optimizer over the model's trainable parameters, W_extra included (a torch optimizer or an
            accelerate ``AcceleratedOptimizer``); it must keep per-parameter state and skip parameters whose ``grad``
            is None (true of torch's Adam, AdamW, SGD, ...).
        steps_per_epoch: optimizer steps per epoch; the default decision period (``decide_every=None``).
        total_steps: total optimizer steps; needed by ``switch_at`` (the fixed-switch control).
        log_path: JSONL file receiving every measurement, decision and switch (rank 0 only; appended to).
        adapter_name: the CaliSr adapter to control (default: the active one).
        log_matrices: also log each matrix's SR(W_LFT) and SR(W_FFT) (``"matrices": {name: [lft, fft]}``); the
            latest per-matrix values are always kept in ``last_matrix_srs``.
        sr_backend: ``"svd"`` (default): float64 ``svdvals`` via ``peft_sam.ops.stable_rank.stable_rank_batched``;
            ``"gram"``: float64 Gram matrix + ``eigvalsh`` (:func:`gram_stable_ranks`), equally exact and ~2.5x
            faster on CPU; ``"certified"``: float64 Gram matrix, warm-started block subspace iteration and a Cholesky
            certificate (:func:`peft_sam.ops.stable_rank.certified_stable_ranks`): sigma_1^2 within 1e-10 relative,
            no decomposition and one host sync per round, for GPUs (where float64 ``svdvals`` of the 36 MiniLM
            matrices took 58-72 % of a CaliSr run's training time).
        measure_threads: threads per LAPACK call while measuring (default 1; None keeps the process setting). LAPACK's
            SVD/eigensolvers gain nothing from threads on BERT-size matrices, and on a busy machine their thread
            barriers cost 5-25x (measured on a busy 2-core CPU: 1.2 s vs 7-33 s for MiniLM's 36 matrices). On CPU the
            process's threads instead work on different matrices at once.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer,
        steps_per_epoch: int | None = None,
        total_steps: int | None = None,
        log_path: str | os.PathLike | None = None,
        adapter_name: str | None = None,
        log_matrices: bool = False,
        sr_backend: str = "svd",
        measure_threads: int | None = 1,
    ) -> None:
        if sr_backend not in SR_BACKENDS:
            raise ValueError(f"sr_backend must be one of {SR_BACKENDS}, got {sr_backend!r}.")
        self.sr_backend = sr_backend
        # sr_backend="certified": per matrix, the Ritz basis of the last measurement (the next one's warm start)
        self._sr_bases: dict[str, torch.Tensor] = {}
        self.measure_threads = measure_threads
        self.model = model
        self.log_matrices = log_matrices
        # {"step": t, "lft": {module name: SR}, "fft": {module name: SR}} of the latest measurement
        self.last_matrix_srs: dict = {}
        self._matrix_values: dict[str, float] = {}
        self.peft_model = unwrap_model(model)
        self.adapter_name, self.config = _calisr_config(self.peft_model, adapter_name)
        self.optimizer = optimizer
        self.torch_optimizer = _torch_optimizer(optimizer)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.log_path = os.fspath(log_path) if log_path is not None else None
        self._check_ddp(model)
        cfg: CaliSrConfig = self.config

        # measured layers per group (the groups' Linear/Conv1D matrices) and the other layers of the full-fine-tuning
        # phase (embeddings, norms, matrices outside every group), which stop training with the last group
        self.layers: dict[str, list[tuple[str, CaliSrLayer]]] = {}
        self.followers: list[tuple[str, CaliSrLayer]] = []
        for name, layer in calisr_layers(self.peft_model, self.adapter_name):
            group = layer.calisr_group[self.adapter_name]
            if group is None or not layer.is_matrix:
                self.followers.append((name, layer))
            else:
                self.layers.setdefault(group, []).append((name, layer))
        if not self.layers:
            raise ValueError(f"The model has no measured CaliSr layers for adapter {self.adapter_name!r}.")
        self.groups: list[str] = list(self.layers)
        self.extras: dict[str, list[nn.Parameter]] = {
            g: [p for _, layer in items for p in layer.extra_parameters(self.adapter_name)]
            for g, items in self.layers.items()
        }
        self.follower_extras: list[nn.Parameter] = [
            p for _, layer in self.followers for p in layer.extra_parameters(self.adapter_name)
        ]
        self._extra_ids = {id(p) for ps in self.extras.values() for p in ps} | {id(p) for p in self.follower_extras}

        # schedule
        self.srs_window = cfg.srs_window
        self.decide_every = cfg.decide_every or steps_per_epoch
        self.switch_step: int | None = None
        if cfg.switch_at is not None:
            if total_steps is None:
                raise ValueError(
                    "CaliSrConfig.switch_at (fixed-switch control) needs the controller's total_steps: "
                    "CaliSrController(model, optimizer, total_steps=num_epochs * steps_per_epoch, ...)."
                )
            self.switch_step = int(round(float(cfg.switch_at) * int(total_steps)))
        elif self.srs_window is None and self.decide_every is None:
            raise ValueError(
                "CaliSr decides once per epoch by default: pass steps_per_epoch=len(train_dataloader) // "
                "gradient_accumulation_steps to CaliSrController, or set CaliSrConfig.decide_every or srs_window."
            )
        period = self.decide_every if self.srs_window is None else steps_per_epoch
        if cfg.sr_interval is not None:
            self.sr_interval = int(cfg.sr_interval)
        elif self.switch_step is not None:
            self.sr_interval = 0  # the fixed-switch control measures nothing
        elif period is None:
            raise ValueError(
                "Set CaliSrConfig.sr_interval (steps between measurements) or pass steps_per_epoch to the controller."
            )
        else:
            self.sr_interval = max(1, int(period) // (self.srs_window or 5))
        if self.switch_step is None and self.srs_window is None and self.sr_interval > int(self.decide_every):
            warnings.warn(
                f"CaliSr measures every {self.sr_interval} steps but decides every {self.decide_every}: some decisions "
                "will see no measurement (and never switch). Lower sr_interval or raise decide_every.",
                stacklevel=2,
            )

        # state
        self.global_step = 0
        self.phase: dict[str, str] = {g: "fft" for g in self.groups}
        self.switched_at: dict[str, int | None] = {g: None for g in self.groups}
        self.window: dict[str, list[bool]] = {g: [] for g in self.groups}
        self.history: list[dict] = []
        self.measure_seconds = 0.0
        self._step_fn = None  # set by install(): the optimizer's step before it was replaced by ours

        # optimizer layout (param order per group) as built: saved optimizer states always use it, with or without
        # W_extra, so a fresh optimizer can load a checkpoint written after the switch (see _full_group)
        self._layout: list[list[nn.Parameter]] = [list(g["params"]) for g in self.torch_optimizer.param_groups]
        present = {id(p) for group in self._layout for p in group}
        missing = [
            n
            for n, layer in [item for g in self.groups for item in self.layers[g]] + self.followers
            if any(id(p) not in present for p in layer.extra_parameters(self.adapter_name))
        ]
        if missing:
            raise ValueError(
                f"W_extra of {len(missing)} CaliSr layers (e.g. {missing[0]}) is not in the optimizer: build the "
                "optimizer from the model's trainable parameters after get_peft_model (e.g. with "
                "peft_sam.tuners.calisr.calisr_param_groups(model)) and before creating the controller."
            )
        self._hooks = [
            self.torch_optimizer.register_state_dict_post_hook(self._optimizer_state_dict_post_hook),
            self.torch_optimizer.register_load_state_dict_pre_hook(self._optimizer_load_state_dict_pre_hook),
        ]
        if self.switch_step is not None and self.switch_step <= 0:
            self._switch(list(self.groups), step=0, reason="switch_at", srs=None)

    # ------------------------------------------------------------------ setup checks
    def _check_ddp(self, model: nn.Module) -> None:
        m = model
        while isinstance(m, nn.Module):
            if isinstance(m, nn.parallel.DistributedDataParallel):
                if not m.find_unused_parameters:
                    raise ValueError(
                        "CaliSr under DistributedDataParallel needs find_unused_parameters=True: after the switch "
                        "W_extra receives no gradient (with accelerate: Accelerator(kwargs_handlers="
                        "[DistributedDataParallelKwargs(find_unused_parameters=True)]); with the Trainer: "
                        "TrainingArguments(ddp_find_unused_parameters=True)). static_graph=True is not supported."
                    )
                return
            nxt = getattr(m, "module", None)
            if not isinstance(nxt, nn.Module):
                return
            m = nxt

    # ------------------------------------------------------------------ public state
    @property
    def active_groups(self) -> list[str]:
        """Groups still in the full-fine-tuning phase (their W_extra trains)."""
        return [g for g in self.groups if self.phase[g] == "fft"]

    @property
    def all_switched(self) -> bool:
        return not self.active_groups

    def is_measurement_step(self, step: int) -> bool:
        """Whether optimizer step number ``step`` (1-based) is split and measured."""
        return bool(self.active_groups) and self.sr_interval > 0 and step % self.sr_interval == 0

    # ------------------------------------------------------------------ the step
    def install(self) -> CaliSrController:
        """Make ``optimizer.step()`` run :meth:`step` (used by the Trainer callback; plain loops call step())."""
        if getattr(self.optimizer, "_calisr_controller", None) is self:
            return self
        if getattr(self.optimizer, "_calisr_controller", None) is not None:
            raise RuntimeError("Another CaliSrController is already installed on this optimizer.")
        self._step_fn = self.optimizer.step
        self._step_was_instance_attr = "step" in vars(self.optimizer)
        controller = self

        def step(closure=None):
            return controller.step(closure)

        if hasattr(self._step_fn, "_wrapped_by_lr_sched"):  # keep torch's LR-scheduler bookkeeping quiet
            step._wrapped_by_lr_sched = True
        self.optimizer.step = step
        self.optimizer._calisr_controller = self
        return self

    def uninstall(self) -> None:
        """Undo :meth:`install`."""
        if getattr(self.optimizer, "_calisr_controller", None) is self:
            if self._step_was_instance_attr:
                self.optimizer.step = self._step_fn
            else:
                del self.optimizer.step  # back to the class's method
            del self.optimizer._calisr_controller
            self._step_fn = None

    def detach(self) -> None:
        """Uninstall and remove the optimizer state-dict hooks (the controller no longer manages the optimizer)."""
        self.uninstall()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _plain_step(self, closure=None):
        fn = self._step_fn if self._step_fn is not None else self.optimizer.step
        return fn() if closure is None else fn(closure)

    def _half_step(self) -> None:
        if self.torch_optimizer is self.optimizer:
            self._plain_step()
        else:
            self.torch_optimizer.step()

    def _sync_step(self) -> bool:
        """False on gradient-accumulation micro-steps (accelerate's optimizer does not step there)."""
        state = getattr(self.optimizer, "gradient_state", None)
        return True if state is None else bool(state.sync_gradients)

    def step(self, closure=None):
        """One optimizer step (call it instead of ``optimizer.step()``); split and measured on measurement steps."""
        if not self._sync_step():
            return self._plain_step(closure)
        t = self.global_step + 1
        result = None
        if self.is_measurement_step(t) and self.switch_step is None:
            if closure is not None:
                raise ValueError("CaliSrController.step does not support closures on measurement steps.")
            self._split_step(t)
        else:
            result = self._plain_step(closure)
        self.global_step = t
        self._after_step(t)
        return result

    def _split_step(self, t: int) -> None:
        groups = self.active_groups
        extras = [p for g in groups for p in self.extras[g]] + self.follower_extras
        extra_ids = {id(p) for p in extras}
        scaler = getattr(self.optimizer, "scaler", None)
        if scaler is not None:
            if not _unscaled(scaler, self.torch_optimizer):  # clipping before the step may have unscaled them
                scaler.unscale_(self.torch_optimizer)  # all gradients at once, as scaler.step would
            found_inf = sum(float(v.item()) for v in scaler._found_inf_per_device(self.torch_optimizer).values())
            if found_inf:  # the step is skipped anyway: no measurement
                self._plain_step()
                return
        extra_grads = [p.grad for p in extras]
        for p in extras:
            p.grad = None
        try:
            self._half_step()  # W_core (and everything else but W_extra)
        finally:
            for p, g in zip(extras, extra_grads):
                p.grad = g
        started = time.perf_counter()
        sr_lft = self._measure(groups)
        lft_matrices = self._matrix_values
        self.measure_seconds += time.perf_counter() - started
        core = [
            p
            for group in self.torch_optimizer.param_groups
            for p in group["params"]
            if id(p) not in extra_ids and p.grad is not None
        ]
        core_grads = [p.grad for p in core]
        for p in core:
            p.grad = None
        try:
            self._half_step()  # W_extra
        finally:
            for p, g in zip(core, core_grads):
                p.grad = g
        if scaler is not None:
            scaler.update()
            if hasattr(self.optimizer, "_is_overflow"):
                self.optimizer._is_overflow = False
        # what the LR scheduler's step-tracking wrapper on the (possibly wrapping) optimizer would have recorded
        for opt in {id(self.optimizer): self.optimizer, id(self.torch_optimizer): self.torch_optimizer}.values():
            opt._opt_called = True
        started = time.perf_counter()
        sr_fft = self._measure(groups)
        fft_matrices = self._matrix_values
        self.measure_seconds += time.perf_counter() - started
        self.last_matrix_srs = {"step": t, "lft": lft_matrices, "fft": fft_matrices}
        for g in groups:
            lower = bool(sr_lft[g][0] < sr_fft[g][0])
            self.window[g].append(lower)
            event = {
                "event": "measure",
                "step": t,
                "group": g,
                "sr_lft": sr_lft[g][0],
                "sr_fft": sr_fft[g][0],
                "lft_lower": lower,
                "num_matrices": sr_lft[g][1],
            }
            if self.log_matrices:
                names = [_short(n) for n, _ in self.layers[g]]
                event["matrices"] = {
                    short: [lft_matrices.get(n), fft_matrices.get(n)] for short, (n, _) in zip(names, self.layers[g])
                }
            self._record(event)

    # ------------------------------------------------------------------ measurement
    def _measure(self, groups: Sequence[str]) -> dict[str, tuple[float, int]]:
        previous = torch.get_num_threads()
        limit = self.measure_threads is not None and self.measure_threads != previous
        if limit:
            torch.set_num_threads(self.measure_threads)
        try:
            # on CPU, the process's threads work on different matrices at once instead of inside one LAPACK call
            workers = max(1, previous // self.measure_threads) if limit else 1
            return self._measure_groups(groups, workers=workers)
        finally:
            if limit:
                torch.set_num_threads(previous)

    @torch.no_grad()
    def _measure_groups(self, groups: Sequence[str], workers: int = 1) -> dict[str, tuple[float, int]]:
        """Aggregated (summed) float64 stable rank of each group's current effective weights.

        Under torch.distributed each rank computes a disjoint share of the matrices and the values are summed with
        an all-reduce (every value has exactly one non-zero contributor, so all ranks hold identical numbers). On
        CPU each matrix is one call, spread over ``workers`` threads (bit-identical to a sequential run); on
        accelerators same-shape matrices are batched into one call.
        """
        include_base = self.config.sr_target == "weight"
        items = [(g, layer) for g in groups for _, layer in self.layers[g]]
        names = [name for g in groups for name, _ in self.layers[g]]
        world, rank = (dist.get_world_size(), dist.get_rank()) if _is_dist() else (1, 0)
        device = self.extras[groups[0]][0].device
        values = torch.zeros(len(items), dtype=torch.float64, device=device)
        mine = [i for i in range(len(items)) if i % world == rank]

        def stable_ranks(mats: list[torch.Tensor], chunk: list[int]) -> torch.Tensor:
            if self.sr_backend == "svd":
                return stable_rank_batched(mats)
            if self.sr_backend == "gram":
                return gram_stable_ranks(mats)
            starts = [self._sr_bases.get(names[i]) for i in chunk]
            same = all(b is not None and b.shape == starts[0].shape for b in starts)
            values, bases = certified_stable_ranks(mats, starts=torch.stack(starts) if same else None)
            for i, basis in zip(chunk, bases):
                self._sr_bases[names[i]] = basis
            return values

        def one(i: int) -> float:
            weight = items[i][1].effective_weight64(self.adapter_name, include_base=include_base)
            return float(stable_ranks([weight], [i])[0])

        if device.type == "cpu":  # one matrix per call (batching gains nothing on CPU), the same however many threads
            if workers > 1 and len(mine) > 1:
                with ThreadPoolExecutor(max_workers=min(workers, len(mine))) as pool:
                    results = list(pool.map(one, mine))
            else:
                results = [one(i) for i in mine]
            for i, value in zip(mine, results):
                values[i] = value
        else:
            # batch same-shape matrices (one call per chunk), bounded memory
            by_shape: dict[tuple, list[int]] = {}
            for i in mine:
                by_shape.setdefault(tuple(items[i][1].get_base_layer().weight.shape), []).append(i)
            for shape, indices in by_shape.items():
                per_chunk = max(1, _MEASURE_CHUNK_NUMEL // max(1, math.prod(shape)))
                for start in range(0, len(indices), per_chunk):
                    chunk = indices[start : start + per_chunk]
                    mats = [items[i][1].effective_weight64(self.adapter_name, include_base=include_base) for i in chunk]
                    values[torch.tensor(chunk, device=device)] = stable_ranks(mats, chunk).to(device)
                    del mats
        if world > 1:
            dist.all_reduce(values)
        values = values.cpu()
        self._matrix_values = {name: float(v) for name, v in zip(names, values.tolist())}
        out: dict[str, tuple[float, int]] = {}
        for g in groups:
            idx = [i for i, (gg, _) in enumerate(items) if gg == g]
            out[g] = (float(values[idx].sum()), len(idx))
        return out

    def measure(self) -> dict[str, float]:
        """Aggregated SR of each group's current effective weight (for inspection; not logged)."""
        return {g: v for g, (v, _) in self._measure(self.groups).items()}

    # ------------------------------------------------------------------ decisions and the switch
    def _after_step(self, t: int) -> None:
        if self.all_switched:
            return
        if self.switch_step is not None:
            if t >= self.switch_step:
                self._switch(self.active_groups, step=t, reason="switch_at", srs=None)
            return
        due = []
        for g in self.active_groups:
            if self.srs_window is not None:
                if len(self.window[g]) >= self.srs_window:
                    due.append(g)
            elif self.decide_every and t % self.decide_every == 0:
                due.append(g)
        if not due:
            return
        decisions = {}
        for g in due:
            window = self.window[g]
            srs = (sum(window) / len(window)) if window else None
            decisions[g] = (srs, srs is not None and srs > float(self.config.delta), len(window))
            self.window[g] = []
        flags = self._broadcast_flags([decisions[g][1] for g in due])
        to_switch = []
        for g, flag in zip(due, flags):
            srs, _, n = decisions[g]
            self._record({"event": "decision", "step": t, "group": g, "srs": srs, "n": n, "switch": flag})
            if flag:
                to_switch.append(g)
        if to_switch:
            self._switch(to_switch, step=t, reason="srs", srs={g: decisions[g][0] for g in to_switch})

    def _broadcast_flags(self, flags: list[bool]) -> list[bool]:
        """Rank 0's decisions for every rank (all ranks switch at the same step)."""
        if not _is_dist() or not flags:
            return flags
        device = self.extras[self.groups[0]][0].device
        tensor = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int64, device=device)
        dist.broadcast(tensor, src=0)
        return [bool(v) for v in tensor.tolist()]

    def _switch(self, groups: Iterable[str], step: int, reason: str, srs: dict | None, log: bool = True) -> None:
        """Stop training W_extra of ``groups`` for good: no grad, out of the optimizer, its optimizer state freed."""
        groups = [g for g in groups if self.phase[g] == "fft"]
        if not groups:
            return
        ids = set()
        for g in groups:
            for _, layer in self.layers[g]:
                layer.freeze_extra(self.adapter_name)
            for p in self.extras[g]:
                ids.add(id(p))
                self.torch_optimizer.state.pop(p, None)
            self.phase[g] = "lft"
            self.switched_at[g] = step
            if log:
                self._record(
                    {
                        "event": "switch",
                        "step": step,
                        "group": g,
                        "reason": reason,
                        "srs": None if srs is None else srs.get(g),
                        "num_matrices": len(self.layers[g]),
                        "extra_entries": sum(p.numel() for p in self.extras[g]),
                    }
                )
        if self.all_switched and self.followers:  # the rest of the full-fine-tuning phase stops with the last group
            for _, layer in self.followers:
                layer.freeze_extra(self.adapter_name)
            for p in self.follower_extras:
                ids.add(id(p))
                self.torch_optimizer.state.pop(p, None)
            if log:
                self._record(
                    {
                        "event": "switch",
                        "step": step,
                        "group": "rest",
                        "reason": "last group switched",
                        "num_modules": len(self.followers),
                        "extra_entries": sum(p.numel() for p in self.follower_extras),
                    }
                )
        for group in self.torch_optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]

    def _unswitch(self, groups: Iterable[str]) -> None:
        """Back to FFT (only when loading a controller state from before the switch)."""
        groups = [g for g in groups if self.phase[g] == "lft"]
        if not groups:
            return
        for g in groups:
            for _, layer in self.layers[g]:
                layer.unfreeze_extra(self.adapter_name)
            self.phase[g] = "fft"
            self.switched_at[g] = None
        for _, layer in self.followers:  # some group trains again: so does the rest of the full-fine-tuning phase
            layer.unfreeze_extra(self.adapter_name)
        active_ids = {id(p) for g in self.active_groups for p in self.extras[g]} | {id(p) for p in self.follower_extras}
        for gi, group in enumerate(self.torch_optimizer.param_groups):
            keep = {id(p) for p in group["params"]}
            group["params"] = [p for p in self._full_group(gi) if id(p) in keep or id(p) in active_ids]

    # ------------------------------------------------------------------ optimizer state dicts in the full layout
    def _full_group(self, gi: int) -> list[nn.Parameter]:
        """Group ``gi`` as built (W_extra included, original order), plus parameters added to it since."""
        current = self.torch_optimizer.param_groups[gi]["params"]
        if gi >= len(self._layout):
            return list(current)
        layout = self._layout[gi]
        known = {id(p) for p in layout}
        return list(layout) + [p for p in current if id(p) not in known]

    def _optimizer_state_dict_post_hook(self, optimizer, state_dict: dict) -> dict | None:
        """Write the optimizer state in the layout it was built with (switched W_extra: an index without state)."""
        groups = optimizer.param_groups
        saved = state_dict["param_groups"]
        if len(saved) != len(groups) or any(len(s["params"]) != len(g["params"]) for s, g in zip(saved, groups)):
            return None  # not the plain state of this optimizer (already converted by another hook?)
        if all(len(self._full_group(gi)) == len(g["params"]) for gi, g in enumerate(groups)):
            return None
        position = {id(p): i for i, p in enumerate(p for g in groups for p in g["params"])}
        sources = [[position.get(id(p)) for p in self._full_group(gi)] for gi in range(len(saved))]
        return _renumbered(state_dict, sources)

    def _optimizer_load_state_dict_pre_hook(self, optimizer, state_dict: dict) -> dict | None:
        """Map a full-layout optimizer state onto the current groups (dropping the state of switched W_extra)."""
        groups = optimizer.param_groups
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(groups):
            return None
        if all(len(s["params"]) == len(g["params"]) for s, g in zip(saved_groups, groups)):
            return None
        if not all(len(s["params"]) == len(self._full_group(gi)) for gi, s in enumerate(saved_groups)):
            return None  # not ours: let torch raise its size-mismatch error
        sources = []
        for gi, saved in enumerate(saved_groups):
            present = {id(p) for p in groups[gi]["params"]}
            sources.append([i for p, i in zip(self._full_group(gi), saved["params"]) if id(p) in present])
        return _renumbered(state_dict, sources)

    # ------------------------------------------------------------------ checkpointing (accelerate.save_state)
    def state_dict(self) -> dict:
        """Phase, schedule position and measurement history (``accelerator.register_for_checkpointing(controller)``)."""
        return {
            "version": STATE_VERSION,
            "adapter": self.adapter_name,
            "variant": self.config.variant,
            "groups": list(self.groups),
            "global_step": self.global_step,
            "phase": dict(self.phase),
            "switched_at": dict(self.switched_at),
            "window": {g: list(v) for g, v in self.window.items()},
            "history": [dict(e) for e in self.history],
            "measure_seconds": self.measure_seconds,
            "sr_bases": {n: b.cpu() for n, b in self._sr_bases.items()},  # warm starts: resume stays identical
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; groups that had switched are switched again (frozen, out of the optimizer)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Unknown CaliSr controller state version {state.get('version')!r}.")
        if list(state["groups"]) != self.groups:
            raise ValueError(
                f"The saved CaliSr controller state has groups {state['groups']}, this model has {self.groups}: it "
                "belongs to another model or configuration (variant / groups)."
            )
        self.global_step = int(state["global_step"])
        self.window = {g: list(state["window"].get(g, [])) for g in self.groups}
        self.history = [dict(e) for e in state["history"]]
        self.measure_seconds = float(state.get("measure_seconds", 0.0))
        self._sr_bases = dict(state.get("sr_bases", {}))
        to_fft = [g for g in self.groups if state["phase"][g] == "fft"]
        self._unswitch(to_fft)
        for g in self.groups:
            if state["phase"][g] == "lft":
                self._switch([g], step=int(state["switched_at"][g] or 0), reason="resume", srs=None, log=False)
            self.switched_at[g] = state["switched_at"][g]

    # ------------------------------------------------------------------ logging
    def _record(self, event: dict) -> None:
        event = {"adapter": self.adapter_name, **event}
        self.history.append(event)
        if self.log_path is None or _rank() != 0:
            return
        directory = os.path.dirname(os.path.abspath(self.log_path))
        os.makedirs(directory, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")

    def summary(self) -> dict:
        """Phase per group, switch steps, number of measurements and the time spent measuring."""
        return {
            "phase": dict(self.phase),
            "switched_at": dict(self.switched_at),
            "measurements": sum(1 for e in self.history if e["event"] == "measure"),
            "measure_seconds": self.measure_seconds,
            "sr_interval": self.sr_interval,
            "decide_every": self.decide_every,
            "srs_window": self.srs_window,
            "sr_backend": self.sr_backend,
            "measure_threads": self.measure_threads,
        }


class _CallbackBase:
    pass


try:  # transformers is a dependency, but keep the import local to this class
    from transformers import TrainerCallback as _TrainerCallback
except ImportError:  # pragma: no cover
    _TrainerCallback = _CallbackBase

CONTROLLER_STATE_NAME = "calisr_controller.pt"


def _unscaled(scaler, optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` already ran this step (e.g. for gradient clipping before the step)."""
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states.get(id(optimizer)) if hasattr(scaler, "_per_optimizer_states") else None
    return state is not None and state.get("stage") is OptState.UNSCALED


def _renumbered(state_dict: dict, sources: list[list[int | None]]) -> dict:
    """An optimizer state dict whose group ``g`` holds, in order, the saved parameters ``sources[g]`` (a saved index,
    or None for a parameter without state), numbered afresh from 0."""
    new_groups, new_state, index = [], {}, 0
    for saved, group_sources in zip(state_dict["param_groups"], sources):
        ids = []
        for old in group_sources:
            if old is not None and old in state_dict["state"]:
                new_state[index] = state_dict["state"][old]
            ids.append(index)
            index += 1
        entry = {k: v for k, v in saved.items() if k != "param_names"}
        entry["params"] = ids
        new_groups.append(entry)
    return {"state": new_state, "param_groups": new_groups}


class CaliSrCallback(_TrainerCallback):
    """CaliSr for the transformers ``Trainer``: ``Trainer(..., callbacks=[CaliSrCallback(log_path=...)])``.

    The Trainer calls ``optimizer.step()`` itself, so at ``on_train_begin`` the callback creates a
    :class:`CaliSrController` and installs it as the optimizer's ``step`` (``controller.install()``); the split step,
    the measurements and the switch then happen inside the Trainer's own step. The controller state is written next
    to each checkpoint (``checkpoint-N/calisr_controller.pt``) and read back when training resumes. Under DDP set
    ``TrainingArguments(ddp_find_unused_parameters=True)``.
    """

    def __init__(
        self,
        steps_per_epoch: int | None = None,
        total_steps: int | None = None,
        log_path: str | None = None,
        adapter_name: str | None = None,
        resume_from_checkpoint: str | None = None,
        **controller_kwargs: Any,
    ) -> None:
        self.controller_kwargs = controller_kwargs  # e.g. sr_backend="gram", log_matrices=True
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.log_path = log_path
        self.adapter_name = adapter_name
        self.resume_from_checkpoint = resume_from_checkpoint
        self.controller: CaliSrController | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        steps_per_epoch = self.steps_per_epoch
        if steps_per_epoch is None and train_dataloader is not None:
            try:
                n = len(train_dataloader)
                accumulation = max(1, int(args.gradient_accumulation_steps))
                steps_per_epoch = max(n // accumulation + int(n % accumulation > 0), 1)
            except TypeError:
                steps_per_epoch = None
        if steps_per_epoch is None and state.max_steps and args.num_train_epochs:
            steps_per_epoch = max(1, math.ceil(state.max_steps / math.ceil(args.num_train_epochs)))
        if self.controller is not None:
            self.controller.detach()
        self.controller = CaliSrController(
            model,
            optimizer,
            steps_per_epoch=steps_per_epoch,
            total_steps=self.total_steps or state.max_steps,
            log_path=self.log_path,
            adapter_name=self.adapter_name,
            **self.controller_kwargs,
        ).install()
        if state.global_step > 0:
            directory = self.resume_from_checkpoint or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(directory, CONTROLLER_STATE_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"Resuming at step {state.global_step} but no CaliSr controller state at {path}: pass "
                    "CaliSrCallback(resume_from_checkpoint=<checkpoint dir>) (the phase of each group is needed to "
                    "continue correctly)."
                )
            self.controller.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.controller is None or not state.is_world_process_zero:
            return control
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(directory):
            torch.save(self.controller.state_dict(), os.path.join(directory, CONTROLLER_STATE_NAME))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.uninstall()
        return control


def plot_sr_trajectories(log_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None) -> str:
    """Plot SR(W_LFT) and SR(W_FFT) per group over the steps (and their relative difference), switches marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = []
    with open(log_path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                events.append(json.loads(line))
    measures = [e for e in events if e.get("event") == "measure"]
    switches = [e for e in events if e.get("event") == "switch"]
    groups = list(dict.fromkeys(e["group"] for e in measures + switches))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, g in enumerate(groups):
        color = colors[i % len(colors)]
        rows = [e for e in measures if e["group"] == g]
        steps = [e["step"] for e in rows]
        if rows:
            top.plot(steps, [e["sr_fft"] for e in rows], "-", color=color, label=f"{g}: SR(W_FFT)")
            top.plot(steps, [e["sr_lft"] for e in rows], "--", color=color, label=f"{g}: SR(W_LFT)")
            rel = [(e["sr_fft"] - e["sr_lft"]) / abs(e["sr_fft"]) if e["sr_fft"] else 0.0 for e in rows]
            bottom.plot(steps, rel, "o-", color=color, markersize=3, label=g)
        for e in switches:
            if e["group"] == g:
                for ax in (top, bottom):
                    ax.axvline(e["step"], color=color, linestyle=":", linewidth=1.5)
                top.annotate(
                    f"{g} -> LFT",
                    (e["step"], 1.0),
                    xycoords=("data", "axes fraction"),
                    color=color,
                    rotation=90,
                    va="top",
                    ha="right",
                    fontsize=8,
                )
    bottom.axhline(0.0, color="black", linewidth=0.8)
    top.set_ylabel("aggregated stable rank")
    bottom.set_ylabel("(SR_FFT - SR_LFT) / SR_FFT")
    bottom.set_xlabel("optimizer step")
    if measures:
        top.legend(fontsize=7, ncol=2)
        bottom.legend(fontsize=7)
    top.set_title(title or "CaliSr: stable rank of W_LFT vs W_FFT (> 0 below: LFT has the lower stable rank)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return os.fspath(png_path)
