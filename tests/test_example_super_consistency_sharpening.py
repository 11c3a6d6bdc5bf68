"""Super consistency before the edge of stability (examples/super_consistency_sharpening.py;
Noci et al. 2024, arXiv:2402.17457): the early gaps with the NTP control (slow), and a smoke
run."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import super_consistency_sharpening as scs


def test_quick_writes_figure_and_json(tmp_path):
    result = scs.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / f"{scs.NAME}.png").stat().st_size > 10_000
    stored = json.loads((tmp_path / f"{scs.NAME}.json").read_text())
    assert stored["tasks"].keys() == scs.TASKS.keys()
    for res in stored["tasks"].values():
        assert res["gaps"].keys() == set(scs.QUANTITIES)
        for q in scs.QUANTITIES:
            assert res["gaps"][q]["mup"]["early"] >= 0
    assert all(isinstance(v, bool) for v in result["assertions"].values())


@pytest.mark.slow
def test_sharpening_is_width_consistent_under_mup_not_ntp(tmp_path):
    result = scs.main(["--out", str(tmp_path)])
    for task, res in result["tasks"].items():
        assert res["eos_step"] is None, (task, res["mup_widest_max_over_threshold"])
        sharp, ntk = res["gaps"]["sharpness"], res["gaps"]["ntk_top"]
        # the control: NTP's gap >= 3x muP's while muP sharpens, before the EoS (steps 50-100)
        assert sharp["ratio_ntp_over_mup_late"] >= scs.MIN_RATIO, (task, sharp)
        # the Hessian is consistent under muP, its NTK less so
        assert ntk["mup"]["late"] > sharp["mup"]["late"], (task, ntk, sharp)
        rise = res["sharpening_exponent"]
        assert abs(rise["mup"]["slope"]) <= 0.15, (task, rise["mup"])  # muP: flat in width
        assert rise["ntp"]["rise_seed_mean"][-1] < 0.25 * rise["mup"]["rise_seed_mean"][-1]
    assert result["passed"], result["assertions"]
