"""What does one stage cost before and around its training steps? The fixed cost of a minimal stage, by process
and phase, against an in-process run of the same steps.

Ray: a fresh interpreter runs what `hkd run` runs for one stage: `init_ray`, `prestart_train_workers` (on a
revision that has it), `encode_split` (train and val, materialized) and `fit_stage` (one worker, the tiniest
level, one training step, validation, save); with `--stages N`, N fits back to back. While it
runs, a sampler thread reads /proc every 0.1 s: when each Ray process started (`ray::IDLE` prestarted workers
included), when it became which actor or task (Ray's process title), and when it had mapped libtorch (torch
imported); rank 0's progress file gives the first step's end. In-process: a fresh interpreter does the same
steps without Ray (imports, encode, load, one step, validation, save). Both are timed from interpreter start,
in one run of this script, one after the other; `--before REV` also runs the Ray side on that git revision's
orchestrator/workers (exported with `git archive`), so a change is measured against its base side by side.

Per stage and process: `started` (seconds after the `fit_stage` call; `pool` = a worker Ray had prestarted),
`actor` (it became the actor), `torch` (libtorch mapped), CPU seconds it used (the figure least moved by
other load on the machine). The fixed cost of a stage is its `fit_stage` wall time (one training step of it).

`--one-fit` then runs the same stages in one fit, each stage's loop in turn in one worker group: what running
consecutive stages in one worker group would save against a fit each.

    python bench/startup.py [--stages 2] [--records 4] [--before main] [--one-fit]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

T0 = time.time()
TINY = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vision_hidden=32, vision_depth=1,
            vision_heads=2)
CLK = os.sysconf("SC_CLK_TCK")


def boot_time() -> float:
    with open("/proc/stat") as f:
        return next(float(line.split()[1]) for line in f if line.startswith("btime"))


def stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (field 3 is index 0)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def proc_start(pid: int, btime: float) -> float | None:
    fields = stat(pid)
    return None if fields is None else btime + int(fields[19]) / CLK


def descends_from(pid: int, root: int) -> bool:
    """Ray processes of this session are children of its raylet, a child of this driver (not other users')."""
    for _ in range(4):
        fields = stat(pid)
        if fields is None:
            return False
        pid = int(fields[1])
        if pid == root:
            return True
    return False


class Sampler:
    """Per Ray process of this session: start, each process title with when it was first seen, torch mapped."""

    def __init__(self, since: float):
        self.since, self.btime = since, boot_time()
        self.procs: dict[int, dict] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.1):
            self.sample()

    def sample(self) -> None:
        now = time.time()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if not title.startswith("ray::"):
                continue
            p = self.procs.get(pid)
            if p is None:
                if not descends_from(pid, os.getpid()):
                    continue
                p = self.procs[pid] = {"start": proc_start(pid, self.btime), "titles": {}, "torch": None}
            p["titles"].setdefault(title.split()[0], now)
            if p["torch"] is None and _has_torch(pid):
                p["torch"] = now
            fields = stat(pid)
            if fields:
                p["cpu"] = (int(fields[11]) + int(fields[12])) / CLK


def _has_torch(pid: int) -> bool:
    try:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def build(work: Path, n: int) -> tuple[Path, Path]:
    """A tiny benchmark (n train records per task) and the tiniest level."""
    from workers.data import synth
    from workers.models.model_dirs import LevelShape, build_level, build_tokenizer
    from workers.data.records import load_jsonl
    from workers.models.prompts import record_units

    synth.generate(work / "data", seed=0, n_train=n, n_val=2, n_test=2)
    records = [r for t in synth.TASKS for r in load_jsonl(work / "data" / t / "train.jsonl")]
    tok = build_tokenizer([u["text"] + u["answer"] for u in record_units(records)] + synth.sample_texts(50),
                          vocab_size=512)
    return work / "data", build_level(work / "model", LevelShape(**TINY), tok, image_size=112)


def splits(data: Path) -> dict[str, list[dict]]:
    from workers.data import synth
    from workers.data.records import load_jsonl

    return {s: [r for t in synth.TASKS for r in load_jsonl(data / t / f"{s}.jsonl")] for s in ("train", "val")}


