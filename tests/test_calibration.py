"""Mapping shift: offset search, stored offsets, `hkd calibrate`, and the flip used by test-time augmentation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from orchestrator.cli import main
from workers.inference.calibration import calibrate, flip_text, load_shift, sigmoid, store_shift
from workers.inference.metrics import binary_metrics, ece


def test_offset_found_where_the_classes_cross():
    rng = np.random.default_rng(0)
    margins = np.concatenate([rng.normal(1.0, 0.3, 3000), rng.normal(0.4, 0.3, 3000)])
    targets = np.repeat([1, 0], 3000)
    r = calibrate(margins, targets)
    assert r["offset"] == pytest.approx(-0.7, abs=0.08)
    assert r["f1_after"] > r["f1_before"] + 0.2
    assert r["f1_after"] == pytest.approx(binary_metrics(targets, sigmoid(margins + r["offset"]))["f1"])
    assert r["ece_before"] == pytest.approx(ece(targets, sigmoid(margins)))
    assert r["ece_after"] == pytest.approx(ece(targets, sigmoid(margins + r["offset"])))


@pytest.mark.parametrize("seed", range(20))
def test_f1_after_never_below_before(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    margins = np.round(rng.normal(rng.normal(0, 2), 2, n), int(rng.integers(0, 3)))  # rounding makes ties
    targets = (rng.random(n) < rng.random()).astype(int)
    r = calibrate(margins, targets)
    assert r["f1_after"] >= r["f1_before"]
    assert r["f1_before"] == binary_metrics(targets, sigmoid(margins))["f1"]


def test_ties_go_to_zero_shift():
    margins = np.array([-3.0, -2.0, 0.5, 1.0])  # threshold 0 and the midpoint -0.75 both separate perfectly
    r = calibrate(margins, np.array([0, 0, 1, 1]))
    assert r["offset"] == 0.0 and r["f1_after"] == r["f1_before"] == 1.0


def test_one_class_for_all_when_the_ranking_is_reversed():
    margins, targets = np.array([-1.0, -0.5, 0.5, 1.0]), np.array([1, 1, 0, 0])
    r = calibrate(margins, targets)
    assert r["f1_before"] == 0.0 and r["f1_after"] == pytest.approx(1 / 3)
    assert len(set((margins + r["offset"] >= 0).tolist())) == 1


def test_sigmoid_decides_exactly_at_zero():
    assert sigmoid(np.array([0.0]))[0] == 0.5
    assert sigmoid(np.array([-1e-30]))[0] < 0.5
    assert sigmoid(np.array([-800.0, 800.0])).tolist() == [0.0, 1.0]


def test_store_merges_and_reloads(tmp_path):
    assert load_shift(tmp_path) == {}
    (tmp_path / "hkd.json").write_text(json.dumps({"level": "S"}))
    store_shift(tmp_path, {"hallucination": -0.25})
    store_shift(tmp_path, {"factuality": 0.5})
    assert load_shift(tmp_path) == {"hallucination": -0.25, "factuality": 0.5}
    assert json.loads((tmp_path / "hkd.json").read_text())["level"] == "S"
    assert [p.name for p in tmp_path.iterdir()] == ["hkd.json"]  # no temp file left behind


def test_flip_text_swaps_spatial_phrases_only():
    assert flip_text("The red circle is left of the square.") == "The red circle is right of the square."
    assert flip_text("Right of it; moved one cell to the left") == "Left of it; moved one cell to the right"
    assert flip_text("what is left after the removal") == "what is left after the removal"


def test_calibrate_cli_stores_shift_that_evaluate_applies(tiny_model_dir, bench_dir, tmp_path, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    files = [str(bench_dir / t / "val.jsonl") for t in ("hallucination", "factuality")]
    assert main(["calibrate", str(model), *files]) == 0
    table = capsys.readouterr().out
    shift = load_shift(model)
    assert set(shift) == {"hallucination", "factuality"}
    assert "hallucination" in table and "factuality" in table

    def f1s(*flags: str) -> dict[str, float]:
        assert main(["evaluate", str(model), *files, "--json", *flags]) == 0
        return {row["task"]: row["f1"] for row in map(json.loads, capsys.readouterr().out.splitlines())}

    shifted, raw = f1s(), f1s("--no-shift")
    for task in shift:
        assert shifted[task] >= raw[task]
        assert f"{shifted[task]:.4f}" in table  # f1_after on the calibration data is what evaluate reports
