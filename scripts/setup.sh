#!/usr/bin/env bash
# Creates .venv, installs torch pinned to 2.13.0 (TORCH_SPEC overrides; on CI machines this resolves to the
# local CPU wheel, never a CUDA build), then hkd4vlm with its dependencies and its test extra (hypothesis,
# markdown, num2words).
# A torch already in the venv is kept, so GPU users install their CUDA torch first (see docs/setup.md) and run this
# after.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install -q -e ".[test]"
