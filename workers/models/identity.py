"""What a stage's fingerprint covers of the worker side, importable without torch (a sweep trial's process and
the planner read fingerprints too): the prompt format's version and a local base's weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

# The version of `workers.models.prompts`' format (templates and supervised positions): bump it with any change there,
# so a moved decision position never reuses stages trained on the old one. 2: Task 2's claim moved into the
# assistant turn, its decision read right after it.
PROMPT_FORMAT_VERSION = 2


def weights_hash(model_dir: str | Path, whole_below: int = 64 << 20) -> str:
    """A hash of a local model dir's safetensors weights (a stage's fingerprint covers it, so a rebuilt base never
    reuses old stages): sha256 of each file's bytes, or of its size and first and last MiB past `whole_below`
    bytes (a 7B checkpoint is not read whole on every run)."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if size < whole_below:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()

