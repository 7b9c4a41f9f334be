"""`hkd pretrain CONFIG.yaml`: build the pretrained tiny bases that the embedded pyramid starts from.

One fixed tokenizer (`workers.models.vocab`) is shared by every level; each level is built random-init, pretrained on
the same dialogue stream for the same steps (`workers.training.pretrain`), saved in fp16 as an ordinary Hugging Face model
dir, and given a model card (`README.md`: command, config, seed stream, steps, final losses, wall time, machine,
git revision) with its loss curve (`loss_curve.png`, `curve.json`).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, create_model

from orchestrator.config.schema import (
    ConfigError,
    Strict,
    as_tuples,
    fields_of,
    read_raw,
    validate_raw,
)
from workers.data.synth import SynthSpec
from workers.models.shapes import LevelShape

BaseShape = create_model("BaseShape", __base__=Strict, **fields_of(LevelShape))


class PretrainTrain(Strict):
    """The schedule every level gets (`workers.training.pretrain.PretrainSettings`)."""

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    questions: int = Field(6, ge=0, description="open questions per dialogue after its description")
    eval_every: int = Field(100, ge=1)


class BasesConfig(Strict):
    """A set of tiny bases: where they go, the scenes they see, one shape per level, one schedule for all."""

    name: str
    out: str = Field(description="directory of the bases (one model dir per level), relative to the repo root")
    seed: int = Field(0, ge=0, description="the pretraining seed stream `pretrain/<seed>/…` (never a benchmark "
                                           "split)")
    vocab_size: int = Field(1024, ge=512)
    image_size: int = Field(84, ge=28, multiple_of=28)
    scenes: dict[str, Any] = Field(default_factory=dict, description="SynthSpec fields of the scene sampler")
    levels: dict[str, BaseShape]  # type: ignore[valid-type]
    train: PretrainTrain = Field(default_factory=PretrainTrain)

    def spec(self) -> SynthSpec:
        return SynthSpec(image_size=self.image_size, **{k: as_tuples(v) for k, v in self.scenes.items()})


def load_bases_config(path: str | Path) -> BasesConfig:
    """Read and validate a bases config; errors name the file and key path."""
    cfg = validate_raw(read_raw(Path(path)), str(path), BasesConfig)
    try:
        cfg.spec()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: scenes: {err}") from None
    return cfg


def build_bases(cfg: BasesConfig, config_path: Path, device: str = "cpu", threads: int = 2,
                levels: list[str] | None = None) -> dict[str, dict]:
    """Build (or rebuild) every level's base, or only `levels`; returns each one's card facts."""
    import torch

    from workers.models.families import FAMILIES
    from workers.models.model_dirs import CHAT_TEMPLATE
    from workers.models.vocab import fixed_tokenizer

    torch.set_num_threads(threads)
    unknown = sorted(set(levels or []) - set(cfg.levels))
    if unknown:
        raise ConfigError(f"{config_path}: no level {unknown} under levels ({', '.join(cfg.levels)})")
    spec = cfg.spec()
    tokenizer = fixed_tokenizer(cfg.vocab_size, cfg.seed, spec)
    out = {}
    for level in levels or list(cfg.levels):
        shape = LevelShape(**cfg.levels[level].model_dump())
        family = FAMILIES[shape.family]
        processor = family.build_processor(tokenizer, cfg.image_size, CHAT_TEMPLATE)
        out[level] = _build_one(cfg, config_path, level, shape, processor, device)
    return out


def _build_one(cfg: BasesConfig, config_path: Path, level: str, shape: LevelShape, processor: Any,
               device: str) -> dict:
    """Pretrain one level and write its model dir with its card."""
    import torch

    from orchestrator.cluster.machine import probe
    from workers.models.families import FAMILIES
    from workers.models.identity import weights_hash
    from workers.models.model_dirs import count_parameters, save_model_dir
    from workers.training.pretrain import PretrainSettings, pretrain_base

    family = FAMILIES[shape.family]
    torch.manual_seed(cfg.seed)
    model = family.model_class(family.build_config(shape, processor.tokenizer)).to(device)
    settings = PretrainSettings(**cfg.train.model_dump())
    start = time.perf_counter()
    print(f"[pretrain] {level}: {count_parameters(model) / 1e6:.2f}M params, {settings.steps} steps", flush=True)

    def log(step: int, point: dict) -> None:
        if "held_out_loss" in point:
            print(f"[pretrain] {level} step {step}/{settings.steps} · loss {point['loss']:.3f} · held-out "
                  f"{point['held_out_loss']:.3f} (token accuracy {point['held_out_accuracy']:.3f}) · "
                  f"{point['s']:.0f} s", flush=True)

    curve = pretrain_base(model, processor, settings, cfg.spec(), cfg.seed, device, log)
    wall = time.perf_counter() - start
    target = Path(cfg.out) / level
    save_model_dir(model.to("cpu", torch.float16), processor, target)
    last = curve[-1]
    card = {"level": level, "params": count_parameters(model), "shape": cfg.levels[level].model_dump(),
            "steps": settings.steps, "final_train_loss": _tail_mean(curve, 50),
            "final_held_out_loss": last["held_out_loss"], "final_held_out_accuracy": last["held_out_accuracy"],
            "wall_s": round(wall, 1), "device": device, "threads": torch.get_num_threads(), "machine": probe(),
            "git": _git_revision(),
            "command": "hkd pretrain " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2
            else f"hkd pretrain {config_path}",
            "config": cfg.model_dump(), "seed_stream": f"pretrain/{cfg.seed}/item/<i>", "weights_sha256":
            weights_hash(target)}
    write_card(target, card, curve)
    return card


def _tail_mean(curve: list[dict], n: int) -> float:
    tail = [p["loss"] for p in curve[-n:]]
    return round(sum(tail) / len(tail), 4)


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return rev.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_card(model_dir: Path, card: dict, curve: list[dict]) -> None:
    """The model card: README.md (facts in words and a table), card.json, curve.json and loss_curve.png."""
    from orchestrator.cluster.machine import describe

    (model_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (model_dir / "curve.json").write_text(json.dumps([{k: round(v, 4) for k, v in p.items()} for p in curve]) + "\n")
    _plot_curve(curve, model_dir / "loss_curve.png", card["level"])
    m = card["machine"]
    lines = [
        f"# Tiny base {card['level']} ({card['params'] / 1e6:.2f}M parameters, {card['shape']['family']})", "",
        "A task-agnostic pretrained base of hkd4vlm's embedded pyramid: it has learned to describe generated scenes, "
        "answer open questions about them and read a word defined in the text. It has never seen the benchmark's "
        "prompts, captions, options, contexts, claims or any yes/no judgement (docs/method.md, Pretrained bases).", "",
        f"- **Command:** `{card['command']}` (git {card['git']})",
        f"- **Seed stream:** `{card['seed_stream']}`; held-out dialogues from stream "
        f"{card['config']['seed'] + 1_000_000}",
        f"- **Steps:** {card['steps']} × batch {card['config']['train']['batch_size']}, lr "
        f"{card['config']['train']['lr']}",
        f"- **Final losses:** train {card['final_train_loss']} (mean of the last 50 steps), held-out "
        f"{card['final_held_out_loss']:.4f}, held-out answer-token accuracy {card['final_held_out_accuracy']:.4f}",
        f"- **Wall time:** {card['wall_s'] / 60:.1f} min on {card['device']} ({card['threads']} torch thread(s)); "
        f"machine at the end: {describe(m)} ({m['cpu']})",
        f"- **Weights:** fp16 safetensors, sha256 `{card['weights_sha256'][:16]}…`", "",
        "![loss curve](loss_curve.png)", "",
        "## Config", "", "```yaml", yaml.safe_dump(card["config"], sort_keys=False).strip(), "```", "",
    ]
    (model_dir / "README.md").write_text("\n".join(lines))


def _plot_curve(curve: list[dict], path: Path, level: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=80)
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], alpha=0.3, lw=0.8, label="train (per step)")
    held = [p for p in curve if "held_out_loss" in p]
    ax.plot([p["step"] for p in held], [p["held_out_loss"] for p in held], "o-", ms=3, label="held-out")
    ax.set(xlabel="step", ylabel="answer-token loss", yscale="log", title=f"base {level}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
