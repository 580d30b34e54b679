"""SAM's mask functions: which base tensors an adapter may train, their scores -> per-tensor or global top-k indices.

The data-free selections (``magnitude``, ``random``, ``bitfit``) happen here, inside ``get_peft_model``; the
gradient-based ones (``sam``, ``fisher``) need training batches and run in :func:`peft_sam.select_parameters`
(``peft_sam/calibration.py``), which scores the same candidates and applies the same top-k.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from .._common import resolve_adapter_config
from .config import DATA_FREE_SELECTIONS, SAMConfig
from .layer import SAMLayer


@dataclass
class Candidate:
    """One base tensor that a SAM adapter may train."""

    name: str  # module path without the PEFT wrapper prefix, e.g. "bert.encoder.layer.0.attention.self.query"
    layer: SAMLayer
    tensor_name: str  # "weight" or "bias"

    @property
    def tensor(self) -> torch.Tensor:
        return self.layer.base_tensor(self.tensor_name)


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


def sam_config(model: nn.Module, adapter_name: str | None) -> tuple[str, SAMConfig]:
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


def apply_entries(
    candidates: list[Candidate], adapter_name: str, indices: list[torch.Tensor], config: SAMConfig
) -> None:
    """Give each candidate tensor its chosen entries (sorted flat indices)."""
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


def exclude_structural_zeros(cand: Candidate, score: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
    """``score`` with the entries that can never receive a gradient set to -inf (an embedding's padding row).

    ``score`` may be a shard of rows starting at ``row_offset`` (FSDP2 calibration).
    """
    base = cand.layer.get_base_layer()
    padding_idx = getattr(base, "padding_idx", None)
    if isinstance(base, nn.Embedding) and padding_idx is not None and cand.tensor_name == "weight":
        row = padding_idx - row_offset
        if 0 <= row < score.shape[0]:
            score = score.clone()
            score[row] = float("-inf")
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
    apply_entries(candidates, adapter_name, indices, config)
    return sum(i.numel() for i in indices)
