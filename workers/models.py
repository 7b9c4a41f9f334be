"""The model pyramid: offline tiny Qwen2.5-VL levels, their shared tokenizer and processor, and loading.

The tiny levels are built from `Qwen2_5_VLConfig` with random weights and saved as ordinary Hugging Face
model dirs, so the exact code path that loads them (`load_model_dir`) also loads `Qwen/Qwen2.5-VL-7B-Instruct`
or any local checkpoint dir.
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
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from workers.lora import ADAPTER_DIR, is_lora
from workers.shapes import LevelShape

# Qwen's special tokens, in Qwen's order, so ids line up with the real tokenizer's layout (offset aside).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
LABEL_WORDS = ("yes", "no")  # positive, negative answer words; each must be one token
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Qwen2-VL's chat template (system turn optional), trimmed of the video branch we never use.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class HKDProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without a video processor.

    `Qwen2_5_VLProcessor` cannot be built without torchvision (its video processor needs it); ProcessorMixin
    reads the parts from `__init__`'s signature, so a signature without `video_processor` builds and reloads.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        super(Qwen2_5_VLProcessor, self).__init__(image_processor, tokenizer, chat_template=chat_template)


def build_tokenizer(corpus: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the benchmark's texts, Qwen special tokens first, Qwen chat conventions."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Pseudo-words pad the corpus so BPE reaches the requested vocabulary size.
    padding = [f"{chr(97 + i % 26)}{chr(97 + (i // 26) % 26)}{chr(97 + (i // 676) % 26)}{i}" for i in range(4000)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # The answer follows "assistant\n" with no leading space: make each bare label word frequent enough to merge.
    answers = [w for w in LABEL_WORDS for _ in range(1000)]
    tok.train_from_iterator(corpus + [" " + " ".join(padding)] + answers, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    for word in LABEL_WORDS:
        if len(fast.encode(word, add_special_tokens=False)) != 1:
            raise RuntimeError(f"label word {word!r} is not a single token in the built tokenizer")
    return fast


def build_image_processor(image_size: int) -> Qwen2VLImageProcessorPil:
    """Qwen-VL image processor pinned to one square size, so every image gives the same token count."""
    pixels = image_size * image_size
    return Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2, temporal_patch_size=2,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )


def build_config(shape: LevelShape, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the given shape over the shared tokenizer."""
    head_dim = shape.hidden // shape.heads
    # HF's default std of 0.02 suits widths in the thousands; at tiny widths it leaves attention nearly
    # uniform and image–text binding stalls for thousands of steps. 1/sqrt(width) learns it in tens.
    std = shape.init_std or shape.hidden ** -0.5
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], initializer_range=std,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": _mrope_section(head_dim)},
    )
    vision = dict(
        depth=shape.vision_depth, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_hidden * 2,
        num_heads=shape.vision_heads, out_hidden_size=shape.hidden, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=112, fullatt_block_indexes=[shape.vision_depth - 1],
        initializer_range=shape.vision_hidden ** -0.5,
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False, initializer_range=std,
    )


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) like Qwen's 16/24/24 of 64."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_level(out_dir: str | Path, shape: LevelShape, tokenizer: PreTrainedTokenizerFast, image_size: int,
                seed: int = 0) -> Path:
    """Build one random-init level and save it (weights, tokenizer, processor) as a HF model dir."""
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(build_config(shape, tokenizer))
    processor = HKDProcessor(image_processor=build_image_processor(image_size), tokenizer=tokenizer,
                             chat_template=CHAT_TEMPLATE)
    return save_model_dir(model, processor, out_dir)


def save_model_dir(model: torch.nn.Module, processor: HKDProcessor, out_dir: str | Path,
                   extra: dict | None = None) -> Path:
    """Write a complete model dir under a temporary name, then rename: a dir that exists is complete.

    A LoRA (PEFT) model is saved as its adapter under `adapter/` plus merged weights; it is merged in place,
    so save it after its last training step. A failed write (disk full, read-only storage) removes its partial
    temporary dir; a previous dir of the same name is moved aside, never deleted in place, so a crash cannot
    leave it half-deleted.
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
                   trust_remote_code: bool = False) -> tuple[torch.nn.Module, HKDProcessor]:
    """Load any Qwen2.5-VL-style HF dir (ours or a real checkpoint) with its processor.

    Weights load from safetensors only (a pickled `.bin` could run code); a model's own Python code runs
    only when the caller opts in with `trust_remote_code`, and then with a warning naming the model.
    """
    check_model_dir(model_dir)
    if trust_remote_code:
        warnings.warn(f"trust_remote_code is on for {model_dir}: its Python code will run", stacklevel=2)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                                        use_safetensors=True)
    processor = HKDProcessor.from_pretrained(model_dir)
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