def ray_child(work: Path, data: Path, model: Path, stages: int, one_fit: bool = False) -> dict:
    """One (or `stages`) minimal stage(s) the way `hkd run` runs them, a fit each; times since interpreter start.
    `one_fit`: then the same stages in one fit (what one worker group for consecutive stages would cost)."""
    t_import = time.time()
    from orchestrator.config.schema import Resources, RunConfig, TrainConfig
    from orchestrator.cluster.placement import init_ray
    from orchestrator.run.kinds import DIRECT, StagePlan
    from orchestrator.run.stages import default_stage_loss, fit_stage, stage_job, train_datasets
    from orchestrator.run.inputs import encode_split
    from workers.models.families import load_processor

    out = {"driver imports": time.time() - t_import}
    sampler = Sampler(time.time())
    sampler.thread.start()
    res = Resources(num_workers=1, cpus_per_worker=1)
    t = time.time()
    init_ray(res)
    out["ray.init"] = time.time() - t
    try:  # what `hkd run` does next (a revision before it had no warm workers)
        from orchestrator.cluster.warm_workers import prestart_train_workers
    except ImportError:
        pass
    else:
        prestart_train_workers(res.num_workers)
    t = time.time()
    recs = splits(data)
    processor = load_processor(model)
    enc = {s: encode_split(recs[s], processor) for s in ("train", "val")}
    out["encode + materialize (once per run)"] = time.time() - t
    cfg = RunConfig(levels={"S": {}}, direct={"levels": ["S"]}, resources=res)
    batch = len(recs["train"])
    fits = []
    for i in range(stages):
        plan = StagePlan(f"s{i}", "S", DIRECT, None, TrainConfig(epochs=1, batch_size=batch, log_every=1000))
        sets = train_datasets(enc["train"], None)
        progress = work / f"s{i}.progress"
        job = stage_job(cfg, plan, model, work / f"out{i}", default_stage_loss(), sets, batch, None, progress)
        t = time.time()
        fit_stage(f"s{i}", job, sets, enc["val"], res, work / "ray")
        fits.append({"start": t, "end": time.time(), "first_step": progress.stat().st_mtime})
    if one_fit:  # the same stages again, back to back in one fit: one worker group for all of them
        from orchestrator.run.stages import _fit

        jobs = [dataclasses.replace(job, out_dir=str(work / f"one{i}"), progress=None) for i in range(stages)]
        t = time.time()
        _fit(stages_in_one_fit, "one-fit", {"jobs": jobs}, res, work / "ray", None,
             datasets={**sets, "val": enc["val"]})
        out["one fit"] = time.time() - t
    sampler.stop.set()
    sampler.thread.join()
    sampler.sample()
    out["procs"], out["fits"] = sampler.procs, fits
    return out


def stages_in_one_fit(config: dict) -> None:
    """Ray Train's worker loop for `--one-fit`: each stage's loop in turn, in the same worker process. Within one
    fit `ray.train.get_checkpoint()` is the latest one reported, so each later stage loads the one before's
    checkpoint and skips its single step: a one-fit stage is cheaper than a real one by that step (0.1 s here)."""
    from workers.training.entry_points import train_loop_per_worker

    for job in config["jobs"]:
        train_loop_per_worker({"job": job, "iterators": config["iterators"]})


def in_process_child(data: Path, model: Path) -> dict:
    """The same steps in one process: imports, encode, load, one step, validation, save."""
    out = {}
    t = time.time()
    import torch

    from orchestrator.run.stages import default_stage_loss
    from workers.inference.logits import position_logits, predict, task_metrics
    from workers.models.model_dirs import label_word_ids, load_model_dir, save_model_dir
    from workers.training.objectives import StageObjective
    from workers.training.optim import adamw, update
    from workers.models.prompts import collate_records, encode_records, record_units

    out["imports"] = time.time() - t
    t = time.time()
    recs = splits(data)
    model_, processor = load_model_dir(model)
    enc = {s: encode_records(record_units(recs[s]), processor) for s in ("train", "val")}
    pad, img = processor.tokenizer.pad_token_id, model_.config.image_token_id
    batches = {s: collate_records(enc[s], pad, img) for s in enc}
    out["encode + load"] = time.time() - t
    t = time.time()
    torch.set_num_threads(1)
    labels = label_word_ids(processor.tokenizer)
    objective = StageObjective(default_stage_loss(), labels, vocab=len(processor.tokenizer))
    opt = adamw(model_, 1e-4, 0.0)
    loss, _ = objective(position_logits(model_, batches["train"]), batches["train"]["target"], [])
    update(loss, model_, opt, 1.0)
    pred = predict(model_, iter([batches["val"]]), labels)
    task_metrics(pred, pred["task"])
    save_model_dir(model_, processor, data.parent / "inproc_out")
    out["step + validation + save"] = time.time() - t
    return out


def child(argv: list[str]) -> dict:
    """Run one side in this (fresh) interpreter and print its timings as JSON."""
    mode, work, data, model, stages = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3]), int(argv[4])
    if mode == "inproc":
        out = in_process_child(data, model)
    else:
        out = ray_child(work, data, model, stages, one_fit=mode == "ray-one-fit")
    out["total since interpreter start"] = time.time() - proc_start(os.getpid(), boot_time())
    out["interpreter start"] = T0 - proc_start(os.getpid(), boot_time())
    return out


