"""Records → verification prompts → model inputs.

One forward per record. Both tasks become one chat prompt per record whose assistant turn holds the text to
judge, so each decision is read right after the text it judges. Task 1 lists the record's options there, each
wrapped in Qwen's referring-expression tokens (in every family: the tiny levels' tokenizer has them); each
option's supervised position is its closing token. Task 2's assistant turn is its claim (context and question
in the user turn), its supervised position the claim's last token (no marker needed). At each supervised
position the next-token distribution is read at the label words ("yes"/"no"); P(positive) is the softmax over
those two logits. No gold label ever appears in the input, so one option's label cannot leak into another's
decision.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import ProcessorMixin

from workers.data.records import load_rgb
from workers.models.families.formats import format_of, object_array

GROUNDING_PROMPT = "Describe the image."  # grounding pre-training's one request
FACTUALITY_QUESTION = "Is the claim true?"


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
            user = f"Context: {rec['context']}\n{FACTUALITY_QUESTION}"
            answer = rec["claim"]
            targets = [-1 if label is None else int(label)]
        units.append({"uid": rec["id"], "record_id": rec["id"], "task": rec["task"], "image": rec["image"],
                      "text": user, "answer": answer, "targets": targets})
    return units


def encode_records(units: dict[str, np.ndarray] | list[dict], processor: ProcessorMixin,
                   pixel_dtype: type = np.float16) -> dict[str, np.ndarray]:
    """Tokenize prompts and preprocess images, one row per record (no padding: `collate_records` pads per
    batch), with the supervised positions of each row (indices into its unpadded `input_ids`: each option's
    closing token, else the last token: the claim's end) and their targets.

    Accepts a list of unit dicts or a Ray Data column batch; returns a column batch whose variable-length
    `input_ids`, `positions`, `targets` and per-row image arrays (the processor's image format,
    `workers.models.families.formats`) are object arrays. A unit with `image_array` (an augmented image in memory,
    uint8 HxWx3) uses it instead of reading `image`. Pixels are stored as `pixel_dtype`: fp16 halves the bytes
    in Ray's object store; in-process scoring keeps fp32, so its scores are the plain model's (docs/interop.md).
    """
    rows = _as_rows(units)
    images = [Image.fromarray(r["image_array"]) if "image_array" in r else load_rgb(r["image"]) for r in rows]
    texts = [chat_prompt(r["text"], processor) + r["answer"] for r in rows]
    # one image list per prompt: Gemma 3's processor reads a flat list as one prompt's images
    enc = processor(text=texts, images=[[im] for im in images], padding=False, return_tensors=None)
    close_id = processor.tokenizer.convert_tokens_to_ids(OPTION_CLOSE)
    if close_id in (None, processor.tokenizer.unk_token_id) and any(r["task"] == "hallucination" for r in rows):
        raise ValueError(f"the option marker {OPTION_CLOSE} is not a token of this tokenizer: Task 1 records need "
                         f"{OPTION_OPEN} and {OPTION_CLOSE} as special tokens (docs/real-models.md)")
    ids = [np.asarray(i, dtype=np.int64) for i in enc["input_ids"]]
    positions = []
    for r, seq in zip(rows, ids):
        pos = np.flatnonzero(seq == close_id) if r["task"] == "hallucination" else np.array([len(seq) - 1])
        if len(pos) != len(r["targets"]):
            raise ValueError(f"record {r['uid']}: {len(r['targets'])} answers expected, {len(pos)} answer "
                             f"positions found (does a text field contain {OPTION_CLOSE}?)")
        positions.append(pos.astype(np.int64))
    out = {k: np.array([r[k] for r in rows]) for k in ("uid", "record_id", "task")}
    out["input_ids"] = object_array(ids)
    out["positions"] = object_array(positions)
    out["targets"] = object_array([np.asarray(r["targets"], dtype=np.int64) for r in rows])
    return {**out, **format_of(enc).rows(enc, len(rows), pixel_dtype)}


def chat_prompt(text: str, processor: ProcessorMixin) -> str:
    """The user turn (one image, then `text`) up to the opening of the assistant's, in the family's template:
    what a record's answer text follows (`encode_records`; `workers.models.lengths` counts the same string)."""
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
        add_generation_prompt=True, tokenize=False)


def _as_rows(units: dict[str, np.ndarray] | list[dict]) -> list[dict]:
    if isinstance(units, list):
        return units
    n = len(next(iter(units.values())))
    return [{k: v[i] for k, v in units.items()} for i in range(n)]


def encode_with(units: dict[str, np.ndarray] | list[dict], processor: ProcessorMixin,
                also: dict[str, ProcessorMixin] | None = None) -> dict[str, np.ndarray]:
    """`encode_records` with the run's first processor, plus each other processor's encoding of the same records
    under its column prefix (`also`: prefix → processor; a run whose levels read different inputs)."""
    out = encode_records(units, processor)
    for prefix, other in (also or {}).items():
        out.update({prefix + k: v for k, v in encode_records(units, other).items()})
    return out


def prefixed(batch: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """One encoding's columns of a batch, under the names `collate_records` reads ("": the unprefixed ones)."""
    if not prefix:
        return batch
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


def collate_records(batch: dict[str, np.ndarray], pad_id: int, image_token_id: int) -> dict:
    """Left-pad a column batch of encoded records into model inputs, plus, per supervised position, its
    (row, column) in the padded batch (`positions`, [P, 2]), `target` [P], `slot` [P] (option index) and
    `row_task` [P]; `uid` and `aug_key` pass through per row (`aug_key` "" for un-augmented records)."""
    seqs = [np.asarray(s) for s in batch["input_ids"]]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, slots = [], [], []
    for i, (s, pos) in enumerate(zip(seqs, batch["positions"])):
        ids[i, width - len(s):] = torch.from_numpy(s.astype(np.int64))
        mask[i, width - len(s):] = 1
        rows += [i] * len(pos)
        cols += (np.asarray(pos) + width - len(s)).tolist()
        slots += list(range(len(pos)))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        **format_of(batch).collate(batch, ids, image_token_id),
        "positions": torch.as_tensor(np.stack([rows, cols], axis=1).reshape(-1, 2), dtype=torch.long),
        "target": torch.as_tensor(np.concatenate([np.asarray(t, dtype=np.int64) for t in batch["targets"]])),
        "slot": torch.as_tensor(slots, dtype=torch.long),
        "row_task": [str(batch["task"][r]) for r in rows],
        "uid": [str(u) for u in batch["uid"]],
        "aug_key": [str(a) for a in batch["aug_key"]] if "aug_key" in batch else [""] * len(seqs),
    }


def select_rows(batch: dict, rows: list[int]) -> dict:
    """The model inputs and supervised positions of some rows (ascending) of a collated batch: each row's images
    follow it, the padded width stays (so position columns stay valid) and `positions` is re-indexed to the
    selected rows, in the batch's order."""
    index = torch.as_tensor(rows, dtype=torch.long)
    new_row = torch.full((len(batch["input_ids"]),), -1, dtype=torch.long, device=index.device)
    new_row[index] = torch.arange(len(rows), device=index.device)
    positions = batch["positions"]
    kept = new_row.to(positions.device)[positions[:, 0]]
    positions = torch.stack([kept, positions[:, 1]], dim=1)[kept >= 0]
    return {"input_ids": batch["input_ids"][index], "attention_mask": batch["attention_mask"][index],
            **format_of(batch).select(batch, rows), "positions": positions}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The subset of a collated batch that the model's forward takes (its image format's keys)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", *format_of(batch).model_keys)}
