"""The fine-tuning methods compared by the examples and benchmarks, in one table.

``METHODS`` maps a method name to a :class:`MethodSpec` (what it is, its default learning rate on MiniLM,
whether it needs a calibration pass or a per-step hook); :func:`build_peft_model` turns a freshly loaded base
model into the model to train. Gradient-selected SAM variants (``sam``, ``fisher``) come back uncalibrated:
the training loop must call :func:`peft_sam.select_parameters` before building the optimizer
(``info.needs_calibration``). AdaLoRA needs ``model.base_model.update_and_allocate(step)`` after every
optimizer step (``info.needs_update_and_allocate``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .data import TaskSpec, get_spec

__all__ = [
    "METHODS",
    "MethodInfo",
    "MethodSpec",
    "CALISR_ADAPTERS",
    "build_peft_model",
    "count_parameters",
    "method_unavailable",
    "save_trained",
    "head_module_names",
    "prepare_base_model",
]


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method table."""

    name: str
    family: str  # "sam" (SAMConfig), "peft" (a PEFT built-in or MPO), "calisr", "full", "adapterhub"
    description: str
    default_lr: float  # a sane learning rate for MiniLM (BERT, 6 layers, hidden 384), batch 16
    needs_calibration: bool = False
    needs_update_and_allocate: bool = False
    supports_multiple_choice: bool = True


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("sam", "sam", "SAM: top p per tensor by |sum of clipped grads| at theta_0", 5e-4, True),
        MethodSpec("fisher", "sam", "SAM mask by sum of squared grads (ChildTuning-D / FISH)", 5e-4, True),
        MethodSpec("magnitude", "sam", "SAM mask by |theta_0| (data-free)", 5e-4),
        MethodSpec("random", "sam", "SAM mask drawn at random, seeded (data-free)", 5e-4),
        MethodSpec("bitfit", "sam", "BitFit: every bias of the backbone", 1e-3),
        MethodSpec("full", "full", "full fine-tuning (every parameter)", 2e-5),
        MethodSpec("lora", "peft", "PEFT LoRA r=8, alpha=16, every backbone Linear", 1e-3),
        MethodSpec("lora_qv", "peft", "PEFT LoRA r=8, alpha=16 on query and value", 1e-3),
        MethodSpec("ia3", "peft", "PEFT IA3 on key, value and the FFN output (feed-forward) Linear", 3e-3),
        MethodSpec(
            "prefix", "peft", "PEFT prefix tuning, 20 virtual tokens", 5e-3, supports_multiple_choice=False
        ),
        MethodSpec(
            "adalora",
            "peft",
            "PEFT AdaLoRA init_r=12 -> target_r=8, every backbone Linear",
            1e-3,
            needs_update_and_allocate=True,
        ),
        MethodSpec("shira", "peft", "PEFT SHiRA r=8 (random sparse mask), every backbone Linear", 1e-3),
        MethodSpec("mpo", "peft", "MPOP: auxiliary tensors of a 5-site MPO of every backbone Linear", 5e-4),
        MethodSpec(
            "calisr",
            "calisr",
            "CaliSr: full FT (W_extra) switching to the wrapped LoRA/SAM/MPO by stable rank (--calisr-adapter)",
            1e-3,
        ),
        MethodSpec(
            "adapter",
            "adapterhub",
            "AdapterHub bottleneck adapter (SeqBnConfig, reduction 16) after every FFN; needs adapters==1.3.0",
            1e-3,
        ),
        MethodSpec(
            "supertuning",
            "peft",
            "PEFT Super-Tuning: top-|theta_0| sparse support of 1-p, every Linear",
            5e-4,
        ),
    )
}


# the lightweight methods CaliSr can wrap (--calisr-adapter) -> the METHODS row whose config is wrapped
CALISR_ADAPTERS = {"lora": "lora", "mpo": "mpo", "sam": "sam"}


@dataclass
class MethodInfo:
    """What :func:`build_peft_model` built."""

    method: str
    is_peft: bool
    needs_calibration: bool
    needs_update_and_allocate: bool
    trainable_params: int
    total_params: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        """The method's family in :data:`METHODS` (how :func:`save_trained` saves it)."""
        return METHODS[self.method].family


def method_unavailable(method: str) -> str | None:
    """None when ``method`` can run in this environment; otherwise what is missing and how to get it."""
    if method in METHODS and METHODS[method].family == "adapterhub":
        from .adapterhub import adapterhub_missing

        return adapterhub_missing()
    return None


