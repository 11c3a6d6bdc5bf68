"""super_consistency on synthetic runs with known gaps."""

from __future__ import annotations

import numpy as np
import pytest

import curvlab as cl
from curvlab.runs import Metric, Run


def _run(width, par, values, steps=None, seed=0, name="sharpness_lr"):
    values = np.asarray(values, dtype=float)
    steps = np.arange(len(values)) * 10 if steps is None else np.asarray(steps)
    metric = Metric(name, steps, values)
    return Run(None, {"width": width, "parametrization": par, "seed": seed}, {name: metric},
               {}, {})


def test_gaps_exponent_and_seed_average():
    t = np.arange(1, 21, dtype=float)
    ref = 10 + t  # the widest run
    runs = [_run(1024, "mup", ref)]
    for w in (64, 128, 256, 512):
        runs.append(_run(w, "mup", ref * (1 + 0.4 * (w / 64) ** -0.5)))
    runs += [_run(64, "ntp", ref * 0.5, seed=0), _run(64, "ntp", ref * 0.7, seed=1),
             _run(1024, "ntp", ref)]
    sc = cl.super_consistency(runs, window=1)
    mup = sc.groups["mup"]
    np.testing.assert_array_equal(mup.widths, [64, 128, 256, 512, 1024])
    np.testing.assert_allclose(mup.mean_gap, [0.4, 0.4 / 2**0.5, 0.2, 0.4 / 8**0.5, 0.0])
    assert mup.beta == pytest.approx(0.5) and np.allclose(mup.beta_t, 0.5)
    np.testing.assert_allclose(sc.groups["ntp"].mean_gap, [0.4, 0.0])  # seeds averaged: 0.6
    assert sc.mean_gap("ntp", smoothed=False) == pytest.approx(0.4)
    assert np.isnan(sc.groups["ntp"].beta)  # one narrower width: no exponent
    table = sc.table()
    assert "| mup | 64 | 0.400 | 0.400 |" in table and "fit exponent beta | 0.50" in table


def test_smoothed_gap_reads_through_edge_of_stability_oscillations():
    t = np.arange(40)
    edge = 20.0
    a = edge + np.where(t % 2 == 0, 3.0, -3.0)  # period-2 oscillation around 2 / eta
    b = edge + np.where(t % 2 == 0, -3.0, 3.0)  # the same, out of phase
    sc = cl.super_consistency([_run(64, "mup", a), _run(512, "mup", b)], window=2)
    g = sc.groups["mup"]
    assert g.mean_gap[0] > 0.25  # pointwise: the oscillations look like a large gap
    assert g.mean_smoothed_gap[0] < 0.01  # running means agree: the trajectories coincide


def test_shared_steps_only():
    runs = [_run(64, "mup", [1.0, 2.0, 4.0], steps=[0, 10, 20]),
            _run(128, "mup", [1.0, 4.0], steps=[0, 20])]
    g = cl.super_consistency(runs, window=1).groups["mup"]
    np.testing.assert_array_equal(g.steps, [0, 20])
    np.testing.assert_allclose(g.gaps[0], [0.0, 0.0])


def test_errors():
    with pytest.raises(ValueError, match="super_consistency: no runs given"):
        cl.super_consistency([])
    runs = [_run(64, "mup", [1.0, 2.0])]
    with pytest.raises(ValueError, match="has no metric 'loss'"):
        cl.super_consistency(runs, metric="loss")
    with pytest.raises(ValueError, match="has no config key 'depth'"):
        cl.super_consistency(runs, by="depth")
    with pytest.raises(ValueError, match="window must be a positive int"):
        cl.super_consistency(runs, window=0)
    vec = Run(None, {"width": 64, "parametrization": "mup"},
              {"top": Metric("top", np.arange(2), np.ones((2, 3)))}, {}, {})
    with pytest.raises(ValueError, match="metric 'top' is not a scalar per step"):
        cl.super_consistency([vec], metric="top")
