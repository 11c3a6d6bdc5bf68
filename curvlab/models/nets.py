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

import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.models.parametrizations import SP, Parametrization, ScaledConv2d, ScaledLinear


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
    parametrization's (``sqrt(base_depth / depth)`` for DepthMuP, else 1)."""

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


class ConvNet(nn.Module):
    """``depth`` 3x3 convolutions with ``width`` channels (the first is the input layer), global
    average pooling and a linear head. Shapes: ``(n, in_channels, h, w) -> (n, d_out)``."""

    def __init__(self, width: int, depth: int = 3, parametrization: Parametrization | None = None,
                 *, in_channels: int = 1, d_out: int = 10, act: type[nn.Module] = nn.ReLU,
                 bias: bool = True) -> None:
        parametrization = parametrization or SP()
        _check("ConvNet", width, depth, parametrization, 1)
        super().__init__()
        self.width, self.depth, self.parametrization = width, depth, parametrization
        self.convs = nn.ModuleList(
            ScaledConv2d(in_channels if i == 0 else width, width, "input" if i == 0 else "hidden",
                         bias=bias) for i in range(depth))
        self.head = ScaledLinear(width, d_out, "output", bias)
        self.act = act()
        parametrization.apply(self, width)

    def forward(self, x: Tensor) -> Tensor:  # x (n, c, h, w)
        for conv in self.convs:
            x = self.act(conv(x))  # (n, width, h, w)
        return self.head(x.mean(dim=(2, 3)))  # (n, d_out)


class TransformerBlock(nn.Module):
    """Pre-LN block: causal self-attention (``F.scaled_dot_product_attention`` with the
    parametrization's logit scale) and an MLP (``2 * width``), both residual, branches scaled."""

    def __init__(self, width: int, heads: int, scale: float, attn_scale: float,
                 bias: bool) -> None:
        super().__init__()
        self.heads, self.scale, self.attn_scale = heads, scale, attn_scale
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = ScaledLinear(width, 3 * width, "hidden", bias)
        self.proj = ScaledLinear(width, width, "hidden", bias)
        self.fc1 = ScaledLinear(width, 2 * width, "hidden", bias)
        self.fc2 = ScaledLinear(2 * width, width, "hidden", bias)

    def forward(self, h: Tensor) -> Tensor:  # h (n, T, d)
        n, T, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)  # each (n, T, d)
        q, k, v = (t.view(n, T, self.heads, d // self.heads).transpose(1, 2)
                   for t in (q, k, v))  # each (n, heads, T, d / heads)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           scale=self.attn_scale)  # (n, heads, T, d / heads)
        h = h + self.scale * self.proj(a.transpose(1, 2).reshape(n, T, d))  # (n, T, d)
        return h + self.scale * self.fc2(F.gelu(self.fc1(self.ln2(h))))  # (n, T, d)


class Transformer(nn.Module):
    """A tiny pre-LN transformer on ``(n, T, d_in)``: linear embedding to ``width``, ``depth``
    :class:`TransformerBlock` s, mean pooling over tokens and a linear head. LayerNorm
    gains and biases are vector-like: the parametrization's LR for biases (``m`` under muP with
    SGD)."""

    def __init__(self, width: int, depth: int = 2, parametrization: Parametrization | None = None,
                 *, heads: int = 4, d_in: int = 16, d_out: int = 10, bias: bool = True) -> None:
        parametrization = parametrization or SP()
        _check("Transformer", width, depth, parametrization, 1)
        if width % heads:
            raise ValueError(f"Transformer: width {width} must be divisible by heads {heads}")
        super().__init__()
        self.width, self.depth, self.parametrization = width, depth, parametrization
        scale = parametrization.branch_scale(depth)
        attn = parametrization.attention_scale(width // heads, width)
        self.embed = ScaledLinear(d_in, width, "input", bias)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, scale, attn, bias)
                                    for _ in range(depth))
        self.head = ScaledLinear(width, d_out, "output", bias)
        parametrization.apply(self, width)

    def forward(self, x: Tensor) -> Tensor:  # x (n, T, d_in)
        h = self.embed(x)  # (n, T, width)
        for block in self.blocks:
            h = block(h)  # (n, T, width), the residual stream
        return self.head(h.mean(dim=1))  # (n, d_out)