def save_trained(model: nn.Module, info: MethodInfo, directory: str) -> None:
    """Save what ``method`` trained: the PEFT adapter, the whole model (full) or the AdapterHub adapter + head."""
    if info.family == "adapterhub":
        from .adapterhub import save_bottleneck_adapter

        save_bottleneck_adapter(model, directory)
    else:
        import peft_sam

        with peft_sam.atomic_adapter_writes():  # a crash mid-write never leaves a truncated adapter
            model.save_pretrained(directory)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; parameters shared between modules count once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


def head_module_names(model: nn.Module) -> list[str]:
    """Names of the task head (randomly initialised, trained in full): ``classifier`` (BERT) or ``score``."""
    names = [n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)]
    if not names:
        raise ValueError(
            f"Cannot find the task head of {type(model).__name__} (looked for 'classifier' and 'score'); "
            "load the model with AutoModelForSequenceClassification / AutoModelForMultipleChoice."
        )
    return names


def _linear_backbone_regex(model: nn.Module, heads: list[str]) -> list[str]:
    """Names of every ``nn.Linear`` outside the head (what PEFT's ``all-linear`` picks for BERT SEQ_CLS)."""
    return sorted(
        {
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.split(".")[0] not in heads
        }
    )


def _ffn_output_modules(model: nn.Module) -> list[str]:
    """BERT-style FFN output Linears (``layer.N.output.dense``; not ``attention.output.dense``)."""
    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.endswith("output.dense") and "attention" not in name
    )


def _backbone(model: nn.Module) -> nn.Module | None:
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, None) if prefix else None


def prepare_base_model(method: str, base_model: nn.Module) -> nn.Module:
    """Adjust a freshly loaded base model for ``method``; call it before ``PeftModel.from_pretrained`` too.

    Only ``prefix`` needs it: PEFT 0.21 looks for a ``past_key_values`` argument on the backbone's
    ``forward``, which transformers 5 renamed to ``cache`` (the old name survives only as a deprecated
    keyword).
    The shim gives the backbone instance a ``forward`` with the old name that passes it on as ``cache``.
    """
    if method != "prefix":
        return base_model
    backbone = _backbone(base_model)
    if backbone is None or getattr(backbone, "_peft_sam_prefix_shim", False):
        return base_model
    params = inspect.signature(backbone.forward).parameters
    if "past_key_values" in params or "cache" not in params:
        return base_model
    original = backbone.forward

    def forward(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        return original(*args, cache=past_key_values, **kwargs)

    backbone.forward = forward
    backbone._peft_sam_prefix_shim = True
    return base_model


def build_peft_model(
    method: str,
    base_model: nn.Module,
    spec: str | TaskSpec,
    *,
    p: float = 0.005,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.1,
    seed: int = 0,
    num_calibration_batches: int = 600,
    num_virtual_tokens: int = 20,
    total_steps: int | None = None,
    calisr_adapter: str = "lora",
    calisr_variant: str = "S",
    calisr_switch_at: float | None = None,
    calisr_delta: float = 0.5,
    calisr_sr_interval: int | None = None,
    calisr_decide_every: int | None = None,
) -> tuple[nn.Module, MethodInfo]:
    """Wrap ``base_model`` for ``method`` (a key of :data:`METHODS`); returns ``(model, info)``.

    The task head stays fully trainable (PEFT's ``SEQ_CLS`` does it for classification; for multiple choice
    the head goes into ``modules_to_save`` explicitly). ``total_steps`` is required by ``adalora``.
    ``method="calisr"`` wraps the config of ``calisr_adapter`` (lora, mpo or sam) in a
    :class:`peft_sam.CaliSrConfig` (``calisr_variant`` S/D, ``calisr_delta``, ``calisr_sr_interval``,
    ``calisr_decide_every``, and
    ``calisr_switch_at`` for the fixed-switch control); train it with :class:`peft_sam.CaliSrOptimizer`.
    If ``info.needs_calibration``, call ``peft_sam.select_parameters(model, train_dataloader)`` before
    building the optimizer.
    """
    import peft

    import peft_sam

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(METHODS)}.")
    mspec = METHODS[method]
    task = get_spec(spec)
    choice = task.kind == "choice"
    if choice and not mspec.supports_multiple_choice:
        raise ValueError(f"Method {method!r} does not support multiple-choice tasks such as {task.name!r}.")
    heads = head_module_names(base_model)
    # PEFT's SEQ_CLS task type trains and saves the head itself; multiple choice has no PEFT task type.
    common: dict[str, Any] = (
        {"task_type": None, "modules_to_save": heads} if choice else {"task_type": "SEQ_CLS"}
    )

    if mspec.family == "full":
        for prm in base_model.parameters():
            prm.requires_grad_(True)
        trainable, total = count_parameters(base_model)
        return base_model, MethodInfo(method, False, False, False, trainable, total, {"method": "full"})

    if mspec.family == "adapterhub":
        from .adapterhub import add_bottleneck_adapter

        reduction = 16
        add_bottleneck_adapter(base_model, heads, reduction_factor=reduction)
        trainable, total = count_parameters(base_model)
        config = {"method": method, "adapter": "SeqBnConfig", "reduction_factor": reduction}
        return base_model, MethodInfo(method, False, False, False, trainable, total, config)

    needs_calibration = mspec.needs_calibration
    if mspec.family == "calisr":
        if calisr_adapter not in CALISR_ADAPTERS:
            raise ValueError(f"--calisr-adapter must be one of {sorted(CALISR_ADAPTERS)}, got {calisr_adapter!r}.")
        inner_method = CALISR_ADAPTERS[calisr_adapter]
        inner = _method_config(inner_method, base_model, heads, {}, p, lora_r, lora_alpha, lora_dropout, seed,
                               num_calibration_batches, num_virtual_tokens, total_steps)
        config = peft_sam.CaliSrConfig(
            adapter=inner,
            variant=calisr_variant,
            delta=calisr_delta,
            sr_interval=calisr_sr_interval,
            decide_every=calisr_decide_every,
            switch_at=calisr_switch_at,
            **common,
        )
        needs_calibration = METHODS[inner_method].needs_calibration
    else:
        config = _method_config(method, base_model, heads, common, p, lora_r, lora_alpha, lora_dropout, seed,
                                num_calibration_batches, num_virtual_tokens, total_steps)

    model = peft.get_peft_model(base_model, config)
    trainable, total = count_parameters(model)
    return model, MethodInfo(
        method,
        True,
        needs_calibration,
        mspec.needs_update_and_allocate,
        trainable,
        total,
        {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))},
    )


