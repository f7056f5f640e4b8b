"""``pml-shard mask``: draw a label-missing setting from a split's full labels into ``observed/``.

The draw itself is ``labels.settings``; this module names the files, writes them atomically
without holding N x L, and records the setting's statistics beside them.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

from ...atomic import atomic_path, atomic_write_json
from ...labels import ObservedLabels
from .format import labels_path, open_labels, read_manifest
from .sources import InputError


def observed_name(setting: str, ratio: float | None, seed: int) -> str:
    """``PAL_0.3_s0`` / ``SPL_s0``: the file stem of an observed-label setting."""
    return f"{setting}_{ratio:g}_s{seed}" if ratio is not None else f"{setting}_s{seed}"


def make_mask(folder, setting: str, ratio: float | None = None, seed: int = 0, *, csr: bool | None = None,
              split: str = "train", progress: bool = False) -> Path:
    """Draw a missing-label setting from the split's full labels (dense or CSR) into ``observed/``
    (+ JSON sidecar with its statistics). Never N x L in memory: a dense result is written block
    by block through a memory-mapped temp file, a CSR result is drawn from the listed entries
    (PPL/SPL/NATIVE) or from 16 MiB dense blocks (PAL). ``csr=None``: CSR when the labels are
    CSR and the setting is not PAL (PAL keeps round(r L) entries per image: dense is smaller)."""
    from ...labels.settings import draw_block, observed_csr, parse_setting
    from ...labels.stats import label_stats

    folder = Path(folder)
    manifest = read_manifest(folder)
    if split not in manifest["splits"]:
        raise InputError(f"{folder / 'manifest.json'}: no split {split!r}; has {sorted(manifest['splits'])}")
    if ratio is not None and "_" not in str(setting):
        setting = f"{setting}_{ratio!r}"
    name, parsed = parse_setting(setting)
    if ratio is not None and parsed != float(ratio):
        raise ValueError(f"--ratio {ratio} contradicts --setting {setting}")
    ratio = parsed
    full = open_labels(folder, split, manifest)
    if csr is None:
        csr = full.form == "csr" and name != "PAL"
    obs_dir = folder / "observed"
    obs_dir.mkdir(exist_ok=True)
    stem = observed_name(name, ratio, seed)
    if split != "train":
        stem = f"{split}-{stem}"
    final = obs_dir / f"{stem}.{'npz' if csr else 'npy'}"
    if csr:
        observed = observed_csr(full, name, ratio, seed, progress=progress)
        observed.save_csr(final)
    else:
        with atomic_path(final) as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int8, shape=full.shape)
            for a, block in full.iter_rows():
                mm[a:a + block.shape[0]] = draw_block(block, a, name, ratio, int(seed))
            mm.flush()
            del mm
    for other in (final.with_suffix(".npy"), final.with_suffix(".npz")):  # one form per setting
        if other != final:
            other.unlink(missing_ok=True)
    stats = label_stats(ObservedLabels.load(final))
    split_stats = manifest["splits"][split].get("label_stats")
    if split_stats and "class_positives" in split_stats:
        full_pos = split_stats["class_positives"]
    else:  # a manifest written by other tools may carry no statistics: count them
        full_pos = full.positives_per_class().tolist()
    side = {"file": final.name, "setting": name, "ratio": ratio, "seed": seed, "split": split,
            "form": "csr" if csr else "dense", "source_labels": labels_path(folder, split, manifest).name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "kept_positive_fraction": float(np.sum(stats["pos_per_class"]) / max(1, sum(full_pos))),
            "classes_without_positive": int((np.asarray(stats["pos_per_class"]) == 0).sum()),
            **{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}}
    atomic_write_json(obs_dir / f"{stem}.json", side)
    return final
