"""SAM calibration on FSDP2-sharded models (``torch.distributed.fsdp.fully_shard``): scores and top-k on the shards.

Under FSDP2 every candidate tensor is a ``DTensor`` sharded on its first dimension; its gradient after backward is
the same shard of the (rank-averaged) gradient. Calibration keeps one float64 score accumulator per *local shard*,
so each rank holds about 1/world_size of the score memory of one process, and the top-k is taken without ever
gathering a whole score tensor: each rank proposes its local top-k (scores with global flat indices), the proposals
are all-gathered, and every rank keeps the same global top-k. That is exact: an entry of the global top-k has fewer
than k entries above it anywhere, so it is in its own rank's local top-k; ties go to the lower flat index, as on one
process.

Every rank must feed the *same* calibration batches: the reference clips each batch's whole gradient to norm 1
before summing, and FSDP only ever holds a rank-average of the ranks' gradients, so per-batch clipping is exact only
when all ranks see the same batch. The batches are checked (a fingerprint all-reduce per batch). FSDP1
(``FullyShardedDataParallel``, flat parameters) is refused with the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "ShardLayout",
    "check_same_batch",
    "is_sharded",
    "refuse_fsdp1",
    "shard_layouts",
    "sharded_grad_norm",
    "sharded_top_entries",
]


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for an FSDP2 (DTensor) parameter."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor as is)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def refuse_fsdp1(model: nn.Module) -> None:
    """FSDP1 flattens parameters into per-rank pieces that are not rows of the weights: calibrate another way."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "select_parameters cannot score an FSDP1 (FullyShardedDataParallel) model: its flat parameter shards are "
            "not whole rows of the weights. Calibrate before wrapping (before accelerator.prepare), or shard with "
            "FSDP2 (torch.distributed.fsdp.fully_shard, accelerate's fsdp_version=2), whose shards select_parameters "
            "scores in place."
        )


class ShardLayout:
    """Where this rank's shard of one candidate tensor sits in the whole tensor (row-major, sharded on dim 0)."""

    def __init__(self, shape: torch.Size, row_offset: int, local_rows: int) -> None:
        self.shape = tuple(shape)
        self.row_numel = 1
        for size in self.shape[1:]:
            self.row_numel *= int(size)
        self.row_offset = row_offset
        self.local_rows = local_rows
        self.numel = int(torch.Size(self.shape).numel())

    @property
    def flat_offset(self) -> int:
        return self.row_offset * self.row_numel

    def global_ids(self, device: torch.device) -> torch.Tensor:
        """Flat indices (in the whole tensor) of this rank's entries."""
        return torch.arange(self.local_rows * self.row_numel, device=device) + self.flat_offset


def shard_layouts(tensors: list[torch.Tensor]) -> list[ShardLayout]:
    """The layout of each (DTensor) candidate on this rank; refuses placements other than FSDP2's Shard(0)."""
    from torch.distributed.tensor import Shard

    world, rank = dist.get_world_size(), dist.get_rank()
    for t in tensors:
        mesh = t.device_mesh
        if mesh.ndim != 1 or mesh.size() != world or tuple(t.placements) != (Shard(0),):
            raise ValueError(
                f"select_parameters scores FSDP2 shards placed Shard(0) on a 1-D mesh over all {world} ranks; got "
                f"placements {tuple(t.placements)} on a mesh of shape {tuple(mesh.shape)}. Calibrate before sharding, "
                "or use fully_shard's default placement on one mesh dimension."
            )
    rows = torch.tensor([local(t).shape[0] if local(t).dim() else 1 for t in tensors], dtype=torch.long)
    gathered = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(gathered, rows)
    before = torch.stack(gathered[:rank]).sum(0) if rank else torch.zeros_like(rows)
    return [ShardLayout(t.shape, int(off), int(n)) for t, off, n in zip(tensors, before, rows)]


