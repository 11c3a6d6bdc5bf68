"""Dense references and a small model zoo, public so users can test their own estimators.

The references differentiate the same weighted mean loss as the operators, by plain double
backward (``torch.autograd.functional``, one backward per row). They deliberately avoid
``torch.func.hessian`` and ``jacrev``: in torch 2.13 the forward-mode derivative of a vmapped vjp
through ``layer_norm`` is wrong, which makes both of them wrong on models with LayerNorm.

``mse`` (the loss of the zoo's regression cases) is :func:`curvlab.losses.mse`, re-exported here.

Example:
    >>> import curvlab as cl
    >>> case = cl.testing.make_case("mlp_tanh")
    >>> H = cl.testing.dense_hessian(case.model, case.loss_fn, case.data)
    >>> H.shape[0] == sum(p.numel() for p in case.model.parameters())
    True
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlab.batches import Output, Weights, as_batches, batch_weight, call_args, pick_output
from curvlab.losses import mse
from curvlab.operators import select_params


def _forward(model: nn.Module, params: dict[str, Tensor], x: Any, output: Output) -> Any:
    args, kwargs = call_args(x)
    return pick_output(functional_call(model, params, args, kwargs), output)


def _flat_loss(model: nn.Module, loss_fn: Callable, data: Any, params: Iterable[str] | None,
               output: Output = "auto", weights: Weights = None
               ) -> tuple[Callable[[Tensor], Tensor], Tensor, list[tuple[Any, Any]], list[float]]:
    chosen = select_params(model, params, "dense reference")
    names, shapes = list(chosen), [p.shape for p in chosen.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in chosen.values()])  # (P,)
    batches = list(as_batches(data, "dense reference")[0])
    sizes = [batch_weight(weights, x, y, i, "dense reference") for i, (x, y) in enumerate(batches)]

    def unflat(t: Tensor) -> dict[str, Tensor]:
        pieces = torch.split(t, [s.numel() for s in shapes])
        return {n: x.view(s) for n, x, s in zip(names, pieces, shapes, strict=True)}

    def mean_loss(t: Tensor) -> Tensor:
        total = sum(n * loss_fn(_forward(model, unflat(t), x, output), y)
                    for n, (x, y) in zip(sizes, batches, strict=True) if n > 0)
        return total / sum(sizes)

    return mean_loss, theta, batches, sizes


def dense_hessian(model: nn.Module, loss_fn: Callable, data: Any,
                  params: Iterable[str] | None = None, *, output: Output = "auto",
                  weights: Weights = None) -> Tensor:
    """The dense Hessian ``(P, P)`` of the weighted mean loss over ``data`` (weights, output and
    batches as in :class:`~curvlab.HessianOperator`)."""
    mean_loss, theta, _, _ = _flat_loss(model, loss_fn, data, params, output, weights)
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(mean_loss, theta)  # (P, P)


def dense_ggn(model: nn.Module, loss_fn: Callable, data: Any,
              params: Iterable[str] | None = None, *, output: Output = "auto",
              weights: Weights = None) -> Tensor:
    """The dense Gauss-Newton matrix ``sum_b (n_b / N) J_b^T H_b J_b``, ``(P, P)``.

    ``J_b`` is the Jacobian of the flattened outputs of batch ``b`` and ``H_b`` the Hessian of its
    batch-mean loss with respect to those outputs, both by explicit (non-vectorized) autograd.
    """
    chosen = select_params(model, params, "dense_ggn")
    _, theta, batches, sizes = _flat_loss(model, loss_fn, data, params, output, weights)
    names, shapes = list(chosen), [p.shape for p in chosen.values()]
    G = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)  # (P, P)
    total = 0.0
    for (x, y), n in zip(batches, sizes, strict=True):
        if n == 0:
            continue

        def outputs(t: Tensor, x: Any = x) -> Tensor:
            pieces = torch.split(t, [s.numel() for s in shapes])
            params_ = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
            return _forward(model, params_, x, output).reshape(-1)  # (n k,)

        with sdpa_kernel(SDPBackend.MATH):
            J = torch.autograd.functional.jacobian(outputs, theta)  # (n k, P)
            f = outputs(theta).detach()  # (n k,)
        with torch.no_grad():
            shape = _forward(model, dict(model.named_parameters()), x, output).shape  # (n, k)
        Hf = torch.autograd.functional.hessian(
            lambda g, y=y, shape=shape: loss_fn(g.view(shape), y), f)  # (n k, n k)
        G += n * (J.T @ Hf @ J)
        total += n
    return G / total


def dense_jacobian(model: nn.Module, x: Any, params: Iterable[str] | None = None, *,
                   output: Output = "auto") -> Tensor:
    """The Jacobian ``(n, k, P)`` of the outputs on batch ``x`` by explicit autograd (eval mode);
    outputs with more than two dimensions are flattened to ``(n, k)``, as the NTK does."""
    chosen = select_params(model, params, "dense_jacobian")
    names, shapes = list(chosen), [p.shape for p in chosen.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in chosen.values()])  # (P,)

    def outputs(t: Tensor) -> Tensor:
        pieces = torch.split(t, [s.numel() for s in shapes])
        params_ = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        f = _forward(model, params_, x, output)  # (n, ...)
        return f.reshape(f.shape[0], -1)  # (n, k)

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.jacobian(outputs, theta)  # (n, k, P)


# ----------------------------------------------------------------------------- model zoo


class MLP(nn.Sequential):
    """``d_in -> width -> ... -> width -> d_out``: ``depth`` hidden layers, each one then ``act``.

    Module ``2 * (depth - 1)`` is the last hidden layer (its output the last hidden
    pre-activation); the head is module ``2 * depth``.
    """

    def __init__(self, d_in: int = 6, width: int = 10, d_out: int = 3, act: type = nn.Tanh, *,
                 depth: int = 2, bias: bool = True):
        widths = [d_in] + [width] * depth
        hidden = [m for a, b in itertools.pairwise(widths) for m in (nn.Linear(a, b, bias), act())]
        super().__init__(*hidden, nn.Linear(width, d_out, bias))


class SmallCNN(nn.Module):
    """Two 3x3 convolutions on ``(n, 1, 8, 8)`` images, then a linear head to ``d_out``."""

    def __init__(self, channels: int = 4, d_out: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2)
        self.head = nn.Linear(channels * 2 * 2, d_out)

    def forward(self, x: Tensor) -> Tensor:  # x (n, 1, 8, 8)
        h = torch.relu(self.conv1(x))  # (n, c, 6, 6)
        h = torch.tanh(self.conv2(h))  # (n, c, 2, 2)
        return self.head(h.flatten(1))  # (n, d_out)


class TransformerBlock(nn.Module):
    """A pre-LayerNorm block: causal self-attention via ``F.scaled_dot_product_attention`` and an
    MLP of width ``mlp_ratio * d_model`` (GPT-2 uses 4), both residual. Acts on the residual
    stream ``(n, T, d_model)``."""

    def __init__(self, d_model: int = 8, heads: int = 2, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, h: Tensor) -> Tensor:  # h (n, T, d)
        n, T, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)  # each (n, T, d)
        q, k, v = (t.view(n, T, self.heads, d // self.heads).transpose(1, 2)
                   for t in (q, k, v))  # each (n, heads, T, d / heads)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (n, heads, T, d / heads)
        h = h + self.proj(a.transpose(1, 2).reshape(n, T, d))  # (n, T, d)
        return h + self.mlp(self.ln2(h))  # (n, T, d)


class TinyTransformer(nn.Module):
    """A linear embedding, ``depth`` :class:`TransformerBlock` s, mean pooling over tokens and a
    linear head. Inputs ``(n, T, d_in)``."""

    def __init__(self, d_in: int = 4, d_model: int = 8, heads: int = 2, d_out: int = 3,
                 depth: int = 1):
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, heads) for _ in range(depth))
        self.head = nn.Linear(d_model, d_out)

    def forward(self, x: Tensor) -> Tensor:  # x (n, T, d_in)
        h = self.embed(x)  # (n, T, d)
        for block in self.blocks:
            h = block(h)  # (n, T, d), the residual stream
        return self.head(h.mean(dim=1))  # (n, d_out)


class BatchNormMLP(nn.Sequential):
    """Linear -> BatchNorm1d -> tanh -> Linear; the zoo uses it in eval mode."""

    def __init__(self, d_in: int = 6, width: int = 10, d_out: int = 3):
        super().__init__(nn.Linear(d_in, width), nn.BatchNorm1d(width), nn.Tanh(),
                         nn.Linear(width, d_out))


class DropoutMLP(nn.Sequential):
    """An MLP with Dropout, for train-mode checks."""

    def __init__(self, d_in: int = 6, width: int = 10, d_out: int = 3, p: float = 0.3):
        super().__init__(nn.Linear(d_in, width), nn.Tanh(), nn.Dropout(p), nn.Linear(width, d_out))


class SharedLayer(nn.Module):
    """Applies one hidden layer twice (shared weights)."""

    def __init__(self, d_in: int = 6, width: int = 8, d_out: int = 3):
        super().__init__()
        self.inp, self.hidden, self.out = (nn.Linear(d_in, width), nn.Linear(width, width),
                                           nn.Linear(width, d_out))

    def forward(self, x: Tensor) -> Tensor:  # x (n, d_in)
        h = torch.tanh(self.inp(x))  # (n, width)
        h = torch.tanh(self.hidden(h))  # (n, width)
        h = torch.tanh(self.hidden(h))  # (n, width), the same weights again
        return self.out(h)  # (n, d_out)


class DictInput(nn.Module):
    """Takes the inputs ``{"x": (n, d_x), "z": (n, d_z)}`` as keyword arguments; mixes both."""

    def __init__(self, d_x: int = 5, d_z: int = 3, width: int = 8, d_out: int = 2):
        super().__init__()
        self.fx, self.fz = nn.Linear(d_x, width), nn.Linear(d_z, width)
        self.out = nn.Linear(width, d_out)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:  # called as model(**{"x": ..., "z": ...})
        h = torch.tanh(self.fx(x)) * torch.sigmoid(self.fz(z))  # (n, width)
        return self.out(h)  # (n, d_out)


def log_cosh(outputs: Tensor, targets: Tensor) -> Tensor:
    """A custom smooth robust loss, ``mean_i sum_k log cosh(f_ik - y_ik)``."""
    return torch.log(torch.cosh(outputs - targets)).sum(-1).mean()


@dataclass(frozen=True)
class Case:
    """A zoo entry: a model (in eval mode), its loss, and data (one batch or a list of batches)."""

    name: str
    model: nn.Module
    loss_fn: Callable[[Any, Any], Tensor]
    data: Any


CASES = ("mlp_tanh", "mlp_relu", "cnn", "transformer", "batchnorm", "shared", "dict_input",
         "multibatch")


def make_case(name: str, *, dtype: torch.dtype = torch.float64, seed: int = 0) -> Case:
    """Build zoo case ``name`` (one of :data:`CASES`, or ``"dropout"``) with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module initializers draw from the global generator

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    def labels(n: int, k: int = 3) -> Tensor:
        return torch.randint(0, k, (n,), generator=g)

    model: nn.Module
    loss_fn: Callable[[Any, Any], Tensor]
    if name in ("mlp_tanh", "multibatch"):
        model, loss_fn = MLP(), mse
        data: Any = (randn(12, 6), randn(12, 3))
        if name == "multibatch":
            data = [(randn(n, 6), randn(n, 3)) for n in (7, 3, 12)]
    elif name == "mlp_relu":
        model, loss_fn, data = MLP(act=nn.ReLU), F.cross_entropy, (randn(12, 6), labels(12))
    elif name == "cnn":
        model, loss_fn, data = SmallCNN(), F.cross_entropy, (randn(10, 1, 8, 8), labels(10))
    elif name == "transformer":
        model, loss_fn, data = TinyTransformer(), F.cross_entropy, (randn(6, 5, 4), labels(6))
    elif name == "batchnorm":
        model, loss_fn, data = BatchNormMLP(), mse, (randn(12, 6), randn(12, 3))
        with torch.no_grad():  # give the running statistics non-trivial values
            model.to(dtype)(randn(32, 6) * 2 + 1)
    elif name == "shared":
        model, loss_fn, data = SharedLayer(), mse, (randn(12, 6), randn(12, 3))
    elif name == "dict_input":
        model, loss_fn = DictInput(), log_cosh
        data = ({"x": randn(12, 5), "z": randn(12, 3)}, randn(12, 2))
    elif name == "dropout":
        model, loss_fn, data = DropoutMLP(), mse, (randn(12, 6), randn(12, 3))
    else:
        raise ValueError(f"make_case: unknown case {name!r}; choose from {(*CASES, 'dropout')}")
    model = model.to(dtype).eval()
    return Case(name, model, loss_fn, data)
