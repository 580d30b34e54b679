"""Registration of the peft-sam tuner types with Hugging Face PEFT.

PEFT's own ``register_peft_method`` only accepts names listed in ``peft.PeftType``, so peft-sam defines its own
string enum and fills PEFT's mapping tables directly. Registration is idempotent: importing ``peft_sam`` twice (or
calling :func:`register_tuner` again with the same classes) is a no-op, while a clash with a *different* method
that already uses the same type or prefix raises a clear error.
"""

from __future__ import annotations

from enum import Enum

from peft import PeftType
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)


class PeftSamType(str, Enum):
    """PEFT types added by peft-sam. Name equals value, so the string from ``adapter_config.json`` looks them up."""

    SAM = "SAM"
    MPO = "MPO"
    CALISR = "CALISR"


def register_tuner(peft_type: PeftSamType, config_cls: type, model_cls: type, prefix: str) -> None:
    """Add one tuner type to PEFT's mapping tables (no-op if it is already registered with the same classes).

    Raises:
        KeyError: if the type or the prefix is already taken by another PEFT method.
        ValueError: if ``prefix`` does not follow the ``<type lower-case>_`` convention transformers relies on.
    """
    expected_prefix = peft_type.value.lower() + "_"
    if prefix != expected_prefix or getattr(model_cls, "prefix", prefix) != prefix:
        raise ValueError(
            f"Prefix of {peft_type.value} must be {expected_prefix!r} (transformers derives it from the type name), "
            f"got {prefix!r} / {getattr(model_cls, 'prefix', None)!r}."
        )
    if peft_type.value in {t.value for t in PeftType}:
        raise KeyError(
            f"PEFT itself now defines a method called {peft_type.value!r}; peft-sam cannot register its own "
            "tuner under that name. Pin 'peft>=0.21,<0.22' as peft-sam's requirements say."
        )
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is not None:
        if registered is config_cls and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
            return  # already registered by an earlier import: nothing to do
        raise KeyError(
            f"PEFT type {peft_type.value!r} is already registered by {registered.__module__}.{registered.__name__}; "
            "two packages cannot register the same tuner type."
        )
    for other_type, other_prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_prefix == prefix and other_type != peft_type:
            raise KeyError(
                f"Prefix {prefix!r} is already used by PEFT method {other_type!s}; cannot register it."
            )
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
