"""Yaida's interpolating family: feature learning in width from NTP (s = 0) to muP (s = 1).

Claim (Yaida 2022, "Meta-Principled Family of Hyperparameter Scaling Strategies",
arXiv:2210.04909): one parameter ``s`` interpolates between the NTK scaling (``s = 0``, features
frozen at infinite width) and the maximal update scaling (``s = 1``, features move by ``Theta(1)``).
Every member trains stably at a width-independent learning rate: the LR-weighted NTK
``J D J^T`` stays ``Theta(1)``. What changes with ``s`` is how much the hidden features move.
In curvlab's multiplier-free form of the family (``cl.interpolated(s)``; docs/math.md) the
hidden features' one-step change scales as ``n^(-(1-s)/2)``. That is ``-1/2`` at NTP,
``-1/4`` at ``s = 1/2`` and ``0`` at muP (derived from the abc exponents). The plain kernel
``J J^T`` grows like ``n``, because its readout term ``||h||^2`` does.

Setting: a ReLU MLP with 2 hidden layers (``curvlab.models.MLP``, depth 4), widths 64..2048,
base width 64, ``sigma = 1``, float32. It trains on curvlab's teacher-student task (256
points, 16 inputs, 4 outputs, MSE). The parametrizations are ``cl.NTP``,
``cl.interpolated(s)`` for s in {0, 0.5, 1}, and ``cl.MuP``, each with its own per-layer SGD
LRs from ``parametrization.optimizer``. The base LR per parametrization is
``0.5 * 2 / lambda_0``, with ``lambda_0`` the LR-preconditioned sharpness at the base width
(``curvlab.sweep.auto_lr``); it is then kept fixed across widths.

Measured, per width over 12 seeds:
- the RMS of the two hidden layers' one-step feature change (``cl.feature_change``, one real
  full-batch SGD step on a copy);
- the output change;
- the top eigenvalue of the NTK on 32 probe points, plain and LR-weighted
  (``cl.ntk_eigenvalues``, with ``scales=cl.lr_scales``).

Each is fitted as a power of width (``cl.fit_exponent``: least squares in log-log space, with a
95% bootstrap interval over seeds).

Run (from the repository root; about a minute on a 2-core CPU, seconds with ``--quick``):

    python examples/interpolated_family.py [--out docs/reproductions] [--quick]
"""

from __future__ import annotations

import argparse
import json
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
from curvlab import sweep
from curvlab.testing import mse

NAME = "interpolated_family"
ROOT = Path(__file__).resolve().parents[1]
FAMILY = ("ntp", "interp:0", "interp:0.5", "interp:1", "mup")
PREDICTED = {"ntp": -0.5, "interp:0": -0.5, "interp:0.5": -0.25, "interp:1": 0.0, "mup": 0.0}
TOL = 0.1  # |fitted - predicted| for the hidden feature change and the LR-weighted NTK
DEPTH, PROBE = 4, 32
HIDDEN = ("layers.1", "layers.2")  # the two hidden layers' outputs


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "reproductions",
                   help="folder for the figure and the JSON (default: docs/reproductions)")
    p.add_argument("--quick", action="store_true", help="a small smoke setting (seconds)")
    p.add_argument("--seeds", type=int, default=12, help="seeds per width (default 12)")
    return p.parse_args(argv)


