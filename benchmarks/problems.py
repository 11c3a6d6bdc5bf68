"""The seeded models and data that several benchmarks share (nothing is downloaded).

- :func:`make_problem`: an MLP 784-512-512-10 (ReLU, batch 1024), the :class:`CNN` (batch 256) and
  a one-block transformer (``curvlab.testing``, d_model 64, 4 heads, 32 tokens, batch 64), with
  cross-entropy targets; ``quick`` divides the batches by 8;
- :func:`lm_loss`: next-token cross-entropy for language models;
- :func:`allow_model_libraries`: run before importing transformers, timm or torchvision.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curvlab.testing import TinyTransformer

HERE = Path(__file__).resolve().parent
MODELS = ("mlp", "cnn", "transformer")


class CNN(nn.Module):
    """Two 3x3 convolutions on ``(n, 1, 28, 28)`` images, then a linear head."""

    def __init__(self, c1: int = 16, c2: int = 32, d_out: int = 10) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, c1, 3), nn.Conv2d(c1, c2, 3, stride=2)
        self.head = nn.Linear(c2 * 12 * 12, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (n, 1, 28, 28)
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (n, c2, 12, 12)
        return self.head(h.flatten(1))  # (n, d_out)


def mlp() -> nn.Module:
    """The MLP 784-512-512-10 with ReLU (initialized from the global generator)."""
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def make_problem(name: str, quick: bool, device: torch.device | str = "cpu",
                 n: int | None = None) -> tuple[nn.Module, Any, Any, str]:
    """``(model, inputs, targets, description)`` in float32, eval mode; weights and data are
    seeded. ``n``: the batch size instead of the default."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if name == "mlp":
        n = n or (128 if quick else 1024)
        model, x, text = mlp(), torch.randn(n, 784, generator=gen), "MLP 784-512-512-10 ReLU"
    elif name == "cnn":
        n = n or (32 if quick else 256)
        model, x = CNN(), torch.randn(n, 1, 28, 28, generator=gen)
        text = "CNN conv3x3(16)-conv3x3/2(32)-linear, 1x28x28"
    elif name == "transformer":
        n = n or (8 if quick else 64)
        model = TinyTransformer(d_in=16, d_model=64, heads=4, d_out=10)
        x, text = torch.randn(n, 32, 16, generator=gen), "transformer d=64, 4 heads, T=32"
    else:
        raise ValueError(f"unknown problem {name!r}; expected one of {MODELS}")
    y = torch.randint(0, 10, (n,), generator=gen)
    return model.to(device).eval(), x.to(device), y.to(device), f"{text}, batch {n}"


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t + 1 (labels -100 are ignored)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), ignore_index=-100)


def allow_model_libraries() -> None:
    """Make an installed torchvision importable beside a CPU build of torch (see
    ``tests/torchvision_compat.py``); call it before transformers, timm or torchvision."""
    tests = str(HERE.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import torchvision_compat  # noqa: F401  (declares the missing ops at import)
