"""Property test (Hypothesis) over the scoring commands: for any record, long ones included, `hkd evaluate`, `hkd
predict` and `hkd calibrate` each either score it (exit 0) or refuse it with exit code 2 and a `FILE:LINE`
message (a broken field, the size cap, the prompt-length check). Never a traceback or another exit code, never
more than 10 s for one record.

Records are drawn by size class, so a short run reaches every outcome: short texts (empty, blank or junk ones
included: the loader's refusals), texts near and past the tiny model's 4,096-position context, past the size cap
(1,310,720 characters), and Task 1 records of up to 6,000 options. A fixed set of cases in CI; a long random run:
    HKD_SCORING_EXAMPLES=300 .venv/bin/python -m pytest tests/test_scoring_property.py -p no:cacheprovider
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from orchestrator.cli import main

EXAMPLES = int(os.environ.get("HKD_SCORING_EXAMPLES", "0")) or 30
RECORD_SECONDS = 10.0
WORDS = "the small red square is left of a large blue circle near the top edge of the photo".split()
# words per long text: near the tiny model's context, past it, just under the size cap (the slowest to refuse), past it
WORD_COUNTS = st.sampled_from([1, 3, 200, 2_500, 6_000, 20_000, 265_000, 300_000])


def _words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def texts() -> st.SearchStrategy[str]:
    """A text field: drawn characters (empty, blank, NUL and markup included) or a long run of words."""
    drawn = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
    return st.one_of(drawn, WORD_COUNTS.map(_words), st.sampled_from(["a red square", " ", "<|im_end|>", "x\x00"]))


@st.composite
def records(draw) -> dict:
    """One record of either task, labelled, its text fields of every size class."""
    if draw(st.booleans()):
        n = draw(st.sampled_from([1, 2, 40, 1_500, 6_000]))
        options = [f"object {i}" for i in range(n)] if n > 2 else draw(st.lists(texts(), min_size=1, max_size=2))
        return {"id": "r", "task": "hallucination", "image": "i.png", "caption": draw(texts()), "options": options,
                "hallucinated": [i % 2 == 0 for i in range(len(options))]}
    return {"id": "r", "task": "factuality", "image": "i.png", "context": draw(texts()), "claim": draw(texts()),
            "label": draw(st.booleans())}


@pytest.fixture(scope="module")
def scorer(tmp_path_factory, tiny_model_dir, bench_dir) -> Path:
    """A copy of the tiny model dir (its context: 4,096 positions), since `calibrate` stores its shift there; one
    command run first, so the time limit per record does not pay for the process's first imports."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("property") / "model"))
    assert main(["evaluate", str(model), str(bench_dir / "factuality" / "test.jsonl")]) == 0
    return model


def _outcome(command: str, model: Path, data: Path, capsys) -> str:
    """Run one scoring command on a one-record file; check it scored or refused as the contract says."""
    out = data.with_suffix(".preds.jsonl")
    start = time.perf_counter()
    code = main([command, str(model), str(data), *(["--out", str(out)] if command == "predict" else [])])
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    assert seconds < RECORD_SECONDS, f"{command} took {seconds:.1f} s for one record"
    assert "Traceback" not in captured.err
    if code == 2:
        assert captured.err.startswith(f"hkd: error: {data}:1: "), captured.err[:300]
        return "refused: " + ("size cap" if "above data.max_" in captured.err else
                              "context" if "longer than the model's context" in captured.err else "contract")
    assert code == 0, f"{command} exited {code}: {captured.err[-500:]}"
    if command == "predict":
        assert len(out.read_text().splitlines()) == 1
    return "scored"


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="HKD_SCORING_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(record=records())
@example(record={"id": "r", "task": "factuality", "image": "i.png", "context": _words(265_000),  # the slowest refusal
                 "claim": _words(265_000), "label": True})
def test_every_scoring_command_scores_or_refuses_with_file_line(record, scorer, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "r.jsonl"
        Image.new("RGB", (16, 16), (200, 10, 10)).save(Path(tmp) / "i.png")
        data.write_text(json.dumps(record) + "\n")
        outcomes = {command: _outcome(command, scorer, data, capsys)
                    for command in ("evaluate", "predict", "calibrate")}
    assert len(set(outcomes.values())) == 1, outcomes  # the three commands apply the same checks
    event(outcomes["evaluate"])
