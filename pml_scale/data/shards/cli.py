"""``pml-shard``: convert datasets to shards, draw missing-label settings, verify, build the demo.

    pml-shard convert coco --train-json J --train-images D [--test-json J --test-images D] OUT
    pml-shard convert openimages --train-labels CSV --train-images D --class-descriptions CSV
                                 [--trainable TXT] [--test-labels CSV --test-images D] OUT
    pml-shard convert nuswide --image-list F --labels-dir D --train-list F --test-list F --images D OUT
    pml-shard convert cub --root CUB_200_2011 OUT
    pml-shard convert csv|jsonl --train F [--test F] [--classes F] [--images D] OUT
    pml-shard mask OUT --setting PAL --ratio 0.3 --seed 0 [--csr]
    pml-shard verify OUT [-j N]
    pml-shard demo OUT [--dataset digits|longtail|photos|openimages-like [--classes 9605]]

Exit codes: 0 success, 1 ``verify`` found a mismatch, 2 bad input or arguments (``--strict``
stops at the first bad input with exit code 2), 130 interrupted (Ctrl-C; rerun to resume).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np

from ...atomic import atomic_path, atomic_write_json
from . import images
from .convert import ConvertError, pool_worker_init, convert
from ...labels import ObservedLabels
from .format import DALI_INDEX_VERSION, index_name_for, labels_path, open_labels, read_manifest, sample_key, \
    decode_id, file_sha256
from .sources import InputError, parse_coco, parse_cub, parse_list, parse_nuswide, parse_openimages

MAX_PROBLEMS_SHOWN = 50
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


# ----------------------------------------------------------------------------------------------
# verify


def _verify_shard(folder: str, split: str, info: dict, labels_path: str, num_classes: int,
                  decode: bool) -> tuple[list[str], list[int]]:
    """Re-read one shard: sha256/size, DALI index vs tar headers, every sample through the
    ``webdataset`` library (key, id, json labels vs the label store, image decode).
    Returns (problems, ids in file order)."""
    import webdataset as wds

    path = Path(folder) / info["name"]
    problems: list[str] = []
    if not path.is_file():
        return [f"{path.name}: missing"], []
    digest, size = file_sha256(path)
    if size != info["bytes"] or digest != info["sha256"]:
        problems.append(f"{path.name}: sha256/size differ from the manifest ({size} bytes, expected {info['bytes']})")
    # DALI index: one line per sample, member offsets = tar data offsets
    idx = index_name_for(path)
    try:
        with tarfile.open(path) as t:
            members = [(m.name, m.offset_data, m.size) for m in t.getmembers()]
    except (tarfile.TarError, OSError, EOFError) as e:
        return problems + [f"{path.name}: not a readable tar ({e})"], []
    if not idx.is_file():
        problems.append(f"{idx.name}: missing")
    else:
        lines = idx.read_text().splitlines()
        head = lines[0].split() if lines else []
        if head != [DALI_INDEX_VERSION, str(info["count"])]:
            problems.append(f"{idx.name}:1: header {lines[:1]} should be '{DALI_INDEX_VERSION} {info['count']}'")
        listed = []
        for n, line in enumerate(lines[1:], 2):
            f = line.split()
            if len(f) % 4:
                problems.append(f"{idx.name}:{n}: malformed line")
                continue
            listed += [(f[k + 3], int(f[k + 1]), int(f[k + 2])) for k in range(0, len(f), 4)]
        if listed != members:
            problems.append(f"{idx.name}: offsets/sizes/names do not match the tar members of {path.name}")
    labels = _open_labels_cached(labels_path)
    ids: list[int] = []
    try:
        ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
        for sample in ds:
            key = sample.get("__key__")
            if set(sample) - {"__key__", "__url__", "__local_path__"} != {"jpg", "id", "json"}:
                problems.append(f"{path.name} [{key}]: members {sorted(sample)} should be jpg, id, json")
                continue
            sid = decode_id(sample["id"])
            ids.append(sid)
            if key != sample_key(sid):
                problems.append(f"{path.name} [{key}]: key does not match the stored id {sid}")
            meta = json.loads(sample["json"])
            if labels is not None and 0 <= sid < labels.shape[0]:
                row = labels.gather(np.array([sid]))[0]
                if meta.get("pos") != np.flatnonzero(row == 1).tolist() or \
                        meta.get("neg") != np.flatnonzero(row == 0).tolist():
                    problems.append(f"{path.name} [{key}]: json labels differ from {Path(labels_path).name} row {sid}")
            if decode:
                why = images.decode_check(sample["jpg"])
                if why:
                    problems.append(f"{path.name} [{key}]: {why}")
    except Exception as e:  # noqa: BLE001 - any reader failure is a finding about this shard
        problems.append(f"{path.name}: webdataset cannot read it ({type(e).__name__}: {e})")
    if ids and (ids[0] != info["first_id"] or ids[-1] != info["last_id"] or len(ids) != info["count"]):
        problems.append(f"{path.name}: holds ids {ids[0]}..{ids[-1]} ({len(ids)}), manifest says "
                        f"{info['first_id']}..{info['last_id']} ({info['count']})")
    return problems, ids


_LABELS_CACHE: dict = {}


def _open_labels_cached(path: str):
    """The split's labels (dense memmap or CSR), opened once per process: a CSR file is loaded
    whole, so each verify worker loads it once, not once per shard. None if absent or invalid
    (``verify`` reports that itself)."""
    if path not in _LABELS_CACHE:
        try:
            _LABELS_CACHE.clear()
            _LABELS_CACHE[path] = ObservedLabels.load(path, validate=False) if Path(path).is_file() else None
        except ValueError:
            _LABELS_CACHE[path] = None
    return _LABELS_CACHE[path]


def _verify_labels(lpath: Path, n: int, L: int, stats: dict) -> list[str]:
    """Problems of a split's label file: dtype/shape and values (dense, block by block), or CSR
    consistency (indptr monotone from 0 to len(indices), indices in [0, L) and strictly increasing
    per row, values in {-1, 0, 1} other than the fill); per-class positives vs the manifest."""
    try:
        labels = ObservedLabels.load(lpath, validate=False)
    except ValueError as e:
        return [str(e)]
    if labels.shape != (n, L):
        return [f"{lpath.name}: shape {labels.shape}, expected ({n}, {L})"]
    try:
        labels.validate()
    except ValueError as e:
        return [str(e).replace(str(lpath), lpath.name)]
    if "class_positives" in stats and stats["class_positives"] != labels.positives_per_class().tolist():
        return [f"{lpath.name}: per-class positive counts differ from the manifest"]
    return []


def verify(folder, *, workers: int = 1, decode: bool = True, progress: bool = False) -> list[str]:
    """Every problem found in a shard folder (empty list: all consistent). Reads every byte."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    problems: list[str] = []
    L = manifest["num_classes"]
    if len(manifest["classes"]) != L:
        problems.append(f"manifest.json: {len(manifest['classes'])} class names for num_classes {L}")
    jobs = []
    for split, entry in manifest["splits"].items():
        lpath = labels_path(folder, split, manifest)
        n = entry["num_samples"]
        if not lpath.is_file():
            problems.append(f"{lpath.name}: missing")
        else:
            problems += _verify_labels(lpath, n, L, entry.get("label_stats", {}))
        expect = 0
        for info in entry["shards"]:
            if info["first_id"] != expect:
                problems.append(f"manifest.json: split {split}: shard {info['name']} starts at id {info['first_id']}, "
                                f"expected {expect} (ids must be dense)")
            expect = info["last_id"] + 1
            jobs.append((split, info, str(lpath)))
        if expect != n:
            problems.append(f"manifest.json: split {split}: shards hold ids 0..{expect - 1}, num_samples is {n}")
    from tqdm import tqdm

    bar = tqdm(total=sum(j[1]["count"] for j in jobs), unit="img", desc="verify", disable=not progress)
    seen: dict[str, list] = {}

    def collect(job, result):
        found, ids = result
        problems.extend(found)
        seen.setdefault(job[0], []).extend(ids)
        bar.update(job[1]["count"])

    if workers > 1:
        with cf.ProcessPoolExecutor(workers, initializer=pool_worker_init, initargs=(os.getpid(),)) as pool:
            futs = {pool.submit(_verify_shard, str(folder), s, info, lp, L, decode): (s, info, lp)
                    for s, info, lp in jobs}
            for fut in cf.as_completed(futs):
                collect(futs[fut], fut.result())
    else:
        for job in jobs:
            collect(job, _verify_shard(str(folder), job[0], job[1], job[2], L, decode))
    bar.close()
    for split, ids in seen.items():
        ids = np.sort(np.asarray(ids, np.int64))
        n = manifest["splits"][split]["num_samples"]
        if len(ids) != n or (n and not np.array_equal(ids, np.arange(n))):
            dup = int((np.diff(ids) == 0).sum()) if len(ids) > 1 else 0
            problems.append(f"split {split}: sample ids are not exactly 0..{n - 1} ({len(ids)} read, {dup} duplicates)")
    return problems


