"""Prompt length against the model's context: a prompt's text tokens plus the image tokens its image's size implies,
counted without decoding or encoding any image, so the check costs a tokenizer pass and a header read per record.

Each prompt is the record's unit (`workers.models.prompts.record_units`) in the processor's own chat template, its image
placeholder expanded to the text the processor writes there for an image of that size (`replace_image_token`,
given the counts its image processor derives from the size alone: Qwen-VL's patch grid, Idefics3's and SmolVLM's
tiles, InternVL's tiles), the size read from the image file's header. `tests/test_lengths.py` checks that this is
the length `encode_records` gives, for every family, both tasks, dynamic resolution and tiling. Not counted:
Gemma 3's pan-and-scan crops (off in hkd's Gemma processors, as in Gemma 3's own default).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import ProcessorMixin

from workers.data.records import DataError, FileScan
from workers.models.prompts import chat_prompt, record_units


def context_length(model_dir: str | Path) -> int | None:
    """The model's context in tokens (`max_position_embeddings` of its text config), None when not stated or
    when `model_dir` is not a local dir (a hub name)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    cfg = json.loads(config.read_text())
    for section in (cfg.get("text_config") or {}, cfg):
        if isinstance(section.get("max_position_embeddings"), int):
            return section["max_position_embeddings"]
    return None


def image_text(processor: ProcessorMixin, height: int, width: int) -> str:
    """The text the processor puts in place of one image of `height` x `width` pixels (its image tokens and their
    markers), from the counts its image processor derives from the size: no pixels needed."""
    images = processor.image_processor
    counted = (images.get_number_of_image_patches(height, width, processor._merge_kwargs()["images_kwargs"])
               if hasattr(images, "get_number_of_image_patches") else 1)
    patches, rows, cols = counted if isinstance(counted, tuple) else (counted, 0, 0)
    # what each family's `replace_image_token` reads of a processed image: Qwen-VL the patch grid (its product),
    # Idefics3 and SmolVLM the tiles' rows and columns, InternVL the tiles, Gemma 3 its pan-and-scan crops
    seen = {"image_grid_thw": [np.array([patches])], "rows": [[rows]], "cols": [[cols]], "num_patches": [patches],
            "num_crops": [0]}
    return processor.replace_image_token(seen, 0)


def _size(path: str) -> tuple[int, int]:
    """(height, width) of an image from its header (the loader has checked the file and its pixel count)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            return im.height, im.width


def prompt_lengths(records: list[dict], processor: ProcessorMixin) -> dict[str, int]:
    """Tokens of each record's prompt as the model sees it (text and image tokens; one sequence per record), by
    record id."""
    expanded: dict[tuple[int, int], str] = {}
    texts = []
    for unit in record_units(records):
        size = _size(unit["image"])
        if size not in expanded:
            expanded[size] = image_text(processor, *size)
        chat = chat_prompt(unit["text"], processor)
        texts.append(chat.replace(processor.image_token, expanded[size], 1) + unit["answer"])
    ids = processor.tokenizer(texts)["input_ids"] if texts else []
    return {rec["id"]: len(seq) for rec, seq in zip(records, ids)}


def too_long(records: list[dict], lines: list[int], processor: ProcessorMixin, limit: int) -> list[tuple[int, str]]:
    """(line, what is wrong) for each record whose prompt is longer than `limit` tokens."""
    lengths = prompt_lengths(records, processor)
    return [(line, f"prompt is {lengths[rec['id']]:,} tokens after tokenization, longer than the model's "
                   f"context of {limit:,} tokens")
            for rec, line in zip(records, lines) if lengths[rec["id"]] > limit]


class ContextCheck:
    """The prompt-length check against one model dir, for every command that encodes records for it (`hkd
    evaluate`, `predict`, `calibrate`, `data validate --model-dir`); a model dir that states no context has none."""

    def __init__(self, model_dir: str | Path):
        from workers.models.families import load_processor

        self.model_dir, self.limit = str(model_dir), context_length(model_dir)
        self.processor = load_processor(model_dir) if self.limit is not None else None

    def problems(self, scan: FileScan) -> list[tuple[int, str]]:
        """(line, what is wrong) for each record of a read file whose prompt is longer than the context."""
        return [] if self.limit is None else too_long(scan.records, scan.lines, self.processor, self.limit)

    def refuse(self, scan: FileScan) -> None:
        """Raise `FILE:LINE: prompt is N tokens ...` (DataError) for the file's first record that is too long."""
        for line, message in self.problems(scan):
            raise DataError(f"{scan.path}:{line}: {message}", scan.path, ("--model-dir", self.model_dir))
