"""Pure-torch distillation losses.

Conventions shared by every loss here:

* Inputs are ``[N, V]`` logits (``N`` supervised positions, ``V`` vocabulary).
  Computation runs in at least float32 (float64 inputs stay float64).
* Teacher-side tensors are detached: gradients flow into the student only.
* ``reduction="mean"`` returns ``sum_i w_i * l_i / N``. This is deliberately
  *not* normalised by ``sum_i w_i``: a weight of 0 removes a sample's
  contribution without up-weighting the others. ``reduction="none"`` returns
  the weighted per-row losses ``w_i * l_i`` of shape ``[N]``.
  ``weights=None`` means ``w_i = 1``.
* Temperature losses use ``p_T = softmax(teacher / T)``,
  ``q_S = softmax(student / T)`` and are multiplied by ``T**2`` (Hinton et
  al.) so gradient magnitudes are comparable across temperatures.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "forward_kl",
    "reverse_kl",
    "jsd",
    "topk_forward_kl",
    "topk_reverse_kl",
    "topk_jsd",
    "teacher_topk",
    "cross_entropy",
    "coupling_weights",
]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.log_softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Row-wise ``KL(p || q) = sum p (log p - log q)`` with ``0 * log 0 = 0``."""
    terms = torch.where(log_p > float("-inf"), log_p.exp() * (log_p - log_q), 0.0)
    return terms.sum(dim=-1)


def _reduce(loss: Tensor, weights: Tensor | None, reduction: str) -> Tensor:
    if weights is not None:
        if weights.shape != loss.shape:
            raise ValueError(f"weights shape {tuple(weights.shape)} != per-row loss shape {tuple(loss.shape)}")
        loss = loss * weights.to(loss.dtype)
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.sum() / loss.numel()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _tempered(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Teacher (detached) and student log-probs at temperature T, in the student's compute dtype."""
    log_p = _log_probs(teacher_logits.detach(), temperature).to(_compute_dtype(student_logits))
    return log_p, _log_probs(student_logits, temperature)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, reduction: str = "mean",
               weights: Tensor | None = None) -> Tensor:
    """Forward (mean-seeking) KL: ``T^2 * KL(p_T || q_S)`` per row."""
    log_p, log_q = _tempered(student_logits, teacher_logits, temperature)
    return _reduce(_kl(log_p, log_q) * temperature**2, weights, reduction)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, reduction: str = "mean",
               weights: Tensor | None = None) -> Tensor:
    """Reverse (mode-seeking) KL: ``T^2 * KL(q_S || p_T)`` per row."""
    log_p, log_q = _tempered(student_logits, teacher_logits, temperature)
    return _reduce(_kl(log_q, log_p) * temperature**2, weights, reduction)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> Tensor:
    r"""Generalised Jensen-Shannon divergence, scaled to be continuous in ``beta``.

    With ``m = beta * p_T + (1 - beta) * q_S`` (TRL GKD's mixture),

    .. math::
        \mathrm{JSD}_\beta = \frac{\beta\,KL(p_T\|m) + (1-\beta)\,KL(q_S\|m)}{\beta(1-\beta)} \cdot T^2,
        \quad 0 < \beta < 1,

    and by continuity ``JSD_0 = T^2 KL(p_T || q_S)`` (forward KL) and
    ``JSD_1 = T^2 KL(q_S || p_T)`` (reverse KL), since the numerator is
    ``beta * KL(p||q) + O(beta^2)`` as ``beta -> 0`` and
    ``(1-beta) * KL(q||p) + O((1-beta)^2)`` as ``beta -> 1``.

    Relation to TRL's ``generalized_jsd_loss``: same endpoints (beta=0 forward
    KL, beta=1 reverse KL), but TRL's interior value is the unscaled numerator,
    i.e. TRL = ``beta * (1 - beta) *`` this (e.g. 1/4 of this at beta=0.5).
    At ``beta = 0.5`` the loss is symmetric in student and teacher.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature, reduction, weights)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature, reduction, weights)
    log_p = _log_probs(teacher_logits.detach(), temperature).to(_compute_dtype(student_logits))
    log_q = _log_probs(student_logits, temperature)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    numerator = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    loss = numerator / (beta * (1.0 - beta)) * temperature**2
    return _reduce(loss, weights, reduction)


def _topk_mask(topk_ids: Tensor, vocab_size: int) -> Tensor:
    """Boolean ``[N, V]`` mask that is True at the teacher's top-k ids."""
    ids = topk_ids.long()
    mask = torch.zeros(*ids.shape[:-1], vocab_size, dtype=torch.bool, device=ids.device)
    return mask.scatter_(-1, ids, True)


