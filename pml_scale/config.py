"""Typed run configuration: YAML sets defaults, command-line overrides win, the resolved
config is saved with the run.

Why a schema and not a free dict: a typo (``optim.lr_decay``) or a wrong type
(``run.epochs=abc``) must stop the launch on every rank before a cluster job spends an hour
reaching the code that reads it. pydantic checks types, ranges, choices and unknown keys; this
module adds what pydantic cannot know: the layers, where each value came from, and errors in
the user's terms (key path, origin: file or override, accepted keys or values).

Precedence, lowest first: schema defaults < included YAML (``include:``/``defaults:``) < the
YAML file < ``a.b=value`` overrides (value parsed with ``yaml.safe_load``). Free-form dicts
(``loss.options``, ``deepspeed.extra``) are not checked here: the loss registry and DeepSpeed
validate them. ``loss.<key>`` for any key other than ``name``/``options`` is a shorthand for
``loss.options.<key>`` (so ``loss.q=0.3`` works).

Adding a key is one line in its section: ``key: type = default``, with ``Field(default, ge=..,
le=..)`` for a range or ``Literal[...]`` for choices.
"""

from __future__ import annotations

import argparse
import copy
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .atomic import atomic_write_text
from .config_errors import explain

INCLUDE_KEYS = ("include", "defaults")


class ConfigError(ValueError):
    """A bad config file, key or value; the message says which and what is accepted."""


def _from_yaml(value, tp):
    """Fit what YAML hands over to a typed key, as users write it: ``1e-4`` (a string in YAML
    1.1) for a float, ``3.0`` for an int, ``3`` for a string, ``null``/``none`` for an optional
    value, a list for a tuple. Anything else goes to pydantic's strict check unchanged."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        if isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        inner = [a for a in args if a is not type(None)]
        return _from_yaml(value, inner[0]) if len(inner) == 1 else value
    if isinstance(value, bool):
        return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if tp is str and isinstance(value, (int, float)):
        return str(value)
    if typing.get_origin(tp) is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(_from_yaml(v, a) for v, a in zip(value, args))
    return value


_SETTING = re.compile(r"^(FAL|SPL|NATIVE|(PAL|PPL)_(\d+(\.\d*)?|\.\d+))$")


def _label_setting(value: str) -> str:
    m = _SETTING.match(value)
    if not m or (m.group(3) is not None and not 0.0 < float(m.group(3)) <= 1.0):
        raise ValueError("FAL, SPL, NATIVE, PAL_r, PPL_r with 0 < r <= 1 (e.g. PAL_0.3, PPL_0.6)")
    return value


class _Section(BaseModel):
    """Strict types and no unknown keys, after the YAML shapes of ``_from_yaml`` are fitted."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_shapes(cls, value, info):
        return _from_yaml(value, cls.model_fields[info.field_name].annotation)


# ----------------------------------------------------------------------------- schema


class RunConfig(_Section):
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    epochs: int = Field(10, ge=1)
    resume: bool = True  # resume from the last checkpoint in the run folder if present
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(1, ge=0)  # 0: only at the end
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: at epoch ends only
    keep_checkpoints: int = Field(2, ge=1)
    tensorboard: bool = True
    time_shares: bool = False  # GPU: synchronise at step-part boundaries to log exact time shares
    deterministic: bool = False
    # SIGTERM (Slurm/Kubernetes preemption): checkpoint at the current step, exit 143; a run that
    # cannot do so within this many seconds exits 124 without it (0: no limit)
    preempt_grace_s: float = Field(60.0, ge=0)
    # bound on any collective: a rank whose peer vanished (a lost node) fails after this instead of
    # hanging (a killed rank's peers fail at once: its connections close); gloo groups inherit it
    dist_timeout_s: float = Field(1800.0, gt=0)


