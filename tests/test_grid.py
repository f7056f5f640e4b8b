"""Grid runner: spec expansion, commands, resume after failure, parallel slots, Ctrl-C, reports.

The trainer is simulated by a small script written here: it honours the trainer's contract
(run folder with config.yaml, metrics.jsonl, per_class_ap.json, summary.json last) and fails
for the cells named in a file, so the tests control failures between invocations."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pml_scale import grid

REPO = Path(__file__).resolve().parents[1]

FAKE_TRAIN = textwrap.dedent('''
    import fnmatch, json, os, sys, time, zlib
    args = sys.argv[1:]
    assert args[0] == "--config", args
    config = args[1]
    kv = dict(a.split("=", 1) for a in args[2:])
    name, out = kv["run.name"], kv["run.out_dir"]
    here = os.path.dirname(os.path.abspath(__file__))
    if os.environ.get("FAKE_IGNORE_SIGINT"):  # before "start" is logged: the test acts on that line
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    t0 = time.time()
    with open(os.path.join(here, "calls.log"), "a") as f:
        f.write(f"start {name} {t0:.3f} {os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}\\n")
    run = os.path.join(out, name)
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        json.dump({"config": config, **kv}, f)
    time.sleep(float(os.environ.get("FAKE_PREP", "0")))  # "building the data", before metrics.jsonl
    fail = os.path.join(here, "fail.txt")
    if os.path.exists(fail) and any(fnmatch.fnmatch(name, p) for p in open(fail).read().split()):
        print("simulated crash", flush=True)
        sys.exit(3)
    with open(os.path.join(here, "calls.log"), "a") as f:  # logged first: "ready" <= what the runner sees
        f.write(f"ready {name} {time.time():.3f}\\n")
    open(os.path.join(run, "metrics.jsonl"), "w").close()
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))  # "training"
    method, seed = kv["loss.name"], int(kv["run.seed"])
    base = {"paper": 0.70, "asl": 0.60, "an": 0.50, "bce": 0.65}.get(method, 0.55)
    final = base + 0.01 * seed
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        for e in range(3):
            for s in range(4):
                rec = {"kind": "train", "epoch": e, "step": 4 * e + s, "loss": 1.0 / (1 + 4 * e + s), "lr": 1e-3}
                if method == "paper":
                    rec.update(alpha=0.9, beta=0.1, d=0.5 + 0.1 * e, p2_share=0.3 / (1 + e))
                f.write(json.dumps(rec) + "\\n")
            f.write(json.dumps({"kind": "eval", "epoch": e, "map": final - 0.02 * (2 - e), "num_classes_scored": 6}) + "\\n")
    h = zlib.crc32(name.encode())
    with open(os.path.join(run, "per_class_ap.json"), "w") as f:
        json.dump({"ap": [None] + [((h >> k) % 100) / 100 for k in range(5)], "class_freq": [0, 1, 5, 20, 80, 300],
                   "classes": list("abcdef")}, f)
    with open(os.path.join(run, "summary.json"), "w") as f:
        json.dump({"final_map": final, "best_map": final, "best_epoch": 2, "epochs": 3, "loss": method,
                   "setting": kv["data.setting"], "seed": seed, "dataset": "toy", "wall_s": time.time() - t0}, f)
    with open(os.path.join(here, "calls.log"), "a") as f:
        f.write(f"end {name} {time.time():.3f}\\n")
''')


@pytest.fixture
def toy(tmp_path):
    """A spec with 2 datasets x 2 settings x 3 methods x 2 seeds, minus BCE outside FAL = 20 cells."""
    (tmp_path / "methods").mkdir()
    for m, loss in (("bce", "bce"), ("asl", "asl"), ("ours", "paper")):
        (tmp_path / "methods" / f"{m}.yaml").write_text(f"label: {m.upper()}\noverrides: [loss.name={loss}]\n")
    (tmp_path / "ds").mkdir()
    for d in ("a", "b"):
        (tmp_path / "ds" / f"{d}.yaml").write_text("run: {epochs: 3}\n")
    (tmp_path / "grids").mkdir()
    spec = tmp_path / "grids" / "toy.yaml"
    spec.write_text(textwrap.dedent("""
        name: toy
        datasets:
          a: ../ds/a.yaml
          b: {config: ../ds/b.yaml, label: Bee, overrides: [data.batch_size=8]}
        settings: [FAL, PAL_0.5]
        methods: [bce, asl, ours]
        methods_dir: ../methods
        seeds: [0, 1]
        overrides: [run.epochs=3]
        exclude:
          - {method: bce, setting: "!FAL"}
        tables:
          - {title: PAL, settings: [PAL_0.5], reference: [bce]}
    """))
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    return tmp_path


def _train_cmd(toy):
    return f"{sys.executable} {toy / 'fake_train.py'}"


def _calls(toy):
    p = toy / "calls.log"
    return [l.split() for l in p.read_text().splitlines()] if p.exists() else []


# ---------------------------------------------------------------------------------- expansion

def test_expand_counts_names_and_exclusions(toy):
    spec = grid.load_spec(toy / "grids" / "toy.yaml")
    cells = grid.expand(spec)
    names = [c.name for c in cells]
    assert len(cells) == 2 * (2 * 2 * 2 + 1 * 2) == 20
    assert len(set(names)) == 20
    assert names[:3] == ["a-FAL-bce-s0", "a-FAL-bce-s1", "a-FAL-asl-s0"]
    assert "a-PAL_0.5-bce-s0" not in names and "b-PAL_0.5-ours-s1" in names
    assert spec.datasets["a"].label == "a" and spec.datasets["b"].label == "Bee"
    assert spec.methods["ours"].overrides == ["loss.name=paper"]


@pytest.mark.parametrize("rule,cell,excluded", [
    ({"method": ["bce"], "setting": ["!FAL"]}, ("d", "PAL_0.3", "bce", 0), True),
    ({"method": ["bce"], "setting": ["!FAL"]}, ("d", "FAL", "bce", 0), False),
    ({"method": ["bce*"]}, ("d", "FAL", "bce_ls", 0), True),
    ({"method": ["ours_no_*"], "setting": ["!PAL_0.6", "!PPL_0.6"]}, ("d", "PPL_0.6", "ours_no_d", 0), False),
    ({"method": ["ours_no_*"], "setting": ["!PAL_0.6", "!PPL_0.6"]}, ("d", "SPL", "ours_no_d", 0), True),
    ({"setting": ["PAL_*", "!PAL_0.6"]}, ("d", "PAL_0.3", "x", 0), True),
    ({"setting": ["PAL_*", "!PAL_0.6"]}, ("d", "PAL_0.6", "x", 0), False),
    ({"seed": ["1", "2"]}, ("d", "FAL", "x", 2), True),
    ({"seed": ["1", "2"]}, ("d", "FAL", "x", 0), False),
])
def test_exclude_rule_semantics(rule, cell, excluded):
    assert grid.is_excluded(grid.Cell(*cell), [rule]) is excluded


SHIPPED = {  # hand-counted from the paper's tables
    "table3_fal": 3 * 5,                          # 3 datasets x {BCE, BCE-LS, Focal, ASL, Ours}
    "table4_pal": 3 * (2 + 6 * 3),                # BCE/BCE-LS on FAL + 6 methods x 3 PAL ratios
    "table5_ppl": 3 * (2 + 6 * 3),
    "table6_spl": 3 * (2 + 4),                    # BCE/BCE-LS on FAL + AN, WAN, ROLE, Ours on SPL
    "table7_ablation": 2 * 2 * 5,                 # COCO, NUS x PAL_0.6, PPL_0.6 x Ours + 4 ablations
    "openimages": 5,
    "demo": 3 * (7 * 8 + 1 + 4 * 2),              # seeds x (7 methods x 8 settings + BCE FAL + ablation)
    "longtail": 5 * (3 + 3 + 1),                  # 5 methods x (PAL, PPL at 3 seeds + SPL at seed 0)
    "ablation_demo": 5,
    "final": 3 * (6 * 3 + 2),                     # seeds x (6 methods x 3 partial settings + BCE, ours on FAL)
}


@pytest.mark.parametrize("name,count", sorted(SHIPPED.items()))
def test_shipped_grids_expand(name, count):
    spec = grid.load_spec(REPO / "configs" / "grids" / f"{name}.yaml")
    cells = grid.expand(spec)
    assert len(cells) == count
    assert len({c.name for c in cells}) == count
    for c in cells:
        assert c.method not in ("bce", "bce_ls") or c.setting in ("FAL", "NATIVE")
        # the paper's Table VII uses PAL_0.6 / PPL_0.6; ablation_demo runs the demo's PPL_0.3
        assert not c.method.startswith("ours_no_") or c.setting in ("PAL_0.6", "PPL_0.6") or name == "ablation_demo"
        assert spec.datasets[c.dataset].config.is_file()


def test_shipped_methods_set_a_loss():
    for path in sorted((REPO / "configs" / "methods").glob("*.yaml")):
        m = grid.load_method(path.parent, path.stem)
        assert m.overrides[0].startswith("loss.name="), path
        assert all("=" in o for o in m.overrides)


@pytest.mark.parametrize("patch,match", [
    ({"settings": "[FAL, PAL_3]"}, r"toy.yaml: settings: 'PAL_3' is not a setting; accepted: FAL, SPL"),
    ({"methods": "[bce, nope]"}, r"method 'nope': no file .*nope.yaml \(methods there: asl, bce, ours\)"),
    ({"overrides": "[run.seed=3]"}, r"toy.yaml: overrides: 'run.seed=3' sets run.seed, which the grid runner"),
    ({"overrides": "[epochs=3]"}, r"toy.yaml: overrides: 'epochs=3' is not a dotted override"),
    ({"seeds": "[0, 0]"}, r"toy.yaml: seeds: expected a list of distinct"),
    ({"methods": "[bce, bce-2]"}, r"toy.yaml: methods: 'bce-2' is not a valid method name"),
    ({"colour": "red"}, r"toy.yaml: unknown keys \['colour'\]"),
])
def test_spec_errors_name_file_and_key(toy, patch, match):
    spec = toy / "grids" / "toy.yaml"
    text = spec.read_text()
    for k, v in patch.items():
        lines = [l for l in text.splitlines() if not l.startswith(f"{k}:")]
        text = "\n".join(lines + [f"{k}: {v}"]) + "\n"
    spec.write_text(text)
    with pytest.raises(grid.SpecError, match=match):
        grid.load_spec(spec)


def test_missing_dataset_config(toy):
    (toy / "ds" / "b.yaml").unlink()
    with pytest.raises(grid.SpecError, match=r"datasets.b: config file .*b.yaml does not exist"):
        grid.load_spec(toy / "grids" / "toy.yaml")


def test_command_override_order(toy):
    spec = grid.load_spec(toy / "grids" / "toy.yaml")
    cmd = grid.cell_command(spec, grid.Cell("b", "PAL_0.5", "ours", 1), toy / "out", ["train"], ["optim.lr=0.1"])
    assert cmd == ["train", "--config", str(toy / "ds" / "b.yaml"), "data.batch_size=8", "loss.name=paper",
                   "run.epochs=3", "optim.lr=0.1", "data.setting=PAL_0.5", "run.seed=1",
                   "run.name=b-PAL_0.5-ours-s1", f"run.out_dir={toy / 'out'}"]


# ------------------------------------------------------------------------------------ running

def test_dry_run_lists_commands_and_runs_nothing(toy, capsys):
    out = toy / "out"
    rc = grid.main([str(toy / "grids" / "toy.yaml"), "--out", str(out), "--dry-run", "--only", "a-PAL*,b-FAL-bce-s0",
                    "--train-cmd", _train_cmd(toy)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "5 cells selected of 20; 5 to run" in text  # a-PAL_0.5 x {asl, ours} x 2 seeds + 1
    lines = text.splitlines()
    for name in ("a-PAL_0.5-asl-s0", "a-PAL_0.5-ours-s1", "b-FAL-bce-s0"):
        i = next(i for i, l in enumerate(lines) if l.split()[-1] == name)
        assert lines[i].startswith("pending")
        assert f"run.name={name}" in lines[i + 1] and str(toy / "fake_train.py") in lines[i + 1]
    assert not out.exists() and not _calls(toy)


def test_only_matching_nothing_is_an_error(toy, capsys):
    rc = grid.main([str(toy / "grids" / "toy.yaml"), "--out", str(toy / "out"), "--only", "zzz*", "--dry-run"])
    assert rc == 2 and "--only 'zzz*' matches none of the 20 cells" in capsys.readouterr().err


def test_resume_after_failure_then_reports(toy, capsys):
    out, spec = toy / "out", str(toy / "grids" / "toy.yaml")
    (toy / "fail.txt").write_text("b-PAL_0.5-asl-s1")
    rc = grid.main([spec, "--out", str(out), "--train-cmd", _train_cmd(toy), "--parallel", "2"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "FAILED   b-PAL_0.5-asl-s1  exit code 3" in text
    assert "1 cell(s) failed" in text
    assert sum(l[0] == "start" for l in _calls(toy)) == 20
    failed = json.loads((out / "b-PAL_0.5-asl-s1" / "grid_status.json").read_text())
    assert failed["status"] == "failed" and failed["returncode"] == 3 and failed["attempts"] == 1
    assert "simulated crash" in (out / "b-PAL_0.5-asl-s1" / "grid.log").read_text()
    assert not (out / "b-PAL_0.5-asl-s1" / "summary.json").exists()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 20 and sum(r["status"] == "failed" for r in rows) == 1

    # second invocation: only the failed cell runs again, and now succeeds
    (toy / "fail.txt").unlink()
    (toy / "calls.log").unlink()
    rc = grid.main([spec, "--out", str(out), "--train-cmd", _train_cmd(toy)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "19 already done, 1 to run (1 again after a failure or interruption)" in text
    assert [l[1] for l in _calls(toy) if l[0] == "start"] == ["b-PAL_0.5-asl-s1"]
    assert json.loads((out / "b-PAL_0.5-asl-s1" / "grid_status.json").read_text())["attempts"] == 2
    assert "[1/1] done     b-PAL_0.5-asl-s1  final mAP 61.0  best 61.0" in text

    rows = {r["name"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert len(rows) == 20 and all(r["status"] == "done" for r in rows.values())
    r = rows["a-PAL_0.5-ours-s1"]
    assert (r["dataset"], r["setting"], r["method"], r["seed"]) == ("a", "PAL_0.5", "ours", "1")
    assert float(r["final_map"]) == pytest.approx(0.71) and r["epochs"] == "3"

    md = (out / "tables.md").read_text()
    # PAL table: ours 70, 71 -> 70.5 ± 0.7 bold; asl 60, 61 -> 60.5 ± 0.7 underlined; BCE (FAL) 65.5 ± 0.7
    assert "| Method | a PAL_0.5 | Bee PAL_0.5 |" in md
    assert "| OURS | **70.5 ± 0.7** | **70.5 ± 0.7** |" in md
    assert "| ASL | <u>60.5 ± 0.7</u> | <u>60.5 ± 0.7</u> |" in md
    assert "| BCE | 65.5 ± 0.7 | 65.5 ± 0.7 |" in md
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "map_vs_kept_a.png" in plots and "map_vs_kept_b.png" in plots
    for d in ("a", "b"):
        for s in ("FAL", "PAL_0.5"):
            assert f"curves_{d}_{s}.png" in plots and f"class_ap_{d}_{s}.png" in plots
            assert f"traces_{d}_{s}.png" in plots  # ours logs α, β, d, p2-share in both settings
    assert all((out / "plots" / p).stat().st_size > 8000 for p in plots)

    # third invocation: nothing to do; --report-only rebuilds the reports elsewhere
    (toy / "calls.log").unlink()
    assert grid.main([spec, "--out", str(out), "--train-cmd", _train_cmd(toy)]) == 0
    assert not _calls(toy)
    assert grid.main([spec, "--out", str(out), "--report-only", "--report-dir", str(toy / "rep")]) == 0
    assert (toy / "rep" / "tables.md").read_text() == md


@pytest.mark.parametrize("stagger", [True, False])
def test_parallel_slots_devices_and_stagger(toy, stagger):
    spec = grid.load_spec(toy / "grids" / "toy.yaml")
    cells = [c for c in grid.expand(spec) if c.dataset == "a" and c.setting == "PAL_0.5"]  # 4 cells, one group
    jobs = [(c, grid.cell_command(spec, c, toy / "out", [sys.executable, str(toy / "fake_train.py")])) for c in cells]
    os.environ.update(FAKE_PREP="0.5", FAKE_SLEEP="0.5")
    try:
        res = grid.run_cells(jobs, toy / "out", parallel=2, devices=["0", "1"], stagger=stagger, log=lambda s: None)
    finally:
        del os.environ["FAKE_PREP"], os.environ["FAKE_SLEEP"]
    assert res == {c.name: "done" for c in cells}
    calls = _calls(toy)
    start = {l[1]: (float(l[2]), l[4]) for l in calls if l[0] == "start"}
    ready = {l[1]: float(l[2]) for l in calls if l[0] == "ready"}
    end = {l[1]: float(l[2]) for l in calls if l[0] == "end"}
    events = sorted([(t, 1) for t, _ in start.values()] + [(t, -1) for t in end.values()])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak == 2
    for a in start:  # cells running at the same time never share a device
        for b in start:
            if a < b and start[a][0] < end[b] and start[b][0] < end[a]:
                assert start[a][1] != start[b][1]
    first = min(start, key=lambda n: start[n][0])
    second_start = sorted(t for t, _ in start.values())[1]
    # staggered: the 2nd cell of the group waits until the 1st has prepared its data (opened metrics.jsonl)
    assert (second_start >= ready[first]) is stagger


def test_interrupt_stops_children_and_leaves_nothing_finished(toy):
    """Ctrl-C inside the runner: a child that ignores SIGINT is escalated to SIGTERM, and the
    cell is recorded as interrupted, without summary.json, then runs again."""
    spec = grid.load_spec(toy / "grids" / "toy.yaml")
    cell = grid.Cell("a", "FAL", "ours", 0)
    job = (cell, grid.cell_command(spec, cell, toy / "out", [sys.executable, str(toy / "fake_train.py")]))

    def log(line):
        if line.startswith("[start]"):
            deadline = time.time() + 20
            while not _calls(toy) and time.time() < deadline:  # the child is up and ignoring SIGINT
                time.sleep(0.02)
            raise KeyboardInterrupt

    os.environ.update(FAKE_SLEEP="60", FAKE_IGNORE_SIGINT="1")
    try:
        t0 = time.time()
        with pytest.raises(KeyboardInterrupt):
            grid.run_cells([job], toy / "out", grace_s=0.5, log=log)
        assert time.time() - t0 < 15
    finally:
        del os.environ["FAKE_SLEEP"], os.environ["FAKE_IGNORE_SIGINT"]
    pid = int(_calls(toy)[0][3])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone (and reaped)
    run = toy / "out" / cell.name
    status = json.loads((run / "grid_status.json").read_text())
    assert status["status"] == "interrupted" and status["returncode"] == -signal.SIGTERM
    assert not (run / "summary.json").exists()
    assert grid.cell_status(toy / "out", cell) == "interrupted"
    assert grid.run_cells([job], toy / "out", log=lambda s: None) == {cell.name: "done"}


@pytest.mark.parametrize("sigint_ignored_at_start", [False, True])
def test_cli_sigint_exits_130(toy, sigint_ignored_at_start):
    """The real CLI under SIGINT (what Ctrl-C sends): exit 130, child stopped, cell not finished.
    Also when started by a script in the background, where SIGINT arrives ignored at start-up."""
    env = dict(os.environ, FAKE_SLEEP="60")
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored_at_start else None
    p = subprocess.Popen([sys.executable, str(REPO / "launch" / "grid.py"), str(toy / "grids" / "toy.yaml"),
                          "--out", str(toy / "out"), "--only", "a-FAL-bce-s0", "--train-cmd", _train_cmd(toy)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=ignore)
    deadline = time.time() + 30
    while not _calls(toy) and time.time() < deadline:
        time.sleep(0.05)
    assert _calls(toy), "fake trainer never started"
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 130, out
    assert "interrupted: stopped 1 running cell(s)" in out
    pid = int(_calls(toy)[0][3])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (toy / "out" / "a-FAL-bce-s0" / "summary.json").exists()
    assert grid.cell_status(toy / "out", grid.Cell("a", "FAL", "bce", 0)) == "interrupted"


def test_exit_zero_without_summary_is_a_failure(toy):
    bad = toy / "bad_train.py"
    bad.write_text("import sys\nprint('forgot the summary')\n")
    spec = grid.load_spec(toy / "grids" / "toy.yaml")
    cell = grid.Cell("a", "FAL", "bce", 0)
    lines = []
    res = grid.run_cells([(cell, grid.cell_command(spec, cell, toy / "out", [sys.executable, str(bad)]))],
                         toy / "out", log=lines.append)
    assert res == {cell.name: "failed"}
    assert "exit code 0 but no valid summary.json" in lines[-1]
