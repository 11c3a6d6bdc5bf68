"""cl.fit_exponent: the fitted power and its bootstrap interval over seeds."""

import numpy as np
import pytest

import curvlab as cl


def test_recovers_a_known_exponent_and_covers_it():
    x = np.array([64, 128, 256, 512, 1024])
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(40):  # seeds as lognormal noise around x^-0.25
        y = x ** -0.25 * np.exp(0.1 * rng.normal(size=(8, len(x))))
        fit = cl.fit_exponent(x, y, n_resamples=400, seed=trial)
        assert fit.low <= fit.slope <= fit.high
        covered += not fit.excludes(-0.25)
    assert 30 <= covered <= 40  # a 95% interval; percentile intervals under-cover a little
    exact = cl.fit_exponent(x, np.tile(3 * x ** 1.5, (3, 1)))
    assert exact.slope == pytest.approx(1.5, abs=1e-12)
    assert exact.high - exact.low == pytest.approx(0.0, abs=1e-9)


def test_one_seed_has_a_point_interval():
    fit = cl.fit_exponent([1, 2, 4], [1.0, 0.5, 0.25])
    assert (fit.slope, fit.low, fit.high) == pytest.approx((-1.0, -1.0, -1.0))
    assert fit.as_dict()["confidence"] == 0.95


def test_errors():
    with pytest.raises(ValueError, match=r"fit_exponent: x must be one-dimensional with at least "
                                         r"two distinct positive points, got \[2\.0, 2\.0\]"):
        cl.fit_exponent([2, 2], [[1.0, 1.0]])
    with pytest.raises(ValueError, match=r"fit_exponent: y must have shape \(seeds, 3\)"):
        cl.fit_exponent([1, 2, 4], np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"y must be finite and positive.*drop diverged runs"):
        cl.fit_exponent([1, 2], [[1.0, np.inf]])
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 1\.5"):
        cl.fit_exponent([1, 2], [[1.0, 2.0]], confidence=1.5)
