"""Sweeps: the sweep config and its Ray Tune run over one stage.

May import: workers, orchestrator.config, orchestrator.cluster, orchestrator.report, orchestrator.run.
"""
