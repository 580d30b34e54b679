"""MPO tuner (MPOP, Liu et al., ACL 2021): matrix product operator adapters."""

from .config import MPOConfig
from .layer import MPOLayer
from .model import MPOModel

__all__ = ["MPOConfig", "MPOLayer", "MPOModel"]
