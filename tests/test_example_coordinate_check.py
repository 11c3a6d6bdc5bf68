"""The coordinate_check example (Yang & Hu 2021, arXiv:2011.14522; Yang et al. 2022,
arXiv:2203.03466): one-step feature change flat in width under muP, shrinking in the hidden layers
under NTP, growing at the output under SP, at one base learning rate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import coordinate_check


def test_quick_writes_figure_and_json(tmp_path):
    result = coordinate_check.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "coordinate_check.png").stat().st_size > 10_000
    stored = json.loads((tmp_path / "coordinate_check.json").read_text())
    for key in ("settings", "seeds", "torch_version", "results", "one_step_change_slopes",
                "assertions", "wall_time_s"):
        assert key in stored and key in result
    for par in ("mup", "ntp", "sp"):
        assert set(stored["one_step_change_slopes"][par]) == {
            "layers.0", "layers.1", "layers.2", "layers.3"}
    assert all(isinstance(v, bool) for v in stored["assertions"].values())


@pytest.mark.slow
def test_coordinate_check_claims(tmp_path):
    result = coordinate_check.main(["--out", str(tmp_path)])
    one = result["one_step_change_slopes"]
    layers = ["layers.0", "layers.1", "layers.2", "layers.3"]
    for name in layers:  # muP: every layer's one-step change is flat in width
        assert abs(one["mup"][name]) <= 0.15, one["mup"]
    for name in layers[:-1]:  # NTP: input and hidden features move like n^(-1/2)
        assert one["ntp"][name] < -0.3, one["ntp"]
    assert abs(one["ntp"]["layers.3"]) <= 0.15, one["ntp"]  # NTP output: Theta(1) (NTK regime)
    assert one["sp"]["layers.3"] > 0.3, one["sp"]  # SP output grows (theory: like n)
    five = result["results"]["mup"]["slopes"]["own_change_rms_5"]
    for name in layers:  # muP: still flat after five steps
        assert abs(five[name]) <= 0.15, five
    assert all(result["assertions"].values()), result["assertions"]
