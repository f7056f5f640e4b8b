"""The training engine end to end on CPU: a real DeepSpeed engine on gloo, real shards, real
JPEGs. Each run is a subprocess (the way users start it), on a tiny demo dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import requires_cuda

REPO = Path(__file__).resolve().parent.parent


def _dali_importable() -> bool:
    from pml_scale.data.input import dali_importable

    return dali_importable()


needs_dali = pytest.mark.skipif(not _dali_importable(), reason="nvidia-dali not importable")
TRAIN = REPO / "launch" / "train.py"


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    from pml_scale.demo.digits import build_demo

    root = tmp_path_factory.mktemp("demo") / "data"
    build_demo(root, seed=0, n_train=96, n_test=48, size=32, shard_size=32, pretrain=False)
    return root


def write_config(path: Path, root: Path, out: Path, **sections) -> Path:
    cfg = {
        "run": {"name": "t", "out_dir": str(out), "seed": 0, "epochs": 2, "log_every": 1, "eval_every": 1},
        "data": {"root": str(root), "setting": "PAL_0.5", "backend": "pil", "image_size": 32, "batch_size": 16,
                 "eval_batch_size": 24, "workers": 0},
        "model": {"name": "tiny_resnet", "dtype": "fp32", "channels_last": False},
        "loss": {"name": "paper"},
        "optim": {"lr": 0.003, "warmup_epochs": 0.5},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def run_train(config: Path, *overrides: str, timeout=600, extra_env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", str(config), *overrides], cwd=REPO,
                          env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def read_pseudo(run_dir: Path, shape) -> np.ndarray:
    return np.fromfile(run_dir / "pseudo.f16", dtype=np.float16).reshape(shape).astype(np.float32) + 0.5


def test_single_process_run_writes_the_contract_files(tiny_demo, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "runs")
    ext = tmp_path / "torch_extensions"
    run_train(config, extra_env={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert not ext.exists() or not any(ext.iterdir()), "DeepSpeed JIT-compiled an op at run time"
    run_dir = tmp_path / "runs" / "t"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 < summary["final_map"] <= 1.0 and summary["epochs"] == 2
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [l for l in lines if l["kind"] == "eval"]
    assert [e["epoch"] for e in evals] == [0, 1]
    train = [l for l in lines if l["kind"] == "train"]
    assert all(0.0 < l["beta"] < 1.0 and abs(l["alpha"] + l["beta"] - 1) < 1e-6 for l in train)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["data"]["setting"] == "PAL_0.5"
    per_class = json.loads((run_dir / "per_class_ap.json").read_text())
    assert len(per_class["ap"]) == 80
    # pseudo labels moved away from 0.5 on missing entries only; observed entries never written
    observed = np.load(tiny_demo / "observed" / "PAL_0.5_s0.npy")
    pseudo = read_pseudo(run_dir, observed.shape)
    assert np.all(pseudo[observed != -1] == 0.5)
    assert np.mean(pseudo[observed == -1] != 0.5) > 0.9


@pytest.mark.parametrize("backend, snapshot", [("pil", "versioned"), ("pil", "copy"),
                                               pytest.param("dali_cpu", "versioned", marks=needs_dali)])
def test_kill_and_resume_gives_the_same_result(tiny_demo, tmp_path, backend, snapshot):
    """SIGKILL mid-epoch, start again: the same final mAP and pseudo labels as an uninterrupted run.
    With dali_cpu the loader keeps one pipeline per run; the resumed run starts it at the saved
    batch (flips are per sample id, so the pixels are the same too). pseudo.snapshot=versioned
    checkpoints hold bitmaps only, =copy a copy of the store."""
    data = {"backend": backend, "workers": 0 if backend == "pil" else 1}
    pseudo = {"snapshot": snapshot}
    ref_cfg = write_config(tmp_path / "ref.yaml", tiny_demo, tmp_path / "ref", run={"checkpoint_every_steps": 2,
                                                                                    "deterministic": True}, data=data,
                           pseudo=pseudo)
    run_train(ref_cfg)
    cfg = write_config(tmp_path / "k.yaml", tiny_demo, tmp_path / "kill", run={"checkpoint_every_steps": 2,
                                                                               "deterministic": True}, data=data,
                       pseudo=pseudo)
    proc = subprocess.Popen([sys.executable, str(TRAIN), "--config", str(cfg)], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "kill" / "t" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() == "step4":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "kill" / "t" / "summary.json").exists()
    out = run_train(cfg)
    assert "resumed from" in out.stdout
    ref = json.loads((tmp_path / "ref" / "t" / "summary.json").read_text())
    got = json.loads((tmp_path / "kill" / "t" / "summary.json").read_text())
    assert got["final_map"] == pytest.approx(ref["final_map"], abs=1e-6)
    shape = np.load(tiny_demo / "observed" / "PAL_0.5_s0.npy", mmap_mode="r").shape
    np.testing.assert_array_equal(read_pseudo(tmp_path / "kill" / "t", shape), read_pseudo(tmp_path / "ref" / "t", shape))
    ckpts = [p for p in (tmp_path / "kill" / "t" / "checkpoints").iterdir() if p.is_dir()]
    copies = [p for c in ckpts for p in c.glob("pseudo*.f16")]
    assert ckpts and (not copies if snapshot == "versioned" else len(copies) == len(ckpts))


@pytest.mark.parametrize("sync", ["allgather", "affinity"])
def test_two_ranks_keep_every_pseudo_row(tiny_demo, tmp_path, sync):
    """torchrun, 2 CPU ranks on gloo: after training, every pseudo row equals the ŷ that whichever rank
    trained the sample last computed (dumped by the trainer's debug hook), on its missing entries.
    allgather: every rank writes every row; affinity: shards stay on their rank, each writes its own."""
    dump = tmp_path / "dump"
    extra = {"data": {"affinity": "shard"}, "pseudo": {"sync": "affinity"}} if sync == "affinity" else {}
    cfg = write_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "runs", run={"epochs": 2}, **extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(TRAIN), "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(PML_DEBUG_DUMP_UPDATES=str(dump)), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    observed = np.load(tiny_demo / "observed" / "PAL_0.5_s0.npy")
    expected = np.full(observed.shape, 0.5, np.float32)
    seen_by_rank = {0: set(), 1: set()}
    for f in sorted(dump.glob("*.npz"), key=lambda p: (int(p.stem.split("-")[1]), int(p.stem.split("-")[2]))):
        d = np.load(f)
        rank = int(f.stem.split("-")[2])
        expected[d["ids"]] = d["yhat"]
        seen_by_rank[rank].update(d["ids"].tolist())
    pseudo = read_pseudo(tmp_path / "runs" / "t", observed.shape)
    missing = observed == -1
    np.testing.assert_allclose(pseudo[missing], expected[missing], atol=1e-3)
    assert seen_by_rank[0] and seen_by_rank[1]
    if sync == "affinity":  # a sample is always trained on the rank that owns its shard
        assert not (seen_by_rank[0] & seen_by_rank[1])


def test_bad_config_key_fails_before_training(tiny_demo, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "runs")
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", str(config), "optim.lr_decay=3"], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "lr_decay" in proc.stderr and "weight_decay" in proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_launcher_two_nodes_on_loopback(tiny_demo, tmp_path):
    """`deepspeed --no_ssh --node_rank k` twice on this machine = a 2-node job; each "node" keeps
    its pseudo-label store in its own folder. With all-gather sync both stores end identical and
    equal to what the ranks computed."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    dump = tmp_path / "dump"
    cfg = write_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "runs", run={"epochs": 1})
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port, str(TRAIN),
               "--config", str(cfg), f"pseudo.dir={tmp_path / f'node{node}'}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env(PML_DEBUG_DUMP_UPDATES=str(dump)),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]
    observed = np.load(tiny_demo / "observed" / "PAL_0.5_s0.npy")
    stores = [read_pseudo(tmp_path / f"node{n}", observed.shape) for n in (0, 1)]
    np.testing.assert_array_equal(stores[0], stores[1])
    expected = np.full(observed.shape, 0.5, np.float32)
    ranks = set()
    for f in dump.glob("*.npz"):
        d = np.load(f)
        expected[d["ids"]] = d["yhat"]
        ranks.add(int(f.stem.split("-")[2]))
    assert ranks == {0, 1}
    missing = observed == -1
    np.testing.assert_allclose(stores[0][missing], expected[missing], atol=1e-3)


