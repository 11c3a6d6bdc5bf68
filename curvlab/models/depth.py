"""Effective depth of a network and depth transfer of the learning rate (docs/math.md section 7).

``effective_depth`` traces one forward with ``torch.fx`` (``make_fx``: an ATen-level graph, so
any Python control flow and shape arithmetic are fine) and returns the length of the shortest
path from the input to the output, where (Wu et al. 2026, arXiv:2602.07494, convention as stated
in docs/math.md section 7):

- a matrix product or convolution of data with a parameter (a linear or conv layer; each
  projection of an attention block) counts 1;
- an addition of two data tensors (a residual addition) counts 1;
- everything else counts 0: activations, norms (their scale and shift are element-wise), bias
  additions, scalar multipliers, reshapes, attention's data-data products, pooling.

So an MLP with L linear layers has depth L; a ResNet with K identity-shortcut blocks has K + 2
(each block's shortest path is its shortcut plus the addition; the stem and the head count); a
pre-LN transformer has 2 per block (two residual additions) plus the embedding and the head.

Example:
    >>> import torch, curvlab as cl
    >>> cl.effective_depth(cl.models.MLP(32, depth=4), torch.randn(2, 16))
    4
    >>> cl.transfer_lr(0.1, from_depth=4, to_depth=16)   # (16 / 4)^(-3/2) = 1/8
    0.0125
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten
_PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.convolution.default,
             aten.matmul.default, aten.linear.default, aten._convolution.default}
_ADDS = {aten.add.Tensor, aten.add_.Tensor, operator.add}


def _packet(target: Any) -> Any:
    return getattr(target, "default", target)


def effective_depth(model: nn.Module, example_input: Any) -> int:
    """Shortest input-to-output path counting parametrized products and residual additions.

    Args:
        model: any module; traced in eval mode with its current parameters (nothing changes).
        example_input: one input batch (a tensor), e.g. ``x[:2]``.
    """
    call = "effective_depth"
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"{call}: example_input must be a tensor, got "
                        f"{type(example_input).__name__}")
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
        return functional_call(model, {**p, **buffers}, (x,))

    training = model.training
    try:
        model.eval()
        graph = make_fx(forward)(params, example_input).graph
    finally:
        model.train(training)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    data_input = placeholders[-1]  # after the flattened parameter dict
    kind: dict[Any, str] = {}  # node -> "data" | "param" | "const"
    dist: dict[Any, float] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            kind[node] = "data" if node is data_input else "param"
            dist[node] = 0.0 if node is data_input else math.inf
            continue
        inputs = [a for a in node.all_input_nodes]
        data = [a for a in inputs if kind.get(a) == "data"]
        if not data:
            kind[node] = "param" if any(kind.get(a) == "param" for a in inputs) else "const"
            dist[node] = math.inf
            continue
        kind[node] = "data"
        target = _packet(node.target)
        has_param = any(kind.get(a) == "param" for a in inputs)
        weight = 1 if (target in _PRODUCTS and has_param) or (target in _ADDS and
                                                              len(data) >= 2) else 0
        dist[node] = weight + min(dist[a] for a in data)
    outputs = [n for n in graph.nodes if n.op == "output"]
    ends = [a for a in outputs[0].all_input_nodes if kind.get(a) == "data"]
    if not ends:
        raise ValueError(f"{call}: the output does not depend on the input")
    depth = min(dist[a] for a in ends)
    return int(depth)


def transfer_lr(lr: float, from_depth: int, to_depth: int) -> float:
    """``lr * (to_depth / from_depth)^(-3/2)``: the optimal SGD LR's depth scaling under the
    stabilizing init of Wu et al. 2026 (arXiv:2602.07494), depths as :func:`effective_depth`."""
    for name, value in (("from_depth", from_depth), ("to_depth", to_depth)):
        if not value > 0:
            raise ValueError(f"transfer_lr: {name} must be positive, got {value}")
    if not lr > 0:
        raise ValueError(f"transfer_lr: lr must be positive, got {lr}")
    return lr * (to_depth / from_depth) ** -1.5
