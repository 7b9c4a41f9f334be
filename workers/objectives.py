"""The method's training objectives, one function per paper part, built on `workers.losses`.

- `direct_loss`: direct tuning (the baselines and the pyramid's top): cross-entropy on the answer word.
- `ppod_loss`: Pyramid-like Progressive Online Distillation (coarse alignment): ce_weight·CE + Σ_t w_t·KD_t at
  the stage's (high) temperature, every teacher trusted equally.
- `tcrd_loss`: Ternary-Coupled Refinement Distillation (fine refinement): ground truth + top teacher + assistant,
  each KD term weighted per sample by `losses.coupling_weights` (how far that teacher agrees with the ground
  truth), so a wrong teacher does not pull the student; `coupled: false` is the uncoupled ablation.

KD_t is the stage's `kd_loss` (forward KL, reverse KL or JSD with `beta`) over the teacher's top-k + tail
buckets, the only form a teacher sends. `StageObjective` picks the function of the stage's kind.
"""

from __future__ import annotations

from typing import Callable

import torch

from workers.contract import StageLossConfig, TeacherSpec
from workers.inference import target_token_ids
from workers.losses import coupling_weights, cross_entropy, topk_forward_kl, topk_jsd, topk_reverse_kl

LossAndTerms = tuple[torch.Tensor, dict[str, float]]


def kd_divergence(logits: torch.Tensor, out: dict, temperature: float, cfg: StageLossConfig,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """The stage's divergence between one teacher's top-k + tail outputs and the student's logits, times T²."""
    args = (logits, out["topk_logprobs"], out["topk_ids"], out["tail_logprob"])
    if cfg.kd_loss == "forward_kl":
        return topk_forward_kl(*args, temperature=temperature, weights=weights)
    if cfg.kd_loss == "reverse_kl":
        return topk_reverse_kl(*args, temperature=temperature, weights=weights)
    return topk_jsd(*args, beta=cfg.beta, temperature=temperature, weights=weights)


def direct_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_outs: list[dict], cfg: StageLossConfig,
                label_ids: tuple[int, int]) -> LossAndTerms:
    """Direct tuning: ce_weight · CE(answer word)."""
    ce = cross_entropy(logits, target_token_ids(targets, label_ids))
    return cfg.ce_weight * ce, {"loss_ce": ce.item()}


def ppod_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_outs: list[dict], cfg: StageLossConfig,
              label_ids: tuple[int, int]) -> LossAndTerms:
    """PPOD: ce_weight · CE + Σ_t weight_t · KD(teacher_t ‖ student) at temperature T_t."""
    loss, terms = direct_loss(logits, targets, teacher_outs, cfg, label_ids)
    for teacher, out in zip(cfg.teachers, teacher_outs):
        kd = kd_divergence(logits, out, teacher.temperature, cfg)
        loss = loss + teacher.weight * kd
        terms[f"loss_kd_{teacher.tag}"] = kd.item()
    return loss, terms


def tcrd_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_outs: list[dict], cfg: StageLossConfig,
              label_ids: tuple[int, int]) -> LossAndTerms:
    """TCRD: ce_weight · CE + Σ_t weight_t · KD_t, each KD_t weighted per sample by the teacher's coupling
    weight (its own label-word probability of the ground truth, `losses.coupling_weights`)."""
    loss, terms = direct_loss(logits, targets, teacher_outs, cfg, label_ids)
    for teacher, out in zip(cfg.teachers, teacher_outs):
        weights = coupling(teacher, out, targets, cfg.sharpness, terms)
        kd = kd_divergence(logits, out, teacher.temperature, cfg, weights)
        loss = loss + teacher.weight * kd
        terms[f"loss_kd_{teacher.tag}"] = kd.item()
    return loss, terms


def coupling(teacher: TeacherSpec, out: dict, targets: torch.Tensor, sharpness: float,
             terms: dict[str, float]) -> torch.Tensor | None:
    """Per-sample trust weights of a coupled teacher (None when uncoupled); logs their mean."""
    if not teacher.coupled:
        return None
    p_pos = torch.softmax(out["label_logits"], dim=-1)[:, 0]
    weights = coupling_weights(p_pos, targets, sharpness=sharpness)
    terms[f"coupling_{teacher.tag}"] = weights.mean().item()
    return weights


OBJECTIVES: dict[str, Callable[..., LossAndTerms]] = {"direct": direct_loss, "ppod": ppod_loss, "tcrd": tcrd_loss}


class StageObjective:
    """The stage's loss as the train loop calls it: `(logits, targets, teacher_outs) → (loss, logged terms)`."""

    def __init__(self, cfg: StageLossConfig, label_ids: tuple[int, int], vocab: int | None = None):
        self.cfg, self.label_ids, self.vocab = cfg, label_ids, vocab
        self.fn = OBJECTIVES[cfg.kind]

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, teacher_outs: list[dict]) -> LossAndTerms:
        logits = logits[:, :self.vocab]  # the shared tokenizer's rows: real sizes pad their tables differently
        return self.fn(logits, targets, teacher_outs, self.cfg, self.label_ids)
