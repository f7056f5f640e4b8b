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
import json
import os
import sys
from pathlib import Path

from .convert import ConvertError, convert
from .masks import make_mask
from .sources import InputError, parse_coco, parse_cub, parse_list, parse_nuswide, parse_openimages
from .verify import verify

MAX_PROBLEMS_SHOWN = 50
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


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
    _add_source_parsers(fmts)
    _add_mask_parser(sub)
    _add_verify_parser(sub)
    _add_demo_parser(sub)
    return ap


def _add_source_parsers(fmts) -> None:
    """``convert FORMAT``: one subcommand per dataset parser, each with its inputs and the common options."""
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


def _add_mask_parser(sub) -> None:
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


def _add_verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="re-read and check everything in a shard folder")
    p.add_argument("out", metavar="OUT")
    p.add_argument("-j", "--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    p.add_argument("-q", "--quiet", action="store_true")


def _add_demo_parser(sub) -> None:
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
