"""Configuration of the MPO tuner (MPOP: Liu et al., ACL 2021, "Enabling Lightweight Fine-tuning for Pre-trained
Language Model Compression based on Matrix Product Operators")."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from peft.config import PeftConfig

from ...registry import PeftSamType


@dataclass
class MPOConfig(PeftConfig):
    """Fine-tune the auxiliary tensors of a matrix product operator (MPO) decomposition of each adapted weight.

    Each target weight ``W0 [out, in]`` is split by TT-SVD into ``num_factors`` local tensors in mixed-canonical form
    around the central tensor ``C`` (index ``(n - 1) // 2``), which stays frozen; the other ("auxiliary") tensors
    ``A`` train. The layer computes ``y = x (W0 + MPO(A) - MPO(A0))^T + b`` with ``A0`` the initial auxiliaries, so
    the adapted model equals the base model exactly before training. The adapter file holds the trained and the
    initial auxiliaries (about 10-25 % of ``W`` untruncated); ``C`` is recomputed from ``W0`` and ``A0`` on load.

    Args:
        num_factors (`int`):
            Number of local tensors ``n`` per weight, at least 2 (default 5, as MPOP); the central one, index
            ``(n - 1) // 2``, stays frozen. Both weight dimensions are factorised automatically into ``n`` factors
            (ordered to minimise the parameter count) unless ``factor_overrides`` gives them.
        factor_overrides (`Optional[Dict[str, List[Optional[List[int]]]]]`):
            Per-module factorisation ``{key: [row factors, col factors]}``: a key matches a module whose name ends
            with it or that it matches as a regex (PEFT's ``rank_pattern`` rule, the first matching key wins). Row
            factors multiply to ``out_features``, col factors to ``in_features``; either list may be None
            (automatic), not both; the lists' length sets that module's ``n``. A key that matches no adapted module
            is an error. None (default): automatic factors everywhere.
        max_bond (`Optional[int]`):
            Truncate every bond dimension of the decomposition to at most this value (fewer trainable parameters;
            the adapted model still equals the base model before training). None (default): exact, untruncated.
        train_central (`bool`):
            False (default, MPOP lightweight): the central tensor stays frozen and out of the adapter file. True
            (MPOP "full"): it trains as well, as a zero-initialised offset ``C - C0`` that is saved.
        target_modules (`Optional[Union[List[str], str]]`):
            Modules to adapt (Linear or transformers Conv1D only): a list of names (exact match or name suffix), a
            regex (full match), or ``"all-linear"`` (every Linear/Conv1D layer except a transformers model's output
            layer: the output embedding or, with ``task_type="SEQ_CLS"``, the classification head). None (default):
            every Linear/Conv1D layer except those in ``modules_to_save`` and the output embedding layer.
        exclude_modules (`Optional[Union[List[str], str]]`):
            Modules never to adapt, matched like ``target_modules`` (a list of names or suffixes, or a regex).
            None (default): no exclusion.
        init_weights (`bool`):
            True (default): the auxiliaries start at the decomposition (zero delta, the adapted model equals the base
            model); False: auxiliaries perturbed by seeded noise of 10 % of each tensor's RMS, a non-zero delta
            (for tests).
        seed (`int`):
            Seed of the perturbation used with ``init_weights=False`` (combined with each module's name; default 0).
        modules_to_save (`Optional[List[str]]`):
            Modules apart from the adapted ones that are trained in full and saved with the adapter (e.g. the task
            head; PEFT adds the classifier itself for ``task_type="SEQ_CLS"``). None (default): none.
    """

    num_factors: int = field(
        default=5, metadata={"help": "Number of local tensors n per weight (MPOP: 5); the central one is (n-1)//2."}
    )
    factor_overrides: dict[str, list[list[int] | None]] | None = field(
        default=None,
        metadata={
            "help": "Per-module factorisation {module-name suffix or regex: [row factors, col factors]}; either list "
            "may be None (automatic); the first matching key wins; each list's length sets that module's n."
        },
    )
    max_bond: int | None = field(
        default=None,
        metadata={"help": "Truncate every bond dimension to at most this value; None keeps the exact decomposition."},
    )
    train_central: bool = field(
        default=False,
        metadata={
            "help": "Also train the central tensor (MPOP 'full'), as a zero-initialised offset C - C0 that is saved; "
            "False (MPOP lightweight) keeps it frozen and out of the adapter file."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names or a regex to adapt, or 'all-linear'; None = every Linear/Conv1D layer of the "
            "backbone, excluding modules_to_save (the task head) and the output embedding layer."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex never to adapt."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: auxiliaries start at the decomposition (identity, zero delta); False: randomly perturbed "
            "auxiliaries, a non-zero delta (for tests)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random perturbation used when init_weights=False."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved (e.g. the task head)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftSamType.MPO
        if not _is_int(self.num_factors) or self.num_factors < 2:
            raise ValueError(
                f"MPOConfig.num_factors must be an integer >= 2 (a central tensor plus at least one trainable "
                f"auxiliary tensor), got {self.num_factors!r}."
            )
        if self.max_bond is not None and (not _is_int(self.max_bond) or self.max_bond < 1):
            raise ValueError(f"MPOConfig.max_bond must be a positive integer or None, got {self.max_bond!r}.")
        if self.factor_overrides is not None:
            self.factor_overrides = _normalise_overrides(self.factor_overrides)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalise_overrides(overrides: object) -> dict[str, list[list[int] | None]]:
    """Check the structure of ``factor_overrides`` and return it with plain lists (JSON-friendly)."""
    example = "e.g. factor_overrides={'intermediate.dense': [[4, 4, 8, 6, 4], [3, 4, 4, 4, 4]]}"
    if not isinstance(overrides, dict):
        raise ValueError(f"MPOConfig.factor_overrides must be a dict, got {type(overrides).__name__} ({example}).")
    normalised: dict[str, list[list[int] | None]] = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"factor_overrides keys must be non-empty module names or regexes, got {key!r}.")
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"factor_overrides key {key!r} is not a valid regex: {err}.") from err
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
            raise ValueError(
                f"factor_overrides[{key!r}] must be a pair [row factors, col factors] (either may be None), "
                f"got {value!r} ({example})."
            )
        pair: list[list[int] | None] = []
        for side, factors in zip(("row", "col"), value):
            if factors is None:
                pair.append(None)
                continue
            if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence) or len(factors) < 2:
                raise ValueError(
                    f"factor_overrides[{key!r}] {side} factors must be a list of >= 2 positive integers or None, "
                    f"got {factors!r}."
                )
            if not all(_is_int(f) and f >= 1 for f in factors):
                raise ValueError(
                    f"factor_overrides[{key!r}] {side} factors must be positive integers, got {list(factors)!r}."
                )
            pair.append([int(f) for f in factors])
        if pair[0] is not None and pair[1] is not None and len(pair[0]) != len(pair[1]):
            raise ValueError(
                f"factor_overrides[{key!r}]: row factors {pair[0]} and col factors {pair[1]} differ in length; "
                "both sides need one factor per local tensor."
            )
        if pair[0] is None and pair[1] is None:
            raise ValueError(f"factor_overrides[{key!r}] overrides nothing: give row and/or col factors.")
        normalised[key] = pair
    return normalised
