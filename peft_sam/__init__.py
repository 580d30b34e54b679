"""peft-sam: sparse (SAM), MPO and stable-rank calibrated (CaliSr) tuners for Hugging Face PEFT.

Importing this package registers its tuner types with PEFT (idempotent), so ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelFor*`` and transformers' ``model.load_adapter`` work with them.
A process that loads a peft-sam adapter must ``import peft_sam`` first; ``peft_sam.PeftModel`` is PEFT's own class,
re-exported so that importing it from here guarantees the registration.
"""

from peft import AutoPeftModel, AutoPeftModelForSequenceClassification, PeftModel, get_peft_model

from .calibration import SelectionSummary, select_parameters
from .io import atomic_adapter_writes, atomic_save_file
from .registry import PeftSamType, register_tuner
from .tuners.calisr import (
    CaliSrCallback,
    CaliSrConfig,
    CaliSrController,
    CaliSrModel,
    CaliSrOptimizer,
    calisr_param_groups,
    calisr_size_report,
)
from .tuners.mpo import MPOConfig, MPOLayer, MPOModel
from .tuners.sam import SAMConfig, SAMLayer, SAMModel, SAMNotCalibratedError, load_sam_indices

register_tuner(PeftSamType.SAM, SAMConfig, SAMModel, prefix="sam_")
register_tuner(PeftSamType.MPO, MPOConfig, MPOModel, prefix="mpo_")
register_tuner(PeftSamType.CALISR, CaliSrConfig, CaliSrModel, prefix="calisr_")

__version__ = "0.1.0"

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForSequenceClassification",
    "CaliSrCallback",
    "CaliSrConfig",
    "CaliSrController",
    "CaliSrOptimizer",
    "MPOConfig",
    "MPOLayer",
    "MPOModel",
    "PeftModel",
    "PeftSamType",
    "SAMConfig",
    "SAMLayer",
    "SAMModel",
    "SAMNotCalibratedError",
    "SelectionSummary",
    "atomic_adapter_writes",
    "atomic_save_file",
    "calisr_param_groups",
    "calisr_size_report",
    "get_peft_model",
    "load_sam_indices",
    "register_tuner",
    "select_parameters",
]
