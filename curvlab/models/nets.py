"""Reference models built from ``width``, ``depth`` and a parametrization.

Every weight layer is a :class:`~curvlab.models.parametrizations.ScaledLinear` with a role, so
that a parametrization sets its multiplier, init and learning rate. Models keep ``width``,
``depth`` and ``parametrization`` as attributes (the optimizer and ``check`` read them).

Example:
    >>> import torch, curvlab as cl
    >>> model = cl.models.MLP(width=128, depth=3, parametrization=cl.MuP(base_width=64), d_in=8)
    >>> opt = model.parametrization.optimizer(model, "sgd", lr=0.1)
    >>> [round(g["lr"], 3) for g in opt.param_groups if g["name"].endswith("weight")]
    [0.2, 0.1, 0.2]
    >>> model(torch.randn(5, 8)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

from torch import Tensor, nn

from curvlab.models.parametrizations import SP, Parametrization, ScaledLinear


def _check(call: str, width: int, depth: int, parametrization: Parametrization,
           min_depth: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"{call}: width must be a positive int, got {width!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < min_depth:
        raise ValueError(f"{call}: depth must be an int >= {min_depth}, got {depth!r}")
    if not isinstance(parametrization, Parametrization):
        raise TypeError(f"{call}: parametrization must be cl.SP(), cl.NTP(), cl.MuP(...), "
                        f"cl.DepthMuP(...) or cl.interpolated(...), got "
                        f"{type(parametrization).__name__}")
    if parametrization.base_width > width:
        raise ValueError(f"{call}: base width {parametrization.base_width} is larger than the "
                         f"width {width}; muP-style scaling is defined for width >= base width")


class MLP(nn.Module):
    """``depth`` linear layers (input, ``depth - 2`` hidden, output) with ``act`` between them.

    Shapes: ``(n, d_in) -> (n, d_out)``. ``depth`` counts linear layers, so it equals the
    effective depth.
    """

    def __init__(self, width: int, depth: int = 3, parametrization: Parametrization | None = None,
                 *, d_in: int = 16, d_out: int = 10, act: type[nn.Module] = nn.ReLU,
                 bias: bool = True) -> None:
        parametrization = parametrization or SP()
        _check("MLP", width, depth, parametrization, 2)
        super().__init__()
        self.width, self.depth, self.parametrization = width, depth, parametrization
        dims = [d_in] + [width] * (depth - 1) + [d_out]
        roles = ["input"] + ["hidden"] * (depth - 2) + ["output"]
        self.layers = nn.ModuleList(ScaledLinear(a, b, r, bias)
                                    for a, b, r in zip(dims[:-1], dims[1:], roles, strict=True))
        self.act = act()
        parametrization.apply(self, width)

    def forward(self, x: Tensor) -> Tensor:  # x (n, d_in)
        for layer in self.layers[:-1]:
            x = self.act(layer(x))  # (n, width)
        return self.layers[-1](x)  # (n, d_out)


class ResidualBlock(nn.Module):
    """``h + scale * W act(h)``, one hidden layer per branch (as Depth-muP assumes)."""

    def __init__(self, width: int, scale: float, act: type[nn.Module], bias: bool) -> None:
        super().__init__()
        self.scale, self.act = scale, act()
        self.linear = ScaledLinear(width, width, "hidden", bias)

    def forward(self, h: Tensor) -> Tensor:  # h (n, width)
        return h + self.scale * self.linear(self.act(h))  # (n, width)


class ResNet(nn.Module):
    """``stem -> depth residual blocks -> head`` on ``(n, d_in)``; ``branch_scale`` defaults to the
    parametrization's (``1/sqrt(depth)`` for DepthMuP, else 1)."""

    def __init__(self, width: int, depth: int = 4, parametrization: Parametrization | None = None,
                 *, branch_scale: float | None = None, d_in: int = 16, d_out: int = 10,
                 act: type[nn.Module] = nn.ReLU, bias: bool = True) -> None:
        parametrization = parametrization or SP()
        _check("ResNet", width, depth, parametrization, 1)
        super().__init__()
        self.width, self.depth, self.parametrization = width, depth, parametrization
        scale = parametrization.branch_scale(depth) if branch_scale is None else branch_scale
        self.stem = ScaledLinear(d_in, width, "input", bias)
        self.blocks = nn.ModuleList(ResidualBlock(width, scale, act, bias) for _ in range(depth))
        self.head = ScaledLinear(width, d_out, "output", bias)
        parametrization.apply(self, width)

    def forward(self, x: Tensor) -> Tensor:  # x (n, d_in)
        h = self.stem(x)  # (n, width)
        for block in self.blocks:
            h = block(h)  # (n, width), the residual stream
        return self.head(h)  # (n, d_out)
