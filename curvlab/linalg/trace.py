"""Stochastic trace estimators: Hutchinson and Hutch++.

Hutchinson (1989): ``tr(A) ~ (1/m) sum_i z_i^T A z_i`` with Rademacher ``z_i``; the error falls as
``1 / sqrt(m)``. Hutch++ (Meyer, Musco, Musco & Woodruff 2021, arXiv:2010.09649): a third of the
budget sketches the top range, ``Q = orth(A S)``, whose part of the trace, ``tr(Q^T A Q)``, is
exact; Hutchinson on ``(I - Q Q^T) A (I - Q Q^T)`` handles the rest, so the error falls as ``1 / m``
when the spectrum decays. docs/math.md section 3.

Example:
    >>> import torch
    >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    >>> hutchinson_trace(A, 10_000, generator=torch.Generator().manual_seed(0)).estimate
    55.0
"""

from __future__ import annotations

import math
from typing import Any

import torch

from curvlab.linalg._checks import Matvec, check_operator, random_vectors
from curvlab.linalg.results import TraceResult


def _quadratic_forms(Z: torch.Tensor, AZ: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of ``z_i^T A z_i`` over the columns."""
    values = (Z * AZ).sum(0)  # (m,)
    m = values.numel()
    stderr = float(values.std() / math.sqrt(m)) if m > 1 else float("inf")
    return float(values.mean()), stderr


def hutchinson_trace(A: Any, num_matvecs: int, *, generator: torch.Generator | None = None
                     ) -> TraceResult:
    """Hutchinson's estimate of ``tr(A)`` from ``num_matvecs`` Rademacher probes (one block)."""
    call = "hutchinson_trace"
    P = check_operator(A, call)
    if num_matvecs < 1:
        raise ValueError(f"{call}: num_matvecs must be >= 1, got {num_matvecs}")
    matvec = Matvec(A, call)
    Z = random_vectors(P, num_matvecs, A, generator, kind="rademacher")  # (P, m)
    estimate, stderr = _quadratic_forms(Z, matvec(Z, 0))
    return TraceResult(estimate, stderr, matvec.count)


def hutchpp_trace(A: Any, num_matvecs: int, *, generator: torch.Generator | None = None
                  ) -> TraceResult:
    """Hutch++ estimate of ``tr(A)`` with ``num_matvecs`` products (at least 3).

    ``s = num_matvecs // 3`` products sketch ``Q = orth(A S) (P, s)``, ``s`` more give
    ``tr(Q^T A Q)`` exactly, and the remaining ``num_matvecs - 2 s`` feed Hutchinson on the
    deflated operator. ``stderr`` is that of the Hutchinson part.
    """
    call = "hutchpp_trace"
    P = check_operator(A, call)
    if num_matvecs < 3:
        raise ValueError(f"{call}: num_matvecs must be >= 3 (sketch, exact part, residual), got "
                         f"{num_matvecs}; use hutchinson_trace for smaller budgets")
    matvec = Matvec(A, call)
    s = num_matvecs // 3
    S = random_vectors(P, s, A, generator, kind="rademacher")  # (P, s)
    Q = torch.linalg.qr(matvec(S, 0)).Q  # (P, s)
    exact = float(torch.trace(Q.T @ matvec(Q, 1)))
    G = random_vectors(P, num_matvecs - 2 * s, A, generator, kind="rademacher")  # (P, m - 2 s)
    G = G - Q @ (Q.T @ G)  # (P, m - 2 s)
    rest, stderr = _quadratic_forms(G, matvec(G, 2))
    return TraceResult(exact + rest, stderr, matvec.count)
