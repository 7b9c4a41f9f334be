"""`hkd plan`: check a run's teacher→student pairs (KD over top-k + tail where they share a tokenizer, over the
label words where they do not: `orchestrator.run.pairs`), placement and per-GPU memory before any weights exist.

Each level is built on the meta device (shapes, no memory) from its config: a local model dir's config.json,
a mirror named after the hub checkpoint in `--model-configs` (configs/qwen2_5_vl/ has 3B/7B/32B/72B), else the
hub's config.json; tiny levels from their shape. A process's memory counts weights and, when it trains,
gradients and AdamW moments; ACTIVATION_SHARE of its GPU share stays free for activations and the CUDA context.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from orchestrator.config.schema import ConfigError, RunConfig, TrainConfig
from orchestrator.run.kinds import StagePlan, plan_stages
from orchestrator.run.pairs import check_pairs
from workers.models.families import FAMILIES, load_processor
from workers.models.lora import add_lora
from workers.models.model_dirs import CHAT_TEMPLATE, LevelShape, label_word_ids
from workers.models.vocab import fixed_tokenizer

ACTIVATION_SHARE = 0.15
GB = 1e9
TOKENIZER_FACTS = "tokenizer.json"  # in --model-configs: {"length": int, "label_word_ids": [positive, negative]}
BYTES = {"float32": 4, "bfloat16": 2}


@dataclass
class Level:
    """What the plan needs of one level: its parameter count, embedding rows and the tokenizer it was made for."""

    config: PretrainedConfig
    params: int
    rows: int
    tokenizer: tuple[int, tuple[int, int]]  # (length, label-word ids)


def plan_run(cfg: RunConfig, model_configs: list[Path] = (),
             cluster: Path | None = None) -> tuple[list[dict], list[str]]:
    """Rows of the memory table and the list of problems (empty: the run fits as configured)."""
    levels = {name: _level(cfg, name, model_configs) for name in cfg.levels}
    problems = _embedding_problems(levels)
    stages = plan_stages(cfg)
    kinds = check_pairs(cfg, stages, {name: lv.tokenizer for name, lv in levels.items()})
    adapters: dict = {}
    rows = [_train_row(cfg, s, levels[s.level], adapters) | {"kd": _kd_column(cfg, s, kinds)} for s in stages]
    teacher_levels = dict.fromkeys(t.level for s in stages for t in s.teachers)
    rows += [_teacher_row(cfg, name, levels[name]) | {"kd": ""} for name in teacher_levels]
    problems += [f"{r['process']}: needs {r['need_gb']:.1f} GB, its GPU share allows {r['limit_gb']:.1f} GB"
                 for r in rows if r["limit_gb"] is not None and r["need_gb"] > r["limit_gb"]]
    problems += _share_problems(cfg, teacher_levels)
    if cluster is not None:
        problems += cluster_problems(cfg, stages, cluster)
    return rows, problems


def _level(cfg: RunConfig, name: str, model_configs: list[Path]) -> Level:
    lc = cfg.levels[name]
    if lc.path is None:
        shape = LevelShape(**lc.shape_fields())
        family, shared = FAMILIES[shape.family], _tiny_tokenizer(cfg.vocab_size)
        config = family.build_config(shape, shared)
        # the level's own tokenizer: a family may append its image tokens to the shared one
        tokenizer = family.build_processor(shared, cfg.data.synth.image_size, CHAT_TEMPLATE).tokenizer
        facts = (len(tokenizer), label_word_ids(tokenizer))
    else:
        config, facts = _hf_config(name, lc.path, model_configs)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    return Level(config, params, model.get_input_embeddings().weight.shape[0], facts)


@functools.lru_cache(maxsize=2)
def _tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """The tiny levels' fixed tokenizer at the run's size."""
    return fixed_tokenizer(vocab_size)


def _hf_config(name: str, path: str, model_configs: list[Path]) -> tuple[PretrainedConfig, tuple]:
    """A checkpoint's config and tokenizer facts: its own dir, else its mirror (the first of `model_configs` that
    has `<checkpoint name>.json`, with the tokenizer facts beside it), else the hub (config only)."""
    local = Path(path)
    if (local / "config.json").is_file():
        tokenizer = load_processor(local).tokenizer
        try:
            return AutoConfig.from_pretrained(local), (len(tokenizer), label_word_ids(tokenizer))
        except ValueError as err:  # a label word that is not one token
            raise ConfigError(f"levels.{name}: {err} ({local})") from None
    mirrors = [d for d in model_configs if (d / f"{local.name}.json").is_file()]
    if mirrors:
        config = AutoConfig.for_model(**json.loads((mirrors[0] / f"{local.name}.json").read_text()))
    else:
        try:
            config = AutoConfig.from_pretrained(path)
        except OSError as err:
            looked = ", ".join(str(d) for d in model_configs) or "not given"
            raise ConfigError(f"levels.{name}.path: {path} is neither a model dir nor mirrored in "
                              f"--model-configs ({looked}), and the hub is unreachable: {err}") from None
    facts_file = next((d / TOKENIZER_FACTS for d in mirrors or model_configs if (d / TOKENIZER_FACTS).is_file()), None)
    if facts_file is None:
        raise ConfigError(f"levels.{name}.path: no local tokenizer for {path}; give --model-configs with "
                          f"{TOKENIZER_FACTS} (its length and label-word ids)")
    facts = json.loads(facts_file.read_text())
    return config, (facts["length"], tuple(facts["label_word_ids"]))


def _embedding_problems(levels: dict[str, Level]) -> list[str]:
    """Each embedding table has a row per token. Rows beyond the tokenizer are padding and differ by size
    (Qwen2.5-VL 3B: 151,936; 7B/32B/72B: 152,064)."""
    return [f"levels.{name}: {lv.rows} embedding rows for a tokenizer of {lv.tokenizer[0]} tokens"
            for name, lv in levels.items() if lv.rows < lv.tokenizer[0]]


def _kd_column(cfg: RunConfig, stage: StagePlan, kinds: dict[str, str]) -> str:
    """What the stage's KD runs over, per teacher (`orchestrator.run.pairs.kd_over`)."""
    names = {"top_k": f"top-{cfg.teachers.k} + tail", "label_words": "label words"}
    return ", ".join(f"{names[kinds[t.stage + '→' + stage.name]]} ({t.level})" for t in stage.teachers) or "-"


