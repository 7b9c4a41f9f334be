"""Data contract for both tasks: load JSONL, validate every record, fail loudly.

Every problem is reported as ``DataError("{path}:{lineno}: <what is wrong>")`` so a bad
record is found before hours of distillation are spent on it.  Records are plain dicts
(they travel through Ray Data) with contract field names and absolute image paths.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

TASKS = ("hallucination", "factuality")

# Contract fields per task: name -> (JSON type of the value, JSON type of list elements).
_FIELDS: dict[str, dict[str, tuple[type, type | None]]] = {
    "hallucination": {
        "id": (str, None),
        "image": (str, None),
        "caption": (str, None),
        "options": (list, str),
        "hallucinated": (list, bool),
    },
    "factuality": {
        "id": (str, None),
        "image": (str, None),
        "context": (str, None),
        "claim": (str, None),
        "label": (bool, None),
    },
}
_LABEL = {"hallucination": "hallucinated", "factuality": "label"}
_IMAGE_FORMATS = ("PNG", "JPEG")


class DataError(ValueError):
    """A data file breaks the contract; the message starts with ``path:lineno:``."""


def _json_type(value: Any) -> str:
    """JSON name of a value's type, since the people fixing files think in JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


_TYPE_NAMES = {str: "string", bool: "boolean", list: "array"}


@lru_cache(maxsize=65536)
def _image_problem(path: str, mtime_ns: int, size: int) -> str | None:
    """Decode an image once per (path, version); None when it is usable, else why not.

    ``mtime_ns`` and ``size`` only key the cache so an edited file is checked again.
    """
    try:
        with Image.open(path) as im:
            if im.format not in _IMAGE_FORMATS:
                return f"unsupported image format {im.format} (expected PNG or JPEG): {path}"
            im.verify()
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still catches corruption
            im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"cannot decode image {path}: {e}"
    return None


def _check_image(image: str) -> str | None:
    """Why the resolved image path is unusable, or None."""
    try:
        st = os.stat(image)
    except OSError:
        return f"image not found: {image}"
    if not os.path.isfile(image):
        return f"image not found: {image}"
    return _image_problem(image, st.st_mtime_ns, st.st_size)


def load_jsonl(
    path: str | Path,
    field_map: dict[str, str] | None = None,
    require_labels: bool = False,
    default_task: str | None = None,
    check_images: bool = True,
) -> list[dict]:
    """Load and validate a JSONL data file; raise DataError on the first bad record.

    ``field_map`` maps contract field names to the names used in the file, so foreign
    files need no rewriting.  ``default_task`` is used for records without a task field.
    Returns records with contract field names, ``image`` as an absolute path string,
    the label field (``hallucinated``/``label``) set to None when unlabelled, and
    extra keys kept as they are.
    """
    if default_task is not None and default_task not in TASKS:
        raise ValueError(f"default_task must be one of {', '.join(TASKS)}, got {default_task!r}")
    fmap = dict(field_map or {})
    base = Path(path).resolve().parent

    def name(field: str, index: int | None = None) -> str:
        """Field as the file spells it, plus the contract name when they differ."""
        file_name = fmap.get(field, field)
        shown = f"'{file_name}'" if index is None else f"'{file_name}[{index}]'"
        return shown if file_name == field else f"{shown} (contract field '{field}')"

    records: list[dict] = []
    first_line: dict[str, int] = {}
    for lineno, raw in _raw_records(Path(path)):

        def fail(msg: str) -> DataError:
            return DataError(f"{path}:{lineno}: {msg}")

        if not isinstance(raw, dict):
            raise fail(f"expected a JSON object, got {_json_type(raw)}")

        has_task, task = _lookup(raw, fmap.get("task", "task"))
        if has_task:
            if not isinstance(task, str):
                raise fail(f"field {name('task')}: expected string, got {_json_type(task)}")
            if task not in TASKS:
                raise fail(f"unknown task {task!r} (valid: {', '.join(TASKS)})")
        elif default_task is not None:
            task = default_task
        else:
            raise fail(f"missing field {name('task')}")

        fields = _FIELDS[task]
        label_field = _LABEL[task]
        consumed = {_top(fmap.get(k, k)) for k in (*fields, "task")}
        record = {k: v for k, v in raw.items() if k not in consumed}
        for field in (*fields, "task"):
            if field in record:
                raise fail(
                    f"field '{field}' clashes with contract field '{field}', "
                    f"which the field map reads from '{fmap[field]}'"
                )
        record["task"] = task

        for field, (typ, elem_typ) in fields.items():
            found, value = _lookup(raw, fmap.get(field, field))
            if value is None and field == label_field and not require_labels:
                record[field] = None  # unlabelled: fine for prediction
                continue
            if not found:
                raise fail(f"missing field {name(field)}")
            if not isinstance(value, typ):
                raise fail(
                    f"field {name(field)}: expected {_TYPE_NAMES[typ]}, got {_json_type(value)}"
                )
            if elem_typ is not None:
                for i, item in enumerate(value):
                    if not isinstance(item, elem_typ):
                        raise fail(
                            f"field {name(field, i)}: expected {_TYPE_NAMES[elem_typ]}, "
                            f"got {_json_type(item)}"
                        )
            record[field] = value

        if task == "hallucination":
            if not record["options"]:
                raise fail(f"field {name('options')} is empty")
            labels = record["hallucinated"]
            if labels is not None and len(labels) != len(record["options"]):
                raise fail(
                    f"field {name('options')} has {len(record['options'])} items but "
                    f"{name('hallucinated')} has {len(labels)}"
                )

        rid = record["id"]
        if rid in first_line:
            raise fail(f"duplicate id {rid!r} (first seen at line {first_line[rid]})")
        first_line[rid] = lineno

        image = str((base / record["image"]).resolve())
        if check_images and (problem := _check_image(image)):
            raise fail(problem)
        record["image"] = image
        records.append(record)

    if not records:
        raise DataError(f"{path}: file is empty")
    return records


