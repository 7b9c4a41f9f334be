"""The run config: one YAML file, validated completely before any work starts.

Unknown keys are refused with their dotted path and the nearest valid name; `--set a.b=value`
overrides go through the same validation as the file.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)

from workers.contract import KDLoss
from workers.data.augment import AugmentConfig
from workers.data.records import MAX_OPTIONS, MAX_TEXT_CHARS, DataError, decode_utf8
from workers.data.synth import SynthSpec
from workers.models.shapes import LevelShape


class ConfigError(ValueError):
    """A config that cannot be run; the message names the file and key path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SynthData(Strict):
    """Generate the procedural benchmark into `<run dir>/data` (skipped when already there)."""

    train: int = Field(2000, ge=1)
    val: int = Field(300, ge=1)
    test: int = Field(500, ge=1)
    image_size: int = Field(SynthSpec.image_size, ge=28, multiple_of=28)  # the generator's defaults, not restated
    min_objects: int = Field(SynthSpec.min_objects, ge=1)
    max_objects: int = Field(SynthSpec.max_objects, ge=1)
    unlabeled: int = Field(0, ge=0, description="fresh generated records per task for the distillation stages' "
                                                "unlabelled term (their own seed stream; scenes seen in val or "
                                                "test dropped)")
    spec: dict[str, Any] = Field(default_factory=dict, description="further SynthSpec fields")

    def generator_spec(self) -> SynthSpec:
        """The generator settings (also the scenes of grounding pre-training)."""
        return SynthSpec(image_size=self.image_size, min_objects=self.min_objects, max_objects=self.max_objects,
                         **{k: as_tuples(v) for k, v in self.spec.items()})

    @model_validator(mode="after")
    def _valid_spec(self) -> SynthData:
        """The generator's own checks, at load time, so the error names `data.synth` and not a stage."""
        unknown = set(self.spec) - {f.name for f in dataclasses.fields(SynthSpec)}
        if unknown:
            raise ValueError(f"unknown spec key(s) {sorted(unknown)}")
        self.generator_spec()
        return self


def as_tuples(value: Any) -> Any:
    """YAML lists → the tuples SynthSpec's frozen fields use."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, list) else value


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
    max_image_pixels: int = Field(64_000_000, ge=1, le=178_956_970,
                                  description="images with more pixels are refused from their header, undecoded "
                                              "(at most PIL's own hard limit)")
    max_text_chars: int = Field(MAX_TEXT_CHARS, ge=1, description="the size cap: a record with a longer text field "
                                                                  "is refused before any tokenizing")
    max_options: int = Field(MAX_OPTIONS, ge=1, description="the size cap: a record with more options is refused "
                                                            "before any tokenizing")
    unlabeled: list[str] = Field(default_factory=list, description="contract JSONL files of inputs for the "
                                                                   "distillation stages' KD-only term (labels ignored)")
    unlabeled_use: Literal["kd", "pseudo_labels", "gold_labels"] = Field(
        "kd", description="what the distillation stages learn from the unlabelled inputs: the teachers' soft outputs "
                          "(kd), CE on the top teacher's decision (pseudo_labels), or CE + KD with their own labels "
                          "(gold_labels; the --ablation upper bound)")

    @model_validator(mode="after")
    def _files_given(self) -> DataConfig:
        if self.source == "files" and not (self.files.train and self.files.test):
            raise ValueError("data.source is 'files' but data.files.train or data.files.test is empty")
        if self.source == "files" and self.synth.unlabeled:
            raise ValueError("data.synth.unlabeled generates benchmark scenes, which need data.source: synth; "
                             "give unlabelled inputs of your own as data.unlabeled files")
        return self

    def has_unlabeled(self) -> bool:
        """Whether the distillation stages get unlabelled inputs."""
        return bool(self.unlabeled or self.synth.unlabeled)

    def limits(self) -> dict[str, int]:
        """The loader's limits on a record (`workers.data.records.load_jsonl` keywords): image pixels and the size cap."""
        return {"max_image_pixels": self.max_image_pixels, "max_text_chars": self.max_text_chars,
                "max_options": self.max_options}


def fields_of(dc: type) -> dict[str, Any]:
    """A worker dataclass's fields as pydantic field definitions (`create_model`): type, default, and the
    bounds and description its field metadata carries. The dataclass stays the one source of both."""
    hints = get_type_hints(dc)
    return {f.name: (hints[f.name], Field(f.default, description=f.metadata.get("doc"), **f.metadata.get("bounds", {})))
            for f in dataclasses.fields(dc)}


