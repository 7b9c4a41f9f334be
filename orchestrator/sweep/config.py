"""The sweep file of `hkd sweep`: which stage of which finished run to re-train, over which search space.

Validated like the run config and before any work starts: unknown keys name their path and the nearest valid
key, every space key must be a key of the run config inside the swept stage's section (or `augment`), and each
end of every range is applied to the base config and validated there, so a trial can never draw an invalid
config. Paths (`base`, `from_run`) are relative to the current directory, like every `hkd` argument.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from orchestrator.config.schema import (
    ConfigError,
    RunConfig,
    Strict,
    read_raw,
    set_key,
    validate_raw,
)
from orchestrator.run.kinds import StagePlan, plan_stages

METRIC = "f1"  # validation macro-F1 averaged over the tasks, what every epoch reports
MODE = "max"


class Dist(Strict):
    """One search dimension: exactly one of `grid` (every value), `choice`, `uniform` or `loguniform`."""

    grid: list[Any] | None = Field(None, min_length=1)
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one(self) -> Dist:
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        bounds = self.uniform or self.loguniform
        if bounds and not bounds[0] < bounds[1]:
            raise ValueError(f"range {list(bounds)} must have low < high")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    def values_to_check(self) -> list[Any]:
        """Every value a trial can draw is one of these or lies between two of them."""
        return list(self.grid or self.choice or self.uniform or self.loguniform)

    def tune(self) -> Any:
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(self.grid)
        if self.choice is not None:
            return tune.choice(self.choice)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)


class ASHA(Strict):
    """Early stopping on validation macro-F1, reported once per epoch."""

    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(Strict):
    name: str = "sweep"
    base: str = Field(description="the run config whose stage is swept")
    from_run: str = Field(description="run dir of a finished `hkd run` of `base`: its teachers and data")
    stage: str = Field("tcrd", description="a stage name of the base plan, or its kind when unique")
    space: dict[str, Dist] = Field(min_length=1)
    num_samples: int = Field(1, ge=1, description="draws; with a grid, draws per grid point")
    scheduler: ASHA = Field(default_factory=ASHA)
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: what the resources fit")
    cache: bool = Field(True, description="teacher-output cache on for every trial")


class Sweep:
    """A validated sweep: its file's settings, the base config (raw and validated) and the stage's plan."""

    def __init__(self, spec: SweepConfig, base_raw: dict, base: RunConfig, plan: StagePlan):
        self.spec, self.base_raw, self.base, self.plan = spec, base_raw, base, plan

    def trial_raw(self, values: dict[str, Any]) -> dict:
        """The base config with one trial's drawn values set (a ready-to-run config)."""
        raw = copy.deepcopy(self.base_raw)
        for key, value in values.items():
            set_key(raw, key, value)
        return raw

    def trial_config(self, values: dict[str, Any]) -> tuple[RunConfig, StagePlan]:
        cfg = validate_raw(self.trial_raw(values), f"sweep {self.spec.name}")
        return cfg, stage_plan(cfg, self.spec.stage)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file and its base config; raise ConfigError naming the file and key."""
    path = Path(path)
    spec: SweepConfig = validate_raw(read_raw(path), str(path), SweepConfig)
    base_raw = read_raw(Path(spec.base))
    if spec.cache:
        set_key(base_raw, "cache.enabled", True)
    base = validate_raw(base_raw, spec.base)
    try:
        plan = stage_plan(base, spec.stage)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    sweep = Sweep(spec, base_raw, base, plan)
    for key, dist in spec.space.items():
        _check_key(sweep, key, dist, f"{path}: space.{key}")
    return sweep


def stage_plan(cfg: RunConfig, stage: str) -> StagePlan:
    """The plan's stage named `stage`, or the one stage of that kind."""
    plans = plan_stages(cfg)
    by_name = {p.name: p for p in plans}
    if stage in by_name:
        return by_name[stage]
    of_kind = [p for p in plans if p.kind.name == stage]
    if len(of_kind) == 1:
        return of_kind[0]
    names = list(by_name) + sorted({p.kind.name for p in plans if sum(q.kind is p.kind for q in plans) == 1})
    close = difflib.get_close_matches(stage, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"stage '{stage}' is not in the base plan{hint}; choose one of {names}")


def _check_key(sweep: Sweep, key: str, dist: Dist, where: str) -> None:
    """A space key must stay inside the swept stage (its models come from `from_run`) and every value valid."""
    section = sweep.plan.kind.section
    if not key.startswith((f"{section}.", "augment.")):
        raise ConfigError(f"{where}: only keys under '{section}.' or 'augment.' can be swept for stage "
                          f"{sweep.plan.name} (earlier stages' models come from from_run)")
    for value in dist.values_to_check():
        try:
            cfg, plan = sweep.trial_config({key: value})
        except ConfigError as err:
            raise ConfigError(f"{where} = {value!r}: {str(err).split(': ', 1)[-1]}") from None
        if (plan.init, [t.stage for t in plan.teachers]) != (sweep.plan.init, [t.stage for t in sweep.plan.teachers]):
            raise ConfigError(f"{where} = {value!r} changes which models stage {sweep.plan.name} starts from or "
                              "learns from; sweep weights, temperatures, training and augmentation keys")
