"""Teacher outputs computed once and reused by every epoch, stage and sweep trial that asks for them.

Layout: `<root>/<teacher fingerprint>/k<k>-T<temperature>/<sha256[:32]>.arrow`. The fingerprint hashes the
teacher dir's config and weights (`workers.teachers.pool.dir_fingerprint`), so a changed teacher can never hit old
entries; k and the temperature name what was stored (top-k log-probs at T need the full vocabulary, which
never leaves the teacher; k = 0 stores the label-word logits alone, what a student with another tokenizer uses). Within a namespace, each row is one supervised position, keyed by
`<record id>#<slot>|<aug_key>` (`workers.teachers.requests.position_keys`; `aug_key` names the record id, epoch, seed and
augmentation config; "" for an un-augmented record).

A shard is an Arrow IPC file holding one batch's missing positions, named by the sha256 of its bytes and written to a
temporary name then renamed: a reader recomputes the hash, so a truncated or corrupted shard is detected,
deleted and its keys recomputed, never used. Identical content gets an identical name, so concurrent trials
writing the same answers are harmless. All I/O goes through pyarrow filesystems (local paths or URIs such as
`s3://…`), so nodes sharing storage share the cache.

Size limit: after a write pushes the cache root past `max_bytes`, shards are deleted oldest-first by
modification time until it fits (pyarrow filesystems cannot touch a file on read, so this is FIFO, not LRU).
A process keeps the entries it loaded in memory, so an eviction never fails a running stage.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

FIELDS = ("topk_logprobs", "topk_ids", "tail_logprob", "label_logits")
LABEL_FIELDS = ("label_logits",)  # k = 0: label-word KD (`workers.teachers.outputs.wire_outputs`)
SUFFIX = ".arrow"


def unit_key(uid: str, aug_key: str) -> str:
    return f"{uid}|{aug_key}"


@dataclass
class CacheStats:
    """Counts for MLflow: unit hits and misses, shard bytes read and written, shards dropped."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    corrupt_shards: int = 0
    evicted_shards: int = 0

    def as_metrics(self) -> dict[str, float]:
        return {f"cache/{k}": float(v) for k, v in asdict(self).items()}


class TeacherCache:
    """One teacher's cached answers at one (k, temperature), under a root shared by runs and trials."""

    def __init__(self, root: str, fingerprint: str, k: int, temperature: float, max_bytes: int,
                 refresh_every_s: float = 10.0):
        self.fs, self.root = _filesystem(root)
        self.dir = f"{self.root}/{fingerprint}/k{k}-T{float(temperature)!r}"
        self.fields = FIELDS if k else LABEL_FIELDS
        self.fs.create_dir(self.dir, recursive=True)
        self.max_bytes, self.refresh_every_s = max_bytes, refresh_every_s
        self.stats = CacheStats()
        self.rows: dict[str, dict[str, np.ndarray]] = {}
        self.loaded: set[str] = set()
        self.last_refresh = 0.0
        self.refresh()
        self.total_bytes = self._root_bytes()

    def refresh(self) -> None:
        """Load shards written since the last look (by this or any other process); drop corrupt ones."""
        self.last_refresh = time.monotonic()
        for info in self.fs.get_file_info(pafs.FileSelector(self.dir)):
            name = info.base_name
            if name.endswith(SUFFIX) and name not in self.loaded:
                self.loaded.add(name)
                self._load(info.path, name)

    def get(self, keys: list[str]) -> list[dict[str, np.ndarray] | None]:
        """The cached row per key, None for a miss (other processes' new shards are picked up on a miss)."""
        if any(k not in self.rows for k in keys) and time.monotonic() - self.last_refresh >= self.refresh_every_s:
            self.refresh()
        found = [self.rows.get(k) for k in keys]
        hits = sum(r is not None for r in found)
        self.stats.hits += hits
        self.stats.misses += len(keys) - hits
        return found

    def put(self, keys: list[str], outputs: dict[str, np.ndarray]) -> None:
        """Store fresh teacher outputs for `keys` (rows in order) as one shard, then enforce the limit."""
        data = _serialize(keys, outputs, self.fields)
        name = hashlib.sha256(data).hexdigest()[:32] + SUFFIX
        tmp = f"{self.dir}/.{name}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, f"{self.dir}/{name}")
        self.loaded.add(name)
        for i, key in enumerate(keys):
            self.rows[key] = {f: np.asarray(outputs[f][i]) for f in self.fields}
        self.stats.bytes_written += len(data)
        self.total_bytes += len(data)
        if self.total_bytes > self.max_bytes:
            self.evict()

    def evict(self) -> None:
        """Delete the oldest shards under the whole root until it holds at most `max_bytes`."""
        shards = sorted((i for i in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
                         if i.type == pafs.FileType.File and i.base_name.endswith(SUFFIX)),
                        key=lambda i: (i.mtime_ns or 0, i.path))
        total = sum(i.size for i in shards)
        for info in shards:
            if total <= self.max_bytes:
                break
            _delete(self.fs, info.path)
            total -= info.size
            self.stats.evicted_shards += 1
        self.total_bytes = total

    def _load(self, path: str, name: str) -> None:
        with self.fs.open_input_stream(path) as src:
            data = src.read()
        table = _verified_table(data, name, self.fields)
        if table is None:
            self.stats.corrupt_shards += 1
            _delete(self.fs, path)  # recomputed and rewritten by whoever misses these keys next
            return
        self.stats.bytes_read += len(data)
        columns = {f: _column(table, f) for f in self.fields}
        for i, key in enumerate(table.column("key").to_pylist()):
            self.rows.setdefault(key, {f: columns[f][i] for f in self.fields})

    def _root_bytes(self) -> int:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
        return sum(i.size for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(SUFFIX))


def merge(found: list[dict[str, np.ndarray] | None], fresh: dict[str, np.ndarray] | None,
          fields: tuple[str, ...] = FIELDS) -> dict[str, np.ndarray]:
    """Batch outputs in key order: cached rows where found, `fresh` rows (in order) for the misses."""
    rows, j = [], 0
    for row in found:
        if row is None:
            row = {f: fresh[f][j] for f in fields}
            j += 1
        rows.append(row)
    return {f: np.stack([r[f] for r in rows]) for f in fields}


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """A URI names its filesystem; a plain path is local (made absolute: workers run elsewhere)."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).resolve())


def _serialize(keys: list[str], outputs: dict[str, np.ndarray], fields: tuple[str, ...]) -> bytes:
    arrays = [pa.array(keys, pa.string())]
    for f in fields:
        values = np.ascontiguousarray(outputs[f])
        flat = pa.array(values.reshape(-1))
        arrays.append(flat if values.ndim == 1 else pa.FixedSizeListArray.from_arrays(flat, values.shape[1]))
    table = pa.Table.from_arrays(arrays, names=["key", *fields])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _verified_table(data: bytes, name: str, fields: tuple[str, ...]) -> pa.Table | None:
    """The shard's table when its bytes hash to its name and parse; None when truncated or corrupted."""
    if hashlib.sha256(data).hexdigest()[:32] != name.removesuffix(SUFFIX):
        return None
    try:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    except (pa.ArrowInvalid, OSError):
        return None
    return table if set(fields) <= set(table.column_names) else None


def _column(table: pa.Table, field: str) -> np.ndarray:
    col = table.column(field).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    return col.to_numpy(zero_copy_only=False)


def _delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass  # another process evicted or replaced it first
