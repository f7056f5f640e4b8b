"""Experiment grids: expand a spec into cells, run them as trainer subprocesses, resume, report.

A grid spec (YAML, see configs/grids/) is datasets x settings x methods x seeds minus excluded
combinations. Each cell gets a stable name `dataset-setting-method-sSEED` and its own run folder
`OUT/NAME/`, which the trainer fills (config.yaml, metrics.jsonl, per_class_ap.json, and
summary.json last). Why subprocesses: a crashed or killed run takes nothing else down, and the
same runner drives `python launch/train.py` on a laptop or `deepspeed ...` on a node.

Resume rule: a cell is finished if and only if its summary.json parses and holds final_map.
Anything else (failed, interrupted, never started, runner killed) runs again next time.
Cost: O(cells) memory and files; the runner itself holds no training state.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pml_scale import report
from pml_scale.atomic import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SETTING_RE = re.compile(r"^(FAL|SPL|NATIVE|(PAL|PPL)_(0?\.\d+|1(\.0+)?))$")
SETTINGS_HELP = "FAL, SPL, NATIVE, PAL_r or PPL_r with 0 < r <= 1 (e.g. PAL_0.3)"
NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")
OVERRIDE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")
RUNNER_KEYS = ("run.name", "run.out_dir", "run.seed", "data.setting")  # set per cell by the runner
CELL_FIELDS = ("dataset", "setting", "method", "seed")


class SpecError(ValueError):
    """A grid spec or method file is malformed; the message names the file and key."""


@dataclass(frozen=True)
class Cell:
    dataset: str
    setting: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.setting}-{self.method}-s{self.seed}"

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "setting": self.setting, "method": self.method,
                "seed": self.seed, "name": self.name}


@dataclass
class Entry:
    """A dataset (base config + overrides) or a method (overrides only), with a display label."""
    label: str
    overrides: list[str]
    config: Path | None = None


@dataclass
class GridSpec:
    path: Path
    name: str
    datasets: dict[str, Entry]
    settings: list[str]
    methods: dict[str, Entry]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    exclude: list[dict[str, list[str]]] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------ spec loading

def _overrides(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}: expected a list of 'key.path=value' strings, got {value!r}")
    for v in value:
        if not OVERRIDE_RE.match(v):
            raise SpecError(f"{where}: {v!r} is not a dotted override 'section.key=value'")
        if v.split("=", 1)[0] in RUNNER_KEYS:
            raise SpecError(f"{where}: {v!r} sets {v.split('=', 1)[0]}, which the grid runner sets per cell "
                            f"(runner-owned keys: {', '.join(RUNNER_KEYS)})")
    return list(value)


def _names(value, where: str, kind: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise SpecError(f"{where}: expected a non-empty list of {kind} names, got {value!r}")
    for v in value:
        if not isinstance(v, str) or not NAME_RE.match(v):
            raise SpecError(f"{where}: {v!r} is not a valid {kind} name (letters, digits, '_' and '.'; "
                            f"no '-', which separates the parts of a cell name)")
    if len(set(value)) != len(value):
        raise SpecError(f"{where}: duplicate {kind} names in {value}")
    return list(value)


def load_method(methods_dir: Path, name: str) -> Entry:
    """configs/methods/<name>.yaml: {label: str, overrides: [key.path=value, ...]}."""
    path = methods_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in methods_dir.glob("*.yaml")) if methods_dir.is_dir() else []
        raise SpecError(f"method {name!r}: no file {path} (methods there: {', '.join(known) or 'none'})")
    try:
        obj = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(obj, dict) or set(obj) - {"label", "overrides", "description"}:
        raise SpecError(f"{path}: expected keys label, overrides (optional description), got {obj!r}")
    return Entry(label=str(obj.get("label", name)), overrides=_overrides(obj.get("overrides"), f"{path}: overrides"))


SPEC_KEYS = {"name", "description", "datasets", "settings", "methods", "methods_dir", "seeds", "overrides",
             "exclude", "tables"}


def load_spec(path: str | Path) -> GridSpec:
    """Parse and validate a grid spec. Relative paths in it resolve against the spec's folder."""
    path = Path(path).resolve()
    obj = _read_spec(path)
    base = path.parent
    datasets = _datasets(obj["datasets"], path, base)
    settings = _names(obj["settings"], f"{path}: settings", "setting")
    for s in settings:
        if not SETTING_RE.match(s):
            raise SpecError(f"{path}: settings: {s!r} is not a setting; accepted: {SETTINGS_HELP}")
    methods_dir = (base / obj.get("methods_dir", "../methods")).resolve()
    methods = {m: load_method(methods_dir, m) for m in _names(obj["methods"], f"{path}: methods", "method")}
    seeds = obj.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise SpecError(f"{path}: seeds: expected a list of distinct non-negative integers, got {seeds!r}")
    exclude = _exclude_rules(obj.get("exclude") or [], path)
    tables = _tables(obj.get("tables") or [], path, datasets, settings, methods)
    name = obj.get("name", path.stem)
    if not isinstance(name, str) or not NAME_RE.match(name.replace("-", "_")):
        raise SpecError(f"{path}: name: {name!r} must be letters, digits, '_', '-' or '.'")
    return GridSpec(path=path, name=name, datasets=datasets, settings=settings, methods=methods, seeds=seeds,
                    overrides=_overrides(obj.get("overrides"), f"{path}: overrides"), exclude=exclude, tables=tables)


