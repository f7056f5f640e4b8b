"""Triton kernels, shipped as ``pml_scale.kernels`` (a PyPI package named ``kernels`` exists).

A leaf package: it imports torch and triton only, never the rest of ``pml_scale`` at import time
(``torch_fallback`` reaches for the torch reference's pieces only when a CPU call of the custom op
has no interpreter).
"""

from .ops import FusedPartialLabelLoss, fused_partial_label_loss
from .partial_label import (LaunchConfig, launch_key, partial_label_forward, pick_threshold, picked_pseudo_sums,
                            tuned_configs)

__all__ = ["FusedPartialLabelLoss", "LaunchConfig", "fused_partial_label_loss", "launch_key", "partial_label_forward",
           "pick_threshold", "picked_pseudo_sums", "tuned_configs"]
