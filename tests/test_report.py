"""Reports: aggregation, paper-layout tables, results CSV, metrics loading, plots.

References are hand-computed values (and the stdlib's statistics module for std)."""

import csv
import io
import json
import statistics

import numpy as np
import pytest
from matplotlib.image import imread

from pml_scale import report


def _rows():
    # demo/PAL_0.3: ours 0.650, 0.660, 0.670 -> 66.0 ± 1.0; asl 0.600, 0.620 -> 61.0 ± 1.4 (n=2)
    r = []
    for seed, v in enumerate([0.650, 0.660, 0.670]):
        r.append(dict(dataset="demo", setting="PAL_0.3", method="ours", seed=seed, final_map=v, best_map=v + 0.01))
    for seed, v in enumerate([0.600, 0.620]):
        r.append(dict(dataset="demo", setting="PAL_0.3", method="asl", seed=seed, final_map=v, best_map=v))
    r.append(dict(dataset="demo", setting="PAL_0.3", method="an", seed=2, final_map=None, best_map=None))
    return r


def test_aggregate_mean_and_sample_std():
    agg = report.aggregate(_rows())
    mean, std, n = agg[("demo", "PAL_0.3", "ours")]
    assert (round(mean, 9), round(std, 9), n) == (66.0, 1.0, 3)
    mean, std, n = agg[("demo", "PAL_0.3", "asl")]
    assert mean == pytest.approx(61.0) and n == 2
    assert std == pytest.approx(statistics.stdev([60.0, 62.0]))  # sqrt(2) = 1.414
    assert ("demo", "PAL_0.3", "an") not in agg  # unfinished cells are left out
    best = report.aggregate(_rows(), "best_map")[("demo", "PAL_0.3", "ours")]
    assert best[0] == pytest.approx(67.0)
    one = report.aggregate([dict(dataset="d", setting="FAL", method="m", seed=0, final_map=0.5)])
    assert one[("d", "FAL", "m")] == (50.0, 0.0, 1)


def _agg():
    # (mean, std, n) already x100. Columns: coco PAL_0.3 / PAL_0.6; bce, bce_ls are references (FAL).
    return {
        ("coco", "FAL", "bce"): (75.8, 0.0, 1), ("coco", "FAL", "bce_ls"): (76.8, 0.0, 1),
        ("coco", "PAL_0.3", "an"): (50.1, 0.0, 1), ("coco", "PAL_0.3", "asl"): (60.9, 0.0, 1),
        ("coco", "PAL_0.3", "ours"): (65.6, 0.0, 1),
        ("coco", "PAL_0.6", "an"): (65.6, 0.0, 1), ("coco", "PAL_0.6", "asl"): (76.34, 0.0, 1),
        ("coco", "PAL_0.6", "ours"): (76.26, 0.0, 1),
    }


def test_table_layout_bold_underline_reference():
    md = report.format_table(_agg(), datasets=["coco"], settings=["PAL_0.3", "PAL_0.6"],
                             methods=["bce", "bce_ls", "an", "asl", "ours"], reference=["bce", "bce_ls"],
                             method_labels={"bce_ls": "BCE-LS", "ours": "Ours"}, dataset_labels={"coco": "COCO"},
                             title="Table IV")
    lines = md.splitlines()
    assert lines[0] == "### Table IV"
    assert lines[2] == "| Method | COCO PAL_0.3 | COCO PAL_0.6 |"
    assert lines[3] == "|---|---:|---:|"
    # references: their FAL value in every column, never marked
    assert lines[4] == "| bce | 75.8 | 75.8 |"
    assert lines[5] == "| BCE-LS | 76.8 | 76.8 |"
    # PAL_0.6: 76.34 and 76.26 both display as 76.3: a tie, both bold; the next value (an) is second
    assert lines[6] == "| an | 50.1 | <u>65.6</u> |"
    assert lines[7] == "| asl | <u>60.9</u> | **76.3** |"
    assert lines[8] == "| Ours | **65.6** | **76.3** |"
    assert "bce, BCE-LS: trained with FAL labels" in md


