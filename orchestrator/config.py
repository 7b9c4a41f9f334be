"""The run config: one YAML file, validated completely before any work starts.

Unknown keys are refused with their dotted path and the nearest valid name; `--set a.b=value`
overrides go through the same validation as the file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be run; the message names the file and key path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SynthData(Strict):
    """Generate the procedural benchmark into `<run dir>/data` (skipped when already there)."""

    train: int = Field(2000, ge=1)
    val: int = Field(300, ge=1)
    test: int = Field(500, ge=1)
    image_size: int = Field(112, ge=28, multiple_of=28)
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(5, ge=1)
    spec: dict[str, Any] = Field(default_factory=dict, description="further SynthSpec fields")


class DataFiles(Strict):
    """Contract JSONL files per split (either task, mixed freely)."""

    train: list[str] = Field(default_factory=list)
    val: list[str] = Field(default_factory=list)
    test: list[str] = Field(default_factory=list)


class DataConfig(Strict):
    source: Literal["synth", "files"] = "synth"
    synth: SynthData = Field(default_factory=SynthData)
    files: DataFiles = Field(default_factory=DataFiles)
    field_map: dict[str, str] = Field(default_factory=dict)
    default_task: Literal["hallucination", "factuality"] | None = None

    @model_validator(mode="after")
    def _files_given(self) -> DataConfig:
        if self.source == "files" and not (self.files.train and self.files.test):
            raise ValueError("data.source is 'files' but data.files.train or data.files.test is empty")
        return self


class LevelConfig(Strict):
    """A pyramid level: a tiny shape built offline, or `path` to any HF Qwen2.5-VL dir (or hub name)."""

    path: str | None = None
    trust_remote_code: bool = Field(False, description="let this level's model dir run its own Python code")
    hidden: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    kv_heads: int = Field(1, ge=1)
    intermediate: int = Field(352, ge=8)
    vision_hidden: int = Field(96, ge=8)
    vision_depth: int = Field(1, ge=1)
    vision_heads: int = Field(2, ge=1)
    init_std: float | None = Field(None, gt=0, description="weight init std; default 1/sqrt(hidden)")

    @model_validator(mode="after")
    def _divisible(self) -> LevelConfig:
        if self.hidden % self.heads or self.heads % self.kv_heads or self.vision_hidden % self.vision_heads:
            raise ValueError("hidden must divide by heads, heads by kv_heads, vision_hidden by vision_heads")
        return self


class TrainConfig(Strict):
    epochs: float = Field(3, gt=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)


class DirectConfig(Strict):
    """Direct tuning on the task: the baselines, and the pyramid's top level."""

    levels: list[str] = Field(default_factory=lambda: ["L", "M", "S"])
    train: TrainConfig = Field(default_factory=TrainConfig)
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-level train keys")


class TeacherRef(Strict):
    """One teacher of a distillation stage: a level's latest trained model, its KD weight and temperature."""

    level: str
    weight: float = Field(1.0, ge=0)


class PPODStage(Strict):
    """Distil one pyramid level from the trained level(s) above it."""

    student: str
    teachers: list[TeacherRef] = Field(min_length=1)


class PPODConfig(Strict):
    """Pyramid-like progressive online distillation: coarse alignment at a high temperature, level by level."""

    enabled: bool = True
    stages: list[PPODStage] = Field(default_factory=list)
    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(0.5, ge=0)
    train: TrainConfig = Field(default_factory=TrainConfig)


class TCRDConfig(Strict):
    """Ternary-coupled refinement: ground truth + top teacher + assistant, each KD coupled, low temperature."""

    enabled: bool = True
    student: str = "S"
    top: str = "L"
    assistant: str = "M"
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(1.0, ge=0)
    top_weight: float = Field(1.0, ge=0)
    assistant_weight: float = Field(1.0, ge=0)
    coupled: bool = True
    sharpness: float = Field(10.0, gt=0)
    train: TrainConfig = Field(default_factory=TrainConfig)


class TeacherResources(Strict):
    """Teacher actors: replicas per teacher, each with this CPU/GPU share; top-k on the wire; prefetch depth."""

    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    k: int = Field(16, ge=1)
    prefetch: int = Field(2, ge=0)
    max_restarts: int = Field(3, ge=0)


class Resources(Strict):
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(2, gt=0)
    use_gpu: bool = False
    gpus_per_worker: float = Field(1, gt=0)
    ray_address: str | None = None


class Tracking(Strict):
    uri: str | None = None
    experiment: str = "hkd4vlm"


class RunConfig(Strict):
    name: str = "run"
    seed: int = 0
    vocab_size: int = Field(1024, ge=256)
    data: DataConfig = Field(default_factory=DataConfig)
    levels: dict[str, LevelConfig] = Field(default_factory=dict)
    direct: DirectConfig = Field(default_factory=DirectConfig)
    ppod: PPODConfig = Field(default_factory=lambda: PPODConfig(enabled=False))
    tcrd: TCRDConfig = Field(default_factory=lambda: TCRDConfig(enabled=False))
    teachers: TeacherResources = Field(default_factory=TeacherResources)
    resources: Resources = Field(default_factory=Resources)
    tracking: Tracking = Field(default_factory=Tracking)

    @model_validator(mode="after")
    def _levels_known(self) -> RunConfig:
        named = [("direct", n) for n in self.direct.levels + list(self.direct.overrides)]
        if self.ppod.enabled:
            named += [("ppod", n) for st in self.ppod.stages for n in [st.student] + [t.level for t in st.teachers]]
        if self.tcrd.enabled:
            named += [("tcrd", n) for n in (self.tcrd.student, self.tcrd.top, self.tcrd.assistant)]
        for section, name in named:
            if name not in self.levels:
                raise ValueError(f"{section} names level {name!r}, which is not under 'levels' ({sorted(self.levels)})")
        for name, over in self.direct.overrides.items():
            TrainConfig(**{**self.direct.train.model_dump(), **over})
        return self

    def train_for(self, level: str) -> TrainConfig:
        """The direct-tuning settings of one level (defaults plus its overrides)."""
        return TrainConfig(**{**self.direct.train.model_dump(), **self.direct.overrides.get(level, {})})


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML config; raise ConfigError naming the file and key path."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    raw.setdefault("name", path.stem)
    for item in overrides or []:
        apply_override(raw, item)
    try:
        return RunConfig(**raw)
    except ValidationError as err:
        raise ConfigError(f"{path}: " + "; ".join(_describe(e) for e in err.errors())) from None


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to the raw config dict."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, value = item.split("=", 1)
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a mapping")
    node[parts[-1]] = yaml.safe_load(value)


def _describe(error: dict) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key '{loc}'{_suggest(error['loc'])}"
    return f"'{loc}': {error['msg']}" if loc else error["msg"]


def _suggest(loc: tuple) -> str:
    """Nearest valid key name at the unknown key's level (walking models, lists and dicts of models)."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is not None:
            model = _model_in(field.annotation) or model
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(model.model_fields)})"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found:
            return found
    return None
