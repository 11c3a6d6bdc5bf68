"""Measurements a :class:`~curvlab.Monitor` runs: loss, NTK spectrum, feature speed and feature
change, and the pieces the curvature measurements of :mod:`curvlab.callbacks.spectra` (sharpness,
Hessian spectrum) share with them: which preconditioner and which LR, the edge-of-stability
threshold, per-block parameter sets. Each measurement takes a schedule (``every=``, ``steps=`` or
``per_decade=``) and returns records that the Monitor logs; definitions are in docs/math.md.

Per-block curvature: ``blocks="layers"`` (one block per module that owns parameters) or a list of
parameter-name patterns (``fnmatch``, e.g. ``["0.*", "2.*"]``) or a dict ``label -> patterns``;
each block's diagonal Hessian block ``H_bb`` gets its own top eigenvalue (and trace).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curvlab import distributed
from curvlab.batches import (
    Output,
    as_batches,
    batch_weight,
    call_model,
    pick_output,
    take_batch,
)
from curvlab.callbacks.monitor import LR_ZERO, Context, Measurement, Record, Skip
from curvlab.features import feature_change, feature_speed
from curvlab.func import forward_context, unwrap_compiled
from curvlab.kernel_metrics import kernel_alignment, kernel_distance
from curvlab.ntk import empirical_ntk
from curvlab.operators import GGNOperator, HessianOperator
from curvlab.preconditioning import adam_scales, lr_scales

PRECONDITIONERS = (None, "lr", "adam")
MATRICES = {"hessian": HessianOperator, "ggn": GGNOperator}  # the curvature Sharpness tracks
LRS = ("current", "base")  # which LR of a scheduled group a preconditioned sharpness uses
TRACKING_TOL = 1e-3  # the default relative accuracy of Sharpness and HessianSpectrum


def resolve_blocks(model: nn.Module, blocks: Any, call: str) -> dict[str, list[str]]:
    """``label -> parameter names`` for ``blocks`` (see the module docstring)."""
    model = unwrap_compiled(model)  # names as the operators give them (no "_orig_mod.")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if blocks == "layers":
        found = {}
        for module_name, module in model.named_modules():
            own = [f"{module_name}.{n}" if module_name else n
                   for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if own:
                found[module_name or "(root)"] = own
        return found
    if isinstance(blocks, str) or not isinstance(blocks, Sequence | Mapping):
        raise TypeError(f"{call}: blocks must be 'layers', a list of parameter-name patterns or a "
                        f"dict label -> patterns, got {blocks!r}")
    pairs = blocks.items() if isinstance(blocks, Mapping) else ((b, b) for b in blocks)
    found = {}
    for label, patterns in pairs:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not chosen:
            raise ValueError(f"{call}: block {label!r} matches no trained parameter; names look "
                             f"like {names[:6]}")
        found[str(label)] = chosen
    return found


def _scales(kind: str | None, optimizer: Any, model: nn.Module, call: str,
            scheduled: bool = True) -> Any:
    if kind is None:
        return None
    if optimizer is None:
        raise ValueError(f"{call}: preconditioned={kind!r} needs the Monitor's optimizer")
    params = {n: p for n, p in unwrap_compiled(model).named_parameters() if p.requires_grad}
    return (lr_scales if kind == "lr" else adam_scales)(optimizer, params, scheduled=scheduled)


def _all_lr_zero(optimizer: Any) -> bool:
    """Whether no parameter group of ``optimizer`` takes a step (every LR is 0)."""
    return all(float(g["lr"]) == 0 for g in optimizer.param_groups if g["params"])


def eos_threshold(kind: str | None, optimizer: Any) -> float | None:
    """The edge-of-stability line for the sharpness that ``kind`` preconditions, or ``None``.

    Each is the curvature at which the optimizer's linearized step on a quadratic (curvature
    ``lam`` along the top eigenvector, the preconditioner frozen) gets an eigenvalue ``-1``;
    ``eta`` is the base LR for preconditioned sharpness (``kind="lr"`` or ``"adam"``, whose
    ``D`` carries the per-group LR over the base LR) and the common group LR for raw sharpness:

    - SGD: ``2 / eta`` (Cohen et al. 2021, arXiv:2103.00065);
    - SGD with heavy-ball momentum ``beta`` and dampening ``d``, PyTorch's form
      ``b = beta b + (1 - d) g``, ``theta -= eta b``: ``(2 + 2 beta) / ((1 - d) eta)`` (Cohen et
      al. 2021, appendix; 3.8 / eta at beta = 0.9, 38 at eta = 0.1);
    - Nesterov (PyTorch's ``theta -= eta (g + beta b)``): ``(2 + 2 beta) / ((1 + 2 beta) eta)``
      (derived: the characteristic polynomial ``z^2 - (1 + beta)(1 - a) z + beta (1 - a)`` with
      ``a = eta lam``, at ``z = -1``; 1.36 / eta at beta = 0.9);
    - Adam: ``(2 + 2 beta1) / ((1 - beta1) eta)``, 38 / eta at beta1 = 0.9 (Cohen et al. 2022,
      arXiv:2207.14484, with ``P`` of :func:`~curvlab.adam_scales`);
    - AdamW with decoupled decay ``w``: ``(1 + beta1) (2 - eta w) / ((1 - beta1) eta)`` (derived
      the same way: ``theta -= eta w theta`` each step shrinks the threshold by ``(1+beta1) w /
      (1-beta1)``, 0.01% at eta w = 3e-4).

    ``None`` when there is no single line: groups with different momenta or betas, a raw
    sharpness under several LRs, an LR of 0 (no step is taken), or a sharpness that Adam's
    preconditioner does not enter (``kind`` None or ``"lr"`` with Adam). AdamW groups with different
    decays (none for biases and norms, as Hugging Face sets them) get the line of the largest
    decay, the lowest, within ``eta w_max / 2`` (relative) of the others.
    """
    if optimizer is None:
        return None
    groups = optimizer.param_groups
    if kind is None:
        lrs = {float(g["lr"]) for g in groups}
        if len(lrs) != 1:
            return None
        eta = lrs.pop()
    else:
        eta = float(optimizer.defaults["lr"])
    if not eta > 0:
        return None
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        if kind != "adam":  # Adam's line is for the Adam-preconditioned sharpness only
            return None
        betas = {float(g["betas"][0]) for g in groups}
        if len(betas) != 1:
            return None
        beta1 = betas.pop()
        # Groups may differ in decay (none for biases and norms, as Hugging Face sets it): the
        # line of the largest decay, the lowest, within eta * w_max / 2 of the others.
        w = max(float(g["weight_decay"]) for g in groups) \
            if isinstance(optimizer, torch.optim.AdamW) else 0.0
        return (1 + beta1) * (2 - eta * w) / ((1 - beta1) * eta)
    if isinstance(optimizer, torch.optim.SGD):
        forms = {(float(g["momentum"]), float(g["dampening"]), bool(g["nesterov"]))
                 for g in groups}
        if len(forms) != 1:
            return None
        beta, dampening, nesterov = forms.pop()
        if nesterov:
            return (2 + 2 * beta) / ((1 + 2 * beta) * eta)
        return (2 + 2 * beta) / ((1 - dampening) * eta) if beta else 2.0 / eta
    return 2.0 / eta  # plain gradient steps


def _check_preconditioner(kind: str | None, optimizer: Any, call: str) -> None:
    """Refuse ``preconditioned="adam"`` with an optimizer that is not Adam or AdamW."""
    if kind == "adam" and not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise ValueError(f"{call}: preconditioned='adam' needs torch.optim.Adam or AdamW as the "
                         f"Monitor's optimizer, got {type(optimizer).__name__}; use "
                         "preconditioned='lr' for SGD-like optimizers")


class Loss(Measurement):
    """The mean loss over the probe (size-weighted over batches), in eval mode."""

    name = "loss"

    def measure(self, ctx: Context) -> list[Record]:
        batches, _ = as_batches(ctx.probe, "Loss")
        total, count = 0.0, 0.0
        device = next(ctx.model.parameters()).device
        with forward_context(ctx.model, train_mode=False, seed=0, device=device), \
                torch.no_grad():
            for i, (x, y) in enumerate(batches):
                n = batch_weight(ctx.weights, x, y, i, "Loss")
                if n > 0:
                    out = pick_output(call_model(ctx.model, x), ctx.output, "Loss")
                    total += float(ctx.loss_fn(out, y)) * n
                    count += n
        if distributed.is_active():  # the mean over every rank's probe examples
            sums = torch.tensor([total, count], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(sums)
            total, count = float(sums[0]), float(sums[1])
        return [Record(self.name, total / count, description="mean loss over the probe "
                       "(batches weighted as the operators weight them)")]


class NTKSpectrum(Measurement):
    """Empirical NTK on the probe's first batch (trace over outputs, ``(n, n)``): its top-``k``
    eigenvalues (``ntk_top``), alignment with the targets (``ntk_alignment``; class labels are
    one-hot encoded) and distance from the first measured kernel (``ntk_distance_from_start``).
    ``size`` keeps only the first ``size`` examples (the kernel costs ``size^2``). With the
    Monitor's optimizer the kernel is LR-weighted, ``J D J^T`` with ``D = lr_scales`` (the kernel
    of one step, ``df = -eta J D J^T grad_f L``; docs/math.md section 4), so that per-layer learning
    rates (muP) count; ``lr_weighted=False`` gives ``J J^T``. ``output`` picks the kernel's output
    tensor (default: the Monitor's ``output``), e.g. ``lambda o: o.logits[:, -1]`` for a language
    model's last position; outputs beyond ``(n, k)`` are flattened. Alignment is logged when the
    targets are one row per example (labels or regression targets)."""

    name = "ntk"

    def __init__(self, *, k: int = 10, size: int | None = None, lr_weighted: bool = True,
                 output: Output | None = None, **schedule: Any) -> None:
        super().__init__(**schedule)
        self.k, self.size, self.lr_weighted, self.output = k, size, lr_weighted, output
        self._first: torch.Tensor | None = None

    def measure(self, ctx: Context) -> list[Record | Skip]:
        weighted = self.lr_weighted and ctx.optimizer is not None
        if weighted and _all_lr_zero(ctx.optimizer):
            return [Skip(self.name, LR_ZERO)]  # the kernel of a step of size 0 is 0
        x, y = ctx.first_batch if self.size is None else take_batch(ctx.first_batch, self.size)
        scales = _scales("lr", ctx.optimizer, ctx.model, "NTKSpectrum") if weighted else None
        K = empirical_ntk(ctx.model, x, outputs="trace", scales=scales,
                          output=ctx.output if self.output is None else self.output)  # (n, n)
        k = min(self.k, K.shape[0])
        eig = torch.linalg.eigvalsh(K.double()).flip(0)[:k]  # (k,), largest first
        if self._first is None:
            self._first = K.detach().clone()
        records: list[Record | Skip] = [Record(f"{self.name}_top", eig, [str(i) for i in range(k)],
                          "top eigenvalues of the empirical NTK (trace over outputs)")]
        if isinstance(y, torch.Tensor) and y.shape[:1] == K.shape[:1] and (
                y.is_floating_point() or y.ndim == 1):  # one target row per example
            targets = y if y.is_floating_point() else F.one_hot(y).to(K.dtype)  # (n, c)
            records.append(Record(f"{self.name}_alignment",
                                  kernel_alignment(K, targets.reshape(len(y), -1)),
                                  description="centered kernel-target alignment"))
        records.append(Record(f"{self.name}_distance_from_start", kernel_distance(K, self._first),
                              description="1 - cos(K_t, K_first)"))
        return records


class FeatureSpeed(Measurement):
    """:func:`~curvlab.feature_speed` on the probe's first batch, with the optimizer's per-group
    learning rates when the Monitor has an optimizer. One ``(layers,)`` metric per quantity.
    Skipped (``feature_skipped``) while every group's LR is 0: the step moves no feature, so the
    angle between the feature update and the backward pass does not exist."""

    name = "feature"

    def __init__(self, *, layers: Sequence[str] | None = None, **schedule: Any) -> None:
        super().__init__(**schedule)
        self.layers = layers

    def measure(self, ctx: Context) -> list[Record | Skip]:
        if ctx.optimizer is not None and _all_lr_zero(ctx.optimizer):
            return [Skip(self.name, LR_ZERO)]  # no feature update: its angle is undefined
        r = feature_speed(ctx.model, ctx.loss_fn, ctx.first_batch, layers=self.layers,
                          optimizer=ctx.optimizer, output=ctx.output)
        return [Record(f"{self.name}_{key}", value, r.layers, f"feature speed: {key} per layer")
                for key, value in r.as_dict().items()]


class FeatureChange(Measurement):
    """:func:`~curvlab.feature_change` (one real optimizer step, on a copy) on the probe's first
    batch: ``feature_rms`` and ``feature_change_rms`` per layer. Needs the Monitor's optimizer."""

    name = "feature_change"
    eval_mode = False  # its optimizer step runs in the model's own mode, on a copy

    def __init__(self, *, layers: Sequence[str] | None = None, **schedule: Any) -> None:
        super().__init__(**schedule)
        self.layers = layers

    def setup(self, ctx: Context) -> None:
        if ctx.optimizer is None:
            raise ValueError("FeatureChange: needs the Monitor's optimizer (Monitor(..., "
                             "optimizer=opt))")

    def measure(self, ctx: Context) -> list[Record]:
        if ctx.optimizer is None:
            raise ValueError("FeatureChange: needs the Monitor's optimizer")
        r = feature_change(ctx.model, ctx.loss_fn, ctx.first_batch, ctx.optimizer,
                           layers=self.layers, output=ctx.output)
        return [Record("feature_rms", r.feature_rms, r.layers, "RMS of the features"),
                Record(f"{self.name}_rms", r.change_rms, r.layers,
                       "RMS change of the features after one optimizer step")]