def test_table_mean_std_and_missing():
    agg = report.aggregate(_rows())
    md = report.format_table(agg, datasets=["demo"], settings=["PAL_0.3"], methods=["an", "asl", "ours"])
    body = [l for l in md.splitlines() if l.startswith("| ")]
    assert body[1] == "| an | – |"
    assert body[2] == "| asl | <u>61.0 ± 1.4 (n=2)</u> |"
    assert body[3] == "| ours | **66.0 ± 1.0** |"
    assert "mean ± std over up to 3 seeds" in md


def test_table_single_fal_column_header_is_the_dataset():
    agg = {("coco", "FAL", "bce"): (75.8, 0, 1), ("coco", "FAL", "ours"): (80.1, 0, 1)}
    md = report.format_table(agg, datasets=["coco"], settings=["FAL"], methods=["bce", "ours"],
                             dataset_labels={"coco": "COCO"})
    assert "| Method | COCO |" in md
    assert "| bce | <u>75.8</u> |" in md and "| ours | **80.1** |" in md


def test_results_csv_round_trip():
    cell = dict(dataset="demo", setting="SPL", method="ours", seed=1, name="demo-SPL-ours-s1")
    rows = [report.result_row(cell, {"final_map": 0.5, "best_map": 0.6, "epochs": 3, "wall_s": 12.5}, "done"),
            report.result_row(dict(cell, seed=2, name="demo-SPL-ours-s2"), None, "failed")]
    got = list(csv.DictReader(io.StringIO(report.results_csv(rows))))
    assert list(got[0]) == list(report.RESULT_COLUMNS)
    assert got[0]["final_map"] == "0.5" and got[0]["wall_s"] == "12.5" and got[0]["status"] == "done"
    assert got[1]["final_map"] == "" and got[1]["status"] == "failed" and got[1]["seed"] == "2"


def test_load_summary_rejects_unfinished(tmp_path):
    assert report.load_summary(tmp_path) is None
    (tmp_path / "summary.json").write_text('{"final_map": 0.5')  # cut short
    assert report.load_summary(tmp_path) is None
    (tmp_path / "summary.json").write_text('{"best_map": 0.5}')
    assert report.load_summary(tmp_path) is None
    (tmp_path / "summary.json").write_text('{"final_map": 0.5}')
    assert report.load_summary(tmp_path) == {"final_map": 0.5}


def test_load_per_class(tmp_path):
    (tmp_path / "per_class_ap.json").write_text(json.dumps({"ap": [0.5, None, 1.0], "class_freq": [3, 0, 7]}))
    pc = report.load_per_class(tmp_path)
    assert np.isnan(pc["ap"][1]) and pc["ap"][2] == 1.0 and pc["class_freq"].tolist() == [3, 0, 7]
    (tmp_path / "per_class_ap.json").write_text(json.dumps({"ap": [0.5], "class_freq": [3, 0]}))
    with pytest.raises(ValueError, match="per_class_ap.json.*1 entries.*2"):
        report.load_per_class(tmp_path)


def _write_metrics(path):
    lines = []
    # epoch 0: steps 0..3; then a resume repeats epoch 0 steps 2..3 with new values; epoch 1: steps 4..7
    for s, loss in zip(range(4), [4.0, 3.0, 9.0, 9.0]):
        lines.append({"kind": "train", "epoch": 0, "step": s, "loss": loss, "alpha": 0.9, "beta": 0.1,
                      "d": 0.5, "p2_share": 0.2})
    lines.append({"kind": "eval", "epoch": 0, "map": 0.10})
    for s, loss in zip((2, 3), [2.0, 1.0]):  # resumed: these win over the 9.0s
        lines.append({"kind": "train", "epoch": 0, "step": s, "loss": loss, "alpha": 0.9, "beta": 0.1,
                      "d": 0.5, "p2_share": 0.2})
    lines.append({"kind": "eval", "epoch": 0, "map": 0.20})  # last eval of an epoch wins
    for s in range(4, 8):
        lines.append({"kind": "train", "epoch": 1, "step": s, "loss": 1.0, "alpha": 0.8, "beta": 0.2,
                      "d": 0.7, "p2_share": 0.1})
    lines.append({"kind": "eval", "epoch": 1, "map": 0.30})
    path.write_text("\n".join(json.dumps(l) for l in lines) + "\n")


