"""Data contract for both tasks: load JSONL, validate every record, fail loudly.

Every problem is reported as ``DataError("{path}:{lineno}: <what is wrong>")`` so a bad
record is found before hours of distillation are spent on it.  Records are plain dicts
(they travel through Ray Data) with contract field names and absolute image paths.

`load_jsonl` stops at the first bad line; `scan_file` (behind `hkd data validate`) reads on and collects
every bad line, up to a cap.  No input file makes either raise anything but DataError.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

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
MAX_IMAGE_PIXELS = 64_000_000  # above any phone camera; `data.max_image_pixels` overrides it
# The size cap, checked before any tokenizing (`data.max_text_chars`, `data.max_options` override it), above what the
# longest context of the supported families holds (Qwen3-VL, 262,144 positions), so that a record under the cap but
# over a model's context meets the prompt-length check: 5 characters per position (English runs at about 4 per token
# in these byte-level BPE vocabularies; whole-word tokens of short words, as the benchmark's, at 4.7), and 100,000
# options (each costs at least 4 tokens: its two markers, its text and a newline, so at most 65,536 fit).
MAX_TEXT_CHARS = 5 * 262_144
MAX_OPTIONS = 100_000
_BOM = b"\xef\xbb\xbf"
_NO_TASK = "(no task)"
# Qwen's special tokens (`<|im_start|>`, `<|image_pad|>`, `<|object_ref_end|>`...): in a text field they would
# change the prompt's structure (an extra image slot, a fake answer position) instead of being read as text.
_SPECIAL = re.compile(r"<\|[a-z_]{1,30}\|>")  # the task column of lines whose task could not be read


class DataError(ValueError):
    """A data file breaks the contract; the message starts with ``path:lineno:`` (or ``path:``).

    ``path`` is the file; ``validate_flags`` are the `hkd data validate` flags that list the same problem."""

    def __init__(self, message: str, path: str | Path | None = None, validate_flags: tuple[str, ...] = ()):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.validate_flags = tuple(validate_flags)


class _Bad(Exception):
    """One line's problem, raised inside the record checks and turned into ``path:line: message``."""


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


def _short(value: Any, limit: int = 40) -> str:
    """repr of a value from the file, cut to `limit` characters (a message never echoes a whole field)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# ---------------------------------------------------------------------------------------------- bytes → text


def utf8_problem(data: bytes) -> tuple[int, str] | None:
    """(line, "not UTF-8 (byte 0x.. at column N)") for the first undecodable byte of `data`, or None.

    A leading UTF-8 byte-order mark is fine; a UTF-16 one is named as such."""
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as err:
        pos = err.start
    line = data.count(b"\n", 0, pos) + 1
    start = data.rfind(b"\n", 0, pos) + 1
    column = len(data[start:pos].decode("utf-8", errors="replace").removeprefix("\ufeff")) + 1
    hint = ""
    if line == 1 and data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        hint = "; the file looks UTF-16: save it as UTF-8"
    return line, f"not UTF-8 (byte 0x{data[pos]:02x} at column {column}){hint}"


def decode_utf8(data: bytes, source: str) -> str:
    """`data` as text (a UTF-8 byte-order mark dropped); DataError ``source:LINE: not UTF-8 (...)`` if not."""
    problem = utf8_problem(data)
    if problem:
        raise DataError(f"{source}:{problem[0]}: {problem[1]}", source)
    return data.decode("utf-8").removeprefix("\ufeff")


def _json_failure(err: Exception) -> str:
    """What is wrong with text that json.loads refused (huge integers and deep nesting included)."""
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON: {err.msg} at column {err.colno}"
    if isinstance(err, RecursionError):
        return "invalid JSON: nested too deeply"
    return f"invalid JSON: a number of more than {sys.get_int_max_str_digits()} digits"


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise _Bad(_json_failure(err)) from None


def _raw_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, parsed value or _Bad) per record: one per non-blank line of JSONL, or, for a `.json` file holding
    one array, per element (numbered from 1, reported like lines). A problem that leaves the rest of the file
    unreadable (an undecodable `.json` file, a missing file) raises DataError."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror or e}") from None
    with f:
        if path.suffix == ".json":
            yield from _json_array(path, f.read())
            return
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                line = line.removeprefix(_BOM)
            if not line.strip():
                continue
            problem = utf8_problem(line)
            if problem:
                yield lineno, _Bad(problem[1])
                continue
            try:
                yield lineno, _parse_json(line.decode("utf-8"))
            except _Bad as bad:
                yield lineno, bad


def _json_array(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
    text = decode_utf8(data, str(path))
    try:
        items = json.loads(text)
    except (ValueError, RecursionError) as err:
        line = f"{err.lineno}:" if isinstance(err, json.JSONDecodeError) else ""
        raise DataError(f"{path}:{line} {_json_failure(err)}", path) from None
    if not isinstance(items, list):
        raise DataError(f"{path}: a .json data file must hold one array of records", path)
    yield from enumerate(items, 1)


# ------------------------------------------------------------------------------------------------- images


def _image_failure(err: Exception) -> str:
    """Why PIL could not read an image, in words that never echo the file's bytes."""
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image file PIL can identify"
    text = str(err)
    if "truncated" in text.lower() or isinstance(err, EOFError):
        return "the file is truncated"
    text = re.sub(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"", "<bytes>", text)  # chunk ids and the like
    text = "".join(c if c.isprintable() else "?" for c in text)[:80]
    return f"corrupt image data ({type(err).__name__}{': ' + text if text else ''})"


