"""Failures a run reports to its user as one line and exit code 1 (kept free of heavy imports for the CLI)."""


class StageError(RuntimeError):
    """A stage that failed for good (after its retries); the message names the stage and the root cause."""
