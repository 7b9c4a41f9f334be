"""Config validation: unknown keys name their path and the nearest valid key; overrides are validated."""

from __future__ import annotations

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config
from orchestrator.tracking import flatten


def _write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_validate():
    for name in ("quickstart", "paper"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.name == name and set(cfg.direct.levels) <= set(cfg.levels)


def test_unknown_key_names_path_and_nearest(tmp_path):
    path = _write(tmp_path, "levels: {S: {}}\ndirect: {levels: [S], train: {lrr: 0.1}}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'direct.train.lrr' \(did you mean 'lr'\?\)"):
        load_config(path)


def test_unknown_level_key_suggests(tmp_path):
    path = _write(tmp_path, "levels: {S: {hiden: 64}}\ndirect: {levels: [S]}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'levels.S.hiden' \(did you mean 'hidden'\?\)"):
        load_config(path)


def test_wrong_type_and_range(tmp_path):
    path = _write(tmp_path, "levels: {S: {}}\ndirect: {levels: [S], train: {lr: -1}}\n")
    with pytest.raises(ConfigError, match="'direct.train.lr': Input should be greater than 0"):
        load_config(path)
    with pytest.raises(ConfigError, match="'seed'"):
        load_config(path, ["seed=abc"])


def test_set_override_validated_like_file(tmp_path):
    path = _write(tmp_path, "levels: {S: {}}\ndirect: {levels: [S]}\n")
    cfg = load_config(path, ["direct.train.lr=0.5", "resources.num_workers=2"])
    assert cfg.direct.train.lr == 0.5 and cfg.resources.num_workers == 2
    with pytest.raises(ConfigError, match=r"unknown key 'resources.num_worker' \(did you mean 'num_workers'\?\)"):
        load_config(path, ["resources.num_worker=2"])


def test_direct_level_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="level 'L', which is not under 'levels'"):
        load_config(_write(tmp_path, "levels: {S: {}}\ndirect: {levels: [L]}\n"))


def test_cli_refuses_bad_config_before_work(tmp_path, capsys):
    path = _write(tmp_path, "levels: {S: {}}\ndirect: {levels: [S], trian: {}}\n")
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert "unknown key 'direct.trian' (did you mean 'train'?)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_secrets_masked_in_params():
    flat = flatten({"tracking": {"uri": "x", "api_token": "abc"}, "password": "p", "seed": 1})
    assert flat == {"tracking.uri": "x", "tracking.api_token": "***", "password": "***", "seed": "1"}
