"""Scoring a model: decision-position logits, metrics, calibration (the mapping shift), per-type scores, and
`evaluate`'s record scoring.

May import: workers.contract, workers.data, workers.models.
"""
