"""A run's inputs: the records of each split (generated or read, parsed once), their length check against
every level's context, and their encoding into the Ray datasets every stage reads."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import ray.data

from orchestrator.config.schema import RunConfig
from orchestrator.run.kinds import StagePlan, uses_unlabeled
from orchestrator.run.pairs import RunInputs
from orchestrator.run.unlabeled import by_task, load_unlabeled, mixed, spread
from workers.data import synth
from workers.data.records import DataError, FileScan, load_scan
from workers.models.lengths import context_length, too_long

if TYPE_CHECKING:
    from transformers import ProcessorMixin


DRIVER_ENCODE_RECORDS = 256  # a split this small is encoded in the driver (`encode_split`)


def encode_split(records: list[dict], processor: ProcessorMixin,
                 also: dict[str, ProcessorMixin] | None = None) -> ray.data.Dataset:
    """Prompts (one row per record), tokenization and image preprocessing as a Ray Data map, materialized once
    per run (every stage reuses it; the train workers never decode images), in record order so that runs
    repeat. `also`: other processors whose encodings the rows carry too, under their column prefixes.

    A split of at most DRIVER_ENCODE_RECORDS records is encoded here, in the driver, into the block the map
    would have made: the map's task would first start a Ray worker and import transformers, seconds of CPU on
    2 cores for milliseconds of work."""
    from ray.data.block import BlockAccessor

    from workers.models.prompts import encode_with, record_units

    units = record_units(records)
    if len(units) <= DRIVER_ENCODE_RECORDS:
        return ray.data.from_arrow(BlockAccessor.batch_to_block(encode_with(units, processor, also)))
    ds = ray.data.from_items(units).map_batches(
        encode_with, fn_kwargs={"processor": processor, "also": also}, batch_size=64, batch_format="numpy",
    )
    ds.context.execution_options.preserve_order = True  # blocks in record order, not task-completion order
    return ds.materialize()


def unlabeled_inputs(cfg: RunConfig, plans: list[StagePlan], run_dir: Path, splits: dict[str, list[dict]],
                     scans: dict[str, FileScan] | None = None) -> tuple[list[dict], dict | None]:
    """The unlabelled records and their counts for run.json, when a stage trains on them; else ([], None).
    `scans` gets each file's scan by path."""
    if not any(uses_unlabeled(cfg, p) for p in plans):
        return [], None
    return load_unlabeled(cfg, run_dir, splits, cfg.data.synth.generator_spec(), scans)


def encode_inputs(splits: dict[str, list[dict]], unlabeled: list[dict], processor: ProcessorMixin,
                  also: dict[str, ProcessorMixin] | None = None) -> dict[str, ray.data.Dataset]:
    """Encoded train and val splits, and `train_kd`: what distillation stages train on, the training records
    with the unlabelled ones spread among them (also added to `splits`; the train split itself without any).
    Training records are interleaved by task (each epoch then shuffles them, `workers.training.loop`), so no
    stretch of training sees one task alone. `also`: the other levels' processors by column prefix
    (`orchestrator.run.pairs`)."""
    splits["train"] = spread(by_task(splits["train"]))
    encoded = {s: encode_split(splits[s], processor, also) for s in ("train", "val")}
    splits["train_kd"] = mixed(splits["train"], spread(by_task(unlabeled)))
    encoded["train_kd"] = encode_split(splits["train_kd"], processor, also) if unlabeled else encoded["train"]
    return encoded


def data_counts(splits: dict[str, list[dict]]) -> dict[str, dict]:
    """Records per split and task, for the plan line and the report."""
    return {split: {"records": len(recs), "tasks": dict(sorted(Counter(r["task"] for r in recs).items()))}
            for split, recs in splits.items()}


def load_splits(cfg: RunConfig, run_dir: Path, scans: dict[str, FileScan] | None = None) -> dict[str, list[dict]]:
    """Records per split: generated into `<run dir>/data` (once) or read from the configured files. Each file is
    parsed once (a file named by two splits too); `scans` gets its scan by path, for the length check."""
    scans = {} if scans is None else scans
    files = split_files(cfg, run_dir)
    for path in dict.fromkeys(str(p) for paths in files.values() for p in paths):
        scans[path] = load_scan(path, **_load_args(cfg))
    return {split: [rec for path in paths for rec in scans[str(path)].records] for split, paths in files.items()}


def split_files(cfg: RunConfig, run_dir: Path) -> dict[str, list]:
    """Data files per split, generating the benchmark into `<run dir>/data` first when it is the source."""
    if cfg.data.source == "synth":
        data_dir = run_dir / "data"
        if not (data_dir / "meta.json").is_file():
            s = cfg.data.synth
            synth.generate(data_dir, seed=cfg.seed, n_train=s.train, n_val=s.val, n_test=s.test, spec=s.generator_spec())
        return {split: [data_dir / task / f"{split}.jsonl" for task in synth.TASKS] for split in synth.SPLITS}
    files = {split: getattr(cfg.data.files, split) for split in ("train", "val", "test")}
    if not files["val"]:
        files["val"] = files["test"]
    return files


def _load_args(cfg: RunConfig) -> dict:
    return {"field_map": cfg.data.field_map or None, "require_labels": True, "default_task": cfg.data.default_task,
            **cfg.data.limits()}


def check_prompt_lengths(scans: dict[str, FileScan], inputs: RunInputs, init_dirs: dict[str, Path]) -> None:
    """Refuse, before any training, a record whose prompt is longer than a level's context, counted with that
    level's processor (once per distinct processor, against the shortest context among its levels): every file the
    run read (`scans`: the splits' and the unlabelled inputs' the teachers answer for the cache), not parsed again
    (`workers.models.lengths`: no image is encoded)."""
    contexts = {level: n for level, d in init_dirs.items() if (n := context_length(d)) is not None}
    shortest: dict[str, str] = {}  # encoding key → its level with the shortest context
    for level in sorted(contexts, key=contexts.get):
        shortest.setdefault(inputs.levels[level].key, level)
    for level in shortest.values():
        for path, scan in scans.items():
            for line, message in too_long(scan.records, scan.lines, inputs.levels[level].processor, contexts[level]):
                raise DataError(f"{path}:{line}: {message} (levels.{level})", path,
                                ("--model-dir", str(init_dirs[level])))
