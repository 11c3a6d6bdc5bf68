"""The losses of curvlab's own training loops (the sweep, the demo), by name in :data:`LOSSES`.

Both take ``(outputs (n, k), targets (n, k))`` and return the mean over the ``n`` examples, the
convention every operator and measurement of curvlab differentiates (docs/math.md section 1):

- ``mse``: ``mean_i 0.5 ||f_i - y_i||^2``, summed over the ``k`` outputs;
- ``cross_entropy``: ``mean_i -log softmax(f_i)[c_i]`` with ``c_i = argmax_k y_ik``, the class of a
  one-hot (or any) target row.

Example:
    >>> import torch
    >>> from curvlab.losses import cross_entropy, mse
    >>> f, y = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    >>> float(mse(f, y))  # (0.5 * 1 + 0.5 * 4) / 2
    1.25
    >>> round(float(cross_entropy(torch.zeros(3, 4), torch.eye(4)[:3])), 4)  # log 4
    1.3863
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """``mean_i 0.5 ||f_i - y_i||^2`` (summed over outputs), the convention of docs/math.md."""
    return 0.5 * (outputs - targets).pow(2).sum(-1).mean()


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of logits ``out (n, k)`` against one-hot targets ``y (n, k)``."""
    return torch.nn.functional.cross_entropy(out, y.argmax(dim=1))


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": mse, "xent": cross_entropy}
"""The losses a sweep names (``SweepConfig.loss``): ``"mse"`` and ``"xent"`` (cross-entropy)."""
