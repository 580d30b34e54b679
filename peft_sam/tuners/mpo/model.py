"""MPOModel: the PEFT tuner that wraps Linear/Conv1D layers of a model in MPO layers."""

from __future__ import annotations

import copy
import re

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from .._common import LeafTunerModel
from .config import MPOConfig
from .layer import SUPPORTED_MODULES, Linear, MPOLayer, override_key_for, resolve_factors

_UPCAST_DTYPES = (torch.float16, torch.bfloat16)


def _mpo_layer_class_for(module: nn.Module) -> type[MPOLayer] | None:
    return Linear if isinstance(module, SUPPORTED_MODULES) else None


class MPOModel(LeafTunerModel):
    """Lightweight fine-tuning of the auxiliary tensors of an MPO decomposition of each weight (MPOP).

    Created through ``peft.get_peft_model(model, MPOConfig(...))`` once ``peft_sam`` is imported.
    """

    prefix: str = "mpo_"
    tuner_layer_cls = MPOLayer
    tuner_kind = "MPO"
    supported_modules_text = "nn.Linear and transformers Conv1D"
    layer_class_for = staticmethod(_mpo_layer_class_for)

    def _is_supported(self, module: nn.Module) -> bool:
        # as PEFT's "all-linear": not the output embedding layer (often tied to the input embeddings)
        output = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return isinstance(module, SUPPORTED_MODULES) and module is not output

    def _layer_kwargs(self, current_key: str) -> dict:
        return {"module_name": current_key}  # per-module factor_overrides

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Check ``factor_overrides`` against the model before any module is replaced, then inject."""
        self._check_factor_overrides(model, self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, **kwargs)

    def _check_factor_overrides(self, model: nn.Module, config: MPOConfig) -> None:
        if not config.factor_overrides:
            return
        candidates = {}
        for name, module in model.named_modules():
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(base, SUPPORTED_MODULES) and not name.endswith(".base_layer"):
                candidates[name] = base
        used = set()
        for name, base in candidates.items():
            key = override_key_for(config.factor_overrides, name)
            if key is None or not self._is_target(config, name):
                continue
            used.add(key)
            weight = base.weight
            out_features, in_features = weight.shape[::-1] if not isinstance(base, nn.Linear) else weight.shape
            resolve_factors(config, name, out_features, in_features)  # raises a clear error if they do not fit
        unused = [k for k in config.factor_overrides if k not in used]
        if unused:
            raise ValueError(
                f"MPO factor_overrides keys {unused} match no adapted Linear/Conv1D module (a key matches a module "
                "whose name ends with it, or that it matches as a regex, e.g. 'attention.self.query' or "
                r"'layer\.\d+\.output\.dense'). Fix or remove them."
            )

    def _is_target(self, config: MPOConfig, name: str) -> bool:
        if isinstance(config.target_modules, str) and config.target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            probe = copy.copy(config)
            probe.target_modules = None
            return bool(self._check_target_module_exists(probe, name))
        result = self._check_target_module_exists(config, name)
        return bool(result) and not isinstance(result, _ExcludedModule)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's float16/bfloat16 -> float32 upcast, extended to the per-site tensors of the MPO adapters."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for module in self.model.modules():
            if not isinstance(module, MPOLayer):
                continue
            for container in (module.mpo_aux, module.mpo_init_aux):
                if adapter_name not in container:
                    continue
                sites = container[adapter_name]
                for key in list(sites.keys()):
                    tensor = sites[key]
                    if tensor.dtype in _UPCAST_DTYPES:
                        cast = tensor.detach().to(torch.float32)
                        sites[key] = (
                            nn.Parameter(cast, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter)
                            else cast
                        )

    # ------------------------------------------------------------------ save / load hooks
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check the stored tensor shapes against the injected ones, with an error that names the likely cause."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = model.state_dict()
        pattern = re.compile(r"\.mpo_[a-z_]+\.")
        for key, value in remapped.items():
            if not pattern.search(key) and not key.endswith(f".mpo_central_delta.{adapter_name}"):
                continue
            ref = expected.get(key)
            if ref is None:
                continue
            module = key.removeprefix("base_model.model.").split(".mpo_")[0]
            if key.endswith(f".mpo_factors.{adapter_name}") and (
                ref.shape != value.shape or not torch.equal(ref.cpu(), value.to(ref.dtype).cpu())
            ):
                raise ValueError(
                    f"Cannot load MPO adapter into module {module!r}: it was made for a weight factored as "
                    f"{value.tolist()} (rows, cols), this model's weight is factored as {ref.tolist()}. The adapter "
                    "belongs to a model with other weight shapes, or to another num_factors / factor_overrides."
                )
            if tuple(ref.shape) != tuple(value.shape):
                raise ValueError(
                    f"Cannot load MPO adapter: {key} has shape {tuple(value.shape)} in the file but "
                    f"{tuple(ref.shape)} in the model. The adapter was made for a model with other weight shapes, "
                    "or with another num_factors / factor_overrides / max_bond than its adapter_config.json says."
                )
        return remapped
