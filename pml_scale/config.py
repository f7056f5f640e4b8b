"""Typed run configuration: YAML sets defaults, command-line overrides win, the resolved
config is saved with the run.

Why a schema of dataclasses and not a free dict: a typo (``optim.lr_decay``) or a wrong type
(``run.epochs=abc``) must stop the launch on every rank before a cluster job spends an hour
reaching the code that reads it. Every key is checked against the schema, and errors name the
key path, where the value came from (file or override) and the accepted keys or values.

Precedence, lowest first: dataclass defaults < included YAML (``include:``/``defaults:``) <
the YAML file < ``a.b=value`` overrides (value parsed with ``yaml.safe_load``). Free-form
dicts (``loss.options``, ``deepspeed.extra``) are not checked here: the loss registry and
DeepSpeed validate them. ``loss.<key>`` for any key other than ``name``/``options`` is a
shorthand for ``loss.options.<key>`` (so ``loss.q=0.3`` works).

Nothing here grows with the dataset: the config is a few hundred bytes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .atomic import atomic_write_text

INCLUDE_KEYS = ("include", "defaults")


class ConfigError(ValueError):
    """A bad config file, key or value; the message says which and what is accepted."""


def _choices(*values: str) -> dict:
    return {"choices": values}


def _range(lo: float | None = None, hi: float | None = None, *, hi_open: bool = False) -> dict:
    return {"range": (lo, hi, hi_open)}


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    epochs: int = field(default=10, metadata=_range(1))
    resume: bool = True  # resume from the last checkpoint in the run folder if present
    log_every: int = field(default=10, metadata=_range(1))
    eval_every: int = field(default=1, metadata=_range(0))  # 0: only at the end
    checkpoint_every_steps: int = field(default=0, metadata=_range(0))  # 0: at epoch ends only
    keep_checkpoints: int = field(default=2, metadata=_range(1))
    tensorboard: bool = True
    time_shares: bool = False  # GPU: synchronise at step-part boundaries to log exact time shares
    deterministic: bool = False


@dataclass
class DataConfig:
    root: Optional[str] = None  # dataset folder with manifest.json (the trainer requires it)
    build_demo: bool = False  # build the embedded demo dataset into root if absent
    setting: str = field(default="FAL", metadata={"pattern": "setting"})
    setting_seed: int = 0
    observed: Optional[str] = None  # explicit observed-label file; default derived from setting
    backend: str = "auto"
    image_size: int = field(default=448, metadata=_range(1))
    batch_size: int = field(default=32, metadata=_range(1))  # per rank
    eval_batch_size: int = field(default=64, metadata=_range(1))
    workers: int = field(default=4, metadata=_range(0))
    augment: str = "resize"
    hflip: float = field(default=0.5, metadata=_range(0.0, 1.0))
    affinity: str = "none"
    on_error: str = "skip"
    train_split: str = "train"
    test_split: str = "test"


@dataclass
class ModelConfig:
    name: str = "resnet50"
    pretrained: Optional[str] = None  # local path only: nothing is downloaded at run time
    channels_last: bool = True
    compile: bool = False
    dtype: str = field(default="bf16", metadata=_choices("bf16", "fp16", "fp32"))
    # bf16/fp16 recipe: "autocast" = torch.autocast in DeepSpeed's forward, fp32 master weights,
    # channels_last weights; "deepspeed" = DeepSpeed's bf16/fp16 mode (bf16 weights, NCHW)
    precision: str = field(default="autocast", metadata=_choices("autocast", "deepspeed"))
    head_dropout: float = field(default=0.0, metadata=_range(0.0, 1.0, hi_open=True))


@dataclass
class LossConfig:
    name: str = "paper"
    options: dict = field(default_factory=dict)  # validated by the loss registry


@dataclass
class OptimConfig:
    name: str = field(default="adamw", metadata=_choices("adamw", "sgd"))
    lr: float = field(default=1e-4, metadata=_range(0.0))
    weight_decay: float = field(default=1e-4, metadata=_range(0.0))
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0))
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = field(default="cosine", metadata=_choices("cosine", "onecycle", "constant"))
    warmup_epochs: float = field(default=1.0, metadata=_range(0.0))
    min_lr_ratio: float = field(default=0.01, metadata=_range(0.0, 1.0))
    role_lr_multiplier: float = field(default=10.0, metadata=_range(0.0))


@dataclass
class DeepSpeedConfig:
    config: Optional[str] = None  # DeepSpeed JSON, merged under the generated keys
    zero_stage: int = field(default=0, metadata=_range(0, 3))
    grad_clip: float = field(default=0.0, metadata=_range(0.0))  # 0: no clipping
    grad_accum: int = field(default=1, metadata=_range(1))
    extra: dict = field(default_factory=dict)  # merged into the generated config verbatim


@dataclass
class PseudoConfig:
    momentum: float = field(default=0.0, metadata=_range(0.0, 1.0, hi_open=True))
    dir: Optional[str] = None  # node-local folder for the store; default: the run folder
    sync: str = field(default="allgather", metadata=_choices("allgather", "affinity"))


@dataclass
class EvalConfig:
    partial: Optional[bool] = None  # None: masked mAP if the test labels contain -1
    save_per_class: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (tuples as lists) that YAML/JSON can store and load_config reads."""
        return _plain(dataclasses.asdict(self))


