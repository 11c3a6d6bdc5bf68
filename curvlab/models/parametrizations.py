"""Width (and depth) parametrizations: init, forward multipliers and per-layer learning rates.

With width multiplier ``m = width / base_width`` and base init scale ``sigma``.
Every weight layer of a curvlab model is a :class:`ScaledLinear` (or :class:`ScaledConv2d`,
``fan_in = in_channels * kh * kw``) with a ``role`` (``"input"``,
``"hidden"`` or ``"output"``); a parametrization maps (role, fan_in, m) to a forward multiplier,
an init std and learning-rate multipliers for the weight and the bias:

================  ==================  =======================  ==================================
parametrization   multiplier          init std                 LR multiplier (SGD; Adam)
================  ==================  =======================  ==================================
SP                1                   sigma / sqrt(fan_in)     1
NTP               1 / sqrt(fan_in)    sigma                    1
MuP (SGD)         output: 1 / m       output: sigma/sqrt(n0)   input weights, output weights,
                                                               vector-like parameters: m;
                                                               hidden weights, output bias: 1
MuP (Adam)        output: 1 / m       output: sigma/sqrt(n0)   hidden weights: 1 / m; others 1
DepthMuP          as MuP; residual branches scaled by (L / L0)^(-1/2); with Adam the
                  parameters inside the branches (not the stem, head or their biases) get
                  LR times (L / L0)^(-1/2); with SGD no depth factor (Yang et al. 2023,
                  arXiv:2310.02244; Bordelon et al. 2023, arXiv:2309.16620)
interpolated(s)   1                   output: sigma/sqrt(n0)   SGD: input, vector-like m^s;
                                      * m^(-(1+s)/2)           hidden m^(s-1); output 1/m, its
                                                               bias 1.  Adam: hidden and output
                                                               weights m^(-(1+s)/2); others 1
                                                               (NTP at s=0, muP at s=1)
================  ==================  =======================  ==================================

muP follows Yang & Hu 2021 (arXiv:2011.14522, Table 3, abc form); at ``m = 1`` it is SP exactly.
**Vector-like** parameters have one dimension that grows with width: the biases of the input and
hidden layers, and the gains and biases of norms (a one-dimensional parameter of size ``width``
outside the scaled layers, e.g. ``nn.LayerNorm(width)``). Table 3 gives them ``LR ~ fan_out``
under SGD (``m``) and a constant LR under Adam. The output bias's fan_out is the fixed output
size, so its LR stays ``eta`` (with ``eta m`` the readout bias alone destabilizes wide networks:
measured, GD diverged at width 1024 at an LR stable at width 64). Other parameters outside the
scaled layers keep the base LR.

Depth-muP (Yang et al. 2023, TP6, with ``alpha = 1/2``): the branch multiplier is
``(L / L0)^(-1/2)`` relative to ``base_depth = L0``, so at ``L = L0`` the model is muP; the LR
exponent is ``gamma = 0`` for SGD and ``gamma = 1/2`` for Adam, applied to the parameters of the
residual branches (those under the model's ``blocks``), so each block's update is
``O(1/L)`` and their sum ``O(1)``. The stem, the head and their biases stay as in muP.

The interpolated family's Adam form (derived here, not in Yaida 2022, which treats SGD): in the
multiplier-free form NTP with Adam trains hidden and output weights at an effective LR
``n^(-1/2)`` and muP (Table 3) at ``n^(-1)``; the exponent is interpolated linearly,
``n^(-(1+s)/2)``, and the input weights and vector-like parameters keep a constant LR at both
ends.

Biases start at zero. Attention logits are scaled by ``1/sqrt(head_dim)``, and under muP by
``sqrt(d0)/d`` (``1/d`` in width, Yang et al. 2022, arXiv:2203.03466). Norm parameters keep
PyTorch's init.

Example:
    >>> import curvlab as cl
    >>> p = cl.MuP(base_width=64)
    >>> p.lr_scale("output", "weight", width=256, optimizer="sgd")   # eta * m for the readout
    4.0
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROLES = ("input", "hidden", "output")
VECTOR = "vector"  # the lr_scale role of norm gains and biases (see the module docstring)
OPTIMIZERS = ("sgd", "adam")


class ScaledLinear(nn.Linear):
    """``y = multiplier * (x W^T) + b``; ``role`` says how a parametrization treats the layer."""

    def __init__(self, in_features: int, out_features: int, role: str, bias: bool = True) -> None:
        if role not in ROLES:
            raise ValueError(f"ScaledLinear: role must be one of {ROLES}, got {role!r}")
        super().__init__(in_features, out_features, bias)
        self.role, self.multiplier = role, 1.0

    def forward(self, x: Tensor) -> Tensor:  # x (..., in) -> (..., out)
        out = F.linear(x, self.weight)
        if self.multiplier != 1.0:
            out = out * self.multiplier
        return out if self.bias is None else out + self.bias

    @property
    def fan_in(self) -> int:
        return self.in_features

    def weight_multiplier(self) -> float:
        """``c`` of ``y = c W x + b``: the NTK's structured method reads it
        (:func:`curvlab.ntk_kernels.weight_multiplier`)."""
        return float(self.multiplier)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, role={self.role}, multiplier={self.multiplier:.4g}"


class ScaledConv2d(nn.Conv2d):
    """``y = multiplier * conv(x, W) + b`` (3x3 by default, same padding); ``fan_in`` is
    ``in_channels * kh * kw``."""

    def __init__(self, in_channels: int, out_channels: int, role: str, kernel_size: int = 3,
                 bias: bool = True) -> None:
        if role not in ROLES:
            raise ValueError(f"ScaledConv2d: role must be one of {ROLES}, got {role!r}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                         bias=bias)
        self.role, self.multiplier = role, 1.0

    @property
    def fan_in(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def forward(self, x: Tensor) -> Tensor:  # x (n, c_in, h, w) -> (n, c_out, h, w)
        out = self._conv_forward(x, self.weight, None)
        if self.multiplier != 1.0:
            out = out * self.multiplier
        return out if self.bias is None else out + self.bias[:, None, None]


Scaled = ScaledLinear | ScaledConv2d


@dataclass(frozen=True)
class Parametrization:
    """Base class: subclasses define ``multiplier``, ``init_std`` and ``lr_scale``."""

    base_width: int = 1
    sigma: float = math.sqrt(2.0)  # He scale, right for ReLU

    name = "parametrization"

    def width_ratio(self, width: int) -> float:
        return width / self.base_width

    def multiplier(self, role: str, fan_in: int, width: int) -> float:
        return 1.0

    def init_std(self, role: str, fan_in: int, width: int) -> float:
        return self.sigma / math.sqrt(fan_in)

    def lr_scale(self, role: str, kind: str, width: int, optimizer: str = "sgd",
                 depth: int | None = None, *, branch: bool = False) -> float:
        """LR multiplier of one parameter: ``role`` is a layer role or ``"vector"`` (a norm
        parameter), ``kind`` ``"weight"`` or ``"bias"``, ``branch`` whether it sits inside a
        residual branch (a ``blocks`` child of the model)."""
        return 1.0

    def branch_scale(self, depth: int) -> float:
        """Scale of residual branches (1 unless the parametrization is depth-aware)."""
        return 1.0

    def attention_scale(self, head_dim: int, width: int) -> float:
        """Scale of attention logits ``q.k``: ``1/sqrt(head_dim)`` (muP overrides it)."""
        return 1.0 / math.sqrt(head_dim)

    # ---------------------------------------------------------------- model and optimizer
    def layers(self, model: nn.Module) -> list[tuple[str, Scaled]]:
        found = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, ScaledLinear | ScaledConv2d)]
        if not found:
            raise TypeError(f"{type(self).__name__}: the model has no ScaledLinear layers; build "
                            "it with curvlab.models (MLP, ResNet, ...)")
        return found

    def apply(self, model: nn.Module, width: int, generator: torch.Generator | None = None
              ) -> nn.Module:
        """Set every layer's multiplier and draw its init (weights Gaussian, biases zero)."""
        with torch.no_grad():
            for _, layer in self.layers(model):
                layer.multiplier = self.multiplier(layer.role, layer.fan_in, width)
                std = self.init_std(layer.role, layer.fan_in, width)
                layer.weight.normal_(0.0, std, generator=generator)
                if layer.bias is not None:
                    layer.bias.zero_()
        return model

    def lr_table(self, model: nn.Module, optimizer: str, width: int,
                 depth: int | None = None) -> list[tuple[str, Tensor, float]]:
        """``(name, parameter, LR multiplier)`` for every trainable parameter: the scaled
        layers' weights and biases, then vector-like parameters (one-dimensional, size
        ``width``, e.g. LayerNorm), then the rest at multiplier 1."""
        rows, covered = [], set()
        for name, layer in self.layers(model):
            branch = _in_branch(name)
            for kind, p in (("weight", layer.weight), ("bias", layer.bias)):
                if p is None:
                    continue
                scale = self.lr_scale(layer.role, kind, width, optimizer, depth, branch=branch)
                rows.append((f"{name}.{kind}", p, scale))
                covered.add(id(p))
        for name, p in model.named_parameters():
            if id(p) in covered or not p.requires_grad:
                continue
            vector = p.ndim == 1 and p.numel() == width
            scale = (self.lr_scale(VECTOR, "bias", width, optimizer, depth,
                                   branch=_in_branch(name)) if vector else 1.0)
            rows.append((name, p, scale))
        return rows

    def param_groups(self, model: nn.Module, lr: float, optimizer: str, width: int,
                     depth: int | None = None) -> list[dict[str, Any]]:
        """One group per scaled-layer parameter (named as the parameter); the remaining
        parameters grouped by LR multiplier (``"vector"`` for norm gains and biases when their
        multiplier is not 1, ``"other"`` for the rest)."""
        groups: list[dict[str, Any]] = []
        layer_params = {id(layer.weight) for _, layer in self.layers(model)} | {
            id(layer.bias) for _, layer in self.layers(model) if layer.bias is not None}
        rest: dict[float, list[Tensor]] = {}
        for name, p, scale in self.lr_table(model, optimizer, width, depth):
            if id(p) in layer_params:
                groups.append({"params": [p], "lr": lr * scale, "name": name})
            else:
                rest.setdefault(scale, []).append(p)
        for scale, params in rest.items():
            groups.append({"params": params, "lr": lr * scale,
                           "name": "other" if scale == 1.0 else f"vector x{scale:.4g}"})
        return groups

    def optimizer(self, model: nn.Module, name: str, lr: float, **kwargs: Any
                  ) -> torch.optim.Optimizer:
        """``torch.optim.SGD`` or ``Adam`` with this parametrization's per-layer learning rates
        (``lr`` is the base LR; ``optimizer.defaults["lr"]`` keeps it)."""
        if name not in OPTIMIZERS:
            raise ValueError(f"{type(self).__name__}.optimizer: name must be one of "
                             f"{OPTIMIZERS}, got {name!r}")
        width, depth = _model_width(model), getattr(model, "depth", None)
        groups = self.param_groups(model, lr, name, width, depth)
        cls = torch.optim.SGD if name == "sgd" else torch.optim.Adam
        return cls(groups, lr=lr, **kwargs)

    def check(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
              *, rtol: float = 1e-6) -> list[str]:
        """Warn (``UserWarning``, naming the layers) where the model's forward multipliers or
        residual-branch scales, or the optimizer's per-parameter LRs (read for SGD or Adam from
        ``"betas"`` in its defaults), differ from this parametrization; return the messages."""
        width, depth = _model_width(model), getattr(model, "depth", None)
        problems = []
        for name, layer in self.layers(model):
            want = self.multiplier(layer.role, layer.fan_in, width)
            if not math.isclose(layer.multiplier, want, rel_tol=rtol):
                problems.append(f"{name}: forward multiplier {layer.multiplier:.4g}, expected "
                                f"{want:.4g} ({layer.role} layer)")
        blocks = getattr(model, "blocks", None)
        if isinstance(depth, int) and isinstance(blocks, nn.ModuleList):
            want = self.branch_scale(depth)
            for i, block in enumerate(blocks):
                got = getattr(block, "scale", None)
                if isinstance(got, float) and not math.isclose(got, want, rel_tol=rtol):
                    problems.append(f"blocks.{i}: residual branch scale {got:.4g}, expected "
                                    f"{want:.4g} at depth {depth}")
        if optimizer is not None:
            kind = "adam" if "betas" in optimizer.defaults else "sgd"
            base = float(optimizer.defaults["lr"])
            lrs = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
            for name, p, scale in self.lr_table(model, kind, width, depth):
                if id(p) in lrs and not math.isclose(lrs[id(p)], base * scale, rel_tol=rtol):
                    problems.append(f"{name}: learning rate {lrs[id(p)]:.4g}, expected "
                                    f"{base * scale:.4g} under {self.name} with {kind}")
        if problems:
            warnings.warn(f"{self.name} check: the model or optimizer does not match the "
                          "parametrization (it may silently train in another one): "
                          + "; ".join(problems)
                          + ". Build the optimizer with parametrization.optimizer(model, ...).",
                          UserWarning, stacklevel=2)
        return problems


