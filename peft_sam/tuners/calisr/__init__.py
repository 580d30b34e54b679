"""CaliSr tuner: full fine-tuning that switches, per component group, to a wrapped LoRA / SAM / MPO adapter when the
stable-rank score says so (Liu et al., "Enhancing Parameter-efficient Fine-tuning with Simple Calibration based on
Stable Rank")."""

from .callback import CaliSrCallback
from .config import DEFAULT_GROUPS, CaliSrConfig
from .controller import CaliSrController
from .ddp import CaliSrCommState, calisr_comm_hook
from .layer import CaliSrLayer
from .measure import gram_stable_ranks
from .model import CaliSrModel, calisr_layers, calisr_size_report, sam_selection_view
from .optimizer import CaliSrOptimizer
from .param_groups import calisr_param_groups
from .plot import plot_sr_trajectories

__all__ = [
    "DEFAULT_GROUPS",
    "CaliSrCallback",
    "CaliSrCommState",
    "CaliSrConfig",
    "CaliSrController",
    "CaliSrLayer",
    "CaliSrModel",
    "CaliSrOptimizer",
    "calisr_comm_hook",
    "calisr_layers",
    "calisr_param_groups",
    "calisr_size_report",
    "gram_stable_ranks",
    "plot_sr_trajectories",
    "sam_selection_view",
]
