"""The CaliSr switch (Algorithm 1 of the paper): measure stable ranks during training, switch groups to LFT.

:class:`CaliSrController` holds the schedule, the measurements, the decisions and the phase of every group; its
:meth:`~CaliSrController.step` is one optimizer step, split in two on measurement steps. Training loops reach it
through :class:`peft_sam.CaliSrOptimizer`, an optimizer wrapper whose ``step()`` is the controller's (so Accelerate,
gradient scaling and LR schedulers see an ordinary optimizer), and the transformers ``Trainer`` through
``Trainer(optimizers=(CaliSrOptimizer(...), None), callbacks=[CaliSrCallback()])``.

On a measurement step (every ``sr_interval`` optimizer steps, while a group still trains W_extra) the step is split
without any extra forward/backward: step the core parameters (the W_extra gradients hidden), measure SR(W_LFT) =
SR(W_core_new + W_extra_old) per group; step W_extra (core gradients hidden), measure SR(W_FFT) = SR(W_core_new +
W_extra_new). With per-parameter optimizers (Adam, AdamW, SGD, ...) that skip parameters without a gradient, the two
halves are exactly one ordinary step. SRS = share of a group's recent measurements with SR(W_LFT) < SR(W_FFT);
SRS > delta switches the group (or the whole model, variant D) to LFT for good.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .config import CaliSrConfig
from .layer import CaliSrLayer
from .measure import StableRankMeter, is_distributed
from .model import _calisr_config, calisr_layers
from .param_groups import unwrap_model

STATE_VERSION = 2
REST = "rest"  # the switch event of the tensors outside every group (they stop with the last group)


def _short(name: str) -> str:
    for prefix in ("module.base_model.model.", "base_model.model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    from .optimizer import CaliSrOptimizer

    if isinstance(optimizer, CaliSrOptimizer):
        return optimizer.optimizer
    if isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        raise TypeError(
            f"CaliSrController got a {type(optimizer).__name__} wrapping an optimizer (e.g. accelerate's "
            "AcceleratedOptimizer): wrap the torch optimizer in peft_sam.CaliSrOptimizer *before* "
            "accelerator.prepare, so that gradient scaling and accumulation happen around CaliSr's step."
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"CaliSrController needs a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    return optimizer


class CaliSrController:
    """Runs CaliSr's measurements and switches around one torch optimizer.

    Usually created by :class:`peft_sam.CaliSrOptimizer` (``optimizer.controller``); a loop that holds a controller
    directly calls :meth:`step` instead of ``optimizer.step()``.

    Args:
        model: the PeftModel with a CaliSr adapter (DDP-wrapped is fine; under DDP ``find_unused_parameters`` must be
            True: after a switch W_extra takes no part in the backward pass).
        optimizer: the torch optimizer over the model's trainable parameters, W_extra included; it must keep
            per-parameter state and skip parameters whose ``grad`` is None (true of torch's Adam, AdamW, SGD, ...).
        steps_per_epoch: optimizer steps per epoch; the default decision period (``decide_every=None``).
        total_steps: total optimizer steps; needed by ``switch_at`` (the fixed-switch control).
        log_path: JSONL file receiving every measurement, decision and switch (rank 0 only; appended to).
        adapter_name: the CaliSr adapter to control (default: the active one).
        log_matrices: also log each matrix's SR(W_LFT) and SR(W_FFT) (``"matrices": {name: [lft, fft]}``); the
            latest per-matrix values are always kept in ``last_matrix_srs``.
        sr_backend: ``"auto"`` (default): ``"gram"`` for weights on the CPU, ``"certified"`` on accelerators;
            ``"svd"``: float64 ``svdvals``; ``"gram"``: float64 Gram matrix + ``eigvalsh``
            (:func:`peft_sam.tuners.calisr.gram_stable_ranks`), equally exact and ~2.5x faster on CPU;
            ``"certified"``: float64 Gram matrix, warm-started block subspace iteration and a Cholesky certificate
            (:func:`peft_sam.ops.stable_rank.certified_stable_ranks`): sigma_1^2 within 1e-10 relative, no
            decomposition, for GPUs (where float64 ``svdvals`` of the 36 MiniLM matrices took 58-72 % of a CaliSr
            run's training time). A measurement whose two group sums differ by less than the backend's error bound
            (1e-10 relative for ``"certified"``, 1e-12 for the exact ones) casts no vote (``"lft_lower": null`` in the
            log): every vote counted is the float64 outcome.
        measure_threads: threads per LAPACK call while measuring (default 1; None keeps the process setting). LAPACK's
            SVD/eigensolvers gain nothing from threads on BERT-size matrices, and on a busy machine their thread
            barriers cost 5-25x (measured on a busy 2-core CPU: 1.2 s vs 7-33 s for MiniLM's 36 matrices). On CPU the
            process's threads instead work on different matrices at once.
        defer_schedule: do not require ``steps_per_epoch`` / ``total_steps`` yet (the Trainer callback sets them
            with :meth:`set_schedule` when training starts); the first step raises if they are still missing.
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
        sr_backend: str = "auto",
        measure_threads: int | None = 1,
        defer_schedule: bool = False,
    ) -> None:
        self.model = model
        self.peft_model = unwrap_model(model)
        self.adapter_name, self.config = _calisr_config(self.peft_model, adapter_name)
        self.meter = StableRankMeter(
            self.adapter_name, sr_backend, self.config.sr_target == "weight", measure_threads=measure_threads
        )
        self.log_matrices = log_matrices
        # {"step": t, "lft": {module name: SR}, "fft": {module name: SR}} of the latest measurement
        self.last_matrix_srs: dict = {}
        self.optimizer = _torch_optimizer(optimizer)
        self.log_path = os.fspath(log_path) if log_path is not None else None
        self._check_ddp(model)

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
        present = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [
            n
            for n, layer in [item for g in self.groups for item in self.layers[g]] + self.followers
            if any(id(p) not in present for p in layer.extra_parameters(self.adapter_name))
        ]
        if missing:
            raise ValueError(
                f"W_extra of {len(missing)} CaliSr layers (e.g. {missing[0]}) is not in the optimizer: build the "
                "optimizer from the model's trainable parameters after get_peft_model (e.g. with "
                "peft_sam.calisr_param_groups(model)) and before creating the controller."
            )

        # state
        self.global_step = 0
        self.phase: dict[str, str] = {g: "fft" for g in self.groups}
        self.switched_at: dict[str, int | None] = {g: None for g in self.groups}
        self.window: dict[str, list[bool]] = {g: [] for g in self.groups}
        self.history: list[dict] = []
        self.measure_seconds = 0.0

        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self._scheduled = False
        if not defer_schedule:
            self.set_schedule(steps_per_epoch, total_steps)

    # ------------------------------------------------------------------ schedule
    def set_schedule(self, steps_per_epoch: int | None = None, total_steps: int | None = None) -> None:
        """Fix the decision period and measurement interval (from ``steps_per_epoch`` / ``total_steps`` where the
        config leaves them open); values already given are kept."""
        cfg: CaliSrConfig = self.config
        self.steps_per_epoch = self.steps_per_epoch or steps_per_epoch
        self.total_steps = self.total_steps or total_steps
        self.srs_window = cfg.srs_window
        self.decide_every = cfg.decide_every or self.steps_per_epoch
        self.switch_step: int | None = None
        if cfg.switch_at is not None:
            if self.total_steps is None:
                raise ValueError(
                    "CaliSrConfig.switch_at (fixed-switch control) needs the total number of optimizer steps: "
                    "CaliSrOptimizer(..., total_steps=num_epochs * steps_per_epoch)."
                )
            self.switch_step = int(round(float(cfg.switch_at) * int(self.total_steps)))
        elif self.srs_window is None and self.decide_every is None:
            raise ValueError(
                "CaliSr decides once per epoch by default: pass steps_per_epoch=len(train_dataloader) // "
                "gradient_accumulation_steps, or set CaliSrConfig.decide_every or srs_window."
            )
        period = self.decide_every if self.srs_window is None else self.steps_per_epoch
        if cfg.sr_interval is not None:
            self.sr_interval = int(cfg.sr_interval)
        elif self.switch_step is not None:
            self.sr_interval = 0  # the fixed-switch control measures nothing
        elif period is None:
            raise ValueError("Set CaliSrConfig.sr_interval (steps between measurements) or pass steps_per_epoch.")
        else:
            self.sr_interval = max(1, int(period) // (self.srs_window or 5))
        if self.switch_step is None and self.srs_window is None and self.sr_interval > int(self.decide_every):
            warnings.warn(
                f"CaliSr measures every {self.sr_interval} steps but decides every {self.decide_every}: some decisions "
                "will see no measurement (and never switch). Lower sr_interval or raise decide_every.",
                stacklevel=2,
            )
        self._scheduled = True
        if self.switch_step is not None and self.switch_step <= self.global_step:
            self._switch(self.active_groups, step=self.global_step, reason="switch_at", srs=None)

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
    def sr_backend(self) -> str:
        return self.meter.sr_backend

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
    def step(self, closure=None):
        """One optimizer step; split and measured on measurement steps."""
        if not self._scheduled:
            self.set_schedule()
        t = self.global_step + 1
        result = None
        if self.is_measurement_step(t) and self.switch_step is None:
            if closure is not None:
                raise ValueError("CaliSr does not support optimizer closures on measurement steps.")
            self._split_step(t)
        else:
            result = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.global_step = t
        self._after_step(t)
        return result

    def _step_without(self, hidden: list[nn.Parameter]) -> None:
        """``optimizer.step()`` with the gradients of ``hidden`` set aside (those parameters are skipped)."""
        grads = [p.grad for p in hidden]
        for p in hidden:
            p.grad = None
        try:
            self.optimizer.step()
        finally:
            for p, g in zip(hidden, grads):
                p.grad = g

    def _split_step(self, t: int) -> None:
        groups = self.active_groups
        extras = [p for g in groups for p in self.extras[g]] + self.follower_extras
        extra_ids = {id(p) for p in extras}
        self._step_without(extras)  # W_core (and everything else but W_extra)
        sr_lft, lft_matrices = self._measure(groups)
        core = [
            p
            for group in self.optimizer.param_groups
            for p in group["params"]
            if id(p) not in extra_ids and p.grad is not None
        ]
        self._step_without(core)  # W_extra
        sr_fft, fft_matrices = self._measure(groups)
        self.last_matrix_srs = {"step": t, "lft": lft_matrices, "fft": fft_matrices}
        bound = self.meter.rtol
        for g in groups:
            lft, fft = sr_lft[g][0], sr_fft[g][0]
            lower = bool(lft < fft) if abs(fft - lft) > bound * (abs(lft) + abs(fft)) else None
            if lower is not None:  # a tie within the error bound casts no vote
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
                event["matrices"] = {
                    _short(n): [lft_matrices.get(n), fft_matrices.get(n)] for n, _ in self.layers[g]
                }
            self._record(event)

    # ------------------------------------------------------------------ measurement
    def _measure(self, groups) -> tuple[dict[str, tuple[float, int]], dict[str, float]]:
        started = time.perf_counter()
        values = self.meter([(g, name, layer) for g in groups for name, layer in self.layers[g]])
        self.measure_seconds += time.perf_counter() - started
        return values, self.meter.last_matrix_values

    def measure(self) -> dict[str, float]:
        """Aggregated SR of each group's current effective weight (for inspection; not logged)."""
        return {g: v for g, (v, _) in self._measure(self.groups)[0].items()}

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
        if not is_distributed() or not flags:
            return flags
        device = self.extras[self.groups[0]][0].device
        tensor = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int64, device=device)
        dist.broadcast(tensor, src=0)
        return [bool(v) for v in tensor.tolist()]

    def _freeze(self, layers: Iterable[tuple[str, CaliSrLayer]], params: Iterable[nn.Parameter]) -> None:
        """No gradient and no optimizer state any more; the parameters stay in their optimizer groups (optimizers
        skip parameters without a gradient), so the optimizer's state-dict layout never changes."""
        for _, layer in layers:
            layer.freeze_extra(self.adapter_name)
        for p in params:
            self.optimizer.state.pop(p, None)

    def _switch(self, groups: Iterable[str], step: int, reason: str, srs: dict | None, log: bool = True) -> None:
        """Stop training W_extra of ``groups`` for good (and of the tensors outside every group with the last)."""
        groups = [g for g in groups if self.phase[g] == "fft"]
        if not groups:
            return
        for g in groups:
            self._freeze(self.layers[g], self.extras[g])
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
        if self.all_switched and self.followers:
            self._freeze(self.followers, self.follower_extras)
            if log:
                self._record(
                    {
                        "event": "switch",
                        "step": step,
                        "group": REST,
                        "reason": "last group switched",
                        "num_modules": len(self.followers),
                        "extra_entries": sum(p.numel() for p in self.follower_extras),
                    }
                )

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
            "sr_bases": {n: b.cpu() for n, b in self.meter.bases.items()},  # warm starts: resume stays identical
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; groups that had switched are switched again (frozen, state dropped)."""
        if state.get("version") not in (1, STATE_VERSION):
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
        self.meter.bases = dict(state.get("sr_bases", {}))
        self._unswitch([g for g in self.groups if state["phase"][g] == "fft"])
        for g in self.groups:
            if state["phase"][g] == "lft":
                self._switch([g], step=int(state["switched_at"][g] or 0), reason="resume", srs=None, log=False)
            self.switched_at[g] = state["switched_at"][g]

    # ------------------------------------------------------------------ logging
    def _record(self, event: dict) -> None:
        event = {"adapter": self.adapter_name, **event}
        self.history.append(event)
        if self.log_path is None or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")

    def summary(self) -> dict:
        """Phase per group, switch steps, number of measurements and the time spent measuring."""
        return {
            "phase": dict(self.phase),
            "switched_at": dict(self.switched_at),
            "measurements": sum(1 for e in self.history if e["event"] == "measure"),
            "undecided": sum(1 for e in self.history if e["event"] == "measure" and e["lft_lower"] is None),
            "matrices_measured": self.meter.matrices_measured,
            "certified_fallbacks": self.meter.fallbacks,
            "measure_seconds": self.measure_seconds,
            "sr_interval": self.sr_interval if self._scheduled else None,
            "decide_every": self.decide_every if self._scheduled else None,
            "srs_window": self.config.srs_window,
            "sr_backend": self.sr_backend,
            "measure_threads": self.meter.measure_threads,
        }