SECTIONS: dict[str, type] = dict(typing.get_type_hints(Config))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- merging


def _unknown(path: str, key: str, valid: list[str], origin: str, what: str = "keys") -> ConfigError:
    prefix = f"{path}." if path else ""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    where = f"'{path}'" if path else "the config"
    return ConfigError(
        f"unknown key '{prefix}{key}' (from {origin}).{hint} "
        f"Valid {what} of {where}: {', '.join(valid)}"
    )


def _deep_merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


class _Raw:
    """The config as a nested dict being built, plus where each leaf value came from."""

    def __init__(self):
        self.tree: dict = Config().to_dict()
        self.origin: dict[str, str] = {}

    def set(self, keys: list[str], value, origin: str, *, merge_dicts: bool) -> None:
        if not keys or any(not k for k in keys):
            raise ConfigError(f"empty key in '{'.'.join(keys)}' (from {origin})")
        section = keys[0]
        if section not in SECTIONS:
            raise _unknown("", section, list(SECTIONS), origin, what="sections")
        if len(keys) == 1:
            if not isinstance(value, dict) and value is not None:
                raise ConfigError(
                    f"'{section}' is a section: give a mapping of its keys (from {origin}), "
                    f"got {value!r}"
                )
            for k, v in (value or {}).items():
                self.set([section, str(k)], v, origin, merge_dicts=merge_dicts)
            return
        cls = SECTIONS[section]
        names = [f.name for f in dataclasses.fields(cls)]
        key = keys[1]
        if key not in names:
            if section == "loss":  # loss.<k> is shorthand for loss.options.<k>
                keys = [section, "options", *keys[1:]]
                key = "options"
            else:
                raise _unknown(section, key, names, origin)
        hint = typing.get_type_hints(cls)[key]
        if hint is dict:
            node = self.tree[section]
            sub = keys[2:]
            if not sub:
                if not isinstance(value, dict):
                    raise ConfigError(
                        f"{section}.{key}: expected a mapping, got {value!r} (from {origin})"
                    )
                node[key] = _deep_merge(node[key], value) if merge_dicts else copy.deepcopy(value)
            else:
                node = node[key]
                for k in sub[:-1]:
                    if not isinstance(node.get(k), dict):
                        node[k] = {}
                    node = node[k]
                if merge_dicts and isinstance(value, dict) and isinstance(node.get(sub[-1]), dict):
                    _deep_merge(node[sub[-1]], value)
                else:
                    node[sub[-1]] = copy.deepcopy(value)
            self.origin[f"{section}.{key}"] = origin
            return
        if len(keys) > 2:
            raise ConfigError(
                f"'{section}.{key}' is a plain value, it has no key '{keys[2]}' (from {origin})"
            )
        self.tree[section][key] = value
        self.origin[f"{section}.{key}"] = origin


