"""SAM calibration: the gradient-based choice of an adapter's trained entries from training batches at theta_0.

``select_parameters`` is the calibration step of the SAM paper's reference code: ``num_calibration_batches``
training batches at theta_0 with dropout on, no optimizer step, each batch's gradient clipped to global norm
``calibration_clip_norm`` and then summed with its sign; score = |sum g| (``sam``) or sum g^2 (``fisher``).
Under ``torch.distributed`` the score sums are all-reduced before the top-k and rank 0's indices are broadcast,
so every process holds the same mask. On an FSDP2-sharded model (``fully_shard``) each rank scores its own shards
(about 1/world_size of the score memory) and the top-k is taken across shards (``tuners/sam/sharding.py``); every
rank then feeds the same batches. Candidates, scores -> top-k and the data-free selections (``magnitude``,
``random``, ``bitfit``, run inside ``get_peft_model``) are the SAM tuner's (``tuners/sam/mask_functions.py``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import get_total_norm
from tqdm.auto import tqdm

from .tuners.calisr.model import sam_selection_view
from .tuners.sam import sharding
from .tuners.sam.config import DATA_FREE_SELECTIONS, GRADIENT_SELECTIONS
from .tuners.sam.mask_functions import (
    STRUCTURAL_ZERO_RTOL,
    Candidate,
    apply_entries,
    exclude_structural_zeros,
    find_candidates,
    sam_config,
    select_data_free,
    top_entries,
)


@dataclass
class SelectionSummary:
    """What a selection did (returned by :func:`select_parameters`)."""

    method: str
    scope: str
    p: float
    num_selected: int
    num_candidates: int
    num_tensors: int
    num_batches: int
    seconds: float
    score_bytes: int = 0  # this process's score accumulators (float64; FSDP2: its shards only)


def _broadcast_from_rank0(indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Make every rank use rank 0's indices (per-tensor sizes are equal on all ranks in per_tensor scope)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return indices
    device = sharding.comm_device()  # NCCL refuses CPU tensors
    sizes = torch.tensor([i.numel() for i in indices], dtype=torch.long, device=device)
    dist.broadcast(sizes, src=0)
    if dist.get_rank() == 0:
        flat = torch.cat(indices).to(device)
    else:
        flat = torch.empty(int(sizes.sum()), dtype=torch.long, device=device)
    dist.broadcast(flat, src=0)
    return list(torch.split(flat.cpu(), sizes.tolist()))


# ---------------------------------------------------------------------------------------------------- calibration
def _move_batch(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: _move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move_batch(v, device) for v in batch)
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    outputs = model(**batch) if isinstance(batch, Mapping) else model(*batch)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            "The model returned no loss for a calibration batch: include 'labels' in the batches or pass "
            "loss_fn=lambda model, batch: ... to select_parameters."
        )
    return loss


def _take(dataloader: Iterable, num_batches: int, sharded: bool) -> Iterator[Any]:
    """Up to ``num_batches`` batches; on FSDP2 shards every rank checks that all ranks hold the same batch (and stop
    together), so that no rank leaves for a collective the others are not in."""
    batches = iter(dataloader)
    for index in range(num_batches):
        batch = next(batches, None)
        if sharded and not sharding.check_same_batch(batch, index):
            return
        if batch is None:
            return
        yield batch


def gradient_scores(
    model: nn.Module,
    candidates: list[Candidate],
    dataloader: Iterable,
    *,
    method: str,
    num_batches: int,
    clip_norm: float | None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    show_progress: bool = True,
) -> tuple[list[torch.Tensor], int]:
    """Per-candidate score sums over up to ``num_batches`` batches (all-reduced across processes).

    Adapters are switched off while the gradients are taken, so the scores are those of theta_0. FSDP2-sharded
    candidates get accumulators of their local shard only, and every rank must feed the same batches.
    """
    loss_fn = loss_fn or _default_loss
    tensors = [c.tensor for c in candidates]
    sharded = any(sharding.is_sharded(t) for t in tensors)
    sums = [torch.zeros(sharding.local(t).shape, dtype=torch.float64, device=t.device) for t in tensors]
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    layers = list({id(c.layer): c.layer for c in candidates}.values())
    was_training = model.training
    device = tensors[0].device
    for layer in layers:
        layer.enable_adapters(False)
    for p, _ in saved_flags:
        p.requires_grad_(False)
    trainable = [p for p, flag in saved_flags if flag]
    for t in tensors:
        t.requires_grad_(True)
    clip_params = list({id(p): p for p in trainable + tensors}.values())
    for p in clip_params:
        p.requires_grad_(True)
    model.train()
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    done = 0
    try:
        progress = tqdm(total=num_batches, desc=f"SAM calibration ({method})", disable=not (show_progress and rank0))
        for batch in _take(dataloader, num_batches, sharded):
            model.zero_grad(set_to_none=True)
            batch = _move_batch(batch, device)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Calibration batch {done} gave a non-finite loss ({loss.item()}).")
            loss.backward()
            grads = [p.grad for p in clip_params if p.grad is not None]
            total_norm = sharding.sharded_grad_norm(grads) if sharded else get_total_norm(grads)
            if not torch.isfinite(total_norm):
                bad = [
                    c.name for c, t in zip(candidates, tensors) if t.grad is not None and not t.grad.isfinite().all()
                ]
                where = f"first in {bad[0]}" if bad else "in the task head"
                raise FloatingPointError(
                    f"Calibration batch {done} produced NaN/inf gradients ({where}): check the inputs and labels of "
                    "that batch, and fp16 overflow in the forward pass."
                )
            coef = 1.0 if clip_norm is None else min(1.0, float(clip_norm) / (float(total_norm) + 1e-6))
            for acc, t in zip(sums, tensors):
                if t.grad is None:
                    continue
                grad = sharding.local(t.grad)
                if method == "sam":  # float64 accumulation without a float64 copy of each gradient
                    acc.add_(grad, alpha=coef)
                else:
                    acc.addcmul_(grad, grad, value=coef * coef)
            done += 1
            progress.update(1)
        progress.close()
    finally:
        model.zero_grad(set_to_none=True)
        for t in tensors:
            t.grad = None
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        for t in tensors:
            t.requires_grad_(False)
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in saved_flags:  # enable_adapters re-derives adapter flags; restore exactly what we found
            p.requires_grad_(flag)
        model.train(was_training)
    count = torch.tensor([done], dtype=torch.long, device=device)
    # FSDP2: every rank fed the same batches, so the shards' sums are already the sums over them
    if not sharded and dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        for acc in sums:
            dist.all_reduce(acc)
    if int(count.item()) == 0:
        raise ValueError("The calibration dataloader yielded no batch: pass a non-empty training dataloader.")
    scores = [acc.abs() if method == "sam" else acc for acc in sums]
    return scores, int(count.item())


def select_parameters(
    model: nn.Module,
    dataloader: Iterable | None = None,
    *,
    adapter_name: str | None = None,
    method: str | None = None,
    num_batches: int | None = None,
    clip_norm: float | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    show_progress: bool = True,
) -> SelectionSummary:
    """Pick the trained entries of a SAM adapter (the calibration step); call before building the optimizer.

    Args:
        model: a ``PeftModel`` (or a model with SAM layers injected) holding a SAM adapter.
        dataloader: training batches (dicts accepted by ``model(**batch)`` with labels) for ``sam``/``fisher``.
        adapter_name: which adapter (default: the active one).
        method: override ``config.selection`` (any of sam, fisher, magnitude, random, bitfit).
        num_batches: override ``config.num_calibration_batches``.
        clip_norm: override ``config.calibration_clip_norm``.
        loss_fn: ``loss_fn(model, batch) -> loss`` when the model does not return ``.loss`` itself.
        show_progress: show a tqdm bar (rank 0 only).
    """

    with sam_selection_view(model, adapter_name):
        return _select_parameters(
            model, dataloader, adapter_name, method, num_batches, clip_norm, loss_fn, show_progress
        )


def _select_parameters(model, dataloader, adapter_name, method, num_batches, clip_norm, loss_fn, show_progress):
    start = time.perf_counter()
    adapter_name, config = sam_config(model, adapter_name)
    method = method or config.selection
    sharding.refuse_fsdp1(model)
    candidates = find_candidates(model, adapter_name, config.p)
    num_candidates = sum(c.tensor.numel() for c in candidates)
    if method in DATA_FREE_SELECTIONS:
        if any(sharding.is_sharded(c.tensor) for c in candidates):
            raise ValueError(
                f"The data-free selection {method!r} runs on whole tensors, inside get_peft_model: choose it in "
                "SAMConfig(selection=...) before sharding the model, not in select_parameters on FSDP2 shards."
            )
        cfg = copy.copy(config)
        cfg.selection = method
        num = select_data_free(model, adapter_name, cfg)
        return SelectionSummary(
            method,
            config.scope,
            config.p,
            num,
            num_candidates,
            len(candidates),
            0,
            time.perf_counter() - start,
        )
    if method not in GRADIENT_SELECTIONS:
        raise ValueError(f"method must be one of {GRADIENT_SELECTIONS + DATA_FREE_SELECTIONS}, got {method!r}.")
    if dataloader is None:
        raise ValueError(f"selection {method!r} needs training batches: select_parameters(model, train_dataloader).")
    scores, used = gradient_scores(
        model,
        candidates,
        dataloader,
        method=method,
        num_batches=int(num_batches or config.num_calibration_batches),
        clip_norm=config.calibration_clip_norm if clip_norm is None else clip_norm,
        loss_fn=loss_fn,
        show_progress=show_progress,
    )
    score_bytes = sum(s.numel() * s.element_size() for s in scores)
    if any(sharding.is_sharded(c.tensor) for c in candidates):
        layouts = sharding.shard_layouts([c.tensor for c in candidates])
        scores = [
            exclude_structural_zeros(c, s.cpu(), lay.row_offset) for c, s, lay in zip(candidates, scores, layouts)
        ]
        largest = max((float(s.max()) for s in scores if s.numel()), default=float("-inf"))
        largest = torch.tensor(largest, dtype=torch.float64, device=sharding.comm_device())
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        floor = STRUCTURAL_ZERO_RTOL * float(largest)
        indices = sharding.sharded_top_entries(scores, layouts, config.p, config.scope, floor)
        for c in candidates:  # FSDP owns these tensors (whole only inside its forward): training here is refused
            c.layer._sam_on_shards = True
    else:
        scores = [exclude_structural_zeros(c, s.cpu()) for c, s in zip(candidates, scores)]
        largest = max(float(s.max()) for s in scores if s.numel())
        indices = top_entries(scores, config.p, config.scope, floor=STRUCTURAL_ZERO_RTOL * largest)
        indices = _broadcast_from_rank0(indices)
    apply_entries(candidates, adapter_name, indices, config)
    return SelectionSummary(
        method,
        config.scope,
        config.p,
        sum(i.numel() for i in indices),
        num_candidates,
        len(candidates),
        used,
        time.perf_counter() - start,
        score_bytes,
    )
