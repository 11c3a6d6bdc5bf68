"""Command-line front end (argparse only): ``curvlab demo`` and ``curvlab inspect RUN``.

Example:
    $ curvlab demo --steps 200
    $ curvlab inspect runs/width64.h5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from curvlab.linalg import lanczos
from curvlab.operators import HessianOperator
from curvlab.testing import MLP, mse


def demo(steps: int = 300, lr: float = 0.5, width: int = 64, seed: int = 0) -> list[float]:
    """Train a small tanh MLP on a teacher task with full-batch GD and print its sharpness.

    The sharpness (top Hessian eigenvalue of the mean MSE loss) is computed by Lanczos from exact
    Hessian-vector products, warm-started from the previous top eigenvector, and compared with
    the gradient descent stability threshold ``2 / lr`` (Cohen et al. 2021, arXiv:2103.00065).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(256, 8, generator=g)  # (n, d_in)
    teacher = MLP(8, 16, 2)
    with torch.no_grad():
        y = teacher(x)  # (n, 2)
    model = MLP(8, width, 2)
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


def inspect(path: str) -> str:
    """A run's config, environment and a one-line summary per metric."""
    from curvlab.runs import load_run

    run = load_run(path)
    lines = [f"run {run.path} (schema {run.attrs.get('schema_version')}, curvlab "
             f"{run.attrs.get('curvlab_version')}, created {run.attrs.get('created')})", "config:"]
    lines += [f"  {k} = {json.dumps(v)}" for k, v in sorted(run.config.items())]
    lines += ["env: " + ", ".join(f"{k}={v}" for k, v in sorted(run.env.items())), "metrics:"]
    if not run.metrics:
        lines.append("  (none)")
    for name, m in sorted(run.metrics.items()):
        shape = "x".join(map(str, m.value.shape[1:])) or "scalar"
        span = f"steps {m.step[0]}..{m.step[-1]}" if m.step.size else "no steps"
        last = m.value[-1] if m.value.size else None
        shown = (f"{last:.6g}" if np.ndim(last) == 0 else
                 "[" + ", ".join(f"{v:.4g}" for v in np.ravel(last)[:6])
                 + (", ...]" if np.size(last) > 6 else "]")) if last is not None else "-"
        extra = f", threshold {m.threshold:.6g}" if m.threshold is not None else ""
        lines.append(f"  {name:<28} {shape:<8} {len(m.step):>6} rows, {span}, last {shown}{extra}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="curvlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train a small MLP and print its sharpness")
    p_demo.add_argument("--steps", type=int, default=300)
    p_demo.add_argument("--lr", type=float, default=0.5)
    p_demo.add_argument("--width", type=int, default=64)
    p_demo.add_argument("--seed", type=int, default=0)
    p_inspect = sub.add_parser("inspect", help="print a run file's config and metrics summary")
    p_inspect.add_argument("run", help="path of an HDF5 run file")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.steps, args.lr, args.width, args.seed)
    elif args.command == "inspect":
        try:
            print(inspect(args.run))
        except (FileNotFoundError, ValueError) as err:
            print(f"curvlab inspect: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
