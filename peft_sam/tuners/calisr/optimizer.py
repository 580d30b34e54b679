"""``CaliSrOptimizer``: an optimizer whose ``step()`` is CaliSr's (split and measured on measurement steps, the switch
after it), for plain loops, Accelerate and the transformers ``Trainer`` alike."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .controller import CaliSrController


class CaliSrOptimizer(torch.optim.Optimizer):
    """Wraps the torch optimizer of a CaliSr model; everything but ``step()`` is the wrapped optimizer's.

    Build it before ``accelerator.prepare`` (Accelerate then scales, unscales, skips overflowing steps and accumulates
    gradients around it as around any optimizer) and register ``optimizer.controller`` for checkpointing::

        optimizer = CaliSrOptimizer(torch.optim.AdamW(calisr_param_groups(model), lr=2e-5), model,
                                    steps_per_epoch=len(loader), total_steps=epochs * len(loader))
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        accelerator.register_for_checkpointing(optimizer.controller)

    With the ``Trainer``: ``Trainer(..., optimizers=(CaliSrOptimizer(...), None), callbacks=[CaliSrCallback()])``
    (the callback fills in ``steps_per_epoch`` / ``total_steps`` and checkpoints the controller).

    Args:
        optimizer: the torch optimizer over the model's trainable parameters, W_extra included (e.g. built from
            :func:`peft_sam.calisr_param_groups`); per-parameter state, parameters without ``grad`` skipped (Adam,
            AdamW, SGD, ...).
        model: the PeftModel with a CaliSr adapter.
        steps_per_epoch, total_steps, log_path, adapter_name, log_matrices, sr_backend, measure_threads: as for
            :class:`peft_sam.CaliSrController`; ``steps_per_epoch`` / ``total_steps`` may be left for
            :meth:`CaliSrController.set_schedule` (the Trainer callback calls it), the first step raises if needed.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        steps_per_epoch: int | None = None,
        total_steps: int | None = None,
        log_path: str | os.PathLike | None = None,
        **controller_kwargs: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, CaliSrOptimizer):
            raise TypeError(
                f"CaliSrOptimizer wraps a torch.optim.Optimizer (not yet prepared by accelerate), got "
                f"{type(optimizer).__name__}."
            )
        self.optimizer = optimizer
        self.controller = CaliSrController(
            model,
            optimizer,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            log_path=log_path,
            defer_schedule=True,
            **controller_kwargs,
        )
        if steps_per_epoch is not None or total_steps is not None:
            try:
                self.controller.set_schedule(steps_per_epoch, total_steps)
            except ValueError:
                pass  # still open: the Trainer callback (or the first step) completes it

    # the wrapped optimizer's state, groups and hooks are this optimizer's
    @property
    def param_groups(self) -> list[dict]:  # noqa: D102
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # noqa: D102
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict:  # noqa: D102
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.optimizer.defaults = value

    def state_dict(self) -> dict:  # noqa: D102
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:  # noqa: D102
        self.optimizer.add_param_group(param_group)

    def step(self, closure=None):
        """One optimizer step of CaliSr: split in two and measured on measurement steps, then the decisions."""
        return self.controller.step(closure)

    def __getattr__(self, name: str):  # hooks and other optimizer attributes: the wrapped optimizer's
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __getstate__(self) -> dict:
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"CaliSrOptimizer({self.optimizer!r})"
