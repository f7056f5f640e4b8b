#!/usr/bin/env python
"""The main job on a laptop: build the embedded demo dataset (and its pretrained backbone) if
absent, then train the paper's method, ours+ and the AN baseline in PAL_0.3 (configs/demo.yaml),
print the mAPs side by side and say which method won.

    python launch/demo.py [--methods ours,ours_plus,an] [--config FILE] [a.b=value ...]

Methods are files of configs/methods/ (their overrides, then yours, apply to each run). One
seed on one setting is a demonstration, not evidence: the README's 3-seed tables are that.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS_DIR = REPO / "configs" / "methods"
# the main job must finish in about 5 minutes on a slow 2-core laptop (build and pretraining
# included): 4 epochs here, the grids of configs/demo.yaml train 8; your overrides win
DEMO_OVERRIDES = ("run.epochs=4",)


def winner_line(results: dict, labels: dict) -> str:
    """One sentence naming the method with the highest final mAP and its margin over the next."""
    ranked = sorted(results, key=lambda m: results[m]["final_map"], reverse=True)
    best = ranked[0]
    if len(ranked) == 1:
        return f"Only {labels[best]} ran."
    margin = 100 * (results[best]["final_map"] - results[ranked[1]]["final_map"])
    return f"Winner: {labels[best]} by {margin:.2f} mAP over {labels[ranked[1]]} (one seed; see the README for 3-seed tables)."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--methods", default="ours,ours_plus,an",
                        help="comma-separated method files of configs/methods/ (default: ours,ours_plus,an)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. run.epochs=4")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(max(os.cpu_count() or 1, 1)))
    from pml_scale.config import load_config
    from pml_scale.grid import SpecError, load_method
    from pml_scale.train import run

    try:
        methods = {name: load_method(METHODS_DIR, name) for name in args.methods.split(",") if name}
    except SpecError as exc:
        parser.error(f"--methods: {exc}")
    results, labels = {}, {}
    for name, entry in methods.items():
        # one evaluation, after the last epoch (the grids evaluate every epoch to check for collapse;
        # evaluation changes no training state, so the final mAP is the same)
        cfg = load_config(args.config, [*DEMO_OVERRIDES, *entry.overrides, f"run.name=demo-{name}",
                                        "run.eval_every=0", *args.overrides])
        results[name], labels[name] = run(cfg), entry.label
        setting = cfg.data.setting

    print(f"\nDemo ({Path(cfg.data.root).name}, {setting}, seed {cfg.run.seed}, {cfg.run.epochs} epochs):")
    print(f"{'method':<12} {'final mAP':>10} {'time':>8}")
    for name, s in results.items():
        print(f"{labels[name]:<12} {100 * s['final_map']:>10.2f} {s['wall_s']:>7.0f}s")
    print(winner_line(results, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