def _train_row(cfg: RunConfig, stage: StagePlan, level: Level, adapters: dict) -> dict:
    """`adapters` caches adapter sizes per (level, LoRA settings) across the stages that share them."""
    train: TrainConfig = stage.train
    size = BYTES[train.dtype]
    if train.lora:
        key = (stage.level, train.lora.model_dump_json())
        if key not in adapters:
            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(level.config, dtype=torch.bfloat16)
                adapters[key] = add_lora(model, train.lora.model_dump()).get_nb_trainable_parameters()[0]
        trainable = adapters[key]
        need = level.params * size + trainable * 16  # fp32 adapter: weight, gradient, two AdamW moments
    else:
        trainable = level.params
        need = level.params * size * 4  # weight, gradient, two AdamW moments in the parameter dtype
    share = cfg.resources.gpus_per_worker if cfg.resources.use_gpu else 0.0
    return _row(cfg, f"train {stage.name} ×{cfg.resources.num_workers}", level, trainable, train.dtype, share, need)


def _teacher_row(cfg: RunConfig, name: str, level: Level) -> dict:
    share = cfg.teacher_gpus(name)
    dtype = "bfloat16" if share else "float32"  # what `workers.teachers.pool.Teacher` loads on GPU / CPU
    return _row(cfg, f"teacher {name} ×{cfg.teachers.replicas}", level, 0, dtype, share, level.params * BYTES[dtype])


def _row(cfg: RunConfig, process: str, level: Level, trainable: int, dtype: str, share: float,
         need: float) -> dict:
    limit = share * cfg.placement.gpu_memory_gb * (1 - ACTIVATION_SHARE) if share else None
    return {"process": process, "params": level.params, "rows": level.rows, "trainable": trainable,
            "dtype": dtype, "gpu_share": share, "need_gb": need / GB, "limit_gb": limit}


