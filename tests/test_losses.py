"""Math-identity tests for workers.losses: every loss is checked against an explicit float64 formula."""

from __future__ import annotations

import math

import pytest
import torch

from workers.losses import (
    coupling_weights,
    cross_entropy,
    forward_kl,
    jsd,
    reverse_kl,
    teacher_topk,
    topk_forward_kl,
    topk_jsd,
    topk_reverse_kl,
)

N, V = 6, 32
F64 = torch.float64


def _logits(seed: int, n: int = N, v: int = V, scale: float = 2.0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=F64) * scale).to(dtype)


def _probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Explicit softmax: exp(z - max) / sum exp(z - max), in float64."""
    z = logits.double() / temperature
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_v p_v log(p_v / q_v) with 0 log 0 = 0, per row."""
    out = torch.zeros(p.shape[0], dtype=F64)
    for i in range(p.shape[0]):
        for pv, qv in zip(p[i].tolist(), q[i].tolist()):
            if pv > 0:
                out[i] += pv * math.log(pv / qv)
    return out


def _ref_jsd(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    m = beta * p + (1 - beta) * q
    return (beta * _ref_kl(p, m) + (1 - beta) * _ref_kl(q, m)) / (beta * (1 - beta))


def _exact_topk(teacher: torch.Tensor, k: int, temperature: float = 1.0):
    """Full-precision top-k wire values (no fp16 rounding)."""
    log_p = torch.log(_probs(teacher, temperature))
    vals, ids = log_p.topk(k, dim=-1)
    tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1.0))
    if k == teacher.shape[-1]:
        tail = torch.full_like(tail, float("-inf"))
    return vals, ids.int(), tail


