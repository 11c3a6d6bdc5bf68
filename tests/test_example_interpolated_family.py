"""Yaida's interpolating family (examples/interpolated_family.py, arXiv:2210.04909): the hidden
features' one-step change scales as n^(-(1-s)/2) between NTP and muP (slow), and a smoke run."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import interpolated_family


def test_quick_writes_figure_and_json(tmp_path):
    result = interpolated_family.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "interpolated_family.png").stat().st_size > 10_000
    stored = json.loads((tmp_path / "interpolated_family.json").read_text())
    assert stored["parametrizations"].keys() == set(interpolated_family.FAMILY)
    for r in stored["parametrizations"].values():
        assert r["exponents"].keys() == {"hidden_change", "output_change", "hidden_rms",
                                         "ntk_plain", "ntk_lr"}
        assert len(r["values_per_seed"]["hidden_change"]) == len(stored["seeds"]) == 2
    # the members share the function at init and the LR-weighted kernel (derived: the s
    # dependence of the readout's init and of the LRs cancels in J D J^T)
    ntk = [torch.tensor(stored["parametrizations"][p]["values_per_seed"]["ntk_lr"])
           for p in ("interp:0", "interp:0.5", "interp:1", "mup")]
    for k in ntk[1:]:
        torch.testing.assert_close(k, ntk[0], rtol=1e-4, atol=0)
    assert all(isinstance(v, bool) for v in result["assertions"].values())


@pytest.mark.slow
def test_feature_change_exponent_interpolates_between_ntp_and_mup(tmp_path):
    result = interpolated_family.main(["--out", str(tmp_path)])
    ex = {p: r["exponents"]["hidden_change"] for p, r in result["parametrizations"].items()}
    assert ex["ntp"]["high"] < ex["interp:0.5"]["low"], ex  # intervals do not overlap
    assert ex["interp:0.5"]["high"] < ex["mup"]["low"], ex
    for par, want in interpolated_family.PREDICTED.items():
        assert abs(ex[par]["slope"] - want) <= 0.1, (par, ex[par])
    for par, r in result["parametrizations"].items():  # every member trains at a fixed LR
        assert abs(r["exponents"]["ntk_lr"]["slope"]) <= 0.1, (par, r["exponents"]["ntk_lr"])
    assert result["passed"], result["assertions"]
