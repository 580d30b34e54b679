"""Model-level work of a SAM training step, batched over every layer: a few kernels instead of a few per tensor.

A SAM layer keeps ``W0 + Delta`` in its base tensors and refreshes them after each optimizer step; done layer by
layer, that is one ``index_put_`` per adapted tensor (97 on MiniLM), and the norms' and biases' entries each gather
their gradient from the dense one (57 more). :class:`BatchedStep` does both for the whole model, once per forward
(``SAMModel.forward`` runs the model inside :meth:`BatchedStep.step`):

* **arenas**: the base tensors of the layers in the plain training state (one active adapter, its offsets applied)
  are moved into a few flat buffers (at most ``ARENA_ELEMENTS`` elements each, in module order), so one
  ``index_put_`` per buffer writes every entry: ``W0 + Delta`` is one ``cat`` of the values and one ``add``. The
  layout stays while adapters are disabled or switched (W0 is written back in place); tensors get their own storage
  back when their layer is unloaded, state dicts always hold copies of arena tensors, and a copied or moved model
  never shares the storage.
* **one tap for the small tensors**: every adapted 1-D tensor (norm weights and biases, Linear biases) is handed to
  its layer through one autograd node, whose backward concatenates their dense gradients (which the layers' own
  backward computes, as full fine-tuning does) and gathers all entries at once.

Layers used outside this context (a submodule called directly, recomputation under reentrant checkpointing,
``functional_call``) refresh and tap themselves, with the same results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .layer import TENSOR_SLOTS, W0_SLOTS, SAMLayer

# most elements in one arena: bounds the extra memory of moving tensors into or out of an arena to one buffer
ARENA_ELEMENTS = 1 << 26


class _Arena:
    """Several base tensors (same dtype and device, each contiguous) moved into one flat storage, as views of it.

    The layout is kept for as long as the tensors stay there, whichever adapters are active: switching adapters only
    rebuilds the entries' index (O(entries)). Tensors leave when their layer is unloaded (:meth:`release`) or when
    something gives them new storage (``model.to(...)``), which :meth:`intact` notices.
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.offsets: list[int] = []
        self._index: tuple[tuple, torch.Tensor] | None = None
        self.numel = 0
        self._offset_of: dict[int, int] = {}
        if not params:  # an empty (released or copied) arena
            return
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, even when the forward runs in inference
            buffer = torch.cat([p.detach().reshape(-1) for p in params])
        offset = 0
        for param in params:
            self.offsets.append(offset)
            param.data = buffer[offset : offset + param.numel()].view(param.shape)
            offset += param.numel()
        self.numel = offset
        self._offset_of = {id(p): off for p, off in zip(params, self.offsets)}

    def holds(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is one of this arena's tensors and still lives in its storage."""
        off = self._offset_of.get(id(param)) if self.params else None
        if off is None:
            return False
        first = self.params[0]
        return (
            param.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            and param.storage_offset() == off
            and first.storage_offset() == 0
        )

    def intact(self) -> bool:
        """Whether every tensor still lives in the storage at its place (nothing moved them)."""
        if not self.params:
            return False
        ptr = self.params[0].untyped_storage().data_ptr()
        return all(
            p.untyped_storage().data_ptr() == ptr and p.storage_offset() == off and p.is_contiguous()
            for p, off in zip(self.params, self.offsets)
        )

    def flat(self) -> torch.Tensor:
        """The whole storage as one 1-D tensor (a view: no copy)."""
        return self.params[0].detach().as_strided((self.numel,), (1,), 0)

    def index(self, members: list[tuple]) -> torch.Tensor:
        """Flat positions in the storage of the live entries of ``members`` (rebuilt when the entries change)."""
        key = _signature(members)
        if self._index is None or self._index[0] != key:
            flats = [layer._flat_index(t, a) + self._offset_of[id(param)] for layer, t, param, a in members]
            held = [getattr(layer, TENSOR_SLOTS[t][0])[a] for layer, t, _, a in members]  # their ids stay unique
            self._index = (key, torch.cat(flats), held)
        return self._index[1]

    @property
    def through(self) -> torch.Tensor:
        """The tensor whose view :meth:`flat` is (the write bumps its version counter itself)."""
        return self.params[0]

    def release(self) -> None:
        """Give every tensor still here its own storage back (unloading: a plain model shares no storage)."""
        params, self.params, self.offsets = self.params, [], []
        first = params[0].untyped_storage().data_ptr() if params else None
        with torch.inference_mode(False), torch.no_grad():
            for param in params:
                if param.untyped_storage().data_ptr() == first:
                    param.data = param.data.clone()
        self._index = None

    def __deepcopy__(self, memo: dict) -> _Arena:  # a copied model's tensors are never views of this storage
        return _Arena([])

    def __reduce__(self):
        return (_Arena, ([],))


def _signature(members: list[tuple]) -> tuple:
    out = []
    for layer, tensor_name, _, adapter in members:
        idx = getattr(layer, TENSOR_SLOTS[tensor_name][0])[adapter]
        out.append((id(layer), tensor_name, adapter, id(idx), idx._version))
    return tuple(out)


class _Sink:
    """One base tensor written on its own (no arena): the interface of :class:`_Arena` that the write uses."""

    def __init__(self, param: torch.Tensor) -> None:
        self.param = param
        self.through = param

    def flat(self) -> torch.Tensor:
        return self.param.detach().view(-1)

    def index(self, members: list[tuple]) -> torch.Tensor:
        ((layer, tensor_name, _, adapter),) = members
        return layer._flat_index(tensor_name, adapter)


class _TapPlan:
    """Where the entries of several 1-D tensors lie in the concatenation of their gradients."""

    def __init__(self, flats: list[torch.Tensor], sizes: list[int], values_dtype: torch.dtype) -> None:
        self.flats = flats
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.index = torch.cat([f + off for f, off in zip(flats, offsets)])
        self.counts = [f.numel() for f in flats]
        self.values_dtype = values_dtype


class ModelTap(torch.autograd.Function):
    """Identity on several small base tensors; backward gathers every adapter entry's gradient in one index."""

    @staticmethod
    def forward(ctx, plan: _TapPlan, *tensors_and_values):  # noqa: D102
        ctx.set_materialize_grads(False)
        ctx.plan = plan
        bases = tensors_and_values[: len(plan.flats)]
        return tuple(b.detach() for b in bases)  # aliases (a multi-output node may not return autograd views)

    @staticmethod
    def backward(ctx, *grads):  # noqa: D102
        plan = ctx.plan
        n = len(plan.flats)
        need = ctx.needs_input_grad[1 + n :]
        if all(g is not None for g in grads):
            picked = torch.cat([g.reshape(-1) for g in grads]).index_select(0, plan.index)
            if picked.dtype != plan.values_dtype:
                picked = picked.to(plan.values_dtype)
            value_grads = list(picked.split(plan.counts))
        else:  # some tensor was not used in this forward: gather each that was
            value_grads = [
                None if g is None else g.reshape(-1).index_select(0, f).to(plan.values_dtype)
                for g, f in zip(grads, plan.flats)
            ]
        return (None, *([None] * n), *[g if needed else None for g, needed in zip(value_grads, need)])


class BatchedStep:
    """Per-model state of the batched refresh and tap (owned by ``SAMModel``; not copied with the model).

    ``use_arenas=False`` keeps every base tensor in its own storage (one ``index_put_`` per tensor): for wrappers
    that read the base tensors through ``functional_call`` (CaliSr).
    """

    def __init__(self, use_arenas: bool = True) -> None:
        self.use_arenas = use_arenas
        self.arenas: list[_Arena] = []
        self._plan: tuple[tuple, _TapPlan] | None = None
        self._w0: dict[torch.dtype, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def __deepcopy__(self, memo: dict) -> BatchedStep:
        return BatchedStep(self.use_arenas)

    def __reduce__(self):
        return (BatchedStep, (self.use_arenas,))

    @contextlib.contextmanager
    def step(self, layers: list[SAMLayer]) -> Iterator[None]:
        """Bring every layer's base tensors up to date, then run the body with the model-level tap in place."""
        members = self.refresh(layers)
        tapped = self._tap(members) if torch.is_grad_enabled() else []
        try:
            yield
        finally:
            for layer in tapped:
                layer._sam_model_taps = {}

    # ------------------------------------------------------------------ refresh
    @torch.compiler.disable
    def refresh(self, layers: list[SAMLayer]) -> list[tuple]:
        """Apply the current offsets of every layer (see :meth:`_refresh`); caches and arenas are plain tensors even
        when the forward runs under ``torch.inference_mode``."""
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return self._refresh(layers)
        return self._refresh(layers)

    def _refresh(self, layers: list[SAMLayer]) -> list[tuple]:
        """Apply the current offsets of every layer; returns the plain members ``(layer, tensor, param, adapter)``.

        Tensors in another state (first application, several adapters, a restore) go through the layer's own
        refresh first, here too, before the model runs: a tensor may be read before its SAM layer runs (a module
        shared under two names, e.g. T5's embeddings on transformers 4.57, is wrapped under one name only). A
        tensor a wrapper shadows (FSDP) is left to the layer's forward.
        """
        members, others = [], []
        for layer in layers:
            if layer.merged or layer.disable_adapters:
                continue
            for tensor_name in TENSOR_SLOTS:
                live = layer._sam_live.get(tensor_name)
                adapters = layer._ready_adapters(tensor_name)
                if not adapters and live is None:
                    continue
                param = layer._registered(tensor_name)
                if param is None:
                    continue
                layer.refuse_sharded(tensor_name, param)  # before any layer writes
                if live is None or len(adapters) != 1 or live[1] != adapters:
                    others.append(layer)
                    continue
                members.append((layer, tensor_name, param, adapters[0]))
        for layer in dict.fromkeys(others):
            layer.refresh_base()
        seen = {(id(m[0]), m[1]) for m in members}
        for layer in dict.fromkeys(others):  # applied now: plain members from here on
            for tensor_name in TENSOR_SLOTS:
                live = layer._sam_live.get(tensor_name)
                param = layer._registered(tensor_name)
                if live is None or param is None or len(live[1]) != 1 or (id(layer), tensor_name) in seen:
                    continue
                members.append((layer, tensor_name, param, live[1][0]))
        plain = [m for m in members if m[2].is_contiguous() and not m[2].requires_grad]
        if self.use_arenas:
            sinks = self._arrange(plain)
        else:
            sinks = [(_Sink(m[2]), [m]) for m in plain]
        if any(
            m[0]._sam_live[m[1]][0] != m[0]._values_key(m[1], (m[3],)) or m[0]._sam_live[m[1]][3] != m[2].data_ptr()
            for m in plain
        ):
            self._write(sinks)
        return plain

    def _arrange(self, members: list[tuple]) -> list[tuple[_Arena | _Sink, list[tuple]]]:
        """``(arena, its members)`` pairs; members not yet in an intact arena go into new ones (in module order)."""
        self.arenas = [a for a in self.arenas if a.intact()]
        placed: dict[int, list[tuple]] = {}
        homeless = []
        for m in members:
            arena = m[0]._sam_arena_of.get(m[1])
            if arena is not None and arena.holds(m[2]) and arena in self.arenas:
                placed.setdefault(id(arena), []).append(m)
            else:
                homeless.append(m)
        chunks: dict[tuple, list[list[tuple]]] = {}
        for m in homeless:
            group = chunks.setdefault((m[2].dtype, m[2].device), [[]])
            if group[-1] and sum(x[2].numel() for x in group[-1]) + m[2].numel() > ARENA_ELEMENTS:
                group.append([])
            group[-1].append(m)
        sinks = []
        for group in chunks.values():
            for chunk in group:
                if len(chunk) == 1:  # alone (e.g. larger than an arena): written in place, never copied
                    sinks.append((_Sink(chunk[0][2]), chunk))
                    continue
                arena = _Arena([m[2] for m in chunk])
                for layer, tensor_name, _, _ in chunk:
                    layer._sam_arena_of[tensor_name] = arena
                self.arenas.append(arena)
                placed[id(arena)] = chunk
        return [(a, placed[id(a)]) for a in self.arenas if id(a) in placed] + sinks

    def release(self) -> None:
        """Every arena gives its tensors their own storage back (before unloading the adapters)."""
        for arena in self.arenas:
            arena.release()
        self.arenas = []
        self._w0 = {}

    @torch.no_grad()
    def _write(self, sinks: list[tuple[_Arena | _Sink, list[tuple]]]) -> None:
        """``W0 + Delta`` everywhere: one cat and one add for all values, one ``index_put_`` per arena (or tensor)."""
        by_dtype: dict[torch.dtype, list] = {}
        for sink, members in sinks:
            by_dtype.setdefault(members[0][2].dtype, []).append((sink, members))
        for group in by_dtype.values():
            members = [m for _, ms in group for m in ms]
            w0s = [getattr(layer, W0_SLOTS[t])[a] for layer, t, _, a in members]
            dtype = members[0][2].dtype
            cached = self._w0.get(dtype)
            if cached is None or len(cached[0]) != len(w0s) or any(x is not y for x, y in zip(cached[0], w0s)):
                cached = self._w0[dtype] = (w0s, torch.cat(w0s))
            new = torch.cat([getattr(layer, TENSOR_SLOTS[t][1])[a].detach() for layer, t, _, a in members])
            if new.dtype != cached[1].dtype:
                new = new.to(cached[1].dtype)
            new.add_(cached[1])
            start = 0
            for sink, ms in group:
                index = sink.index(ms)
                sink.flat().index_put_((index,), new[start : start + index.numel()])
                start += index.numel()
                # the write went through one tensor's view: the others' version counters must see it too (autograd)
                torch.autograd.graph.increment_version([m[2] for m in ms if m[2] is not sink.through])
        for layer, tensor_name, param, adapter in (m for _, ms in sinks for m in ms):
            live = layer._sam_live[tensor_name]
            key = layer._values_key(tensor_name, (adapter,))
            layer._sam_live[tensor_name] = (key, live[1], live[2], param.data_ptr())

    # ------------------------------------------------------------------ tap
    def _tap(self, members: list[tuple]) -> list[SAMLayer]:
        """Hand each plain 1-D tensor to its layer through one :class:`ModelTap`; returns the layers served."""
        small = [
            m
            for m in members
            if m[2].dim() == 1 and getattr(m[0], TENSOR_SLOTS[m[1]][1])[m[3]].requires_grad and not m[0]._sam_tied
        ]
        if not small:
            return []
        values = [getattr(layer, TENSOR_SLOTS[t][1])[a] for layer, t, _, a in small]
        dtype = small[0][2].dtype
        small = [(m, v) for m, v in zip(small, values) if m[2].dtype == dtype and v.dtype == values[0].dtype]
        entries = tuple((id(layer), t, a, id(layer._flat_index(t, a))) for (layer, t, _, a), _ in small)
        key = (dtype, values[0].dtype, entries)
        if self._plan is None or self._plan[0] != key:
            flats = [layer._flat_index(t, a) for (layer, t, _, a), _ in small]
            plan = _TapPlan(flats, [m[2].numel() for m, _ in small], values[0].dtype)
            self._plan = (key, plan)
        plan = self._plan[1]
        outputs = ModelTap.apply(plan, *[m[2] for m, _ in small], *[v for _, v in small])
        served = []
        for ((layer, tensor_name, _, _), _), out in zip(small, outputs):
            layer._sam_model_taps[tensor_name] = out
            served.append(layer)
        return served
