#!/usr/bin/env python
"""Where the extra time of a training step goes at 9,605 labels vs 600 (issue 17, item 6): each
part of the CPU step timed alone, per step of batch 64, one thread, with the shapes of
configs/openimages_like.yaml (tiny_resnet at 48 px, 192 features, NATIVE states with ~5 observed
labels per row).

    OMP_NUM_THREADS=1 python benchmarks/oil_components.py [--labels 600,9605] [--reps 20]

Parts: the backbone fwd+bwd (no head), the head Linear(192, L) fwd+bwd, AdamW's step over the
head's parameters, each loss's forward and backward on (B, L) logits (the paper's CPU reference
and the baselines), the q-pick hash alone (picks.pick_mask), the label thread's α/β counts, and
the fp32 → fp16 conversion of ŷ that the store write does. Median of --reps after 3 warm-ups.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pml_scale.losses.partial import alpha_beta_counts
from pml_scale.losses.picks import pick_mask
from pml_scale.losses.registry import LossInputs, build_loss
from pml_scale.model import TinyResNet


def timeit(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def states_like_native(B: int, L: int, g: torch.Generator) -> torch.Tensor:
    s = torch.full((B, L), -1, dtype=torch.int8)
    for i in range(B):
        cols = torch.randperm(L, generator=g)[:5]
        s[i, cols[:2]] = 1
        s[i, cols[2:]] = 0
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels", default="600,9605")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="append one JSON line per L here")
    args = ap.parse_args()
    B = args.batch
    g = torch.Generator().manual_seed(0)
    rows = []
    backbone = TinyResNet(10)
    backbone.fc = torch.nn.Identity()
    imgs = torch.randn(B, 3, args.size, args.size, generator=g)

    def bb():
        backbone.zero_grad(set_to_none=True)
        backbone(imgs).sum().backward()

    t_backbone = timeit(bb, args.reps)
    for L in (int(x) for x in args.labels.split(",")):
        r = {"L": L, "B": B, "threads": torch.get_num_threads(), "backbone_fwd_bwd_ms": 1e3 * t_backbone}
        head = torch.nn.Linear(192, L)
        feats = torch.randn(B, 192, generator=g, requires_grad=True)

        def hd():
            head.zero_grad(set_to_none=True)
            head(feats).sum().backward()

        r["head_fwd_bwd_ms"] = 1e3 * timeit(hd, args.reps)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
        hd()
        r["adamw_head_step_ms"] = 1e3 * timeit(opt.step, args.reps)
        states = states_like_native(B, L, g)
        ids = torch.arange(B, dtype=torch.int64) * 7
        pseudo = torch.full((B, L), 0.5)
        logits0 = torch.randn(B, L, generator=g)
        for name, opts in (("paper", {}), ("ours_plus", {"pseudo_weights": "capped", "neg_margin": 0.05}),
                           ("an", {}), ("asl", {}), ("wan", {}), ("ignore", {})):
            fn = build_loss("paper" if name == "ours_plus" else name, validate=False, **opts)
            counts = alpha_beta_counts("observed", states).tolist()
            x = logits0.clone().requires_grad_(True)
            inp = dict(states=states, sample_ids=ids, epoch=1, total_epochs=4, pseudo=pseudo,
                       batch_counts=tuple(counts))

            def fwd():
                return fn(LossInputs(logits=x, **inp))

            def fwd_bwd():
                x.grad = None
                fwd().loss.backward()

            r[f"loss_{name}_fwd_ms"] = 1e3 * timeit(fwd, args.reps)
            r[f"loss_{name}_fwd_bwd_ms"] = 1e3 * timeit(fwd_bwd, args.reps)
        r["pick_mask_ms"] = 1e3 * timeit(lambda: pick_mask(ids, L, seed=0, epoch=1, q=0.5), args.reps)
        r["alpha_beta_counts_observed_ms"] = 1e3 * timeit(lambda: alpha_beta_counts("observed", states), args.reps)
        yh = torch.sigmoid(logits0)
        r["yhat_to_fp16_ms"] = 1e3 * timeit(lambda: yh.to(torch.float16), args.reps)
        rows.append(r)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
