"""Where work runs: Ray start-up and placement, the Ray Train trainer, warm workers, fault handling,
orphan clean-up and the machine probe.

May import: workers, orchestrator.config.
"""
