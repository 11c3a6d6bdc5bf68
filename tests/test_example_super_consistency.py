"""The super-consistency reproduction (examples/super_consistency.py; Noci et al. 2024,
arXiv:2402.17457): the claim's numbers at the default settings (slow), and a smoke run."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import super_consistency

KEYS = {"name", "claim", "paper", "settings", "seeds", "torch_version", "learning_rates",
        "assertions", "passed", "wall_time_s"}
PER_LR = {"lr_fraction", "lr", "threshold", "mean_gap", "mean_smoothed_gap", "gap_ratio",
          "smoothed_gap_ratio", "per_width", "beta", "curves"}


@pytest.mark.slow
def test_super_consistency_claim(tmp_path: Path) -> None:
    result = super_consistency.main(["--out", str(tmp_path)])
    first, second = result["learning_rates"]
    assert (first["lr_fraction"], second["lr_fraction"]) == (0.5, 0.75)
    for res in (first, second):
        # muP's smoothed gap to the widest run is at least 3x smaller than NTP's
        assert res["mean_smoothed_gap"]["ntp"] >= 3 * res["mean_smoothed_gap"]["mup"]
        # muP's final LR-preconditioned sharpness is within 10% of 2 / eta at every width
        finals = [v["final_over_threshold"] for v in res["per_width"]["mup"].values()]
        assert len(finals) == 4
        assert all(abs(f - 1) <= 0.10 for f in finals), finals
    # at the main job's learning rate, the pointwise (unsmoothed) gap too
    assert first["mean_gap"]["ntp"] >= 3 * first["mean_gap"]["mup"]
    assert result["passed"] and all(result["assertions"].values())


def test_super_consistency_quick(tmp_path: Path) -> None:
    result = super_consistency.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "super_consistency.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "super_consistency.json").read_text())
    assert KEYS <= set(saved) and KEYS <= set(result)
    assert len(saved["learning_rates"]) == 2
    for res in saved["learning_rates"]:
        assert PER_LR <= set(res)
        assert set(res["mean_gap"]) == {"mup", "ntp"}
    assert set(saved["assertions"]) == set(result["assertions"])
    assert saved["quick"] is True
