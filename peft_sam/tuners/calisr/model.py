"""CaliSrModel: injects the wrapped lightweight method (LoRA, SAM or MPO), then wraps every backbone module full
fine-tuning would train (the wrapped method's layers and the modules it leaves alone) in CaliSr layers that add the
full-fine-tuning part ``W_extra``; the Linear/Conv1D matrices of the component groups are the ones measured."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._common import UnloadKeepsModules, resolve_adapter_config
from .config import CaliSrConfig
from .layer import CaliSrLayer, CaliSrModule, attach_inner, detach_inner, own_tensor_names

_INJECTING_ATTR = "_calisr_pending_targets"


def _inner_tuner_cls(config: CaliSrConfig) -> type[BaseTuner]:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = config.adapter.peft_type
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        raise ValueError(
            f"The wrapped adapter type {peft_type!r} is not registered with PEFT: `import peft_sam` first."
        )
    return PEFT_TYPE_TO_TUNER_MAPPING[peft_type]


def _inner_shell(model: nn.Module, configs: dict, adapter_name: str, active) -> BaseTuner:
    """An instance of the wrapped method's tuner class around ``model`` that has injected nothing yet.

    ``BaseTuner.__init__`` would inject at once and overwrite ``model.peft_config``; the shell only carries what
    ``inject_adapter`` and the dtype/cast helpers read (``model``, ``peft_config``, ``active_adapter``).
    """
    cls = _inner_tuner_cls(configs[adapter_name])
    shell = cls.__new__(cls)
    nn.Module.__init__(shell)
    shell.model = model
    shell.targeted_module_names = []
    shell.targeted_parameter_names = []
    shell.peft_config = {name: c.adapter for name, c in configs.items() if isinstance(c, CaliSrConfig)}
    shell.active_adapter = active
    return shell


def _parent_and_name(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent_key, _, name = key.rpartition(".")
    return (model.get_submodule(parent_key) if parent_key else model), name


@contextlib.contextmanager
def _calisr_layers_unwrapped(model: nn.Module) -> Iterator[None]:
    """Temporarily put every CaliSr layer's inner layer (owning its original module again) or its plain module in its
    place, so the wrapped method's tuner sees the model as it left it when another adapter is added (and updates its
    layers in place instead of stacking a new layer on top)."""
    wrapped = [
        (*_parent_and_name(model, key), module)
        for key, module in model.named_modules()
        if isinstance(module, CaliSrLayer)
    ]
    standins = []
    for parent, name, layer in wrapped:
        standin = detach_inner(layer) if layer.inner is not None else layer.base_layer
        standins.append(standin)
        setattr(parent, name, standin)
    try:
        yield
    finally:
        for (parent, name, layer), standin in zip(wrapped, standins):
            current = getattr(parent, name)
            if current is not standin and standin is layer.base_layer and isinstance(current, BaseTunerLayer):
                # the wrapped method now adapts a module CaliSr held plain (another adapter targets it): wrap its layer
                if current.get_base_layer() is layer.base_layer:
                    standin = current
            if current is not standin:
                raise RuntimeError(
                    f"The wrapped method replaced the layer {name!r} instead of updating it; CaliSr adapters on one "
                    "model must all wrap the same method."
                )
            if standin is not layer.base_layer:
                attach_inner(layer, standin)
                layer.bind_inner()
            setattr(parent, name, layer)


def _refuse_direct_injection(peft_config) -> None:
    """A CaliSr adapter is made and loaded through ``PeftModel`` only (which hands its tuner a dict of configs).

    The other paths hand the tuner a bare config: ``peft.inject_adapter_in_model``, which transformers'
    ``model.load_adapter`` / ``add_adapter`` use. transformers' loader inserts the adapter name right after the first
    ``calisr_``-prefixed part of each checkpoint key (``calisr_extra`` -> ``calisr_extra.<adapter>``), but the wrapped
    method's tensors carry it deeper (``calisr_inner.lora_A.<adapter>.weight``), so they would silently keep their
    initial values. Nothing in a bare injection tells transformers' call from another, so all are refused.
    """
    if isinstance(peft_config, PeftConfig):
        raise NotImplementedError(
            "A CaliSr adapter cannot be injected into a model directly (transformers' model.load_adapter / "
            "add_adapter, peft.inject_adapter_in_model): transformers' loader puts the adapter name after the first "
            "'calisr_' part of each key, while the wrapped LoRA/SAM/MPO tensors carry it deeper "
            "(calisr_inner.lora_A.<adapter>.weight), so they would silently stay untrained. Create it with "
            "peft.get_peft_model(model, CaliSrConfig(...)) and load it with peft_sam.PeftModel.from_pretrained(model, "
            "path) or AutoPeftModelFor*.from_pretrained(path)."
        )


def _ends_with_any(key: str, names) -> bool:
    return any(key == n or key.endswith("." + n) for n in names or [])


def _excluded(exclude_modules, key: str) -> bool:
    """PEFT's ``exclude_modules`` rule: a string is a full regex match, a list matches names or name suffixes."""
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, key) is not None
    return _ends_with_any(key, exclude_modules)


