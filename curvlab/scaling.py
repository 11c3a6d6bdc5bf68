"""Power laws across widths or depths: a fitted exponent with a bootstrap interval over seeds.

A scaling claim ("the feature change is flat in width under muP and falls like ``n^(-1/2)``
under NTP") is a statement about the exponent ``b`` of ``y(x) ~ c x^b``. :func:`fit_exponent`
fits ``log mean_seeds y = a + b log x`` by least squares, and gives the percentile interval of
``b`` when the seeds are resampled with replacement (``scipy.stats.bootstrap``; the seeds are the
independent draws, the points ``x`` are fixed design).

Example:
    >>> import numpy as np, curvlab as cl
    >>> x = np.array([64, 128, 256, 512])
    >>> y = np.array([x ** -0.5 * (1 + 0.01 * s) for s in range(4)])  # (seeds, points)
    >>> fit = cl.fit_exponent(x, y)
    >>> round(fit.slope, 3), fit.low < -0.5 < fit.high or fit.low == fit.high
    (-0.5, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Exponent:
    """``slope`` (the fitted exponent), its ``confidence`` interval ``[low, high]``."""

    slope: float
    low: float
    high: float
    confidence: float

    def excludes(self, value: float) -> bool:
        return not self.low <= value <= self.high

    def as_dict(self) -> dict[str, float]:
        return {"slope": self.slope, "low": self.low, "high": self.high,
                "confidence": self.confidence}


def _slope(log_x: np.ndarray, y: np.ndarray) -> float:
    return float(np.polyfit(log_x, np.log(np.mean(y, axis=0)), 1)[0])


def fit_exponent(x: np.ndarray, y: np.ndarray, *, confidence: float = 0.95,
                 n_resamples: int = 2000, seed: int = 0) -> Exponent:
    """Exponent ``b`` of ``y ~ c x^b`` with a bootstrap interval over seeds.

    Args:
        x: the points ``(p,)`` (widths or depths), positive, at least two distinct.
        y: positive values ``(seeds, p)``; one row per seed. With one seed the interval is the
            point itself (nothing to resample).
        confidence: of the percentile interval.
        n_resamples, seed: of ``scipy.stats.bootstrap``.
    """
    call = "fit_exponent"
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 1 or len(np.unique(x)) < 2 or not (x > 0).all():
        raise ValueError(f"{call}: x must be one-dimensional with at least two distinct positive "
                         f"points, got {x.tolist()}")
    if y.ndim == 1:
        y = y[None]
    if y.shape[1:] != x.shape:
        raise ValueError(f"{call}: y must have shape (seeds, {len(x)}) to match x, got "
                         f"{tuple(y.shape)}")
    if not np.isfinite(y).all() or not (y > 0).all():
        raise ValueError(f"{call}: y must be finite and positive (a power law in log space), "
                         f"got min {np.min(y):.3g}; drop diverged runs first")
    if not 0 < confidence < 1:
        raise ValueError(f"{call}: confidence must be in (0, 1), got {confidence}")
    log_x = np.log(x)
    slope = _slope(log_x, y)
    if len(y) == 1:
        return Exponent(slope, slope, slope, confidence)
    res = stats.bootstrap((np.arange(len(y)),), lambda rows: _slope(log_x, y[rows]),
                          vectorized=False, n_resamples=n_resamples, confidence_level=confidence,
                          method="percentile", rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return Exponent(slope, float(low), float(high), confidence)
