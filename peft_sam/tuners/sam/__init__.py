"""SAM tuner: sparse fine-tuning of the entries with the largest gradient signal at the pre-trained point."""

from .config import SAMConfig
from .layer import SAMLayer, SAMNotCalibratedError
from .model import SAMModel, load_sam_indices

__all__ = ["SAMConfig", "SAMLayer", "SAMModel", "SAMNotCalibratedError", "load_sam_indices"]
