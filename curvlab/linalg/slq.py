"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a probe ``v`` with ``||v|| = 1``, ``m`` Lanczos steps give Ritz values ``theta_j`` and Gauss
quadrature weights ``w_j = s_j[0]^2`` with ``v^T g(A) v ~ sum_j w_j g(theta_j)``; averaging over
Rademacher probes scaled to unit norm estimates ``tr(g(A)) / P`` (Ubaru, Chen & Saad 2017,
doi:10.1137/16M1104974; Ghorbani, Krishnan & Xiao 2019, arXiv:1901.10159). The density is
``mean_probes sum_j w_j N(t; theta_j, sigma^2)``. docs/math.md section 3.

Example:
    >>> import torch
    >>> A = torch.diag(torch.linspace(0, 1, 50, dtype=torch.float64))
    >>> g = torch.Generator().manual_seed(0)
    >>> d = spectral_density(A, num_probes=4, num_iters=50, generator=g)
    >>> round(d.trace(), 6)   # exact once the Krylov space is the whole space: tr(A) = 25
    25.0
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from curvlab.linalg._checks import Matvec, check_operator, random_vectors
from curvlab.linalg.lanczos import KrylovBasis
from curvlab.linalg.results import SpectralDensity


def spectral_density(
    A: Any,
    *,
    num_probes: int = 8,
    num_iters: int = 64,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    """SLQ nodes and weights of a symmetric ``A (P, P)`` from ``num_probes`` Rademacher probes.

    Each probe costs ``num_iters`` products (fewer if its Krylov space becomes invariant: the
    quadrature is then exact, and the unused slots get weight 0).
    """
    call = "spectral_density"
    P = check_operator(A, call)
    if num_probes < 1 or num_iters < 1:
        raise ValueError(f"{call}: num_probes and num_iters must be >= 1, got {num_probes} and "
                         f"{num_iters}")
    num_iters = min(num_iters, P)
    matvec = Matvec(A, call)
    probes = random_vectors(P, num_probes, A, generator, kind="rademacher")  # (P, probes)
    nodes = np.zeros((num_probes, num_iters))
    weights = np.zeros((num_probes, num_iters))
    for p in range(num_probes):
        basis = KrylovBasis(matvec, probes[:, p], check_symmetry=p == 0)
        while basis.m < num_iters and basis.step():
            pass
        theta, S, _ = basis.ritz()
        nodes[p, : theta.size] = theta
        weights[p, : theta.size] = S[0, :] ** 2
    return SpectralDensity(torch.as_tensor(nodes), torch.as_tensor(weights), P, matvec.count)
