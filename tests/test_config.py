"""Config validation: unknown keys name their path and the nearest valid key; overrides are validated."""

from __future__ import annotations

import pytest

from orchestrator.cli import main
from orchestrator.config.schema import ConfigError, load_config
from orchestrator.report.tracking import flatten


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


def test_eval_every_is_validated_and_left_out_of_fingerprints(tmp_path):
    """`eval_every` is a train key like the others (every section, overrides, --set); it only adds validation
    scores, so changing it leaves a finished stage reusable."""
    from orchestrator.run.fingerprints import fingerprints
    from orchestrator.run.kinds import plan_stages
    from orchestrator.run.stages import train_settings

    path = _write(tmp_path, "levels: {S: {}, L: {}}\ndirect: {levels: [L, S], overrides: {S: {eval_every: 7}}}\n")
    cfg = load_config(path, ["direct.train.eval_every=5"])
    assert (cfg.train_for("L").eval_every, cfg.train_for("S").eval_every) == (5, 7)
    assert train_settings(cfg.train_for("S")).eval_every == 7
    assert load_config(path).direct.train.eval_every == 0  # default: validation at each epoch's end only
    assert fingerprints(cfg, plan_stages(cfg)) == fingerprints(load_config(path), plan_stages(load_config(path)))
    for bad, message in (("-1", "greater than or equal to 0"), ("2.5", "valid integer"), ("often", "valid integer")):
        with pytest.raises(ConfigError, match=rf"'direct.train.eval_every': Input should be .*{message}"):
            load_config(path, [f"direct.train.eval_every={bad}"])
    with pytest.raises(ConfigError, match="'tcrd.train.eval_every'"):
        load_config(path, ["tcrd.train.eval_every=-3"])


def test_generator_settings_checked_at_load_naming_data_synth(tmp_path):
    """A scene setting the generator cannot honour is a config error naming `data.synth`, not a failure in the
    middle of the run."""
    levels = "levels: {S: {}}\ndirect: {levels: [S]}\n"
    path = _write(tmp_path, levels + "data: {synth: {image_size: 56}}\n")  # 5 objects on a 2x2 grid
    with pytest.raises(ConfigError, match=r"'data.synth': .*max_objects <= 4 \(the 2x2 grid of 28-px cells of a "
                                          r"56-px image\)"):
        load_config(path)
    path = _write(tmp_path, levels + "data: {synth: {spec: {colors: [red]}}}\n")
    with pytest.raises(ConfigError, match=r"'data.synth': .*unknown spec key\(s\) \['colors'\]"):
        load_config(path)
    assert load_config(_write(tmp_path, levels + "data: {synth: {image_size: 56, max_objects: 3}}\n")).data.synth \
        .generator_spec().max_objects == 3
