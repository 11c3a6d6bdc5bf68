"""``curvlab demo``: progressive sharpening of a small tanh MLP under full-batch gradient descent.

The task: ``x ~ N(0, I)`` with ``256`` examples of ``8`` features and targets ``y = g(x)`` of a
random teacher network ``g`` (8 -> 16 -> 16 -> 2, tanh). The student is the same architecture at
``width``, with PyTorch's default ``nn.Linear`` init, trained by ``torch.optim.SGD`` at ``lr`` on
the mean MSE ``0.5 ||f - y||^2`` (:func:`curvlab.losses.mse`).

At steps ``0, s, 2 s, ...`` (``s = max(steps // 6, 1)``) it prints the loss and the sharpness,
the top Hessian eigenvalue of the loss, computed by Lanczos from exact Hessian-vector products
(:class:`~curvlab.HessianOperator`) warm-started from the previous top eigenvector, against the
stability threshold of gradient descent ``2 / lr`` (Cohen et al. 2021, arXiv:2103.00065).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from curvlab.linalg import lanczos
from curvlab.losses import mse
from curvlab.operators import HessianOperator


def tanh_mlp(d_in: int, width: int, d_out: int) -> nn.Sequential:
    """``d_in -> width -> width -> d_out`` with tanh after each hidden layer (default init)."""
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, d_out))


def demo(steps: int = 300, lr: float = 0.5, width: int = 64, seed: int = 0) -> list[float]:
    """Train the student (see the module docstring), print its loss and sharpness and return the
    sharpness at each printed step."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(256, 8, generator=g)  # (n, d_in)
    teacher = tanh_mlp(8, 16, 2)
    with torch.no_grad():
        y = teacher(x)  # (n, 2)
    model = tanh_mlp(8, width, 2)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    print(f"full-batch GD on a {sum(p.numel() for p in model.parameters())}-parameter tanh MLP, "
          f"lr={lr}, stability threshold 2/lr = {2 / lr:.1f}")
    print(f"{'step':>6} {'loss':>10} {'sharpness':>10} {'products':>9} {'seconds':>8}")
    history: list[float] = []
    v0 = None
    for step in range(steps + 1):
        if step % max(steps // 6, 1) == 0:
            start = time.perf_counter()
            H = HessianOperator(model, mse, (x, y))
            result = lanczos(H, 1, tol=1e-4, v0=v0, generator=torch.Generator().manual_seed(seed))
            top, v0 = float(result.eigenvalues[0]), result.eigenvectors
            history.append(top)
            print(f"{step:>6} {mse(model(x), y).item():>10.5f} {top:>10.3f} {H.num_matvecs:>9} "
                  f"{time.perf_counter() - start:>8.2f}")
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    return history
