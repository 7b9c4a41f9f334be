"""The typed contract between the orchestrator and the workers: what one training stage needs, as frozen
dataclasses the orchestrator builds once from the validated run config (`orchestrator.run.stages.stage_job`),
and the names both sides dispatch on (`KDLoss`, `Objective`).

Where defaults live: once, in the type that owns the setting. The run config's schema
(`orchestrator/config/schema.py`) owns the pipeline's; the worker types it is generated from own theirs
(`LevelShape`, `AugmentConfig`, `SynthSpec`: the schema takes their fields and defaults, restating none). No field
here has a default: a job carries every value, and a worker never fills in a setting of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

from workers.data.synth import SynthSpec


class _Named(str, Enum):
    """A name that is also its string (in YAML, JSON, MLflow params and fingerprints)."""

    def __str__(self) -> str:
        return self.value


class KDLoss(_Named):
    """The divergence of a KD term (`workers.losses`): forward KL, reverse KL or the Jensen-Shannon divergence."""

    FORWARD_KL = "forward_kl"
    REVERSE_KL = "reverse_kl"
    JSD = "jsd"


class Objective(_Named):
    """A task stage's loss (`workers.training.objectives`): cross-entropy on the labels alone, or CE plus KD terms
    against its teachers. Which stage kind uses which is the orchestrator's registry (`orchestrator.run.kinds`)."""

    CE = "ce"
    DISTILL = "distill"


class OutputKind(_Named):
    """What a teacher sends (`workers.teachers.outputs.TeacherOutput`): its top-k + tail over the shared vocabulary
    (with its label-word logits), or, to a student with another tokenizer, its label-word logits alone."""

    TOP_K = "top_k"
    LABEL_WORDS = "label_words"


UnlabeledUse = Literal["kd", "pseudo_labels", "gold_labels"]
UNLABELED_USES: tuple[str, ...] = ("kd", "pseudo_labels", "gold_labels")


@dataclass(frozen=True)
class TeacherInputs:
    """A teacher's own encoding of the stage's records, for a teacher whose processor differs from the student's:
    its columns in the stage's datasets carry `prefix`, and batch with its tokenizer's pad and image token ids."""

    prefix: str
    pad_id: int
    image_token_id: int


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of a stage: the trained stage it is, the actor pool serving it, its KD weight and
    temperature, whether its KD term is coupled (per-sample trust weights, TCRD), whether it runs over the two
    label words (`label_words`: a teacher with another tokenizer) rather than top-k + tail, and its own
    inputs (None: it reads the student's batch)."""

    stage: str
    level: str
    pool: str
    replicas: int
    weight: float
    temperature: float
    coupled: bool
    label_words: bool
    inputs: TeacherInputs | None

    @property
    def tag(self) -> str:
        """The teacher's name in metric keys ('+' is not valid in an MLflow key)."""
        return self.stage.replace("+", "_")


@dataclass(frozen=True)
class CacheSpec:
    """Teacher-output cache of a stage (`workers.teachers.cache`): where, and how large before evicting."""

    root: str
    max_bytes: int


@dataclass(frozen=True)
class StageLossConfig:
    """A stage's objective and how its teacher outputs are fetched.

    objective: CE only, or distillation (`workers.training.objectives`); kd_loss/beta: the divergence of every KD term
    (`beta` is JSD's mixture weight); k: top-k on the wire; prefetch: batches whose teacher outputs are
    requested ahead of the step; call_retries: resends of a teacher call whose replicas died; sharpness:
    of the coupling weights; unlabeled_weight: of the term over unlabelled positions (target -1);
    unlabeled_use: that term's target, the teachers' soft outputs (kd) or the top teacher's decision
    (pseudo_labels; gold_labels rows carry their labels, so have none); top_teacher: that teacher's index."""

    objective: Objective
    ce_weight: float
    kd_loss: KDLoss
    beta: float
    k: int
    prefetch: int
    call_retries: int
    sharpness: float
    teachers: tuple[TeacherSpec, ...]
    cache: CacheSpec | None
    unlabeled_weight: float
    unlabeled_use: UnlabeledUse
    top_teacher: int

    def __post_init__(self):
        try:
            object.__setattr__(self, "kd_loss", KDLoss(self.kd_loss))  # a name given as a plain string
        except ValueError:
            raise ValueError(f"kd_loss must be one of {[str(k) for k in KDLoss]}, got {self.kd_loss!r}") from None
        object.__setattr__(self, "objective", Objective(self.objective))
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.objective == Objective.CE and self.teachers:
            raise ValueError("a CE-only stage has no teachers")
        if self.unlabeled_use not in UNLABELED_USES:
            raise ValueError(f"unlabeled_use must be one of {UNLABELED_USES}, got {self.unlabeled_use!r}")
        if self.teachers and not 0 <= self.top_teacher < len(self.teachers):
            raise ValueError(f"top_teacher {self.top_teacher} is not one of the {len(self.teachers)} teachers")


@dataclass(frozen=True)
class TrainSettings:
    """Optimizer and schedule of one stage (`orchestrator.config.schema.TrainConfig`'s fields; `lora` as its dict);
    `eval_every`: steps between validation scores (0: at epoch ends only); `balance_tasks`: the objective's
    per-task weighting (`workers.training.objectives.task_weights`)."""

    epochs: float
    batch_size: int
    lr: float
    dtype: str
    weight_decay: float
    warmup_ratio: float
    grad_clip: float
    log_every: int
    lora: dict | None
    eval_every: int
    balance_tasks: bool


@dataclass(frozen=True)
class StageJob:
    """Everything `workers.training.loop.train_loop_per_worker` needs for one task stage.

    train_sets: the Ray Train dataset names, one per epoch when augmenting (the last one repeats);
    n_units: training records per epoch (sets the step count: a unit is a record, one forward each);
    tracking: {uri, run_id} of the stage's MLflow run;
    progress: the file rank 0 writes its step count to (the driver's step bar);
    inputs: the column prefix of the student's encoding in the datasets ("": the unprefixed columns)."""

    model_dir: str
    out_dir: str
    train: TrainSettings
    loss: StageLossConfig
    n_units: int
    train_sets: tuple[str, ...]
    threads: int
    seed: int
    tracking: dict | None
    progress: str | None
    trust_remote_code: bool
    inputs: str


@dataclass(frozen=True)
class GroundingSettings:
    """Schedule of a grounding pre-training stage (`orchestrator.config.schema.PretrainConfig`'s fields)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    grad_clip: float
    log_every: int


@dataclass(frozen=True)
class GroundingJob:
    """Everything `workers.training.grounding.grounding_loop_per_worker` needs for one grounding stage: scenes
    come from the generator (`spec`) per step, so it has no dataset."""

    model_dir: str
    out_dir: str
    train: GroundingSettings
    spec: SynthSpec
    threads: int
    seed: int
    tracking: dict | None
    progress: str | None
