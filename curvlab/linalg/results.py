"""Result types of the spectral estimators: frozen dataclasses with a status and a message."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class ConvergenceError(RuntimeError):
    """Raised by an estimator called with ``throw=True`` that did not reach its tolerance."""


@dataclass(frozen=True)
class EigResult:
    """Eigenpairs from :func:`~curvlab.linalg.lanczos` or :func:`~curvlab.linalg.power_iteration`.

    Attributes:
        eigenvalues: ``(k,)`` float64, ordered by ``which`` (largest first for ``"LA"``, ``"LM"``
            and ``"BE"``, smallest first for ``"SA"``).
        eigenvectors: ``(P, k)`` in the operator's dtype and device, orthonormal columns.
        residuals: ``(k,)`` float64, ``||A x_i - theta_i x_i||``.
        error_bounds: ``(k,)`` float64, the bound on ``|theta_i - lambda_i|`` used to stop.
        num_matvecs: products with the operator, counted per vector.
        converged: whether every bound is within ``tol * |theta_i|``.
        message: what happened, and what to do when not converged.
        ritz_vectors: ``(P, keep)`` float64 (or the basis dtype) leading Ritz vectors, the next
            call's warm block, when asked for (``keep=`` of ``lanczos``; always from
            :func:`~curvlab.linalg.subspace_eigs`), else ``None``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    error_bounds: Tensor
    num_matvecs: int
    converged: bool
    message: str
    ritz_vectors: Tensor | None = None


@dataclass(frozen=True)
class TraceResult:
    """A stochastic trace estimate with its standard error and cost."""

    estimate: float
    stderr: float
    num_matvecs: int


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature: per probe, Ritz nodes and Gauss quadrature weights.

    Attributes:
        nodes: ``(num_probes, m)`` float64 Ritz values (padding, after an early breakdown, has
            weight 0).
        weights: ``(num_probes, m)`` float64, each row sums to 1.
        dim: ``P``, the operator's size.
        num_matvecs: products used in all.
    """

    nodes: Tensor
    weights: Tensor
    dim: int
    num_matvecs: int

    def moment(self, p: int) -> float:
        """``mean over probes of sum_j w_j theta_j^p``, an estimate of ``tr(A^p) / P``."""
        return float((self.weights * self.nodes.pow(p)).sum(1).mean())

    def trace(self) -> float:
        """``P * moment(1)``, an estimate of ``tr(A)``."""
        return self.dim * self.moment(1)

    def evaluate(self, grid: Tensor | np.ndarray, sigma: float) -> Tensor:
        """The density ``mean_probes sum_j w_j N(t; theta_j, sigma^2)`` at each point of ``grid``.

        Returns ``(len(grid),)`` float64; it integrates to 1 over the real line.
        """
        if not sigma > 0:
            raise ValueError(f"SpectralDensity.evaluate: sigma must be positive, got {sigma}")
        t = torch.as_tensor(np.asarray(grid), dtype=torch.float64).reshape(-1, 1, 1)  # (G, 1, 1)
        z = (t - self.nodes) / sigma  # (G, probes, m)
        gauss = torch.exp(-0.5 * z**2) / (sigma * (2 * torch.pi) ** 0.5)  # (G, probes, m)
        return (gauss * self.weights).sum(-1).mean(-1)  # (G,)
