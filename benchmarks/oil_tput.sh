#!/bin/bash
# Trainer img/s at 600 vs 9,605 labels (issue 17, item 6): the same number and size of images,
# the same config (configs/openimages_like.yaml: tiny_resnet, 48 px, batch 64, PIL, the paper's
# loss, NATIVE), 2 epochs, no validation split, evaluation only at the end; runs in ABAB order so
# that both label counts see the same neighbours on a shared machine. Read `steady_img_s` of the
# epoch-1 (second) `kind: epoch` record and the `time_share` records of runs/tput/*/metrics.jsonl.
#   bash benchmarks/oil_tput.sh            (from the repo root; ~3 min on a quiet 2-core machine)
set -e
export OMP_NUM_THREADS=1
PY=${PY:-python}
for L in 600 9605; do
  [ -f data/tput$L/manifest.json ] || pml-shard demo data/tput$L --dataset openimages-like --classes $L \
      --n-train 3072 --n-test 512 --size 48 --labels-form csr -j 1 -q
done
for rep in 1 2 3; do
  for L in 600 9605; do
    $PY launch/train.py --config configs/openimages_like.yaml data.root=data/tput$L data.val_fraction=0 \
      run.epochs=2 run.eval_every=0 run.log_every=8 run.resume=false run.name=tput${L}_r$rep run.out_dir=runs/tput > runs/tput_${L}_r$rep.log 2>&1
  done
done
$PY - <<'PY'
import json, glob
for f in sorted(glob.glob("runs/tput/*/metrics.jsonl")):
    recs = [json.loads(l) for l in open(f)]
    ep = [r for r in recs if r["kind"] == "epoch"][-1]
    sh = [r for r in recs if r["kind"] == "time_share"][-1]
    print(f.split("/")[2], f"steady {ep['steady_img_s']:.1f} img/s", {k: round(v, 3) for k, v in sh.items()
          if k not in ("kind", "step", "epoch", "time")})
PY
