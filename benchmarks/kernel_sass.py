"""CPU-side proxy for the loss kernel's speed: SASS instructions per element on Hopper (sm_90).

No GPU needed. Each launch the kernel would make for a B×L problem is captured on CPU
tensors, specialised exactly as Triton's launcher would (pointer alignment, ints divisible
by 16, ints equal to 1 folded to constants), compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` and disassembled with
Triton's bundled ``nvdisasm``. Reported per kernel: registers, local-memory (spill) bytes,
instructions, and the dynamic instructions per element of the main path
(straight-line instructions before the final ticket reduction, plus element loops × their trip
count, per thread, × threads × programs ÷ B·L: masked lanes and per-row work count), with the
MUFU and global-memory instructions per element.

    python benchmarks/kernel_sass.py                  # this tree, B=4096 × L ∈ {600, 9605, 100000}, bf16
    python benchmarks/kernel_sass.py --rev 5d78dc7    # the kernel as of a git revision (before)
    python benchmarks/kernel_sass.py --all-candidates --dtype fp32 --json sass.json
    python benchmarks/kernel_sass.py --neg-focus      # the ours+ negative-term variant (neg_gamma/neg_margin)
    python benchmarks/kernel_sass.py --compile-check  # every kernel variant compiles for sm_90
    python benchmarks/kernel_sass.py --compile-check --fingerprint after.json  # hash of each variant's code:
        # the same file before and after a host-side refactor = the same PTX and SASS (debug info aside)

Run without TRITON_INTERPRET (it is cleared here). A static proxy, not a timing: it ignores
latency, occupancy and memory bandwidth, but counts exactly what each element costs to issue.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

try:
    from triton._C.libtriton import native_specialize_impl  # triton >= 3.3
except ImportError:  # pragma: no cover
    native_specialize_impl = None

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TARGET = GPUTarget("cuda", 90, 32)
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRA = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)\)?")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')


def tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


# ------------------------------------------------------------------ capture + compile


class Capture:
    """Replaces ``JITFunction.run`` of the given kernels: records (kernel, grid, args, kwargs)."""

    def __init__(self, kernels):
        self.kernels, self.calls = kernels, []

    def __enter__(self):
        for k in self.kernels:
            def run(*args, grid, warmup, _k=k, **kwargs):
                self.calls.append((_k, grid, args, kwargs))
            k.run = run
        return self

    def __exit__(self, *exc):
        for k in self.kernels:
            del k.run


def specialise(kernel, args, kwargs):
    """(signature, constexprs, attrs, options) as JITFunction._pack_args builds them."""
    params = kernel.params
    opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    values = list(args) + [kwargs[p.name] for p in params[len(args):]]
    sig, constexprs, attrs = {}, {}, {}
    for i, (p, v) in enumerate(zip(params, values)):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[(i,)] = v
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        sig[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = spec
        elif isinstance(spec, str):
            parsed = BaseBackend.parse_attr(spec)
            if parsed:
                attrs[(i,)] = parsed
    return sig, constexprs, attrs, opts


def compile_sass(kernel, args, kwargs, dump: Path | None = None) -> dict:
    sig, constexprs, attrs, opts = specialise(kernel, args, kwargs)
    src = ASTSource(kernel, sig, constexprs={k: v for k, v in constexprs.items()}, attrs=attrs)
    ck = triton.compile(src, target=TARGET, options=opts)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        sass = subprocess.run([tool("nvdisasm"), "-c", "-g", str(cubin)], capture_output=True, text=True).stdout
        res = subprocess.run([tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{kernel.fn.__name__}.sass").write_text(sass)
        (dump / f"{kernel.fn.__name__}.ptx").write_text(ck.asm["ptx"])
        (dump / f"{kernel.fn.__name__}.cubin").write_bytes(ck.asm["cubin"])
        (dump / f"{kernel.fn.__name__}.ttgir").write_text(ck.asm["ttgir"])
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", res)
    return dict(sass=sass, ptx=ck.asm["ptx"], regs=int(m.group(1)) if m else None, local=int(m.group(2)) if m else None,
                num_warps=opts.get("num_warps", 4))


def analyse(sass: str, loop_trips: int) -> dict:
    """Instructions on the main path, per thread: straight-line code before the first global
    atomic (the ticket) plus each loop before it × ``loop_trips``."""
    insns, labels, where, cur = [], {}, [], "?"
    for line in sass.splitlines():
        fm = _LINE.search(line)
        if fm:
            cur = f"{Path(fm.group(1)).name}:{fm.group(2)}"
            continue
        lm = _LABEL.match(line)
        if lm:
            labels[lm.group(1)] = len(insns)
            continue
        im = _INSN.match(line)
        if im:
            insns.append(im.group(2))
            where.append(cur)
    end = next((i for i, s in enumerate(insns) if re.search(r"\b(ATOMG|ATOM|RED)\b", s)), len(insns))
    loops = []
    for i, s in enumerate(insns[:end]):
        bm = _BRA.search(s)
        if bm and labels.get(bm.group(1), i + 1) <= i:
            loops.append((labels[bm.group(1)], i))
    in_loop = [False] * end
    for a, b in loops:
        for j in range(a, b + 1):
            in_loop[j] = True
    ops, lines = Counter(), Counter()
    for j in range(end):
        op = insns[j].split()[0] if not insns[j].startswith("@") else insns[j].split()[1]
        n = loop_trips if in_loop[j] else 1
        ops[op.split(".")[0]] += n
        lines[where[j]] += n
    return dict(total=len(insns), main=sum(ops.values()), ops=ops, lines=lines,
                loops=[b - a + 1 for a, b in loops])


# ------------------------------------------------------------------ the launches of one problem


def fake_inputs(B, L, dtype):
    # torch.empty does not touch its pages: 4096 × 100000 costs no memory here
    return (torch.empty((B, L), dtype=dtype), torch.empty((B, L), dtype=torch.int8),
            torch.empty((B, L), dtype=torch.float16), torch.empty((B,), dtype=torch.int64))


def _kernel_modules():
    """(launch module, device_kernels module) of this tree, with the device check relaxed: CPU
    tensors stand in for CUDA ones (nothing is launched, every launch is captured)."""
    sys.path.insert(0, str(REPO))
    import pml_scale.kernels.checks as checks
    import pml_scale.kernels.device_kernels as dk
    import pml_scale.kernels.launch as launch

    checks.check_device = lambda dev: None
    return launch, dk


def launches_current(B, L, dtype, all_candidates=False, need_grad=True, neg_focus=False):
    """[(label, calls, loop trips per call)] for this tree's configs; ``neg_focus``: the ours+
    specialisation (NEG_FOCUS, neg_gamma/neg_margin on) instead of the paper's."""
    launch, dk = _kernel_modules()
    logits, states, pseudo, ids = fake_inputs(B, L, dtype)
    plan = launch.LaunchPlan(logits, states, pseudo, ids, need_grad=need_grad, return_picks=False, p_rule="text",
                             coef_ptr=False, block_l=None, neg_focus=neg_focus)
    plan.flags["FAST"] = True
    cfgs = (launch.candidate_configs(B, L, window=plan.window) if all_candidates
            else [launch.heuristic_config(B, L, interpret=False, window=plan.window)])
    yhat = torch.empty((B, L), dtype=torch.float16)
    grad = torch.empty((B, L), dtype=dtype)
    out = torch.empty(2 * B + 1)
    a = (logits, states, pseudo, ids, out, grad, yhat, out, yhat)
    scalars = (0.9, 0.1, 1.0, 1.0 / B, 0.1, 12345, 1 << 23, 0) + ((2.0, 0.05) if neg_focus else (0.0, 0.0))
    runs = []
    for cfg in cfgs:
        with Capture([dk._row_kernel, dk._row1_kernel, dk._split_stats_kernel, dk._split_fused_kernel]) as cap:
            launch.launch(plan, cfg, a, scalars)
        label = cfg.label() + (":window" if plan.window and cfg.block_b == 1 else "") + (":neg" if neg_focus else "")
        runs.append((label, cap.calls, [1] * len(cap.calls)))
    return runs


