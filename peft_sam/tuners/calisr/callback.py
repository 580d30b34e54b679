"""``CaliSrCallback``: the transformers ``Trainer`` side of CaliSr (schedule from the Trainer's dataloader, the
controller state saved with every checkpoint and restored on resume)."""

from __future__ import annotations

import math
import os

import torch
from transformers import TrainerCallback

from .controller import CaliSrController
from .optimizer import CaliSrOptimizer

CONTROLLER_STATE_NAME = "calisr_controller.pt"


def find_controller(optimizer) -> CaliSrController | None:
    """The controller of the :class:`CaliSrOptimizer` inside ``optimizer`` (e.g. accelerate's wrapper), if any."""
    while optimizer is not None:
        if isinstance(optimizer, CaliSrOptimizer):
            return optimizer.controller
        optimizer = optimizer.__dict__.get("optimizer")
    return None


class CaliSrCallback(TrainerCallback):
    """CaliSr with the transformers ``Trainer``; the optimizer must be a :class:`CaliSrOptimizer`::

        optimizer = CaliSrOptimizer(torch.optim.AdamW(calisr_param_groups(model), lr=1e-3), model)
        trainer = Trainer(model=model, args=args, train_dataset=..., optimizers=(optimizer, None),
                          callbacks=[CaliSrCallback()])

    At ``on_train_begin`` it gives the controller the steps per epoch (from the train dataloader and
    ``gradient_accumulation_steps``) and the total steps, unless given; ``on_save`` writes the controller state to
    ``checkpoint-N/calisr_controller.pt``, read back when training resumes at step N > 0 (from
    ``resume_from_checkpoint`` if given, else ``output_dir/checkpoint-N``). Under DDP set
    ``TrainingArguments(ddp_find_unused_parameters=True)``.
    """

    def __init__(self, resume_from_checkpoint: str | None = None) -> None:
        self.resume_from_checkpoint = resume_from_checkpoint
        self.controller: CaliSrController | None = None

    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        self.controller = find_controller(optimizer)
        if self.controller is None:
            raise TypeError(
                "CaliSrCallback needs the Trainer's optimizer to be a peft_sam.CaliSrOptimizer: "
                "Trainer(..., optimizers=(CaliSrOptimizer(torch.optim.AdamW(calisr_param_groups(model), lr=...), "
                "model), None), callbacks=[CaliSrCallback()])."
            )
        steps_per_epoch = None
        if train_dataloader is not None:
            try:
                n = len(train_dataloader)
                steps_per_epoch = max(math.ceil(n / max(1, int(args.gradient_accumulation_steps))), 1)
            except TypeError:
                steps_per_epoch = None
        if steps_per_epoch is None and state.max_steps and args.num_train_epochs:
            steps_per_epoch = max(1, math.ceil(state.max_steps / math.ceil(args.num_train_epochs)))
        self.controller.set_schedule(steps_per_epoch=steps_per_epoch, total_steps=state.max_steps or None)
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
