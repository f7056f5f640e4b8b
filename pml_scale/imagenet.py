"""ImageNet normalisation, the one every loader applies (in [0, 1] units; × 255 for uint8 input)."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel lists in uint8 units, as DALI's normalize takes them.
UINT8_MEAN = [m * 255 for m in IMAGENET_MEAN]
UINT8_STD = [s * 255 for s in IMAGENET_STD]


def uint8_mean_std(device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as float32 (1, 3, 1, 1) tensors in uint8 units: what raw pixels are shifted and
    divided by (the loaders on the device, the demo backbone's pretraining on the host)."""
    shape = (1, 3, 1, 1)
    return (torch.tensor(IMAGENET_MEAN, device=device).view(shape) * 255,
            torch.tensor(IMAGENET_STD, device=device).view(shape) * 255)
