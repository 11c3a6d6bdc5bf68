"""Opt-in rigorous intervals for timing ratios (``--stats bootstrap``).

The default intervals of ``harness.pooled_ratio`` come from order statistics and treat every round
as independent. Here the 95% interval of the median per-round ratio comes from a bootstrap:

- one run (process): ``scipy.stats.bootstrap`` of the median over rounds (percentile method);
- several runs: a two-level bootstrap, processes drawn with replacement and then rounds within
  each, so that the interval also holds the variation between processes (a process's memory
  layout, its place in the machine's drift). ``benchmarks/hvp.py`` times its targets in
  ``--processes`` fresh processes for this.

Resampling is seeded (``SEED``), so a result file reproduces from its rounds.
"""

from __future__ import annotations

import numpy as np

SEED, RESAMPLES = 0, 2000


def bootstrap_interval(ratios: list[np.ndarray], level: float = 0.95) -> tuple[float, float]:
    """``(low, high)`` of the median of the per-round ``ratios`` (one array per process)."""
    tail = 100 * (1 - level) / 2
    if len(ratios) == 1:
        x = np.asarray(ratios[0], dtype=float)
        if x.size < 2 or np.ptp(x) == 0:  # nothing to resample
            return float(x.min()), float(x.max())
        from scipy.stats import bootstrap

        res = bootstrap((x,), np.median, confidence_level=level, n_resamples=RESAMPLES,
                        method="percentile", rng=np.random.default_rng(SEED))
        return float(res.confidence_interval.low), float(res.confidence_interval.high)
    rng = np.random.default_rng(SEED)
    boot = np.empty(RESAMPLES)
    for b in range(boot.size):
        picked = rng.integers(len(ratios), size=len(ratios))
        boot[b] = np.median(np.concatenate([rng.choice(ratios[i], ratios[i].size)
                                            for i in picked]))
    low, high = np.percentile(boot, [tail, 100 - tail])
    return float(low), float(high)