def launches_rev(rev, B, L, dtype):
    """The kernel file as of git ``rev``, launched with that revision's own block choice."""
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:kernels/partial_label.py"],
                          capture_output=True, text=True, check=True).stdout
    text = text.replace("from .pick_hash import", "from pml_scale.kernels.pick_hash import")
    tmp = Path(tempfile.mkdtemp()) / f"partial_label_{rev}.py"
    tmp.write_text(text)
    spec = importlib.util.spec_from_file_location(f"_pl_{rev}", tmp)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    mod.interpreter_active = lambda: True  # pass the CPU-tensor check
    orig = mod.choose_blocks
    mod.choose_blocks = lambda B_, L_, interpret, block_l=None: orig(B_, L_, interpret=False, block_l=block_l)
    logits, states, pseudo, ids = fake_inputs(B, L, dtype)
    kern = mod._partial_label_fwd_kernel
    with Capture([kern]) as cap:
        mod.partial_label_forward(logits, states, pseudo, ids, alpha=0.9, beta=0.1, d=1.0, q=0.5, seed=1,
                                  epoch=0)
    (k, grid, args, kw), = cap.calls
    block_b, block_l = kw["BLOCK_B"], kw["BLOCK_L"]
    trips = 1 if kw["SINGLE"] else triton.cdiv(L, block_l)
    label = f"{rev}:bb{block_b}:w{block_l}:nw{kw['num_warps']}:{'single' if kw['SINGLE'] else 'two-sweep'}"
    return label, cap.calls, [trips]


