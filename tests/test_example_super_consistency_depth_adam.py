"""Super consistency across depth (Depth-muP against muP) and under Adam (muP against SP):
examples/super_consistency_depth_adam.py (Noci et al. 2024, arXiv:2402.17457)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import super_consistency_depth_adam as sda


def test_quick_writes_figures_and_json(tmp_path):
    result = sda.main(["--quick", "--out", str(tmp_path)])
    for name in ("depth", "adam"):
        assert (tmp_path / f"super_consistency_{name}.png").stat().st_size > 10_000
        stored = json.loads((tmp_path / f"super_consistency_{name}.json").read_text())
        s = sda.SETTINGS[name]
        assert stored["tasks"].keys() == sda.TASKS[name].keys()
        for res in stored["tasks"].values():
            assert set(res["gaps"]["sharpness"]) >= {s["test"], s["control"]}
            assert set(res["rise_in_window"]) == {"early", "late"}
        assert all(isinstance(v, bool) for v in result[name]["assertions"].values())
    depth = json.loads((tmp_path / "super_consistency_depth.json").read_text())
    # depth transfer: Depth-muP's LR comes from the base depth, the control's from the deepest
    for task in sda.TASKS["depth"]:
        lr = depth["settings"]["tasks"][task]["lr"]
        assert lr["depth-mup"] > lr["mup"], (task, lr)


@pytest.mark.slow
def test_depth_mup_and_adam_mup_are_super_consistent_their_controls_are_not(tmp_path):
    """Before the EoS, the control's late sharpness gap is >= 3x the test's (MSE under both,
    cross-entropy across depth); on the digits across depth and on MSE under Adam that window
    is one of progressive sharpening under the test parametrization."""
    result = sda.main(["--out", str(tmp_path)])
    for name, summary in result.items():
        s = sda.SETTINGS[name]
        for task, res in summary["tasks"].items():
            assert res["eos_step"] is None, (name, task, res["eos_step"])
            if (name, task) in sda.ASSERTED:
                ratio = res["gaps"]["sharpness"][f"ratio_{s['control']}_over_{s['test']}_late"]
                assert ratio >= sda.MIN_RATIO, (name, task, res["gaps"]["sharpness"])
    for name, task in sda.SHARPENING:
        rise = result[name]["tasks"][task]["rise_in_window"]["late"]
        assert rise["progressive"], (name, task, rise)
    assert all(v for s in result.values() for v in s["assertions"].values()), \
        {n: s["assertions"] for n, s in result.items()}
