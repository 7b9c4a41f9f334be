"""`hkd`: run a pipeline, sweep a stage, generate or validate data, evaluate, calibrate or predict with a model dir."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.config.schema import ConfigError, load_config
from orchestrator.report import console
from orchestrator.run.errors import StageError
from workers.data.records import DataError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except DataError as err:
        _error(str(err))
        if err.path and args.func is not _validate:
            console.say(f"hkd: `{_validate_command(args, err)}` lists every bad line of the file", err=True)
        return 2
    except (ConfigError, FileNotFoundError) as err:
        _error(str(err))
        return 2
    except (StageError, OSError) as err:  # a run that failed (storage, a stage out of retries): no traceback
        _error(str(err))
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as err:  # anything else: its root cause here, the traceback in the log
        if console.log_path() is None:
            raise
        _error(f"{type(err).__name__}: {root_cause(err)}")
        return 1


def _error(message: str) -> None:
    """The failure's root cause on the console, and where the log with the rest is (when one was written)."""
    console.say(f"hkd: error: {message}", err=True)
    if console.log_path() is not None:
        console.say(f"hkd: the full output (Ray, libraries, tracebacks) is in {console.log_path()}", err=True)


def root_cause(err: BaseException) -> str:
    """The last line of the innermost error (Ray wraps a worker's error in its own tracebacks)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hkd", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Ray's and the libraries' output on the console (always in the log under logs/)")
    loud = argparse.ArgumentParser(add_help=False)
    loud.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                      help="also show Ray's and the libraries' output on the console (always in the log under logs/)")
    sub = p.add_subparsers(required=True)

    r = sub.add_parser("run", help="run a pipeline config end to end", parents=[loud])
    r.add_argument("config")
    r.add_argument("--run-dir", help="default: runs/<config name>/")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    r.add_argument("--ablation", action="store_true",
                   help="also run the method with each part switched off (ablation/<variant>/) and tabulate")
    r.set_defaults(func=_run)

    pl = sub.add_parser("plan", help="check each teacher→student pair's KD, placement and GPU memory without "
                                     "weights")
    pl.add_argument("config")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    pl.add_argument("--model-configs", action="append", default=[],
                    help="dir of mirrored config.json files named after hub checkpoints, plus their tokenizer.json "
                         "facts (e.g. configs/qwen2_5_vl); repeat it for a pyramid of several families")
    pl.add_argument("--cluster", help="a cluster.yaml whose node types must hold the placement")
    pl.set_defaults(func=_plan)

    rp = sub.add_parser("report", help="print a finished run's report.md (rendered again from the run dir's files)")
    rp.add_argument("run_dir")
    rp.set_defaults(func=_report)

    pt = sub.add_parser("pretrain", help="build the pretrained tiny bases a bases config describes (configs/bases.yaml)")
    pt.add_argument("config")
    pt.add_argument("--device", default="cpu", help="cpu or cuda")
    pt.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    pt.add_argument("--levels", help="comma-separated levels to (re)build; default: all")
    pt.set_defaults(func=_pretrain)

    sw = sub.add_parser("sweep", help="sweep one stage of a finished run with Ray Tune (see configs/sweep_tcrd.yaml)",
                        parents=[loud])
    sw.add_argument("config", help="sweep YAML: base, from_run, stage, space, num_samples, ...")
    sw.set_defaults(func=_sweep)

    d = sub.add_parser("data", help="benchmark data").add_subparsers(required=True)
    s = d.add_parser("synth", help="generate the procedural benchmark (a run config's generator settings with "
                                   "--config; flags override them)")
    s.add_argument("--out", required=True)
    s.add_argument("--config", help="take seed, counts and generator settings from this run config's data.synth")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    s.add_argument("--seed", type=int, help="default: the config's seed, else 0")
    s.add_argument("--train", type=int, help="records per task (default: the config's, else 2000)")
    s.add_argument("--val", type=int, help="default: the config's, else 300")
    s.add_argument("--test", type=int, help="default: the config's, else 500")
    s.add_argument("--image-size", type=int, help="default: the config's, else 112")
    s.set_defaults(func=_synth)
    v = d.add_parser("validate", help="check data files against the data contract, listing every bad line")
    _validate_flags(v)

    _model_commands(sub, loud)
    return p


def _model_commands(sub, loud: argparse.ArgumentParser) -> None:
    """evaluate, calibrate, predict: the commands that take a model dir."""
    e = sub.add_parser("evaluate", help="predict and score labelled JSONL files with a model dir", parents=[loud])
    e.add_argument("model_dir")
    e.add_argument("files", nargs="+")
    e.add_argument("--json", action="store_true", help="one JSON object per file and task")
    _inference_flags(e)
    e.set_defaults(func=_evaluate)

    c = sub.add_parser("calibrate", help="fit the per-task mapping shift on labelled validation files", parents=[loud])
    c.add_argument("model_dir")
    c.add_argument("files", nargs="+")
    c.add_argument("--tta", action="store_true", help="calibrate on flip-averaged margins (to use with --tta)")
    c.set_defaults(func=_calibrate)

    pr = sub.add_parser("predict", help="write one prediction per record of a (possibly unlabelled) JSONL file",
                        parents=[loud])
    pr.add_argument("model_dir")
    pr.add_argument("file")
    pr.add_argument("--out", required=True, help="predictions JSONL")
    pr.add_argument("--skip-too-long", action="store_true",
                    help="write a line saying a record was skipped, instead of refusing the file, when its prompt "
                         "is longer than the model's context")
    _inference_flags(pr)
    pr.set_defaults(func=_predict)


def _pretrain(args: argparse.Namespace) -> None:
    from orchestrator.bases import build_bases, load_bases_config

    cfg = load_bases_config(args.config)
    build_bases(cfg, Path(args.config), args.device, args.threads, args.levels.split(",") if args.levels else None)


def _validate_flags(v: argparse.ArgumentParser) -> None:
    v.add_argument("files", nargs="+")
    v.add_argument("--max-errors", type=int, default=50, help="list at most this many bad lines (default 50)")
    v.add_argument("--labels", action="store_true", help="require labels, as run, evaluate and calibrate do")
    v.add_argument("--config", help="a run config whose data.field_map, default_task, max_image_pixels and size cap "
                                    "(max_text_chars, max_options) apply")
    v.add_argument("--model-dir", help="also refuse prompts longer than this model's context")
    v.set_defaults(func=_validate)


def _inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-shift", action="store_true", help="ignore the stored mapping shift")
    p.add_argument("--tta", action="store_true", help="average the margin with the horizontally flipped view")


def _run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    with console.captured(run_dir / "logs", args.verbose):
        from orchestrator.report.run_report import markdown_table
        from orchestrator.run.pipeline import run

        if args.ablation:
            from orchestrator.run.ablation import run_ablation

            report = run_ablation(args.config, args.overrides, run_dir, log=console.say)
            console.say("\nAblation:\n" + markdown_table({"rows": report["ablation"]}).rstrip())
        else:
            run(cfg, run_dir, config_path=args.config, overrides=args.overrides)


def _report(args: argparse.Namespace) -> None:
    from orchestrator.report.run_report import render_markdown

    run_dir = Path(args.run_dir)
    if not (run_dir / "report.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no report.json (not a finished run dir)")
    print(render_markdown(run_dir))


def _logs_beside(model_dir: str) -> Path:
    """Where evaluate/calibrate/predict keep Ray's and the libraries' output: `<model dir>/logs`, else a temp dir."""
    target = Path(model_dir) / "logs"
    try:
        target.mkdir(parents=True, exist_ok=True)
        return target
    except OSError:
        import tempfile

        return Path(tempfile.mkdtemp(prefix="hkd-logs-"))


def _plan(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    from orchestrator.plan import format_table, plan_run

    rows, problems = plan_run(cfg, [Path(d) for d in args.model_configs], Path(args.cluster) if args.cluster else None)
    print(format_table(rows, cfg.placement.gpu_memory_gb))
    if problems:
        raise ConfigError(f"{args.config}: the plan does not fit:\n  " + "\n  ".join(problems))
    print("plan fits")


def _sweep(args: argparse.Namespace) -> None:
    from orchestrator.sweep.config import load_sweep

    sweep = load_sweep(args.config)
    with console.captured(Path(sweep.spec.from_run) / "sweeps" / sweep.spec.name / "logs", args.verbose):
        from orchestrator.sweep.tune import run_sweep

        summary = run_sweep(sweep, log=console.say)
        for trial in summary["trials"]:
            console.say(json.dumps(trial))
        console.say(f"teacher forwards over the sweep: {summary['teacher_units']} units; {summary['wall_s']:.0f} s")


def _synth(args: argparse.Namespace) -> None:
    """The benchmark a config would generate, or another draw of it: another --seed gives a fresh held-out set
    of the same distribution."""
    from dataclasses import replace

    from workers.data.synth import SynthSpec, generate

    seed, counts, spec = 0, {"train": 2000, "val": 300, "test": 500}, SynthSpec()
    if args.config:
        cfg = load_config(args.config, args.overrides)
        seed, spec = cfg.seed, cfg.data.synth.generator_spec()
        counts = {k: getattr(cfg.data.synth, k) for k in counts}
    counts.update({k: getattr(args, k) for k in counts if getattr(args, k) is not None})
    if args.image_size is not None:
        spec = replace(spec, image_size=args.image_size)
    meta = generate(args.out, seed=seed if args.seed is None else args.seed, n_train=counts["train"],
                    n_val=counts["val"], n_test=counts["test"], spec=spec)
    print(json.dumps(meta, indent=2))


def _validate(args: argparse.Namespace) -> int:
    from workers.data.records import validate_files

    data = load_config(args.config).data if args.config else None
    result = validate_files(args.files, data.field_map if data else None, data.default_task if data else None,
                            require_labels=args.labels, max_errors=max(args.max_errors, 0),
                            check_more=_length_check(args.model_dir) if args.model_dir else None,
                            **(data.limits() if data else {}))
    for line in result.errors:
        print(line, file=sys.stderr)
    print(result.summary)
    if result.n_bad:
        more = result.n_bad - len(result.errors)
        unlisted = f" ({more} not listed: --max-errors {args.max_errors})" if more > 0 else ""
        print(f"hkd: error: {result.n_bad} bad line(s){unlisted}", file=sys.stderr)
        return 2
    return 0


def _length_check(model_dir: str):
    """The prompt-length check of `validate --model-dir`: refuses each record longer than the context."""
    from workers.models.lengths import ContextCheck

    _check_model_dir(model_dir)
    context = ContextCheck(model_dir)

    def check(scan, cap: int) -> None:
        for line, message in context.problems(scan):
            scan.drop(line, message, cap)
    return check


def _validate_command(args: argparse.Namespace, err: DataError) -> str:
    """The `hkd data validate` command that lists every problem of the file a command refused."""
    flags = ["--labels"] if args.func in (_run, _evaluate, _calibrate) else []
    if args.func is _run:
        flags += ["--config", args.config]
    return " ".join(["hkd data validate", *flags, *err.validate_flags, str(err.path)])


def _scoring_inputs(model_dir: str, paths: list[str], require_labels: bool):
    """The data files of `evaluate`, `calibrate` or `predict`, each refused at its first bad line, and the model
    dir's prompt-length check (`workers.models.lengths.ContextCheck`). The files are read before the model dir's code is
    imported, so a record past the size cap is refused in a moment."""
    from workers.data.records import load_scan

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model dir")
    scans = [load_scan(path, require_labels=require_labels) for path in paths]
    _check_model_dir(model_dir)
    from workers.models.lengths import ContextCheck

    return scans, ContextCheck(model_dir)


def _evaluate(args: argparse.Namespace) -> None:
    scans, context = _scoring_inputs(args.model_dir, args.files, require_labels=True)
    from workers.inference.evaluate import (
        score_records,  # the model code, once the data is known good
    )
    with console.captured(_logs_beside(args.model_dir), args.verbose):
        for scan in scans:
            context.refuse(scan)
        for scan in scans:
            scored = score_records(args.model_dir, scan.records, shift={} if args.no_shift else None, tta=args.tta)
            for task in sorted({k.split("/")[0] for k in scored["metrics"] if "/" in k}):
                m = scored["metrics"]
                row = {"file": scan.path, "task": task, "n": sum(p["task"] == task for p in scored["positions"]),
                       **{k: m[f"{task}/{k}"] for k in ("f1", "accuracy", "auroc", "ece")}}
                console.say(json.dumps(row) if args.json else
                            f"{scan.path} [{task}] n={row['n']} f1={row['f1']:.4f} acc={row['accuracy']:.4f} "
                            f"auroc={row['auroc']:.4f} ece={row['ece']:.4f}")


def _calibrate(args: argparse.Namespace) -> None:
    scans, context = _scoring_inputs(args.model_dir, args.files, require_labels=True)
    from workers.inference.evaluate import (
        calibrate_model,  # the model code, once the data is known good
    )
    with console.captured(_logs_beside(args.model_dir), args.verbose):
        for scan in scans:
            context.refuse(scan)
        shift = calibrate_model(args.model_dir, [r for scan in scans for r in scan.records], tta=args.tta)
        console.say(f"{'task':<14} {'n':>6} {'offset':>9} {'f1 before':>10} {'f1 after':>9} {'ece before':>11} {'ece after':>10}")
        for t, r in shift["val"].items():
            console.say(f"{t:<14} {shift['n'][t]:>6} {r['offset']:>9.4f} {r['f1_before']:>10.4f} "
                  f"{r['f1_after']:>9.4f} {r['ece_before']:>11.4f} {r['ece_after']:>10.4f}")
        console.say(f"mapping shift stored in {Path(args.model_dir) / 'hkd.json'}")


def _predict(args: argparse.Namespace) -> None:
    """One output line per input record, in order; with --skip-too-long a record longer than the context gets a
    `{"id", "skipped": why}` line instead of refusing the file, so a batch job goes on."""
    (scan,), context = _scoring_inputs(args.model_dir, [args.file], require_labels=False)
    from workers.inference.evaluate import (  # the model code, once the data is known good
        prediction_rows,
        score_records,
    )
    with console.captured(_logs_beside(args.model_dir), args.verbose):
        if not args.skip_too_long:
            context.refuse(scan)
        skipped = dict(context.problems(scan)) if args.skip_too_long else {}
        kept = [r for r, line in zip(scan.records, scan.lines) if line not in skipped]
        scored = score_records(args.model_dir, kept, shift={} if args.no_shift else None, tta=args.tta) if kept else {}
        rows = iter(prediction_rows(kept, scored) if kept else [])
        out = [{"id": r["id"], "skipped": skipped[line]} if line in skipped else next(rows)
               for r, line in zip(scan.records, scan.lines)]
        Path(args.out).write_text("".join(json.dumps(row) + "\n" for row in out))
        console.say(f"{len(kept)} predictions written to {args.out}")
        if skipped:
            where = ", ".join(f"{scan.path}:{line}" for line in list(skipped)[:5]) + (", ..." * (len(skipped) > 5))
            console.say(f"{len(skipped)} record(s) skipped, their prompt longer than the model's context: {where}")


def _check_model_dir(model_dir: str) -> None:
    from workers.models.model_dirs import check_model_dir

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model dir")
    check_model_dir(model_dir)


if __name__ == "__main__":
    sys.exit(main())