def _shared_tensor_ids(model: nn.Module) -> set[int]:
    """ids of the tensors registered by more than one module or under more than one name (tied embeddings, a
    module reused in two places): a W_extra there would reach only one of its uses, so they get none."""
    seen: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for tensor in module._parameters.values():
            if tensor is not None:
                seen[id(tensor)] = seen.get(id(tensor), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def wrapped_inner_ids(model: nn.Module) -> set[int]:
    """ids of the inner tuner layers that sit inside a CaliSr layer."""
    return {id(m.inner) for m in model.modules() if isinstance(m, CaliSrLayer) and m.inner is not None}


class CaliSrModel(UnloadKeepsModules, BaseTuner):
    """Stable-rank calibrated switch from full to lightweight fine-tuning (CaliSr) around LoRA, SAM or MPO.

    Created through ``peft.get_peft_model(model, CaliSrConfig(adapter=...))`` once ``peft_sam`` is imported. The
    adapter consists of CaliSr layers (W_extra) and the wrapped method's layers inside them (W_core); the switch is
    made by :class:`peft_sam.CaliSrController` / :class:`peft_sam.CaliSrCallback`.
    """

    prefix: str = "calisr_"
    # a CaliSr adapter lives in two kinds of layers: the CaliSr layers and the wrapped method's layers (inside them,
    # and unwrapped ones such as SAM's LayerNorm/Embedding layers); set_adapter / delete_adapter must reach both
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        _refuse_direct_injection(peft_config)
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _prepare_adapter_config(self, peft_config: CaliSrConfig, model_config: dict) -> CaliSrConfig:
        return peft_config  # targets come from the wrapped config and the group patterns

    def _check_target_module_exists(self, peft_config: CaliSrConfig, key: str):
        if _excluded(peft_config.exclude_modules, key):
            return _ExcludedModule()  # PEFT counts it (and warns only if exclude_modules matched nothing)
        return key in getattr(self, _INJECTING_ATTR, {})

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        group = getattr(self, _INJECTING_ATTR)[current_key]
        if isinstance(target, CaliSrLayer):
            target.update_layer(adapter_name, peft_config, group=group)
        else:
            new_module = CaliSrModule(target, adapter_name, peft_config, group=group)
            self._replace_module(parent, target_name, new_module, target)
            target = new_module
        if adapter_name not in self.active_adapters:
            for param in target.extra_parameters(adapter_name):
                param.requires_grad_(False)

    def _check_same_wrapped_type(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        if not isinstance(config, CaliSrConfig):
            raise TypeError(f"Adapter {adapter_name!r} of a CaliSrModel must have a CaliSrConfig.")
        for other_name, other in self.peft_config.items():
            if other_name != adapter_name and other.adapter_type != config.adapter_type:
                raise ValueError(
                    f"CaliSr adapter {adapter_name!r} wraps {config.adapter_type} but adapter {other_name!r} wraps "
                    f"{other.adapter_type}: all CaliSr adapters of one model must wrap the same method."
                )

    def forward(self, *args, **kwargs):
        """The model's forward, after the base tensors of a wrapped SAM adapter are brought up to date."""
        from ..sam.batched import BatchedStep
        from ..sam.layer import SAMLayer

        state = self.__dict__.get("_sam_batched")
        if state is None:  # CaliSr reads the base tensors through functional_call: no arenas, no model-level tap
            state = self.__dict__["_sam_batched"] = BatchedStep(use_arenas=False)
        state.refresh([m for m in self.model.modules() if isinstance(m, SAMLayer)])
        return super().forward(*args, **kwargs)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Inject the wrapped method's layers (its own tuner does it), then wrap the group modules in CaliSr layers.

        Everything is created here (inside ``get_peft_model`` / ``add_adapter`` / loading), never later.
        """
        self._check_same_wrapped_type(adapter_name)
        config: CaliSrConfig = self.peft_config[adapter_name]
        inner_config = config.adapter
        inner_config.inference_mode = config.inference_mode
        inner_saved = inner_config.modules_to_save if hasattr(inner_config, "modules_to_save") else None
        both = [
            k
            for k, m in model.named_modules()
            if isinstance(m, CaliSrLayer) and _ends_with_any(k, config.modules_to_save)
        ]
        if both:
            raise ValueError(
                f"CaliSr adapter {adapter_name!r} lists {both[:3]} in modules_to_save, but another CaliSr adapter of "
                "this model already trains them in full through its own layers (W_extra): a module can be one or the "
                "other. List it in modules_to_save of the first adapter too, or leave it out of this one's."
            )
        with _calisr_layers_unwrapped(model):
            shell = _inner_shell(model, self.peft_config, adapter_name, self.active_adapter)
            if hasattr(inner_config, "modules_to_save"):
                # the task head etc. must not be adapted by the wrapped method; its ModulesToSaveWrapper is the same
                # one CaliSr's own set_additional_trainable_modules creates (ModulesToSaveWrapper.update is idempotent)
                inner_config.modules_to_save = list(config.modules_to_save) if config.modules_to_save else None
            try:
                shell._pre_injection_hook(model, inner_config, adapter_name)
                shell.inject_adapter(
                    model,
                    adapter_name,
                    autocast_adapter_dtype=autocast_adapter_dtype,
                    low_cpu_mem_usage=low_cpu_mem_usage,
                )
                shell._post_injection_hook(model, inner_config, adapter_name)
            finally:
                if hasattr(inner_config, "modules_to_save"):
                    inner_config.modules_to_save = inner_saved
        targets = self._calisr_targets(model, config, adapter_name)
        setattr(self, _INJECTING_ATTR, targets)
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        finally:
            delattr(self, _INJECTING_ATTR)

    @staticmethod
    def _calisr_targets(model: nn.Module, config: CaliSrConfig, adapter_name: str) -> dict[str, str | None]:
        """{module name: group or None} of every backbone module full fine-tuning trains (Algorithm 1: "fine-tune
        model with all parameters"): the wrapped method's top-level layers and every other module with its own
        ``weight`` / ``bias``, except the task head (``modules_to_save``), ``exclude_modules`` and modules whose
        tensors are shared with another module (tied input/output embeddings). Linear/Conv1D matrices matching a group
        pattern get that group, whatever the wrapped method adapts; everything else gets None."""
        from peft.utils.other import AuxiliaryTrainingWrapper

        inside = wrapped_inner_ids(model)
        skip_prefixes, candidates = [], []
        for key, module in model.named_modules():
            if any(key.startswith(p) for p in skip_prefixes):
                continue
            if isinstance(module, AuxiliaryTrainingWrapper) or _ends_with_any(key, config.modules_to_save):
                skip_prefixes.append(key + ".")
                continue
            if isinstance(module, BaseTunerLayer):
                skip_prefixes.append(key + ".")
                if id(module) not in inside:
                    candidates.append((key, module))
                continue
            if own_tensor_names(module):
                candidates.append((key, module))
        shared = _shared_tensor_ids(model)
        targets: dict[str, str | None] = {}
        matrices: list[str] = []
        for key, module in candidates:
            leaf = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            names = own_tensor_names(leaf)
            if not names or _excluded(config.exclude_modules, key):
                continue
            if any(id(getattr(leaf, n)) in shared for n in names):
                continue
            is_matrix = isinstance(leaf, (nn.Linear, Conv1D))
            group = config.group_of(key) if is_matrix else None
            if is_matrix:
                matrices.append(key)
            targets[key] = group
        grouped = {g for g in targets.values() if g is not None}
        if not grouped and config.groups is None and matrices:
            # an architecture the default attention / FFN patterns do not know: one group of all its matrices
            warnings.warn(
                "No module matches CaliSr's default attention/FFN name patterns; all Linear/Conv1D matrices "
                f"({len(matrices)}) form one group 'model'. Set CaliSrConfig.groups for per-component groups.",
                stacklevel=3,
            )
            return {key: ("model" if key in matrices else None) for key in targets}
        if not grouped:
            raise ValueError(
                f"CaliSr found no Linear/Conv1D matrix whose name matches a group pattern ({config.resolved_groups}); "
                f"the model's matrices are e.g. {matrices[:5] or 'none'}. Adjust CaliSrConfig.groups."
            )
        if config.variant == "S":
            configured = list(config.resolved_groups)
            empty = [g for g in configured if g not in grouped]
            if config.groups is not None and empty:
                warnings.warn(
                    f"CaliSr groups {empty} match no Linear/Conv1D matrix of the model; only {sorted(grouped)} will "
                    "be measured and switched.",
                    stacklevel=3,
                )
            if len(grouped) == 1 and len(configured) > 1:
                warnings.warn(
                    f"CaliSr-S found a single component group ({next(iter(grouped))!r}) on this model, so it behaves "
                    "as CaliSr-D. Set CaliSrConfig.groups to split the matrices into components.",
                    stacklevel=3,
                )
        return targets

    # ------------------------------------------------------------------ PEFT API that must reach both layer kinds
    def _top_level_tuner_layers(self) -> list[BaseTunerLayer]:
        inside = wrapped_inner_ids(self.model)
        return [m for m in self.model.modules() if isinstance(m, BaseTunerLayer) and id(m) not in inside]

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold W_core + W_extra of the given (default: active) adapters into the base weights."""
        self._check_merge_allowed()
        for module in self._top_level_tuner_layers():
            module.merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:  # noqa: D102
        for module in self._top_level_tuner_layers():
            if module.merged:
                module.unmerge()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """The wrapped method's upcast (MPO also upcasts its nested per-site tensors), which covers W_extra too."""
        shell = _inner_shell(self.model, self.peft_config, adapter_name, self.active_adapter)
        shell._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    # ------------------------------------------------------------------ save / load hooks (delegated)
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The wrapped method's selection (which, being structural, also holds W_extra), W_extra cast to extra_dtype."""
        inner_cls = _inner_tuner_cls(config)
        to_return = inner_cls._get_adapter_state_dict(
            model, config.adapter, adapter_name, state_dict, unwanted_adapter_names
        )
        if config.extra_dtype is not None:
            dtype = getattr(torch, config.extra_dtype)
            markers = tuple(
                f".{slot}.{adapter_name}" for slot in ("calisr_extra", "calisr_extra_bias", "mpo_central_delta")
            )
            for key, tensor in to_return.items():
                if key.endswith(markers) and tensor.is_floating_point():
                    to_return[key] = tensor.to(dtype)
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Delegate to the wrapped method (e.g. SAM resizes its placeholders to the stored entries), after renaming the
        keys of an adapter saved while the wrapped method's layer sat in ``base_layer`` (before 2026-12-02; a CaliSr
        checkpoint never holds base tensors, so such a key is always the inner layer's) to ``calisr_inner``."""
        state_dict = _migrate_inner_keys(model, state_dict)
        inner_cls = _inner_tuner_cls(config)
        return inner_cls._remap_adapter_state_dict_for_load(model, config.adapter, adapter_name, state_dict)


# ---------------------------------------------------------------------------------------------------- helpers
def _migrate_inner_keys(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of an adapter saved while the inner layer sat in ``base_layer``: ``<layer>.base_layer.<inner tensor>`` ->
    ``<layer>.calisr_inner.<inner tensor>`` and ``<layer>.base_layer.base_layer.<t>`` (a base tensor saved with the
    adapter, e.g. a resized embedding) -> ``<layer>.base_layer.<t>``; every other key is left as it is."""
    inner_names: dict[str, set[str]] = {}  # CaliSr layer name (with and without PeftModel's prefix) -> inner's names
    for name, module in model.named_modules():
        if isinstance(module, CaliSrLayer) and module.inner is not None:
            inner = module.inner
            own = {n for n, _ in inner.named_children()} | set(inner._parameters) | set(inner._buffers)
            own.discard("base_layer")
            inner_names[name] = inner_names[name.removeprefix("base_model.model.")] = own
    if not inner_names:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        head, sep, rest = key.partition(".base_layer.")
        while sep and head not in inner_names:  # the layer's own base_layer is the first one after its name
            more_head, sep, rest = rest.partition(".base_layer.")
            head = f"{head}.base_layer.{more_head}"
        first = rest.split(".", 1)[0]
        if sep and first in inner_names[head]:
            key = f"{head}.calisr_inner.{rest}"
        elif sep and first == "base_layer":
            key = f"{head}.{rest}"
        out[key] = value
    return out


def calisr_layers(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, CaliSrLayer]]:
    """(name, layer) of every CaliSr layer (holding ``adapter_name`` if given), in module order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, CaliSrLayer) and (adapter_name is None or m.has_adapter(adapter_name))
    ]


def _calisr_config(model: nn.Module, adapter_name: str | None) -> tuple[str, CaliSrConfig]:
    return resolve_adapter_config(model, adapter_name, CaliSrConfig, "get_peft_model(model, CaliSrConfig(adapter=...))")


@contextlib.contextmanager
def sam_selection_view(model: nn.Module, adapter_name: str | None = None) -> Iterator[None]:
    """Let :func:`peft_sam.select_parameters` calibrate the SAM adapter inside a CaliSr(SAM) adapter.

    Inside the block ``model.peft_config[adapter]`` is the wrapped SAMConfig and the CaliSr layers are disabled, so
    the calibration sees exactly what a plain SAM model would (theta_0, no W_extra in the forward or in the gradient
    clipping norm). A no-op for models whose adapter is not a CaliSr(SAM) adapter, and re-entrant.
    """
    configs = getattr(model, "peft_config", None)
    if configs is None:
        yield
        return
    name = adapter_name
    if name is None:
        active = getattr(model, "active_adapter", None)
        name = active if isinstance(active, str) else (active[0] if active else None)
    config = configs.get(name)
    if not isinstance(config, CaliSrConfig) or config.adapter_type != "SAM":
        yield
        return
    layers = [m for _, m in calisr_layers(model)]
    flags = [(p, p.requires_grad) for m in layers for d in (m.calisr_extra, m.calisr_extra_bias) for p in d.values()]
    disabled = [m for m in layers if not m.disable_adapters]
    configs[name] = config.adapter
    try:
        for m in disabled:
            m.enable_adapters(False)
        yield
    finally:
        configs[name] = config
        for m in disabled:
            m.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def calisr_size_report(model: nn.Module, adapter_name: str | None = None) -> dict[str, int | float | str]:
    """Honest parameter and file-size counts of a CaliSr adapter.

    ``extra``: entries of W_extra (dense deltas, or MPO central tensors); ``core``: trainable entries of the wrapped
    method (those that train in both phases); ``other_trainable``: e.g. the task head; ``trainable_before_switch`` /
    ``trainable_after_switch``; ``adapter_bytes``: the size of the tensors ``save_pretrained`` writes (W_extra in
    ``extra_dtype``); ``total_params``: all parameters of the model (base, adapter and head copies).
    """
    from peft.utils import get_peft_model_state_dict

    adapter_name, config = _calisr_config(model, adapter_name)
    extras = {id(p): p for _, layer in calisr_layers(model, adapter_name) for p in layer.extra_parameters(adapter_name)}
    inner_params: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and not isinstance(module, CaliSrLayer):
            for attr in module.adapter_layer_names:
                container = getattr(module, attr, None)
                if container is None or adapter_name not in container:
                    continue
                entry = container[adapter_name]
                params = [entry] if isinstance(entry, torch.Tensor) else list(entry.parameters())
                for p in params:
                    if id(p) not in extras:
                        inner_params[id(p)] = p
    all_trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    all_trainable.update(extras)
    extra_n = sum(p.numel() for p in extras.values())
    core_n = sum(p.numel() for p in inner_params.values())
    other_n = sum(p.numel() for i, p in all_trainable.items() if i not in extras and i not in inner_params)
    total_n = sum(p.numel() for p in model.parameters())
    state = get_peft_model_state_dict(model, adapter_name=adapter_name) if hasattr(model, "base_model") else {}
    adapter_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return {
        "adapter": adapter_name,
        "wrapped": config.adapter_type,
        "extra": extra_n,
        "core": core_n,
        "other_trainable": other_n,
        "trainable_before_switch": extra_n + core_n + other_n,
        "trainable_after_switch": core_n + other_n,
        "total_params": total_n,
        "adapter_bytes": adapter_bytes,
        "extra_dtype": config.extra_dtype or "as trained",
    }