def _read_spec(path: Path) -> dict:
    """The spec's YAML mapping, its keys checked (unknown ones refused, required ones present)."""
    try:
        obj = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SpecError(f"grid spec {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SpecError(f"grid spec {path}: not valid YAML ({e})") from None
    if not isinstance(obj, dict):
        raise SpecError(f"{path}: expected a mapping with keys {sorted(SPEC_KEYS)}")
    if set(obj) - SPEC_KEYS:
        raise SpecError(f"{path}: unknown keys {sorted(set(obj) - SPEC_KEYS)}; accepted: {sorted(SPEC_KEYS)}")
    for k in ("datasets", "settings", "methods"):
        if k not in obj:
            raise SpecError(f"{path}: missing key {k!r}")
    return obj


def _datasets(dsets, path: Path, base: Path) -> dict[str, Entry]:
    """``datasets``: name -> config path, or {config, label, overrides}; configs resolved against ``base``."""
    if not isinstance(dsets, dict) or not dsets:
        raise SpecError(f"{path}: datasets: expected a mapping name -> config path or "
                        f"{{config, label, overrides}}, got {dsets!r}")
    _names(list(dsets), f"{path}: datasets", "dataset")
    datasets = {}
    for dn, dv in dsets.items():
        where = f"{path}: datasets.{dn}"
        dv = {"config": dv} if isinstance(dv, str) else dv
        if not isinstance(dv, dict) or not isinstance(dv.get("config"), str) or set(dv) - {"config", "label", "overrides"}:
            raise SpecError(f"{where}: expected a config path or {{config, label, overrides}}, got {dv!r}")
        cfg = (base / dv["config"]).resolve()
        if not cfg.is_file():
            raise SpecError(f"{where}: config file {cfg} does not exist")
        datasets[dn] = Entry(label=str(dv.get("label", dn)), config=cfg,
                             overrides=_overrides(dv.get("overrides"), f"{where}.overrides"))
    return datasets


def _exclude_rules(rules, path: Path) -> list[dict]:
    """``exclude``: a list of {cell field: glob pattern(s)}; a cell matching every field of a rule is left out."""
    exclude = []
    for i, rule in enumerate(rules):
        where = f"{path}: exclude[{i}]"
        if not isinstance(rule, dict) or not rule or set(rule) - set(CELL_FIELDS):
            raise SpecError(f"{where}: expected a mapping over {CELL_FIELDS} to glob pattern(s), got {rule!r}")
        pats = {}
        for k, v in rule.items():
            v = v if isinstance(v, list) else [v]
            if not v or not all(isinstance(p, (str, int)) for p in v):
                raise SpecError(f"{where}.{k}: expected a pattern or a list of patterns, got {rule[k]!r}")
            pats[k] = [str(p) for p in v]
        exclude.append(pats)
    return exclude


def _tables(tables, path: Path, datasets: dict, settings: list, methods: dict) -> list:
    """``tables``: each names only datasets, settings and methods (and a reference method) of the grid."""
    if not isinstance(tables, list):
        raise SpecError(f"{path}: tables: expected a list, got {tables!r}")
    for i, t in enumerate(tables):
        where = f"{path}: tables[{i}]"
        if not isinstance(t, dict) or set(t) - {"title", "datasets", "settings", "methods", "reference"}:
            raise SpecError(f"{where}: expected keys title, datasets, settings, methods, reference; got {t!r}")
        for k, known in (("datasets", datasets), ("settings", settings), ("methods", methods), ("reference", methods)):
            unknown = [x for x in t.get(k) or [] if x not in known]
            if unknown:
                raise SpecError(f"{where}.{k}: {unknown} not in the grid's {k if k != 'reference' else 'methods'} "
                                f"({', '.join(map(str, known))})")
    return tables


# --------------------------------------------------------------------------------- expansion

def _match(value: str, patterns: list[str]) -> bool:
    """True when `value` matches any plain glob (or there is none) and no '!GLOB' of the list:
    ["bce", "bce_ls"] is either, "!FAL" is anything but FAL, ["!PAL_0.6", "!PPL_0.6"] is neither."""
    pos = [p for p in patterns if not p.startswith("!")]
    neg = [p[1:] for p in patterns if p.startswith("!")]
    return (not pos or any(fnmatch.fnmatchcase(value, p) for p in pos)) and \
        not any(fnmatch.fnmatchcase(value, p) for p in neg)


def is_excluded(cell: Cell, rules: list[dict[str, list[str]]]) -> bool:
    """A cell is excluded when every field named by some rule matches that rule's patterns."""
    d = {k: str(v) for k, v in cell.as_dict().items()}
    return any(all(_match(d[k], pats) for k, pats in rule.items()) for rule in rules)


def expand(spec: GridSpec) -> list[Cell]:
    """All cells, ordered dataset, setting, method, seed (spec order), exclusions removed."""
    cells = [Cell(d, s, m, seed) for d in spec.datasets for s in spec.settings for m in spec.methods
             for seed in spec.seeds]
    return [c for c in cells if not is_excluded(c, spec.exclude)]


def filter_cells(cells: list[Cell], only: str | None) -> list[Cell]:
    """Cells whose name matches any of the comma-separated glob patterns in `only`."""
    if not only:
        return cells
    pats = [p.strip() for p in only.split(",") if p.strip()]
    return [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in pats)]


