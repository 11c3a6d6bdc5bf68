"""Power iteration with deflation, stopped on a guaranteed eigenvalue error bound.

For a unit vector ``v`` with Rayleigh quotient ``theta = v^T A v`` and residual
``r = ||A v - theta v||``, a symmetric ``A`` has an eigenvalue within ``r`` of ``theta``
(Parlett, *The Symmetric Eigenvalue Problem*, theorem 4.5.1). Power iteration has no other Ritz
values to estimate a gap from, so it stops on this bound alone: ``r <= tol * |theta|``, the same
meaning of ``tol`` as in :func:`~curvlab.linalg.lanczos`, reached with more products. It converges
to the eigenvalue of largest magnitude at the rate ``|lambda_2 / lambda_1|`` per product; pairs
after the first are found on the deflated operator ``(I - X X^T) A (I - X X^T)``, whose residual
is the stopping bound (``error_bounds``); ``residuals`` are those of ``A`` itself, which also carry
the small error of the earlier pairs.

Example:
    >>> import torch
    >>> A = torch.diag(torch.tensor([5.0, 1.0, -2.0], dtype=torch.float64))
    >>> res = power_iteration(A, tol=1e-8, generator=torch.Generator().manual_seed(0))
    >>> round(res.eigenvalues.item(), 6), res.converged
    (5.0, True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.linalg._checks import Matvec, check_operator
from curvlab.linalg.lanczos import check_arguments, start_vector
from curvlab.linalg.results import ConvergenceError, EigResult


def power_iteration(
    A: Any,
    k: int = 1,
    *,
    tol: float = 1e-4,
    max_iters: int = 200,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    throw: bool = False,
) -> EigResult:
    """The ``k`` eigenpairs of largest magnitude of a symmetric ``A (P, P)``, one at a time.

    Args:
        A: a dense tensor or an operator with ``shape``, ``dtype``, ``device`` and ``A @ v``.
        k: how many eigenpairs (deflation after each).
        tol: relative accuracy of each eigenvalue, by the bound ``|theta - lambda| <= r``.
        max_iters: most products per eigenpair.
        v0: start vector ``(P,)``, or a block ``(P, j)`` whose column ``i`` starts pair ``i``.
        generator: randomness for start vectors that ``v0`` does not supply.
        throw: raise :class:`ConvergenceError` instead of returning ``converged=False``.
    """
    call = "power_iteration"
    P = check_operator(A, call)
    check_arguments(P, k, tol, call)
    matvec = Matvec(A, call)
    X = torch.zeros(P, k, dtype=torch.float64, device=A.device)  # (P, k)
    thetas, residuals, bounds, converged = [], [], [], True
    for i in range(k):
        start = v0[:, i] if isinstance(v0, Tensor) and v0.ndim == 2 and i < v0.shape[1] else (
            v0 if i == 0 else None)
        v = start_vector(start, P, A, generator, call)  # (P,)
        theta, r, x, Ax = 0.0, float("inf"), v, v
        for it in range(max_iters):
            x = v - X[:, :i] @ (X[:, :i].T @ v)  # deflate, (P,)
            x = x / x.norm()
            Ax = matvec(x, it)  # (P,)
            v = Ax - X[:, :i] @ (X[:, :i].T @ Ax)  # the deflated operator's product, (P,)
            theta = float(x @ Ax)
            r = float((v - theta * x).norm())  # residual of the deflated operator: the bound
            if r <= tol * abs(theta):
                break
        else:
            converged = False
        X[:, i] = x
        thetas.append(theta)
        bounds.append(r)
        residuals.append(float((Ax - theta * x).norm()))  # the residual of A itself
    rel = max(b / max(abs(t), 1e-300) for b, t in zip(bounds, thetas, strict=True))
    message = (f"converged: relative error bound {rel:.1e} <= tol {tol:g} in {matvec.count} "
               "products" if converged else
               f"not converged: relative error bound {rel:.1e} > tol {tol:g} after "
               f"{matvec.count} products; raise max_iters (now {max_iters} per pair), use lanczos "
               "(far fewer products for the same accuracy), or warm-start with v0")
    if not converged and throw:
        raise ConvergenceError(f"{call}: {message}")
    return EigResult(torch.tensor(thetas, dtype=torch.float64), X.to(A.dtype),
                     torch.tensor(residuals, dtype=torch.float64),
                     torch.tensor(bounds, dtype=torch.float64), matvec.count, converged, message)