# ----------------------------------------------------------------------------------------------
# mask


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


# ----------------------------------------------------------------------------------------------
# CLI


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("-j", "--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="worker processes (default: CPUs - 1)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-side", type=int, default=None,
                   help="resize so the longer side is at most this many pixels, and re-encode")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input (exit code 2)")
    p.add_argument("--no-convert", action="store_true",
                   help="reject non-RGB-JPEG images (PNG, CMYK, grayscale, palette) instead of converting them")
    p.add_argument("--restart", action="store_true", help="discard a partial or finished conversion in OUT")
    p.add_argument("--labels-form", choices=("auto", "dense", "csr"), default="auto",
                   help="label file: dense .npy or CSR .npz (default auto: CSR where smaller, dense under 16 MiB)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parts = __doc__.split("\n\n")
    ap = argparse.ArgumentParser(prog="pml-shard", description=parts[0].replace("``", ""),
                                 epilog="examples:\n" + parts[1] + "\n\n" + parts[2].replace("``", ""),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a dataset to shards")
    fmts = conv.add_subparsers(dest="format", required=True, metavar="FORMAT")

    p = fmts.add_parser("coco", help="COCO instances JSON + image folder (2014/2017)")
    for s in ("train", "test"):
        p.add_argument(f"--{s}-json", help=f"{s} instances JSON")
        p.add_argument(f"--{s}-images", help=f"{s} image folder")
    p.add_argument("--keep-empty", action="store_true", help="keep images without any annotation (all negative)")
    _common(p)

    p = fmts.add_parser("openimages", help="Open Images image-level labels (native partial labels)")
    for s in ("train", "test"):
        p.add_argument(f"--{s}-labels", help=f"{s} image-level labels CSV (ImageID,Source,LabelName,Confidence)")
        p.add_argument(f"--{s}-images", help=f"{s} image folder ({{ImageID}}.jpg)")
    p.add_argument("--class-descriptions", required=True, help="class descriptions CSV (LabelName,DisplayName)")
    p.add_argument("--trainable", help="class list (one MID per line, or a CSV): the classes and their order")
    _common(p)

    p = fmts.add_parser("nuswide", help="NUS-WIDE 81 concepts")
    p.add_argument("--image-list", required=True, help="ImageList/Imagelist.txt")
    p.add_argument("--labels-dir", required=True, help="folder of Labels_<concept>.txt (Groundtruth/AllLabels)")
    p.add_argument("--train-list", help="ImageList/TrainImagelist.txt")
    p.add_argument("--test-list", help="ImageList/TestImagelist.txt")
    p.add_argument("--images", required=True, help="image root (holds <concept>/<file>.jpg)")
    p.add_argument("--concepts", help="Concepts81.txt (class order; default: sorted label file names)")
    p.add_argument("--keep-empty", action="store_true", help="keep images without any positive concept")
    _common(p)

    p = fmts.add_parser("cub", help="CUB-200-2011, 312 binary attributes")
    p.add_argument("--root", required=True, help="the CUB_200_2011 folder")
    p.add_argument("--attributes", help="attributes.txt (default: searched near --root)")
    _common(p)

    for fmt in ("csv", "jsonl"):
        p = fmts.add_parser(fmt, help=f"generic {fmt} list: path, positives, optional negatives")
        p.add_argument("--train", help=f"train {fmt} file")
        p.add_argument("--test", help=f"test {fmt} file")
        p.add_argument("--classes", help="class list, one name per line (default: every name seen, sorted)")
        p.add_argument("--images", help="image root for relative paths (default: the list's folder)")
        p.add_argument("--unlisted", choices=("negative", "missing"),
                       help="state of classes a row does not list (default: missing if the list has negatives)")
        if fmt == "csv":
            p.add_argument("--sep", default=";", help="separator of class names inside a cell (default ';')")
        _common(p)

    p = sub.add_parser("mask", help="draw a missing-label setting into OUT/observed/")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--setting", required=True, help="FAL, PAL, PPL, SPL, NATIVE, or with ratio: PAL_0.3")
    p.add_argument("--ratio", type=float, help="kept ratio for PAL/PPL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--csr", action="store_true", default=None,
                      help="write CSR .npz (default: when the labels are CSR and the setting is not PAL)")
    form.add_argument("--dense", dest="csr", action="store_false", help="write dense .npy")
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("verify", help="re-read and check everything in a shard folder")
    p.add_argument("out", metavar="OUT")
    p.add_argument("-j", "--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("demo", help="build an embedded demo dataset (digits: 80 classes; longtail: 240; photos: "
                                    "14 classes of real photographs, needs Debian's tuxpaint-stamps-default) and "
                                    "pretrain its backbone (digits, longtail); or an Open Images-like one "
                                    "(openimages-like: raw Open Images CSVs + JPEGs, converted by `convert openimages`)")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--dataset", default="digits", choices=["digits", "longtail", "photos", "openimages-like"])
    p.add_argument("--stamps", default=None, help="photos: the tuxpaint 'stamps' folder (default: "
                                                  "$PML_STAMPS_DIR or /usr/share/tuxpaint/stamps)")
    p.add_argument("--classes", type=int, default=9605, help="openimages-like: number of trainable classes")
    p.add_argument("--labels-form", choices=("auto", "dense", "csr"), default="auto",
                   help="openimages-like: label file form (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=None,
                   help="default: the dataset's (digits 4800, longtail 6000, photos 4000)")
    p.add_argument("--n-test", type=int, default=None, help="default: the dataset's (digits 1600, longtail 2000, "
                                                            "photos 1600)")
    p.add_argument("--size", type=int, default=None, help="image side (default 64; photos 224)")
    p.add_argument("--no-pretrain", action="store_true", help="skip pretraining the demo backbone")
    p.add_argument("--shard-size", type=int, default=400)
    p.add_argument("-j", "--workers", type=int, default=1)
    p.add_argument("-q", "--quiet", action="store_true")
    return ap


def _source(a):
    if a.format == "coco":
        return parse_coco(a.train_json, a.train_images, a.test_json, a.test_images, keep_empty=a.keep_empty)
    if a.format == "openimages":
        return parse_openimages(a.train_labels, a.train_images, a.test_labels, a.test_images,
                                class_descriptions=a.class_descriptions, trainable=a.trainable)
    if a.format == "nuswide":
        return parse_nuswide(a.image_list, a.labels_dir, a.train_list, a.test_list, a.images,
                             concepts=a.concepts, keep_empty=a.keep_empty)
    if a.format == "cub":
        return parse_cub(a.root, attributes=a.attributes)
    return parse_list(a.format, a.train, a.test, classes=a.classes, images=a.images, unlisted=a.unlisted,
                      sep=getattr(a, "sep", ";"))


def _report(manifest: dict, out) -> None:
    splits = ", ".join(f"{s} {v['num_samples']} samples / {len(v['shards'])} shards"
                       for s, v in manifest["splits"].items())
    print(f"{out}: {manifest['num_classes']} classes; {splits}")
    for what in ("rejected", "converted", "skipped"):
        block = manifest[what]
        if block["count"]:
            print(f"  {what}: {block['count']} {block['by_reason']}")
            for item in block["items"][:10]:
                where = f":{item['line']}" if "line" in item else (f" [{item['key']}]" if "key" in item else "")
                print(f"    {item['file']}{where}: {item['reason']}")
            if block["count"] > 10:
                print(f"    ... all listed in {Path(out) / 'manifest.json'}")


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.command == "convert":
            source = _source(a)
            manifest = convert(source, a.out, workers=a.workers, shard_size=a.shard_size, max_side=a.max_side,
                               quality=a.quality, strict=a.strict, allow_convert=not a.no_convert,
                               progress=not a.quiet, restart=a.restart, labels_form=a.labels_form)
            _report(manifest, a.out)
        elif a.command == "demo" and a.dataset == "openimages-like":
            from ...demo.openimages_like import build_openimages_like

            manifest = build_openimages_like(a.out, num_classes=a.classes, n_train=a.n_train or 20000,
                                             n_test=2000 if a.n_test is None else a.n_test, size=a.size or 48,
                                             seed=a.seed, shard_size=a.shard_size, workers=a.workers,
                                             labels_form=a.labels_form, progress=not a.quiet)
            _report(manifest, a.out)
        elif a.command == "demo" and a.dataset == "photos":
            from ...demo import photos as dp

            manifest = dp.build_photos(a.out, stamps=a.stamps, seed=a.seed, n_train=a.n_train or dp.N_TRAIN,
                                       n_test=a.n_test or dp.N_TEST, size=a.size or dp.SIZE,
                                       shard_size=a.shard_size, workers=a.workers, progress=not a.quiet)
            _report(manifest, a.out)
        elif a.command == "demo":
            from ...demo.digits import build_demo

            manifest = build_demo(a.out, dataset=a.dataset, seed=a.seed, n_train=a.n_train, n_test=a.n_test,
                                  size=a.size or 64, shard_size=a.shard_size, workers=a.workers,
                                  pretrain=not a.no_pretrain, progress=not a.quiet)
            _report(manifest, a.out)
        elif a.command == "mask":
            path = make_mask(a.out, a.setting, a.ratio, a.seed, csr=a.csr, split=a.split, progress=not a.quiet)
            side = json.loads(path.with_suffix(".json").read_text())
            print(f"{path}: {side['setting']} ratio={side['ratio']} seed={side['seed']}: "
                  f"{side['pos_per_image']:.3f} pos, {side['neg_per_image']:.3f} neg, "
                  f"{side['missing_per_image']:.3f} missing per image")
        elif a.command == "verify":
            problems = verify(a.out, workers=a.workers, decode=not a.no_decode, progress=not a.quiet)
            if problems:
                print(f"{a.out}: {len(problems)} problem(s):", file=sys.stderr)
                for p in problems[:MAX_PROBLEMS_SHOWN]:
                    print(f"  {p}", file=sys.stderr)
                if len(problems) > MAX_PROBLEMS_SHOWN:
                    print(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more", file=sys.stderr)
                return 1
            print(f"{a.out}: OK")
    except (InputError, ConvertError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"pml-shard: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "; rerun the same command to resume (finished shards are kept)" if a.command == "convert" else ""
        print(f"pml-shard: interrupted{again}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