def _in_branch(name: str) -> bool:
    """Whether a module or parameter name sits inside a residual branch (under ``blocks``)."""
    return name.split(".", 1)[0] == "blocks"


def _model_width(model: nn.Module) -> int:
    width = getattr(model, "width", None)
    if not isinstance(width, int):
        raise TypeError("the model has no integer `width` attribute; build it with "
                        "curvlab.models")
    return width


@dataclass(frozen=True)
class SP(Parametrization):
    """Standard parametrization: PyTorch-style init, one LR everywhere."""

    name = "sp"


@dataclass(frozen=True)
class NTP(Parametrization):
    """Neural tangent parametrization: ``N(0, sigma^2)`` weights, multiplier ``1/sqrt(fan_in)``."""

    name = "ntp"

    def multiplier(self, role: str, fan_in: int, width: int) -> float:
        return 1.0 / math.sqrt(fan_in)

    def init_std(self, role: str, fan_in: int, width: int) -> float:
        return self.sigma


@dataclass(frozen=True)
class MuP(Parametrization):
    """Maximal update parametrization relative to ``base_width`` (SP at ``width == base_width``)."""

    name = "mup"

    def multiplier(self, role: str, fan_in: int, width: int) -> float:
        return 1.0 / self.width_ratio(width) if role == "output" else 1.0

    def init_std(self, role: str, fan_in: int, width: int) -> float:
        if role == "output":
            return self.sigma / math.sqrt(fan_in / self.width_ratio(width))  # sigma / sqrt(n0)
        return self.sigma / math.sqrt(fan_in)

    def attention_scale(self, head_dim: int, width: int) -> float:
        """``sqrt(d0) / d`` for head dimension ``d`` and base ``d0 = d / m``: ``1/d`` scaling in
        width (Yang et al. 2022, arXiv:2203.03466), ``1/sqrt(d)`` at the base width."""
        return math.sqrt(head_dim / self.width_ratio(width)) / head_dim

    def lr_scale(self, role: str, kind: str, width: int, optimizer: str = "sgd",
                 depth: int | None = None, *, branch: bool = False) -> float:
        m = self.width_ratio(width)
        if optimizer == "sgd":  # LR ~ fan_out for input weights and vector-like parameters,
            # but the output bias's fan_out is the fixed output size: its LR stays eta
            if (role == "hidden" and kind == "weight") or (role == "output" and kind == "bias"):
                return 1.0
            return m
        return 1.0 / m if (role == "hidden" and kind == "weight") else 1.0


