"""Configuration of the SAM tuner (Fu et al., AAAI 2023: "On the Effectiveness of Parameter-Efficient Fine-Tuning")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ...registry import PeftSamType

SELECTIONS = ("sam", "fisher", "magnitude", "random", "bitfit")
DATA_FREE_SELECTIONS = ("magnitude", "random", "bitfit")
GRADIENT_SELECTIONS = ("sam", "fisher")
SCOPES = ("per_tensor", "global")
SAVE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class SAMConfig(PeftConfig):
    """Train only a p-fraction of the pre-trained weights, chosen by their gradient signal at theta_0.

    The adapter stores, per adapted tensor, the flat indices of the chosen entries (an integer buffer) and their
    trained offsets (a 1-D parameter); every other entry keeps its pre-trained value exactly. Gradient-based
    selections (``sam``, ``fisher``) need a calibration pass: call :func:`peft_sam.select_parameters` after
    ``get_peft_model`` and before creating the optimizer. Data-free selections happen inside ``get_peft_model``.

    Args:
        p (`float`):
            Fraction of entries to train, in (0, 1] (default 0.005). ``per_tensor`` scope: each candidate tensor gets
            ``int(p * numel)`` entries (none if that is 0); ``global``: ``int(p * total)`` over all candidates.
            Ignored by ``selection="bitfit"``.
        target_modules (`Optional[Union[List[str], str]]`):
            Modules to adapt: a list of names (exact match or name suffix), a regex (full match), or ``"all-linear"``
            (every Linear/Conv1D layer except a transformers model's output layer: the output embedding or, with
            ``task_type="SEQ_CLS"``, the classification head). None (default): every supported module of the model
            (Linear, Conv1D, Embedding, Conv1d/2d/3d and norm layers), except those in ``modules_to_save``.
        exclude_modules (`Optional[Union[List[str], str]]`):
            Modules never to adapt, matched like ``target_modules`` (a list of names or suffixes, or a regex).
            None (default): no exclusion.
        selection (`Literal["sam", "fisher", "magnitude", "random", "bitfit"]`):
            How the entries are chosen. ``"sam"`` (default): largest ``|sum of clipped calibration gradients|``;
            ``"fisher"``: largest sum of squared clipped gradients (both need :func:`peft_sam.select_parameters`);
            ``"magnitude"``: largest ``|theta_0|``; ``"random"``: seeded uniform scores; ``"bitfit"``: every bias of
            the adapted modules (``p`` and ``scope`` ignored). The last three are chosen inside ``get_peft_model``.
        scope (`Literal["per_tensor", "global"]`):
            ``"per_tensor"`` (default, as the reference code): the top ``int(p * numel)`` entries of each tensor;
            ``"global"``: the top ``int(p * total)`` entries over all candidate tensors together.
        include_bias (`bool`):
            Whether the biases of the adapted modules are candidates as well as their weights (default True; must be
            True for ``selection="bitfit"``).
        num_calibration_batches (`int`):
            Training batches :func:`peft_sam.select_parameters` uses for ``sam``/``fisher`` (default 600, as the
            reference code; fewer if the dataloader is shorter; its ``num_batches`` argument overrides it).
        calibration_clip_norm (`Optional[float]`):
            Each calibration batch's gradient is scaled down to at most this global norm before it is summed
            (default 1.0); None: no clipping. The ``clip_norm`` argument of ``select_parameters`` overrides it.
        seed (`int`):
            Seed of ``selection="random"`` (one stream per tensor, from the seed and the module name) and of the
            random initial offsets with ``init_weights=False`` (default 0).
        save_dtype (`Optional[str]`):
            ``"float32"``, ``"float16"`` or ``"bfloat16"``: store the trained values in that dtype in the adapter file
            (indices are unaffected); None (default): in the dtype they were trained in.
        init_weights (`bool`):
            True (default): the offsets start at zero, so the adapted model equals the base model; False: small
            random non-zero offsets (for tests).
        modules_to_save (`Optional[List[str]]`):
            Modules apart from the adapted ones that are trained in full and saved with the adapter (e.g. the task
            head; PEFT adds the classifier itself for ``task_type="SEQ_CLS"``). None (default): none.
    """

    p: float = field(default=0.005, metadata={"help": "Fraction of entries to train, in (0, 1]."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names or a regex to adapt, or 'all-linear'; None = every supported backbone module "
            "(Linear, Conv1D, Embedding, norm layers), excluding modules_to_save."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex never to adapt."}
    )
    selection: Literal["sam", "fisher", "magnitude", "random", "bitfit"] = field(
        default="sam",
        metadata={
            "help": "How entries are chosen: sam |sum of clipped grads|, fisher sum of squared grads, magnitude "
            "|theta_0|, random (seeded), bitfit (all biases, p ignored)."
        },
    )
    scope: Literal["per_tensor", "global"] = field(
        default="per_tensor",
        metadata={
            "help": "per_tensor: top int(p*numel) of each tensor (reference code); global: top-k overall."
        },
    )
    include_bias: bool = field(
        default=True, metadata={"help": "Whether biases are candidates as well as weights."}
    )
    num_calibration_batches: int = field(
        default=600, metadata={"help": "Training batches used by select_parameters (reference: 600)."}
    )
    calibration_clip_norm: float | None = field(
        default=1.0,
        metadata={"help": "Clip each calibration batch's gradient to this global norm; None = no clip."},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the random selection (and of init_weights=False)."}
    )
    save_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Store trained values as float32/float16/bfloat16 in the adapter file; None = as trained."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: offsets start at zero (identity); False: random non-zero offsets (for tests)."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved (e.g. the task head)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftSamType.SAM
        if not isinstance(self.p, (int, float)) or not 0.0 < float(self.p) <= 1.0:
            raise ValueError(
                f"SAMConfig.p must be in (0, 1], got {self.p!r} (p=0.005 trains 0.5% of the weights)."
            )
        if self.selection not in SELECTIONS:
            raise ValueError(f"SAMConfig.selection must be one of {SELECTIONS}, got {self.selection!r}.")
        if self.scope not in SCOPES:
            raise ValueError(f"SAMConfig.scope must be one of {SCOPES}, got {self.scope!r}.")
        if self.selection == "bitfit" and not self.include_bias:
            raise ValueError("selection='bitfit' trains the biases: set include_bias=True.")
        if int(self.num_calibration_batches) < 1:
            raise ValueError(f"num_calibration_batches must be >= 1, got {self.num_calibration_batches}.")
        if self.calibration_clip_norm is not None and self.calibration_clip_norm <= 0:
            raise ValueError(f"calibration_clip_norm must be > 0 or None, got {self.calibration_clip_norm}.")
        if self.save_dtype is not None and self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {SAVE_DTYPES} or None, got {self.save_dtype!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    @property
    def needs_calibration(self) -> bool:
        """True when the entries are chosen from gradients by :func:`peft_sam.select_parameters`."""
        return self.selection in GRADIENT_SELECTIONS
