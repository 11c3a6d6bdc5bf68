"""The depth law by the papers' criterion: the maximal-update LR against effective depth.

Claim (Wu, Zhang et al. 2026, arXiv:2602.07494; Zhang et al. 2025, arXiv:2510.04327, AM-muP;
Jelassi, Hanin et al. 2023, arXiv:2305.07810, for the plain ReLU MLP). Under a stabilizing
initialization, the learning rate given by the maximal-update criterion falls with effective
depth as ``eta* ~ L_eff^(-3/2)``. The criterion picks the rate at which the network-wide
arithmetic mean of the one-step change of the representations at initialization reaches a fixed
budget. It holds for plain and residual networks. ``examples/depth_law.py`` selects the LR by
final training loss, which finds SGD's stability edge; this example uses the criterion itself.

Setting:
- The criterion is ``cl.maximal_update_lr``, with the arithmetic mean over the hidden
  representations of the relative one-step change energy ``||df_l||^2 / ||f_l||^2`` along the
  plain GD step (one LR for every parameter), at a budget of ``BUDGET``. Under He init the
  features' size is the same at every layer, so the relative and the raw mean square differ by
  a constant factor. The budget sets only the constant in front of the law
  (``eta* ~ sqrt(budget)``), not its exponent.
- Models, both of width 128, He-initialized (``cl.SP()``, ``sigma = sqrt(2)``):
  - a plain ReLU MLP (``curvlab.models.MLP``) with 4-32 linear layers (effective depth = layers).
    Depths 2 and 3 are left out: there the mean is dominated by the input layer, whose change
    scales with ``d_in / width`` rather than with depth (the first-layer exception of
    Jelassi et al.);
  - a ResNet (``curvlab.models.ResNet``) with 1-32 blocks under the residual-aware He init of
    AM-muP: branch weights ``N(0, 2 / (K fan_in))``, no branch multiplier (effective depth
    ``K + 2``). A branch multiplier of ``1/sqrt(K)`` instead (Depth-muP) would make GD move the
    branches ``K`` times slower and gives a different law.
- Two batches, both from the teacher task with MSE: one example (the theory's setting) and 256
  examples (the training setting).
- ``eta*`` per depth over 8 init seeds. The exponent against ``cl.effective_depth`` is fitted
  with ``cl.fit_exponent`` (95% bootstrap over seeds).
- Stability check: for seed 0 at each depth, 20 full-batch GD steps on the same batch at
  ``eta*`` must not diverge (loss non-finite or 10x its initial value), and the smallest LR on
  the grid ``eta*/8 x 2^(k/2)`` at which they diverge is reported.

Run (from the repository root; a few minutes on a 2-core CPU, seconds with ``--quick``):

    python examples/depth_law_criterion.py [--out docs/reproductions] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import curvlab as cl
from curvlab.sweep import make_dataset
from curvlab.testing import mse

NAME = "depth_law_criterion"
ROOT = Path(__file__).resolve().parents[1]
WIDTH = 128
MODELS = {"mlp": (4, 6, 8, 12, 16, 24, 32), "resnet": (1, 2, 4, 8, 16, 32)}
BATCHES = {"one example": 1, "256 examples": 256}
SEEDS = 8
PAPER = -1.5
BUDGET = 0.0025  # mean relative change energy at eta*: an RMS change of 5% of the features per
# step. The exponent does not depend on it (eta* ~ sqrt(BUDGET)); the stability margin does: at
# 0.01 (10%) GD at eta* diverges for the shallow ResNets on the 256-example batch


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "reproductions",
                   help="folder for the figure and the JSON (default: docs/reproductions)")
    p.add_argument("--quick", action="store_true", help="a small smoke setting (seconds)")
    return p.parse_args(argv)


def build(kind: str, depth: int, seed: int, d_in: int, d_out: int) -> torch.nn.Module:
    """He init; for the ResNet, the residual-aware He init (branch weights scaled by 1/sqrt(K))."""
    torch.manual_seed(seed)
    if kind == "mlp":
        return cl.models.MLP(WIDTH, depth, cl.SP(), d_in=d_in, d_out=d_out)
    model = cl.models.ResNet(WIDTH, depth, cl.SP(), branch_scale=1.0, d_in=d_in, d_out=d_out)
    with torch.no_grad():
        for block in model.blocks:
            block.linear.weight.mul_(1 / math.sqrt(depth))
    return model


def diverges(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], lr: float,
             steps: int = 20) -> bool:
    x, y = data
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with torch.no_grad():
        first = float(mse(model(x), y))
    for _ in range(steps):
        opt.zero_grad()
        loss = mse(model(x), y)
        if not math.isfinite(loss.item()) or loss.item() > 10 * first:
            return True
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(mse(model(x), y))
    return not math.isfinite(final) or final > 10 * first


def divergence_lr(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor],
                  start: float) -> float:
    """The smallest LR on the grid ``start * 2^(k/2)``, ``k >= 0``, at which GD diverges."""
    lr = start
    for _ in range(60):
        if diverges(model, data, lr):
            return lr
        lr *= math.sqrt(2)
    return math.inf


def law(kind: str, depths: tuple[int, ...], seeds: range,
        data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """``eta*`` per (seed, depth), the divergence LR of seed 0, and the fitted exponent."""
    x, y = data
    eff, etas, div, stable = [], [], [], []
    for depth in depths:
        per_seed = [cl.maximal_update_lr(build(kind, depth, seed, x.shape[1], y.shape[1]), mse,
                                         (x, y), budget=BUDGET).lr for seed in seeds]
        model = build(kind, depth, 0, x.shape[1], y.shape[1])
        eff.append(cl.effective_depth(model, x[:1]))
        etas.append(per_seed)
        div.append(divergence_lr(model, (x, y), per_seed[0] / 8))
        stable.append(not diverges(model, (x, y), per_seed[0]))
    values = np.array(etas).T  # (seeds, depths)
    return {"depths": list(depths), "effective_depth": eff,
            "eta_star_per_seed": values.tolist(),
            "eta_star_seed_mean": values.mean(0).tolist(),
            "divergence_lr_seed0": div,
            "stable_at_eta_star_seed0": stable,
            "eta_star_over_divergence_seed0": [float(e / d) for e, d in
                                               zip(values[0], div, strict=True)],
            "exponent": cl.fit_exponent(np.array(eff), values).as_dict()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    seeds = range(2 if args.quick else SEEDS)
    x, y = make_dataset("teacher", 256)
    out: dict[str, Any] = {}
    for batch, n in BATCHES.items():
        out[batch] = {kind: law(kind, depths[:3] if args.quick else depths, seeds,
                                (x[:n], y[:n])) for kind, depths in MODELS.items()}
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, len(res), figsize=(11, 4.2), sharey=True,
                             constrained_layout=True)
    for ax, (batch, models) in zip(axes, res.items(), strict=True):
        for (kind, r), color in zip(models.items(), ("C0", "C3"), strict=True):
            eff, e = np.array(r["effective_depth"]), r["exponent"]
            v = np.array(r["eta_star_per_seed"])
            ax.errorbar(eff, v.mean(0), yerr=v.std(0), fmt="o-", color=color, capsize=2,
                        label=f"{kind}: eta* ~ L^{e['slope']:+.2f} [{e['low']:+.2f}, "
                              f"{e['high']:+.2f}]")
            ax.plot(eff, r["divergence_lr_seed0"], "x:", color=color,
                    label=f"{kind}: GD divergence LR (seed 0)")
            ax.plot(eff, v.mean(0)[0] * (eff / eff[0]) ** PAPER, "--", color=color, lw=0.8,
                    alpha=0.6)
        ax.set(xscale="log", yscale="log", xlabel="effective depth", title=f"batch: {batch}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, frameon=False)
    axes[0].set_ylabel("learning rate")
    fig.suptitle(f"Maximal-update LR (AM budget {BUDGET}) against effective depth; "
                 "dashed: L^-3/2", fontsize=10)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(1)
    start, load_start = time.perf_counter(), os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    plot(res, args.out / f"{NAME}.png")
    assertions = {}
    for batch, models in res.items():
        for kind, r in models.items():
            e = r["exponent"]
            assertions[f"{kind}, {batch}: exponent interval excludes 0"] = bool(
                e["high"] < 0 or e["low"] > 0)
            assertions[f"{kind}, {batch}: exponent interval holds {PAPER}"] = bool(
                e["low"] <= PAPER <= e["high"])
            assertions[f"{kind}, {batch}: criterion LR below the divergence LR at every "
                       "depth"] = bool(all(r["stable_at_eta_star_seed0"]) and all(
                           q < 1 for q in r["eta_star_over_divergence_seed0"]))
    summary = {
        "name": NAME,
        "papers": "Wu, Zhang et al. 2026, arXiv:2602.07494; Zhang et al. 2025, "
                  "arXiv:2510.04327; Jelassi et al. 2023, arXiv:2305.07810",
        "paper_exponent": PAPER,
        "criterion": "cl.maximal_update_lr: eta* = sqrt(B / mean_l s_l), s_l = ||J_l u||^2 / "
                     f"||f_l||^2 along the GD step u, hidden representations, B = {BUDGET}",
        "quick": args.quick,
        "settings": {"width": WIDTH, "models": MODELS, "batches": BATCHES,
                     "seeds": len(range(2 if args.quick else SEEDS)),
                     "init": "cl.SP() (He, sigma sqrt 2); ResNet branch weights scaled by "
                             "1/sqrt(K), branch multiplier 1",
                     "data": "teacher, MSE",
                     "divergence": "20 GD steps on the same batch, loss non-finite or > 10x "
                                   "initial; grid eta*/8 x 2^(k/2)"},
        "batches": res,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "assertions": assertions,
        "passed": all(assertions.values()),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }
    (args.out / f"{NAME}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{NAME}: {summary['papers']} (wall time {summary['wall_time_s']} s)")
    for batch, models in res.items():
        for kind, r in models.items():
            e = r["exponent"]
            print(f"  {kind}, {batch}: eta* ~ L_eff^{e['slope']:+.3f} [{e['low']:+.3f}, "
                  f"{e['high']:+.3f}] (paper {PAPER}); eta*/divergence "
                  f"{[round(q, 3) for q in r['eta_star_over_divergence_seed0']]}")
    for name, ok in assertions.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    return summary


if __name__ == "__main__":
    main()
