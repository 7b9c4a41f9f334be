"""Records → verification prompts → model inputs.

Both tasks become one chat prompt per decision (Task 1: one per option), ending at the assistant turn.
The supervised position is the last prompt token, whose next-token distribution is read at the label
words ("yes"/"no"); P(positive) is the softmax over those two logits.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from workers.data import load_rgb
from workers.models import HKDProcessor

HALLUCINATION_QUESTION = "Is the phrase hallucinated?"
FACTUALITY_QUESTION = "Is the claim true?"


def expand_units(records: list[dict]) -> list[dict]:
    """One unit per decision: Task 1 records expand to one unit per option. Target -1 when unlabelled."""
    units = []
    for rec in records:
        if rec["task"] == "hallucination":
            labels = rec.get("hallucinated")
            for i, option in enumerate(rec["options"]):
                text = f"Caption: {rec['caption']}\nPhrase: {option}\n{HALLUCINATION_QUESTION}"
                target = -1 if labels is None else int(labels[i])
                units.append(_unit(rec, i, text, target))
        else:
            label = rec.get("label")
            text = f"Context: {rec['context']}\nClaim: {rec['claim']}\n{FACTUALITY_QUESTION}"
            units.append(_unit(rec, 0, text, -1 if label is None else int(label)))
    return units


# One forward per record: a Task 1 record's options are listed in one assistant turn, each wrapped in Qwen's
# referring-expression tokens; the label words are read from the next-token distribution at each closing
# token. No label ever appears in the input, so one option's label cannot leak into another's decision.
OPTION_OPEN, OPTION_CLOSE = "<|object_ref_start|>", "<|object_ref_end|>"
HALLUCINATION_REQUEST = "Which phrases are hallucinated?"


def record_units(records: list[dict]) -> list[dict]:
    """One unit per record: its prompt (user text, assistant text) and one target per supervised position
    (Task 1: one per option; Task 2: one), -1 where unlabelled."""
    units = []
    for rec in records:
        if rec["task"] == "hallucination":
            labels = rec.get("hallucinated")
            user = f"Caption: {rec['caption']}\n{HALLUCINATION_REQUEST}"
            answer = "\n".join(f"{OPTION_OPEN}{o}{OPTION_CLOSE}" for o in rec["options"])
            targets = [-1] * len(rec["options"]) if labels is None else [int(v) for v in labels]
        else:
            label = rec.get("label")
            user, answer = f"Context: {rec['context']}\nClaim: {rec['claim']}\n{FACTUALITY_QUESTION}", ""
            targets = [-1 if label is None else int(label)]
        units.append({"uid": rec["id"], "record_id": rec["id"], "task": rec["task"], "image": rec["image"],
                      "text": user, "answer": answer, "targets": targets})
    return units


def encode_records(units: dict[str, np.ndarray] | list[dict], processor: HKDProcessor) -> dict[str, np.ndarray]:
    """`encode_units` for record units: also the supervised positions of each row (indices into its
    unpadded `input_ids`: each option's closing token, else the last token) and their targets."""
    rows = _as_rows(units)
    images = [Image.fromarray(r["image_array"]) if "image_array" in r else load_rgb(r["image"]) for r in rows]
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["text"]}]}],
        add_generation_prompt=True, tokenize=False) + r["answer"] for r in rows]
    enc = processor(text=texts, images=images, padding=False, return_tensors=None)
    close_id = processor.tokenizer.convert_tokens_to_ids(OPTION_CLOSE)
    ids = [np.asarray(i, dtype=np.int64) for i in enc["input_ids"]]
    positions = []
    for r, seq in zip(rows, ids):
        pos = np.flatnonzero(seq == close_id) if r["answer"] else np.array([len(seq) - 1])
        if len(pos) != len(r["targets"]):
            raise ValueError(f"record {r['uid']}: {len(r['targets'])} answers expected, {len(pos)} answer "
                             f"positions found (does a text field contain {OPTION_CLOSE}?)")
        positions.append(pos.astype(np.int64))
    pixels = np.asarray(enc["pixel_values"], dtype=np.float16)
    grids = np.asarray(enc["image_grid_thw"], dtype=np.int64).reshape(len(rows), 3)
    out = {k: np.array([r[k] for r in rows]) for k in ("uid", "record_id", "task")}
    out["input_ids"] = _object_array(ids)
    out["positions"] = _object_array(positions)
    out["targets"] = _object_array([np.asarray(r["targets"], dtype=np.int64) for r in rows])
    out["pixel_values"] = _object_array(np.split(pixels, np.cumsum(grids.prod(axis=1))[:-1]))
    out["image_grid_thw"] = grids
    return out


