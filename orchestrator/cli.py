"""`hkd`: run a pipeline, generate or validate data, evaluate a model dir."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.config import ConfigError, load_config
from workers.data import DataError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"hkd: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hkd", description=__doc__)
    sub = p.add_subparsers(required=True)

    r = sub.add_parser("run", help="run a pipeline config end to end")
    r.add_argument("config")
    r.add_argument("--run-dir", help="default: runs/<config name>/")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    r.set_defaults(func=_run)

    d = sub.add_parser("data", help="benchmark data").add_subparsers(required=True)
    s = d.add_parser("synth", help="generate the procedural benchmark")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train", type=int, default=2000)
    s.add_argument("--val", type=int, default=300)
    s.add_argument("--test", type=int, default=500)
    s.add_argument("--image-size", type=int, default=112)
    s.set_defaults(func=_synth)
    v = d.add_parser("validate", help="check JSONL files against the data contract")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=_validate)

    e = sub.add_parser("evaluate", help="predict and score labelled JSONL files with a model dir")
    e.add_argument("model_dir")
    e.add_argument("files", nargs="+")
    e.add_argument("--json", action="store_true", help="one JSON object per file and task")
    e.set_defaults(func=_evaluate)
    return p


def _run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    from orchestrator.pipeline import run
    from orchestrator.report import markdown_table

    report = run(cfg, Path(args.run_dir or Path("runs") / cfg.name))
    print(markdown_table(report))


def _synth(args: argparse.Namespace) -> None:
    from workers.synth import SynthSpec, generate

    meta = generate(args.out, seed=args.seed, n_train=args.train, n_val=args.val, n_test=args.test,
                    spec=SynthSpec(image_size=args.image_size))
    print(json.dumps(meta, indent=2))


def _validate(args: argparse.Namespace) -> None:
    from workers.data import validate_files

    print(validate_files(args.files))


def _evaluate(args: argparse.Namespace) -> None:
    from workers.data import load_jsonl
    from workers.evaluate import score_records

    if not (Path(args.model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{args.model_dir}: not a model dir (config.json missing)")
    for path in args.files:
        scored = score_records(args.model_dir, load_jsonl(path, require_labels=True))
        for task in sorted({k.split("/")[0] for k in scored["metrics"] if "/" in k}):
            m = scored["metrics"]
            row = {"file": path, "task": task, "n": sum(u["task"] == task for u in scored["units"]),
                   **{k: m[f"{task}/{k}"] for k in ("f1", "accuracy", "auroc", "ece")}}
            print(json.dumps(row) if args.json else
                  f"{path} [{task}] n={row['n']} f1={row['f1']:.4f} acc={row['accuracy']:.4f} "
                  f"auroc={row['auroc']:.4f} ece={row['ece']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
