"""Benchmark the paper's loss, forward + backward: eager PyTorch vs torch.compile vs the fused
Triton kernel (``pml_scale.kernels.fused_partial_label_loss``).

    python benchmarks/loss_kernel.py --quick --json loss_kernel.json      # GPU, ~3 min on an H200
    python benchmarks/loss_kernel.py --json full.json                     # GPU, the full sweep
    python benchmarks/loss_kernel.py --cpu --json smoke.json              # no GPU: interpreter smoke run

Per (B, L, logits dtype, impl): median fwd+bwd and fwd-only time (CUDA events, after warmup),
host time per call (CPU clock around the enqueue of one call, no sync: the Python and launch
overhead), achieved GB/s counting the bytes a one-pass algorithm must move (logits, states
int8, pseudo fp16, ids int64 in; gradient in logits' dtype and ŷ fp16 out), that as % of the
copy bandwidth measured in the same run, the loss's relative error vs eager, and the peak
memory of one step minus the inputs, as a ratio of logits + gradient + ŷ bytes. The
issue's targets are checked at the end. Each torch.compile cell is guarded: a failure is
printed and the run goes on. ``--cpu`` runs small shapes under TRITON_INTERPRET=1 with the
CPU clock (numbers meaningless; it checks the script end to end).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback

FULL_B = (256, 1024, 4096)
FULL_L = (80, 600, 9605, 100_000)
FULL_DTYPES = ("bf16", "fp32")
QUICK = [(4096, L, dn) for dn in FULL_DTYPES for L in (600, 9605, 100_000)] + [
    (256, 80, "bf16"), (256, 600, "bf16"), (4096, 80, "bf16")]
CPU_CASES = [(64, 80, "fp32"), (64, 600, "bf16"), (16, 9605, "fp32")]
PARAMS = dict(alpha=0.95, beta=0.05, d=0.9, q=0.5, seed=1234, epoch=3, p_threshold=0.1, p_rule="text")
IMPLS = ("eager", "compile", "triton")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="B=4096 × L ∈ {600, 9605, 100000} in bf16 and fp32, plus 256×80, 256×600, 4096×80 bf16 "
                           "(host overhead); fewer iterations")
    mode.add_argument("--cpu", action="store_true",
                      help="no GPU: small shapes under the Triton interpreter, CPU clock (a smoke run)")
    ap.add_argument("--cases", metavar="BxLxDT,...",
                    help="explicit cells, e.g. 4096x9605xbf16,256x80xfp32 (overrides the sweep)")
    ap.add_argument("--impls", default=None,
                    help="comma-separated subset of eager,compile,triton (default: all; --cpu: eager,triton)")
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5, quick 3, cpu 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps (default 30, quick 10, cpu 3)")
    ap.add_argument("--host-iters", type=int, default=None, help="calls timed for the host column (default 50)")
    ap.add_argument("--json", metavar="PATH", help="write every row, the checks and the environment as JSON")
    ap.add_argument("--out", metavar="PATH", help="also write the markdown table to PATH")
    args = ap.parse_args(argv)
    impls = args.impls or ("eager,triton" if args.cpu else ",".join(IMPLS))
    args.impls = [s.strip() for s in impls.split(",") if s.strip()]
    bad = [s for s in args.impls if s not in IMPLS]
    if bad or not args.impls:
        ap.error(f"--impls: unknown {bad or args.impls}; accepted: {', '.join(IMPLS)}")
    for name, lo in (("warmup", 0), ("iters", 1), ("host_iters", 1)):
        v = getattr(args, name)
        if v is not None and v < lo:
            ap.error(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")
    if args.cases:
        cases = []
        for c in args.cases.split(","):
            try:
                b, l, dn = c.strip().lower().split("x")
                cases.append((int(b), int(l), dn))
            except ValueError:
                ap.error(f"--cases: cannot read {c!r}; write BxLxDTYPE, e.g. 4096x9605xbf16")
            if dn not in FULL_DTYPES or int(b) < 1 or int(l) < 1:
                ap.error(f"--cases: {c!r}: B, L >= 1 and dtype one of {FULL_DTYPES}")
        args.case_list = cases
    elif args.cpu:
        args.case_list = CPU_CASES
    elif args.quick:
        args.case_list = QUICK
    else:
        args.case_list = [(B, L, dn) for dn in FULL_DTYPES for L in FULL_L for B in FULL_B]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 3 if args.quick else 5)
    args.iters = args.iters if args.iters is not None else (3 if args.cpu else 10 if args.quick else 30)
    args.host_iters = args.host_iters if args.host_iters is not None else (5 if args.cpu else 50)
    return args


# The mode decides whether Triton must run under the interpreter, which has to be set before
# anything imports triton (pml_scale.kernels does): parse first, import afterwards.
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.cpu:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pml_scale.losses.picks import pick_mask  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def eager_loss(logits, states, pseudo, ids, *, alpha, beta, d, q, seed, epoch, p_threshold, p_rule):
    """docs/design.md §1 in plain PyTorch (fp32 compute), the eager baseline: returns (loss, ŷ fp16, p)."""
    s = logits.float()
    y = torch.sigmoid(s)
    log_y, log_1my = F.logsigmoid(s), F.logsigmoid(-s)
    pos, neg = states == 1, states == 0
    S = (states == -1) & pick_mask(ids, s.shape[1], seed=seed, epoch=epoch, q=q)
    n_e = (pos | neg).sum(1).float()
    n_s = S.sum(1).float()
    inv_ne = torch.where(n_e > 0, 1 / n_e.clamp(min=1), torch.zeros_like(n_e))
    ds = torch.where(n_s > 0, d / n_s.clamp(min=1), torch.zeros_like(n_s))
    yt = pseudo.float()
    A = inv_ne * torch.where(pos, log_y, 0.0).sum(1) + ds * torch.where(S, yt * log_y, 0.0).sum(1)
    B = inv_ne * torch.where(neg, log_1my, 0.0).sum(1) + ds * torch.where(S, (1 - yt) * log_1my, 0.0).sum(1)
    ymax = y.detach().amax(1)
    big = ymax >= p_threshold if p_rule == "printed" else ymax < p_threshold
    p = 1.0 + big.float()
    return (-p * (alpha * A + beta * B)).mean(), y.detach().half(), p


class Clock:
    """CUDA events on a GPU, the CPU clock (after the work) elsewhere."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn, warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def host_us(self, fn, iters: int) -> float:
        """Mean CPU time to issue one call, without waiting for the GPU (queue never fills)."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        t = time.perf_counter() - t0
        self.sync()
        return t / iters * 1e6


def make_inputs(B, L, dtype, device):
    g = torch.Generator(device=device).manual_seed(B * 100_003 + L)
    logits = (torch.randn(B, L, generator=g, device=device) * 3).to(dtype)
    states = torch.randint(-1, 2, (B, L), generator=g, device=device, dtype=torch.int8)
    pseudo = torch.rand(B, L, generator=g, device=device).half()
    ids = torch.randperm(10 * B, generator=g, device=device)[:B]
    return logits, states, pseudo, ids


def one_pass_bytes(B, L, dtype) -> int:
    e = torch.empty((), dtype=dtype).element_size()
    return B * L * (e + 1 + 2 + e + 2) + B * 8


def copy_bandwidth_gbs(clock: Clock, device) -> float:
    nbytes = (2 << 30) if clock.cuda else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = clock.time_ms(lambda: dst.copy_(src), warmup=3, iters=20 if clock.cuda else 5)
    del src, dst
    if clock.cuda:
        torch.cuda.empty_cache()
    return 2 * nbytes / ms / 1e6


def make_fn(impl: str):
    if impl == "triton":
        from pml_scale.kernels import fused_partial_label_loss

        return fused_partial_label_loss
    if impl == "compile":
        torch._dynamo.reset()
        return torch.compile(eager_loss, dynamic=False)
    return eager_loss


def peak_over_inputs(step, cuda: bool) -> int | None:
    if not cuda:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def graph_step_us(fn, x, states, pseudo, ids, n: int) -> float | None:
    """GPU time of one fwd+bwd (loss, then d loss/d logits) replayed from a CUDA graph: the
    kernels' cost with no Python or launch overhead, the floor a captured training step sees.
    None when capture fails (printed; the run goes on)."""
    def step():
        loss, _, _ = fn(x, states, pseudo, ids, **PARAMS)
        return torch.autograd.grad(loss, x)[0]

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up on the capture stream (compiled and tuned already)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n * 1e3
    except Exception as exc:  # capture is a measurement aid, never a reason to stop
        print(f"  CUDA-graph timing failed: {type(exc).__name__}: {exc}", flush=True)
        return None


def run_cell(B, L, dname, impl, inputs, clock, copy_gbs, args, eager_loss_value):
    logits, states, pseudo, ids = inputs
    dtype = DTYPES[dname]
    row = dict(B=B, L=L, dtype=dname, impl=impl, ms=None)
    x = logits.detach().clone().requires_grad_(True)
    try:
        t0 = time.perf_counter()
        fn = make_fn(impl)

        def step():
            x.grad = None
            loss, _, _ = fn(x, states, pseudo, ids, **PARAMS)
            loss.backward()
            return loss

        def forward():
            return fn(x, states, pseudo, ids, **PARAMS)[0]

        loss_value = step().item()  # compiles (and tunes) here
        clock.sync()
        row["first_call_s"] = time.perf_counter() - t0
        x.grad = None
        peak = peak_over_inputs(step, clock.cuda)
        x.grad = None
        row["ms"] = clock.time_ms(step, args.warmup, args.iters)
        row["fwd_ms"] = clock.time_ms(forward, args.warmup, args.iters)
        # few calls when the GPU is the bottleneck: the launch queue must never fill
        n_host = max(3, min(args.host_iters, int(100 / max(row["ms"], 1e-3))))
        row["host_fwd_us"] = clock.host_us(forward, n_host)
        row["host_step_us"] = clock.host_us(step, n_host)
        if clock.cuda and impl == "triton":
            row["graph_us"] = graph_step_us(fn, x, states, pseudo, ids, n=max(20, 5 * args.iters))
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
        return row, None
    except Exception as exc:  # a failing torch.compile cell must not stop the run
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        print(f"  {impl} failed at {B}x{L} {dname}: {row['error']}", flush=True)
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        return row, None
    finally:
        x.grad = None
        if clock.cuda:
            torch.cuda.empty_cache()
    nbytes = one_pass_bytes(B, L, dtype)
    budget = B * L * (2 * logits.element_size() + 2)
    row.update(gbs=nbytes / row["ms"] / 1e6, fwd_gbs=nbytes / row["fwd_ms"] / 1e6,
               peak_ratio=(peak / budget if peak is not None else None), loss=loss_value)
    row["pct"] = 100 * row["gbs"] / copy_gbs
    row["fwd_pct"] = 100 * row["fwd_gbs"] / copy_gbs
    ref = eager_loss_value if eager_loss_value is not None else (loss_value if impl == "eager" else None)
    row["rel_err"] = abs(loss_value - ref) / max(abs(ref), 1e-30) if ref is not None else None
    return row, loss_value


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows, copy_gbs, clock_name) -> str:
    out = [f"Copy bandwidth (measured): {copy_gbs:.0f} GB/s; clock: {clock_name}. pseudo fp16, states int8, ids "
           "int64. GB/s and % copy count the bytes of a one-pass algorithm over the fwd+bwd time (fwd % copy: "
           "over the forward alone, for Triton the fused launch). host µs: CPU time to issue one forward / one "
           "fwd+bwd step without a sync. graph µs: one fwd+bwd replayed from a CUDA graph (GPU time, ours only). "
           "peak = max allocated over one fwd+bwd minus inputs ÷ (logits + grad + ŷ).",
           "",
           "| B | L | dtype | impl | fwd+bwd ms | fwd ms | host fwd µs | host step µs | graph µs | GB/s | % copy "
           "| fwd % copy | × eager | peak/budget | loss rel err |",
           "|---:|---:|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['B']} | {r['L']} | {r['dtype']} | {r['impl']} | "
        if r["ms"] is None:
            out.append(head + f"{r.get('error', 'failed')} | - | - | - | - | - | - | - | - | - | - |")
            continue
        out.append(head + f"{r['ms']:.3f} | {r['fwd_ms']:.3f} | {r['host_fwd_us']:.1f} | {r['host_step_us']:.1f} | "
                   f"{fmt(r.get('graph_us'), '.1f')} | {r['gbs']:.0f} | {r['pct']:.1f} | {r['fwd_pct']:.1f} | {fmt(r.get('speedup'), '.1f')} | "
                   f"{fmt(r['peak_ratio'], '.3f')} | {fmt(r['rel_err'], '.1e')} |")
    return "\n".join(out)


def checks(rows) -> list[dict]:
    """The issue's targets, each {target, value, pass}; absent cells are skipped."""
    def find(B, L, dn, impl):
        return next((r for r in rows if (r["B"], r["L"], r["dtype"], r["impl"]) == (B, L, dn, impl)
                     and r["ms"] is not None), None)

    out = []
    for r in rows:
        if r["impl"] != "triton" or r["ms"] is None:
            continue
        c = find(r["B"], r["L"], r["dtype"], "compile")
        if c:
            out.append(dict(target=f"{r['B']}×{r['L']} {r['dtype']}: ours ≤ torch.compile (fwd+bwd)",
                            value=f"{r['ms']:.3f} vs {c['ms']:.3f} ms", ok=r["ms"] <= c["ms"]))
    for dn in FULL_DTYPES:
        for L in (9605, 100_000):
            r = find(4096, L, dn, "triton")
            if r:
                out.append(dict(target=f"4096×{L} {dn}: fused launch ≥ 50% of copy bandwidth",
                                value=f"{r['fwd_pct']:.1f}% (whole step {r['pct']:.1f}%)", ok=r["fwd_pct"] >= 50))
    r = find(4096, 600, "bf16", "triton")
    if r:
        out.append(dict(target="4096×600 bf16 fwd+bwd ≤ 60 µs", value=f"{r['ms'] * 1e3:.1f} µs", ok=r["ms"] <= 0.060))
        if r.get("graph_us") is not None:
            out.append(dict(target="4096×600 bf16 fwd+bwd ≤ 60 µs, GPU time (CUDA graph replay)",
                            value=f"{r['graph_us']:.1f} µs", ok=r["graph_us"] <= 60))
        if r.get("speedup"):
            out.append(dict(target="4096×600 bf16 ≥ 40× eager", value=f"{r['speedup']:.1f}×", ok=r["speedup"] >= 40))
    small = [r for r in rows if r["impl"] == "triton" and r["ms"] is not None and r["L"] <= 600]
    if small:
        worst = max(small, key=lambda r: r["host_fwd_us"])
        out.append(dict(target="host time per call ≤ 25 µs (worst L ≤ 600 cell, forward)",
                        value=f"{worst['host_fwd_us']:.1f} µs at {worst['B']}×{worst['L']} {worst['dtype']} "
                              f"(fwd+bwd step {worst['host_step_us']:.1f} µs)", ok=worst["host_fwd_us"] <= 25))
    tri = [r for r in rows if r["impl"] == "triton" and r.get("peak_ratio") is not None]
    if tri:
        worst = max(tri, key=lambda r: r["peak_ratio"])
        out.append(dict(target="peak ≤ 1.05 × (logits + grad + ŷ)",
                        value=f"{worst['peak_ratio']:.3f} at {worst['B']}×{worst['L']} {worst['dtype']}",
                        ok=worst["peak_ratio"] <= 1.05))
    return out


