"""Operator validation, a counted, checked matvec, and the inner products of a float32 basis,
shared by the estimators."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_operator(A: Any, call: str) -> int:
    """Return ``P`` for a square operator ``A`` (anything with shape, dtype, device and ``@``)."""
    shape = getattr(A, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1] or not hasattr(A, "__matmul__"):
        raise TypeError(f"{call}: A must be a square operator with .shape (P, P), .dtype, .device "
                        f"and A @ v (a dense tensor qualifies), got {type(A).__name__}")
    if not (getattr(A, "dtype", None) is not None and A.dtype.is_floating_point):
        raise TypeError(f"{call}: A must have a real floating dtype, got {A.dtype}")
    return int(shape[0])


def random_vectors(P: int, m: int, A: Any, generator: torch.Generator | None,
                   kind: str = "normal") -> Tensor:
    """``(P, m)`` float64 probe vectors on A's device: standard normal or Rademacher.

    Drawn on the CPU from ``generator`` (or the global generator) so results do not depend on the
    device; a distributed operator's ranks all use rank 0's draw.
    """
    if kind == "normal":
        Z = torch.randn(P, m, generator=generator, dtype=torch.float64)
    else:
        Z = torch.randint(0, 2, (P, m), generator=generator).to(torch.float64) * 2 - 1
    return synced(Z.to(A.device), A)  # (P, m)


def synced(t: Tensor, A: Any) -> Tensor:
    """``t`` as the first rank of ``A``'s process group holds it, when ``A`` is distributed
    (``A.broadcast``), so that every rank starts from the same vectors."""
    broadcast = getattr(A, "broadcast", None)
    return broadcast(t) if callable(broadcast) else t


SLICE = 1 << 16


def dots(X: Tensor, y: Tensor) -> Tensor:
    """``X @ y`` in float64 for ``X (m, P)`` or ``(P,)`` and ``y (P,)`` or ``(P, q)``.

    In float64 this is ``X @ y``. A float32 product over ``P`` entries loses accuracy as ``P``
    grows, most where the terms share a sign (``q . A q`` near the top of the spectrum, ``q .
    q``) or where a few entries carry the sum (a localized eigenvector): measured on torch 2.13
    CPU, a matrix-vector product lost ``1e-5`` of its value at ``P = 6e5`` and ``7e-4`` at
    ``P = 1e7``, and the Gram matrix of two float32 eigenvectors of a 470k-parameter GPT-2
    was off the identity by ``2e-4``, errors that a Rayleigh-Ritz or Lanczos step passes on to
    the eigenvalues. Here each slice of 65536 entries is converted to float64 and multiplied
    there (a temporary of ``m`` slices), so the only float32 error left is that of storing the
    vectors: the memory traffic of the float32 basis is kept, its rounding is not.

    Example:
        >>> import torch
        >>> x = torch.full((10**6,), 0.1)
        >>> round(float(dots(x, x)), 6) == round(10**6 * float(x[0]) ** 2, 6)
        True
    """
    if X.dtype == torch.float64 and y.dtype == torch.float64:
        return X @ y
    total = None
    for a in range(0, y.shape[0], SLICE):
        part = X[..., a: a + SLICE].double() @ y[a: a + SLICE].double()  # (m,), (m, q) or ()
        total = part if total is None else total.add_(part)
    return (X.double() @ y.double()) if total is None else total  # P = 0: an empty sum


def norm(x: Tensor) -> float:
    """``||x||`` of a vector ``(P,)``, accumulated as :func:`dots` (a float32 ``x.norm()`` of
    ``1e7`` entries is off by about ``3e-4``, and a basis vector divided by it is not unit)."""
    return float(dots(x, x)) ** 0.5


class Matvec:
    """``A @ V`` in A's dtype and on A's device, counted per column and checked finite; results
    in ``dtype`` (default float64) on ``device`` (default A's)."""

    def __init__(self, A: Any, call: str, dtype: torch.dtype = torch.float64,
                 device: torch.device | None = None) -> None:
        self.A, self.call, self.count = A, call, 0
        self.dtype, self.device = dtype, torch.device(A.device) if device is None else device

    def __call__(self, V: Tensor, iteration: int) -> Tensor:
        out = self.A @ V.to(device=self.A.device, dtype=self.A.dtype)  # (P,) or (P, m)
        self.count += 1 if V.ndim == 1 else V.shape[1]
        if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():  # cheap test first
            raise ValueError(f"{self.call}: the product at iteration {iteration} is not finite; "
                             "check the operator (e.g. the loss at these parameters)")
        return out.to(device=self.device, dtype=self.dtype)
