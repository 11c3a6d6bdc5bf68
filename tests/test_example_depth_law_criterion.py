"""The depth law by the papers' own criterion (examples/depth_law_criterion.py): the maximal-update
LR of ``cl.maximal_update_lr`` against effective depth, for a plain ReLU MLP and a ResNet under
the residual-aware He init. The full run (slow) asserts the exponent's interval excludes 0 and
holds the papers' -3/2, and that GD at the criterion's LR does not diverge; the quick run checks
the outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import depth_law_criterion as dlc

PER_MODEL = {"depths", "effective_depth", "eta_star_per_seed", "eta_star_seed_mean",
             "divergence_lr_seed0", "stable_at_eta_star_seed0", "eta_star_over_divergence_seed0",
             "exponent"}


def test_quick_run_writes_figure_and_json(tmp_path):
    result = dlc.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "depth_law_criterion.png").stat().st_size > 10_000
    stored = json.loads((tmp_path / "depth_law_criterion.json").read_text())
    assert stored["batches"].keys() == set(dlc.BATCHES)
    for models in stored["batches"].values():
        assert models.keys() == set(dlc.MODELS)
        for r in models.values():
            assert set(r) == PER_MODEL
            assert len(r["eta_star_per_seed"]) == 2  # seeds
            assert len(r["eta_star_per_seed"][0]) == len(r["depths"]) == 3
    # the ResNet's effective depth counts the stem, the blocks' additions and the head
    assert stored["batches"]["one example"]["resnet"]["effective_depth"] == [3, 4, 6]
    assert all(isinstance(v, bool) for v in result["assertions"].values())


def test_resnet_init_is_residual_aware_he_without_a_branch_multiplier():
    deep, shallow = dlc.build("resnet", 16, 0, 16, 4), dlc.build("resnet", 1, 0, 16, 4)
    for model, k in ((deep, 16), (shallow, 1)):
        w = model.blocks[0].linear.weight
        var = float(w.double().var()) * w.shape[1]  # fan_in * Var[W], He: 2, scaled by 1/K
        assert abs(var - 2 / k) < 0.15 * 2 / k, (k, var)
        assert float(model.blocks[0].scale) == 1.0


@pytest.mark.slow
def test_maximal_update_lr_follows_the_minus_three_halves_law_below_divergence(tmp_path):
    result = dlc.main(["--out", str(tmp_path)])
    for batch, models in result["batches"].items():
        for kind, r in models.items():
            e = r["exponent"]
            assert e["high"] < 0, (batch, kind, e)
            assert e["low"] <= dlc.PAPER <= e["high"], (batch, kind, e)
            assert all(r["stable_at_eta_star_seed0"]), (batch, kind, r)
            assert max(r["eta_star_over_divergence_seed0"]) < 1, (batch, kind, r)
    assert result["passed"], result["assertions"]