class DataConfig(_Section):
    root: Optional[str] = None  # dataset folder with manifest.json (the trainer requires it)
    build_demo: bool = False  # build the embedded demo dataset into root if absent
    demo_dataset: Literal["digits", "longtail", "photos"] = "digits"  # which one build_demo makes
    setting: Annotated[str, AfterValidator(_label_setting)] = "FAL"
    setting_seed: int = 0
    observed: Optional[str] = None  # explicit observed-label file; default derived from setting
    backend: str = "auto"
    image_size: int = Field(448, ge=1)
    batch_size: int = Field(32, ge=1)  # per rank
    eval_batch_size: int = Field(64, ge=1)
    workers: int = Field(4, ge=0)
    augment: str = "resize"
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    affinity: str = "none"
    on_error: str = "skip"
    train_split: str = "train"
    test_split: str = "test"
    # > 0: carve a validation split from train (seeded by val_seed, default run.seed; a dataset
    # that ships val_ids.npy defines its own): per-epoch evaluation and every choice use it; the
    # test split is read once, at the end (eval.test)
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    val_seed: Optional[int] = None
    feature_cache: bool = False  # cache the output of the model.frozen_stages frozen units once (data.input.features)


class ModelConfig(_Section):
    name: str = "resnet50"
    pretrained: Optional[str] = None  # local path only: nothing is downloaded at run time
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (DeepSpeed's engine.compile, inductor); see compile_mode
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    # bf16/fp16 recipe: "autocast" = torch.autocast in DeepSpeed's forward, fp32 master weights,
    # channels_last weights; "deepspeed" = DeepSpeed's bf16/fp16 mode (bf16 weights, NCHW)
    precision: Literal["autocast", "deepspeed"] = "autocast"
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    frozen_stages: int = Field(0, ge=0)  # leading units kept frozen (eval-mode BN, no gradient); efficientnet_lite0


class LossConfig(_Section):
    name: str = "paper"
    options: dict = Field(default_factory=dict)  # validated by the loss registry


class OptimConfig(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-4, ge=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)
    role_lr_multiplier: float = Field(10.0, ge=0.0)


class DeepSpeedConfig(_Section):
    config: Optional[str] = None  # DeepSpeed JSON, merged under the generated keys
    zero_stage: int = Field(0, ge=0, le=3)
    grad_clip: float = Field(0.0, ge=0.0)  # 0: no clipping
    grad_accum: int = Field(1, ge=1)
    extra: dict = Field(default_factory=dict)  # merged into the generated config verbatim


class PseudoConfig(_Section):
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    dir: Optional[str] = None  # node-local folder for the store; default: the run folder
    sync: Literal["allgather", "affinity"] = "allgather"
    init: Literal["half", "prior"] = "half"  # initial pseudo labels: 0.5 (the paper) or the class prior (ours+)
    # versioned: two stores by epoch parity, a checkpoint copies no N x L (labels.stores.VersionedPseudoStore);
    # copy: one store, every checkpoint holds a full (sparse) copy of it
    snapshot: Literal["versioned", "copy"] = "versioned"
    dtype: Literal["fp16", "uint8"] = "fp16"  # uint8: y~ quantised to 1/255 (half the store's disk and page cache)


class EvalConfig(_Section):
    partial: Optional[bool] = None  # None: masked mAP if the test labels contain -1
    test: bool = True  # with a validation split: score the test split once after the last epoch
    save_per_class: bool = True


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    pseudo: PseudoConfig = Field(default_factory=PseudoConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (tuples as lists) that YAML/JSON can store and load_config reads."""
        return _plain(self.model_dump())


SECTIONS: dict[str, type[_Section]] = {name: f.annotation for name, f in Config.model_fields.items()}


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def deep_merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


# ----------------------------------------------------------------------------- layers


class _Layers:
    """The user's values as a nested dict, layer over layer, and where each key's value came from."""

    def __init__(self):
        self.tree: dict = {}
        self.origin: dict[tuple, str] = {}

    def set(self, keys: list[str], value, origin: str, *, merge_dicts: bool) -> None:
        if not keys or any(not k for k in keys):
            raise ConfigError(f"empty key in '{'.'.join(keys)}' (from {origin})")
        if len(keys) == 1 and (value is None or isinstance(value, dict)):  # a section: key by key
            for k, v in (value or {}).items():
                self.set([keys[0], str(k)], v, origin, merge_dicts=merge_dicts)
            return
        if keys[0] == "loss" and len(keys) > 1 and keys[1] not in LossConfig.model_fields:
            keys = ["loss", "options", *keys[1:]]  # loss.<k> is shorthand for loss.options.<k>
        node = self.tree
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        old = node.get(keys[-1])
        if merge_dicts and isinstance(old, dict) and isinstance(value, dict):
            deep_merge(old, value)
        else:
            node[keys[-1]] = copy.deepcopy(value)
        for n in range(1, len(keys) + 1):
            self.origin[tuple(keys[:n])] = origin

    def build(self) -> Config:
        try:
            return Config.model_validate(self.tree)
        except ValidationError as e:
            lines = [explain(Config, self.tree, self.origin, tuple(str(k) for k in err["loc"]), err)
                     for err in e.errors()]
            raise ConfigError("\n".join(dict.fromkeys(lines))) from None


def config_from_dict(tree: dict, origin: str = "a dict") -> Config:
    """Build and validate a Config from a nested dict (e.g. a saved resolved config)."""
    if not isinstance(tree, dict):
        raise ConfigError(f"config from {origin} must be a mapping, got {type(tree).__name__}")
    layers = _Layers()
    for section, body in tree.items():
        layers.set([str(section)], body, origin, merge_dicts=True)
    return layers.build()


# ----------------------------------------------------------------------------- files


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"YAML syntax error in {path}{line}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _load_layers(path: Path, layers: _Layers, chain: tuple[Path, ...] = ()) -> None:
    """Apply ``path`` to layers, its includes first (relative to the including file)."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"include cycle: {' -> '.join(str(p) for p in (*chain, path))}")
    data = _read_yaml(path)
    includes = []
    for k in INCLUDE_KEYS:
        if k in data:
            v = data.pop(k)
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{path}: '{k}' must be a file name or a list of file names, got {v!r}")
            includes += v
    for inc in includes:
        _load_layers(path.parent / inc, layers, (*chain, path))
    for section, body in data.items():
        layers.set([str(section)], body, f"file {path}", merge_dicts=True)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml value). An empty value means null."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. run.epochs=5)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}; expected section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None
    return key.split("."), parsed


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults < YAML file (with its includes) < overrides; validated."""
    layers = _Layers()
    if path is not None:
        _load_layers(Path(path), layers)
    for text in overrides:
        keys, value = parse_override(text)
        layers.set(keys, value, f"override '{text}'", merge_dicts=False)
    return layers.build()


def save_resolved(cfg: Config, path: str | Path) -> None:
    """Atomic YAML of the full resolved config; ``load_config(path)`` gives it back."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False))


# ----------------------------------------------------------------------------- command line


def parse_cli(argv: typing.Sequence[str] | None = None) -> tuple[str | None, list[str]]:
    """``--config X [--local_rank N] a.b=c ...`` -> (config path, overrides).

    DeepSpeed's launcher appends ``--local_rank=N``; it is accepted and ignored (the trainer
    reads LOCAL_RANK from the environment).
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="train.py", description="pml-scale trainer: --config FILE then section.key=value overrides"
    )
    parser.add_argument("--config", "-c", default=None, help="experiment YAML")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    for r in rest:
        if r.startswith("-"):
            raise ConfigError(
                f"unknown option {r!r}: accepted are --config FILE, --local_rank N and "
                f"section.key=value overrides"
            )
        if "=" not in r:
            raise ConfigError(f"argument {r!r} is not an override: use section.key=value")
    return args.config, rest
