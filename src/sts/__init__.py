"""sts: the Sparse Training Scheme for multimodal LLMs."""

from sts.callback import STSCallback
from sts.config import LDSConfig, STSConfig, VTCConfig
from sts.patch import apply_sts, remove_sts, set_progress, step_stats

__all__ = [
    "LDSConfig",
    "STSCallback",
    "STSConfig",
    "VTCConfig",
    "apply_sts",
    "remove_sts",
    "set_progress",
    "step_stats",
]