def collate_records(batch: dict[str, np.ndarray], pad_id: int, image_token_id: int) -> dict:
    """`collate` for encoded records: left-padded model inputs plus, per supervised position, its
    (row, column) in the padded batch (`positions`, [P, 2]), `target` [P] and `slot` [P] (option index)."""
    out = collate({**batch, "target": np.zeros(len(batch["input_ids"]), dtype=np.int64)}, pad_id, image_token_id)
    width = out["input_ids"].shape[1]
    rows, cols, slots = [], [], []
    for i, (seq, pos) in enumerate(zip(batch["input_ids"], batch["positions"])):
        rows += [i] * len(pos)
        cols += (np.asarray(pos) + width - len(seq)).tolist()
        slots += list(range(len(pos)))
    out["positions"] = torch.as_tensor(np.stack([rows, cols], axis=1), dtype=torch.long)
    out["target"] = torch.as_tensor(np.concatenate([np.asarray(t) for t in batch["targets"]]), dtype=torch.long)
    out["slot"] = torch.as_tensor(slots, dtype=torch.long)
    out["row_task"] = [batch["task"][r] for r in rows]
    return out


def position_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Full-vocabulary logits at every supervised position of a record batch: [P, V]. The LM head runs only
    on the columns some row supervises."""
    cols, index = torch.unique(batch["positions"][:, 1], return_inverse=True)
    logits = model(**model_inputs(batch), logits_to_keep=cols).logits
    return logits[batch["positions"][:, 0], index].float()


def _unit(rec: dict, index: int, text: str, target: int) -> dict:
    return {"uid": f"{rec['id']}#{index}", "record_id": rec["id"], "task": rec["task"], "index": index,
            "image": rec["image"], "text": text, "target": target}


def encode_units(units: dict[str, np.ndarray] | list[dict], processor: HKDProcessor) -> dict[str, np.ndarray]:
    """Tokenize prompts and preprocess images, one row per unit (no padding: `collate` pads per batch).

    Accepts a list of unit dicts or a Ray Data column batch; returns a column batch whose variable-length
    `input_ids` and per-image `pixel_values` are object arrays. A unit with `image_array` (an augmented
    image in memory, uint8 HxWx3) uses it instead of reading `image`.
    """
    rows = _as_rows(units)
    images = [Image.fromarray(r["image_array"]) if "image_array" in r else load_rgb(r["image"]) for r in rows]
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["text"]}]}],
        add_generation_prompt=True, tokenize=False) for r in rows]
    enc = processor(text=texts, images=images, padding=False, return_tensors=None)
    pixels = np.asarray(enc["pixel_values"], dtype=np.float16)  # half the bytes in the object store
    grids = np.asarray(enc["image_grid_thw"], dtype=np.int64).reshape(len(rows), 3)
    splits = np.cumsum(grids.prod(axis=1))[:-1]
    out = {k: np.array([r[k] for r in rows]) for k in ("uid", "record_id", "task", "index", "target")}
    out["input_ids"] = _object_array([np.asarray(ids, dtype=np.int64) for ids in enc["input_ids"]])
    out["pixel_values"] = _object_array(np.split(pixels, splits))
    out["image_grid_thw"] = grids
    return out


def _as_rows(units: dict[str, np.ndarray] | list[dict]) -> list[dict]:
    if isinstance(units, list):
        return units
    n = len(next(iter(units.values())))
    return [{k: v[i] for k, v in units.items()} for i in range(n)]


def _object_array(items: list[np.ndarray]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def collate(batch: dict[str, np.ndarray], pad_id: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a column batch into model inputs (plus `target`, `uid` and `aug_key` passthrough; `aug_key`
    is "" for un-augmented units)."""
    seqs = [np.asarray(s) for s in batch["input_ids"]]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.from_numpy(s.astype(np.int64))
        mask[i, width - len(s):] = 1
    pixels = torch.from_numpy(np.concatenate([np.asarray(p, dtype=np.float32) for p in batch["pixel_values"]]))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == image_token_id).int(),
        "pixel_values": pixels,
        "image_grid_thw": torch.as_tensor(np.stack(batch["image_grid_thw"]), dtype=torch.long),
        "target": torch.as_tensor(np.asarray(batch["target"], dtype=np.int64)),
        "uid": list(batch["uid"]),
        "aug_key": list(batch["aug_key"]) if "aug_key" in batch else [""] * len(seqs),
    }


def select_rows(batch: dict, rows: list[int]) -> dict:
    """The model inputs of some rows of a collated batch (each row's image patches follow it)."""
    patches = batch["image_grid_thw"].prod(dim=1)
    starts = torch.cumsum(patches, 0) - patches
    pixels = torch.cat([batch["pixel_values"][starts[i]:starts[i] + patches[i]] for i in rows])
    index = torch.as_tensor(rows, dtype=torch.long)
    return {"input_ids": batch["input_ids"][index], "attention_mask": batch["attention_mask"][index],
            "mm_token_type_ids": batch["mm_token_type_ids"][index], "pixel_values": pixels,
            "image_grid_thw": batch["image_grid_thw"][index]}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The subset of a collated batch that the model's forward takes."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    return {k: batch[k] for k in keys}
