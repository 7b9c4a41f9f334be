"""Running a pipeline: stage plans and fingerprints, the teacher/student pairs, unlabelled inputs, the
pipeline itself and the ablation.

May import: workers, orchestrator.config, orchestrator.cluster, orchestrator.report.
"""
