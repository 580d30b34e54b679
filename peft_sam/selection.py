"""Choosing the trained entries of a SAM adapter: importance scores -> per-tensor or global top-k indices.

``select_parameters`` is the calibration step of the SAM paper's reference code: ``num_calibration_batches``
training batches at theta_0 with dropout on, no optimizer step, each batch's gradient clipped to global norm
``calibration_clip_norm`` and then summed with its sign; score = |sum g| (``sam``) or sum g^2 (``fisher``).
Under ``torch.distributed`` the score sums are all-reduced before the top-k and rank 0's indices are broadcast,
so every process holds the same mask. Data-free selections (``magnitude``, ``random``, ``bitfit``) run inside
``get_peft_model`` through :func:`select_data_free`.
"""

from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import get_total_norm
from tqdm.auto import tqdm

from .tuners._common import resolve_adapter_config
from .tuners.sam.config import DATA_FREE_SELECTIONS, GRADIENT_SELECTIONS, SAMConfig
from .tuners.sam.layer import SAMLayer


@dataclass
class Candidate:
    """One base tensor that a SAM adapter may train."""

    name: str  # module path without the PEFT wrapper prefix, e.g. "bert.encoder.layer.0.attention.self.query"
    layer: SAMLayer
    tensor_name: str  # "weight" or "bias"

    @property
    def tensor(self) -> torch.Tensor:
        return self.layer.base_tensor(self.tensor_name)


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


def _strip_wrapper_prefix(name: str) -> str:
    for prefix in ("base_model.model.", "module.base_model.model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def find_candidates(model: nn.Module, adapter_name: str, p: float | None = None) -> list[Candidate]:
    """All (layer, tensor) pairs in which ``adapter_name`` may choose entries, in module order."""
    found, sizes = [], []
    for name, module in model.named_modules():
        if isinstance(module, SAMLayer) and adapter_name in module.sam_candidates:
            sizes += [module.base_tensor(t).numel() for t in module.adapted_tensor_names()]
            for tensor_name in module.sam_candidates[adapter_name]:
                found.append(Candidate(_strip_wrapper_prefix(name), module, tensor_name))
    if not sizes:
        raise ValueError(
            f"The model has no SAM layers for adapter {adapter_name!r}: create it with "
            "get_peft_model(model, SAMConfig(...)) first."
        )
    if not found:
        raise ValueError(
            f"p={p} selects no entry at all: int(p * numel) is 0 for every adapted tensor (the largest has "
            f"{max(sizes)} entries). Use p >= {1.0 / max(sizes):.2g} or scope='global'."
        )
    return found


def _sam_config(model: nn.Module, adapter_name: str | None) -> tuple[str, SAMConfig]:
    return resolve_adapter_config(model, adapter_name, SAMConfig, "get_peft_model(model, SAMConfig(...))")


# ---------------------------------------------------------------------------------------------------- top-k
def top_entries(
    scores: list[torch.Tensor], p: float, scope: str, names: list[str] | None = None, floor: float | None = None
):
    """Indices (sorted int64 per tensor) of the top-scored entries: int(p*numel) each, or int(p*total) globally.

    Entries scored ``-inf`` or at most ``floor`` are never chosen (a tensor may then get fewer, or none). Ties are
    broken by the lower flat index, so the result is deterministic.
    """
    floor = float("-inf") if floor is None else floor
    if scope == "per_tensor":
        chosen = [
            _topk_stable(s.reshape(-1), min(int(p * s.numel()), int((s > floor).sum()))) for s in scores
        ]
    elif scope == "global":
        flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scores])
        picked = _topk_stable(flat, min(int(p * flat.numel()), int((flat > floor).sum())))
        chosen, start = [], 0
        for s in scores:
            in_range = picked[(picked >= start) & (picked < start + s.numel())]
            chosen.append(in_range - start)
            start += s.numel()
    else:
        raise ValueError(f"scope must be 'per_tensor' or 'global', got {scope!r}")
    if sum(c.numel() for c in chosen) == 0:
        smallest = min(scores, key=lambda s: s.numel()).numel()
        largest = max(scores, key=lambda s: s.numel()).numel()
        raise ValueError(
            f"p={p} selects no entry at all (int(p * numel) is 0 for every tensor; the largest has {largest} entries, "
            f"the smallest {smallest}). Use p >= {1.0 / largest:.2g} or scope='global'."
        )
    return chosen


