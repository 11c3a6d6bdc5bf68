"""Depth scaling of the optimal learning rate against effective depth.

Claim (Wu, Zhang, Ma, Bian, Zhang, Chen & Lin 2026, "Hyperparameter Transfer Laws for
Non-Recurrent Multi-Path Neural Networks", arXiv:2602.07494): under a stabilizing initialization
and a maximal-update criterion, the optimal SGD learning rate falls with the effective depth
(the shortest input-to-output path, counting layers and residual additions) as
``eta* ~ L_eff^(-3/2)``; ``cl.transfer_lr`` implements that rule.

What this example measures (no threshold on the exponent; see docs/reproductions.md#depth_law):

- Residual MLPs ``cl.models.ResNet`` of width 64 with K = 2, 4, 8, 16, 32 blocks (one ReLU and one
  linear layer per branch), effective depth from ``cl.effective_depth`` (K + 2), on the sweep's
  generated teacher task (``curvlab.sweep.make_dataset("teacher", 4096)``, 16 inputs, 4 outputs,
  MSE), float32.
- Two initializations: "stabilizing" (He fan-in init everywhere, then the branch weights scaled
  by ``1/sqrt(K)``, i.e. branch variance ``2/(K n)``, trained by plain SGD: our reading of the
  paper's residual-aware init) and ``cl.DepthMuP`` (branch multiplier ``1/sqrt(K)``, the same
  function at init, but SGD then moves the branches ``K`` times slower).
- One epoch of mini-batch SGD (batch 32, 128 steps, shuffled without replacement, the order
  seeded), on an LR grid of factor ``sqrt(2)``; the best LR per (depth, seed) is the one with the
  lowest training loss on all 4096 examples after the epoch (a run whose loss is not finite or
  above its initial loss counts as diverged; LRs above the first diverged one are skipped).
- The fit ``log(best LR) = a + b log(L_eff)`` by least squares over every (depth, seed) point, and
  a bootstrap interval for ``b`` over seeds (resample seeds with replacement, refit, 2.5-97.5%).
- A cross-check with curvlab's own sweep (``curvlab.sweep.run_sweep``, which is what
  ``curvlab sweep --model resnet --depths 2,4,8,16 --lr ... --batch-size 32`` runs): it has no
  stabilizing init (SP, branch scale 1, ``sigma = 1``), so it shows how far that setting is from
  the paper's.

Command (about 2 minutes on 2 idle CPU cores)::

    python examples/depth_law.py             # writes docs/reproductions/depth_law.{png,json}
    python examples/depth_law.py --quick     # smoke setting, a few seconds
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import curvlab as cl
from curvlab.sweep import SweepConfig, make_dataset, run_sweep

NAME = "depth_law"
ROOT = Path(__file__).resolve().parents[1]
INITS = {"stabilizing": "stabilizing init (branch var 2/(K n))",
         "depth_mup": "cl.DepthMuP (branch multiplier 1/sqrt(K))"}
PAPER_EXPONENT = -1.5
N_BOOT = 2000


def build(init: str, blocks: int, width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if init == "depth_mup":
        return cl.models.ResNet(width, blocks, cl.DepthMuP(base_width=width, base_depth=1),
                                d_in=16, d_out=4)
    model = cl.models.ResNet(width, blocks, cl.SP(), branch_scale=1.0, d_in=16, d_out=4)
    with torch.no_grad():  # residual-aware He init: branch weights N(0, 2 / (K n))
        for block in model.blocks:
            block.linear.weight.mul_(1.0 / math.sqrt(blocks))
    return model


def train_loss(init: str, blocks: int, width: int, lr: float, seed: int,
               data: tuple[torch.Tensor, torch.Tensor], batch_size: int, epochs: int) -> float:
    """Training loss on the whole set after ``epochs`` of mini-batch SGD; inf if diverged."""
    x, y = data
    model = build(init, blocks, width, seed)
    opt = model.parametrization.optimizer(model, "sgd", lr)
    with torch.no_grad():
        initial = float(cl.testing.mse(model(x), y))
    g = torch.Generator().manual_seed(1000 + seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = cl.testing.mse(model(x[idx]), y[idx])  # x[idx] (b, 16) -> (b, 4)
            if not torch.isfinite(loss):
                return math.inf
            loss.backward()
            opt.step()
    with torch.no_grad():
        final = float(cl.testing.mse(model(x), y))
    return final if math.isfinite(final) and final < initial else math.inf


def fit(depths: np.ndarray, lrs: np.ndarray) -> tuple[float, float]:
    """(b, a) of log(lr) = a + b log(depth), least squares."""
    b, a = np.polyfit(np.log(depths), np.log(lrs), 1)
    return float(b), float(a)


def bootstrap(eff: np.ndarray, best: np.ndarray, seed: int = 0) -> list[float]:
    """2.5-97.5% interval of the slope, resampling seeds (rows of ``best``) with replacement."""
    rng = np.random.default_rng(seed)
    n = best.shape[0]
    slopes = []
    for _ in range(N_BOOT):
        rows = rng.integers(0, n, n)
        slopes.append(fit(np.tile(eff, n), best[rows].reshape(-1))[0])
    lo, hi = np.percentile(slopes, [2.5, 97.5])
    return [float(lo), float(hi)]


def lr_sweep(init: str, blocks_list: list[int], seeds: list[int], grid: np.ndarray, width: int,
             data: tuple[torch.Tensor, torch.Tensor], batch_size: int, epochs: int) -> dict:
    losses = np.full((len(seeds), len(blocks_list), len(grid)), math.inf)  # (seed, depth, lr)
    for s, seed in enumerate(seeds):
        for d, blocks in enumerate(blocks_list):
            for k, lr in enumerate(grid):
                losses[s, d, k] = train_loss(init, blocks, width, float(lr), seed, data,
                                             batch_size, epochs)
                if not math.isfinite(losses[s, d, k]):
                    break  # larger LRs diverge too
    best_idx = losses.argmin(axis=2)  # (seed, depth)
    best = grid[best_idx]
    at_edge = int(np.sum(best_idx == len(grid) - 1) + np.sum(best_idx == 0))
    eff = np.array([cl.effective_depth(build(init, b, width, 0), data[0][:2])
                    for b in blocks_list], dtype=float)
    # the best LR is "at the stability edge" when the next grid LR diverged
    nxt = np.minimum(best_idx + 1, len(grid) - 1)
    edge = np.take_along_axis(losses, nxt[..., None], axis=2)[..., 0]
    b, a = fit(np.tile(eff, len(seeds)), best.reshape(-1))
    return {"effective_depths": eff.tolist(), "best_lr": best.tolist(),
            "best_lr_geomean": np.exp(np.log(best).mean(0)).tolist(),
            "final_loss": np.where(np.isfinite(losses), losses, np.nan).tolist(),
            "exponent": b, "intercept": a, "exponent_ci95": bootstrap(eff, best),
            "best_next_to_divergence_fraction": float(np.mean(~np.isfinite(edge))),
            "best_at_grid_end": at_edge}


def sweep_check(blocks_list: list[int], grid: list[float], width: int, steps: int,
                batch_size: int, n: int, seed: int) -> dict:
    """The same question asked of ``curvlab.sweep.run_sweep`` (its only ResNet init: SP,
    branch scale 1); loss = last logged probe loss (first 256 training examples)."""
    cfg = SweepConfig(model="resnet", widths=(width,), depths=tuple(blocks_list),
                      parametrizations=("sp",), lrs=tuple(grid), steps=steps,
                      batch_size=batch_size, n=n, seeds=(seed,), every=steps + 1,
                      probe_size=256)
    with tempfile.TemporaryDirectory() as tmp:
        paths = run_sweep(cfg, Path(tmp), progress=False)
        final: dict[int, dict[float, float]] = {b: {} for b in blocks_list}
        for p in paths:
            run = cl.load_run(p)
            loss = run.metrics["loss"].value
            last = float(loss[-1])
            ok = "diverged" not in run.metrics and math.isfinite(last) and last < float(loss[0])
            final[int(run.config["depth"])][float(run.config["lr"])] = last if ok else math.inf
    x = make_dataset("teacher", n)[0]
    best, eff = [], []
    for b in blocks_list:
        lr_best = min(final[b], key=lambda lr: final[b][lr])
        best.append(lr_best if math.isfinite(final[b][lr_best]) else math.nan)
        model = cl.models.ResNet(width, b, cl.SP(sigma=1.0), d_in=x.shape[1], d_out=4)
        eff.append(float(cl.effective_depth(model, x[:2])))
    at_end = [b for b, lr in zip(blocks_list, best, strict=True)
              if lr in (min(grid), max(grid))]
    ok = [i for i, v in enumerate(best) if math.isfinite(v)]
    exponent = fit(np.array(eff)[ok], np.array(best)[ok])[0] if len(ok) >= 2 else math.nan
    return {"config": {"model": "resnet", "parametrization": "sp", "branch_scale": 1.0,
                       "sigma": 1.0, "width": width, "depths": blocks_list, "lrs": grid,
                       "steps": steps, "batch_size": batch_size, "n": n, "seed": seed},
            "effective_depths": eff, "best_lr": best, "exponent": exponent,
            "blocks_with_best_at_grid_end": at_end,
            "final_loss": {str(b): {f"{lr:.6g}": (v if math.isfinite(v) else None)
                                    for lr, v in sorted(final[b].items())}
                           for b in blocks_list}}


def plot(result: dict, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"stabilizing": "C0", "depth_mup": "C1"}
    for init, label in INITS.items():
        r = result["inits"][init]
        eff, best = np.array(r["effective_depths"]), np.array(r["best_lr"])
        for row in best:
            ax1.scatter(eff, row, color=colors[init], alpha=0.35, s=18)
        lo, hi = r["exponent_ci95"]
        line = np.exp(r["intercept"]) * eff ** r["exponent"]
        ax1.plot(eff, line, "-", color=colors[init],
                 label=f"{label}: b = {r['exponent']:.2f} [{lo:.2f}, {hi:.2f}]")
    r0 = result["inits"]["stabilizing"]
    eff = np.array(r0["effective_depths"])
    pred = [cl.transfer_lr(r0["best_lr_geomean"][0], eff[0], e) for e in eff]
    ax1.plot(eff, pred, "k--", lw=1.2, label="paper: L_eff^(-3/2) (cl.transfer_lr)")
    sc = result.get("sweep_check")
    if sc:
        ax1.plot(sc["effective_depths"], sc["best_lr"], "s:", color="C3",
                 label=f"curvlab sweep (SP, branch 1): b = {sc['exponent']:.2f}")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log", base=2)
    ax1.set_xlabel("effective depth L_eff (cl.effective_depth, layers + residual additions)")
    ax1.set_ylabel("best SGD learning rate (per step)")
    ax1.set_title("Optimal LR vs effective depth (dots: seeds; [95% bootstrap])")
    ax1.legend(fontsize=7)
    ax1.grid(True, which="both", alpha=0.3)
    r = result["inits"]["stabilizing"]
    grid = np.array(result["settings"]["lr_grid"])
    with warnings.catch_warnings():  # an LR where every seed diverged: NaN, not drawn
        warnings.simplefilter("ignore", RuntimeWarning)
        loss = np.nanmean(np.array(r["final_loss"], dtype=float), axis=0)  # (depth, lr)
    for d, e in enumerate(r["effective_depths"]):
        ax2.plot(grid, loss[d], "o-", ms=3, color=f"C{d}", label=f"L_eff = {e:g}")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("SGD learning rate (per step)")
    ax2.set_ylabel("training MSE after one epoch (mean over seeds)")
    ax2.set_title("Stabilizing init: loss vs LR (missing points diverged)")
    ax2.legend(fontsize=8)
    ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle("Depth law of the optimal LR (Wu et al., arXiv:2602.07494)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "reproductions"))
    parser.add_argument("--quick", action="store_true", help="small smoke setting")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--no-sweep-check", action="store_true",
                        help="skip the cross-check with curvlab.sweep.run_sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.quick:
        blocks_list, n, n_seeds, grid = [2, 4], 512, 2, 2.0 ** np.arange(-10, -4, 1.0)
        sweep_blocks, sweep_grid = [2, 4], [2.0 ** -9, 2.0 ** -7]
    else:
        blocks_list, n, n_seeds, grid = [2, 4, 8, 16, 32], 4096, 3, 2.0 ** np.arange(-12, -3, 0.5)
        sweep_blocks, sweep_grid = [2, 4, 8, 16], [2.0 ** k for k in range(-14, -2)]
    seeds = list(range(args.seeds or n_seeds))
    batch_size, epochs = 32, 1
    x, y = make_dataset("teacher", n, seed=0)
    data = (x, y)  # (n, 16), (n, 4)

    inits = {init: lr_sweep(init, blocks_list, seeds, grid, args.width, data, batch_size,
                            epochs) for init in INITS}
    sweep = None if args.no_sweep_check else sweep_check(
        sweep_blocks, sweep_grid, args.width, steps=n // batch_size, batch_size=batch_size, n=n,
        seed=0)
    b = inits["stabilizing"]["exponent"]
    lo, hi = inits["stabilizing"]["exponent_ci95"]
    checks = {"exponent_negative": b < 0,
              "interval_reported": bool(lo <= b <= hi),
              "paper_exponent_in_interval": bool(lo <= PAPER_EXPONENT <= hi)}
    result = {
        "name": NAME,
        "paper": "Wu et al. 2026, arXiv:2602.07494",
        "claim": "optimal SGD LR ~ L_eff^(-3/2) under a stabilizing init",
        "settings": {"model": "cl.models.ResNet (residual MLP, one ReLU+linear per branch)",
                     "blocks": blocks_list, "width": args.width, "dataset": "teacher",
                     "n": n, "batch_size": batch_size, "epochs": epochs, "optimizer": "sgd",
                     "loss": "mse (0.5 ||f - y||^2, mean)", "dtype": "float32",
                     "lr_grid": grid.tolist(), "seeds": seeds, "bootstrap_resamples": N_BOOT,
                     "selection": "lowest training loss on all n examples after one epoch",
                     "quick": args.quick},
        "paper_exponent": PAPER_EXPONENT,
        "inits": inits,
        "sweep_check": sweep,
        "checks": checks,
        "passed": bool(checks["exponent_negative"] and checks["interval_reported"]),
        "torch_version": torch.__version__,
        "curvlab_version": cl.__version__,
        "wall_time_s": None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / f"{NAME}.png")
    result["wall_time_s"] = round(time.perf_counter() - start, 1)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")

    print(f"{'init':<44}{'exponent b':>12}{'95% bootstrap':>20}")
    for init, label in INITS.items():
        r = inits[init]
        ci = r["exponent_ci95"]
        print(f"{label:<44}{r['exponent']:>12.3f}{f'[{ci[0]:.2f}, {ci[1]:.2f}]':>20}")
    if sweep is not None:
        print(f"{'curvlab sweep (SP, branch 1, 1 seed)':<44}{sweep['exponent']:>12.3f}")
    print(f"paper: {PAPER_EXPONENT}")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    print(f"wall time {result['wall_time_s']} s; wrote {out / NAME}.png and .json")
    return result


if __name__ == "__main__":
    main()