def sharded_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of a list of gradients, DTensor shards (summed over ranks) and whole tensors mixed."""
    sharded = [local(g) for g in grads if is_sharded(g)]
    whole = [g for g in grads if not is_sharded(g)]
    device = (sharded or whole)[0].device
    sq_sharded = sum((g.double().square().sum() for g in sharded), torch.zeros((), dtype=torch.float64, device=device))
    dist.all_reduce(sq_sharded)
    sq_whole = sum((g.double().square().sum() for g in whole), torch.zeros((), dtype=torch.float64, device=device))
    return (sq_sharded + sq_whole).sqrt()


def _fingerprint(batch: Any) -> list[float]:
    values: list[float] = []
    if isinstance(batch, Mapping):
        for key in sorted(batch):
            values += _fingerprint(batch[key])
    elif isinstance(batch, (list, tuple)):
        for item in batch:
            values += _fingerprint(item)
    elif isinstance(batch, torch.Tensor):
        flat = batch.detach().reshape(-1).double()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        values += [float(flat.numel()), float(flat.sum()), float((flat * weights).sum())]
    return values


def check_same_batch(batch: Any, index: int) -> None:
    """Raise unless every rank holds the same batch (numel, sum and a position-weighted sum of each tensor)."""
    mine = torch.tensor(_fingerprint(batch), dtype=torch.float64)
    size = torch.tensor([mine.numel()], dtype=torch.long)
    low, high = size.clone(), size.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    same = bool(low == high)
    if same:
        lo, hi = mine.clone(), mine.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        same = bool(torch.equal(lo, hi))
    if not same:
        raise ValueError(
            f"Calibration batch {index} differs between ranks. With FSDP-sharded weights every rank must feed the same "
            "calibration batches (each batch's whole gradient is clipped before it is summed, and FSDP only holds the "
            "ranks' average): pass the same dataloader, unsplit and identically seeded, on every rank."
        )


def _gather_varlen(values: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of 1-D tensors of different lengths."""
    world = dist.get_world_size()
    n = torch.tensor([values.numel()], dtype=torch.long)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def _stable_top(scores: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` ids of the highest scores, ties to the lower id (``ids`` increasing); returned sorted."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=ids.device)
    if k >= scores.numel():
        return ids.clone()
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(ids[order]).values


def sharded_top_entries(
    local_scores: list[torch.Tensor], layouts: list[ShardLayout], p: float, scope: str, floor: float
) -> list[torch.Tensor]:
    """Global top-k indices per candidate from the ranks' score shards: the same on every rank, and the same as
    :func:`~peft_sam.tuners.sam.mask_functions.top_entries` on the whole scores (entries at or below ``floor``
    are never chosen)."""
    if scope not in ("per_tensor", "global"):
        raise ValueError(f"scope must be 'per_tensor' or 'global', got {scope!r}")
    valid = torch.tensor([int((s > floor).sum()) for s in local_scores], dtype=torch.long)
    dist.all_reduce(valid)
    chosen: list[torch.Tensor] = []
    if scope == "per_tensor":
        for s, lay, n_valid in zip(local_scores, layouts, valid.tolist()):
            k = min(int(p * lay.numel), int(n_valid))
            flat = s.reshape(-1).double()
            ids = lay.global_ids(flat.device)
            proposal = _stable_top(flat, ids, min(k, flat.numel()))
            pos = proposal - lay.flat_offset
            all_ids, all_scores = _gather_varlen(proposal), _gather_varlen(flat[pos] if pos.numel() else flat[:0])
            order = torch.argsort(all_ids)
            chosen.append(_stable_top(all_scores[order], all_ids[order], k))
    else:
        bases, total = [], 0
        for lay in layouts:
            bases.append(total)
            total += lay.numel
        k = min(int(p * total), int(valid.sum()))
        flat = torch.cat([s.reshape(-1).double() for s in local_scores])
        ids = torch.cat([lay.global_ids(flat.device) + b for lay, b in zip(layouts, bases)])
        proposal_pos = torch.sort(torch.sort(flat, descending=True, stable=True).indices[: min(k, flat.numel())]).values
        all_ids, all_scores = _gather_varlen(ids[proposal_pos]), _gather_varlen(flat[proposal_pos])
        order = torch.argsort(all_ids)
        picked = _stable_top(all_scores[order], all_ids[order], k)
        for lay, b in zip(layouts, bases):
            chosen.append(picked[(picked >= b) & (picked < b + lay.numel)] - b)
    if sum(c.numel() for c in chosen) == 0:
        largest = max(lay.numel for lay in layouts)
        raise ValueError(
            f"p={p} selects no entry at all (int(p * numel) is 0 for every tensor; the largest has {largest} "
            f"entries). Use p >= {1.0 / largest:.2g} or scope='global'."
        )
    return chosen
