"""The model pyramid: offline tiny levels, their shared tokenizer, saving and loading.

The tiny levels are built from their family's config class (`workers.models.families`) with random weights and saved
as ordinary Hugging Face model dirs, so the exact code path that loads them (`load_model_dir`) also loads
`Qwen/Qwen2.5-VL-7B-Instruct` or any local checkpoint dir of a supported family.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from workers.models.families import FAMILIES, family_of, load_processor
from workers.models.families.interop import write_own_processor_files
from workers.models.lora import ADAPTER_DIR, is_lora
from workers.models.shapes import LevelShape

# Qwen's special tokens, in Qwen's order, so ids line up with the real tokenizer's layout (offset aside).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
LABEL_WORDS = ("yes", "no")  # positive, negative answer words; each must be one token

# Qwen2-VL's chat template (system turn optional), trimmed of the video branch we never use.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


ROLE_WORDS = ("user", "assistant", "system")  # the chat template's role names, read bare after <|im_start|>


def build_tokenizer(corpus: list[str], vocab_size: int = 1024, words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`, Qwen special tokens first, Qwen chat conventions. Each of `words` is
    made one token both as it reads inside a sentence (after a space) and at the start of a line or turn."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Pseudo-words pad the corpus so BPE reaches the requested vocabulary size.
    padding = [f"{chr(97 + i % 26)}{chr(97 + (i // 26) % 26)}{chr(97 + (i // 676) % 26)}{i}" for i in range(4000)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Bare label and role words (an answer follows "assistant\n" with no leading space) and every required word
    # frequent enough to merge whole before any pseudo-word does.
    bare = [w for w in LABEL_WORDS + ROLE_WORDS + words for _ in range(1000)]
    spaced = [" ".join([w] * 1000) for w in words]
    tok.train_from_iterator(spaced + corpus + [" " + " ".join(padding)] + bare, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    split = [w for w in LABEL_WORDS + ROLE_WORDS + words if len(fast.encode(w, add_special_tokens=False)) != 1]
    split += [w for w in words if len(fast.encode(" " + w, add_special_tokens=False)) != 1]
    if split:
        raise RuntimeError(f"{len(split)} required words are not single tokens at vocab_size {vocab_size} "
                           f"(e.g. {split[:5]}): raise vocab_size")
    return fast


def build_level(out_dir: str | Path, shape: LevelShape, tokenizer: PreTrainedTokenizerFast, image_size: int,
                seed: int = 0) -> Path:
    """Build one random-init level of its family and save it (weights, tokenizer, processor) as a HF model dir."""
    family = FAMILIES[shape.family]
    torch.manual_seed(seed)
    model = family.model_class(family.build_config(shape, tokenizer))
    return save_model_dir(model, family.build_processor(tokenizer, image_size, CHAT_TEMPLATE), out_dir)


def save_model_dir(model: torch.nn.Module, processor: ProcessorMixin, out_dir: str | Path,
                   extra: dict | None = None) -> Path:
    """Write a complete model dir under a temporary name, then rename: a dir that exists is complete.

    The processor files name the family's own processor class, so plain `transformers` loads the dir
    (`workers.models.families.interop`). A LoRA (PEFT) model is saved as its adapter under `adapter/` plus merged
    weights; it is merged in place, so save it after its last training step. A failed write (disk full, read-only
    storage) removes its partial temporary dir; a previous dir of the same name is moved aside, never deleted in
    place, so a crash cannot leave it half-deleted.
    """
    out = Path(out_dir)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        if is_lora(model):
            model.save_pretrained(tmp / ADAPTER_DIR)
            model = model.merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        write_own_processor_files(tmp, family_of(tmp).own)
        if extra:
            (tmp / "hkd.json").write_text(json.dumps(extra, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def load_model_dir(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   trust_remote_code: bool = False) -> tuple[torch.nn.Module, ProcessorMixin]:
    """Load a HF model dir of a supported family (ours or a real checkpoint) with its processor.

    Weights load from safetensors only (a pickled `.bin` could run code); a model's own Python code runs
    only when the caller opts in with `trust_remote_code`, and then with a warning naming the model.
    """
    check_model_dir(model_dir)
    if trust_remote_code:
        warnings.warn(f"trust_remote_code is on for {model_dir}: its Python code will run", stacklevel=2)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                                        use_safetensors=True)
    processor = load_processor(model_dir)
    return model.to(device), processor


class ModelDirError(FileNotFoundError):
    """A local model dir that cannot be loaded; the message names the dir and what is missing."""


def check_model_dir(model_dir: str | Path) -> None:
    """Refuse a local dir missing the config, safetensors weights (every shard of an index) or tokenizer,
    before anything loads. A path that does not exist is left to Hugging Face (a hub name)."""
    path = Path(model_dir)
    if not path.exists():
        return
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (path / name).is_file()]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing += [s for s in shards if not (path / s).is_file()]
    elif not (path / "model.safetensors").is_file():
        missing.append("model.safetensors")
    if missing:
        raise ModelDirError(f"{path}: not a complete model dir ({', '.join(missing)} missing)")


def label_word_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, int]:
    """Token ids of the positive and negative label words (single tokens by construction)."""
    ids = []
    for word in LABEL_WORDS:
        enc = tokenizer.encode(word, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"label word {word!r} is {len(enc)} tokens in this tokenizer; it must be one")
        ids.append(enc[0])
    return ids[0], ids[1]


def check_same_tokenizer(teacher: PreTrainedTokenizerFast, student: PreTrainedTokenizerFast,
                         teacher_name: str = "teacher", student_name: str = "student") -> None:
    """Refuse a teacher/student pair whose tokenizers differ.

    Compares tokenizer length and label-word ids, never `config.vocab_size` (real Qwen2.5-VL sizes of one
    tokenizer pad their embedding tables differently).
    """
    if len(teacher) != len(student):
        raise ValueError(f"tokenizer mismatch: {teacher_name} has {len(teacher)} tokens, "
                         f"{student_name} has {len(student)}; distillation needs one shared tokenizer")
    t_ids, s_ids = label_word_ids(teacher), label_word_ids(student)
    if t_ids != s_ids:
        raise ValueError(f"tokenizer mismatch: label words {LABEL_WORDS} are ids {t_ids} in {teacher_name} "
                         f"but {s_ids} in {student_name}; distillation needs one shared tokenizer")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