def run_child(mode: str, work: Path, data: Path, model: Path, stages: int, code: Path) -> dict:
    """`code`: the checkout whose orchestrator/workers the child imports (PYTHONPATH beats the editable install)."""
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": str(code)}
    cmd = [sys.executable, __file__, "--child", mode, str(work), str(data), str(model), str(stages)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code)
    if done.returncode:
        sys.exit(f"{mode} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def export(rev: str, into: Path) -> Path:
    """The product's code at `rev` (git archive), to run the same bench against it."""
    root = Path(__file__).resolve().parent.parent
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "orchestrator", "workers"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def processes(ray: dict, fit: dict) -> list[dict]:
    """The Ray processes that became an actor or ran a task during `fit`, with their phases in seconds from
    the `fit_stage` call: process start, actor/task start (title), torch mapped; CPU seconds used in all."""
    t0, t1, rows = fit["start"], fit["end"], []
    for p in sorted(ray["procs"].values(), key=lambda p: p["start"]):
        seen = {name: ts for name, ts in p["titles"].items() if t0 <= ts <= t1 and name != "ray::IDLE"}
        if not seen:
            continue
        name, when = min(seen.items(), key=lambda kv: kv[1])
        torch_at = p["torch"] - t0 if p["torch"] else None
        rows.append({"name": name[5:].split(".")[0], "start": p["start"] - t0, "actor": when - t0,
                     "torch": torch_at, "cpu": p.get("cpu", 0.0)})
    return rows


def print_side(label: str, ray: dict) -> None:
    print(f"\n{label}: Ray, the way `hkd run` runs a stage (fresh interpreter), seconds")
    for k in ("interpreter start", "driver imports", "ray.init", "encode + materialize (once per run)"):
        print(f"  {k:<48} {ray[k]:7.1f}")
    for i, fit in enumerate(ray["fits"]):
        rows = processes(ray, fit)
        print(f"  stage {i}: fit_stage wall {fit['end'] - fit['start']:.1f} s; first training step done at "
              f"+{fit['first_step'] - fit['start']:.1f}; {len(rows)} processes, "
              f"{sum(r['cpu'] for r in rows):.1f} CPU s")
        print(f"    {'process':<22} {'started':>8} {'actor':>7} {'torch':>7} {'CPU s':>7}")
        for r in rows:
            started = "pool" if r["start"] < 0 else f"+{r['start']:.1f}"
            torch_at = "-" if r["torch"] is None else ("before" if r["torch"] < r["actor"] else f"+{r['torch']:.1f}")
            print(f"    {r['name']:<22} {started:>8} {'+%.1f' % r['actor']:>7} {torch_at:>7} {r['cpu']:7.1f}")
    print(f"  {'total since interpreter start':<48} {ray['total since interpreter start']:7.1f}")


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def fixed_cost(ray: dict) -> float:
    """Median `fit_stage` wall over the run's stages: what each further stage costs."""
    return statistics.median(f["end"] - f["start"] for f in ray["fits"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2:])))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=4, help="train records per task (one step of all of them)")
    ap.add_argument("--stages", type=int, default=2, help="consecutive minimal stages in the Ray run")
    ap.add_argument("--one-fit", action="store_true",
                    help="then the same stages in one fit (one worker group for consecutive stages), this checkout")
    ap.add_argument("--before", help="also run the Ray side on this git revision's code (e.g. main), after ours")
    args = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, model = build(work, args.records)
        from orchestrator.cluster.machine import describe, probe  # here: the children time their own imports

        print(f"{describe(probe())}; load average before: {load_avg()}", flush=True)
        inproc = run_child("inproc", work, data, model, args.stages, here)
        sides = {"this checkout": run_child("ray-one-fit" if args.one_fit else "ray", work, data, model,
                                            args.stages, here)}
        if args.before:
            sides[args.before] = run_child("ray", work, data, model, args.stages, export(args.before, work / "before"))
        print(f"load average after: {load_avg()}")
    print("\nin-process (fresh interpreter, no Ray), seconds:")
    for k in ("interpreter start", "imports", "encode + load", "step + validation + save",
              "total since interpreter start"):
        print(f"  {k:<48} {inproc[k]:7.1f}")
    for label, ray in sides.items():
        print_side(label, ray)
    print()
    for label, ray in sides.items():
        print(f"{label}: fixed cost of a stage (fit_stage wall, median of {len(ray['fits'])}) {fixed_cost(ray):.1f} s; "
              f"whole Ray run / in-process run "
              f"{ray['total since interpreter start'] / inproc['total since interpreter start']:.1f}")
    if args.one_fit:
        one = sides["this checkout"]
        print(f"one fit of the same {args.stages} stages: {one['one fit']:.1f} s, {one['one fit'] / args.stages:.1f} s a "
              f"stage; a fit each / one fit: {fixed_cost(one) * args.stages / one['one fit']:.1f}")
    if args.before:
        print(f"fixed cost, this checkout / {args.before}: "
              f"{fixed_cost(sides['this checkout']) / fixed_cost(sides[args.before]):.2f}")


if __name__ == "__main__":
    main()
