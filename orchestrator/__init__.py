"""The control plane: config, stages, placement, sweeps, tracking, the report and the CLI. Runs on the driver;
what it hands to Ray processes crosses as `workers.contract`'s frozen jobs.

Root modules: `cli` (the `hkd` command), `plan` (`hkd plan`) and `bases` (`hkd pretrain`).

May import: workers, orchestrator.config, orchestrator.cluster, orchestrator.report, orchestrator.run, orchestrator.sweep.
"""
