"""The error bounds behind the stopping rules of :func:`~curvlab.linalg.lanczos` and
:func:`~curvlab.linalg.subspace_eigs`, and the choice of the wanted Ritz values.

Pure functions of Ritz values ``theta (m,)`` and residual norms ``r (m,)`` (numpy, float64):
the single-pair bound ``min(r_i, r_i^2 / gap_i)`` (Kato-Temple), its block form for a cluster
at either end of the spectrum (Li & Li 2005), and the rounding level of a float32 product or
basis below which nothing is claimed. docs/math.md section 3 has the derivations.

Example:
    >>> import numpy as np
    >>> theta, r = np.array([10.0, 9.999, 5.0]), np.full(3, 1e-3)
    >>> [float(f"{b:.3g}") for b in error_bounds(theta, r, np.array([0]), "gap", "LA")]
    [4e-07]
"""

from __future__ import annotations

import numpy as np
import torch


def select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the ``k`` wanted Ritz values, in the order they are returned."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")[:k]
    if which == "SA":
        return np.argsort(theta, kind="stable")[:k]
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")[:k]
    order = np.argsort(-theta, kind="stable")  # "BE": ceil(k/2) from the top, the rest from below
    top, bottom = order[: (k + 1) // 2], order[::-1][: k // 2]
    return np.concatenate([top, bottom[::-1]])


def error_bounds(theta: np.ndarray, residuals: np.ndarray, wanted: np.ndarray,
                 bound: str = "gap", which: str | None = None) -> np.ndarray:
    """Per wanted Ritz value: ``min(r_i, r_i^2 / gap_i)`` (gap as in the module doc), tightened
    for ``which`` "LA" or "SA" by the cluster bound (:func:`cluster_bounds`); or ``r_i``."""
    if bound == "residual":
        return residuals[wanted]
    bounds = []
    for i in wanted:
        others = np.delete(np.arange(theta.size), i)
        gap = np.min(np.abs(theta[i] - theta[others]) - residuals[others]) if others.size else 0.0
        r = residuals[i]
        bounds.append(min(r, r * r / gap) if gap > r else r)
    if which in ("LA", "SA"):
        return np.minimum(np.asarray(bounds), cluster_bounds(theta, residuals, wanted, which))
    return np.asarray(bounds)


def cluster_bounds(theta: np.ndarray, residuals: np.ndarray, wanted: np.ndarray,
                   which: str) -> np.ndarray:
    """Quadratic residual bounds for the ends of the spectrum that hold inside a cluster.

    Order the Ritz values from the wanted end, ``theta_1 >= theta_2 >= ...`` ("LA"; mirrored
    for "SA"), and take the leading ``c`` Ritz pairs as one block. In the basis of their Ritz
    vectors and a complement, ``A = [[Theta_c, E^T], [E, A_2]]`` with ``||E|| = ||R_c||``, the
    block residual (Rayleigh-Ritz residuals are orthogonal to the whole subspace). If every
    eigenvalue of ``A_2`` is below ``theta_c`` by at least ``eta``, then for ``i <= c``
    ``|lambda_i - theta_i| <= ||E||^2 / eta`` (Li & Li 2005, "A note on eigenvalues of
    perturbed Hermitian matrices", Linear Algebra Appl. 395; the block form of Kato-Temple).
    ``||R_c||^2 <= sum_{j <= c} r_j^2`` and ``eta`` is estimated as for a single pair, from the
    Ritz values outside the block less their residuals: ``eta_c = min_{j > c} (theta_c -
    theta_j - r_j)``. A cluster ``lambda_1 ~ lambda_2`` thus costs only its distance to
    ``lambda_3``, where the single-pair bound ``r_1^2 / (theta_1 - theta_2)`` would need
    ``r_1`` below the square root of the cluster's width. Returns, per wanted value, the least
    bound over every block that contains it (``inf`` where none has ``eta_c > 0``).
    """
    sign = 1.0 if which == "LA" else -1.0
    order = np.argsort(-sign * theta, kind="stable")  # from the wanted end inward
    t, r = sign * theta[order], residuals[order]  # (m,) descending, their residuals
    m = t.size
    mass = np.cumsum(r**2)  # (m,) ||R_c||_F^2 for c = 1..m
    above = np.maximum.accumulate((t + r)[::-1])[::-1]  # (m,) max_{j >= c} (theta_j + r_j)
    per_block = np.full(m, np.inf)  # (m,) the bound of the block of the leading c + 1 pairs
    for c in range(m - 1):
        eta = t[c] - above[c + 1]
        if eta > 0:
            per_block[c] = mass[c] / eta
    best = np.minimum.accumulate(per_block[::-1])[::-1]  # (m,) least bound over blocks >= c
    rank = np.empty(m, dtype=int)
    rank[order] = np.arange(m)
    return best[rank[wanted]]


def noise_level(*dtypes: torch.dtype) -> float:
    """The relative rounding of a product or basis in these dtypes: 0 when all are float64
    (the tridiagonal residuals are truthful), else the largest ``eps`` below float64."""
    return max((torch.finfo(t).eps for t in dtypes if t != torch.float64), default=0.0)
