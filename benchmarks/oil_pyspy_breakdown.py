#!/usr/bin/env python
"""Aggregate a `py-spy record --threads --native --format raw` profile of a trainer process into
the parts of issue 17's question: classifier head (d x L: Linear fwd/bwd), backbone, loss forward
and backward (the CPU reference), optimizer step, data loader, label thread (gathers/scatters),
evaluation, other. Sample counts per thread; the main thread's parts as shares of its samples.

    py-spy record --pid PID --duration 60 --rate 50 --threads --native --format raw -o prof.txt
    python benchmarks/oil_pyspy_breakdown.py prof.txt
"""

import re
import sys
from collections import Counter

HEAD = ("AddmmBackward", "MmBackward", "at::_ops::addmm", "at::_ops::linear", "aten::addmm", "at::native::addmm")
BACKBONE = ("Convolution", "convolution", "batch_norm", "BatchNorm", "NativeBatchNorm", "max_pool", "adaptive_avg_pool",
            "ReluBackward", "threshold_backward", "relu", "AdaptiveAvgPool", "MeanBackward")


def part(frames: list[str]) -> str:
    s = ";".join(frames)
    if "evaluate_epoch" in s or "test_once" in s or "evaluate.py" in s:
        return "evaluation"
    if "train_step (pml_scale/train.py" not in s:
        if "train_epoch" in s or "epoch_step" in s:
            return "loader / loop"  # next(batches), gather queueing, bookkeeping
        return "other (setup, checkpoints, stores at epoch end)"
    m = re.search(r"train_step \(pml_scale/train.py:(\d+)\)", s)
    line = int(m.group(1)) if m else 0
    if "engine.py" in s and ("step (" in s and "optim" in s.lower()) or "adamw" in s.lower() or "_single_tensor_adam" in s \
            or "_multi_tensor_adam" in s or "_fused_adam" in s:
        return "optimizer step"
    if "allreduce_and_copy" in s or "allreduce_bucket" in s or "flatten_dense" in s:
        return "DeepSpeed gradient all-reduce/flatten/copy (world 1)"
    if "backward" in s.lower() and "mkl_blas" in s:
        return "head backward"  # MKL sgemm: the Linear head's mm (convolutions run in oneDNN)
    if "forward" in s and "mkl_blas" in s:
        return "head forward"
    if "autograd" in s and ("backward" in s.lower()) or "_engine_run_backward" in s:
        if any(h in s for h in ("AddmmBackward", "MmBackward", "TBackward")):
            return "head backward"
        if any(b in s for b in BACKBONE):
            return "backbone backward"
        if "AccumulateGrad" in s:
            return "backward: grad accumulation"
        if any(k in s for k in ("WhereBackward", "LogSigmoidBackward", "MulBackward", "NegBackward", "SumBackward",
                                "SubBackward", "DivBackward", "ClampBackward", "SigmoidBackward", "add_kernel")):
            return "loss backward"
        return "backward, unresolved native frames (oneDNN JIT: convolutions)"
    if "losses/" in s or "loss_fn" in s:
        return "loss forward"
    if "forward" in s or "_call_impl" in s:
        if any(h in s for h in ("addmm", "linear")) and "conv" not in s.lower():
            return "head forward"
        return "backbone forward"
    if "scatter" in s or "label_traffic" in s:
        return "labels (main thread side)"
    return f"train_step other (line {line})"


def main(path: str) -> None:
    threads: Counter = Counter()
    parts: Counter = Counter()
    label_parts: Counter = Counter()
    for raw in open(path):
        raw = raw.rstrip("\n")
        if not raw:
            continue
        stack, _, n = raw.rpartition(" ")
        n = int(n)
        frames = stack.split(";")
        tname = frames[0]
        tkey = re.sub(r"\(\d+\)", "", tname).replace("thread ", "").strip(": ")
        name = frames[0].split(":", 1)[1].strip() if ":" in frames[0] else frames[0]
        threads[name] += n
        if name == "MainThread":
            parts[part(frames)] += n
        elif name.startswith("pml-labels"):
            s = ";".join(frames)
            if "SimpleQueue_get" in s or frames[-1].startswith("0x") and "cond_timedwait" in s and "Assign" not in s:
                label_parts["idle (waiting for work)"] += n
                continue
            key = "gather" if "gather" in s else "scatter/store write" if ("scatter" in s or "write" in s) else \
                "alpha/beta counts" if "alpha_beta" in s or "counts" in s else "other"
            label_parts[key] += n
    total_main = sum(parts.values())
    print(f"samples per thread: {dict(threads.most_common())}")
    print(f"main thread ({total_main} samples):")
    for k, v in parts.most_common():
        print(f"  {k:45s} {v:6d}  {100 * v / max(total_main, 1):5.1f}%")
    tl = sum(label_parts.values())
    print(f"label thread ({tl} samples = {100 * tl / max(total_main, 1):.1f}% of the main thread's):")
    for k, v in label_parts.most_common():
        print(f"  {k:45s} {v:6d}")


if __name__ == "__main__":
    main(sys.argv[1])
