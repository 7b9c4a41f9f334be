"""The method's training objectives, built on `workers.losses`.

- `direct_loss`: direct tuning (the baselines and the pyramid's top): cross-entropy on the answer word.
- `distill_loss`, for both distillation parts (they differ in their stage plan, not in code):
  Pyramid-like Progressive Online Distillation (coarse alignment): ce_weight·CE + Σ_t w_t·KD_t at the stage's
  (high) temperature, every teacher trusted equally; Ternary-Coupled Refinement Distillation (fine
  refinement): ground truth + top teacher + assistant, each KD term weighted per sample by
  `losses.coupling_weights` (how far that teacher agrees with the ground truth), so a wrong teacher does not
  pull the student; `coupled: false` is the uncoupled ablation.

KD_t is the stage's `kd_loss` (forward KL, reverse KL or JSD with `beta`) over what the teacher sends: its
top-k + tail buckets of the shared vocabulary, or, from a teacher with another tokenizer
(`TeacherSpec.label_words`), its answer distribution over the two label words, against the student's over its
own label-word ids. CE and the coupled terms use the labelled positions only; the unlabelled ones (target -1)
get their own KD-only term, `unlabeled_weight` · Σ_t weight_t · KD_t.
`StageObjective` picks the function of the stage's objective; with `balance_tasks` every term is a per-task weighted
mean (`task_weights`), so a Task 2 record's one position weighs what Task 1's options do together.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from workers.contract import KDLoss, Objective, OutputKind, StageLossConfig, TeacherSpec
from workers.inference.logits import target_token_ids
from workers.losses import (
    coupling_weights,
    cross_entropy,
    forward_kl,
    jsd,
    reverse_kl,
    topk_forward_kl,
    topk_jsd,
    topk_reverse_kl,
)
from workers.teachers.outputs import TeacherOutput

LossAndTerms = tuple[torch.Tensor, dict[str, float]]


def kd_divergence(logits: torch.Tensor, out: TeacherOutput, temperature: float, cfg: StageLossConfig,
                  label_ids: tuple[int, int], weights: torch.Tensor | None = None) -> torch.Tensor:
    """The stage's divergence between one teacher's outputs and the student's logits, times T²: over the
    teacher's top-k + tail buckets, or, when it sent only its label-word logits, over the two label words."""
    if out.kind is OutputKind.LABEL_WORDS:
        return label_word_divergence(logits[:, list(label_ids)], out.label_logits, temperature, cfg, weights)
    args = (logits, out.topk_logprobs, out.topk_ids, out.tail_logprob)
    if cfg.kd_loss is KDLoss.FORWARD_KL:
        return topk_forward_kl(*args, temperature=temperature, weights=weights)
    if cfg.kd_loss is KDLoss.REVERSE_KL:
        return topk_reverse_kl(*args, temperature=temperature, weights=weights)
    return topk_jsd(*args, beta=cfg.beta, temperature=temperature, weights=weights)


def label_word_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float, cfg: StageLossConfig,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """The stage's divergence between two answer distributions over (positive, negative) label-word logits
    [P, 2]: exact across tokenizers, as each side scores the same two words with its own ids."""
    if cfg.kd_loss is KDLoss.FORWARD_KL:
        return forward_kl(student, teacher, temperature=temperature, weights=weights)
    if cfg.kd_loss is KDLoss.REVERSE_KL:
        return reverse_kl(student, teacher, temperature=temperature, weights=weights)
    return jsd(student, teacher, beta=cfg.beta, temperature=temperature, weights=weights)


def direct_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_outs: list[TeacherOutput], cfg: StageLossConfig,
                label_ids: tuple[int, int], balance: torch.Tensor | None = None) -> LossAndTerms:
    """Direct tuning: ce_weight · CE(answer word) over the labelled positions (an unlabelled one, target -1,
    never enters; a batch without labelled positions gives 0); `balance`: per-position weights (`task_weights`)."""
    labelled = targets >= 0
    if not labelled.any():
        return logits.sum() * 0.0, {}
    ce = cross_entropy(at(logits, labelled), target_token_ids(at(targets, labelled), label_ids),
                       weights=_within(balance, labelled))
    return cfg.ce_weight * ce, {"loss_ce": ce.item()}