class _LevelPlace(Strict):
    """A pyramid level: a tiny shape built offline (`workers.models.shapes.LevelShape`'s fields, defaults and bounds),
    or `path` to a HF model dir (or hub name) of a supported family (`workers.models.families`)."""

    path: str | None = None
    trust_remote_code: bool = Field(False, description="let this level's model dir run its own Python code")
    teacher_gpus: float | None = Field(None, ge=0, description="GPU share per teacher replica of this level; "
                                                               "default teachers.num_gpus")

    def shape_fields(self) -> dict[str, Any]:
        """The tiny shape (`workers.models.shapes.LevelShape`'s fields): everything but where and how it runs."""
        return self.model_dump(include={f.name for f in dataclasses.fields(LevelShape)})

    @model_validator(mode="after")
    def _divisible(self) -> LevelConfig:
        if self.hidden % self.heads or self.heads % self.kv_heads or self.vision_hidden % self.vision_heads:
            raise ValueError("hidden must divide by heads, heads by kv_heads, vision_hidden by vision_heads")
        return self


LevelConfig = create_model("LevelConfig", __base__=_LevelPlace, __doc__=_LevelPlace.__doc__, **fields_of(LevelShape))


class LoraSettings(Strict):
    """Train a PEFT LoRA adapter instead of every weight; the stage saves merged weights and the adapter."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1)


class StepSettings(Strict):
    """Optimizer and logging settings every training stage shares."""

    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)


class TrainConfig(StepSettings):
    epochs: float = Field(3, gt=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    lora: LoraSettings | None = None
    eval_every: int = Field(0, ge=0, description="also score validation macro-F1 every N steps (the learning "
                                                  "curve); 0: only at each epoch's end")
    balance_tasks: bool = Field(False, description="each task present in a batch weighs the same in every loss term "
                                                   "(per-task means, averaged), however many supervised positions "
                                                   "its records give; false: every position weighs the same")


class PretrainConfig(StepSettings):
    """Grounding pre-training of the tiny levels built from config (a `path` level is pretrained already):
    next-token loss on dense descriptions of fresh generated scenes, before any task tuning."""

    enabled: bool = False
    steps: int = Field(400, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)


class DirectConfig(Strict):
    """Direct tuning on the task: the baselines, and the pyramid's top level."""

    levels: list[str] = Field(default_factory=lambda: ["L", "M", "S"])
    train: TrainConfig = Field(default_factory=TrainConfig)
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-level train keys")


class TeacherRef(Strict):
    """One teacher of a distillation stage: a level's latest trained model, its KD weight and temperature."""

    level: str
    weight: float = Field(1.0, ge=0)


class KDSettings(Strict):
    """The divergence of a distillation stage's KD terms (`workers.training.objectives.kd_divergence`): forward KL
    (mean-seeking, the default), reverse KL (mode-seeking) or the generalised JSD with mixture weight `beta`
    (0: forward KL, 1: reverse KL), as in TRL's GKD; and what it runs over (`kd_over`): a teacher's top-k +
    tail buckets of the shared vocabulary, or its answer distribution over the two label words, which maps
    exactly onto any student's whatever its tokenizer (`auto`: top-k where teacher and student share a
    tokenizer, the label words where they do not)."""

    kd_loss: KDLoss = KDLoss.FORWARD_KL
    beta: float = Field(0.5, ge=0, le=1, description="JSD's mixture weight (kd_loss: jsd)")
    kd_over: Literal["auto", "top_k", "label_words"] = Field(
        "auto", description="auto: top_k where teacher and student share a tokenizer, else label_words; top_k "
                            "between different tokenizers is refused")


class UnlabeledWeight(Strict):
    """A distillation section's weight on its KD-only term over the unlabelled inputs (`data.unlabeled`,
    `data.synth.unlabeled`): per section, because PPOD and TCRD balance KD against CE differently (their own
    `ce_weight` and temperature)."""

    unlabeled_weight: float = Field(1.0, ge=0)


class PPODStage(Strict):
    """Distil one pyramid level from the trained level(s) above it."""

    student: str
    teachers: list[TeacherRef] = Field(min_length=1)


