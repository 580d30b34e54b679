"""Configuration of CaliSr (Liu et al., "Enhancing Parameter-efficient Fine-tuning with Simple Calibration based on
Stable Rank"): training starts as full fine-tuning and switches each component group to a wrapped lightweight method
(LoRA, MPO or SAM) once the stable-rank score says so. See ``docs/calisr.md`` for every interpretation made here."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields
from typing import Any

from peft import LoraConfig, PeftType
from peft.config import PeftConfig

from ...registry import PeftSamType

VARIANTS = ("D", "S")
SR_TARGETS = ("weight", "delta")
EXTRA_DTYPES = ("float32", "float16", "bfloat16")

# Default component groups of the paper's Table 4 (attention, FFN1 = intermediate, FFN2 = output), as regexes searched
# in the module names (first matching group wins). BERT / RoBERTa / ELECTRA / MiniLM, DistilBERT, GPT-2 and
# Llama-style (also Mistral, Qwen2, ...) names are covered.
DEFAULT_GROUPS: dict[str, list[str]] = {
    "attention": [
        r"attention\.self\.(query|key|value)$",  # BERT / RoBERTa
        r"attention\.output\.dense$",
        r"attention\.(q_lin|k_lin|v_lin|out_lin)$",  # DistilBERT
        r"attn\.(c_attn|c_proj)$",  # GPT-2
        r"self_attn\.(q_proj|k_proj|v_proj|o_proj)$",  # Llama / Mistral / Qwen
    ],
    "ffn1": [
        r"intermediate\.dense$",  # BERT / RoBERTa
        r"ffn\.lin1$",  # DistilBERT
        r"mlp\.c_fc$",  # GPT-2
        r"mlp\.(gate_proj|up_proj)$",  # Llama
    ],
    "ffn2": [
        r"(?<!attention\.)output\.dense$",  # BERT / RoBERTa (FFN output, not the attention output)
        r"ffn\.lin2$",  # DistilBERT
        r"mlp\.c_proj$",  # GPT-2
        r"mlp\.down_proj$",  # Llama
    ],
}

# PEFT types CaliSr can wrap: each splits a weight as W = W_core + W_extra (docs/calisr.md).
SUPPORTED_ADAPTER_TYPES = ("LORA", "SAM", "MPO")


def _supported_type_names() -> str:
    return "LoraConfig (LORA), SAMConfig (SAM) or MPOConfig (MPO)"


def _jsonable(value: Any) -> Any:
    """Sets become sorted lists, enums their values, recursively (adapter_config.json must be plain JSON)."""
    if isinstance(value, set):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (PeftType, PeftSamType)):
        return value.value
    return value


def adapter_config_from_dict(data: dict) -> PeftConfig:
    """Rebuild a wrapped adapter config from its ``to_dict()`` form (the class comes from its ``peft_type``)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ValueError(
            "CaliSrConfig.adapter given as a dict needs a 'peft_type' entry (e.g. 'LORA', 'SAM', 'MPO') to know "
            "which config class to build."
        )
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(
            f"CaliSrConfig.adapter has peft_type {peft_type!r}, which is not registered with PEFT: `import peft_sam` "
            "before loading a CaliSr adapter that wraps SAM or MPO."
        )
    kwargs = dict(data)
    kwargs.pop("runtime_config", None)
    return PeftConfig.from_peft_type(**kwargs)


def _peft_type_name(config: PeftConfig) -> str:
    peft_type = getattr(config, "peft_type", None)
    return peft_type.value if hasattr(peft_type, "value") else str(peft_type)