def default_train_cmd() -> list[str]:
    script = REPO / "launch" / "train.py"
    if not script.is_file():
        raise SpecError(f"no trainer at {script}; pass --train-cmd (e.g. 'deepspeed launch/train.py')")
    return [sys.executable, str(script)]


def cell_command(spec: GridSpec, cell: Cell, out_dir: Path, train_cmd: list[str],
                 extra: list[str] = ()) -> list[str]:
    """The trainer command of one cell. Later overrides win: dataset, method, spec, --set, then
    the runner-owned keys (setting, seed, name, out_dir)."""
    ds, me = spec.datasets[cell.dataset], spec.methods[cell.method]
    return [*train_cmd, "--config", str(ds.config), *ds.overrides, *me.overrides, *spec.overrides, *extra,
            f"data.setting={cell.setting}", f"run.seed={cell.seed}", f"run.name={cell.name}",
            f"run.out_dir={Path(out_dir).resolve()}"]


# ----------------------------------------------------------------------------------- running

def cell_status(out_dir: Path, cell: Cell) -> str:
    """'done' (valid summary.json), or the runner's last record: 'failed', 'interrupted',
    'running' (a runner died or is still at it), else 'pending'."""
    run_dir = Path(out_dir) / cell.name
    if report.load_summary(run_dir) is not None:
        return "done"
    try:
        return json.loads((run_dir / "grid_status.json").read_text()).get("status", "pending")
    except (OSError, ValueError):
        return "pending"


