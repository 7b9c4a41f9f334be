"""Where each level's models are: its initial model dir (a configured path, or a tiny level built once into the
run dir) and each trained stage's model dir."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config.schema import ConfigError, RunConfig
from workers.models.model_dirs import (
    LevelShape,
    ModelDirError,
    build_level,
    check_model_dir,
)
from workers.models.vocab import fixed_tokenizer


def init_levels(cfg: RunConfig, run_dir: Path) -> dict[str, Path]:
    """Initial model dir per level: a configured path, or a tiny random-init level built once, every tiny level
    with the one fixed tokenizer (`workers.models.vocab`)."""
    out, tokenizer = {}, None
    image_size = cfg.data.synth.image_size
    for level, lc in cfg.levels.items():
        out[level] = target = initial_dir(cfg, run_dir, level)
        if lc.path:
            try:
                check_model_dir(lc.path)
            except ModelDirError as err:
                raise ConfigError(f"levels.{level}.path: {err}") from None
        elif not (target / "config.json").is_file():
            if tokenizer is None:
                tokenizer = fixed_tokenizer(cfg.vocab_size)
            shape = LevelShape(**lc.shape_fields())
            build_level(target, shape, tokenizer, image_size, seed=cfg.seed)
    return out


def initial_dir(cfg: RunConfig, run_dir: Path, level: str) -> Path:
    """A level's initial model: its configured `path` (a local dir, resolved here since workers run elsewhere, or
    a hub name), else the tiny level built into the run dir."""
    if cfg.levels[level].path:
        local = Path(cfg.levels[level].path)
        return local.resolve() if local.exists() else local
    return run_dir / "models" / "init" / level


def model_dir(run_dir: Path, stage: str) -> Path:
    """Direct tuning saves `models/<level>`; distilled students `models/<stage name>`."""
    return run_dir / "models" / stage.removesuffix("-direct")