@dataclass(frozen=True)
class DepthMuP(MuP):
    """muP in width plus Depth-muP relative to ``base_depth``: residual branches scaled by
    ``(depth / base_depth)^(-1/2)`` (so at the base depth it is muP); with Adam the branches'
    parameters get LR times ``(depth / base_depth)^(-1/2)``."""

    base_depth: int = 1
    name = "depth-mup"

    def branch_scale(self, depth: int) -> float:
        return math.sqrt(self.base_depth / depth)

    def lr_scale(self, role: str, kind: str, width: int, optimizer: str = "sgd",
                 depth: int | None = None, *, branch: bool = False) -> float:
        scale = super().lr_scale(role, kind, width, optimizer)
        if optimizer == "adam" and branch and depth is not None:
            scale *= (depth / self.base_depth) ** -0.5
        return scale


@dataclass(frozen=True)
class Interpolated(Parametrization):
    """The family between NTP (``s = 0``) and muP (``s = 1``) in multiplier-free form (docs/math.md,
    after Yaida 2022, arXiv:2210.04909), relative to ``base_width``."""

    s: float = 1.0
    name = "interpolated"

    def init_std(self, role: str, fan_in: int, width: int) -> float:
        if role == "output":
            m = self.width_ratio(width)
            return self.sigma / math.sqrt(fan_in / m) * m ** (-(1 + self.s) / 2)
        return self.sigma / math.sqrt(fan_in)

    def lr_scale(self, role: str, kind: str, width: int, optimizer: str = "sgd",
                 depth: int | None = None, *, branch: bool = False) -> float:
        m = self.width_ratio(width)
        if optimizer == "adam":  # NTP-Adam n^(-1/2) to muP-Adam n^(-1) on the matrix-like
            # hidden and output weights; constant on input weights and vector-like parameters
            weight = kind == "weight" and role in ("hidden", "output")
            return m ** (-(1 + self.s) / 2) if weight else 1.0
        if role == "output" and kind == "bias":
            return 1.0  # fan_out is the fixed output size
        if kind == "bias" or role in ("input", VECTOR):
            return m ** self.s
        return m ** (self.s - 1) if role == "hidden" else 1.0 / m


def interpolated(s: float, base_width: int, sigma: float = math.sqrt(2.0)) -> Interpolated:
    """The interpolated parametrization; ``s`` in ``[0, 1]``."""
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"interpolated: s must be in [0, 1], got {s}")
    return Interpolated(base_width=base_width, sigma=sigma, s=s)