def measure(label, calls, trips, n_elems, dump=None) -> dict:
    """Per element of the B×L problem: dynamic SASS per thread × threads × programs ÷ (B·L),
    so masked (wasted) lanes and per-row / per-program work count too."""
    kernels, per_elem, mufu, mem = [], 0.0, 0.0, 0.0
    for (k, grid, args, kw), t in zip(calls, trips):
        c = compile_sass(k, args, kw, dump)
        a = analyse(c["sass"], t)
        threads = 32 * c["num_warps"]
        programs = 1
        for g in grid:
            programs *= g
        scale = threads * programs / n_elems  # thread-instructions per element per instruction
        pe = a["main"] * scale
        per_elem += pe
        mufu += a["ops"]["MUFU"] * scale
        mem += sum(v for o, v in a["ops"].items() if o in ("LDG", "STG", "LD", "ST")) * scale
        kernels.append(dict(kernel=k.fn.__name__, grid=list(grid), regs=c["regs"], local_bytes=c["local"],
                            num_warps=c["num_warps"], sass_total=a["total"], loop_bodies=a["loops"],
                            loop_trips=t, main_path_per_thread=a["main"], per_elem=round(pe, 2),
                            top_ops=dict(a["ops"].most_common(12)),
                            top_lines={k: round(v * scale, 2) for k, v in a["lines"].most_common(25)}))
    return dict(config=label, per_elem=round(per_elem, 2), mufu_per_elem=round(mufu, 2),
                mem_insn_per_elem=round(mem, 2), kernels=kernels)


def code_fingerprint(ptx: str, sass: str) -> dict:
    """Hashes of a kernel's code without its debug information: PTX without .loc/.file lines,
    comments and .debug_* sections, SASS as its instruction text only (no addresses or line info),
    so moving a function to another file or line changes nothing here."""
    ptx = "\n".join(ln for ln in ptx.splitlines() if not ln.strip().startswith((".loc", ".file", "//", "$L__")))
    ptx = re.sub(r"\.section\s+\.debug_\w+\s*\{.*?\n\s*\}", "", ptx, flags=re.S)
    insns = "\n".join(m.group(2) for m in map(_INSN.match, sass.splitlines()) if m)
    return dict(ptx=hashlib.sha256(ptx.encode()).hexdigest()[:16],
                sass=hashlib.sha256(insns.encode()).hexdigest()[:16], sass_insns=insns.count("\n") + bool(insns))


