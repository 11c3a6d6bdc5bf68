"""The edge-of-stability reproduction (examples/edge_of_stability.py; Cohen et al. 2021,
arXiv:2103.00065, and 2022, arXiv:2207.14484): the claim's numbers (slow), and a smoke run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import edge_of_stability

KEYS = {"name", "claim", "paper", "settings", "seeds", "torch_version", "results",
        "assertions", "passed", "wall_time_s"}
PER_RUN = {"lr", "threshold", "steps", "sharpness", "ratio", "loss", "first_step_reached",
           "min_ratio_after", "max_ratio_after", "reached", "stays_in_band", "level"}
KINDS = {"gd", "momentum", "adam", "mup_adam"}


@pytest.mark.slow
def test_edge_of_stability_claim(tmp_path: Path) -> None:
    result = edge_of_stability.main(["--out", str(tmp_path)])
    runs = result["results"]
    gd, adam = runs["gd"], runs["adam"]
    assert gd["threshold"] == pytest.approx(2 / gd["lr"])
    assert adam["threshold"] == pytest.approx(38 / adam["lr"])
    assert runs["momentum"]["threshold"] == pytest.approx(3.8 / runs["momentum"]["lr"])
    assert runs["mup_adam"]["threshold"] == pytest.approx(38 / runs["mup_adam"]["lr"])
    for run in runs.values():  # each run's sharpness settles at its own threshold
        ratio = np.asarray(run["ratio"])
        assert 0.85 <= np.median(ratio[2 * len(ratio) // 3:]) <= 1.1, run["optimizer"]
        assert (ratio >= 0.9).any()
    for run in (gd, adam, runs["mup_adam"]):
        ratio = np.asarray(run["ratio"])
        assert ratio[0] < 0.9  # it starts below the edge and rises to it
        reached = np.flatnonzero(ratio >= 0.9)
        assert reached.size
        after = ratio[reached[0]:]
        assert after.min() >= 0.75 and after.max() <= 1.15, (after.min(), after.max())
        assert len(after) >= 100  # hovering is observed over many measurements
    assert result["passed"] and all(result["assertions"].values())


def test_edge_of_stability_quick(tmp_path: Path) -> None:
    result = edge_of_stability.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "edge_of_stability.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "edge_of_stability.json").read_text())
    assert KEYS <= set(saved) and KEYS <= set(result)
    assert set(saved["results"]) == KINDS
    for run in saved["results"].values():
        assert PER_RUN <= set(run)
        assert len(run["steps"]) == len(run["ratio"]) == len(run["sharpness"])
    assert set(saved["assertions"]) == {
        *(f"{k}_reaches_0.9_threshold" for k in KINDS),
        *(f"{k}_level_within_0.85_1.1" for k in KINDS),
        *(f"{k}_stays_within_0.75_1.15_after_reaching" for k in KINDS - {"momentum"})}
    assert saved["quick"] is True
