"""What each level reads and what each teacher→student pair distils, decided once, before any work.

Levels whose processors encode records identically share one encoding. A run whose levels read different inputs
(levels of two families, or two tokenizers) encodes each split once with each distinct processor, in the same
rows: the first direct level's columns unprefixed, each other encoding's under `<level>:`. A student reads its
own encoding (`StageJob.inputs`); a teacher whose encoding differs from its student's reads its own encoding of
the same records (`workers.contract.TeacherInputs`). A pair whose tokenizers are one (same length and label-word
ids) distils over the teacher's top-k + tail of the shared vocabulary; a pair of two tokenizers over the answer
distribution on the two label words, which maps exactly onto any student's (`kd_over` per distillation
section; `auto` picks).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, ProcessorMixin

from orchestrator.config.schema import ConfigError, RunConfig
from orchestrator.run.kinds import StagePlan
from workers.contract import TeacherInputs
from workers.models.families import UnsupportedFamilyError, family_of, load_processor
from workers.models.model_dirs import LABEL_WORDS, label_word_ids


@dataclass(frozen=True)
class LevelInputs:
    """One level's processor and what pairing needs of it: `key` (equal keys: identical encoded rows) and its
    tokenizer's (length, label-word ids) (equal: one shared vocabulary)."""

    processor: ProcessorMixin
    key: str
    tokenizer: tuple[int, tuple[int, int]]
    pad_id: int
    image_token_id: int


def level_inputs(init_dirs: dict[str, Path], trust_remote_code: dict[str, bool]) -> dict[str, LevelInputs]:
    """Each level's inputs, from its initial model dir; refuses a dir of no supported family, and a level whose
    label words are not single tokens in its tokenizer, naming the level and the word."""
    out = {}
    for level, model_dir in init_dirs.items():
        try:
            family = family_of(model_dir).name
        except UnsupportedFamilyError as err:
            raise ConfigError(f"levels.{level}.path: {err}") from None
        processor = load_processor(model_dir)
        tok = processor.tokenizer
        for word in LABEL_WORDS:
            if len(tok.encode(word, add_special_tokens=False)) != 1:
                raise ConfigError(f"levels.{level}: label word {word!r} is not one token in its tokenizer "
                                  f"({model_dir}); hkd scores answers by single label-word tokens")
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code[level])
        out[level] = LevelInputs(processor, encoding_key(family, processor), (len(tok), label_word_ids(tok)),
                                 tok.pad_token_id, config.image_token_id)
    return out


def encoding_key(family: str, processor: ProcessorMixin) -> str:
    """A hash of everything that shapes an encoded record: family, processor class, image processor settings,
    vocabulary (added tokens included) and chat template."""
    blob = json.dumps({"family": family, "class": type(processor).__name__,
                       "image": processor.image_processor.to_dict(), "template": processor.chat_template,
                       "vocab": sorted(processor.tokenizer.get_vocab().items())}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def kd_over(cfg: RunConfig, plan: StagePlan, teacher_level: str,
            tokenizers: dict[str, tuple[int, tuple[int, int]]]) -> str:
    """`top_k` or `label_words` for one teacher of a stage, from each level's tokenizer (length, label-word ids);
    refuses top-k KD between two tokenizers."""
    section = plan.kind.section
    setting = plan.kd.kd_over
    shared = tokenizers[teacher_level] == tokenizers[plan.level]
    if setting == "auto":
        return "top_k" if shared else "label_words"
    if setting == "top_k" and not shared:
        raise ConfigError(f"{section}.kd_over: top_k needs one shared tokenizer, but levels.{teacher_level} "
                          f"(teacher of {plan.name}) has {_describe(tokenizers[teacher_level])} and "
                          f"levels.{plan.level} {_describe(tokenizers[plan.level])}; label-word KD is what applies "
                          "across tokenizers (kd_over: label_words, or auto)")
    return setting


def _describe(tokenizer: tuple[int, tuple[int, int]]) -> str:
    length, (pos, neg) = tokenizer
    return f"{length} tokens with label words at ids {pos}/{neg}"


def check_pairs(cfg: RunConfig, plans: list[StagePlan],
                tokenizers: dict[str, tuple[int, tuple[int, int]]]) -> dict[str, str]:
    """Every teacher→student pair's KD kind, `"<teacher stage>→<stage>"` → top_k | label_words (raises first)."""
    return {f"{t.stage}→{p.name}": kd_over(cfg, p, t.level, tokenizers) for p in plans for t in p.teachers}


def encodings(inputs: dict[str, LevelInputs], first: str) -> dict[str, str]:
    """The column prefix of each level's encoding: "" for the first direct level's (the one encoding of a run
    whose levels share a processor, so such a run's datasets are what they always were), `<level>:` (the first
    level with that encoding) for each other."""
    prefix_of_key = {inputs[first].key: ""}
    for level, own in inputs.items():
        prefix_of_key.setdefault(own.key, f"{level}:")
    return {level: prefix_of_key[own.key] for level, own in inputs.items()}


def other_processors(inputs: dict[str, LevelInputs], prefixes: dict[str, str]) -> dict[str, ProcessorMixin]:
    """The processors besides the first level's, by column prefix: every split is encoded once with each."""
    return {prefixes[level]: own.processor for level, own in inputs.items() if prefixes[level]}


def teacher_inputs(plan: StagePlan, inputs: dict[str, LevelInputs],
                   prefixes: dict[str, str]) -> dict[str, TeacherInputs | None]:
    """Per teacher stage of `plan`: its own inputs when its encoding differs from the student's, else None."""
    out = {}
    for t in plan.teachers:
        own = inputs[t.level]
        out[t.stage] = (None if own.key == inputs[plan.level].key else
                           TeacherInputs(prefixes[t.level], own.pad_id, own.image_token_id))
    return out


class RunInputs:
    """A run's levels' inputs: the `first` level's processor (unprefixed columns), the others' by prefix
    (`also`), and per stage what each teacher reads and distils. Built before any work: it refuses what
    `level_inputs` and `kd_over` refuse."""

    def __init__(self, cfg: RunConfig, plans: list[StagePlan], init_dirs: dict[str, Path], first: str):
        self.levels = level_inputs(init_dirs, {name: lc.trust_remote_code for name, lc in cfg.levels.items()})
        self.kinds = check_pairs(cfg, plans, {name: lv.tokenizer for name, lv in self.levels.items()})
        self.prefixes = encodings(self.levels, first)
        self.processor = self.levels[first].processor
        self.also = other_processors(self.levels, self.prefixes)

    def stage_teachers(self, plan: StagePlan) -> dict[str, tuple[bool, TeacherInputs | None]]:
        """Per teacher stage of `plan`: (label-word KD?, its own inputs or None)."""
        own = teacher_inputs(plan, self.levels, self.prefixes)
        return {t.stage: (self.kinds[f"{t.stage}→{plan.name}"] == "label_words", own[t.stage])
                for t in plan.teachers}