def environment(cuda: bool) -> dict:
    import triton

    env = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
               triton=triton.__version__, python=platform.python_version(), host=platform.node(),
               cpu=platform.processor() or platform.machine(), interpreter=os.environ.get("TRITON_INTERPRET", "0"))
    if cuda:
        env["device"] = torch.cuda.get_device_name()
    return env


def main(args) -> int:
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("benchmarks/loss_kernel.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "run it with --cpu for an interpreter smoke run", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    clock = Clock(cuda)
    copy_gbs = copy_bandwidth_gbs(clock, device)
    env = environment(cuda)
    print(f"# {env.get('device', 'CPU (interpreter)')} | torch {env['torch']} | triton {env['triton']} | "
          f"copy {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    t_start = time.perf_counter()
    for B, L, dn in args.case_list:
        inputs = make_inputs(B, L, DTYPES[dn], device)
        eager_value = None
        case_rows = []
        for impl in args.impls:
            row, value = run_cell(B, L, dn, impl, inputs, clock, copy_gbs, args, eager_value)
            if impl == "eager":
                eager_value = value
            case_rows.append(row)
            print(f"{B:>5} x {L:>6} {dn} {impl:>7}: " + (row.get("error", "failed") if row["ms"] is None else
                  f"{row['ms']:.3f} ms fwd+bwd, {row['fwd_ms']:.3f} ms fwd ({row['fwd_pct']:.1f}% copy), host "
                  f"{row['host_fwd_us']:.1f}/{row['host_step_us']:.1f} µs, peak {fmt(row['peak_ratio'], '.3f')}, "
                  f"first call {row['first_call_s']:.1f} s"), flush=True)
        eager_ms = next((r["ms"] for r in case_rows if r["impl"] == "eager" and r["ms"]), None)
        for r in case_rows:
            r["speedup"] = eager_ms / r["ms"] if eager_ms and r["ms"] else None
        rows += case_rows
        del inputs
    tuned = {}
    if "triton" in args.impls:
        from pml_scale.kernels import tuned_configs

        tuned = {f"B≤{k[0]} L={k[1]} {k[2]} pseudo {k[3]} contig={k[4]} window={k[5]}": v
                 for k, v in tuned_configs().items()}
    results = checks(rows)
    title = f"# loss kernel benchmark: {env.get('device', 'CPU interpreter smoke run')}, {env['date']}"
    text = "\n".join([title, "", table(rows, copy_gbs, "CUDA events" if cuda else "CPU"), "", "Targets (issue #12):"]
                     + [f"- {c['target']}: {c['value']}: {'PASS' if c['ok'] else 'FAIL'}" for c in results]
                     + ([""] + ["Tuned kernel configs:"] + [f"- {k}: {v[0]} (ms per candidate: "
                        + ", ".join(f"{lab} {ms:.3f}" for lab, ms in v[1].items()) + ")" for k, v in tuned.items()]
                        if tuned else []))
    print("\n" + text)
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(environment=env, copy_gbs=copy_gbs, params=PARAMS, rows=rows, checks=results,
                           tuned=tuned, seconds=time.perf_counter() - t_start), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
