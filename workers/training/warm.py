"""What a train-worker or teacher process imports as it starts, before any stage asks for it: the setup hook of
the processes `orchestrator.cluster.warm_workers` starts ahead of a stage. torch, transformers and the model code are
most of a stage's fixed cost on a small machine (several CPU seconds); imported here, they are paid while the
driver tests the previous stage or encodes the data, not on the path to the first step."""

from __future__ import annotations


def import_loops() -> None:
    """Ray's `worker_process_setup_hook` for train workers and teachers (run once, at process start). An import that fails
    here is left to fail again in the train function, where its traceback reaches the user as the stage's error
    (a failing hook would end the process with a bare Ray system error)."""
    try:
        import workers.teachers.pool  # noqa: F401
        import workers.training.grounding  # noqa: F401
        import workers.training.loop  # noqa: F401
    except Exception:  # noqa: BLE001 - see above
        pass