def test_load_metrics_dedupes_resumed_lines(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl")
    m = report.load_metrics(tmp_path)
    assert m["epoch"].tolist() == [0.0, 1.0]
    assert m["loss"].tolist() == [pytest.approx((4 + 3 + 2 + 1) / 4), 1.0]
    assert m["eval_epoch"].tolist() == [0.0, 1.0] and m["eval_map"].tolist() == [0.2, 0.3]
    assert len(m["alpha"]) == 8 and m["alpha"][-1] == 0.8
    # x = epoch + position in the epoch: steps 0..3 -> 0, .25, .5, .75; steps 4..7 -> 1, 1.25, ...
    assert m["trace_x"].tolist() == [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75]


def test_load_metrics_names_bad_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "epoch": 0, "map": 0.1}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        report.load_metrics(tmp_path)


def test_load_metrics_without_traces(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "epoch": 0, "step": 1, "loss": 0.5}) + "\n")
    m = report.load_metrics(tmp_path)
    assert "alpha" not in m and m["loss"].tolist() == [0.5] and len(m["eval_map"]) == 0
    assert report.plot_loss_traces({"bce": m}, path=tmp_path / "t.png") is None


def test_setting_share():
    assert report.setting_share("PAL_0.3") == ("PAL", 0.3)
    assert report.setting_share("PPL_.9") == ("PPL", 0.9)
    assert report.setting_share("FAL") == ("FAL", 1.0)
    assert report.setting_share("SPL") is None and report.setting_share("NATIVE") is None


def _assert_png(path, min_bytes=8000):
    assert path is not None and path.exists() and path.stat().st_size > min_bytes
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.01  # not a blank canvas
    assert not list(path.parent.glob(".*.tmp"))


def test_plots_written(tmp_path):
    agg = report.aggregate(
        [dict(dataset="demo", setting=s, method=m, seed=k, final_map=v + 0.01 * k)
         for m, base in (("ours", 0.6), ("an", 0.4))
         for s, v in (("FAL", base + 0.2), ("PAL_0.3", base), ("PAL_0.6", base + 0.1), ("PPL_0.3", base + 0.05),
                      ("SPL", base - 0.1))
         for k in range(2)])
    _assert_png(report.plot_map_vs_kept(agg, dataset="demo", methods=["ours", "an"], path=tmp_path / "kept.png"))
    assert report.plot_map_vs_kept(agg, dataset="other", methods=["ours"], path=tmp_path / "none.png") is None

    rng = np.random.default_rng(0)
    freq = rng.integers(0, 500, size=600).astype(float)
    pcs = {m: {"ap": np.where(rng.random(600) < 0.05, np.nan, np.clip(np.log1p(freq) / 7 + rng.normal(0, .1, 600), 0, 1)),
               "class_freq": freq} for m in ("ours", "an")}
    _assert_png(report.plot_class_ap(pcs, path=tmp_path / "ap.png", title="demo PAL_0.3"))
    empty = {"an": {"ap": np.full(3, np.nan), "class_freq": np.ones(3)}}
    assert report.plot_class_ap(empty, path=tmp_path / "ap0.png") is None

    _write_metrics(tmp_path / "metrics.jsonl")
    curves = {"ours": report.load_metrics(tmp_path)}
    _assert_png(report.plot_training_curves(curves, path=tmp_path / "curves.png", title="t"))
    _assert_png(report.plot_loss_traces(curves, path=tmp_path / "p" / "traces.png", title="t"))
