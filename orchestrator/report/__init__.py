"""What a run tells: the console, progress bars, MLflow tracking, statistics, plots and the report.

May import: workers, orchestrator.config, orchestrator.cluster.
"""
