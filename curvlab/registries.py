"""The registries a sweep names things from: models, data sets, parametrizations, optimizers.

Each registry maps a name to a builder; adding an entry adds a choice to ``curvlab sweep`` (its
flags and help text are built from these, see ``curvlab.cli``) and to
:class:`~curvlab.sweep.SweepConfig`.
Nothing is downloaded: the data sets are generated or ship with a package.

Example:
    >>> x, y = make_dataset("teacher", 8)
    >>> x.shape, y.shape
    (torch.Size([8, 16]), torch.Size([8, 4]))
    >>> type(parametrization("interp:0.5", 64, 1.0)).__name__
    'Interpolated'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvlab import models
from curvlab.models import Parametrization

TOKENS = 4  # a transformer's inputs (n, d) are TOKENS tokens (n, TOKENS, d / TOKENS)


class _Shaped(torch.nn.Module):
    """Feeds flat inputs ``(n, d)`` to an inner model as ``(n, *shape)``; keeps its ``width``,
    ``depth`` and ``parametrization``."""

    def __init__(self, inner: torch.nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.inner, self.shape = inner, shape
        self.width, self.depth = inner.width, inner.depth
        self.parametrization = inner.parametrization

    def forward(self, x: Tensor) -> Tensor:  # x (n, d)
        return self.inner(x.reshape(len(x), *self.shape))  # (n, d_out)


def _convnet(width: int, depth: int, p: Parametrization, d_in: int, d_out: int) -> _Shaped:
    side = math.isqrt(d_in)
    if side * side != d_in:
        raise ValueError(f"build_model: model 'convnet' needs square images; inputs have {d_in} "
                         "features")
    return _Shaped(models.ConvNet(width, depth, p, in_channels=1, d_out=d_out), (1, side, side))


def _transformer(width: int, depth: int, p: Parametrization, d_in: int, d_out: int) -> _Shaped:
    if d_in % TOKENS:
        raise ValueError(f"build_model: model 'transformer' splits inputs into {TOKENS} tokens; "
                         f"{d_in} features do not divide")
    return _Shaped(models.Transformer(width, depth, p, d_in=d_in // TOKENS, d_out=d_out),
                   (TOKENS, d_in // TOKENS))


ModelBuilder = Callable[[int, int, Parametrization, int, int], torch.nn.Module]
MODELS: dict[str, ModelBuilder] = {
    "mlp": lambda width, depth, p, d_in, d_out: models.MLP(width, depth, p, d_in=d_in,
                                                           d_out=d_out),
    "resnet": lambda width, depth, p, d_in, d_out: models.ResNet(width, depth, p, d_in=d_in,
                                                                 d_out=d_out),
    "convnet": _convnet,
    "transformer": _transformer,
}
"""``name -> builder(width, depth, parametrization, d_in, d_out)`` of a module mapping flat
inputs ``(n, d_in)`` to ``(n, d_out)`` with attributes ``width``, ``depth``, ``parametrization``."""


def _teacher(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 16, generator=g)  # (n, 16)
    w1 = torch.randn(16, 32, generator=g) / 4  # (16, 32)
    w2 = torch.randn(32, 4, generator=g) / math.sqrt(32)  # (32, 4)
    return x, torch.tanh(x @ w1) @ w2 * 2  # (n, 4)


def _mixture(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    centers = torch.randn(4, 16, generator=g) * 1.5  # (4 classes, 16)
    labels = torch.randint(0, 4, (n,), generator=g)
    x = centers[labels] + torch.randn(n, 16, generator=g)  # (n, 16)
    return x, torch.nn.functional.one_hot(labels, 4).float()


def _digits(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("make_dataset: dataset 'digits' needs scikit-learn (pip install "
                         "scikit-learn); or use 'teacher', 'mixture' or an .npz") from None
    data = load_digits()
    idx = torch.randperm(len(data.target), generator=g)[:n]
    x = torch.tensor(data.data, dtype=torch.float32)[idx] / 16.0  # (n, 64)
    return x, torch.nn.functional.one_hot(torch.tensor(data.target)[idx], 10).float()


DatasetBuilder = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
DATASETS: dict[str, DatasetBuilder] = {"teacher": _teacher, "mixture": _mixture,
                                       "digits": _digits}
"""``name -> builder(n, generator)`` of float32 ``(x (n, d), y (n, k))``; besides these, a
sweep's dataset may be a path to an ``.npz`` file."""

PARAMETRIZATIONS: dict[str, Callable[[int, float, int], Parametrization]] = {
    "mup": lambda base_width, sigma, base_depth: models.MuP(base_width, sigma),
    "ntp": lambda base_width, sigma, base_depth: models.NTP(sigma=sigma),
    "sp": lambda base_width, sigma, base_depth: models.SP(sigma=sigma),
    "depth-mup": lambda base_width, sigma, base_depth: models.DepthMuP(base_width, sigma,
                                                                       base_depth=base_depth),
}
"""``name -> builder(base_width, sigma, base_depth)``; besides these, ``"interp:S"`` names
``cl.interpolated(S)`` for ``S`` in ``[0, 1]``."""

OPTIMIZERS = ("sgd", "adam")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

def lookup(registry: Mapping[str, Any], kind: str, name: str, call: str, more: str = "") -> Any:
    """``registry[name]``, or a ValueError from ``call`` naming the choices (and ``more``)."""
    if name not in registry:
        raise ValueError(f"{call}: unknown {kind} {name!r}; choose from {tuple(registry)}{more}")
    return registry[name]


def make_dataset(name: str, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(x (n, d), y (n, k))`` float32: :data:`DATASETS` ``[name]`` or an ``.npz`` file."""
    if not name.endswith(".npz"):
        builder = lookup(DATASETS, "dataset", name, "make_dataset",
                          " or give a path to an .npz file")
        return builder(n, torch.Generator().manual_seed(seed))
    path = Path(name)
    if not path.exists():
        raise ValueError(f"make_dataset: dataset file {path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        if "x" not in f or "y" not in f:
            raise ValueError(f"make_dataset: {path} must hold arrays 'x' and 'y'")
        x, y = torch.tensor(f["x"], dtype=torch.float32), torch.tensor(f["y"])
    if y.ndim == 1:
        y = torch.nn.functional.one_hot(y.long()).float()
    return x.reshape(len(x), -1)[:n], y.float()[:n]


def interp_strength(name: str) -> float | None:
    """``S`` of ``"interp:S"`` when it is a number in ``[0, 1]``, else ``None``."""
    head, _, tail = name.partition(":")
    if head != "interp":
        return None
    try:
        s = float(tail)
    except ValueError:
        return None
    return s if 0.0 <= s <= 1.0 else None


def parametrization(name: str, base_width: int, sigma: float, base_depth: int = 1
                    ) -> Parametrization:
    """The parametrization a sweep names: :data:`PARAMETRIZATIONS` ``[name]`` (``"depth-mup"``
    relative to ``base_depth``, the sweep's smallest depth) or ``"interp:S"``
    (``cl.interpolated(S)``, NTP at 0 and muP at 1)."""
    s = interp_strength(name)
    if s is not None:
        return models.interpolated(s, base_width, sigma)
    builder = lookup(PARAMETRIZATIONS, "parametrization", name, "parametrization",
                      " or 'interp:S' with S in [0, 1]")
    return builder(base_width, sigma, base_depth)