def distill_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_outs: list[TeacherOutput], cfg: StageLossConfig,
                 label_ids: tuple[int, int], balance: torch.Tensor | None = None) -> LossAndTerms:
    """PPOD and TCRD: ce_weight · CE + Σ_t weight_t · KD_t at temperature T_t over the labelled positions, each
    KD_t weighted per sample by the teacher's coupling weight when it is coupled (TCRD: its own label-word
    probability of the ground truth, `losses.coupling_weights`; PPOD's teachers are uncoupled), then the
    unlabelled term (`unlabeled_term`) over the rest. `balance`: per-position task weights, times the coupling."""
    loss, terms = direct_loss(logits, targets, teacher_outs, cfg, label_ids, balance)
    labelled = targets >= 0
    if labelled.any():
        for teacher, out in zip(cfg.teachers, teacher_outs):
            out = out.map(lambda v: at(v, labelled))
            weights = _times(coupling(teacher, out, at(targets, labelled), cfg.sharpness, terms),
                             _within(balance, labelled))
            kd = kd_divergence(at(logits, labelled), out, teacher.temperature, cfg, label_ids, weights)
            loss = loss + teacher.weight * kd
            terms[f"loss_kd_{teacher.tag}"] = kd.item()
    return unlabeled_term(loss, logits, targets, teacher_outs, cfg, label_ids, terms, balance), terms


def unlabeled_term(loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, teacher_outs: list[TeacherOutput],
                   cfg: StageLossConfig, label_ids: tuple[int, int], terms: dict[str, float],
                   balance: torch.Tensor | None = None) -> torch.Tensor:
    """`loss` + unlabeled_weight · the term over the unlabelled positions (target -1): Σ_t weight_t · KD_t,
    unweighted per sample (coupling needs the ground truth they lack), or with `pseudo_labels` CE on the top
    teacher's decision (margin ≥ 0: positive). Logs `loss_unlabeled` and `unlabeled_positions`."""
    unlabelled = targets < 0
    if not teacher_outs or not unlabelled.any():
        return loss
    student, weights = logits[unlabelled], _within(balance, unlabelled)
    if cfg.unlabeled_use == "pseudo_labels":
        decision = teacher_outs[cfg.top_teacher].label_logits[unlabelled]
        term = cross_entropy(student, target_token_ids((decision[:, 0] >= decision[:, 1]).long(), label_ids),
                             weights=weights)
    else:
        term = sum(t.weight * kd_divergence(student, out.map(lambda v: v[unlabelled]), t.temperature, cfg,
                                            label_ids, weights)
                   for t, out in zip(cfg.teachers, teacher_outs))
    terms.update(loss_unlabeled=term.item(), unlabeled_positions=float(unlabelled.sum().item()))
    return loss + cfg.unlabeled_weight * term


def at(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked rows of x; x itself when the mask keeps all (the labelled-only loss stays bit-identical)."""
    return x if mask.all() else x[mask]


def task_weights(tasks: list[str] | np.ndarray) -> torch.Tensor:
    """Per-position weights [P] under which a loss's mean is the mean over the tasks present of each task's own
    mean (a task's positions share weight P / (tasks × its positions)); they average 1, so the loss keeps its
    scale."""
    tasks = np.asarray(tasks)
    names, index, counts = np.unique(tasks, return_inverse=True, return_counts=True)
    return torch.from_numpy(len(tasks) / (len(names) * counts[index])).float()


def _within(balance: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """The task weights renormalised over the masked positions (a labelled or an unlabelled group): each group's
    tasks weigh the same within it."""
    if balance is None:
        return None
    w = at(balance, mask)
    return w * (len(w) / w.sum())


def _times(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a * b


def coupling(teacher: TeacherSpec, out: TeacherOutput, targets: torch.Tensor, sharpness: float,
             terms: dict[str, float]) -> torch.Tensor | None:
    """Per-sample trust weights of a coupled teacher (None when uncoupled); logs their mean."""
    if not teacher.coupled:
        return None
    p_pos = torch.softmax(out.label_logits, dim=-1)[:, 0]
    weights = coupling_weights(p_pos, targets, sharpness=sharpness)
    terms[f"coupling_{teacher.tag}"] = weights.mean().item()
    return weights


OBJECTIVES: dict[Objective, Callable[..., LossAndTerms]] = {Objective.CE: direct_loss, Objective.DISTILL: distill_loss}


class StageObjective:
    """The stage's loss as the train loop calls it: `(logits, targets, teacher_outs, tasks) → (loss, logged
    terms)`; `balance_tasks`: weigh each position by `task_weights` of its batch's tasks."""

    def __init__(self, cfg: StageLossConfig, label_ids: tuple[int, int], vocab: int | None = None,
                 balance_tasks: bool = False):
        self.cfg, self.label_ids, self.vocab, self.balance_tasks = cfg, label_ids, vocab, balance_tasks
        self.fn = OBJECTIVES[cfg.objective]

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, teacher_outs: list[TeacherOutput],
                 tasks: list[str] | np.ndarray | None = None) -> LossAndTerms:
        logits = logits[:, :self.vocab]  # the shared tokenizer's rows: real sizes pad their tables differently
        balance = task_weights(tasks).to(logits.device) if self.balance_tasks and tasks is not None else None
        return self.fn(logits, targets, teacher_outs, self.cfg, self.label_ids, balance)