def _read_attempts(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "grid_status.json").read_text()).get("attempts", 0))
    except (OSError, ValueError, TypeError):
        return 0


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class _Running:
    cell: Cell
    proc: subprocess.Popen
    log: object
    lock: object
    t0: float
    attempts: int
    command: list[str]
    device: str | None


def run_cells(jobs: list[tuple[Cell, list[str]]], out_dir: Path, *, parallel: int = 1,
              devices: list[str] | None = None, grace_s: float = 10.0, stagger: bool = True,
              primed: set | None = None, log=print) -> dict[str, str]:
    """Run (cell, command) jobs, `parallel` at a time; return name -> final status.

    Each cell's stdout+stderr append to OUT/NAME/grid.log and its state goes to
    OUT/NAME/grid_status.json. A per-cell lock lets two runners share an out dir without running
    the same cell twice. Children run in their own session; on Ctrl-C/SIGTERM they get SIGINT,
    then SIGTERM, then SIGKILL after `grace_s` each, and are recorded 'interrupted' before the
    KeyboardInterrupt propagates.

    stagger: the trainer creates shared files on first use (the demo dataset per data root, the
    observed-label file per setting). So that two cells never race to create them, a cell waits
    while another cell of its dataset, or of its (dataset, setting), is still preparing, i.e.
    has not opened its metrics.jsonl yet (the trainer does that once its data is ready).
    `primed` holds the datasets and (dataset, setting) pairs known to be prepared already."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    if devices is not None and len(devices) < parallel:
        raise ValueError(f"--devices lists {len(devices)} device groups but --parallel is {parallel}; "
                         f"give at least one group per parallel slot")
    runner = _Runner(jobs, Path(out_dir), parallel, devices, stagger, primed, log)
    try:
        while runner.pending or runner.running:
            runner.note_prepared()
            runner.start_ready()
            time.sleep(0.05 if runner.running else 0)
            runner.reap()
    except KeyboardInterrupt:
        runner.interrupt(grace_s)
        raise
    return runner.result


class _Runner:
    """The state of one ``run_cells`` call: cells waiting, cells running, free devices, results."""

    def __init__(self, jobs, out_dir: Path, parallel: int, devices, stagger: bool, primed, log):
        self.out_dir, self.parallel, self.stagger, self.log = out_dir, parallel, stagger, log
        self.free_devices = list(devices) if devices else None
        self.pending = list(jobs)
        self.running: list[_Running] = []
        self.result: dict[str, str] = {}
        self.durations: list[float] = []
        self.total, self.finished = len(jobs), 0
        self.primed = set(primed or ())
        for cell, _ in jobs:  # an earlier attempt got past data preparation
            if (out_dir / cell.name / "metrics.jsonl").exists():
                self.primed |= {cell.dataset, (cell.dataset, cell.setting)}

    def record(self, r: _Running, status: str, rc: int | None) -> None:
        atomic_write_json(self.out_dir / r.cell.name / "grid_status.json", {
            "status": status, "returncode": rc, "attempts": r.attempts, "started": r.t0,
            "ended": time.time() if status != "running" else None, "command": r.command, "device": r.device})

    def release(self, r: _Running) -> None:
        r.log.close()
        r.lock.close()
        if self.free_devices is not None:
            self.free_devices.append(r.device)

    def ready(self, cell: Cell) -> bool:
        """False while another running cell of its dataset, or of its (dataset, setting), still prepares."""
        if not self.stagger:
            return True
        for key in (cell.dataset, (cell.dataset, cell.setting)):
            if key not in self.primed and any(key in (r.cell.dataset, (r.cell.dataset, r.cell.setting))
                                              for r in self.running):
                return False
        return True

    def note_prepared(self) -> None:
        """A running cell whose metrics.jsonl exists is past its data preparation."""
        for r in self.running:
            if (self.out_dir / r.cell.name / "metrics.jsonl").exists():
                self.primed |= {r.cell.dataset, (r.cell.dataset, r.cell.setting)}

    def _settle(self, cell: Cell, status: str, line: str) -> None:
        """A cell that ends without (further) running: count it, keep its status, log its line."""
        self.finished += 1
        self.result[cell.name] = status
        self.log(f"[{self.finished}/{self.total}] {line}")

    def start_ready(self) -> None:
        """Start ready cells until every parallel slot is busy or none is ready."""
        while len(self.running) < self.parallel:
            nxt = next((i for i, (c, _) in enumerate(self.pending) if self.ready(c)), None)
            if nxt is None:
                break
            self._start(*self.pending.pop(nxt))

    def _start(self, cell: Cell, cmd: list[str]) -> None:
        run_dir = self.out_dir / cell.name
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".grid.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return self._settle(cell, "busy", f"busy     {cell.name}  (another runner holds it)")
        if report.load_summary(run_dir) is not None:  # finished meanwhile by another runner
            lock.close()
            return self._settle(cell, "done", f"done     {cell.name}  (finished by another runner)")
        device = self.free_devices.pop(0) if self.free_devices is not None else None
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        logf = open(run_dir / "grid.log", "a")
        logf.write(f"\n==== grid runner {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
        logf.flush()
        attempts = _read_attempts(run_dir) + 1
        try:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        except OSError as e:
            logf.write(f"cannot start: {e}\n")
            r = _Running(cell, None, logf, lock, time.time(), attempts, cmd, device)
            self.record(r, "failed", None)
            self.release(r)
            return self._settle(cell, "failed", f"FAILED   {cell.name}  cannot start {cmd[0]!r}: {e.strerror}")
        r = _Running(cell, proc, logf, lock, time.time(), attempts, cmd, device)
        self.record(r, "running", None)
        self.running.append(r)
        self.log(f"[start]  {cell.name}" + (f"  (device {device})" if device is not None else "")
                 + (f"  attempt {attempts}" if attempts > 1 else ""))

    def reap(self) -> None:
        """Record every child that has exited: done (a valid summary.json) or failed."""
        for r in list(self.running):
            rc = r.proc.poll()
            if rc is None:
                continue
            self.running.remove(r)
            self.primed |= {r.cell.dataset, (r.cell.dataset, r.cell.setting)}  # whatever happened, it is over
            dt = time.time() - r.t0
            summary = report.load_summary(self.out_dir / r.cell.name)
            status = "done" if summary is not None else "failed"
            self.record(r, status, rc)
            self.release(r)
            if status == "done":
                self.durations.append(dt)
                left = self.total - self.finished - 1
                eta = (sum(self.durations) / len(self.durations)) * left / self.parallel if left else 0.0
                best = summary.get("best_map")
                self._settle(r.cell, status, f"done     {r.cell.name}  final mAP {100 * summary['final_map']:.1f}"
                             + (f"  best {100 * best:.1f}" if isinstance(best, (int, float)) else "")
                             + f"  {_fmt_s(dt)}" + (f"  eta {_fmt_s(eta)}" if left else ""))
            else:
                why = f"exit code {rc}" if rc != 0 else "exit code 0 but no valid summary.json"
                self._settle(r.cell, status, f"FAILED   {r.cell.name}  {why}; log: "
                                             f"{self.out_dir / r.cell.name / 'grid.log'}")

    def interrupt(self, grace_s: float) -> None:
        """Ctrl-C/SIGTERM: stop the children, record each as done (if it got there) or interrupted."""
        _stop(self.running, grace_s)
        for r in self.running:  # a run that wrote summary.json before it stopped did finish
            status = "done" if report.load_summary(self.out_dir / r.cell.name) is not None else "interrupted"
            self.record(r, status, r.proc.returncode)
            self.release(r)
            self.result[r.cell.name] = status
        self.log(f"interrupted: stopped {len(self.running)} running cell(s); they will run again on the next "
                 "invocation")


def _stop(running: list[_Running], grace_s: float) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to each child's process group, waiting in between."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        alive = [r for r in running if r.proc.poll() is None]
        if not alive:
            return
        for r in alive:
            try:
                os.killpg(r.proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(r.proc.poll() is None for r in alive):
            time.sleep(0.05)
    for r in running:
        r.proc.wait()


# ----------------------------------------------------------------------------------- reports

def collect_rows(spec: GridSpec, cells: list[Cell], out_dir: Path) -> list[dict]:
    """results.csv rows for every cell of the grid (unfinished cells carry their status only)."""
    rows = []
    for c in cells:
        summary = report.load_summary(Path(out_dir) / c.name)
        rows.append(report.result_row(c.as_dict(), summary, "done" if summary else cell_status(out_dir, c)))
    return rows


def write_reports(spec: GridSpec, cells: list[Cell], out_dir: Path, report_dir: Path | None = None, *,
                  metric: str = "final_map", log=print) -> dict[str, list[Path]]:
    """results.csv, tables.md and plots/*.png under `report_dir` (default: out_dir).

    Curves, traces and per-class plots use each method's lowest finished seed (curves of
    different seeds need not share epochs); tables and mAP-vs-kept plots use all seeds."""
    out_dir = Path(out_dir)
    report_dir = Path(report_dir or out_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = collect_rows(spec, cells, out_dir)
    atomic_write_text(report_dir / "results.csv", report.results_csv(rows))
    agg = report.aggregate(rows, metric)
    mlab = {m: e.label for m, e in spec.methods.items()}
    dlab = {d: e.label for d, e in spec.datasets.items()}
    tables = spec.tables or [{"title": spec.name}]
    md = [f"# {spec.name}: mAP ({metric})", ""]
    for t in tables:
        md.append(report.format_table(
            agg, datasets=t.get("datasets") or list(spec.datasets), settings=t.get("settings") or spec.settings,
            methods=t.get("methods") or list(spec.methods), reference=t.get("reference") or (),
            method_labels=mlab, dataset_labels=dlab, title=t.get("title")))
    atomic_write_text(report_dir / "tables.md", "\n".join(md))

    plots: list[Path] = []
    pdir = report_dir / "plots"
    for d in spec.datasets:
        p = report.plot_map_vs_kept(agg, dataset=d, methods=list(spec.methods), path=pdir / f"map_vs_kept_{d}.png",
                                    method_labels=mlab, dataset_label=dlab[d])
        plots += [p] if p else []
    first: dict[tuple[str, str], dict[str, Cell]] = {}
    for r, c in zip(rows, cells):
        if r["status"] == "done":
            per = first.setdefault((c.dataset, c.setting), {})
            if c.method not in per or c.seed < per[c.method].seed:
                per[c.method] = c
    for (d, s), per in first.items():
        title = f"{dlab[d]} {s}"
        curves = {m: report.load_metrics(out_dir / c.name) for m, c in per.items()}
        pcs = {m: pc for m, c in per.items() if (pc := report.load_per_class(out_dir / c.name)) is not None}
        for p in (report.plot_training_curves(curves, path=pdir / f"curves_{d}_{s}.png", title=title, method_labels=mlab),
                  report.plot_loss_traces(curves, path=pdir / f"traces_{d}_{s}.png", title=title, method_labels=mlab),
                  report.plot_class_ap(pcs, path=pdir / f"class_ap_{d}_{s}.png", title=title, method_labels=mlab)
                  if pcs else None):
            plots += [p] if p else []
    done = sum(r["status"] == "done" for r in rows)
    log(f"report: {done}/{len(rows)} cells finished -> {report_dir / 'results.csv'}, {report_dir / 'tables.md'}, "
        f"{len(plots)} plots in {pdir}")
    return {"results": [report_dir / "results.csv"], "tables": [report_dir / "tables.md"], "plots": plots}


# --------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="launch/grid.py", description=(
        "Run an experiment grid (configs/grids/*.yaml): one trainer subprocess per cell "
        "dataset-setting-method-sSEED, resumable, then results.csv, tables.md and plots."))
    ap.add_argument("spec", help="grid spec YAML, e.g. configs/grids/demo.yaml")
    ap.add_argument("--out", help="run folder of the cells (default: runs/<grid name>)")
    ap.add_argument("--report-dir", help="where results.csv, tables.md, plots/ go (default: --out)")
    ap.add_argument("--parallel", type=int, default=1, metavar="K", help="cells run at once (default 1)")
    ap.add_argument("--devices", nargs="+", metavar="IDS",
                    help="CUDA_VISIBLE_DEVICES value per parallel slot, e.g. --devices 0 1 2 3 or 0,1 2,3")
    ap.add_argument("--dry-run", action="store_true", help="list the cells, their state and commands; run nothing")
    ap.add_argument("--only", metavar="PATTERN", help="run only cells whose name matches a glob (comma-separated)")
    ap.add_argument("--report-only", action="store_true", help="run nothing; rebuild the reports from finished cells")
    ap.add_argument("--train-cmd", help="trainer command (default: this python + launch/train.py), "
                                        "e.g. 'deepspeed --num_gpus 8 launch/train.py'")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every cell (repeatable); cell names do not change, so finished "
                         "cells are not rerun")
    ap.add_argument("--no-stagger", action="store_true",
                    help="start cells of a dataset/setting together even before the first one has prepared its "
                         "data (safe when the dataset and observed-label files exist already)")
    ap.add_argument("--metric", choices=("final_map", "best_map", "test_map"), default="final_map",
                    help="mAP in the tables: final_map/best_map on the run's evaluation split (validation when "
                         "data.val_fraction > 0), test_map on the test split (scored once per run)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = load_spec(args.spec)
        extra = _overrides(args.set, "--set")
        if args.parallel < 1:
            raise SpecError(f"--parallel must be >= 1, got {args.parallel}")
        if args.devices and len(args.devices) < args.parallel:
            raise SpecError(f"--devices lists {len(args.devices)} groups, fewer than --parallel {args.parallel}")
        cells = expand(spec)
        selected = filter_cells(cells, args.only)
        if not selected:
            raise SpecError(f"--only {args.only!r} matches none of the {len(cells)} cells "
                            f"(e.g. {', '.join(c.name for c in cells[:3])})")
        out = Path(args.out or Path("runs") / spec.name)
        if args.report_only:
            write_reports(spec, cells, out, args.report_dir, metric=args.metric)
            return 0
        train_cmd = shlex.split(args.train_cmd) if args.train_cmd else default_train_cmd()
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    jobs = [(c, cell_command(spec, c, out, train_cmd, extra)) for c in selected]
    states = {c.name: cell_status(out, c) for c in selected}
    if args.dry_run:
        for c, cmd in jobs:
            print(f"{'skip (done)' if states[c.name] == 'done' else states[c.name]:<12} {c.name}\n    {shlex.join(cmd)}")
        todo = sum(s != "done" for s in states.values())
        print(f"{len(selected)} cells selected of {len(cells)}; {todo} to run")
        return 0
    todo = [(c, cmd) for c, cmd in jobs if states[c.name] != "done"]
    retry = sum(states[c.name] in ("failed", "interrupted", "running") for c, _ in todo)
    print(f"grid {spec.name}: {len(cells)} cells, {len(selected)} selected, {len(selected) - len(todo)} already done, "
          f"{len(todo)} to run" + (f" ({retry} again after a failure or interruption)" if retry else "")
          + f"; out {out}")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    # SIGINT too: a runner started in the background by a script inherits SIGINT ignored, and
    # `kill -INT` must still stop it cleanly.
    old = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.signal(signal.SIGINT, on_term)
    try:
        primed = {k for c in cells if report.load_summary(out / c.name) is not None
                  for k in (c.dataset, (c.dataset, c.setting))}
        result = run_cells(todo, out, parallel=args.parallel, devices=args.devices, stagger=not args.no_stagger,
                           primed=primed)
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)
    write_reports(spec, cells, out, args.report_dir, metric=args.metric)
    failed = sorted(n for n, s in result.items() if s == "failed")
    if failed:
        print(f"{len(failed)} cell(s) failed (rerun the same command to retry them): {', '.join(failed)}")
    return 1 if failed else 0