def _topk_stable(score: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    if k >= score.numel():
        return torch.arange(score.numel(), device=score.device)
    order = torch.sort(score, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def _broadcast_from_rank0(indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Make every rank use rank 0's indices (per-tensor sizes are equal on all ranks in per_tensor scope)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return indices
    sizes = torch.tensor([i.numel() for i in indices], dtype=torch.long)
    dist.broadcast(sizes, src=0)
    flat = torch.cat(indices) if dist.get_rank() == 0 else torch.empty(int(sizes.sum()), dtype=torch.long)
    dist.broadcast(flat, src=0)
    return list(torch.split(flat, sizes.tolist()))


def _apply(candidates: list[Candidate], adapter_name: str, indices: list[torch.Tensor], config: SAMConfig) -> None:
    for cand, idx in zip(candidates, indices):
        cand.layer.set_entries(adapter_name, cand.tensor_name, idx, config=config)


# ---------------------------------------------------------------------------------------------------- data-free
def data_free_scores(candidates: list[Candidate], config: SAMConfig) -> list[torch.Tensor]:
    """Scores of the data-free selections: |theta_0| (magnitude), seeded uniform noise (random), biases (bitfit)."""
    scores = []
    for cand in candidates:
        tensor = cand.tensor.detach()
        if config.selection == "magnitude":
            scores.append(tensor.abs().float().cpu())
        elif config.selection == "random":
            # a per-tensor stream, so that two layers of the same shape get different masks
            gen = torch.Generator().manual_seed(int(config.seed) * 1_000_003 + zlib.crc32(cand.name.encode()))
            scores.append(torch.rand(tensor.shape, generator=gen))
        elif config.selection == "bitfit":
            scores.append(torch.full(tensor.shape, 1.0 if cand.tensor_name == "bias" else 0.0))
        else:
            raise ValueError(f"{config.selection!r} is not a data-free selection {DATA_FREE_SELECTIONS}.")
    return [exclude_structural_zeros(c, s) for c, s in zip(candidates, scores)]


# Entries whose calibration score is below this fraction of the largest score have a gradient that is zero by
# construction, seen through float rounding (e.g. the key-projection bias under softmax attention, whose gradient
# cancels over the keys: ~1e-9 of the other tensors' on BERT); they are never selected.
STRUCTURAL_ZERO_RTOL = 1e-6


def exclude_structural_zeros(cand: Candidate, score: torch.Tensor) -> torch.Tensor:
    """``score`` with the entries that can never receive a gradient set to -inf (an embedding's padding row)."""
    base = cand.layer.get_base_layer()
    padding_idx = getattr(base, "padding_idx", None)
    if isinstance(base, nn.Embedding) and padding_idx is not None and cand.tensor_name == "weight":
        score = score.clone()
        score[padding_idx] = float("-inf")
    return score


def select_data_free(model: nn.Module, adapter_name: str, config: SAMConfig) -> int:
    """Choose the entries of a data-free selection; returns how many were chosen."""
    candidates = find_candidates(model, adapter_name, config.p)
    scores = data_free_scores(candidates, config)
    if config.selection == "bitfit":
        indices = [torch.nonzero(s.reshape(-1)).reshape(-1) for s in scores]
        if sum(i.numel() for i in indices) == 0:
            raise ValueError("selection='bitfit' found no bias in the adapted modules.")
    else:
        indices = top_entries(scores, config.p, config.scope)
    _apply(candidates, adapter_name, indices, config)
    return sum(i.numel() for i in indices)


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

    Adapters are switched off while the gradients are taken, so the scores are those of theta_0.
    """
    loss_fn = loss_fn or _default_loss
    tensors = [c.tensor for c in candidates]
    sums = [torch.zeros(t.shape, dtype=torch.float64, device=t.device) for t in tensors]
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
        for batch in dataloader:
            if done >= num_batches:
                break
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, _move_batch(batch, device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Calibration batch {done} gave a non-finite loss ({loss.item()}).")
            loss.backward()
            total_norm = get_total_norm([p.grad for p in clip_params if p.grad is not None])
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
                if method == "sam":  # float64 accumulation without a float64 copy of each gradient
                    acc.add_(t.grad, alpha=coef)
                else:
                    acc.addcmul_(t.grad, t.grad, value=coef * coef)
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
    if dist.is_available() and dist.is_initialized():
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
    from .tuners.calisr.model import sam_selection_view  # a CaliSr(SAM) adapter is calibrated like plain SAM

    with sam_selection_view(model, adapter_name):
        return _select_parameters(
            model, dataloader, adapter_name, method, num_batches, clip_norm, loss_fn, show_progress
        )


def _select_parameters(model, dataloader, adapter_name, method, num_batches, clip_norm, loss_fn, show_progress):
    start = time.perf_counter()
    adapter_name, config = _sam_config(model, adapter_name)
    method = method or config.selection
    candidates = find_candidates(model, adapter_name, config.p)
    num_candidates = sum(c.tensor.numel() for c in candidates)
    if method in DATA_FREE_SELECTIONS:
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
    scores = [exclude_structural_zeros(c, s.cpu()) for c, s in zip(candidates, scores)]
    largest = max(float(s.max()) for s in scores if s.numel())
    indices = top_entries(scores, config.p, config.scope, floor=STRUCTURAL_ZERO_RTOL * largest)
    indices = _broadcast_from_rank0(indices)
    _apply(candidates, adapter_name, indices, config)
    return SelectionSummary(
        method,
        config.scope,
        config.p,
        sum(i.numel() for i in indices),
        num_candidates,
        len(candidates),
        used,
        time.perf_counter() - start,
    )
