"""launch/demo.py: the winner sentence and the method-file errors (the runs themselves are the
trainer's, tested in test_train.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_main():
    spec = importlib.util.spec_from_file_location("launch_demo", REPO / "launch" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_winner_names_best_final_map_and_margin(demo_main):
    results = {"ours": {"final_map": 0.283}, "an": {"final_map": 0.196}, "ours_plus": {"final_map": 0.2676}}
    labels = {"ours": "Ours", "an": "AN", "ours_plus": "Ours+"}
    line = demo_main.winner_line(results, labels)
    assert line.startswith("Winner: Ours by 1.54 mAP over Ours+")


def test_default_methods_exist(demo_main):
    from pml_scale.grid import load_method

    for name in ("ours", "ours_plus", "an"):
        assert load_method(demo_main.METHODS_DIR, name).overrides[0].startswith("loss.name=")


def test_unknown_method_is_a_usage_error(demo_main, capsys):
    with pytest.raises(SystemExit) as exc:
        demo_main.main(["--methods", "ours,nope"])
    assert exc.value.code == 2
    assert "method 'nope': no file" in capsys.readouterr().err
