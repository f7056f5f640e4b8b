"""``model.compile=true`` on CPU (inductor's C++ backend): the compiled run matches the eager one
step by step within fp32 tolerance, draws the same picks, and resumes from its checkpoint (state
dict keys are the eager model's: DeepSpeed compiles the module in place)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from test_train import run_train, tiny_demo, write_config  # noqa: F401  (tiny_demo is a fixture)


def _records(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [l for l in lines if l["kind"] == "train"], [l for l in lines if l["kind"] == "eval"]


def _pseudo(run_dir):
    return np.fromfile(run_dir / "pseudo.v1.f16", dtype=np.float16).astype(np.float32)


def test_compiled_run_matches_eager_and_resumes(tiny_demo, tmp_path):
    run = {"epochs": 2, "checkpoint_every_steps": 2, "keep_checkpoints": 100}
    eager_cfg = write_config(tmp_path / "e.yaml", tiny_demo, tmp_path / "eager", run=run)
    run_train(eager_cfg)
    cfg = write_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "comp", run=run, model={"compile": True})
    first = run_train(cfg, timeout=900)
    assert "model compiled (torch.compile, mode default)" in first.stdout
    run_dir = tmp_path / "comp" / "t"
    (e_train, e_eval), (c_train, c_eval) = _records(tmp_path / "eager" / "t"), _records(run_dir)
    assert [r["step"] for r in c_train] == [r["step"] for r in e_train]
    # inductor fuses and reorders fp32 arithmetic: last-bit differences, which training then carries
    np.testing.assert_allclose([r["loss"] for r in c_train], [r["loss"] for r in e_train], rtol=1e-4)
    assert [r["picked_share"] for r in c_train] == [r["picked_share"] for r in e_train]  # the same q% picks
    np.testing.assert_allclose([r["map"] for r in c_eval], [r["map"] for r in e_eval], atol=2e-3)
    # one fp16 step at 0.5 is 4.9e-4: ŷ of the compiled model within a few steps of the eager one's
    np.testing.assert_allclose(_pseudo(run_dir), _pseudo(tmp_path / "eager" / "t"), atol=2e-3)
    eager_w = torch.load(tmp_path / "eager" / "t" / "best.pt", map_location="cpu")
    comp_w = torch.load(run_dir / "best.pt", map_location="cpu")
    assert list(comp_w) == list(eager_w)  # no "_orig_mod." prefix: checkpoints load into an eager model

    # resume a compiled run mid-epoch (a new process compiles again): it ends where it ended
    ref_summary, ref_store = json.loads((run_dir / "summary.json").read_text()), _pseudo(run_dir)
    tags = sorted((p.name for p in (run_dir / "checkpoints").glob("step*")), key=lambda t: int(t[4:]))
    mid = tags[-1]  # the last epoch's mid-epoch checkpoint
    (run_dir / "checkpoints" / "latest").write_text(mid + "\n")
    shutil.rmtree(run_dir / "checkpoints" / "epoch2")
    (run_dir / "summary.json").unlink()
    resumed = run_train(cfg, timeout=900)
    assert "resumed from" in resumed.stdout and "at epoch 1 batch" in resumed.stdout
    got = json.loads((run_dir / "summary.json").read_text())
    assert got["final_map"] == pytest.approx(ref_summary["final_map"], abs=1e-6)
    np.testing.assert_array_equal(_pseudo(run_dir), ref_store)


def test_compile_mode_is_checked_by_the_config(tmp_path):
    from pml_scale.config import load_config

    with pytest.raises(Exception, match="compile_mode"):
        load_config(None, ["model.compile_mode=fastest"])
