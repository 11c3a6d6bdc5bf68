"""The maximal-update learning rate: the largest one-step representation change a budget allows.

For a step ``dw = eta u`` along a direction ``u`` (the GD step with per-parameter rates, or the
update an optimizer would take, per unit of its base LR), each layer's features change to first
order by ``df_l = eta J_l u``. Their one-step change energy, relative to the features' own size,
is

    ``S_l(eta) = eta^2 s_l``,  ``s_l = ||J_l u||^2 / ||f_l||^2``.

The maximal-update criterion picks the ``eta`` at which the layers' average energy reaches a
budget ``B``:

    ``eta* = sqrt(B / avg_l s_l)``.

``avg`` is the arithmetic mean over layers (``average="mean"``, the network-wide average of the
arithmetic-mean muP rule of Zhang et al. 2025, arXiv:2510.04327, continued by Wu et al. 2026,
arXiv:2602.07494, whose depth law ``eta* ~ L_eff^(-3/2)`` it yields when ``s_l`` grows like
``l^3``), or the sum (``average="sum"``). ``J_l u`` is exact first order (one JVP, through
:func:`curvlab.feature_speed`), so ``S_l(eta)`` is the change a real step of size ``eta`` makes
up to ``O(eta^3)``.

Example:
    >>> import torch, curvlab as cl
    >>> model = cl.testing.MLP(d_in=3, width=16, d_out=2).double()
    >>> x, y = torch.randn(32, 3).double(), torch.randn(32, 2).double()
    >>> r = cl.maximal_update_lr(model, cl.testing.mse, (x, y))
    >>> r.layers, bool(r.lr > 0)  # the hidden pre-activations
    (('0', '2'), True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlab.batches import Output, call_model
from curvlab.features import feature_speed
from curvlab.layers import recording

AVERAGES = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class MaximalUpdateLR:
    """``lr`` (``eta*``) and the per-layer quantities behind it, arrays ``(num_layers,)``."""

    lr: float
    layers: tuple[str, ...]
    energy_per_lr2: np.ndarray  # s_l = ||J_l u||^2 / ||f_l||^2
    feature_norm: np.ndarray  # ||f_l|| on the batch
    budget: float
    average: str
    direction: str  # "gd" or the optimizer's class name

    def energy(self, lr: float) -> np.ndarray:
        """``S_l(lr) = lr^2 s_l`` per layer (first order)."""
        return lr ** 2 * self.energy_per_lr2


def maximal_update_lr(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: tuple[Any, Any],
    *,
    layers: Sequence[str] | str | None = None,
    lrs: float | Mapping[str, float] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    budget: float = 1.0,
    average: str = "mean",
    output: Output = "auto",
) -> MaximalUpdateLR:
    """``eta* = sqrt(budget / avg_l s_l)`` (see the module docstring).

    Args:
        model, loss_fn, batch, layers, output: as for :func:`curvlab.feature_speed`. The
            default layers are the representations: its default cuts without the last, the
            network's output (e.g. every hidden pre-activation of an MLP). The output's relative
            change is large at init, where the output is small, and is not a representation.
        lrs: per-parameter rate multipliers of the GD direction (a parametrization's LR
            multipliers, ``cl.lr_scales``' groups); ``eta`` then scales them all. Default 1.
        optimizer: measure along this optimizer's own update instead, per unit of its base LR
            ``optimizer.defaults["lr"]`` (Adam's update is linear in the LR).
        budget: ``B > 0``, the layers' average relative change energy at ``eta*``.
        average: ``"mean"`` or ``"sum"`` over layers.
    """
    call = "maximal_update_lr"
    if average not in AVERAGES:
        raise ValueError(f"{call}: average must be one of {AVERAGES}, got {average!r}")
    if not budget > 0:
        raise ValueError(f"{call}: budget must be positive, got {budget!r}")
    if optimizer is not None and lrs is not None:
        raise ValueError(f"{call}: give lrs or optimizer, not both (the optimizer's groups "
                         "carry its rates)")
    base = float(optimizer.defaults["lr"]) if optimizer is not None else 1.0
    if not base > 0:
        raise ValueError(f"{call}: the optimizer's base LR must be positive, got {base}")
    speed = feature_speed(model, loss_fn, batch, layers=layers, optimizer=optimizer,
                          lrs=1.0 if optimizer is None and lrs is None else lrs, output=output)
    training = model.training
    try:
        model.eval()
        with torch.no_grad(), recording(model, speed.layers) as rec:
            call_model(model, batch[0])
        norms = np.array([float(f.double().norm()) for f in rec.features(speed.layers, call)])
    finally:
        model.train(training)
    zero = [n for n, v in zip(speed.layers, norms, strict=True) if not v > 0]
    if zero:
        raise ValueError(f"{call}: layers {zero} have zero features on this batch; the relative "
                         "energy is undefined there (leave them out with layers=)")
    s = (speed.feature_update_norm / base) ** 2 / norms ** 2  # (num_layers,)
    names = speed.layers
    if layers is None and len(names) > 1:  # the representations: not the network's output
        names, s, norms = names[:-1], s[:-1], norms[:-1]
    total = float(s.mean() if average == "mean" else s.sum())
    if not total > 0:
        raise ValueError(f"{call}: no layer's features move along the update (zero gradient?); "
                         "the maximal-update LR is undefined")
    return MaximalUpdateLR(float(np.sqrt(budget / total)), names, s, norms, budget, average,
                           speed.direction)