def _method_config(
    method: str,
    base_model: nn.Module,
    heads: list[str],
    common: dict[str, Any],
    p: float,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    seed: int,
    num_calibration_batches: int,
    num_virtual_tokens: int,
    total_steps: int | None,
) -> Any:
    """The PEFT config of an adapter method (``common``: task type / modules to save)."""
    import peft

    import peft_sam

    mspec = METHODS[method]
    linears = _linear_backbone_regex(base_model, heads)
    if mspec.family == "sam":
        config = peft_sam.SAMConfig(
            p=p, selection=method, seed=seed, num_calibration_batches=num_calibration_batches, **common
        )
    elif method == "lora":
        config = peft.LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=linears, **common
        )
    elif method == "lora_qv":
        config = peft.LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=["query", "value"],
            **common,
        )
    elif method == "ia3":
        # IA3 (Liu et al. 2022) rescales keys, values and the FFN's inner activation, i.e. the *input* of the
        # FFN output Linear. PEFT's BERT default ("output.dense") also hits attention.output.dense; we don't.
        ffn_out = _ffn_output_modules(base_model)
        config = peft.IA3Config(
            target_modules=["key", "value", *ffn_out], feedforward_modules=ffn_out, **common
        )
    elif method == "prefix":
        prepare_base_model(method, base_model)
        config = peft.PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, **common)
    elif method == "adalora":
        if not total_steps or total_steps <= 0:
            raise ValueError(
                "adalora needs total_steps (the number of optimizer steps) for its rank schedule."
            )
        tinit, tfinal = total_steps // 10, total_steps // 5
        config = peft.AdaLoraConfig(
            init_r=12,
            target_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=linears,
            total_step=total_steps,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=max(1, min(10, total_steps // 20)),
            **common,
        )
    elif method == "mpo":
        config = peft_sam.MPOConfig(target_modules=linears, seed=seed, **common)
    elif method == "shira":
        config = peft.ShiraConfig(r=lora_r, target_modules=linears, random_seed=seed, **common)
    elif method == "supertuning":
        config = peft.SupertuningConfig(sparsity=1.0 - p, target_modules=linears, **common)
    else:  # pragma: no cover - every METHODS row is handled above
        raise AssertionError(method)
    return config
