"""The feature speed reproduction (examples/feature_speed.py; Chizat & Netrapalli,
arXiv:2311.18718): its full run asserts the claim's numbers, its quick run the outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import feature_speed

KEYS = {"name", "paper", "settings", "thresholds", "angles", "training",
        "formula_max_abs_dev_small_lr", "formula_max_abs_dev_large_lr", "checks", "passed",
        "torch_version", "curvlab_version", "wall_time_s"}


def test_quick_run_writes_figure_and_json(tmp_path):
    result = feature_speed.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "feature_speed.png").stat().st_size > 0
    stored = json.loads((tmp_path / "feature_speed.json").read_text())
    assert KEYS <= set(stored) and KEYS <= set(result)
    assert set(stored["angles"]) == {"mlp", "resnet_scaled", "resnet_unit"}
    assert set(stored["checks"]) == {"mlp_slope_in_range", "resnet_scaled_flat",
                                     "resnet_unit_falls", "formula_ratio_small_lr",
                                     "formula_error_grows_with_lr"}


@pytest.mark.slow
def test_full_run_reproduces_the_claims(tmp_path):
    r = feature_speed.main(["--out", str(tmp_path)])
    a = r["angles"]
    # ReLU MLP: cos theta_L ~ c / sqrt(L) (measured slope -0.41 over L = 2..128)
    assert -0.7 <= a["mlp"]["slope"] <= -0.3, a["mlp"]["slope"]
    # ResNet with 1/sqrt(L) branches: flat (measured -0.04)
    assert abs(a["resnet_scaled"]["slope"]) < 0.15, a["resnet_scaled"]["slope"]
    # ResNet with branch scale 1: falls (measured -0.31)
    assert a["resnet_unit"]["slope"] < -0.25, a["resnet_unit"]["slope"]
    # the formula against a real GD step: first-order agreement at a small LR, along training
    assert r["formula_max_abs_dev_small_lr"] < 0.05, r["formula_max_abs_dev_small_lr"]
    assert r["formula_max_abs_dev_large_lr"] > r["formula_max_abs_dev_small_lr"]
    assert r["passed"] and all(r["checks"].values())
    assert json.loads((tmp_path / "feature_speed.json").read_text())["checks"] == r["checks"]