def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher wire format: ``(topk_logprobs fp16 [N,k], topk_ids int32 [N,k], tail_logprob fp16 [N])``.

    ``topk_logprobs`` are the ``k`` largest entries of ``log_softmax(logits / T)``
    (descending) and ``tail_logprob = log(1 - sum exp(topk_logprobs))``, computed
    in float32 as a masked logsumexp over the non-top-k log-probs (``-inf`` when
    ``k == V``). Values are cast to fp16 only at the end.
    """
    vocab_size = teacher_logits.shape[-1]
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, {vocab_size}], got {k}")
    log_p = _log_probs(teacher_logits.detach(), temperature)
    topk_logprobs, topk_ids = log_p.topk(k, dim=-1)
    tail = log_p.masked_fill(_topk_mask(topk_ids, vocab_size), float("-inf")).logsumexp(dim=-1)
    return topk_logprobs.half(), topk_ids.int(), tail.half()


def _topk_buckets(
    student_logits: Tensor, topk_logprobs: Tensor, topk_ids: Tensor, tail_logprob: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs over ``k + 1`` buckets (teacher top-k tokens + one tail), ``[N, k+1]`` each.

    Teacher: ``[topk_logprobs, tail_logprob]`` (already at temperature ``T``), renormalised over the buckets to
    absorb fp16 rounding. Student: ``[log q_S(topk_ids), log(1 - sum q_S(topk_ids))]`` with
    ``q_S = softmax(student / T)``, the tail computed stably as a masked ``logsumexp`` of the non-top-k log-probs.
    """
    dtype = _compute_dtype(student_logits)
    log_q = _log_probs(student_logits, temperature)
    mask = _topk_mask(topk_ids, log_q.shape[-1])
    # Finite fill (not -inf) keeps the logsumexp gradient finite when k == V; the
    # tail bucket then has teacher mass 0 and drops out of the KL.
    q_tail = log_q.masked_fill(mask, torch.finfo(dtype).min).logsumexp(dim=-1, keepdim=True)
    log_q_buckets = torch.cat([log_q.gather(-1, topk_ids.long()), q_tail], dim=-1)

    log_p_buckets = torch.cat([topk_logprobs.detach(), tail_logprob.detach().unsqueeze(-1)], dim=-1).to(dtype)
    log_p_buckets = log_p_buckets - log_p_buckets.logsumexp(dim=-1, keepdim=True)
    return log_p_buckets, log_q_buckets