def compile_check(fingerprint_path: str | None = None) -> int:
    """Compile every kernel in a matrix of shapes, dtypes, layouts and flags for sm_90: catches
    errors the interpreter cannot (constexpr-specialised ints, inline PTX, layouts). No GPU."""
    launch, dk = _kernel_modules()
    from pml_scale.kernels.checks import PSEUDO_WEIGHTS
    from pml_scale.kernels.launch_config import LaunchConfig
    from pml_scale.kernels.partial_label import picked_pseudo_sums

    bf, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    # B, L, logits, pseudo, need_grad, picks, p_rule, coef, layout, config (None: all candidates), neg
    # (neg: also compile the ours+ NEG_FOCUS specialisation; every case compiles the paper's)
    cases = [
        (256, 600, bf, f16, True, False, "text", False, "contig", None, False),           # row, 1-D, window
        (256, 600, f16, bf, False, True, "printed", True, "contig", None, True),
        (256, 600, f32, f32, True, False, "text", True, "strided", None, True),          # row, 1-D, strided
        (64, 9605, bf, f16, True, True, "printed", True, "contig", None, False),        # row 1-D / split, window
        (63, 9605, f32, f16, False, False, "text", False, "contig", None, True),        # row 1-D / split, plain
        (64, 9605, bf, f16, True, False, "text", True, "strided", LaunchConfig("split", 1, 2048, 0, 4), True),
        (8, 100_000, f32, bf, True, True, "printed", True, "contig", None, False),
        (8, 100_003, bf, f16, True, False, "text", False, "strided", None, True),
        (1, 1, bf, f16, True, False, "text", True, "contig", None, False),
        (2, 1, f32, f16, True, False, "text", False, "contig", LaunchConfig("split", 1, 16, 0, 1), True),
        (4096, 600, bf, f16, True, False, "text", False, "contig", None, True),         # row, 2-D (bb4)
    ]
    ok, failed, prints = 0, [], []
    kernels_seen = set()  # (kernel, NEG_FOCUS) pairs compiled: every loss kernel in both specialisations

    def try_compile(what, k, args, kw):
        nonlocal ok
        try:
            c = compile_sass(k, args, kw)
            prints.append(dict(what=what, kernel=k.fn.__name__, **code_fingerprint(c["ptx"], c["sass"])))
            ok += 1
        except Exception as exc:  # noqa: BLE001 - report every failure
            failed.append(f"{what} {k.fn.__name__}: {str(exc).splitlines()[-1][:300] if str(exc) else exc!r}")

    for n, (B, L, dt, pdt, need_grad, picks, p_rule, coef, layout, cfg, neg) in enumerate(cases):
        logits, states, pseudo, ids = fake_inputs(B, L, dt)
        pseudo = pseudo.to(pdt)
        if layout == "strided":
            logits = torch.empty((L, B), dtype=dt).t()
            states = torch.empty((B, 2 * L), dtype=torch.int8)[:, ::2]
        yhat, out = torch.empty((B, L), dtype=f16), torch.empty(2 * B + 1)
        grad, pk = torch.empty((B, L), dtype=dt), torch.empty((B, L), dtype=torch.int8)
        a = (logits, states, pseudo, ids, torch.empty(2) if coef else out, grad if need_grad else yhat, yhat, out,
             pk if picks else yhat)
        for neg_focus in (False, True) if neg else (False,):
            plan = launch.LaunchPlan(logits, states, pseudo, ids, need_grad=need_grad, return_picks=picks,
                                     p_rule=p_rule, coef_ptr=coef, block_l=None, neg_focus=neg_focus)
            plan.flags["FAST"] = True
            plan.flags["PSEUDO_MODE"] = n % len(PSEUDO_WEIGHTS)  # the paper, balanced, capped in turn
            scalars = (0.9, 0.1, 1.0, 1.0 / B, 0.1, 12345, 1 << 23, 1 if coef else 0) + (
                (2.0, 0.05) if neg_focus else (0.0, 0.0))
            seen = set()
            for c in [cfg] if cfg else launch.candidate_configs(B, L, window=plan.window):
                with Capture([dk._row_kernel, dk._row1_kernel, dk._split_stats_kernel, dk._split_fused_kernel]) as cap:
                    launch.launch(plan, c, a, scalars)
                for k, grid, args, kw in cap.calls:
                    if neg_focus and k is dk._split_stats_kernel:
                        continue  # has no NEG_FOCUS: compiled with the paper's variant above
                    try_compile(f"{B}x{L} {dt} {layout} {c.label()}{' neg' if neg_focus else ''}", k, args, kw)
                    seen.add(k.fn.__name__)
            kernels_seen.update((name, neg_focus) for name in seen)
    for B, L, pdt in ((40, 300, f16), (3, 9000, f32), (1, 1, bf)):
        st, ps = torch.empty((B, L), dtype=torch.int8), torch.empty((B, L), dtype=pdt)
        with Capture([dk._picked_sums_kernel]) as cap:
            picked_pseudo_sums(st, ps, torch.empty(B, dtype=torch.int32), q=0.5, seed=1, epoch=0)
        for k, grid, args, kw in cap.calls:
            try_compile(f"picked {B}x{L}", k, args, kw)
    for n, dt in ((1, f32), (70_001, bf), (4096 * 600, f16)):
        try_compile(f"scale {n} {dt}", dk._scale_kernel, (torch.empty(n, dtype=dt), torch.empty(()), n, 4096),
                    dict(num_warps=8, num_stages=1))
    for name in ("_row_kernel", "_row1_kernel", "_split_fused_kernel"):
        for neg_focus in (False, True):
            if (name, neg_focus) not in kernels_seen:
                failed.append(f"coverage: {name} with NEG_FOCUS={neg_focus} is in no case of the matrix")
    print(f"compiled {ok} kernel variants for sm_90; {len(failed)} failed")
    if fingerprint_path:
        Path(fingerprint_path).write_text(json.dumps(prints, indent=1) + "\n")
    for f in failed:
        print("  FAIL", f)
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", help="measure the kernel file of this git revision instead of the working tree")
    ap.add_argument("--B", type=int, default=4096)
    ap.add_argument("--L", default="600,9605,100000", help="comma-separated label counts")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--all-candidates", action="store_true", help="every GPU tuning candidate, not just the default")
    ap.add_argument("--neg-focus", action="store_true",
                    help="the ours+ specialisation (neg_gamma/neg_margin on) instead of the paper's negative terms")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--dump", metavar="DIR", help="write each kernel's SASS and PTX here")
    ap.add_argument("--compile-check", action="store_true",
                    help="only compile every kernel variant (shapes, dtypes, layouts, flags) for sm_90")
    ap.add_argument("--fingerprint", metavar="PATH",
                    help="with --compile-check: write each variant's PTX/SASS hashes (debug info stripped) here")
    ap.add_argument("--lines", type=int, default=0, metavar="N",
                    help="also print the N source lines costing the most SASS per element")
    args = ap.parse_args(argv)
    if args.compile_check:
        return compile_check(args.fingerprint)
    dtype = DTYPES[args.dtype]
    results = []
    print(f"triton {triton.__version__}, target sm_90; B={args.B}, logits {args.dtype}, pseudo fp16")
    print("| L | config | SASS/elem | MUFU/elem | LDG+STG/elem | kernel: regs, spill B, SASS/elem |")
    print("|---:|:---|---:|---:|---:|:---|")
    for L in [int(x) for x in args.L.split(",")]:
        if args.rev:
            runs = [launches_rev(args.rev, args.B, L, dtype)]
        else:
            runs = launches_current(args.B, L, dtype, args.all_candidates, neg_focus=args.neg_focus)
        for label, calls, trips in runs:
            dump = Path(args.dump) / f"L{L}_{label.replace(':', '_')}" if args.dump else None
            r = measure(label, calls, trips, args.B * L, dump)
            r.update(B=args.B, L=L, dtype=args.dtype, rev=args.rev or "worktree")
            results.append(r)
            ks = "; ".join(f"{k['kernel']}: {k['regs']}, {k['local_bytes']}, {k['per_elem']}" for k in r["kernels"])
            print(f"| {L} | {label} | {r['per_elem']} | {r['mufu_per_elem']} | {r['mem_insn_per_elem']} | {ks} |",
                  flush=True)
            for k in r["kernels"] if args.lines else ():
                print(f"    {k['kernel']}: " + ", ".join(f"{ln} {v}" for ln, v in list(k["top_lines"].items())[:args.lines]))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(triton=triton.__version__, target="sm_90", results=results),
                                              indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
