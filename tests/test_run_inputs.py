"""Two findings of issue 31: a run parses each data file once (its length check reads the same scans), and a sweep
over the direct stage of a level given by `path` starts from that path, not from a tiny level the run never built."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from orchestrator.config.schema import load_config
from orchestrator.run.inputs import check_prompt_lengths, load_splits, unlabeled_inputs
from orchestrator.run.kinds import plan_stages
from orchestrator.run.levels import init_levels
from orchestrator.run.pairs import RunInputs
from orchestrator.sweep.config import load_sweep
from orchestrator.sweep.tune import trial_levels
from workers.data import records as records_module

ROOT = Path(__file__).parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def test_a_run_parses_each_data_file_once(tmp_path, monkeypatch):
    """The splits, the generated unlabelled inputs and the prompt-length check against every level's processor
    read each file through the parser once."""
    monkeypatch.chdir(ROOT)  # the bases' paths are relative to the checkout
    parsed = Counter()
    parse = records_module._raw_records
    monkeypatch.setattr(records_module, "_raw_records", lambda path: (parsed.update([str(path)]), parse(path))[1])
    cfg = load_config(QUICKSTART, ["data.synth.train=6", "data.synth.val=4", "data.synth.test=4",
                                   "data.synth.unlabeled=3"])
    run_dir = tmp_path / "run"
    plans = plan_stages(cfg)
    scans: dict = {}
    splits = load_splits(cfg, run_dir, scans)
    unlabeled, _ = unlabeled_inputs(cfg, plans, run_dir, splits, scans)
    init_dirs = init_levels(cfg, run_dir)
    check_prompt_lengths(scans, RunInputs(cfg, plans, init_dirs, first="L"), init_dirs)
    assert len(parsed) == 8 and set(parsed.values()) == {1}, parsed  # 3 splits × 2 tasks + 2 unlabelled files
    assert len(unlabeled) == 6 and sum(map(len, splits.values())) == 2 * (6 + 4 + 4)


def test_a_sweep_over_a_path_levels_direct_stage_starts_from_its_path(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"base: {QUICKSTART}\nfrom_run: {tmp_path / 'run'}\nstage: S-direct\n"
                          "space:\n  direct.train.lr: {choice: [1.0e-3, 3.0e-4]}\n")
    sweep = load_sweep(sweep_file)
    levels = trial_levels(sweep, tmp_path / "run")  # the run dir holds no model: none is needed from it
    assert levels == {"S": (ROOT / "bases" / "tiny-qwen2_5_vl-84px" / "S").resolve()}
