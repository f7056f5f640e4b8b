#!/usr/bin/env python
"""The main job on a laptop: build the embedded demo dataset if absent, then train the paper's
method and the AN baseline in PAL_0.3 (configs/demo.yaml) and print both mAPs side by side.

    python launch/demo.py [--out runs/demo] [a.b=value ...]      (overrides apply to both runs)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--methods", default="paper,an", help="comma-separated loss names (default: paper,an)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.epochs=4")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(max(os.cpu_count() or 1, 1)))
    from pml_scale.config import load_config
    from pml_scale.train import run

    results = {}
    for method in args.methods.split(","):
        cfg = load_config(args.config, [f"loss.name={method}", f"run.name=demo-{method}", *args.overrides])
        results[method] = run(cfg)

    print("\nDemo (embedded digits dataset, PAL_0.3):")
    print(f"{'method':<10} {'final mAP':>10} {'best mAP':>10} {'time':>8}")
    for method, s in results.items():
        print(f"{method:<10} {100 * s['final_map']:>10.2f} {100 * s['best_map']:>10.2f} {s['wall_s']:>7.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
