"""Fault injection: what clusters do to a job, provoked for real and checked from outside.

Each case starts the real program in a subprocess (the way users run it), does to it what a
cluster does (a signal, a killed rank, a full disk, a failing helper thread, a shard changed
under a running job), then checks what the user sees (exit code, message) and that nothing is
lost: the rerun resumes and ends where an uninterrupted run ends. Every faulted process must exit
within ``EXIT_BOUND_S`` seconds of the fault; no other timing is asserted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_train import TRAIN, _free_port, env, read_pseudo, run_train, tiny_demo, write_config  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
EXIT_BOUND_S = 60


# ----------------------------------------------------------------------------------------------
# process helpers


def _proc_state(pid: int) -> str | None:
    """The kernel's state letter of ``pid`` (None: gone). A zombie ('Z') has stopped running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _running(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z", "X")


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (read from /proc: independent of the program under test)."""
    kids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(d.name))
    return kids


def _wait_until(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.01):
    """Poll ``cond()`` until it is truthy; fail naming ``what`` (and if ``proc`` ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}")
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _kill_leftovers(pids) -> None:
    """A failed test must not leave its orphans running (they would load the next tests)."""
    for pid in pids:
        if _running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------------------------------------
# 5. pml-shard convert: workers die with their parent


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """A csv list of 1500 identical 640x480 JPEGs: ~2 s of work on 2 workers with --max-side, long
    enough to kill the converter while its pool is busy."""
    root = tmp_path_factory.mktemp("conv")
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((640, 480), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    (root / "im").mkdir()
    rows = []
    for k in range(1500):
        (root / "im" / f"{k}.jpg").write_bytes(buf.getvalue())
        rows.append(f"im/{k}.jpg,{'a;b' if k % 2 else 'c'}\n")
    (root / "l.csv").write_text("path,positives\n" + "".join(rows))
    return root / "l.csv"


def _convert_cmd(listing: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pml_scale.data.shards.cli", "convert", "csv", "--train", str(listing), "-j", "2",
            "--shard-size", "16", "--max-side", "32", "-q", str(out)]


def _start_convert_and_wait_for_pool(listing: Path, out: Path, log: Path):
    """Start `pml-shard convert -j 2` (output to ``log``: a pipe would stay open in orphaned
    workers), return (process, worker pids) once both workers exist and the journal shows work
    done (the pool is busy)."""
    with open(log, "w") as f:
        # SIGINT back to its default in the child: a job started in the background of a
        # non-interactive shell (how CI may run us) inherits SIGINT ignored, and Python then never
        # raises KeyboardInterrupt, which is what the Ctrl-C test is about
        proc = subprocess.Popen(_convert_cmd(listing, out), cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    journal = out / ".progress.jsonl"

    def busy():
        kids = [k for k in _children(proc.pid) if _running(k)]
        started = journal.exists() and journal.read_text().count("\n") >= 2  # 'start' + one chunk checked
        return kids if len(kids) >= 2 and started else None

    try:
        workers = _wait_until(busy, 120, "the pool's two workers are busy", proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, workers


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_converter_workers_die_with_their_parent(many_images, tmp_path, sig):
    """kill -9 / kill -TERM to `pml-shard convert` mid-run: every pool worker stops within a second
    (before the fix they lived on, orphaned); after kill -9 the rerun resumes and `pml-shard
    verify` passes (SIGTERM kills the converter the same way: its rerun is not repeated)."""
    out = tmp_path / "out"
    proc, workers = _start_convert_and_wait_for_pool(many_images, out, tmp_path / "log")
    try:
        proc.send_signal(sig)
        proc.wait(timeout=EXIT_BOUND_S)
        assert proc.returncode == -sig
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(_running(w) for w in workers):
            time.sleep(0.02)
        alive = [w for w in workers if _running(w)]
        assert not alive, f"workers {alive} outlived their killed parent"
    finally:
        _kill_leftovers(workers)
    assert not (out / "manifest.json").exists(), "the conversion finished before it was killed"
    if sig != signal.SIGKILL:  # the same death for the workers: resuming is checked once
        return
    rerun = subprocess.run(_convert_cmd(many_images, out), cwd=REPO, capture_output=True, text=True,
                           timeout=EXIT_BOUND_S * 2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "train 1500 samples / 94 shards" in rerun.stdout
    ver = subprocess.run([sys.executable, "-m", "pml_scale.data.shards.cli", "verify", "-j", "1", "-q", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=EXIT_BOUND_S * 2)
    assert ver.returncode == 0 and "OK" in ver.stdout, ver.stderr[-3000:]


@pytest.mark.slow
def test_converter_ctrl_c_stops_cleanly(many_images, tmp_path):
    """Ctrl-C in a terminal = SIGINT to the whole foreground process group (parent and workers):
    the converter exits 130 with one line saying how to resume (no traceback from any process),
    no worker is left, and the rerun resumes to a folder `pml-shard verify` accepts."""
    out = tmp_path / "out"
    proc, workers = _start_convert_and_wait_for_pool(many_images, out, tmp_path / "log")
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=EXIT_BOUND_S)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(_running(w) for w in workers):
            time.sleep(0.02)
        alive = [w for w in workers if _running(w)]
    finally:
        _kill_leftovers(workers)
    err = (tmp_path / "log").read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted" in err and "rerun" in err, err[-3000:]
    assert not alive, f"workers {alive} still running after Ctrl-C"
    assert not (out / "manifest.json").exists(), "the conversion finished before Ctrl-C"
    rerun = subprocess.run(_convert_cmd(many_images, out), cwd=REPO, capture_output=True, text=True,
                           timeout=EXIT_BOUND_S * 2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ver = subprocess.run([sys.executable, "-m", "pml_scale.data.shards.cli", "verify", "-j", "1", "-q", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=EXIT_BOUND_S * 2)
    assert ver.returncode == 0, ver.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# training runs: one uninterrupted reference, faulted runs compared with it

FAULT_RUN = {"checkpoint_every_steps": 0, "deterministic": True, "tensorboard": False}


def _run_config(path: Path, root: Path, out: Path, **run) -> Path:
    """The faulted runs' config: 2 epochs of 6 steps on the tiny demo, checkpoints at epoch ends
    only (a mid-epoch checkpoint is then the fault handling's own), one log line per step."""
    return write_config(path, root, out, run={**FAULT_RUN, **run})


@pytest.fixture(scope="module")
def reference(tiny_demo, tmp_path_factory):
    """The uninterrupted run every faulted-then-resumed run must equal: (summary, pseudo store)."""
    tmp = tmp_path_factory.mktemp("reference")
    run_train(_run_config(tmp / "c.yaml", tiny_demo, tmp / "runs"))
    return _result(tmp / "runs" / "t", tiny_demo)


def _result(run_dir: Path, root: Path):
    shape = np.load(root / "observed" / "PAL_0.5_s0.npy", mmap_mode="r").shape
    return json.loads((run_dir / "summary.json").read_text()), read_pseudo(run_dir, shape)


def _assert_same_result(run_dir: Path, root: Path, reference) -> None:
    """Bit for bit on CPU: the final mAP and every pseudo label of the uninterrupted run."""
    summary, pseudo = _result(run_dir, root)
    assert summary["final_map"] == reference[0]["final_map"]
    assert summary["best_map"] == reference[0]["best_map"]
    np.testing.assert_array_equal(pseudo, reference[1])


def _train_steps(run_dir: Path) -> list[int]:
    """Steps with a train line in metrics.jsonl (log_every=1: every finished step)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if rec["kind"] == "train":
            steps.append(rec["step"])
    return steps


def _start_train(config: Path, log: Path, *overrides: str, session: bool = False) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, str(TRAIN), "--config", str(config), *overrides], cwd=REPO,
                                env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=session)


def _latest(run_dir: Path) -> str | None:
    path = run_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.exists() else None


# ----------------------------------------------------------------------------------------------
# 1. preemption


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_resumes_exactly(tiny_demo, reference, tmp_path):
    """SIGTERM mid-epoch (after step 2 of 6 logged) to the whole process group, as Slurm sends it
    (the trainer and its DataLoader worker): the run commits a checkpoint at the step it is in,
    exits 143 within the grace period; the rerun resumes from that step and ends bit for bit
    where the uninterrupted run ended."""
    cfg = write_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "runs", data={"workers": 1},
                       run={**FAULT_RUN, "preempt_grace_s": EXIT_BOUND_S})
    run_dir = tmp_path / "runs" / "t"
    step = _preempt_mid_epoch(cfg, run_dir, tmp_path / "log", group=True)
    out = run_train(cfg)
    assert f"resumed from {run_dir / 'checkpoints'} at epoch 0 batch {step}" in out.stdout
    _assert_same_result(run_dir, tiny_demo, reference)


def _sigterm_after_two_steps(proc: subprocess.Popen, run_dir: Path, group: bool = False) -> None:
    """SIGTERM ``proc`` (or its process group) once two training steps are logged, and wait for
    it within the exit bound; a process still alive after that is killed."""
    try:
        _wait_until(lambda: len(_train_steps(run_dir)) >= 2, 300, "two training steps", proc)
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=EXIT_BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()


def _preempt_mid_epoch(cfg: Path, run_dir: Path, log: Path, group: bool = False) -> int:
    """Start a run, SIGTERM it (or its whole process group) once two steps are logged; check it
    exited 143 within the bound with a checkpoint at the step it was in (mid first epoch).
    Returns that step."""
    from pml_scale.preemption import EXIT_PREEMPTED

    proc = _start_train(cfg, log, session=group)
    _sigterm_after_two_steps(proc, run_dir, group)
    text = log.read_text()
    assert proc.returncode == EXIT_PREEMPTED, text[-3000:]
    steps = _train_steps(run_dir)
    assert steps[-1] < 6, "the signal landed after the first epoch: not mid-epoch"
    assert _latest(run_dir) == f"step{steps[-1]}"  # the step it was in, not an earlier one
    assert "preempted" in text and "rerun" in text
    assert not (run_dir / "summary.json").exists()
    return steps[-1]


@pytest.mark.slow
def test_preemption_past_the_grace_period_exits_without_a_checkpoint(tiny_demo, tmp_path):
    """A grace period too short for any checkpoint (1 ms): the run exits 124 at its end instead of
    overstaying (the scheduler's SIGKILL would follow), saying so, and commits nothing."""
    from pml_scale.preemption import EXIT_GRACE_EXCEEDED

    cfg = _run_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "runs", preempt_grace_s=0.001)
    run_dir = tmp_path / "runs" / "t"
    proc = _start_train(cfg, tmp_path / "log")
    _sigterm_after_two_steps(proc, run_dir)
    log = (tmp_path / "log").read_text()
    assert proc.returncode == EXIT_GRACE_EXCEEDED, log[-3000:]
    assert "no checkpoint within run.preempt_grace_s=0.001 s" in log, log[-3000:]
    assert _latest(run_dir) is None


# ----------------------------------------------------------------------------------------------
# 4. the label-traffic thread fails

# pml-train with one store call failing for real inside the label thread: the Nth gather raises
# (an unreadable page), or the Nth scatter writes half its rows and then raises (a write error)
FAILING_STORE = '''
import sys
from pml_scale.labels.stores import PseudoLabelStore
from pml_scale.train import main

what, nth = sys.argv[1], int(sys.argv[2])
real = getattr(PseudoLabelStore, what)
calls = [0]

def failing(self, ids, *args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        if what == "scatter":  # half the rows land, then the write fails
            half = len(ids) // 2
            yhat, mask = args[0][:half], kwargs.pop("mask")[:half]
            real(self, ids[:half], yhat, mask=mask, **kwargs)
        raise OSError(5, f"injected I/O error in {what} call {nth}", str(self.path))
    return real(self, ids, *args, **kwargs)

setattr(PseudoLabelStore, what, failing)
sys.exit(main(sys.argv[3:]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("what", ["gather_numpy", "scatter"])
def test_label_thread_failure_stops_the_run_and_commits_nothing_half_written(tiny_demo, reference, tmp_path, what):
    """An exception inside the label thread at step 9 (epoch 2, after the epoch-1 checkpoint):
    the main loop raises it by the next step with the thread's traceback, the run exits non-zero
    in bounded time, no checkpoint is committed after it, and the rerun (half-written rows
    discarded with the live store) ends bit for bit where the uninterrupted run ended."""
    nth = 9  # one gather and one scatter per step: call 9 belongs to step 9
    cfg = _run_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "t"
    proc = subprocess.run([sys.executable, "-c", FAILING_STORE, what, str(nth), "--config", str(cfg)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert f"injected I/O error in {what} call {nth}" in err, err[-3000:]
    assert "labels/traffic.py" in err and ("_scatter" in err if what == "scatter" else "_gather" in err), err[-3000:]
    assert "LabelTrafficError: the label thread failed in the " in err, err[-3000:]
    steps = _train_steps(run_dir)
    # raised by the step after the one that queued the failed task: gather 9 is queued in step 8
    # (one ahead), scatter 9 in step 9 and raised in step 10, before its log line
    assert steps[-1] in ((nth - 2, nth - 1) if what == "gather_numpy" else (nth,)), steps
    assert _latest(run_dir) == "epoch1"
    if what != "scatter":  # only a scatter writes rows: resuming past a failed gather is the kill test's
        return
    out = run_train(cfg)
    assert "at epoch 1 batch 0" in out.stdout
    _assert_same_result(run_dir, tiny_demo, reference)


# ----------------------------------------------------------------------------------------------
# 3. disk full while writing a checkpoint or a store snapshot


def _file_size_limit(nbytes: int):
    """preexec_fn: no file of the child may grow beyond ``nbytes`` (writes fail with EFBIG; Python
    ignores SIGXFSZ): a full disk for one process, without root or a mount."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))

    return limit


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_checkpoint_that_does_not_fit_keeps_the_previous_one(tiny_demo, reference, tmp_path):
    """A committed step checkpoint (preemption), then a run whose files may not exceed 4 MB: the
    epoch-1 checkpoint (an 8 MB model file) fails. The error names the file, the bytes needed and
    free; the previous checkpoint is untouched and still `latest`, the cut one is gone; the rerun
    with room resumes from it and ends bit for bit where the uninterrupted run ended."""
    cfg = _run_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "t"
    step = _preempt_mid_epoch(cfg, run_dir, tmp_path / "log")
    prev = run_dir / "checkpoints" / f"step{step}"
    before = _digests(prev)
    needed = sum(p.stat().st_size for p in prev.iterdir())
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", str(cfg)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(4 << 20))
    err = proc.stderr
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "CheckpointWriteError: checkpoint epoch1 not written" in err, err[-3000:]
    model_file = prev / "mp_rank_00_model_states.pt"
    assert f"writing {run_dir / 'checkpoints' / 'epoch1' / model_file.name} failed (File too large" in err, err[-3000:]
    assert f"it needs {model_file.stat().st_size / 2**20:.1f} MiB" in err, err[-3000:]
    assert f"the whole checkpoint needs about {needed / 2**20:.1f} MiB ({needed} bytes)" in err, err[-3000:]
    assert "free there" in err and f"{prev} is intact" in err, err[-3000:]
    assert _latest(run_dir) == f"step{step}" and _digests(prev) == before
    assert not (run_dir / "checkpoints" / "epoch1").exists()
    out = run_train(cfg)
    assert f"at epoch 0 batch {step}" in out.stdout
    _assert_same_result(run_dir, tiny_demo, reference)


SNAPSHOT_UNDER_LIMIT = """
import sys
from pml_scale.labels.stores import PseudoLabelStore
store = PseudoLabelStore(sys.argv[1], 96, 80, create=False)
store.snapshot(sys.argv[2])
"""


def test_store_snapshot_that_does_not_fit_names_file_and_bytes(tmp_path):
    """The pseudo store's snapshot (15 KiB) under a 4 KiB file size limit: the error names the
    snapshot file and the 15360 bytes it needs, nothing is left at its path; with room it works."""
    import torch

    from pml_scale.labels.stores import PseudoLabelStore

    store = PseudoLabelStore(tmp_path / "pseudo.f16", 96, 80, create=True)
    store.scatter(torch.arange(96), torch.full((96, 80), 0.75))
    store.flush()
    dst = tmp_path / "ckpt" / "pseudo.f16"
    dst.parent.mkdir()
    proc = subprocess.run([sys.executable, "-c", SNAPSHOT_UNDER_LIMIT, str(store.path), str(dst)], cwd=REPO,
                          capture_output=True, text=True, timeout=EXIT_BOUND_S, preexec_fn=_file_size_limit(4096))
    assert proc.returncode != 0
    assert f"WriteFailed: writing the pseudo store snapshot {dst} failed (File too large: files may not exceed " \
           f"4.0 KiB (4096 bytes) here (ulimit -f)): it needs 15.0 KiB (15360 bytes)" in proc.stderr, proc.stderr[-3000:]
    assert list(dst.parent.iterdir()) == []  # no partial snapshot, no temp file
    store.snapshot(dst)
    assert dst.read_bytes() == store.path.read_bytes()


# ----------------------------------------------------------------------------------------------
# 6. a shard truncated or replaced under a run


@pytest.mark.slow
def test_shard_changed_under_a_run(tiny_demo, tmp_path):
    """A train shard truncated while the run trains: its lost samples are reported with shard and
    key, replaced and counted, the run finishes. Resuming (one more epoch) then names the shard:
    truncated (size differs from the manifest), or overwritten with the same size (sha256
    differs); once its original bytes are back (a new mtime) the run resumes."""
    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root)
    shard = root / "train-000001.tar"
    original = shard.read_bytes()
    cfg = _run_config(tmp_path / "c.yaml", root, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "t"
    proc = _start_train(cfg, tmp_path / "log")
    try:
        _wait_until(lambda: len(_train_steps(run_dir)) >= 2, 300, "two training steps", proc)
        with open(shard, "r+b") as f:  # in place, as a failing disk or a careless rsync would
            f.truncate(len(original) // 2)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "skipping bad sample: shard train-000001.tar, key 00000000" in log, log[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["skipped_samples"] > 0

    def resume_fails() -> str:
        p = subprocess.run([sys.executable, str(TRAIN), "--config", str(cfg), "run.epochs=3"], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=EXIT_BOUND_S * 3)
        assert p.returncode != 0, p.stdout[-2000:]
        return p.stderr

    err = resume_fails()
    assert f"{shard}: shard is {len(original) // 2} bytes, the manifest says {len(original)}" in err, err[-3000:]
    tampered = bytearray(original)
    tampered[len(original) // 2] ^= 0xFF  # same size, one byte inside an image changed
    shard.write_bytes(bytes(tampered))
    err = resume_fails()
    assert "ShardChangedError: 1 shard(s)" in err and f"{shard}: sha256 " in err, err[-3000:]
    shard.write_bytes(original)  # the original bytes, with a new mtime: no false alarm
    out = run_train(cfg, "run.epochs=3")
    assert "at epoch 2 batch 0" in out.stdout


# ----------------------------------------------------------------------------------------------
# 2 ranks (torchrun, gloo): SIGTERM to the job (case 1), and 2. a rank dies


def _torchrun(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), str(TRAIN), "--config", str(config), *overrides]


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v[5:]) for v in environ if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


TWO_RANKS = {"batch_size": 8}  # 2 x 8 per step: 6 steps per epoch, as the single-rank runs


@pytest.fixture(scope="module")
def reference2(tiny_demo, tmp_path_factory):
    """The uninterrupted 2-rank run (torchrun, gloo) the faulted 2-rank runs must equal."""
    tmp = tmp_path_factory.mktemp("reference2")
    cfg = write_config(tmp / "c.yaml", tiny_demo, tmp / "runs", run=FAULT_RUN, data=TWO_RANKS)
    proc = subprocess.run(_torchrun(cfg), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _result(tmp / "runs" / "t", tiny_demo)


@pytest.mark.slow
def test_sigterm_to_two_ranks_stops_both_at_the_same_step(tiny_demo, reference2, tmp_path):
    """SIGTERM to torchrun mid-epoch (it passes it to both ranks, which get it at different moments):
    the ranks agree on one step, commit one checkpoint there and exit 143 (each rank says so);
    the rerun ends bit for bit where the uninterrupted 2-rank run ends."""
    cfg = write_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "runs", run=FAULT_RUN, data=TWO_RANKS)
    run_dir = tmp_path / "runs" / "t"
    with open(tmp_path / "log", "w") as f:
        proc = subprocess.Popen(_torchrun(cfg), cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
    _sigterm_after_two_steps(proc, run_dir)
    log = (tmp_path / "log").read_text()
    steps = _train_steps(run_dir)
    assert steps[-1] < 6, "the signal landed after the first epoch: not mid-epoch"
    assert _latest(run_dir) == f"step{steps[-1]}", log[-3000:]
    assert log.count(f"preempted (SIGTERM): checkpoint step{steps[-1]} committed") == 2, log[-3000:]
    out = subprocess.run(_torchrun(cfg), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"at epoch 0 batch {steps[-1]}" in out.stdout
    _assert_same_result(run_dir, tiny_demo, reference2)


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_it_resumes_exactly(tiny_demo, reference2, tmp_path):
    """torchrun, 2 gloo ranks, a step checkpoint every 2 steps: kill -9 of rank 1 once step 2 is
    committed. The surviving rank and torchrun exit non-zero within the bound (no hang at a
    collective), naming rank 1; the committed checkpoint is intact and the rerun ends bit for
    bit where an uninterrupted 2-rank run ends."""
    cfg = write_config(tmp_path / "c.yaml", tiny_demo, tmp_path / "runs", run={**FAULT_RUN, "checkpoint_every_steps": 2},
                       data=TWO_RANKS)
    run_dir = tmp_path / "runs" / "t"
    with open(tmp_path / "log", "w") as f:
        proc = subprocess.Popen(_torchrun(cfg), cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
    ranks = {}
    try:
        _wait_until(lambda: _latest(run_dir) == "step2", 300, "checkpoint step2", proc)
        ranks = {_rank_of(k): k for k in _children(proc.pid)}
        assert set(ranks) >= {0, 1}, ranks
        committed = _digests(run_dir / "checkpoints" / "step2")
        os.kill(ranks[1], signal.SIGKILL)
        t_kill = time.monotonic()
        proc.wait(timeout=EXIT_BOUND_S)
        _wait_until(lambda: not _running(ranks[0]), EXIT_BOUND_S - (time.monotonic() - t_kill), "rank 0 exits")
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_leftovers(ranks.values())
    log = (tmp_path / "log").read_text()
    assert proc.returncode != 0
    assert not (run_dir / "summary.json").exists(), "the run finished before rank 1 was killed"
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", log) and "SIGKILL" in log, log[-3000:]
    latest = _latest(run_dir)
    if latest == "step2":  # a later checkpoint may have been committed before the kill landed
        assert _digests(run_dir / "checkpoints" / "step2") == committed
    out = subprocess.run(_torchrun(cfg), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout
    _assert_same_result(run_dir, tiny_demo, reference2)

