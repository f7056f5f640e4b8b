"""Where the host time of one fused-loss call goes: cProfile over many forward (or fwd+bwd)
calls of ``fused_partial_label_loss`` on CUDA tensors, top functions by own time. The GPU is
never waited on inside the loop (the launch queue absorbs the calls), so this is the Python +
launch cost that ``benchmarks/loss_kernel.py`` reports as "host fwd µs".

    python benchmarks/kernel_host_profile.py [--shape 4096x600] [--dtype bf16] [--calls 2000] [--step]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x600", help="BxL (default 4096x600)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--step", action="store_true", help="profile forward + backward instead of forward only")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("kernel_host_profile.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from pml_scale.kernels import fused_partial_label_loss

    B, L = (int(v) for v in args.shape.lower().split("x"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, L, device="cuda", generator=gen).to(dtype).requires_grad_(True)
    states = torch.randint(-1, 2, (B, L), device="cuda", generator=gen).to(torch.int8)
    pseudo = torch.rand(B, L, device="cuda", generator=gen).half()
    ids = torch.arange(B, device="cuda")
    params = dict(alpha=0.95, beta=0.05, d=0.9, q=0.5, seed=1234, epoch=3)

    def call():
        loss, _, _ = fused_partial_label_loss(x, states, pseudo, ids, **params)
        if args.step:
            x.grad = None
            loss.backward()

    for _ in range(20):  # compile, tune, warm caches
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        call()
    host_us = (time.perf_counter() - t0) / args.calls * 1e6
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        call()
    prof.disable()
    torch.cuda.synchronize()
    print(f"{args.shape} {args.dtype} {'fwd+bwd' if args.step else 'forward'}: {host_us:.1f} µs host per call "
          f"(unprofiled, {args.calls} calls)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