def _drop_empty_tail(log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """Where the teacher's tail is empty (``k == V``) the student's tail is empty too (it holds no token):
    both become ``-inf``, so the bucket drops out of a KL in either direction instead of giving ``0 * inf``."""
    empty = torch.isneginf(log_p[:, -1:])
    return log_p, torch.cat([log_q[:, :-1], log_q[:, -1:].masked_fill(empty, float("-inf"))], dim=-1)


def topk_forward_kl(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_ids: Tensor,
    tail_logprob: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> Tensor:
    """Forward KL over ``k + 1`` buckets (teacher top-k tokens + one tail), times ``T^2``.

    Teacher: ``p = [exp(topk_logprobs), exp(tail_logprob)]`` (already at
    temperature ``T``), renormalised over the ``k + 1`` buckets to absorb fp16
    rounding. Student: ``q = [q_S(topk_ids), 1 - sum q_S(topk_ids)]`` with
    ``q_S = softmax(student / T)``; the student tail log-mass is computed stably
    as a masked ``logsumexp`` of the student's non-top-k log-probs.
    Equals ``forward_kl`` exactly when ``k == V`` (tail mass 0, ``0 log 0 = 0``).
    """
    log_p_buckets, log_q_buckets = _topk_buckets(student_logits, topk_logprobs, topk_ids, tail_logprob, temperature)
    return _reduce(_kl(log_p_buckets, log_q_buckets) * temperature**2, weights, reduction)


def topk_reverse_kl(student_logits: Tensor, topk_logprobs: Tensor, topk_ids: Tensor, tail_logprob: Tensor,
                    temperature: float = 1.0, reduction: str = "mean", weights: Tensor | None = None) -> Tensor:
    """Reverse (mode-seeking) KL over the ``k + 1`` buckets of ``topk_forward_kl``: ``T^2 KL(q || p)``.
    Equals ``reverse_kl`` when ``k == V``."""
    log_p, log_q = _drop_empty_tail(*_topk_buckets(student_logits, topk_logprobs, topk_ids, tail_logprob,
                                                   temperature))
    return _reduce(_kl(log_q, log_p) * temperature**2, weights, reduction)


def topk_jsd(student_logits: Tensor, topk_logprobs: Tensor, topk_ids: Tensor, tail_logprob: Tensor, beta: float = 0.5,
             temperature: float = 1.0, reduction: str = "mean", weights: Tensor | None = None) -> Tensor:
    """``jsd`` (same scaling and endpoints: beta=0 forward KL, beta=1 reverse KL) over the ``k + 1`` buckets of
    ``topk_forward_kl``. Equals ``jsd`` when ``k == V``."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    args = (student_logits, topk_logprobs, topk_ids, tail_logprob)
    if beta == 0.0:
        return topk_forward_kl(*args, temperature, reduction, weights)
    if beta == 1.0:
        return topk_reverse_kl(*args, temperature, reduction, weights)
    log_p, log_q = _drop_empty_tail(*_topk_buckets(*args, temperature))
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    numerator = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return _reduce(numerator / (beta * (1.0 - beta)) * temperature**2, weights, reduction)


def cross_entropy(
    student_logits: Tensor,
    targets: Tensor,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Hard-label cross-entropy ``-log softmax(student)[target]`` per row (no temperature)."""
    log_q = _log_probs(student_logits, 1.0)
    loss = -log_q.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return _reduce(loss, weights, reduction)


def coupling_weights(
    teacher_probs_pos: Tensor,
    targets: Tensor,
    sharpness: float = 10.0,
    floor: float = 0.0,
) -> Tensor:
    r"""Per-sample trust weights in ``[floor, 1]`` for ternary-coupled refinement (binary tasks).

    ``teacher_probs_pos`` is the teacher's probability of the positive label word
    (renormalised over the two label words); ``targets`` is 1 (positive) or 0.
    With ``p_c = p`` if target is 1 else ``1 - p`` and ``s = sharpness``:

    .. math::
        g(p_c) = \frac{\sigma(s(2p_c - 1)) - \sigma(-s)}{\sigma(s) - \sigma(-s)}, \qquad
        w = \mathrm{floor} + (1 - \mathrm{floor})\, g(p_c).

    ``g`` is strictly increasing with ``g(0) = 0``, ``g(1/2) = 1/2``, ``g(1) = 1``:
    a confidently wrong teacher gets ~0 weight, a confidently right one ~1.
    At ``s = 10``: ``g(0.3) < 0.02`` and ``g(0.7) > 0.98``. The result is
    detached (no gradient flows into the weights).
    """
    if sharpness <= 0:
        raise ValueError(f"sharpness must be > 0, got {sharpness}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    p = teacher_probs_pos.detach().to(_compute_dtype(teacher_probs_pos))
    p_correct = torch.where(targets.detach() == 1, p, 1.0 - p)
    half_range = 0.5 * math.tanh(0.5 * sharpness)  # (sigma(s) - sigma(-s)) / 2
    g = (torch.sigmoid(sharpness * (2.0 * p_correct - 1.0)) - (0.5 - half_range)) / (2.0 * half_range)
    return floor + (1.0 - floor) * g
