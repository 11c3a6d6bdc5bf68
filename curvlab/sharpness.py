"""Sharpness: the top eigenvalue of the training-loss Hessian, optionally preconditioned.

``sharpness = lambda_max(H)``; with per-parameter scales ``d`` (learning-rate multipliers or Adam's
preconditioner) it is ``lambda_max(D^{1/2} H D^{1/2})``, to compare with ``2 / lr`` for gradient
descent and ``38 / lr`` for Adam at beta1 = 0.9 (Cohen et al. 2021, arXiv:2103.00065; 2022,
arXiv:2207.14484). docs/math.md section 2.

Example:
    >>> import torch, curvlab as cl
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> x = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    >>> y = torch.zeros(3, 1, dtype=torch.float64)
    >>> round(cl.sharpness(model, cl.testing.mse, (x, y), tol=1e-10), 6)   # (1/3) * max(x_i^2)
    3.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.linalg import lanczos
from curvlab.operators import HessianOperator
from curvlab.preconditioning import preconditioned


def sharpness(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    *,
    scales: Tensor | None = None,
    tol: float = 1e-4,
    max_iters: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    **operator_kwargs: Any,
) -> float:
    """The largest eigenvalue of the Hessian of the mean loss over ``data``, by Lanczos.

    Args:
        model, loss_fn, data: as for :class:`~curvlab.HessianOperator` (which also takes
            ``operator_kwargs``: ``params``, ``method``, ``reuse_graph``, ``allow_train_mode``).
        scales: per-parameter scales ``d (P,)`` (``lr_scales`` or ``adam_scales``) for the
            preconditioned sharpness ``lambda_max(D^{1/2} H D^{1/2})``.
        tol, max_iters, v0, generator: passed to :func:`~curvlab.linalg.lanczos`; ``tol`` is the
            relative accuracy of the returned value. Lanczos that does not converge raises.
    """
    H: Any = HessianOperator(model, loss_fn, data, **operator_kwargs)
    if scales is not None:
        H = preconditioned(H, scales)
    result = lanczos(H, k=1, which="LA", tol=tol, max_iters=max_iters, v0=v0,
                     generator=generator, throw=True)
    return float(result.eigenvalues[0])
