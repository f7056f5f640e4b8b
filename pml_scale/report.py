"""Reports over finished grid cells: results rows, paper-layout Markdown tables, PNG plots.

A leaf module (numpy, matplotlib, stdlib only) so every function can be unit-tested on
hand-made inputs. Loading is separate from formatting/plotting: `load_*` read one run folder,
everything else is a pure function of plain dicts and lists.

Units: run files hold mAP/AP in [0, 1]; tables and plots show them x100 with one decimal, as
the paper does. Memory: a run's metrics.jsonl is read line by line into compact arrays
(O(logged train lines), a few floats each); per_class_ap.json is O(L). Plots draw one figure
at a time through the Agg canvas (no pyplot global state), so a report over thousands of cells
stays bounded.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from array import array
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .atomic import atomic_path

RESULT_COLUMNS = ("dataset", "setting", "method", "seed", "final_map", "best_map", "test_map", "eval_split",
                  "epochs", "wall_s", "status", "name")
TRACE_KEYS = ("alpha", "beta", "d", "p2_share")
_SETTING_RE = re.compile(r"^(PAL|PPL)_(\d*\.?\d+)$")


# ----------------------------------------------------------------------------------- loading

def load_summary(run_dir: str | Path) -> dict | None:
    """summary.json of a run, or None when the run has not finished (the trainer writes it last).

    A file that does not parse or lacks final_map counts as unfinished: nothing half-written
    may look finished."""
    path = Path(run_dir) / "summary.json"
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("final_map"), (int, float)):
        return None
    return obj


def load_per_class(run_dir: str | Path) -> dict | None:
    """per_class_ap.json as {"ap": float array (nan = skipped), "class_freq": int array, "classes"}."""
    path = Path(run_dir) / "per_class_ap.json"
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ap = np.array([np.nan if v is None else float(v) for v in obj.get("ap", [])], dtype=np.float64)
    freq = np.asarray(obj.get("class_freq", []), dtype=np.float64)
    if ap.shape != freq.shape:
        raise ValueError(f"{path}: 'ap' has {ap.size} entries but 'class_freq' has {freq.size}")
    return {"ap": ap, "class_freq": freq, "classes": obj.get("classes")}


def load_metrics(run_dir: str | Path) -> dict:
    """Read metrics.jsonl into per-epoch curves and per-step traces.

    The trainer appends to the file, so a resumed run repeats some (epoch, step) keys: the last
    line for a key wins. Bad lines raise with the file and line number.

    Returns {"epoch": e (per train epoch), "loss": mean train loss per epoch,
             "eval_epoch", "eval_map", "trace_x": epoch + fraction of the epoch, and one array per
             present key of TRACE_KEYS}."""
    path = Path(run_dir) / "metrics.jsonl"
    ep, st = array("d"), array("d")
    vals = {k: array("d") for k in ("loss", *TRACE_KEYS)}
    evals: dict[float, float] = {}
    if path.exists():
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
                kind = rec.get("kind")
                if kind == "eval" and "map" in rec:
                    evals[float(rec.get("epoch", len(evals)))] = float(rec["map"])
                elif kind == "train":
                    ep.append(float(rec.get("epoch", 0)))
                    st.append(float(rec.get("step", len(st))))
                    for k, a in vals.items():
                        v = rec.get(k)
                        a.append(float(v) if isinstance(v, (int, float)) else math.nan)
    e = np.frombuffer(ep, dtype=np.float64) if len(ep) else np.zeros(0)
    s = np.frombuffer(st, dtype=np.float64) if len(st) else np.zeros(0)
    # Last occurrence of each (epoch, step) wins: unique over the reversed arrays.
    keys = np.stack([e, s], axis=1)[::-1]
    _, first_rev = np.unique(keys, axis=0, return_index=True) if len(e) else (None, np.zeros(0, int))
    keep = np.sort(len(e) - 1 - first_rev)
    order = keep[np.lexsort((s[keep], e[keep]))] if len(keep) else keep
    e, s = e[order], s[order]
    out: dict = {}
    cols = {k: (np.frombuffer(a, dtype=np.float64)[order] if len(a) else np.zeros(0)) for k, a in vals.items()}
    uniq_e = np.unique(e)
    out["epoch"] = uniq_e
    out["loss"] = np.array([np.nanmean(cols["loss"][e == u]) if np.isfinite(cols["loss"][e == u]).any()
                            else np.nan for u in uniq_e])
    x = np.empty_like(e)
    for u in uniq_e:
        m = e == u
        lo, hi = s[m].min(), s[m].max()
        x[m] = u + (s[m] - lo) / (hi - lo + 1)
    out["trace_x"] = x
    for k in TRACE_KEYS:
        if np.isfinite(cols[k]).any():
            out[k] = cols[k]
    ev = sorted(evals.items())
    out["eval_epoch"] = np.array([a for a, _ in ev])
    out["eval_map"] = np.array([b for _, b in ev])
    return out


# ------------------------------------------------------------------------------ results rows

def result_row(cell: dict, summary: dict | None, status: str) -> dict:
    """One results.csv row from a cell (dataset, setting, method, seed, name) and its summary."""
    row = {k: cell[k] for k in ("dataset", "setting", "method", "seed", "name")}
    for k in ("final_map", "best_map", "test_map", "eval_split", "epochs", "wall_s"):
        row[k] = summary.get(k) if summary else None
    row["status"] = status
    return row


def results_csv(rows: list[dict]) -> str:
    """CSV text, one row per cell, columns RESULT_COLUMNS; unfinished cells have empty metrics."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in RESULT_COLUMNS})
    return buf.getvalue()