def _ref_topk_kl(student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Explicit k+1 bucket KL: p = [p_topk, 1 - sum p_topk], q = [q_topk, 1 - sum q_topk]."""
    p, q = _probs(teacher, temperature), _probs(student, temperature)
    ids = p.topk(k, dim=-1).indices
    p_top, q_top = p.gather(-1, ids), q.gather(-1, ids)
    p_b = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)
    q_b = torch.cat([q_top, (1 - q_top.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)
    if k == student.shape[-1]:
        p_b[:, -1] = 0.0
    return _ref_kl(p_b, q_b) * temperature**2


# --------------------------------------------------------------------------- full-vocabulary losses


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_and_reverse_kl_match_direct_formula(temperature: float) -> None:
    s, t = _logits(0), _logits(1)
    p, q = _probs(t, temperature), _probs(s, temperature)
    fwd = forward_kl(s, t, temperature, reduction="none")
    rev = reverse_kl(s, t, temperature, reduction="none")
    torch.testing.assert_close(fwd, _ref_kl(p, q) * temperature**2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rev, _ref_kl(q, p) * temperature**2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(forward_kl(s, t, temperature), fwd.mean())


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_matches_direct_formula(beta: float, temperature: float) -> None:
    s, t = _logits(2), _logits(3)
    ref = _ref_jsd(_probs(t, temperature), _probs(s, temperature), beta) * temperature**2
    torch.testing.assert_close(jsd(s, t, beta, temperature, reduction="none"), ref, rtol=1e-10, atol=1e-12)


def test_jsd_symmetric_at_half() -> None:
    s, t = _logits(4), _logits(5)
    torch.testing.assert_close(jsd(s, t, 0.5, reduction="none"), jsd(t, s, 0.5, reduction="none"))


def test_jsd_endpoints_and_limits() -> None:
    s, t = _logits(6), _logits(7)
    fwd = forward_kl(s, t, reduction="none")
    rev = reverse_kl(s, t, reduction="none")
    torch.testing.assert_close(jsd(s, t, 0.0, reduction="none"), fwd, rtol=0, atol=0)
    torch.testing.assert_close(jsd(s, t, 1.0, reduction="none"), rev, rtol=0, atol=0)

    def rel_err(beta: float, target: torch.Tensor) -> float:
        return ((jsd(s, t, beta, reduction="none") - target).abs() / target).max().item()

    # Error is O(beta) near 0 and O(1 - beta) near 1: ~10x smaller per 10x step.
    assert rel_err(1e-4, fwd) < 1e-2 and rel_err(1e-5, fwd) < rel_err(1e-4, fwd) / 8
    assert rel_err(1 - 1e-4, rev) < 1e-2 and rel_err(1 - 1e-5, rev) < rel_err(1 - 1e-4, rev) / 8


def test_divergences_nonnegative_and_zero_on_equal_distributions() -> None:
    s, t = _logits(8), _logits(9)
    for loss in (forward_kl(s, t, reduction="none"), reverse_kl(s, t, reduction="none"),
                 jsd(s, t, 0.3, reduction="none")):
        assert (loss > 0).all()
    # Equal distributions (logits differ by a per-row constant) give exactly-zero loss.
    shifted = s + torch.arange(N, dtype=F64).unsqueeze(-1)
    for loss in (forward_kl(s, shifted, 2.0, reduction="none"), reverse_kl(s, shifted, reduction="none"),
                 jsd(s, shifted, 0.3, reduction="none"), jsd(s, shifted, 0.5, reduction="none")):
        torch.testing.assert_close(loss, torch.zeros(N, dtype=F64), rtol=0, atol=1e-12)
    vals, ids, tail = _exact_topk(s, 5)
    torch.testing.assert_close(topk_forward_kl(s, vals, ids, tail, reduction="none"),
                               torch.zeros(N, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "topk"])
def test_temperature_squared_scaling(name: str) -> None:
    """loss(s, t, T) == T^2 * loss(s / T, t / T, T=1)."""
    s, t, temp = _logits(10), _logits(11), 3.0

    def loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        if name == "topk":
            return topk_forward_kl(student, *_exact_topk(teacher, 4, temperature), temperature, reduction="none")
        fn = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}[name]
        return fn(student, teacher, temperature=temperature, reduction="none")

    torch.testing.assert_close(loss(s, t, temp), temp**2 * loss(s / temp, t / temp, 1.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_gradient_identity(temperature: float) -> None:
    """d/ds [T^2 KL(p || softmax(s/T))] = T (q - p) per row."""
    s = _logits(12).requires_grad_()
    t = _logits(13)
    forward_kl(s, t, temperature, reduction="none").sum().backward()
    expected = temperature * (_probs(s.detach(), temperature) - _probs(t, temperature))
    torch.testing.assert_close(s.grad, expected, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- top-k wire format


def test_teacher_topk_wire_format() -> None:
    t = _logits(14, dtype=torch.float32)
    vals, ids, tail = teacher_topk(t, 5, temperature=1.5)
    assert vals.shape == (N, 5) and ids.shape == (N, 5) and tail.shape == (N,)
    assert vals.dtype == torch.float16 and ids.dtype == torch.int32 and tail.dtype == torch.float16
    ref_log_p = torch.log(_probs(t, 1.5))
    torch.testing.assert_close(ids.long(), ref_log_p.topk(5, dim=-1).indices)
    assert (vals[:, :-1] >= vals[:, 1:]).all()
    torch.testing.assert_close(vals.double(), ref_log_p.topk(5, dim=-1).values, rtol=1e-3, atol=1e-3)
    total = torch.cat([vals, tail.unsqueeze(-1)], dim=-1).double().logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros(N, dtype=F64), rtol=0, atol=2e-3)

    _, _, full_tail = teacher_topk(t, V)
    assert torch.isneginf(full_tail).all()
    with pytest.raises(ValueError):
        teacher_topk(t, 0)
    with pytest.raises(ValueError):
        teacher_topk(t, V + 1)


@pytest.mark.parametrize("k", [1, 4, 31])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_forward_kl_matches_bucket_formula(k: int, temperature: float) -> None:
    s, t = _logits(15), _logits(16)
    wire = _exact_topk(t, k, temperature)
    torch.testing.assert_close(topk_forward_kl(s, *wire, temperature, reduction="none"),
                               _ref_topk_kl(s, t, k, temperature), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_full_vocab_equals_forward_kl(temperature: float) -> None:
    s64, t64 = _logits(17), _logits(18)
    full = forward_kl(s64, t64, temperature, reduction="none")
    torch.testing.assert_close(topk_forward_kl(s64, *_exact_topk(t64, V, temperature), temperature,
                                               reduction="none"), full, rtol=0, atol=1e-12)
    # float32 student with float32 teacher values: within 1e-5.
    s32, t32 = s64.float(), t64.float()
    log_p32 = torch.log_softmax(t32 / temperature, -1)
    vals, ids = log_p32.topk(V, dim=-1)
    tail = torch.full((N,), float("-inf"))
    got = topk_forward_kl(s32, vals, ids.int(), tail, temperature, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), full, rtol=0, atol=1e-5)
    # Through the fp16 wire end to end: only fp16 rounding separates the two.
    wire = teacher_topk(t32, V, temperature)
    torch.testing.assert_close(topk_forward_kl(s32, *wire, temperature, reduction="none").double(), full,
                               rtol=1e-2, atol=1e-3)


def test_topk_error_small_for_peaked_teacher_and_bounded_by_full_kl() -> None:
    s = _logits(19)
    t = _logits(20, scale=1.0)
    t[:, :3] += 12.0  # teacher mass concentrated on three tokens
    full = forward_kl(s, t, reduction="none")
    approx = topk_forward_kl(s, *teacher_topk(t.float(), 8), reduction="none")
    assert ((approx.double() - full).abs() / full).max() < 1e-2
    # Data-processing inequality: merging tokens into a bucket never increases KL.
    for k in (1, 3, 8, 16):
        assert (topk_forward_kl(s, *_exact_topk(t, k), reduction="none") <= full + 1e-12).all()


def test_topk_peaked_student_tail_is_stable() -> None:
    """Student tail mass (~e^-60) far below float32 epsilon must not become log(0)."""
    s = torch.zeros(N, V)
    s[:, 0] = 60.0
    p0 = 0.6
    vals = torch.full((N, 1), math.log(p0), dtype=torch.float16)
    tail = torch.full((N,), math.log(1 - p0), dtype=torch.float16)
    ids = torch.zeros(N, 1, dtype=torch.int32)
    got = topk_forward_kl(s, vals, ids, tail, reduction="none")
    lse = 60.0 + math.log1p((V - 1) * math.exp(-60.0))
    log_q0, log_q_tail = 60.0 - lse, math.log(V - 1) - lse
    ref = p0 * (math.log(p0) - log_q0) + (1 - p0) * (math.log(1 - p0) - log_q_tail)
    torch.testing.assert_close(got.double(), torch.full((N,), ref, dtype=F64), rtol=1e-3, atol=0)


# --------------------------------------------------------------------------- cross-entropy, weights, gradients


def test_cross_entropy_matches_direct_formula() -> None:
    s = _logits(22)
    targets = torch.arange(N) % V
    ref = torch.tensor([-math.log(_probs(s)[i, targets[i]].item()) for i in range(N)], dtype=F64)
    torch.testing.assert_close(cross_entropy(s, targets, reduction="none"), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cross_entropy(s, targets), torch.nn.functional.cross_entropy(s, targets))


def _all_losses(s: torch.Tensor, t: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    targets = torch.arange(s.shape[0]) % s.shape[1]
    return {
        "forward_kl": forward_kl(s, t, 2.0, **kw),
        "reverse_kl": reverse_kl(s, t, 2.0, **kw),
        "jsd": jsd(s, t, 0.3, 2.0, **kw),
        "topk": topk_forward_kl(s, *teacher_topk(t, 5, 2.0), 2.0, **kw),
        "topk_full": topk_forward_kl(s, *teacher_topk(t, s.shape[1], 2.0), 2.0, **kw),
        "cross_entropy": cross_entropy(s, targets, **kw),
    }


def test_weights_applied_and_mean_not_normalised_by_weight_sum() -> None:
    s, t = _logits(23), _logits(24)
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.25, 3.0], dtype=F64)
    plain = _all_losses(s, t, reduction="none")
    weighted = _all_losses(s, t, reduction="none", weights=w)
    means = _all_losses(s, t, weights=w)
    for name in plain:
        torch.testing.assert_close(weighted[name], w * plain[name], msg=name)
        torch.testing.assert_close(means[name], (w * plain[name]).sum() / N, msg=name)
    with pytest.raises(ValueError):
        forward_kl(s, t, weights=torch.ones(N + 1, dtype=F64))
    with pytest.raises(ValueError):
        forward_kl(s, t, reduction="sum")


def test_gradients_flow_to_student_only_and_are_finite() -> None:
    s = _logits(25, dtype=torch.float32).requires_grad_()
    t = _logits(26, dtype=torch.float32).requires_grad_()
    for name, loss in _all_losses(s, t).items():
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert not loss.isnan(), name
    for fn in (forward_kl, reverse_kl, jsd):
        assert torch.autograd.grad(fn(s, t), t, allow_unused=True) == (None,)
    vals, ids, tail = (x.detach() for x in teacher_topk(t, 5))
    vals.requires_grad_()
    tail = tail.float().requires_grad_()
    loss = topk_forward_kl(s, vals, ids, tail)
    assert torch.autograd.grad(loss, [vals, tail], allow_unused=True) == (None, None)


def test_low_precision_student_computes_in_float32() -> None:
    s, t = _logits(27, dtype=torch.bfloat16), _logits(28, dtype=torch.bfloat16)
    for name, loss in _all_losses(s, t).items():
        assert loss.dtype == torch.float32, name


# --------------------------------------------------------------------------- coupling weights


def test_coupling_weights_properties() -> None:
    p_correct = torch.linspace(0, 1, 101, dtype=F64)
    ones, zeros = torch.ones_like(p_correct), torch.zeros_like(p_correct)
    w = coupling_weights(p_correct, ones)
    # Same weight whether the positive or the negative label is correct.
    torch.testing.assert_close(coupling_weights(1 - p_correct, zeros), w)
    assert (w[p_correct <= 0.3] < 0.05).all()
    assert (w[p_correct >= 0.7] > 0.95).all()
    assert (w[1:] > w[:-1]).all()
    torch.testing.assert_close(w[[0, 50, 100]], torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    # Direct formula.
    sig = torch.sigmoid
    ref = (sig(10 * (2 * p_correct - 1)) - sig(torch.tensor(-10.0, dtype=F64))) / (
        sig(torch.tensor(10.0, dtype=F64)) - sig(torch.tensor(-10.0, dtype=F64)))
    torch.testing.assert_close(w, ref)


def test_coupling_weights_floor_sharpness_and_detach() -> None:
    p = torch.tensor([0.1, 0.4, 0.9], requires_grad=True)
    targets = torch.tensor([1, 0, 1])
    w = coupling_weights(p, targets, sharpness=4.0, floor=0.2)
    assert not w.requires_grad
    assert ((w >= 0.2) & (w <= 1.0)).all()
    torch.testing.assert_close(w, 0.2 + 0.8 * coupling_weights(p, targets, sharpness=4.0))
    # Sharper -> wrong teachers pushed further down, right teachers further up.
    pc = torch.tensor([0.3, 0.7])
    soft, sharp = coupling_weights(pc, torch.ones(2), 4.0), coupling_weights(pc, torch.ones(2), 20.0)
    assert sharp[0] < soft[0] and sharp[1] > soft[1]
    with pytest.raises(ValueError):
        coupling_weights(p, targets, sharpness=0.0)
    with pytest.raises(ValueError):
        coupling_weights(p, targets, floor=1.5)


# --------------------------------------------------------------------------- top-k + tail reverse KL and JSD


def _ref_topk_buckets(student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float):
    p, q = _probs(teacher, temperature), _probs(student, temperature)
    ids = p.topk(k, dim=-1).indices
    p_top, q_top = p.gather(-1, ids), q.gather(-1, ids)
    p_b = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)
    q_b = torch.cat([q_top, (1 - q_top.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)
    return p_b, q_b


@pytest.mark.parametrize("k", [1, 4, 31])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_reverse_kl_and_jsd_match_bucket_formulas(k: int, temperature: float) -> None:
    s, t = _logits(30), _logits(31)
    wire = _exact_topk(t, k, temperature)
    p_b, q_b = _ref_topk_buckets(s, t, k, temperature)
    torch.testing.assert_close(topk_reverse_kl(s, *wire, temperature, reduction="none"),
                               _ref_kl(q_b, p_b) * temperature**2, rtol=1e-9, atol=1e-12)
    for beta in (0.1, 0.5, 0.9):
        torch.testing.assert_close(topk_jsd(s, *wire, beta, temperature, reduction="none"),
                                   _ref_jsd(p_b, q_b, beta) * temperature**2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_reverse_kl_and_jsd_with_full_vocab_equal_full_forms(temperature: float) -> None:
    """k == V: the tail bucket is empty on both sides and the top-k forms are the full-vocabulary losses."""
    s, t = _logits(32).requires_grad_(), _logits(33)
    wire = _exact_topk(t, V, temperature)
    pairs = [(topk_reverse_kl(s, *wire, temperature, reduction="none"),
              reverse_kl(s, t, temperature, reduction="none"))]
    pairs += [(topk_jsd(s, *wire, beta, temperature, reduction="none"), jsd(s, t, beta, temperature, reduction="none"))
              for beta in (0.0, 0.3, 0.5, 1.0)]
    for got, full in pairs:
        torch.testing.assert_close(got, full, rtol=0, atol=1e-12)
        (g_got,) = torch.autograd.grad(got.sum(), s)
        (g_full,) = torch.autograd.grad(full.sum(), s)
        assert torch.isfinite(g_got).all()
        torch.testing.assert_close(g_got, g_full, rtol=0, atol=1e-12)
    # Through the fp16 wire end to end, float32 student: only fp16 rounding separates them.
    s32, t32 = s.detach().float(), t.float()
    fp16 = teacher_topk(t32, V, temperature)
    torch.testing.assert_close(topk_reverse_kl(s32, *fp16, temperature, reduction="none").double(),
                               reverse_kl(s.detach(), t, temperature, reduction="none"), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(topk_jsd(s32, *fp16, 0.5, temperature, reduction="none").double(),
                               jsd(s.detach(), t, 0.5, temperature, reduction="none"), rtol=1e-2, atol=1e-3)


def test_topk_jsd_endpoints_are_the_topk_kls() -> None:
    s, t = _logits(34), _logits(35)
    wire = _exact_topk(t, 5)
    torch.testing.assert_close(topk_jsd(s, *wire, 0.0, reduction="none"),
                               topk_forward_kl(s, *wire, reduction="none"), rtol=0, atol=0)
    torch.testing.assert_close(topk_jsd(s, *wire, 1.0, reduction="none"),
                               topk_reverse_kl(s, *wire, reduction="none"), rtol=0, atol=0)
    with pytest.raises(ValueError):
        topk_jsd(s, *wire, 1.5)


def test_topk_forms_weights_and_student_only_gradients() -> None:
    s = _logits(36, dtype=torch.float32).requires_grad_()
    vals, ids, tail = teacher_topk(_logits(37, dtype=torch.float32), 5, 2.0)
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.25, 3.0])
    for fn in (lambda **kw: topk_reverse_kl(s, vals, ids, tail, 2.0, **kw),
               lambda **kw: topk_jsd(s, vals, ids, tail, 0.3, 2.0, **kw)):
        plain = fn(reduction="none")
        torch.testing.assert_close(fn(reduction="none", weights=w), w * plain)
        loss = fn()
        assert loss.dtype == torch.float32
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
