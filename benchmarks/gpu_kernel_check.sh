#!/usr/bin/env bash
# Every GPU target of issue #12 in one go (about 3-4 min on one H100/H200), written to OUT:
#   1. benchmarks/loss_kernel.py --quick: eager vs torch.compile vs the fused kernel, fwd+bwd,
#      host time per call, % of copy bandwidth, peak memory; the targets judged at the end
#      (loss_kernel.md, loss_kernel.json, loss_kernel.log);
#   2. the compiled-kernel tests (pytest -m gpu) against the float64 reference (kernel_tests.log);
#   3. where the host time of one call goes: cProfile of forward and of fwd+bwd (host_profile.txt).
#
#   benchmarks/gpu_kernel_check.sh OUT        # PYTHON=... picks another interpreter (default python3)
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_kernel_check.sh OUT_DIR}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
status=0
timeout -k 10 "${T_BENCH:-260}" $PY benchmarks/loss_kernel.py --quick --json "$OUT/loss_kernel.json" \
  --out "$OUT/loss_kernel.md" > "$OUT/loss_kernel.log" 2>&1 || status=1
tail -n 40 "$OUT/loss_kernel.log"
TRITON_INTERPRET=0 timeout -k 10 "${T_TEST:-120}" $PY -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_kernel_fused_paths.py tests/test_kernel_partial_label.py > "$OUT/kernel_tests.log" 2>&1 || status=1
tail -n 5 "$OUT/kernel_tests.log"
{ timeout -k 5 60 $PY benchmarks/kernel_host_profile.py --calls 2000 --top 20
  timeout -k 5 60 $PY benchmarks/kernel_host_profile.py --calls 1000 --top 20 --step
  echo "=== with direct launches (PML_KERNEL_FAST_LAUNCH=1)"
  PML_KERNEL_FAST_LAUNCH=1 timeout -k 5 60 $PY benchmarks/kernel_host_profile.py --calls 2000 --top 20
  PML_KERNEL_FAST_LAUNCH=1 timeout -k 5 60 $PY benchmarks/kernel_host_profile.py --calls 1000 --top 20 --step
} > "$OUT/host_profile.txt" 2>&1 || status=1
grep "µs host per call" "$OUT/host_profile.txt"
exit $status