@dataclass
class CaliSrConfig(PeftConfig):
    """Full fine-tuning that switches, per component group, to the wrapped lightweight method (CaliSr).

    Before the switch training is full fine-tuning: every backbone tensor full fine-tuning trains (matrices,
    embeddings, norms, biases; not the task head, which trains throughout) gets a dense ``W_extra``. Each weight is
    ``W = W_core + W_extra``: ``W_core`` is the wrapped method's weight (LoRA ``W0 + s B A``,
    SAM ``W0 +`` sparse delta, MPO the chain with trainable auxiliaries) and trains throughout; ``W_extra`` (a dense,
    zero-initialised delta for LoRA and SAM; the MPO central tensor itself) trains only until the switch. The switch
    is decided during training by :class:`peft_sam.CaliSrController` (plain loops) or :class:`peft_sam.CaliSrCallback`
    (transformers Trainer); all parameters are created here, inside ``get_peft_model``.

    Args:
        adapter (`Optional[Union[LoraConfig, SAMConfig, MPOConfig, dict]]`):
            The wrapped lightweight method's config (or its ``to_dict()`` form, with ``peft_type``); its
            ``target_modules`` decide which weights are adapted. A copy is kept: an MPOConfig gets
            ``train_central=True`` (its central tensor is W_extra) and its ``modules_to_save`` move to this config;
            LoRA with ``use_dora=True`` is refused. None (default): ``LoraConfig()`` with PEFT's defaults.
        variant (`str`):
            ``"S"`` (default, structure-aware): every component group switches on its own SRS; ``"D"`` (dynamic):
            all group modules form one group ``"model"`` that switches at once. Case-insensitive.
        delta (`float`):
            Switch threshold in [0, 1]: a group switches when its SRS > delta, strictly (default 0.5; paper: best
            0.45-0.6).
        sr_interval (`Optional[int]`):
            Measure SR(W_LFT) and SR(W_FFT) every this many optimizer steps. None (default): the decision period
            (``decide_every``, or ``steps_per_epoch`` with ``srs_window``) divided by ``srs_window`` or 5, at least 1;
            with ``switch_at`` nothing is measured.
        decide_every (`Optional[int]`):
            Evaluate SRS every this many optimizer steps. None (default): once per epoch (the ``steps_per_epoch``
            given to the controller). Ignored when ``srs_window`` or ``switch_at`` is set.
        srs_window (`Optional[int]`):
            If set (paper: 3 or 5), evaluate SRS as soon as this many new measurements have accumulated instead of
            every ``decide_every`` steps. None (default): decide every ``decide_every`` steps.
        groups (`Optional[Dict[str, List[str]]]`):
            Component groups ``{name: [regex, ...]}`` (a single regex is accepted) searched in the names of the
            model's Linear/Conv1D matrices (whatever the wrapped method adapts), the first matching group wins; their
            stable ranks are measured and each group switches on its own. None (default): ``DEFAULT_GROUPS``,
            attention / ffn1 / ffn2 for BERT, RoBERTa, DistilBERT, GPT-2 and Llama-style names; on a model none of
            them matches, one group ``"model"`` of all Linear/Conv1D matrices (a warning).
        sr_target (`str`):
            ``"weight"`` (default, the paper): stable rank of ``W = W_core + W_extra``; ``"delta"``: of ``W - W0``.
        extra_dtype (`Optional[str]`):
            ``"float32"``, ``"float16"`` or ``"bfloat16"``: store W_extra in that dtype in the adapter file (float16
            and bfloat16 halve it, but the reloaded model is then not bit-identical); None (default): as trained.
        switch_at (`Optional[float]`):
            Fixed-switch control (paper Table 5): switch every group after ``round(switch_at * total_steps)``
            optimizer steps, without measuring (the controller needs ``total_steps``; 0 switches at once). A
            fraction in [0, 1]; None (default): the switch is decided by SRS.
        init_weights (`bool`):
            True (default): W_extra starts at zero (the model equals the wrapped method's); False: small seeded
            random W_extra (0.02 times the std of the weight, or of the MPO central tensor; for tests).
        modules_to_save (`Optional[List[str]]`):
            Modules trained in full and saved with the adapter (e.g. the task head; PEFT adds the classifier itself
            for ``task_type="SEQ_CLS"``); the wrapped config's ``modules_to_save`` are moved here. None (default):
            none.
        seed (`int`):
            Seed of the random W_extra used with ``init_weights=False`` (default 0).
        target_modules (`Optional[Union[List[str], str]]`):
            Shortcut: if set, replaces the wrapped config's ``target_modules`` (which decide what the wrapped method
            adapts). None (default): the wrapped config's.
        exclude_modules (`Optional[Union[List[str], str]]`):
            Modules left out of the full-fine-tuning phase (no W_extra; PEFT's rule: a string is a full regex
            match, a list matches module names or name suffixes). None (default): none; tied or shared tensors
            (tied input/output embeddings) never get one.
    """

    adapter: Any = field(
        default=None,
        metadata={
            "help": "The wrapped lightweight method's config: a LoraConfig, SAMConfig or MPOConfig (or its to_dict() "
            "form). Its target_modules decide which weights are adapted."
        },
    )
    variant: str = field(
        default="S",
        metadata={
            "help": "'S' (structure-aware): every group switches on its own SRS; 'D' (dynamic): one group, the "
            "whole model, switches at once."
        },
    )
    delta: float = field(default=0.5, metadata={"help": "Switch when SRS > delta (paper: best 0.45-0.6)."})
    sr_interval: int | None = field(
        default=None,
        metadata={
            "help": "Measure SR(W_LFT) and SR(W_FFT) every this many optimizer steps; None = the decision period "
            "divided by 5 (srs_window or 5 measurements per decision, the paper's n)."
        },
    )
    decide_every: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate SRS every this many optimizer steps; None = once per epoch (the controller is told "
            "steps_per_epoch). Ignored when srs_window is set."
        },
    )
    srs_window: int | None = field(
        default=None,
        metadata={
            "help": "If set (paper: 3 or 5), evaluate SRS as soon as this many new measurements have accumulated "
            "instead of every decide_every steps."
        },
    )
    groups: dict[str, list[str]] | None = field(
        default=None,
        metadata={
            "help": "Component groups {name: [regex, ...]} searched in the names of the Linear/Conv1D matrices "
            "(first match wins); None = attention / ffn1 / ffn2 for BERT, RoBERTa, DistilBERT, GPT-2 and Llama names "
            "(on a model where none of them matches: one group 'model' of all matrices). Variant 'D' treats all "
            "grouped matrices as one group."
        },
    )
    sr_target: str = field(
        default="weight",
        metadata={"help": "'weight': stable rank of W = W_core + W_extra (the paper); 'delta': of W - W0."},
    )
    extra_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Store W_extra as float32/float16/bfloat16 in the adapter file; None = as trained (float16 and "
            "bfloat16 halve the file but the reloaded model is then not bit-identical)."
        },
    )
    switch_at: float | None = field(
        default=None,
        metadata={
            "help": "Fixed-switch control (paper Table 5): switch every group after this fraction of the total "
            "steps, without measuring; the controller needs total_steps."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: W_extra starts at zero; False: small random W_extra (for tests)."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved (e.g. the task head); the wrapped config's are moved here."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random W_extra used when init_weights=False."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Shortcut: if set, replaces the wrapped config's target_modules."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules left out of the full-fine-tuning phase (regex string or list of name suffixes)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftSamType.CALISR
        if self.adapter is None:
            self.adapter = LoraConfig()
        if isinstance(self.adapter, dict):
            self.adapter = adapter_config_from_dict(self.adapter)
        if not isinstance(self.adapter, PeftConfig):
            raise TypeError(
                f"CaliSrConfig.adapter must be a {_supported_type_names()}, got {type(self.adapter).__name__}."
            )
        # our own copy: the fields set below (and by PEFT at injection) must not leak into the caller's object
        self.adapter = copy.deepcopy(self.adapter)
        kind = _peft_type_name(self.adapter)
        if kind not in SUPPORTED_ADAPTER_TYPES:
            raise ValueError(
                f"CaliSr cannot wrap a {type(self.adapter).__name__} ({kind}): it supports {_supported_type_names()}, "
                "the methods whose weights split into W_core + W_extra (see docs/calisr.md)."
            )
        if kind == "LORA" and getattr(self.adapter, "use_dora", False):
            raise ValueError("CaliSr does not support LoRA with use_dora=True: use a plain LoraConfig.")
        if kind == "MPO":
            # W_extra of MPO is the central tensor itself (MPOP 'full'): it must be a trainable parameter.
            self.adapter.train_central = True
        inner_save = getattr(self.adapter, "modules_to_save", None)
        if inner_save:
            merged = list(self.modules_to_save or [])
            merged += [m for m in inner_save if m not in merged]
            self.modules_to_save = merged
            self.adapter.modules_to_save = None
        self.adapter.inference_mode = self.inference_mode
        if self.target_modules is not None:
            if isinstance(self.target_modules, (list, tuple)):
                self.target_modules = set(self.target_modules)
            self.adapter.target_modules = copy.copy(self.target_modules)
        if isinstance(self.variant, str):
            self.variant = self.variant.upper()
        if self.variant not in VARIANTS:
            raise ValueError(f"CaliSrConfig.variant must be 'D' or 'S', got {self.variant!r}.")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0.0 <= self.delta <= 1.0:
            raise ValueError(f"CaliSrConfig.delta must be in [0, 1] (paper: 0.45-0.6), got {self.delta!r}.")
        for name in ("sr_interval", "decide_every", "srs_window"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"CaliSrConfig.{name} must be a positive integer or None, got {value!r}.")
        if self.sr_target not in SR_TARGETS:
            raise ValueError(f"CaliSrConfig.sr_target must be one of {SR_TARGETS}, got {self.sr_target!r}.")
        if self.extra_dtype is not None and self.extra_dtype not in EXTRA_DTYPES:
            raise ValueError(
                f"CaliSrConfig.extra_dtype must be one of {EXTRA_DTYPES} or None, got {self.extra_dtype!r}."
            )
        if self.switch_at is not None and (
            isinstance(self.switch_at, bool)
            or not isinstance(self.switch_at, (int, float))
            or not 0.0 <= float(self.switch_at) <= 1.0
        ):
            raise ValueError(f"CaliSrConfig.switch_at must be a fraction in [0, 1] or None, got {self.switch_at!r}.")
        if self.groups is not None:
            self.groups = self._normalise_groups(self.groups)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = list(self.exclude_modules)

    @property
    def resolved_groups(self) -> dict[str, list[str]]:
        """``groups``, or the default attention / ffn1 / ffn2 patterns when it is None."""
        if self.groups is None:
            return {name: list(patterns) for name, patterns in DEFAULT_GROUPS.items()}
        return self.groups

    @staticmethod
    def _normalise_groups(groups: Any) -> dict[str, list[str]]:
        if not isinstance(groups, dict) or not groups:
            raise ValueError(
                "CaliSrConfig.groups must be a non-empty dict {group name: regex or [regexes]}, e.g. "
                "{'attention': [r'attention\\.'], 'ffn': [r'intermediate\\.dense$', r'output\\.dense$']}."
            )
        normalised: dict[str, list[str]] = {}
        for name, patterns in groups.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"CaliSrConfig.groups keys must be non-empty strings, got {name!r}.")
            if isinstance(patterns, str):
                patterns = [patterns]
            if not isinstance(patterns, (list, tuple)) or not patterns:
                raise ValueError(f"CaliSrConfig.groups[{name!r}] must be a regex or a non-empty list of regexes.")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as err:
                    raise ValueError(
                        f"CaliSrConfig.groups[{name!r}]: {pattern!r} is not a valid regex ({err})."
                    ) from err
            normalised[name] = list(patterns)
        return normalised

    @property
    def adapter_type(self) -> str:
        """The wrapped method's PEFT type name: 'LORA', 'SAM' or 'MPO'."""
        return _peft_type_name(self.adapter)

    def group_of(self, module_name: str) -> str | None:
        """The group a module belongs to (first matching group), ``'model'`` for variant D, or None if none matches."""
        for name, patterns in self.resolved_groups.items():
            if any(re.search(p, module_name) for p in patterns):
                return "model" if self.variant == "D" else name
        return None

    def to_dict(self) -> dict:
        """Plain-JSON dict; the wrapped config is stored as its own ``to_dict()`` (with its ``peft_type``)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if f.name == "adapter" else value
        out.pop("runtime_config", None)
        return _jsonable(out)