def aggregate(rows: list[dict], metric: str = "final_map") -> dict[tuple[str, str, str], tuple[float, float, int]]:
    """(dataset, setting, method) -> (mean, std, n) of `metric` x100 over seeds.

    std is the sample standard deviation (ddof=1), 0.0 for a single seed. Rows without a value
    (unfinished cells) are left out."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        v = r.get(metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            groups[(r["dataset"], r["setting"], r["method"])].append(100.0 * float(v))
    out = {}
    for k, v in groups.items():
        a = np.asarray(v)
        out[k] = (float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size))
    return out


# ------------------------------------------------------------------------------------ tables

def _fmt(mean: float, std: float, n: int, n_max: int) -> str:
    s = f"{round(mean, 1):.1f}"
    if n_max > 1:
        s += f" ± {round(std, 1):.1f}"
        if n < n_max:
            s += f" (n={n})"
    return s


def format_table(agg: dict, *, datasets: list[str], settings: list[str], methods: list[str],
                 reference: tuple[str, ...] | list[str] = (), reference_setting: str = "FAL",
                 method_labels: dict | None = None, dataset_labels: dict | None = None,
                 title: str | None = None) -> str:
    """A Markdown table in the paper's layout: rows = methods, columns = datasets x settings.

    Cells show mean ± std over seeds (x100, one decimal; just the mean with one seed). Per column
    the best displayed mean is **bold** and the second best <u>underlined</u> (ties share the
    mark), ranked on the rounded value a reader sees. `reference` methods (the paper's BCE and
    BCE-LS in Tables IV-VI) show their `reference_setting` result in every column of a dataset
    and take no part in the ranking. Missing cells show "–"."""
    method_labels = method_labels or {}
    dataset_labels = dataset_labels or {}
    columns = [(d, s) for d in datasets for s in settings]
    ref = [m for m in methods if m in reference] + [m for m in reference if m not in methods]
    used = [(d, s, m) for d, s in columns for m in methods if m not in reference]
    used += [(d, reference_setting, m) for d in datasets for m in ref]
    n_max = max([agg[k][2] for k in used if k in agg] or [1])
    ranked = [m for m in methods if m not in reference]

    marks: dict[tuple, str] = {}
    for d, s in columns:
        vals = {m: round(agg[(d, s, m)][0], 1) for m in ranked if (d, s, m) in agg}
        distinct = sorted(set(vals.values()), reverse=True)
        for m, v in vals.items():
            if v == distinct[0]:
                marks[(d, s, m)] = "best"
            elif len(distinct) > 1 and v == distinct[1]:
                marks[(d, s, m)] = "second"

    def cell(d, s, m):
        key = (d, reference_setting, m) if m in reference else (d, s, m)
        if key not in agg:
            return "–"
        text = _fmt(*agg[key], n_max)
        mark = marks.get((d, s, m))
        return f"**{text}**" if mark == "best" else f"<u>{text}</u>" if mark == "second" else text

    head = ["Method"] + [f"{dataset_labels.get(d, d)} {s}" if len(settings) > 1 or s != reference_setting
                         else f"{dataset_labels.get(d, d)}" for d, s in columns]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" + "---:|" * len(columns))
    for m in ref + ranked:
        lines.append("| " + " | ".join([method_labels.get(m, m)] + [cell(d, s, m) for d, s in columns]) + " |")
    notes = []
    if ref:
        names = ", ".join(method_labels.get(m, m) for m in ref)
        notes.append(f"{names}: trained with {reference_setting} labels, shown for reference and not ranked.")
    notes.append("mAP x100; best in bold, second underlined" + (f"; mean ± std over up to {n_max} seeds"
                                                                  if n_max > 1 else "") + ".")
    lines += ["", *notes, ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- plots

def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def setting_share(setting: str) -> tuple[str, float] | None:
    """("PAL", 0.3) for PAL_0.3; ("FAL", 1.0) for FAL; None for SPL/NATIVE/others."""
    if setting == "FAL":
        return ("FAL", 1.0)
    m = _SETTING_RE.match(setting)
    return (m.group(1), float(m.group(2))) if m else None


def plot_map_vs_kept(agg: dict, *, dataset: str, methods: list[str], path: str | Path,
                     method_labels: dict | None = None, dataset_label: str | None = None) -> Path | None:
    """mAP vs share of labels kept, one panel per family (PAL, PPL), a line per method with
    error bars over seeds; a method's FAL result is the share-1.0 point. None when the dataset
    has no PAL/PPL results."""
    method_labels = method_labels or {}
    fams = sorted({setting_share(s)[0] for (d, s, _m) in agg if d == dataset and setting_share(s)} - {"FAL"})
    if not fams:
        return None
    fig = Figure(figsize=(5.2 * len(fams), 4.0))
    for i, fam in enumerate(fams):
        ax = fig.add_subplot(1, len(fams), i + 1)
        for m in methods:
            pts = []
            for (d, s, mm), (mean, std, _n) in agg.items():
                sh = setting_share(s)
                if d == dataset and mm == m and sh and sh[0] == fam:
                    pts.append((sh[1], mean, std))
            if not pts:
                continue
            fal = agg.get((dataset, "FAL", m))
            if fal:
                pts.append((1.0, fal[0], fal[1]))
            pts.sort()
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method_labels.get(m, m))
        ax.set_xlabel(f"share of labels kept ({fam}; 1.0 = FAL)")
        ax.set_ylabel("mAP (x100)")
        ax.set_title(f"{dataset_label or dataset}: {fam}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_class_ap(per_class: dict[str, dict], *, path: str | Path, title: str = "",
                  method_labels: dict | None = None, bins: int = 12) -> Path | None:
    """Per-class AP (x100) vs training positives per class (log x), one colour per method:
    a faint scatter of every class plus the median AP per log-spaced frequency bin, so the
    trend stays readable at 10k classes. Classes with no AP or no training positive are left
    out (counted in the title). None when nothing is plottable."""
    method_labels = method_labels or {}
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    dropped, drawn = 0, False
    for m, pc in per_class.items():
        ap, freq = pc["ap"], pc["class_freq"]
        ok = np.isfinite(ap) & (freq > 0)
        dropped = max(dropped, int((~ok).sum()))
        if not ok.any():
            continue
        x, y = freq[ok], 100.0 * ap[ok]
        sc = ax.scatter(x, y, s=6, alpha=0.25)
        edges = np.geomspace(x.min(), x.max() * 1.0001, bins + 1) if x.max() > x.min() else np.array([x.min(), x.min() * 1.0001 + 1])
        idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
        cx = [np.sqrt(edges[b] * edges[b + 1]) for b in range(len(edges) - 1) if (idx == b).any()]
        cy = [np.median(y[idx == b]) for b in range(len(edges) - 1) if (idx == b).any()]
        ax.plot(cx, cy, "-o", ms=3, color=sc.get_facecolor()[0][:3], label=method_labels.get(m, m))
        drawn = True
    if not drawn:
        return None
    ax.set_xscale("log")
    ax.set_xlabel("training positives per class")
    ax.set_ylabel("AP (x100)")
    ax.set_title(title + (f" (left out: {dropped} classes without AP or training positives)" if dropped else ""),
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(curves: dict[str, dict], *, path: str | Path, title: str = "",
                         method_labels: dict | None = None) -> Path | None:
    """Train loss (per-epoch mean) and evaluation mAP (x100: validation when the run holds one out, else test) vs epoch, a line per method.
    `curves` maps method -> load_metrics() output. None when no run logged anything."""
    method_labels = method_labels or {}
    fig = Figure(figsize=(10.0, 4.0))
    ax_l, ax_m = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    drawn = False
    for m, c in curves.items():
        lab = method_labels.get(m, m)
        if len(c["epoch"]) and np.isfinite(c["loss"]).any():
            ax_l.plot(c["epoch"], c["loss"], "-o", ms=3, label=lab)
            drawn = True
        if len(c["eval_epoch"]):
            ax_m.plot(c["eval_epoch"], 100.0 * c["eval_map"], "-o", ms=3, label=lab)
            drawn = True
    if not drawn:
        return None
    for ax, yl in ((ax_l, "train loss (epoch mean)"), (ax_m, "eval mAP (x100; validation if held out)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_loss_traces(curves: dict[str, dict], *, path: str | Path, title: str = "",
                     method_labels: dict | None = None, max_points: int = 2000) -> Path | None:
    """α, β, d and the share of images with p = 2 over training (x = epoch + fraction), one
    panel per quantity, a line per method that logs it (the paper loss and its ablations).
    Each line is thinned to at most `max_points` points. None when no run logs any of them."""
    method_labels = method_labels or {}
    present = [k for k in TRACE_KEYS if any(k in c for c in curves.values())]
    if not present:
        return None
    fig = Figure(figsize=(4.2 * len(present), 3.6))
    for i, k in enumerate(present):
        ax = fig.add_subplot(1, len(present), i + 1)
        for m, c in curves.items():
            if k not in c:
                continue
            stride = max(1, math.ceil(len(c[k]) / max_points))
            ax.plot(c["trace_x"][::stride], c[k][::stride], lw=1, label=method_labels.get(m, m))
        ax.set_xlabel("epoch")
        ax.set_title({"alpha": "α", "beta": "β", "d": "d", "p2_share": "share of images with p = 2"}[k])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