def _raw_records(path: Path):
    """(line, parsed value) per record: one per non-blank line of JSONL, or, for a `.json` file holding one
    array, per element (numbered from 1, reported like lines)."""
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".json":
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(items, list):
                raise DataError(f"{path}: a .json data file must hold one array of records")
            yield from enumerate(items, 1)
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} at column {e.colno}") from None


def _top(key: str) -> str:
    """The record's own key a field-map path starts at."""
    return key.split(".")[0].removesuffix("[]")


def _lookup(raw: dict, key: str) -> tuple[bool, Any]:
    """(found, value) of a field-map path: `name`, nested `a.b`, or `items[].text`, which collects `text`
    from every object of the list `items` (options and their labels kept as a list of objects)."""
    head, _, rest = key.partition(".")
    if head.endswith("[]"):
        items = raw.get(head[:-2])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            return False, None
        found = [_lookup(item, rest) for item in items]
        return all(f for f, _ in found), [v for _, v in found]
    if head not in raw:
        return False, None
    if not rest:
        return True, raw[head]
    return _lookup(raw[head], rest) if isinstance(raw[head], dict) else (False, None)


def summarize(records: list[dict]) -> dict:
    """Per-task counts and class balance, to spot skewed or unlabelled data before training.

    Returns ``{task: {"n": records, "n_units": options (hallucination) or records
    (factuality), "n_labelled_units": units with labels, "positive_share": share of
    hallucinated options / true claims among labelled units, or None when none are
    labelled}}`` for each task present.
    """
    out: dict[str, dict] = {}
    for r in records:
        task = r["task"]
        s = out.setdefault(task, {"n": 0, "n_units": 0, "n_labelled_units": 0, "positives": 0})
        s["n"] += 1
        label = r.get(_LABEL[task])
        if task == "hallucination":
            s["n_units"] += len(r["options"])
            if label is not None:
                s["n_labelled_units"] += len(label)
                s["positives"] += sum(label)
        else:
            s["n_units"] += 1
            if label is not None:
                s["n_labelled_units"] += 1
                s["positives"] += int(label)
    for s in out.values():
        positives = s.pop("positives")
        s["positive_share"] = positives / s["n_labelled_units"] if s["n_labelled_units"] else None
    return out


def validate_files(
    paths: list[str | Path],
    field_map: dict[str, str] | None = None,
    default_task: str | None = None,
) -> str:
    """Validate data files (DataError on the first bad record) and describe them for a human."""
    lines = []
    for path in paths:
        records = load_jsonl(path, field_map=field_map, default_task=default_task)
        lines.append(f"{path}: {len(records)} records")
        for task, s in summarize(records).items():
            hall = task == "hallucination"
            unit, positive = ("options", "hallucinated") if hall else ("claims", "true")
            if s["positive_share"] is None:
                balance = "unlabelled"
            else:
                balance = f"{s['positive_share']:.1%} {positive}"
                if s["n_labelled_units"] < s["n_units"]:
                    balance += f" (of {s['n_labelled_units']} labelled)"
            lines.append(f"  {task}: {s['n']} records, {s['n_units']} {unit}, {balance}")
    return "\n".join(lines)