# ----------------------------------------------------------------------------- types


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is tuple:
        return f"list of {len(args)} {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str, origin: str):
    def bad(extra: str = ""):
        return ConfigError(
            f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}) "
            f"from {origin}{extra}"
        )

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        return _coerce(value, args[0], key, origin) if len(args) == 1 else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad(" (use true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad()
        return tuple(_coerce(v, a, key, origin) for v, a in zip(value, args))
    if tp is dict:
        if not isinstance(value, dict):
            raise bad()
        return copy.deepcopy(value)
    raise TypeError(f"config schema: unsupported type {tp!r} for {key}")  # a bug in this file


_SETTING = re.compile(r"^(FAL|SPL|NATIVE|(PAL|PPL)_(\d+(\.\d*)?|\.\d+))$")


def _check_value(value, meta: dict, key: str, origin: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(
            f"{key}: {value!r} is not accepted (from {origin}); accepted values: "
            f"{', '.join(meta['choices'])}"
        )
    if "range" in meta and value is not None:
        lo, hi, hi_open = meta["range"]
        ok = (lo is None or value >= lo) and (
            hi is None or (value < hi if hi_open else value <= hi)
        ) and not (isinstance(value, float) and math.isnan(value))
        if not ok:
            hi_s = "inf" if hi is None else hi
            raise ConfigError(
                f"{key}: {value!r} is out of range [{lo}, {hi_s}{')' if hi_open else ']'} "
                f"(from {origin})"
            )
    if meta.get("pattern") == "setting":
        m = _SETTING.match(value)
        if not m or (m.group(3) is not None and not 0.0 < float(m.group(3)) <= 1.0):
            raise ConfigError(
                f"{key}: {value!r} is not a label setting (from {origin}); accepted: FAL, SPL, "
                f"NATIVE, PAL_r, PPL_r with 0 < r <= 1 (e.g. PAL_0.3, PPL_0.6)"
            )


def config_from_dict(tree: dict, origin: str = "a dict") -> Config:
    """Build and validate a Config from a nested dict (e.g. a saved resolved config)."""
    raw = _Raw()
    if not isinstance(tree, dict):
        raise ConfigError(f"config from {origin} must be a mapping, got {type(tree).__name__}")
    for section, body in tree.items():
        raw.set([str(section)], body, origin, merge_dicts=True)
    return _build(raw)


def _build(raw: _Raw) -> Config:
    sections = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            origin = raw.origin.get(key, "the defaults")
            value = _coerce(raw.tree[section][f.name], hints[f.name], key, origin)
            _check_value(value, f.metadata, key, origin)
            kwargs[f.name] = value
        sections[section] = cls(**kwargs)
    return Config(**sections)


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


def _load_layers(path: Path, raw: _Raw, chain: tuple[Path, ...] = ()) -> None:
    """Apply ``path`` to raw, its includes first (relative to the including file)."""
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
        _load_layers(path.parent / inc, raw, (*chain, path))
    for section, body in data.items():
        raw.set([str(section)], body, f"file {path}", merge_dicts=True)


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
    raw = _Raw()
    if path is not None:
        _load_layers(Path(path), raw)
    for text in overrides:
        keys, value = parse_override(text)
        raw.set(keys, value, f"override '{text}'", merge_dicts=False)
    return _build(raw)


def save_resolved(cfg: Config, path: str | Path) -> None:
    """Atomic YAML of the full resolved config; ``load_config(path)`` gives it back."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False))


# ----------------------------------------------------------------------------- DeepSpeed

_FORBIDDEN_DS = ("optimizer", "scheduler")


def deepspeed_config(cfg: Config, *, world_size: int) -> dict:
    """DeepSpeed JSON for this run: JSON file < generated keys < ``deepspeed.extra``.

    No "optimizer"/"scheduler": the trainer passes a torch optimizer and its own schedule,
    so DeepSpeed builds (and JIT-compiles) no optimizer op.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be a positive int, got {world_size!r}")
    ds = cfg.deepspeed
    base: dict = {}
    if ds.config:
        p = Path(ds.config)
        try:
            base = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"deepspeed.config: file not found: {p}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed.config: JSON error in {p} line {e.lineno}: {e.msg}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"deepspeed.config: {p} must hold a JSON object")
    mb = cfg.data.batch_size
    generated = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": mb * ds.grad_accum * world_size,
        "gradient_clipping": ds.grad_clip,
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "fp16": {"enabled": cfg.model.dtype == "fp16"},
        "zero_optimization": {"stage": ds.zero_stage},
    }
    out = _deep_merge(_deep_merge(copy.deepcopy(base), generated), ds.extra)
    for k in _FORBIDDEN_DS:
        if k in out:
            src = "deepspeed.extra" if k in ds.extra else f"deepspeed.config ({ds.config})"
            raise ConfigError(
                f"DeepSpeed key '{k}' in {src} is not supported: the trainer passes a torch "
                f"optimizer and schedule (set optim.* instead)"
            )
    for k, want, name in (
        ("train_micro_batch_size_per_gpu", mb, "data.batch_size"),
        ("gradient_accumulation_steps", ds.grad_accum, "deepspeed.grad_accum"),
        ("train_batch_size", mb * ds.grad_accum * world_size, "data.batch_size x grad_accum x world"),
    ):
        if out.get(k) != want:
            raise ConfigError(
                f"deepspeed.extra sets '{k}'={out.get(k)!r} but the loader uses {want} ({name}); "
                f"set {name} instead"
            )
    return out


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