@lru_cache(maxsize=65536)
def _image_problem(path: str, mtime_ns: int, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Check an image once per (path, version, limit); None when it is usable, else why not.

    The pixel count is read from the header before anything is decoded. ``mtime_ns`` and ``size`` only key
    the cache so an edited file is checked again."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format not in _IMAGE_FORMATS:
                    return f"unsupported image format {im.format} (expected PNG or JPEG): {path}"
                width, height = im.size
                if width * height > max_pixels:
                    return (f"image is {width}x{height} = {width * height:,} pixels, above data.max_image_pixels "
                            f"({max_pixels:,}): {path}")
                im.verify()
            with Image.open(path) as im:
                im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still catches corruption
                to_rgb(im)
    except Image.DecompressionBombError:
        bomb = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        return f"image has more than {bomb:,} pixels, above data.max_image_pixels ({max_pixels:,}): {path}"
    except MemoryError:
        return f"cannot decode image {path}: too large to decode"
    except Exception as err:  # noqa: BLE001 - a decoder fed arbitrary bytes can raise anything
        return f"cannot decode image {path}: {_image_failure(err)}"
    return None


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL image: alpha composited on white, palettes expanded, 16-bit scaled down."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        im = im.point(lambda v: v / 256).convert("L") if im.mode == "I" else im.convert("I").point(
            lambda v: v / 256).convert("L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB (`to_rgb`): how training, evaluation and augmentation read images."""
    with Image.open(path) as im:
        return to_rgb(im)


def _check_image(image: str, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why the resolved image path is unusable, or None (a path with control characters is shown escaped)."""
    try:
        st = os.stat(image)
    except (OSError, ValueError):
        return f"image not found: {_shown(image)}"
    if not os.path.isfile(image):
        return f"image not found: {_shown(image)}"
    problem = _image_problem(image, st.st_mtime_ns, st.st_size, max_pixels)
    return None if problem is None else problem.replace(image, _shown(image))


def _shown(path: str) -> str:
    return path if path.isprintable() else repr(path)


# ------------------------------------------------------------------------------------------------ records


@dataclass
class _Reader:
    """What the record checks of one file need."""

    path: Path
    fmap: dict[str, str]
    require_labels: bool
    default_task: str | None
    check_images: bool
    max_image_pixels: int
    max_text_chars: int = MAX_TEXT_CHARS
    max_options: int = MAX_OPTIONS
    first_line: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base = self.path.resolve().parent  # image paths are relative to the data file

    def name(self, field_name: str, index: int | None = None) -> str:
        """Field as the file spells it, plus the contract name when they differ."""
        file_name = self.fmap.get(field_name, field_name)
        shown = f"'{file_name}'" if index is None else f"'{file_name}[{index}]'"
        return shown if file_name == field_name else f"{shown} (contract field '{field_name}')"


def _task_of(raw: Any, rd: _Reader) -> str:
    if not isinstance(raw, dict):
        raise _Bad(f"expected a JSON object, got {_json_type(raw)}")
    has_task, task = _lookup(raw, rd.fmap.get("task", "task"))
    if has_task:
        if not isinstance(task, str):
            raise _Bad(f"field {rd.name('task')}: expected string, got {_json_type(task)}")
        if task not in TASKS:
            raise _Bad(f"unknown task {_short(task)} (valid: {', '.join(TASKS)})")
        return task
    if rd.default_task is not None:
        return rd.default_task
    raise _Bad(f"missing field {rd.name('task')}")


def _read_fields(raw: dict, task: str, rd: _Reader) -> dict:
    """The record with contract field names, each field present and of its JSON type."""
    fields = _FIELDS[task]
    consumed = {_top(rd.fmap.get(k, k)) for k in (*fields, "task")}
    record = {k: v for k, v in raw.items() if k not in consumed}
    for name in (*fields, "task"):
        if name in record:
            raise _Bad(f"field '{name}' clashes with contract field '{name}', "
                       f"which the field map reads from '{rd.fmap[name]}'")
    record["task"] = task
    for name, (typ, elem_typ) in fields.items():
        found, value = _lookup(raw, rd.fmap.get(name, name))
        if value is None and name == _LABEL[task] and not rd.require_labels:
            record[name] = None  # unlabelled: fine for prediction
            continue
        if not found:
            raise _Bad(f"missing field {rd.name(name)}")
        if not isinstance(value, typ):
            raise _Bad(f"field {rd.name(name)}: expected {_TYPE_NAMES[typ]}, got {_json_type(value)}")
        _check_size(value, rd.name(name), rd)
        for i, item in enumerate(value if elem_typ is not None else ()):
            if not isinstance(item, elem_typ):
                raise _Bad(f"field {rd.name(name, i)}: expected {_TYPE_NAMES[elem_typ]}, got {_json_type(item)}")
            _check_size(item, rd.name(name, i), rd)
        record[name] = value
    return record


def _check_size(value: Any, shown: str, rd: _Reader) -> None:
    """The size cap: a text field past `max_text_chars` characters, a list past `max_options` items. Checked
    before anything reads the value's content, so a record of any size is refused in the time it took to parse."""
    if isinstance(value, str) and len(value) > rd.max_text_chars:
        raise _Bad(f"field {shown} is {len(value):,} characters, above data.max_text_chars ({rd.max_text_chars:,})")
    if isinstance(value, list) and len(value) > rd.max_options:
        raise _Bad(f"field {shown} has {len(value):,} items, above data.max_options ({rd.max_options:,})")


def _check_text(value: str, shown: str) -> None:
    """Refuse an empty, blank or not-Unicode string in a required text field."""
    if not value:
        raise _Bad(f"field {shown} is empty")
    if not value.strip():
        raise _Bad(f"field {shown} is only whitespace")
    if "\x00" in value:
        raise _Bad(f"field {shown} contains a NUL character")
    if token := _SPECIAL.search(value):
        raise _Bad(f"field {shown} contains {token.group()!r}, a special token of the model's prompt format")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _Bad(f"field {shown} contains an unpaired surrogate \\u{ord(value[err.start]):04x} at character "
                   f"{err.start + 1}, which is not valid Unicode") from None


def _check_values(record: dict, rd: _Reader) -> None:
    """Text fields non-empty and valid; Task 1 options present, distinct and matching their labels."""
    for name, (typ, _) in _FIELDS[record["task"]].items():
        if typ is str:
            _check_text(record[name], rd.name(name))
    if record["task"] != "hallucination":
        return
    options = record["options"]
    if not options:
        raise _Bad(f"field {rd.name('options')} is empty")
    seen: dict[str, int] = {}
    for i, option in enumerate(options):
        _check_text(option, rd.name("options", i))
        if option in seen:
            raise _Bad(f"field {rd.name('options')}: items {seen[option]} and {i} are the same option "
                       f"{_short(option)}")
        seen[option] = i
    labels = record["hallucinated"]
    if labels is not None and len(labels) != len(options):
        raise _Bad(f"field {rd.name('options')} has {len(options)} items but {rd.name('hallucinated')} "
                   f"has {len(labels)}")


def _record(raw: dict, task: str, lineno: int, rd: _Reader) -> dict:
    """The checked record of one line (raises _Bad). An id counts as seen even when its line is bad."""
    _, rid = _lookup(raw, rd.fmap.get("id", "id"))
    if isinstance(rid, str):
        if rid in rd.first_line:
            raise _Bad(f"duplicate id {_short(rid)} (first seen at line {rd.first_line[rid]})")
        rd.first_line[rid] = lineno
    record = _read_fields(raw, task, rd)
    _check_values(record, rd)
    try:
        image = str((rd.base / record["image"]).resolve())
    except (OSError, RuntimeError) as err:  # e.g. a symlink loop, a name too long
        raise _Bad(f"image not found: {_shown(record['image'])} ({type(err).__name__})") from None
    if rd.check_images and (problem := _check_image(image, rd.max_image_pixels)):
        raise _Bad(problem)
    record["image"] = image
    return record


# ------------------------------------------------------------------------------------------------ files


@dataclass
class FileScan:
    """One data file read through: its good records (and their lines), its bad lines (listed up to a cap) and
    counts per task of lines read and bad."""

    path: str
    records: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    errors: list[DataError] = field(default_factory=list)
    n_bad: int = 0
    read: Counter = field(default_factory=Counter)
    bad: Counter = field(default_factory=Counter)

    def refuse(self, lineno: int | None, message: str, task: str, cap: int | None) -> None:
        """Count a bad line (or, with lineno None, a problem of the whole file) and list it under the cap."""
        self.n_bad += 1
        self.bad[task] += 1
        if cap is None or len(self.errors) < cap:
            where = f"{self.path}:{lineno}" if lineno is not None else self.path
            self.errors.append(DataError(f"{where}: {message}", self.path))

    def drop(self, lineno: int, message: str, cap: int | None) -> None:
        """Refuse a line that passed the per-line checks (a later check, e.g. prompt length, failed)."""
        i = self.lines.index(lineno)
        task = self.records[i]["task"]
        del self.records[i], self.lines[i]
        self.refuse(lineno, message, task, cap)
        self.errors.sort(key=lambda e: _line_of(str(e), self.path))


def _line_of(message: str, path: str) -> int:
    head = message[len(path) + 1:].split(":", 1)[0]
    return int(head) if head.isdigit() else 0


def scan_file(
    path: str | Path,
    field_map: dict[str, str] | None = None,
    require_labels: bool = False,
    default_task: str | None = None,
    check_images: bool = True,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_errors: int | None = None,
    first_error_only: bool = False,
    max_text_chars: int = MAX_TEXT_CHARS,
    max_options: int = MAX_OPTIONS,
) -> FileScan:
    """Read a whole data file, collecting every bad line (listing at most `max_errors`) instead of stopping."""
    if default_task is not None and default_task not in TASKS:
        raise ValueError(f"default_task must be one of {', '.join(TASKS)}, got {default_task!r}")
    rd = _Reader(Path(path), dict(field_map or {}), require_labels, default_task, check_images, max_image_pixels,
                 max_text_chars, max_options)
    scan = FileScan(str(path))
    try:
        for lineno, raw in _raw_records(Path(path)):
            task = _NO_TASK
            try:
                if isinstance(raw, _Bad):
                    raise raw
                task = _task_of(raw, rd)
                scan.records.append(_record(raw, task, lineno, rd))
                scan.lines.append(lineno)
            except _Bad as bad:
                scan.refuse(lineno, str(bad), task, max_errors)
            scan.read[task] += 1
            if first_error_only and scan.errors:
                return scan
    except DataError as err:  # the rest of the file cannot be read
        scan.n_bad += 1
        scan.bad[_NO_TASK] += 1
        scan.errors.append(err)
        return scan
    if not scan.read:
        scan.refuse(None, "file is empty", _NO_TASK, max_errors)
    return scan


def load_jsonl(
    path: str | Path,
    field_map: dict[str, str] | None = None,
    require_labels: bool = False,
    default_task: str | None = None,
    check_images: bool = True,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_text_chars: int = MAX_TEXT_CHARS,
    max_options: int = MAX_OPTIONS,
) -> list[dict]:
    """Load and validate a JSONL data file; raise DataError on the first bad record.

    ``field_map`` maps contract field names to the names used in the file, so foreign
    files need no rewriting.  ``default_task`` is used for records without a task field.
    Returns records with contract field names, ``image`` as an absolute path string,
    the label field (``hallucinated``/``label``) set to None when unlabelled, and
    extra keys kept as they are.
    """
    return load_scan(path, field_map, require_labels, default_task, check_images, max_image_pixels,
                     max_text_chars=max_text_chars, max_options=max_options).records


def load_scan(path: str | Path, *args: Any, **kwargs: Any) -> FileScan:
    """`scan_file` (same arguments) stopped at the first bad line, which it raises as DataError: the records of
    a good file with their lines, for a later check that names `FILE:LINE` (the prompt-length check)."""
    scan = scan_file(path, *args, **kwargs, first_error_only=True)
    if scan.errors:
        raise scan.errors[0]
    return scan


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


@dataclass
class Validation:
    """`hkd data validate`'s findings: listed bad lines, how many bad lines in all, and a per-file summary."""

    errors: list[str]
    n_bad: int
    summary: str


def validate_files(
    paths: list[str | Path],
    field_map: dict[str, str] | None = None,
    default_task: str | None = None,
    require_labels: bool = False,
    max_errors: int = 50,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    check_more=None,
    max_text_chars: int = MAX_TEXT_CHARS,
    max_options: int = MAX_OPTIONS,
) -> Validation:
    """Read every line of the data files; list bad lines (at most `max_errors` in all) and describe each file.

    `check_more(scan, cap)`, when given, refuses further lines of a scanned file (the prompt-length check)."""
    errors: list[str] = []
    n_bad, lines = 0, []
    for path in paths:
        cap = max(max_errors - len(errors), 0)
        scan = scan_file(path, field_map, require_labels, default_task, max_image_pixels=max_image_pixels,
                         max_errors=cap, max_text_chars=max_text_chars, max_options=max_options)
        if check_more is not None and scan.records:
            check_more(scan, cap)
        errors += [str(e) for e in scan.errors][:cap]
        n_bad += scan.n_bad
        lines += _describe(scan)
    return Validation(errors, n_bad, "\n".join(lines))


def _describe(scan: FileScan) -> list[str]:
    n_read = sum(scan.read.values())
    lines = [f"{scan.path}: {n_read} records read, {scan.n_bad} bad, {len(scan.records)} good"]
    stats = summarize(scan.records)
    for task in [*TASKS, _NO_TASK]:
        read, bad = scan.read[task], scan.bad[task]
        if not read:
            continue
        line = f"  {task}: {read} records ({bad} bad, {read - bad} good)"
        if task in stats:
            line += ", " + _balance(task, stats[task])
        lines.append(line)
    return lines


def _balance(task: str, s: dict) -> str:
    hall = task == "hallucination"
    unit, positive = ("options", "hallucinated") if hall else ("claims", "true")
    if s["positive_share"] is None:
        balance = "unlabelled"
    else:
        balance = f"{s['positive_share']:.1%} {positive}"
        if s["n_labelled_units"] < s["n_units"]:
            balance += f" (of {s['n_labelled_units']} labelled)"
    return f"{s['n_units']} {unit}, {balance}"
