"""plots/training_curves.png shows every logged step (issue 32): an 11-step stage its 11 points, a stage that logged
one step its one point, the raw loss faint under a smoothed line. From synthetic histories; no Ray, no MLflow."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from orchestrator.report.plots import MARKERS_UNDER, curves_figure, smoothed

STEPS = list(range(1, 12))


def _eleven_steps() -> dict:
    rng = np.random.default_rng(0)
    loss = (2.0 * np.exp(-0.1 * np.arange(11)) + 0.2 * rng.random(11)).tolist()
    return {"loss": (STEPS, loss), "loss_ce": (STEPS, [v * 0.6 for v in loss]),
            "teacher_wait_s": (STEPS, rng.random(11).tolist()),
            "val/hallucination/f1": ([6, 11], [0.41, 0.48]), "val/factuality/f1": ([6, 11], [0.5, 0.52])}


def _lines(ax: plt.Axes, n: int) -> list:
    return [line for line in ax.get_lines() if len(line.get_xdata()) == n]


def test_an_eleven_step_stage_shows_its_points(tmp_path):
    fig = curves_figure({"S-direct": _eleven_steps(), "S+PPOD": {"loss": ([10], [1.7])}, "L-direct": None})
    (short, one, gone), (val, _, _) = fig.axes[0:3], fig.axes[3:6]
    loss_lines = _lines(short, 11)
    raw = [line for line in loss_lines if line.get_marker() == "o"]
    smooth = [line for line in loss_lines if line.get_marker() in ("None", None, "")]
    assert len(raw) == 2 and len(smooth) == 2, [(line.get_label(), line.get_marker()) for line in loss_lines]
    for r, s in zip(raw, smooth):
        assert list(r.get_xdata()) == STEPS and list(s.get_xdata()) == STEPS
        assert r.get_alpha() < 0.5 and (s.get_alpha() or 1.0) == 1.0  # raw faint under the smoothed line
        assert r.get_color() == s.get_color()
    assert sorted(s.get_label() for s in smooth) == ["loss", "loss_ce"]
    # the validation points of the same stage, and the teacher wait on its second axis, with markers
    assert [len(line.get_xdata()) for line in val.get_lines()] == [2, 2]
    twin = [ax for ax in fig.axes[6:] if ax.get_ylabel() == "teacher_wait_s"]
    assert twin and twin[0].get_lines()[0].get_marker() == "."
    # a stage that logged one step (11 steps, log_every 10) shows that step as a visible marker
    (point,) = one.get_lines()
    assert list(point.get_xdata()) == [10] and point.get_marker() == "o" and (point.get_alpha() or 1.0) == 1.0
    assert "no history" in gone.get_title()
    fig.savefig(tmp_path / "training_curves.png", dpi=60)
    assert (tmp_path / "training_curves.png").stat().st_size > 5000
    plt.close(fig)


def test_long_stages_drop_markers_and_the_smoothing_follows_the_trend():
    n = MARKERS_UNDER + 1
    fig = curves_figure({"L-direct": {"loss": (list(range(n)), np.linspace(3, 1, n).tolist())}})
    assert {line.get_marker() for line in fig.axes[0].get_lines()} == {"None"}
    plt.close(fig)
    noisy = 1.0 + np.random.default_rng(1).normal(0, 0.3, 1000)
    out = smoothed(noisy.tolist())
    assert out.shape == noisy.shape and out[100:-100].std() < noisy.std() / 4 and abs(out.mean() - 1.0) < 0.05
    assert np.allclose(smoothed([2.0, 2.0, 2.0]), 2.0) and np.allclose(smoothed([5.0]), 5.0)
    line = np.linspace(3.0, 1.0, 11)
    assert np.allclose(smoothed(line.tolist())[1:-1], line[1:-1])  # centred: no lag behind a falling loss
