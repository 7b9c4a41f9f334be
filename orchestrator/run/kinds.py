"""Stage kinds, each defined once: its config section, how it plans its stages, its objective and its teachers'
roles. The orchestrator dispatches through `KINDS` (a plan carries its kind), never on a kind's name; a new kind
is one `register` call in its own module.

Kinds plan in the order they were registered: grounding → direct → PPOD → TCRD, then any added kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pydantic import BaseModel

from orchestrator.config.schema import (
    ConfigError,
    KDSettings,
    PretrainConfig,
    RunConfig,
    TrainConfig,
    register_section,
)
from workers.contract import Objective


@dataclass(frozen=True)
class StageTeacher:
    """One teacher of a planned stage: the trained stage it is, its level, its KD weight and temperature, and
    whether its term is coupled (TCRD's per-sample trust weights)."""

    stage: str
    level: str
    weight: float
    temperature: float
    coupled: bool


@dataclass(frozen=True)
class StageKind:
    """What makes a stage of this kind: `section` (its config section; `section_model` validates it where the
    run config's schema does not define it), `plan` (adds its stages to a `Planning`), `objective` (the workers'
    loss; None for a stage with no task, grounding pre-training: not tested, no report row) and `distills`
    (trains on the unlabelled inputs too, when there are any)."""

    name: str
    section: str
    plan: Callable[[Planning], None]
    objective: Objective | None
    distills: bool = False
    section_model: type[BaseModel] | None = None

    @property
    def task(self) -> bool:
        """A task stage: trained on the benchmark's labels, tested, a row of the report."""
        return self.objective is not None


@dataclass
class StagePlan:
    """One stage of a run: which level trains, from which model, against which teachers, with what loss."""

    name: str
    level: str
    kind: StageKind
    init: str | None  # stage whose model initialises the student; None: the level's initial model
    train: TrainConfig | PretrainConfig
    ce_weight: float = 1.0
    teachers: tuple[StageTeacher, ...] = ()
    sharpness: float = 10.0
    kd: KDSettings = field(default_factory=KDSettings)  # the divergence of the KD terms
    unlabeled_weight: float = 0.0  # of the KD-only term over unlabelled inputs (distillation stages)


@dataclass
class Planning:
    """The plan as the kinds build it: the stages so far, each level's latest trained stage (its teacher, and
    the next stage's start, from then on) and the grounding stage each tiny level starts from."""

    cfg: RunConfig
    plans: list[StagePlan] = field(default_factory=list)
    latest: dict[str, str] = field(default_factory=dict)
    ground: dict[str, str] = field(default_factory=dict)

    def add(self, plan: StagePlan) -> None:
        self.plans.append(plan)
        if plan.kind.task:
            self.latest[plan.level] = plan.name

    def need(self, level: str, section: str) -> str:
        """The latest trained stage of `level`, which a `section` stage starts from or learns from."""
        if level not in self.latest:
            raise ConfigError(f"{section} needs a trained {level!r}: list it under direct.levels or an earlier "
                              "ppod stage")
        return self.latest[level]


KINDS: dict[str, StageKind] = {}


def register(kind: StageKind) -> StageKind:
    """Add a stage kind (a name taken already is refused); its section, when the schema lacks it, becomes a key
    of the run config."""
    if kind.name in KINDS:
        raise ValueError(f"stage kind {kind.name!r} is registered already")
    if kind.section_model is not None:
        register_section(kind.section, kind.section_model)
    KINDS[kind.name] = kind
    return kind


def plan_stages(cfg: RunConfig) -> list[StagePlan]:
    """(Grounding pre-training of tiny levels →) direct tuning → PPOD level by level → TCRD (→ added kinds), each
    part switchable (how the ablation rows are made). A level's teacher is its latest trained version: after its
    PPOD stage, the distilled one."""
    planning = Planning(cfg)
    for kind in KINDS.values():
        kind.plan(planning)
    return planning.plans


def uses_unlabeled(cfg: RunConfig, plan: StagePlan) -> bool:
    """Whether the stage trains on the unlabelled inputs too: distillation stages, when there are any."""
    return plan.kind.distills and cfg.data.has_unlabeled()


def _kd(section: KDSettings) -> KDSettings:
    return KDSettings(**section.model_dump(include=set(KDSettings.model_fields)))


def _plan_grounding(p: Planning) -> None:
    cfg = p.cfg
    trained = cfg.direct.levels + ([st.student for st in cfg.ppod.stages] if cfg.ppod.enabled else [])
    p.ground = {lv: f"{lv}-grounding" for lv, lc in cfg.levels.items()
                if cfg.pretrain.enabled and not lc.path and lv in trained}
    for lv, name in p.ground.items():
        p.add(StagePlan(name, lv, GROUNDING, None, cfg.pretrain))


def _plan_direct(p: Planning) -> None:
    for lv in p.cfg.direct.levels:
        p.add(StagePlan(f"{lv}-direct", lv, DIRECT, p.ground.get(lv), p.cfg.train_for(lv)))


def _plan_ppod(p: Planning) -> None:
    """Level by level, each student learns from the latest versions of its teachers (weighted, one temperature)."""
    ppod = p.cfg.ppod
    if not ppod.enabled:
        return
    for st in ppod.stages:
        teachers = tuple(StageTeacher(p.need(t.level, "ppod"), t.level, t.weight, ppod.temperature, False)
                         for t in st.teachers)
        p.add(StagePlan(f"{st.student}+PPOD", st.student, PPOD, p.ground.get(st.student), ppod.train,
                        ppod.ce_weight, teachers, kd=_kd(ppod), unlabeled_weight=ppod.unlabeled_weight))


def _plan_tcrd(p: Planning) -> None:
    """The student, from its latest version, learns from the top level and the assistant (terms coupled unless
    `tcrd.coupled` is off)."""
    tc = p.cfg.tcrd
    if not tc.enabled:
        return
    init = p.need(tc.student, "tcrd")
    teachers = tuple(StageTeacher(p.need(lv, "tcrd"), lv, w, tc.temperature, tc.coupled)
                     for lv, w in ((tc.top, tc.top_weight), (tc.assistant, tc.assistant_weight)))
    p.add(StagePlan(f"{init.removesuffix('-direct')}+TCRD", tc.student, TCRD, init, tc.train, tc.ce_weight, teachers,
                    tc.sharpness, _kd(tc), tc.unlabeled_weight))


GROUNDING = register(StageKind("grounding", "pretrain", _plan_grounding, objective=None))
DIRECT = register(StageKind("direct", "direct", _plan_direct, Objective.CE))
PPOD = register(StageKind("ppod", "ppod", _plan_ppod, Objective.DISTILL, distills=True))
TCRD = register(StageKind("tcrd", "tcrd", _plan_tcrd, Objective.DISTILL, distills=True))
