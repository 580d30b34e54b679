"""CaliSr tuner: full fine-tuning that switches, per component group, to a wrapped LoRA / SAM / MPO adapter when the
stable-rank score says so (Liu et al., "Enhancing Parameter-efficient Fine-tuning with Simple Calibration based on
Stable Rank")."""

from .config import DEFAULT_GROUPS, CaliSrConfig
from .controller import (
    CaliSrCallback,
    CaliSrController,
    calisr_param_groups,
    gram_stable_ranks,
    plot_sr_trajectories,
)
from .layer import CaliSrLayer
from .model import CaliSrModel, calisr_layers, calisr_size_report, sam_selection_view

__all__ = [
    "DEFAULT_GROUPS",
    "CaliSrCallback",
    "CaliSrConfig",
    "CaliSrController",
    "CaliSrLayer",
    "CaliSrModel",
    "calisr_layers",
    "calisr_param_groups",
    "calisr_size_report",
    "gram_stable_ranks",
    "plot_sr_trajectories",
    "sam_selection_view",
]
