"""`hkd run CONFIG --ablation`: the full method, then one run per part switched off, in one table; with
unlabelled inputs, two more runs that change only what the distillation stages learn from them.

Each variant runs in `<run dir>/ablation/<variant>/`; stages whose fingerprint equals a finished stage of
the full run are shared (linked), not retrained, so a variant trains only what its switch changes. Every
row comes from a model trained and tested in this run; "no shift" is the full method's final model scored
without its mapping shift.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from orchestrator.config.schema import RunConfig, load_config
from orchestrator.report import console
from orchestrator.report.plots import table_bars
from orchestrator.report.run_report import final_row, render_markdown, write_json
from orchestrator.report.tracking import tracking_uri
from orchestrator.run.fingerprints import fingerprints
from orchestrator.run.kinds import plan_stages, uses_unlabeled
from orchestrator.run.levels import model_dir
from orchestrator.run.pipeline import run
from orchestrator.run.teachers import KeptTeachers
from orchestrator.run.unlabeled import have_labels


def _learns_from_unlabeled(cfg: RunConfig) -> bool:
    return cfg.data.unlabeled_use == "kd" and any(uses_unlabeled(cfg, p) for p in plan_stages(cfg))


# (row name, whether the row means something for this config, the switch, why there is no row otherwise).
# The two unlabelled rows train the same students on the same inputs and steps; only the unlabelled inputs'
# targets change: the top teacher's hard decision (what soft outputs add beyond more inputs), or their own labels
# (the upper bound; generated inputs have them, files may not).
VARIANTS = (("no PPOD", lambda c: c.ppod.enabled, "ppod.enabled=false", "ppod is already off in this config"),
            ("no TCRD", lambda c: c.tcrd.enabled, "tcrd.enabled=false", "tcrd is already off in this config"),
            ("no augmentation", lambda c: c.augment.enabled, "augment.enabled=false",
             "augment is already off in this config"),
            ("hard pseudo-labels", _learns_from_unlabeled, "data.unlabeled_use=pseudo_labels",
             "no distillation stage learns from unlabelled inputs"),
            ("gold labels on all inputs", lambda c: _learns_from_unlabeled(c) and have_labels(c),
             "data.unlabeled_use=gold_labels",
             "no distillation stage learns from unlabelled inputs, or some have no labels"))


def run_ablation(config_path: str | Path, overrides: list[str], run_dir: Path, log=console.say) -> dict:
    """Run the full method and its one-part-off variants; add the `ablation` table to the report. A teacher of the
    full run whose stage the next variant shares keeps running for it (`KeptTeachers`), not loaded again."""
    cfg = load_config(config_path, overrides)
    run_dir = run_dir.resolve()
    uri = tracking_uri(cfg.tracking.uri, run_dir.parent)  # variants record into the full run's store
    variants = {name: load_config(config_path, [*overrides, switch, f"name={cfg.name}-{name.replace(' ', '-')}",
                                                f"tracking.uri={uri}"])
                for name, applies, switch, _ in VARIANTS if applies(cfg)}
    full = set(fingerprints(cfg, plan_stages(cfg)).values())  # stages a variant links, never retrains
    needs = {name: {s: fp for s, fp in teacher_stages(v).items() if fp in full} for name, v in variants.items()}
    hand_on = dict(zip(["full method", *needs], [*needs.values(), {}]))  # what each run leaves for the next
    kept = KeptTeachers(keep=set(hand_on["full method"].values()))
    try:
        report = run(cfg, run_dir, log, config_path=str(config_path), overrides=overrides, kept=kept)
        last = [name for name in report["rows"] if not name.endswith("+shift")][-1]
        rows = {"full method": final_row(report), "no shift": report["rows"][last]}
        for name, _, _, why_not in VARIANTS:
            if name not in variants:
                log(f"[ablation] {name}: {why_not}; no row")
                continue
            kept.keep = set(hand_on[name].values())
            variant_dir = run_dir / "ablation" / name.replace(" ", "-")
            shared = share_finished(run_dir, variant_dir, variants[name])
            running = [s for s, fp in needs[name].items() if fp in kept.pools]
            log(f"[ablation] {name}: {len(shared)} stage(s) shared with the full run: {', '.join(shared) or 'none'}"
                + (f"; teachers still running: {', '.join(running)}" if running else ""))
            rows[name] = final_row(run(variants[name], variant_dir, log, kept=kept))
    finally:
        kept.shutdown()
    report["ablation"] = rows
    write_json(run_dir, report)
    table_bars({"rows": rows}, run_dir / "plots" / "ablation_parts.png")
    render_markdown(run_dir)
    return report


def teacher_stages(cfg: RunConfig) -> dict[str, str]:
    """The stages whose models teach in `cfg`'s run, with their fingerprints."""
    plans = plan_stages(cfg)
    prints = fingerprints(cfg, plans)
    return {t.stage: prints[t.stage] for p in plans for t in p.teachers}


def share_finished(source: Path, target: Path, cfg: RunConfig) -> list[str]:
    """Link into `target` the generated data, the initial levels and every finished stage of `source` whose
    fingerprint `cfg` reproduces; returns the shared stage names."""
    (target / "stages").mkdir(parents=True, exist_ok=True)
    (target / "models").mkdir(exist_ok=True)
    for rel in ("data", "models/init"):
        _link(source / rel, target / rel)
    shared = []
    for name, fingerprint in fingerprints(cfg, plan_stages(cfg)).items():
        done = source / "stages" / f"{name}.json"
        if done.is_file() and json.loads(done.read_text()).get("fingerprint") == fingerprint:
            _link(model_dir(source, name), model_dir(target, name))
            shutil.copyfile(done, target / "stages" / f"{name}.json")
            shared.append(name)
    return shared


def _link(src: Path, dst: Path) -> None:
    if src.exists() and not dst.exists():
        dst.symlink_to(src, target_is_directory=src.is_dir())
