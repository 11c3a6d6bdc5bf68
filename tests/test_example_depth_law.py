"""The depth-law reproduction (examples/depth_law.py; Wu et al., arXiv:2602.07494): the full run
checks only what is robust (a negative exponent with its bootstrap interval), the quick run the
outputs. No threshold on the exponent's value: see docs/reproductions.md#depth_law."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import depth_law

KEYS = {"name", "paper", "claim", "settings", "paper_exponent", "inits", "sweep_check", "checks",
        "passed", "torch_version", "curvlab_version", "wall_time_s"}
INIT_KEYS = {"effective_depths", "best_lr", "best_lr_geomean", "final_loss", "exponent",
             "intercept", "exponent_ci95", "best_next_to_divergence_fraction",
             "best_at_grid_end"}


def test_quick_run_writes_figure_and_json(tmp_path):
    result = depth_law.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "depth_law.png").stat().st_size > 0
    stored = json.loads((tmp_path / "depth_law.json").read_text())
    assert KEYS <= set(stored) and KEYS <= set(result)
    assert set(stored["inits"]) == {"stabilizing", "depth_mup"}
    assert INIT_KEYS <= set(stored["inits"]["stabilizing"])
    assert {"effective_depths", "best_lr", "exponent"} <= set(stored["sweep_check"])


@pytest.mark.slow
def test_full_run_reports_a_negative_exponent_with_its_interval(tmp_path):
    r = depth_law.main(["--out", str(tmp_path)])
    stab = r["inits"]["stabilizing"]
    assert stab["effective_depths"] == [4.0, 6.0, 10.0, 18.0, 34.0]  # K + 2 (stem and head)
    assert stab["exponent"] < 0
    lo, hi = stab["exponent_ci95"]
    assert math.isfinite(lo) and math.isfinite(hi) and lo <= stab["exponent"] <= hi
    assert len(stab["best_lr"]) == len(r["settings"]["seeds"]) == 3
    assert r["passed"]
    stored = json.loads((tmp_path / "depth_law.json").read_text())
    assert stored["inits"]["stabilizing"]["exponent"] == stab["exponent"]
