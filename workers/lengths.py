"""Prompt length against the model's context, measured with the prompts the model is trained on.

The prompts come from `workers.prompts` (`record_units` then `encode_records`, image tokens included), never
rebuilt here, so a change of prompt format changes what is measured.
"""

from __future__ import annotations

import json
from pathlib import Path

from workers.prompts import encode_records, record_units


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


def prompt_lengths(records: list[dict], processor, batch_size: int = 64) -> dict[str, int]:
    """Tokens of each record's encoded prompt (text and image tokens; one sequence per record), by record id."""
    units = record_units(records)
    lengths: dict[str, int] = {}
    for start in range(0, len(units), batch_size):
        enc = encode_records(units[start:start + batch_size], processor)
        lengths.update({rid: len(ids) for rid, ids in zip(enc["record_id"].tolist(), enc["input_ids"])})
    return lengths


def too_long(records: list[dict], lines: list[int], processor, limit: int) -> list[tuple[int, str]]:
    """(line, what is wrong) for each record whose prompt is longer than `limit` tokens."""
    lengths = prompt_lengths(records, processor)
    return [(line, f"prompt is {lengths[rec['id']]:,} tokens after tokenization, longer than the model's "
                   f"context of {limit:,} tokens")
            for rec, line in zip(records, lines) if lengths[rec["id"]] > limit]