class PPODConfig(KDSettings, UnlabeledWeight):
    """Pyramid-like progressive online distillation: coarse alignment at a high temperature, level by level."""

    enabled: bool = True
    stages: list[PPODStage] = Field(default_factory=list)
    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(0.5, ge=0)
    train: TrainConfig = Field(default_factory=TrainConfig)


class TCRDConfig(KDSettings, UnlabeledWeight):
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
    """Teacher actors: replicas per teacher, each with this CPU/GPU share; top-k on the wire; prefetch depth.

    A replica whose process dies restarts up to `max_restarts` times (-1: without limit); a call that fails
    meanwhile is sent again up to `call_retries` times before the train worker gives up."""

    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    k: int = Field(16, ge=1)
    prefetch: int = Field(2, ge=0)
    max_restarts: int = Field(3, ge=-1)
    call_retries: int = Field(5, ge=0)


class Resources(Strict):
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(2, gt=0)
    use_gpu: bool = False
    gpus_per_worker: float = Field(1, gt=0)
    ray_address: str | None = None
    max_failures: int = Field(2, ge=0, description="worker-process failures a stage survives (Ray Train's "
                              "FailureConfig.max_failures), each attempt resuming from the stage's latest "
                              "checkpoint; 0: the first failure ends the run")
    dashboard: bool = Field(True, description="start the local Ray with its dashboard (URL printed at start); "
                                              "false: no dashboard, hkd cleans up orphaned worker groups itself")


RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class Placement(Strict):
    """Custom Ray resources that each teacher replica / train worker asks for, so each lands on the nodes that
    advertise them (cluster.yaml's `teacher`/`student`). Empty: anywhere (one machine, fractional GPUs)."""

    teacher: dict[str, float] = Field(default_factory=dict, description="per teacher replica, e.g. {teacher: 1}")
    student: dict[str, float] = Field(default_factory=dict, description="per train worker, e.g. {student: 1}")
    gpu_memory_gb: float = Field(80.0, gt=0, description="memory of one GPU, checked by `hkd plan`")

    @model_validator(mode="after")
    def _custom_only(self) -> Placement:
        for role in ("teacher", "student"):
            for name, amount in getattr(self, role).items():
                if name in RESERVED_RESOURCES:
                    raise ValueError(f"placement.{role}.{name}: CPUs and GPUs are set by teachers.num_cpus/num_gpus "
                                     "and resources.cpus_per_worker/gpus_per_worker; name custom resources here")
                if amount <= 0:
                    raise ValueError(f"placement.{role}.{name}: amount must be > 0, got {amount}")
        return self


class _AugmentSwitch(Strict):
    """Label-preserving augmentation of the training records (`workers/data/augment.py`), fresh each epoch and
    deterministic per (record id, epoch, seed). Off by default; the other fields are `AugmentConfig`'s."""

    enabled: bool = False

    def transforms(self) -> AugmentConfig:
        return AugmentConfig(**self.model_dump(exclude={"enabled"}))


AugmentSection = create_model("AugmentSection", __base__=_AugmentSwitch, __doc__=_AugmentSwitch.__doc__,
                              **fields_of(AugmentConfig))


class CacheConfig(Strict):
    """Teacher-output cache (`workers/teachers/cache.py`): epochs and trials reuse a teacher's answers.

    `path` is a local dir or any pyarrow filesystem URI (e.g. `s3://bucket/cache`); default
    `<run dir>/teacher_cache`. Past `max_gb`, the oldest shards are deleted first."""

    enabled: bool = False
    path: str | None = None
    max_gb: float = Field(4.0, gt=0)


class Tracking(Strict):
    uri: str | None = None
    experiment: str = "hkd4vlm"


