"""Kernel metrics for tracking the NTK over training (docs/math.md section 4).

- Alignment ``A(K, Y) = <K, Y Y^T>_F / (||K||_F ||Y Y^T||_F)``, centered with ``H = I - 11^T / n``
  (Cortes, Mohri & Rostamizadeh 2012, JMLR 13).
- Kernel distance ``1 - <K1, K2>_F / (||K1||_F ||K2||_F)`` (Fort et al. 2020, arXiv:2010.15110).
- Relative change ``||K_t - K_0||_F / ||K_0||_F``.
- Entropy effective rank ``exp(-sum_i p_i log p_i)``, ``p_i = lambda_i / sum lambda`` (Roy &
  Vetterli 2007).

Kernels are ``(n, n)`` (use ``outputs="trace"``, or reshape a full kernel to ``(n k, n k)``).

Example:
    >>> import torch
    >>> round(effective_rank(torch.eye(5, dtype=torch.float64)), 10)
    5.0
"""

from __future__ import annotations

import torch
from torch import Tensor


def _square(K: Tensor, call: str) -> Tensor:
    if not isinstance(K, Tensor) or K.ndim != 2 or K.shape[0] != K.shape[1]:
        got = tuple(K.shape) if isinstance(K, Tensor) else type(K).__name__
        raise ValueError(f"{call}: expected a square kernel (n, n), got {got}; use "
                         "outputs='trace', or K.permute(0, 2, 1, 3).reshape(n*k, n*k)")
    return K.double()


def _targets(y: Tensor, n: int, call: str) -> Tensor:
    """``Y (n, c)`` float64 from labels ``(n,)`` (one-hot) or targets ``(n,)``/``(n, c)``."""
    if not isinstance(y, Tensor) or y.shape[0] != n or y.ndim > 2:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{call}: y must be labels (n,) or targets (n, c) with n = {n}, got {got}")
    if not y.is_floating_point():
        return torch.nn.functional.one_hot(y.long()).double()  # (n, c)
    return (y[:, None] if y.ndim == 1 else y).double()  # (n, c)


def _cosine(A: Tensor, B: Tensor) -> float:
    return float((A * B).sum() / (A.norm() * B.norm()))


def kernel_alignment(K: Tensor, y: Tensor, centered: bool = True) -> float:
    """Alignment of kernel ``K (n, n)`` with the target kernel ``Y Y^T``, in ``[-1, 1]``."""
    call = "kernel_alignment"
    K = _square(K, call)
    Y = _targets(y, K.shape[0], call)
    if centered:
        K = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()  # H K H
        Y = Y - Y.mean(0, keepdim=True)  # H Y
    return _cosine(K, Y @ Y.T)


def kernel_distance(K1: Tensor, K2: Tensor) -> float:
    """``1 - cos(K1, K2)`` in the Frobenius inner product: 0 for proportional kernels."""
    call = "kernel_distance"
    K1, K2 = _square(K1, call), _square(K2, call)
    if K1.shape != K2.shape:
        raise ValueError(f"{call}: kernels differ in shape: {tuple(K1.shape)} and "
                         f"{tuple(K2.shape)}")
    return 1.0 - _cosine(K1, K2)


def relative_change(K: Tensor, K0: Tensor) -> float:
    """``||K - K0||_F / ||K0||_F``."""
    if K.shape != K0.shape:
        raise ValueError(f"relative_change: kernels differ in shape: {tuple(K.shape)} and "
                         f"{tuple(K0.shape)}")
    return float((K.double() - K0.double()).norm() / K0.double().norm())


def effective_rank(K: Tensor) -> float:
    """Entropy effective rank of a PSD kernel ``(n, n)``: ``n`` for ``I_n``, 1 for rank one."""
    eigs = torch.linalg.eigvalsh(_square(K, "effective_rank")).clamp_min(0)  # (n,)
    p = eigs / eigs.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
