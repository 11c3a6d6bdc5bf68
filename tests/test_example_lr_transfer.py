"""The lr_transfer example (Hayou 2025, arXiv:2511.01734; Yang et al. 2022, arXiv:2203.03466):
the one-step optimal LR of a deep linear MLP converges to eta_inf under muP and falls like
1/width under SP; the best LR of a ReLU MLP LR sweep stays put under muP and moves under SP."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import lr_transfer


def test_quick_writes_figure_and_json(tmp_path):
    result = lr_transfer.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "lr_transfer.png").stat().st_size > 10_000
    stored = json.loads((tmp_path / "lr_transfer.json").read_text())
    for key in ("settings", "seeds", "torch_version", "part_a", "part_b", "assertions",
                "wall_time_s"):
        assert key in stored and key in result
    assert {"eta_inf", "mup", "sp", "ntp"} <= set(stored["part_a"])
    assert {"mup", "sp", "ntp", "lrs", "widths"} <= set(stored["part_b"])
    assert stored["part_a"]["polynomial_vs_autograd_max_rel_err"] < 1e-8
    assert all(isinstance(v, bool) for v in stored["assertions"].values())


@pytest.mark.slow
def test_lr_transfer_claims(tmp_path):
    result = lr_transfer.main(["--out", str(tmp_path)])
    a, b = result["part_a"], result["part_b"]
    dev = {r["width"]: r["rel_dev_mean"] for r in a["mup"]}
    assert sorted(dev) == [64, 256, 1024, 4096]
    # (a) muP: the optimum approaches eta_inf, at about the predicted rate n^(-1/2) or faster
    assert dev[64] > dev[256] > dev[1024], dev
    assert dev[1024] < 0.15, dev
    assert dev[4096] < 0.05, dev
    e = a["mup_dev_exponent_from_256"]  # the theory's rate n^(-1/2), within the interval
    assert e["low"] <= -0.5 < e["high"] < 0, e
    # (a) SP: the optimum falls at least 2x per 4x width (theory: 4x)
    assert all(d >= 2.0 for d in a["sp_decay_per_step"]), a["sp_decay_per_step"]
    assert a["polynomial_vs_autograd_max_rel_err"] < 1e-8
    assert a["grid_refine_vs_derivative_roots_max_rel_err"] < 1e-6
    # (b) the LR sweep: muP keeps its best LR, SP's moves by at least one grid step
    assert len(set(b["mup"]["best_lr_grid_index"])) == 1, b["mup"]["best_lr"]
    sp = b["sp"]["best_lr_grid_index"]
    assert abs(sp[-1] - sp[0]) >= 1, b["sp"]["best_lr"]
    assert all(result["assertions"].values()), result["assertions"]
