"""Helpers shared by the peft-sam tuners (target matching, adapter-config lookup, module replacement)."""

from __future__ import annotations

import copy
from collections.abc import Callable

from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn


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
    if any(key.endswith(name) for name in peft_config.modules_to_save or []) or _inside_wrapper(model, key):
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
