"""Two ranks at Open Images' 9,605 classes (CSR labels, NATIVE), both pseudo.sync modes: a run
resumed from a mid-epoch checkpoint ends with the same mAP and pseudo store as the uninterrupted
run of the same world size."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_train import REPO, TRAIN, _free_port, env, write_config


@pytest.fixture(scope="module")
def oil(tmp_path_factory):
    from pml_scale.demo.openimages_like import build_openimages_like

    out = tmp_path_factory.mktemp("oil9605") / "data"
    build_openimages_like(out, num_classes=9605, n_train=128, n_test=64, size=16, shard_size=32, labels_form="csr")
    return out


def _torchrun(cfg, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(TRAIN), "--config", str(cfg), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["allgather", "affinity"])
def test_two_ranks_9605_classes_resume_mid_epoch_exactly(oil, tmp_path, sync):
    """Uninterrupted 2-rank run (checkpoint every step), then `latest` rewound to a mid-epoch
    checkpoint of the last epoch and the run started again: a resume from there must end where the
    first run ended. (This found that each rank's BatchNorm statistics must be checkpointed: DeepSpeed
    keeps rank 0's only, and rank 1 evaluates its share of the test set with its own.)"""
    extra = {"data": {"affinity": "shard"}, "pseudo": {"sync": "affinity"}} if sync == "affinity" else {}
    extra.setdefault("data", {}).update(setting="NATIVE", image_size=16, batch_size=16, eval_batch_size=32)
    cfg = write_config(tmp_path / "c.yaml", oil, tmp_path / "runs", eval={"partial": True},
                       run={"epochs": 2, "checkpoint_every_steps": 1, "keep_checkpoints": 100,
                            "deterministic": True}, **extra)
    _torchrun(cfg)
    run_dir = tmp_path / "runs" / "t"
    ref_summary = json.loads((run_dir / "summary.json").read_text())
    ref_store = np.fromfile(run_dir / "pseudo.f16", np.float16).copy()
    tags = sorted((p.name for p in (run_dir / "checkpoints").glob("step*")), key=lambda t: int(t[4:]))
    mid = tags[-2]  # a mid-epoch checkpoint of the last epoch: two batches before its end
    (run_dir / "checkpoints" / "latest").write_text(mid + "\n")
    for later in tags[tags.index(mid) + 1:] + ["epoch2"]:
        shutil.rmtree(run_dir / "checkpoints" / later)
    (run_dir / "summary.json").unlink()
    out = _torchrun(cfg)
    assert f"batch {int(mid[4:]) - 4}" in out.stdout and "resumed from" in out.stdout
    got = json.loads((run_dir / "summary.json").read_text())
    assert got["final_map"] == pytest.approx(ref_summary["final_map"], abs=1e-6)
    np.testing.assert_array_equal(np.fromfile(run_dir / "pseudo.f16", np.float16), ref_store)
    assert ref_store.size == 128 * 9605 and (ref_store != 0).mean() > 0.5  # the store did move
