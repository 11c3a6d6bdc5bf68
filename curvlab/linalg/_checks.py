"""Operator validation and a counted, checked matvec shared by the estimators."""

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
