"""Super consistency of the LR-preconditioned sharpness across widths under muP, not under NTP.

Claim (Noci et al. 2024, "Super Consistency of Neural Network Landscapes and Learning Rate
Transfer", arXiv:2402.17457): under muP the sharpness of the loss, preconditioned by the per-layer
learning rates, follows the same trajectory at every width and rises to the edge of stability
``2 / eta``; under NTP the trajectories separate with width (progressive sharpening weakens as the
network widens).

Setting: curvlab's main job (``curvlab.sweep.SweepConfig()`` defaults): a 3-layer ReLU MLP
(``cl.models.MLP``, base init scale 1) at widths 64, 128, 256 and 512 under muP (base width 64)
and NTP, trained with full-batch gradient descent for 200 steps on a generated 512-point
teacher-student regression task (16 inputs, 4 outputs, MSE), seeds 0, 1, 2. The learning rate of
each parametrization is ``lr_fraction * 2 / lambda_0`` with ``lambda_0`` the LR-preconditioned
sharpness at initialization at width 64, the same at every width. Two learning rates per
parametrization are run: ``lr_fraction = 0.5`` (the main job's ``lr="auto"``) and ``0.75``.

Measured (every 10 steps, on the first 256 training points, by ``cl.Sharpness(preconditioned=
"lr")`` inside ``curvlab.sweep.run_sweep``): ``lambda_max(D^1/2 H D^1/2)``; then
``cl.super_consistency``: the gap to the widest run ``|s(t, N) - s(t, 512)| / s(t, 512)``, seeds
averaged, pointwise and smoothed (running mean over 5 measurements), averaged over steps and over
the narrower widths. Asserted: for both learning rates, muP's smoothed mean gap is at least 3x
smaller than NTP's; at ``lr_fraction = 0.5`` the pointwise gap too; at both learning rates, muP's
final sharpness (mean of the last 5 measurements, steps 160-200, seeds averaged) is within 10% of
``2 / eta`` at every width.

Command (from the repository root)::

    python examples/super_consistency.py            # about 2-3 minutes on 2 CPU cores
    python examples/super_consistency.py --quick    # smoke test, a few seconds

Writes ``docs/reproductions/super_consistency.png`` and ``.json`` (``--out DIR`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import curvlab as cl
from curvlab.sweep import SweepConfig, run_sweep

NAME = "super_consistency"
ROOT = Path(__file__).resolve().parents[1]
METRIC = "sharpness_lr"
WINDOW = 5  # running mean over 5 logged measurements (curvlab's report default)
FINAL = 5  # the final sharpness: mean of the last 5 measurements
MIN_RATIO = 3.0  # NTP's gap / muP's gap must be at least this
FINAL_TOL = 0.10  # muP's final sharpness within 10% of 2 / eta


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "reproductions",
                   help="folder for the figure and the JSON (default: docs/reproductions)")
    p.add_argument("--quick", action="store_true", help="a small smoke setting (seconds)")
    p.add_argument("--lr-fractions", default="0.5,0.75",
                   help="eta = fraction * 2 / lambda_0 per parametrization (default 0.5,0.75)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, default=None, help="GD steps (default 200)")
    p.add_argument("--runs", type=Path, default=None,
                   help="keep the HDF5 run files here (default: a temporary folder)")
    return p.parse_args(argv)


def sweep_config(args: argparse.Namespace, fraction: float) -> SweepConfig:
    """The main job's config with another ``lr_fraction`` (or the quick smoke setting)."""
    kw: dict[str, Any] = {"lr_fraction": fraction}
    if args.quick:
        kw.update(widths=(64, 128), steps=30, seeds=(0,), n=128, probe_size=128)
    if args.seeds is not None:
        kw["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.steps is not None:
        kw["steps"] = args.steps
    return SweepConfig(**kw)


def summarize(runs: list[cl.Run], cfg: SweepConfig) -> dict[str, Any]:
    """Gaps, their ratio and the final sharpness / threshold per width for one learning rate."""
    sc = cl.super_consistency(runs, metric=METRIC, by="width", group="parametrization",
                              window=WINDOW)
    out: dict[str, Any] = {"lr_fraction": cfg.lr_fraction, "lr": {}, "threshold": {},
                           "mean_gap": {}, "mean_smoothed_gap": {}, "beta": {},
                           "beta_smoothed": {}, "per_width": {}}
    for par, g in sc.groups.items():
        members = [r for r in runs if r.config["parametrization"] == par]
        lr = float(members[0].config["lr"])
        threshold = members[0].metrics[METRIC].threshold
        if threshold is None:
            raise RuntimeError(f"{par}: the runs stored no EoS threshold for {METRIC}")
        out["lr"][par], out["threshold"][par] = lr, threshold
        out["mean_gap"][par] = sc.mean_gap(par, smoothed=False)
        out["mean_smoothed_gap"][par] = sc.mean_gap(par, smoothed=True)
        out["beta"][par], out["beta_smoothed"][par] = g.beta, g.beta_smoothed
        widths = {}
        for i, w in enumerate(g.widths):
            finals = [float(np.mean(r.metrics[METRIC].value[-FINAL:])) / threshold
                      for r in members if r.config["width"] == int(w)]
            widths[str(int(w))] = {"mean_gap": float(g.mean_gap[i]),
                                   "mean_smoothed_gap": float(g.mean_smoothed_gap[i]),
                                   "final_over_threshold": float(np.mean(finals)),
                                   "final_over_threshold_per_seed": finals}
        out["per_width"][par] = widths
    out["gap_ratio"] = out["mean_gap"]["ntp"] / out["mean_gap"]["mup"]
    out["smoothed_gap_ratio"] = out["mean_smoothed_gap"]["ntp"] / out["mean_smoothed_gap"]["mup"]
    out["curves"] = {par: {"steps": g.steps.tolist(),
                           "widths": [int(w) for w in g.widths],
                           "sharpness_seed_mean": g.values.tolist()}
                     for par, g in sc.groups.items()}
    return out


def plot(results: list[dict[str, Any]], runs_by_fraction: list[list[cl.Run]], path: Path) -> None:
    rows = len(results)
    fig, axes = plt.subplots(rows, 2, figsize=(10.5, 3.6 * rows), squeeze=False,
                             constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    for row, (res, runs) in enumerate(zip(results, runs_by_fraction, strict=True)):
        for col, par in enumerate(("mup", "ntp")):
            ax = axes[row, col]
            widths = sorted({int(r.config["width"]) for r in runs})
            for i, w in enumerate(widths):
                ms = [r.metrics[METRIC] for r in runs
                      if r.config["parametrization"] == par and r.config["width"] == w]
                steps = ms[0].step
                vals = np.array([m.value[:len(steps)] for m in ms])  # (seeds, T)
                color = cmap(0.15 + 0.7 * i / max(len(widths) - 1, 1))
                ax.plot(steps, vals.mean(0), color=color, lw=1.6, label=f"width {w}")
                if len(ms) > 1:
                    ax.fill_between(steps, vals.min(0), vals.max(0), color=color, alpha=0.15,
                                    lw=0)
            ax.axhline(res["threshold"][par], color="crimson", ls="--", lw=1.2,
                       label=f"2/eta = {res['threshold'][par]:.3g}")
            label = "muP" if par == "mup" else "NTP"
            ax.set_title(f"{label}, eta = {res['lr'][par]:.3g} "
                         f"({res['lr_fraction']:g} x 2/lambda_0)"
                         f"\nmean gap {res['mean_gap'][par]:.3f}, smoothed "
                         f"{res['mean_smoothed_gap'][par]:.3f}", fontsize=10)
            ax.set_xlabel("GD step")
            ax.set_ylabel("LR-preconditioned sharpness\n(1 / base LR units)")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, frameon=False, loc="lower right")
    fig.suptitle("Super consistency (Noci et al. 2024, arXiv:2402.17457): "
                 "lambda_max(D^1/2 H D^1/2) vs step, seed mean and range", fontsize=11)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(1)  # small models: one thread is faster on a shared 2-core CPU
    start, load_start = time.perf_counter(), os.getloadavg()
    fractions = [float(f) for f in args.lr_fractions.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results, runs_by_fraction, configs = [], [], []
    with tempfile.TemporaryDirectory(prefix="curvlab_sc_") as tmp:
        runs_root = args.runs or Path(tmp)
        for fraction in fractions:
            cfg = sweep_config(args, fraction)
            paths = run_sweep(cfg, runs_root / f"lr_fraction_{fraction:g}", overwrite=True,
                              progress=False)
            runs = cl.load_runs(paths)
            results.append(summarize(runs, cfg))
            runs_by_fraction.append(runs)
            configs.append(cfg)
        plot(results, runs_by_fraction, args.out / f"{NAME}.png")

    assertions: dict[str, bool] = {}
    for i, res in enumerate(results):
        tag = f"[lr_fraction={res['lr_fraction']:g}]"
        assertions[f"smoothed_gap_ratio_at_least_3{tag}"] = bool(
            res["smoothed_gap_ratio"] >= MIN_RATIO)
        if i == 0:
            assertions[f"pointwise_gap_ratio_at_least_3{tag}"] = bool(
                res["gap_ratio"] >= MIN_RATIO)
        finals = [v["final_over_threshold"] for v in res["per_width"]["mup"].values()]
        assertions[f"mup_final_within_10pct_of_2_over_eta{tag}"] = bool(
            all(abs(f - 1) <= FINAL_TOL for f in finals))
    cfg0 = configs[0]
    summary: dict[str, Any] = {
        "name": NAME,
        "claim": "Under muP the LR-preconditioned sharpness curves coincide across widths and "
                 "rise to 2/eta; under NTP they do not.",
        "paper": "Noci et al. 2024, arXiv:2402.17457",
        "quick": args.quick,
        "settings": {"sweep": {k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in vars(cfg0).items() if k != "lr_fraction"},
                     "lr_fractions": fractions, "metric": METRIC, "window": WINDOW,
                     "final_measurements": FINAL, "min_ratio": MIN_RATIO,
                     "final_tolerance": FINAL_TOL, "loss": "mse 0.5||f - y||^2, batch mean"},
        "seeds": list(cfg0.seeds),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "learning_rates": results,
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
    print(f"{'lr_fraction':>11} {'par':>4} {'eta':>8} {'gap':>7} {'smoothed':>9} "
          "final/(2/eta) per width")
    for res in summary["learning_rates"]:
        for par in ("mup", "ntp"):
            finals = " ".join(f"{w}:{v['final_over_threshold']:.2f}"
                              for w, v in res["per_width"][par].items())
            print(f"{res['lr_fraction']:>11g} {par:>4} {res['lr'][par]:>8.4g} "
                  f"{res['mean_gap'][par]:>7.3f} {res['mean_smoothed_gap'][par]:>9.3f} {finals}")
        print(f"{'':>11} NTP/muP gap ratio {res['gap_ratio']:.1f}x, smoothed "
              f"{res['smoothed_gap_ratio']:.1f}x")
    for name, ok in summary["assertions"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


if __name__ == "__main__":
    main()
