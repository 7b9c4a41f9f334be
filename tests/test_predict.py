"""`hkd predict`: one row per record in order, unlabelled input, loader errors, agreement with `hkd evaluate`;
the stored mapping shift and flip test-time augmentation in scoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from orchestrator.cli import main
from workers.inference.calibration import flip_text, store_shift
from workers.data.records import load_jsonl
from workers.inference.evaluate import score_predictions, score_records

TASKS = ("hallucination", "factuality")


def _predict(model_dir: Path, data: Path, out: Path, *flags: str) -> list[dict]:
    assert main(["predict", str(model_dir), str(data), "--out", str(out), *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _evaluate_json(model_dir: Path, files: list[Path], capsys, *flags: str) -> dict[str, dict]:
    capsys.readouterr()
    assert main(["evaluate", str(model_dir), *map(str, files), "--json", *flags]) == 0
    return {row["task"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}


@pytest.mark.parametrize("task", TASKS)
def test_predict_rows_in_order(tiny_model_dir, bench_dir, tmp_path, task):
    data = bench_dir / task / "test.jsonl"
    records = load_jsonl(data)
    rows = _predict(tiny_model_dir, data, tmp_path / "p.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    for row, rec in zip(rows, records):
        if task == "hallucination":
            assert set(row) == {"id", "hallucinated", "scores"}
            assert len(row["hallucinated"]) == len(row["scores"]) == len(rec["options"])
            assert all(isinstance(h, bool) for h in row["hallucinated"])
            assert all(isinstance(s, float) and 0 <= s <= 1 for s in row["scores"])
            assert row["hallucinated"] == [s >= 0.5 for s in row["scores"]]
        else:
            assert set(row) == {"id", "label", "score"}
            assert isinstance(row["label"], bool) and isinstance(row["score"], float)
            assert row["label"] == (row["score"] >= 0.5)


def test_predict_unlabelled_input(tiny_model_dir, bench_dir, tmp_path):
    labelled = bench_dir / "hallucination" / "test.jsonl"
    records = [json.loads(line) for line in labelled.read_text().splitlines()]
    for rec in records:
        del rec["hallucinated"]
        rec["image"] = str(bench_dir / "hallucination" / rec["image"])
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = _predict(tiny_model_dir, unlabelled, tmp_path / "u.jsonl")
    assert rows == _predict(tiny_model_dir, labelled, tmp_path / "l.jsonl")


def test_predict_bad_line_exits_2(tiny_model_dir, bench_dir, tmp_path, capsys):
    good = (bench_dir / "factuality" / "test.jsonl").read_text().splitlines()[0]
    rec = json.loads(good)
    rec["image"] = str(bench_dir / "factuality" / rec["image"])
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "id": "x", "label": "yes"}) + "\n")
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(tiny_model_dir), str(data), "--out", str(out)]) == 2
    assert f"{data}:2: " in capsys.readouterr().err and not out.exists()


def test_predict_scores_match_evaluate(tiny_model_dir, bench_dir, tmp_path, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    store_shift(model, {"hallucination": 0.01, "factuality": -0.01})  # both paths must apply the stored shift
    files = [bench_dir / t / "test.jsonl" for t in TASKS]
    evaluated = _evaluate_json(model, files, capsys)
    for task, data in zip(TASKS, files):
        rows = _predict(model, data, tmp_path / f"{task}.jsonl")
        metrics = score_predictions(rows, load_jsonl(data, require_labels=True))[task]
        for key in ("f1", "accuracy", "auroc", "ece"):
            assert metrics[key] == pytest.approx(evaluated[task][key], abs=1e-12)


def test_evaluate_applies_stored_shift(tiny_model_dir, bench_dir, tmp_path, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    files = [bench_dir / t / "test.jsonl" for t in TASKS]
    raw = _evaluate_json(model, files, capsys)
    store_shift(model, {"hallucination": 1e3, "factuality": -1e3})  # everything positive / negative
    shifted = _evaluate_json(model, files, capsys)
    share_pos = {"hallucination": np.mean([h for r in load_jsonl(files[0]) for h in r["hallucinated"]]),
                 "factuality": np.mean([r["label"] for r in load_jsonl(files[1])])}
    assert shifted["hallucination"]["accuracy"] == pytest.approx(share_pos["hallucination"])
    assert shifted["factuality"]["accuracy"] == pytest.approx(1 - share_pos["factuality"])
    assert _evaluate_json(model, files, capsys, "--no-shift") == raw


def test_tta_averages_with_the_mirrored_view(tiny_model_dir, bench_dir, tmp_path):
    records = [r for t in TASKS for r in load_jsonl(bench_dir / t / "test.jsonl")]
    mirrored = []
    for i, rec in enumerate(records):
        path = tmp_path / f"{i}.png"
        ImageOps.mirror(Image.open(rec["image"]).convert("RGB")).save(path)
        flipped = {k: flip_text(v) if k in ("caption", "context", "claim") else v for k, v in rec.items()}
        if "options" in rec:
            flipped["options"] = [flip_text(o) for o in rec["options"]]
        mirrored.append({**flipped, "image": str(path)})
    plain = score_records(tiny_model_dir, records, shift={})
    mirror = score_records(tiny_model_dir, mirrored, shift={})
    tta = score_records(tiny_model_dir, records, shift={}, tta=True)
    np.testing.assert_allclose(tta["margin"], (plain["margin"] + mirror["margin"]) / 2, atol=1e-5)
    assert not np.allclose(tta["margin"], plain["margin"])


def test_one_decision_per_option_from_one_forward_per_record(tiny_model_dir, bench_dir):
    """Scoring runs one sequence per record; it yields one decision per option (Task 1) or claim (Task 2), with
    uid `<record id>#<slot>`, in record order, and a record's scores do not depend on its batch mates."""
    records = [r for t in TASKS for r in load_jsonl(bench_dir / t / "test.jsonl")]
    scored = score_records(tiny_model_dir, records, shift={}, batch_size=5)
    expected = [(f"{r['id']}#{i}", r["task"]) for r in records
                for i in range(len(r["options"]) if r["task"] == "hallucination" else 1)]
    assert [(p["uid"], p["task"]) for p in scored["positions"]] == expected
    assert len(scored["margin"]) == len(expected)
    alone = score_records(tiny_model_dir, records[:1], shift={})
    np.testing.assert_allclose(alone["margin"], scored["margin"][:len(alone["margin"])], atol=1e-4)
