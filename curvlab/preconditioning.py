"""Preconditioned curvature: per-parameter learning rates and Adam's second moments.

A gradient step with per-parameter rates ``eta_p = eta * d_p`` is stable on the local quadratic
while ``lambda_max(D^{1/2} H D^{1/2}) < 2 / eta`` (Cohen et al. 2021, arXiv:2103.00065); for Adam,
``D = P_t^{-1}`` with ``P_t = (1 - beta1^(t+1)) diag(sqrt(v_t / (1 - beta2^(t+1))) + eps)`` and the
threshold is ``(2 + 2 beta1) / ((1 - beta1) eta)``, 38 / eta at beta1 = 0.9 (Cohen et al. 2022,
arXiv:2207.14484; :func:`adam_scales`). See docs/math.md section 2.

Example:
    >>> import torch, curvlab as cl
    >>> A = torch.diag(torch.tensor([1.0, 4.0]))
    >>> S = cl.preconditioned(A, torch.tensor([4.0, 1.0]))
    >>> S @ torch.eye(2)
    tensor([[4., 0.],
            [0., 4.]])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.curvature import OperatorBase


class Preconditioned(OperatorBase):
    """The symmetric operator ``D^{1/2} A D^{1/2}`` for a non-negative vector ``d (P,)``.

    It has the eigenvalues of ``D A`` and stays symmetric, so Lanczos applies. Entries ``d_p = 0``
    are parameters that the step does not move (an LR of 0, e.g. frozen by a schedule): their rows
    and columns vanish, and the other eigenvalues are those of the operator restricted to the
    moving parameters. ``d`` must have a positive entry (an operator that is 0 everywhere is
    almost surely an LR of 0 passed by mistake).
    """

    def __init__(self, A: Any, d: Tensor) -> None:
        if not hasattr(A, "shape") or len(A.shape) != 2 or A.shape[0] != A.shape[1]:
            raise TypeError("preconditioned: A must be a square operator or tensor with .shape "
                            f"(P, P), got {type(A).__name__}")
        P = int(A.shape[0])
        if not isinstance(d, Tensor) or d.shape != (P,):
            got = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(f"preconditioned: d must be a tensor of shape ({P},), got {got}")
        if not (torch.isfinite(d).all() and (d >= 0).all() and (d > 0).any()):
            raise ValueError("preconditioned: d must be finite and non-negative with a positive "
                             f"entry; got min {d.min().item():.3g}, max {d.max().item():.3g}. "
                             "An LR of 0 everywhere takes no step: skip the measurement")
        self.A = A
        self.shape = (P, P)
        self.dtype, self.device = A.dtype, A.device
        self._sqrt_d = d.to(device=A.device, dtype=A.dtype).sqrt()  # (P,)

    @property
    def num_matvecs(self) -> int:  # type: ignore[override]
        return int(getattr(self.A, "num_matvecs", 0))

    def broadcast(self, t: Tensor) -> Tensor:
        return self.A.broadcast(t) if hasattr(self.A, "broadcast") else t

    def __matmul__(self, v: Tensor) -> Tensor:
        V = self._check_vectors(v, "preconditioned(A, d) @ v")  # (P, m)
        s = self._sqrt_d[:, None]  # (P, 1)
        out = s * (self.A @ (s * V))  # (P, m)
        return out if v.ndim == 2 else out[:, 0]


def preconditioned(A: Any, d: Tensor) -> Preconditioned:
    """``D^{1/2} A D^{1/2}`` with ``D = diag(d)``; see :class:`Preconditioned`."""
    return Preconditioned(A, d)


def _named(params: Mapping[str, Tensor] | nn.Module | Iterable[Tensor], call: str
           ) -> list[tuple[str, Tensor]]:
    if isinstance(params, nn.Module):
        return [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    if isinstance(params, Mapping):
        return list(params.items())
    if isinstance(params, Tensor) or not isinstance(params, Iterable):
        raise TypeError(f"{call}: params must be a dict of named parameters, a module, or an "
                        f"iterable of parameters, got {type(params).__name__}")
    return [(str(i), p) for i, p in enumerate(params)]


def _groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def lr_scales(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, Tensor] | nn.Module | Iterable[Tensor],
    *,
    base_lr: float | None = None,
    scheduled: bool = True,
) -> Tensor:
    """Per-element learning-rate multipliers ``d (P,)``: each param group's LR / ``base_lr``.

    ``params`` gives the order of the flat vector (use the operator's parameters, e.g.
    ``{n: p for n, p in model.named_parameters() if n in H.param_names}``). ``base_lr`` defaults to
    the optimizer's ``defaults["lr"]`` (the LR it was built with), so muP-style groups with
    ``lr = eta * multiplier`` give the multipliers.

    Under a scheduler, a group's LR is the one in ``optimizer.param_groups`` when this is called:
    torch's schedulers, Lightning and the Hugging Face Trainer update it after each optimizer
    step, so it is the LR of the step about to be taken, and ``d`` carries the schedule's factor.
    ``scheduled=False`` uses each group's LR before any scheduler changed it (``initial_lr``,
    which torch's schedulers record; the group's LR where none did), so ``d`` does not follow the
    schedule: the quantity to read during a warm-up.
    """
    call = "lr_scales"
    named = _named(params, call)
    groups = _groups_by_param(optimizer)
    base = float(optimizer.defaults["lr"] if base_lr is None else base_lr)
    if not base > 0:
        raise ValueError(f"{call}: base_lr must be positive, got {base}")
    pieces = []
    for name, p in named:
        if id(p) not in groups:
            raise ValueError(f"{call}: parameter {name!r} is not in the optimizer; pass only "
                             "parameters that it updates")
        group = groups[id(p)]
        lr = group["lr"] if scheduled else group.get("initial_lr", group["lr"])
        pieces.append(torch.full((p.numel(),), float(lr) / base, dtype=p.dtype, device=p.device))
    return torch.cat(pieces)  # (P,)


def adam_scales(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, Tensor] | nn.Module | Iterable[Tensor],
    *,
    base_lr: float | None = None,
    scheduled: bool = True,
) -> Tensor:
    """The inverse of Adam's preconditioner for its next step, times the LR scales, ``(P,)``.

    After ``t`` steps (the optimizer state's ``step``), Adam's next update is
    ``-eta m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m_{t+1} / (1 - beta1^(t+1))``. Writing it as
    ``-eta P_t^{-1} m_{t+1}``, Cohen et al. 2022 ("Adaptive Gradient Methods at the Edge of
    Stability", arXiv:2207.14484, section 2) define the preconditioner with both bias
    corrections of that step, the second moment taken from the state:

        ``P_t = (1 - beta1^(t+1)) diag(sqrt(v_t / (1 - beta2^(t+1))) + eps)``.

    This returns ``d = lr_scale / diag(P_t)``, so ``preconditioned(H, d)`` has the eigenvalues
    of ``P_t^{-1} H`` (in units of the base LR), to compare with ``(2 + 2 beta1) / ((1 - beta1)
    eta)``, 38 / eta at beta1 = 0.9 (:func:`curvlab.callbacks.eos_threshold`). The first-moment
    factor matters early: at ``t = 5`` with beta1 = 0.9 it is ``1 / (1 - 0.9^6) = 2.13``.

    Read from the state (``exp_avg_sq``, or ``max_exp_avg_sq`` with amsgrad, and ``step``) of
    ``torch.optim.Adam`` and ``AdamW``. AdamW's decoupled weight decay is not part of ``P``; it
    shifts the threshold (see ``eos_threshold``). Adam's coupled ``weight_decay`` adds
    ``w theta`` to the gradient, i.e. ``w I`` to the Hessian of the objective Adam descends: put
    the decay into ``loss_fn`` to measure that objective. Other adaptive optimizers (NAdam,
    RAdam, Adamax) precondition differently and are refused. ``base_lr`` and ``scheduled`` are
    those of :func:`lr_scales` (which LR of a scheduled group counts).
    """
    call = "adam_scales"
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(f"{call}: expected torch.optim.Adam or AdamW, got "
                        f"{type(optimizer).__name__}; other optimizers precondition differently "
                        "(use lr_scales for SGD-like ones)")
    named = _named(params, call)
    scales = torch.split(lr_scales(optimizer, dict(named), base_lr=base_lr, scheduled=scheduled),
                         [p.numel() for _, p in named])
    groups = _groups_by_param(optimizer)
    pieces = []
    for (name, p), scale in zip(named, scales, strict=True):
        group = groups[id(p)]
        beta1, beta2 = group["betas"]
        state = optimizer.state.get(p, {})
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        if key not in state or "step" not in state:
            raise ValueError(f"{call}: parameter {name!r} has no Adam state yet; call "
                             "optimizer.step() at least once before reading the preconditioner")
        t = float(state["step"]) + 1  # the step about to be taken
        v_hat = state[key].detach().reshape(-1) / (1 - beta2 ** t)  # (numel,)
        pieces.append(scale / ((1 - beta1 ** t) * (v_hat.sqrt() + group["eps"])))
    return torch.cat(pieces)  # (P,)
