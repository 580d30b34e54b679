"""Helpers shared by the peft-sam tuners (target matching, adapter-config lookup, module replacement, the base of the
SAM and MPO tuner models)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

# the heads PEFT's task models train in full: TOKEN_CLS and QUESTION_ANS add them to ``modules_to_save`` only after
# the adapter is injected, so the default targeting leaves them out itself
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def match_supported_module(
    model: nn.Module,
    peft_config,
    key: str,
    own_layer_cls: type,
    is_supported: Callable[[nn.Module], bool],
):
    """PEFT's target check, where ``target_modules=None`` means "every module ``is_supported`` accepts".

    ``exclude_modules`` and ``modules_to_save`` still apply; a module already wrapped by this tuner matches (another
    adapter on it), another tuner's layer or a container of adapted modules does not.
    """
    if peft_config.target_modules is not None:
        return check_target_module_exists(peft_config, key)
    task_type = getattr(peft_config.task_type, "value", peft_config.task_type)
    heads = [*(peft_config.modules_to_save or []), *TASK_HEADS.get(task_type, ())]
    if any(key.endswith(name) for name in heads) or _inside_wrapper(model, key):
        # PEFT wraps every module whose name ends with a modules_to_save entry (DistilBERT's "pre_classifier" for
        # "classifier"): such a module is trained in full, not adapted; nor are the copies inside such a wrapper
        return False
    probe = copy.copy(peft_config)
    probe.target_modules = ".*"
    result = check_target_module_exists(probe, key)
    if isinstance(result, _ExcludedModule) or not result:
        return result
    module = model.get_submodule(key)
    if isinstance(module, own_layer_cls):
        return True
    if isinstance(module, BaseTunerLayer) or any(isinstance(m, BaseTunerLayer) for m in module.modules()):
        return False
    return is_supported(module)


def _inside_wrapper(model: nn.Module, key: str) -> bool:
    """Whether ``key`` lies inside a PEFT auxiliary wrapper (``ModulesToSaveWrapper``, trainable tokens)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, AuxiliaryTrainingWrapper):
            return True
    return False


def resolve_adapter_config(model: nn.Module, adapter_name: str | None, config_cls: type, how_to_create: str):
    """``(adapter_name, config)`` of the given (default: active) adapter; raises if it is not a ``config_cls``."""
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        adapter_name = active if isinstance(active, str) else (active[0] if active else None)
        if adapter_name is None and len(configs) == 1:
            adapter_name = next(iter(configs))
    config = configs.get(adapter_name)
    if not isinstance(config, config_cls):
        kind = type(config).__name__ if config is not None else "no config"
        raise ValueError(
            f"Adapter {adapter_name!r} is not a {config_cls.__name__} adapter ({kind}): create the model with "
            f"{how_to_create} or pass adapter_name=... ."
        )
    return adapter_name, config


class UnloadKeepsModules:
    """Mixin for a ``BaseTuner``: unloading puts the original module back as it is.

    PEFT's ``_replace_module`` copies ``weight``/``bias`` from the replaced child onto the module that comes back; that
    fails for a ``modules_to_save`` head without such attributes (e.g. ``RobertaClassificationHead``) and is a no-op for
    our layers, whose unloaded module is the original one. Injection keeps PEFT's behaviour.
    """

    def _replace_module(self, parent, child_name, new_module, child):
        if hasattr(new_module, "base_layer"):  # injecting a tuner layer
            return super()._replace_module(parent, child_name, new_module, child)
        setattr(parent, child_name, new_module)


class LeafTunerModel(UnloadKeepsModules, BaseTuner):
    """Base of a tuner model that wraps single leaf modules in its own layers (``SAMModel``, ``MPOModel``).

    ``target_modules=None`` means "every supported module". A subclass sets ``prefix``, ``tuner_layer_cls``,
    ``tuner_kind`` and ``supported_modules_text`` (both for the error on an unsupported module) and
    ``layer_class_for``; it may override ``_is_supported`` (which modules ``target_modules=None`` picks) and
    ``_layer_kwargs`` (extra arguments of its layer's constructor and ``update_layer``).
    """

    target_module_mapping: dict[str, list[str]] = {}
    tuner_kind: str  # "SAM": the tuner's name in error messages
    supported_modules_text: str  # "nn.Linear and transformers Conv1D": what the error lists as supported

    @staticmethod
    def layer_class_for(module: nn.Module) -> type | None:
        """The tuner layer class that can wrap ``module``, or None if it is not supported."""
        raise NotImplementedError

    def _is_supported(self, module: nn.Module) -> bool:
        """Whether ``target_modules=None`` adapts ``module``."""
        return self.layer_class_for(module) is not None

    def _layer_kwargs(self, current_key: str) -> dict:
        """Extra keyword arguments for the layer's constructor and ``update_layer`` at module ``current_key``."""
        return {}

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        return peft_config  # target_modules=None means "every supported module", resolved per module below

    def _check_target_module_exists(self, peft_config, key: str):
        return match_supported_module(self.model, peft_config, key, self.tuner_layer_cls, self._is_supported)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        layer_kwargs = self._layer_kwargs(current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, **layer_kwargs)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_cls = self.layer_class_for(base)
        if layer_cls is None:
            raise TypeError(
                f"{self.tuner_kind} cannot adapt module {current_key!r} of type {type(base).__name__}: supported are "
                f"{self.supported_modules_text}. Remove it from target_modules or add it to exclude_modules."
            )
        new_module = layer_cls(target, adapter_name, peft_config, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


class AdditiveDeltaLayer:
    """Mixin for a tuner layer whose adapted weight is ``W0 + get_delta_weight`` (MPO, CaliSr)."""

    def unmerge(self) -> None:
        """Subtract the merged adapters' deltas again, newest first (the base weight is restored to float rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            delta = self._merged_delta(self.merged_adapters[-1])
            if delta is not None:
                with torch.no_grad():
                    weight.data -= delta.to(weight.dtype)
            self.merged_adapters.pop()
        self._after_unmerge()

    def _merged_delta(self, adapter: str):
        """What merging ``adapter`` added to the base weight (None: nothing)."""
        return self.get_delta_weight(adapter)

    def _after_unmerge(self) -> None:
        """Hook run once every merged adapter was subtracted."""

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:  # noqa: D102
        return True

    def disabled_forward(self, x, *args, **kwargs):
        """The base module's output with the adapters disabled (unmerged first, if merged)."""
        if self.merged:
            self.unmerge()
        return self.base_layer(x, *args, **kwargs)


_PLAIN_FORWARDS = (nn.Linear.forward, Conv1D.forward, nn.Embedding.forward)


def has_plain_forward(module: nn.Module) -> bool:
    """Whether ``module`` runs the forward of ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` itself, so an adapter may
    compute it with ``F.linear`` / ``F.embedding``; a subclass with its own forward (Gemma's scaled embedding, BART's
    positional embedding, a user's scaled Linear) must run that forward."""
    return type(module).forward in _PLAIN_FORWARDS
