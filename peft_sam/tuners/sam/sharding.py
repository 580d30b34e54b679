"""SAM calibration on FSDP2-sharded models (``torch.distributed.fsdp.fully_shard``): scores and top-k on the shards.

Under FSDP2 every candidate tensor is a ``DTensor`` sharded on its first dimension; its gradient after backward is
the same shard of the (rank-averaged) gradient. Calibration keeps one float64 score accumulator per *local shard*,
so each rank holds about 1/world_size of the score memory of one process, and the top-k is taken without ever
gathering a whole score tensor: each rank proposes its local top-k (scores with global flat indices), the proposals
are all-gathered, and every rank keeps the same global top-k. That is exact: an entry of the global top-k has fewer
than k entries above it anywhere, so it is in its own rank's local top-k; ties go to the lower flat index, as on one
process.

Memory: per-tensor scope (the default) gathers at most ``world * int(p * numel)`` (score, index) pairs of one tensor
at a time; global scope gathers up to ``world * int(p * total)`` pairs at once (16 bytes each: 4.3 GB per rank for a
7B model on 8 ranks at p = 0.005), so use it only at small ``p``.

Every rank must feed the *same* calibration batches, with the same random seed (dropout): the reference clips each
batch's whole gradient to norm 1 before summing, and FSDP only ever holds a rank-average of the ranks' gradients, so
per-batch clipping is exact only when all ranks see the same batch. Batches and random-number states are checked (a
fingerprint all-reduce per batch, which also makes the ranks stop together). FSDP1 (``FullyShardedDataParallel``,
flat parameters) is refused with the fix.
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
    "comm_device",
    "is_sharded",
    "refuse_fsdp1",
    "shard_layouts",
    "sharded_grad_norm",
    "sharded_top_entries",
]


def comm_device() -> torch.device:
    """Where the collectives' own tensors live: the current CUDA device under NCCL (which refuses CPU tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    plain = [i for i, t in enumerate(tensors) if not is_sharded(t)]
    if plain:
        raise ValueError(
            f"select_parameters found {len(plain)} candidate tensors outside FSDP2's shards next to sharded ones: "
            "call fully_shard on the root module too (after the blocks), so that every weight is sharded."
        )
    for t in tensors:
        mesh = t.device_mesh
        if mesh.ndim != 1 or mesh.size() != world or tuple(t.placements) != (Shard(0),):
            raise ValueError(
                f"select_parameters scores FSDP2 shards placed Shard(0) on a 1-D mesh over all {world} ranks; got "
                f"placements {tuple(t.placements)} on a mesh of shape {tuple(mesh.shape)}. Calibrate before sharding, "
                "or use fully_shard's default placement on one mesh dimension."
            )
    rows = torch.tensor(
        [local(t).shape[0] if local(t).dim() else 1 for t in tensors], dtype=torch.long, device=comm_device()
    )
    gathered = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(gathered, rows)
    before = (torch.stack(gathered[:rank]).sum(0) if rank else torch.zeros_like(rows)).tolist()
    rows = rows.tolist()
    return [ShardLayout(t.shape, int(off), int(n)) for t, off, n in zip(tensors, before, rows)]


def sharded_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of a list of gradients, DTensor shards (summed over ranks) and whole tensors mixed."""
    sharded = [local(g) for g in grads if is_sharded(g)]
    whole = [g for g in grads if not is_sharded(g)]
    device = (sharded or whole)[0].device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    sq_sharded = sum((g.double().square().sum() for g in sharded), zero).to(comm_device())
    dist.all_reduce(sq_sharded)
    sq_whole = sum((g.double().square().sum() for g in whole), zero)
    return (sq_sharded.to(device) + sq_whole).sqrt()


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


def _rng_fingerprint() -> list[float]:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state())
    return [v for state in states for v in _fingerprint(state)]


def _min_max(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = values.to(comm_device()), values.to(comm_device()).clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return low.cpu(), high.cpu()


def check_same_batch(batch: Any | None, index: int) -> bool:
    """Whether the ranks go on: False once every rank is out of batches (``batch`` None).

    Raises unless every rank holds a batch or none does, and unless the batches and the random-number states (dropout)
    agree across ranks (numel, sum and a position-weighted sum of each tensor).
    """
    present = torch.tensor([0.0 if batch is None else 1.0], dtype=torch.float64)
    low, high = _min_max(present)
    if bool(low != high):
        raise ValueError(
            f"The ranks ran out of calibration batches at different counts (batch {index}). With FSDP-sharded weights "
            "every rank must feed the same calibration batches: pass the same dataloader, unsplit, on every rank."
        )
    if batch is None:
        return False
    mine = torch.tensor(_fingerprint(batch) + _rng_fingerprint(), dtype=torch.float64)
    low, high = _min_max(torch.tensor([float(mine.numel())], dtype=torch.float64))
    same = bool(low == high)
    if same:
        low, high = _min_max(mine)
        same = bool(torch.equal(low, high))
    if not same:
        raise ValueError(
            f"Calibration batch {index} (or the random-number state its dropout draws from) differs between ranks. "
            "With FSDP-sharded weights every rank must feed the same calibration batches with the same seed (each "
            "batch's whole gradient is clipped before it is summed, and FSDP only holds the ranks' average): pass the "
            "same dataloader, unsplit, on every rank, and seed every rank alike (torch.manual_seed)."
        )
    return True


def _gather_varlen(values: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of 1-D tensors of different lengths."""
    world, device = dist.get_world_size(), comm_device()
    n = torch.tensor([values.numel()], dtype=torch.long, device=device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=values.dtype, device=device)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(values.device)


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
    valid = torch.tensor([int((s > floor).sum()) for s in local_scores], dtype=torch.long, device=comm_device())
    dist.all_reduce(valid)
    valid = valid.cpu()
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