def test_every_registered_loss_trains_through_the_engine(tiny_demo, tmp_path):
    """Each loss of the registry (the paper's and every baseline, ROLE with its estimator store)
    runs one epoch through the real engine, with finite loss and a scored evaluation."""
    from pml_scale.losses import loss_names

    config = write_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "runs", run={"epochs": 1})
    script = (
        "import json, sys\n"
        "from pml_scale.config import load_config\n"
        "from pml_scale.train import run\n"
        "out = {}\n"
        "for name in sys.argv[2:]:\n"
        "    s = run(load_config(sys.argv[1], [f'loss.name={name}', f'run.name={name}', 'run.tensorboard=false']))\n"
        "    out[name] = s['final_map']\n"
        "print('RESULT', json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(config), *loss_names()], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert sorted(result) == sorted(loss_names())
    for name, m_ap in result.items():
        assert 0.0 < m_ap <= 1.0, (name, m_ap)
        lines = [json.loads(l) for l in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert all(np.isfinite(l["loss"]) for l in lines if l["kind"] == "train"), name
    role = np.fromfile(tmp_path / "runs" / "role" / "role.f32", dtype=np.float32)
    assert np.isfinite(role).all()


@pytest.mark.parametrize("precision", ["autocast", "deepspeed"])
def test_bf16_channels_last_run_and_resume_with_more_epochs(tiny_demo, tmp_path, precision):
    """The GPU-typical paths on CPU: bf16 autocast with fp32 channels_last master weights (the
    default), or DeepSpeed's bf16 mode (bf16 NCHW weights); channels_last inputs, bf16 logits into
    the loss. Starting again with more epochs continues from the last checkpoint."""
    import torch

    config = write_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "runs", run={"epochs": 1},
                          model={"dtype": "bf16", "channels_last": True, "precision": precision})
    run_train(config)
    out = run_train(config, "run.epochs=2")
    assert "resumed from" in out.stdout and "at epoch 1 batch 0" in out.stdout
    lines = [json.loads(l) for l in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines if l["kind"] == "eval"] == [0, 1]
    assert all(np.isfinite(l["loss"]) for l in lines if l["kind"] == "train")
    weights = torch.load(tmp_path / "runs" / "t" / "best.pt", map_location="cpu")
    convs = [w for k, w in weights.items() if w.ndim == 4 and w.shape[1] > 1 and w.shape[2] > 1]
    assert convs
    if precision == "autocast":
        assert all(w.dtype == torch.float32 and w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    else:
        assert all(w.dtype == torch.bfloat16 and w.is_contiguous() for w in convs)
    epochs = [l for l in lines if l["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1] and all(e["images"] > 0 and e["epoch_img_s"] > 0 for e in epochs)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("loss", [
    pytest.param("an", marks=pytest.mark.xfail(strict=True, reason=(
        "H100, 2026-11-27, PIL backend: one sync warning per run surfaces from the call that turns the "
        "debug mode on (torch/cuda/__init__.py set_sync_debug_mode, train.py hot-loop entry), with no "
        "frame of ours below it; 'paper' shows none. Unexplained: see the closing note of issue #11"))),
    "paper"])
def test_hot_loop_never_waits_on_the_gpu(tiny_demo, tmp_path, loss):
    """torch's sync debug mode around every hot-loop iteration (PML_SYNC_DEBUG, the trainer's test
    hook: every step but the first, logging steps and checkpoints) of a real bf16-autocast,
    channels_last run on the DALI GPU backend: no host<->device synchronisation may happen in our
    code (loader, label traffic, step) nor in DeepSpeed's. Losses are the lead's: for 'paper' the
    sites inside pml_scale/losses are reported, not failed on (its statistics read a value)."""
    import traceback
    import warnings

    import torch

    from pml_scale.config import load_config
    from pml_scale.train import run

    if loss == "paper" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton interpreter copies CUDA tensors to the host: run with TRITON_INTERPRET=0")
    backend = "dali" if _dali_importable() else "pil"
    config = write_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "runs",
                          run={"epochs": 2, "log_every": 1000, "eval_every": 0, "tensorboard": False},
                          data={"backend": backend, "workers": 2},
                          model={"dtype": "bf16", "channels_last": True, "precision": "autocast"},
                          loss={"name": loss})
    sites, stacks = [], []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            stack = [f for f in traceback.extract_stack()[:-2] if "warnings.py" not in f.filename]
            ours = [f"{Path(f.filename).name}:{f.lineno}" for f in stack if "pml_scale" in f.filename
                    or "deepspeed" in f.filename or "torch/optim" in f.filename][-3:]
            sites.append((f"{filename}:{lineno}", tuple(ours)))
            stacks.append("\n".join(f"{f.filename}:{f.lineno} {f.name}" for f in stack[-8:]))

    old_env = os.environ.get("PML_SYNC_DEBUG")
    os.environ["PML_SYNC_DEBUG"] = "warn"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            summary = run(load_config(config, ["run.name=sync"]))
    finally:
        torch.cuda.set_sync_debug_mode(0)
        if old_env is None:
            os.environ.pop("PML_SYNC_DEBUG", None)
        else:
            os.environ["PML_SYNC_DEBUG"] = old_env
    assert summary and 0.0 < summary["final_map"] <= 1.0
    outside_losses = sorted({s for s in sites if "/losses/" not in s[0]}, key=str)
    inside_losses = sorted({s for s in sites if "/losses/" in s[0]}, key=str)
    print(f"sync sites inside pml_scale/losses ({loss}): {inside_losses}")
    assert not outside_losses, f"host syncs in the hot loop: {outside_losses}; stacks:\n" + "\n--\n".join(stacks[:3])
    if loss == "an":
        assert not inside_losses, f"host syncs in the 'an' loss: {inside_losses}"