def measure(cfg: sweep.SweepConfig, par: str, width: int, seed: int, lr: float,
            data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """One network at init: its one-step feature change and its NTK's top eigenvalue."""
    x, y = data
    model = sweep.build_model(cfg, par, width, DEPTH, x.shape[1], y.shape[1], seed)
    opt = sweep.parametrization(par, cfg.base, cfg.sigma).optimizer(model, "sgd", lr)
    change = cl.feature_change(model, mse, (x, y), opt, layers=[*HIDDEN, f"layers.{DEPTH - 1}"])
    d = cl.lr_scales(opt, dict(model.named_parameters()))
    probe = x[:PROBE]
    return {"hidden_change": float(np.mean(change.change_rms[:2])),
            "output_change": float(change.change_rms[2]),
            "hidden_rms": float(np.mean(change.feature_rms[:2])),
            "ntk_plain": float(cl.ntk_eigenvalues(model, probe, 1)[0]),
            "ntk_lr": float(cl.ntk_eigenvalues(model, probe, 1, scales=d)[0])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    widths = (64, 128, 256) if args.quick else (64, 128, 256, 512, 1024, 2048)
    seeds = list(range(2 if args.quick else args.seeds))
    cfg = sweep.SweepConfig(model="mlp", widths=widths, depths=(DEPTH,),
                            parametrizations=FAMILY, n=256, sigma=1.0, seeds=(0,))
    data = sweep.load_data(cfg)
    out: dict[str, Any] = {}
    for par in FAMILY:
        lr = sweep.auto_lr(cfg, par, DEPTH, *data)
        rows = [[measure(cfg, par, w, s, lr, data) for w in widths] for s in seeds]
        keys = rows[0][0].keys()
        values = {k: np.array([[r[k] for r in row] for row in rows]) for k in keys}
        tail = len(widths) // 2  # the wider half: closer to the limit (reported, not asserted)
        out[par] = {"lr": lr,
                    "values_per_seed": {k: v.tolist() for k, v in values.items()},
                    "exponents": {k: cl.fit_exponent(np.array(widths), v).as_dict()
                                  for k, v in values.items()},
                    "hidden_change_exponent_wider_half": cl.fit_exponent(
                        np.array(widths[tail:]), values["hidden_change"][:, tail:]).as_dict()}
    return {"widths": list(widths), "seeds": seeds, "parametrizations": out}


def check(res: dict[str, Any]) -> dict[str, bool]:
    ex = {p: r["exponents"] for p, r in res["parametrizations"].items()}
    hidden = {p: e["hidden_change"] for p, e in ex.items()}
    checks = {f"hidden_change_exponent_within_{TOL}_of_{PREDICTED[p]}[{p}]":
              abs(h["slope"] - PREDICTED[p]) <= TOL for p, h in hidden.items()}
    checks["ordered_ntp_lt_interp0.5_lt_mup_intervals_disjoint"] = bool(
        hidden["ntp"]["high"] < hidden["interp:0.5"]["low"]
        and hidden["interp:0.5"]["high"] < hidden["mup"]["low"])
    checks.update({f"lr_weighted_ntk_flat_within_{TOL}[{p}]": abs(e["ntk_lr"]["slope"]) <= TOL
                   for p, e in ex.items()})
    return checks


def plot(res: dict[str, Any], path: Path) -> None:
    widths = np.array(res["widths"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    colors = dict(zip(FAMILY, plt.get_cmap("viridis")(np.linspace(0.05, 0.85, len(FAMILY))),
                      strict=True))
    panels = (("hidden_change", "hidden features: one-step change RMS"),
              ("ntk_lr", "NTK top eigenvalue, LR-weighted J D J^T"),
              ("ntk_plain", "NTK top eigenvalue, plain J J^T"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for par, r in res["parametrizations"].items():
            v = np.array(r["values_per_seed"][key])  # (seeds, widths)
            e = r["exponents"][key]
            ax.errorbar(widths, v.mean(0), yerr=v.std(0), color=colors[par], marker="o",
                        ms=3, lw=1.4, capsize=2, ls="--" if par in ("ntp", "mup") else "-",
                        label=f"{par}: {e['slope']:+.2f} [{e['low']:+.2f}, {e['high']:+.2f}]")
        ax.set(xscale="log", yscale="log", xlabel="width", title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle("Yaida's family (arXiv:2210.04909) in curvlab's multiplier-free form: exponent "
                 "in width [95% bootstrap interval over seeds]", fontsize=10)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    start, load_start = time.perf_counter(), os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args)
    plot(res, args.out / f"{NAME}.png")
    assertions = check(res)
    summary = {
        "name": NAME,
        "claim": "Along interpolated(s) the hidden features' one-step change scales as "
                 "n^(-(1-s)/2), from NTP's -1/2 to muP's 0, while the LR-weighted NTK stays "
                 "Theta(1).",
        "paper": "Yaida 2022, arXiv:2210.04909",
        "quick": args.quick,
        "settings": {"model": f"ReLU MLP, depth {DEPTH} (2 hidden layers)", "base_width": 64,
                     "sigma": 1.0, "data": "teacher, n = 256, d = 16, k = 4", "loss": "mse",
                     "optimizer": "SGD, parametrization.optimizer, one full-batch step",
                     "lr": "0.5 * 2 / lambda_0 at the base width (sweep.auto_lr)",
                     "ntk_probe": PROBE, "predicted_hidden_exponent": PREDICTED,
                     "tolerance": TOL, "interval": "95% percentile bootstrap over seeds"},
        **res,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "assertions": assertions,
        "passed": all(assertions.values()),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }
    (args.out / f"{NAME}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_table(summary)
    return summary


def print_table(summary: dict[str, Any]) -> None:
    print(f"{NAME}: {summary['paper']} (wall time {summary['wall_time_s']} s)")
    print(f"{'parametrization':>16} {'lr':>8} {'hidden change':>24} {'wider half':>11} "
          f"{'output change':>14} {'NTK (LR)':>9} {'NTK plain':>10}")
    for par, r in summary["parametrizations"].items():
        e = r["exponents"]
        h = e["hidden_change"]
        tail = r["hidden_change_exponent_wider_half"]["slope"]
        print(f"{par:>16} {r['lr']:>8.3g} {h['slope']:>+8.3f} [{h['low']:+.3f}, {h['high']:+.3f}]"
              f" {tail:>+11.3f} {e['output_change']['slope']:>+14.3f} "
              f"{e['ntk_lr']['slope']:>+9.3f} {e['ntk_plain']['slope']:>+10.3f}")
    for name, ok in summary["assertions"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


if __name__ == "__main__":
    main()