class RunConfig(Strict):
    name: str = "run"
    seed: int = 0
    train_seeds: dict[str, int] = Field(default_factory=dict, description="training seed per level (data order, "
                                        "augmentation draws, torch's seed) in that level's stages; default `seed`, "
                                        "which alone decides the benchmark (bench/claim.py sets S's)")
    vocab_size: int = Field(1024, ge=1024, description="size of the fixed tokenizer of tiny levels built from config "
                                                     "(`workers.models.vocab`): every fixed word must be one token")
    data: DataConfig = Field(default_factory=DataConfig)
    levels: dict[str, LevelConfig] = Field(default_factory=dict)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    direct: DirectConfig = Field(default_factory=DirectConfig)
    ppod: PPODConfig = Field(default_factory=lambda: PPODConfig(enabled=False))
    tcrd: TCRDConfig = Field(default_factory=lambda: TCRDConfig(enabled=False))
    teachers: TeacherResources = Field(default_factory=TeacherResources)
    resources: Resources = Field(default_factory=Resources)
    placement: Placement = Field(default_factory=Placement)
    tracking: Tracking = Field(default_factory=Tracking)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    cache: CacheConfig = Field(default_factory=CacheConfig)

    @model_validator(mode="after")
    def _levels_known(self) -> RunConfig:
        named = [("direct", n) for n in self.direct.levels + list(self.direct.overrides)]
        if self.ppod.enabled:
            named += [("ppod", n) for st in self.ppod.stages for n in [st.student] + [t.level for t in st.teachers]]
        if self.tcrd.enabled:
            named += [("tcrd", n) for n in (self.tcrd.student, self.tcrd.top, self.tcrd.assistant)]
        named += [("train_seeds", n) for n in self.train_seeds]
        for section, name in named:
            if name not in self.levels:
                raise ValueError(f"{section} names level {name!r}, which is not under 'levels' ({sorted(self.levels)})")
        for name, over in self.direct.overrides.items():
            TrainConfig(**{**self.direct.train.model_dump(), **over})
        return self

    def train_seed(self, level: str) -> int:
        """The training seed of a level's stages."""
        return self.train_seeds.get(level, self.seed)

    def teacher_gpus(self, level: str) -> float:
        """GPU share of each teacher replica of a level: a 32B teacher needs a whole GPU where a 7B one fits in
        a quarter."""
        own = self.levels[level].teacher_gpus
        return self.teachers.num_gpus if own is None else own

    def train_for(self, level: str) -> TrainConfig:
        """The direct-tuning settings of one level (defaults plus its overrides)."""
        return TrainConfig(**{**self.direct.train.model_dump(), **self.direct.overrides.get(level, {})})


_SECTIONS: dict[str, type[BaseModel]] = {}  # the config sections of stage kinds added outside this schema


def register_section(name: str, model: type[BaseModel]) -> None:
    """A top-level section for a stage kind this schema does not define (`orchestrator.run.kinds.register`)."""
    if name in RunConfig.model_fields or name in _SECTIONS:
        raise ValueError(f"config section {name!r} exists already")
    _SECTIONS[name] = model


def run_config_model() -> type[RunConfig]:
    """RunConfig with the sections of registered stage kinds (RunConfig itself when there are none)."""
    if not _SECTIONS:
        return RunConfig
    return create_model("RunConfig", __base__=RunConfig,
                        **{name: (model, Field(default_factory=model)) for name, model in _SECTIONS.items()})


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML config; raise ConfigError naming the file and key path."""
    path = Path(path)
    raw = read_raw(path)
    for item in overrides or []:
        apply_override(raw, item)
    return validate_raw(raw, str(path))


def read_raw(path: Path) -> dict:
    """The YAML mapping of a config file, with `name` defaulting to the file's stem."""
    try:
        raw = yaml.safe_load(decode_utf8(path.read_bytes(), str(path))) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except DataError as err:  # not UTF-8: FILE:LINE: not UTF-8 (byte 0x.. at column N)
        raise ConfigError(str(err)) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    raw.setdefault("name", path.stem)
    return raw


def validate_raw(raw: dict, source: str, model: type[BaseModel] | None = None) -> Any:
    """`model` (a RunConfig by default, `run_config_model`) from a raw dict; errors name `source` and the key
    path, with the nearest valid key for a typo."""
    model = model or run_config_model()
    try:
        return model(**raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: " + "; ".join(_describe(e, model) for e in err.errors())) from None


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to the raw config dict."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, value = item.split("=", 1)
    try:
        set_key(raw, key, yaml.safe_load(value))
    except ConfigError as err:
        raise ConfigError(f"--set {err}") from None


def set_key(raw: dict, key: str, value: Any) -> None:
    """Set a dotted key in a raw config dict, creating mappings on the way."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is not a mapping")
    node[parts[-1]] = value


def _describe(error: dict, root: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key '{loc}'{_suggest(error['loc'], root)}"
    return f"'{loc}': {error['msg']}" if loc else error["msg"]


def _suggest(loc: tuple, root: type[BaseModel]) -> str:
    """Nearest valid key name at the unknown key's level (walking models, lists and dicts of models)."""
    model = root
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