def _share_problems(cfg: RunConfig, teacher_levels: dict) -> list[str]:
    """Ray accepts GPU shares up to 1 or whole GPUs."""
    shares = [(f"levels.{n}.teacher_gpus (or teachers.num_gpus)", cfg.teacher_gpus(n)) for n in teacher_levels]
    if cfg.resources.use_gpu:
        shares.append(("resources.gpus_per_worker", cfg.resources.gpus_per_worker))
    return [f"{key}: {share} is neither at most 1 nor a whole number of GPUs"
            for key, share in shares if share > 1 and share != int(share)]


def cluster_problems(cfg: RunConfig, stages: list[StagePlan], cluster_file: Path) -> list[str]:
    """Peak teacher and student demand (custom resources and GPUs) against the node types of a cluster.yaml
    that advertise the placement's resources, at their max_workers."""
    try:
        cluster = yaml.safe_load(Path(cluster_file).read_text())
        types = cluster["available_node_types"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise ConfigError(f"{cluster_file}: not a cluster config with available_node_types ({err})") from None
    teacher_gpus = max((sum(cfg.teachers.replicas * cfg.teacher_gpus(lv) for lv in alive)
                        for alive in _alive_teachers(stages)), default=0.0)
    teacher_count = max((len(alive) * cfg.teachers.replicas for alive in _alive_teachers(stages)), default=0)
    res = cfg.resources
    demands = [("teacher", cfg.placement.teacher, teacher_count, teacher_gpus),
               ("student", cfg.placement.student, res.num_workers, res.num_workers * res.gpus_per_worker
                if res.use_gpu else 0.0)]
    problems = []
    for role, custom, count, gpus in demands:
        nodes = [t for t in types.values() if all(k in t.get("resources", {}) for k in custom)]
        have = {k: sum(t["resources"][k] * t.get("max_workers", 1) for t in nodes) for k in custom}
        have_gpus = sum(t.get("resources", {}).get("GPU", 0) * t.get("max_workers", 1) for t in nodes)
        for k, amount in custom.items():
            if amount * count > have[k]:
                problems.append(f"placement.{role}.{k}: {count} processes need {amount * count:g}, "
                                f"{cluster_file} offers {have[k]:g}")
        if gpus > have_gpus:
            problems.append(f"{role}s need {gpus:g} GPUs at once, {cluster_file}'s {role} nodes offer {have_gpus:g}")
    return problems


def _alive_teachers(stages: list[StagePlan]) -> list[list[str]]:
    """Levels of the teacher pools up during each stage: started by then and needed by it or later."""
    used = [{t.stage: t.level for t in s.teachers} for s in stages]
    out = []
    for i in range(len(stages)):
        started = {k: v for u in used[: i + 1] for k, v in u.items()}
        needed = {k for u in used[i:] for k in u}
        out.append([lv for k, lv in started.items() if k in needed])
    return out


def format_table(rows: list[dict], gpu_memory_gb: float) -> str:
    head = (f"{'process':<22} {'params':>9} {'vocab rows':>10} {'trainable':>10} {'dtype':>9} {'GPU':>5} "
            f"{'need GB':>8} {'limit GB':>9}  KD over (teacher)")
    lines = [head, "-" * len(head)]
    for r in rows:
        limit = f"{r['limit_gb']:.1f}" if r["limit_gb"] is not None else "cpu"
        trainable = f"{r['trainable'] / 1e6:.1f}M" if r["trainable"] else "frozen"
        lines.append(f"{r['process']:<22} {r['params'] / 1e9:>8.2f}B {r['rows']:>10} {trainable:>10} {r['dtype']:>9} "
                     f"{r['gpu_share']:>5g} {r['need_gb']:>8.1f} {limit:>9}  {r['kd']}")
    lines.append(f"limit = GPU share × {gpu_memory_gb:g} GB × {1 - ACTIVATION_SHARE:.2f} (the rest: activations)")
    return "\n".join(lines)
