"""Super consistency during progressive sharpening, before the edge of stability (width).

Claim (Noci et al. 2024, "Super Consistency of Neural Network Landscapes and Learning Rate
Transfer", arXiv:2402.17457, in our words). Under muP the sharpness trajectory is nearly the
same at every width, progressive sharpening included. Under NTP the wide networks stop
sharpening (the lazy regime), so the trajectories split. The top eigenvalue of the NTK is not
super consistent. The main job's reproduction (``examples/super_consistency.py``) is dominated
by the edge of stability, which pins every stable run at ``2 / eta``. This example measures the
phase before that.

Setting: curvlab's sweep (``curvlab.sweep.SweepConfig``).
- Model and training: a 3-layer ReLU MLP, widths 64-512, muP (base width 64) and NTP, full-batch
  GD for 100 steps.
- LR: a low rate, ``eta = fraction * 2 / lambda_0`` at the base width (fraction 0.25 for MSE,
  0.05 for cross-entropy, which sharpens about 7x from its small value at init), so that muP
  sharpens over the whole run and does not reach ``2 / eta``.
- Measurements: every 2 steps, for the LR-preconditioned sharpness, the loss and the top
  LR-weighted NTK eigenvalue.
- Tasks: the teacher task with MSE (512 points), and scikit-learn's bundled digits with
  cross-entropy (1,024 points, 64 inputs, 10 classes).
- Seeds: 12 per width on MSE, 4 on the digits.

Gaps to the widest run (``cl.super_consistency``, pointwise, seeds averaged) are reported for
two windows: early (steps < 50) and late (the rest). Only steps before the widest muP run
reaches 0.9 of ``2 / eta`` count (none reaches it here). The quantities are the sharpness, the
loss, and the top eigenvalue of the LR-weighted NTK. The rise of each run's sharpness,
``(lambda(100) - lambda(0)) / (2 / eta)``, is also fitted as a power of width
(``cl.fit_exponent``). So that the late gaps are known to be measured during progressive
sharpening, muP's seed-mean sharpness must rise across the late window at every width
(``rise_in_window``, asserted; the early window's rise is reported).

Run (from the repository root; a few minutes on a 2-core CPU, seconds with ``--quick``):

    python examples/super_consistency_sharpening.py [--out docs/reproductions] [--quick]
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
from curvlab.runs import Metric, Run
from curvlab.sweep import SweepConfig, run_sweep

NAME = "super_consistency_sharpening"
ROOT = Path(__file__).resolve().parents[1]
EARLY = 50  # steps < EARLY are "early"
EOS_LEVEL = 0.9  # steps from the first where muP's widest run reaches 0.9 x 2/eta are excluded
MIN_RATIO = 3.0
# lr_fraction per task: cross-entropy sharpens about 7x from its small value at init (MSE about
# 2.4x), so 0.25 x 2/lambda_0 overshoots 2/eta by step 14 on the digits; 0.05 stays below it
# seeds: 12 on MSE, whose late gap ratio is 3.8 with 4 seeds (8.9 with 12), 4 on the digits
TASKS = {"teacher_mse": {"dataset": "teacher", "loss": "mse", "n": 512, "lr_fraction": 0.25,
                         "seeds": tuple(range(12))},
         "digits_xent": {"dataset": "digits", "loss": "xent", "n": 1024, "lr_fraction": 0.05,
                         "seeds": (0, 1, 2, 3)}}
QUANTITIES = ("sharpness", "loss", "ntk_top")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "reproductions",
                   help="folder for the figure and the JSON (default: docs/reproductions)")
    p.add_argument("--quick", action="store_true", help="a small smoke setting (seconds)")
    return p.parse_args(argv)


def config(task: str, quick: bool) -> SweepConfig:
    kw: dict[str, Any] = {**TASKS[task], "steps": 100, "every": 2, "probe_size": 256}
    if quick:
        kw.update(widths=(64, 128), steps=12, seeds=(0,), n=128, probe_size=64)
    return SweepConfig(**kw)


def derived(runs: list[Run], quantity: str, metric: str = "sharpness_lr") -> list[Run]:
    """Runs whose one metric ``quantity`` is a scalar series derived from the logged ones
    (``"sharpness"`` is ``metric``)."""
    out = []
    for r in runs:
        if quantity == "ntk_top":
            m = r.metrics["ntk_top"]
            m = Metric("ntk_top", m.step, m.value[:, 0])  # the top eigenvalue
        elif quantity == "loss":
            m = r.metrics["loss"]
        else:
            m = r.metrics[metric]
        out.append(Run(r.path, r.config, {quantity: m}, r.attrs, r.env))
    return out


def summarize(runs: list[Run], *, by: str = "width", test: str = "mup", control: str = "ntp",
              metric: str = "sharpness_lr", skip: int = 0) -> dict[str, Any]:
    """Gaps of the sharpness (``metric``), the loss and the NTK's top eigenvalue to the widest
    (deepest) run, for the parametrization under ``test`` and its ``control``, in the early and
    late windows before the EoS; steps below ``skip`` are left out."""
    thr = {p: next(r for r in runs if r.config["parametrization"] == p)
           .metrics[metric].threshold for p in (test, control)}
    sharp = cl.super_consistency(derived(runs, "sharpness", metric), metric="sharpness", by=by,
                                 window=1).groups[test]
    level = sharp.values[-1] / thr[test]  # the widest (deepest) run, seed mean, over threshold
    reached = np.flatnonzero((level >= EOS_LEVEL) & (sharp.steps >= skip))
    eos_step = int(sharp.steps[reached[0]]) if reached.size else None
    end = "widest" if by == "width" else "deepest"
    out: dict[str, Any] = {"eos_step": eos_step, "threshold": thr,
                           f"{test}_{end}_max_over_threshold": float(level[sharp.steps >= skip]
                                                                     .max()), "gaps": {}}
    for q in QUANTITIES:
        sc = cl.super_consistency(derived(runs, q, metric), metric=q, by=by, window=1)
        gaps: dict[str, Any] = {}
        for par, g in sc.groups.items():
            before = (g.steps < (eos_step if eos_step is not None else np.inf)) & (g.steps >= skip)
            windows = {"early": before & (g.steps < EARLY), "late": before & (g.steps >= EARLY)}
            with np.errstate(invalid="ignore"):
                gaps[par] = {k: float(np.mean(g.gaps[:-1][:, w])) if w.any() else None
                             for k, w in windows.items()}
            gaps[par][f"per_{by}_early"] = {
                str(int(wd)): float(np.mean(g.gaps[i, windows["early"]]))
                for i, wd in enumerate(g.widths[:-1])} if windows["early"].any() else {}
        for k in ("early", "late"):
            a, b = gaps[test][k], gaps[control][k]
            gaps[f"ratio_{control}_over_{test}_{k}"] = b / a if a and b is not None else None
        out["gaps"][q] = gaps
    out["sharpening_exponent"] = {p: sharpening_exponent(runs, p, eos_step, by, metric, skip)
                                  for p in thr}
    out["rise_in_window"] = rise_in_window(sharp, thr[test], eos_step, skip)
    return out


def rise_in_window(g: Any, thr: float, eos_step: int | None, skip: int = 0) -> dict[str, Any]:
    """Whether each window is one of progressive sharpening: per width (depth) of the group
    ``g`` (one parametrization's ``cl.super_consistency`` group of the sharpness), the
    seed-mean sharpness at the window's last step less at its first, over the threshold
    ``thr``; ``progressive`` when that is positive at every width (depth)."""
    before = (g.steps < (eos_step if eos_step is not None else np.inf)) & (g.steps >= skip)
    out: dict[str, Any] = {}
    for name, w in {"early": before & (g.steps < EARLY), "late": before & (g.steps >= EARLY)
                    }.items():
        if w.sum() < 2:
            out[name] = {"rise": None, "progressive": False}
            continue
        first, last = np.flatnonzero(w)[[0, -1]]
        rise = (g.values[:, last] - g.values[:, first]) / thr  # (W,)
        out[name] = {"steps": [int(g.steps[first]), int(g.steps[last])],
                     "rise": {str(int(x)): float(v) for x, v in zip(g.widths, rise, strict=True)},
                     "progressive": bool((rise > 0).all())}
    return out


def sharpening_exponent(runs: list[Run], par: str, eos_step: int | None, by: str = "width",
                        metric: str = "sharpness_lr", skip: int = 0) -> dict[str, Any]:
    """Each run's rise ``(lambda(t) - lambda(skip)) / threshold`` at the last step measured
    before the EoS, fitted as a power of width or depth (``cl.fit_exponent``, intervals over
    seeds)."""
    members = [r for r in runs if r.config["parametrization"] == par]
    m0 = members[0].metrics[metric]
    points = sorted({int(r.config[by]) for r in members})
    before = m0.step[(m0.step < (eos_step if eos_step is not None else np.inf))
                     & (m0.step >= skip)]
    if before.size < 2:  # at the EoS from the first measurements (a quick run): no rise
        return {"step": None, by + "s": points, "rise_seed_mean": None}
    last = before[-1]
    rise = np.array([[float(m.value[m.step == last][0] - m.value[m.step >= skip][0])
                      / m.threshold for r in members if r.config[by] == w
                      for m in [r.metrics[metric]]] for w in points]).T  # (seeds, points)
    out: dict[str, Any] = {"step": int(last), by + "s": points,
                           "rise_seed_mean": rise.mean(0).tolist()}
    if (rise > 0).all() and len(points) > 1:
        out.update(cl.fit_exponent(np.array(points), rise).as_dict())
    return out


def plot(runs_by_task: dict[str, list[Run]], results: dict[str, Any], path: Path, title: str, *,
         by: str = "width", test: str = "mup", control: str = "ntp",
         metric: str = "sharpness_lr", skip: int = 0) -> None:
    fig, axes = plt.subplots(len(runs_by_task), 4, figsize=(15, 3.5 * len(runs_by_task)),
                             squeeze=False, constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    for row, (task, runs) in enumerate(runs_by_task.items()):
        panels = [(test, "sharpness"), (control, "sharpness"), (test, "loss"), (control, "loss")]
        for ax, (par, q) in zip(axes[row], panels, strict=True):
            g = cl.super_consistency(derived(runs, q, metric), metric=q, by=by,
                                     window=1).groups[par]
            shown = g.steps >= skip
            for i, w in enumerate(g.widths):
                ax.plot(g.steps[shown], g.values[i][shown],
                        color=cmap(0.1 + 0.75 * i / (len(g.widths) - 1 or 1)), lw=1.5,
                        label=f"{by} {int(w)}")
            gap = results[task]["gaps"][q][par]["early"]
            ax.set_title(f"{task}: {par}, {q} (early gap {gap:.3f})" if gap is not None
                         else f"{task}: {par}, {q}", fontsize=9)
            if q == "sharpness":
                ax.axhline(results[task]["threshold"][par], color="crimson", ls="--", lw=1,
                           label="EoS threshold")
            if q == "loss" or (q == "sharpness" and np.ptp(np.log(np.abs(g.values[:, shown])
                                                                  + 1e-300)) > 3):
                ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(1)  # small models: one thread is faster on a shared 2-core CPU
    start, load_start = time.perf_counter(), os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    results, runs_by_task, settings = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="curvlab_scs_") as tmp:
        for task in TASKS:
            cfg = config(task, args.quick)
            runs = cl.load_runs(run_sweep(cfg, Path(tmp) / task, progress=False))
            runs_by_task[task], results[task] = runs, summarize(runs)
            results[task]["lr"] = {p: float(next(r for r in runs if r.config["parametrization"]
                                                 == p).config["lr"]) for p in ("mup", "ntp")}
            settings[task] = {k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in vars(cfg).items()}
        fracs = ", ".join(f"{t} {v['lr_fraction']:g}" for t, v in TASKS.items())
        plot(runs_by_task, results, args.out / f"{NAME}.png",
             "Before the edge of stability: LR-preconditioned sharpness and loss per width (seed "
             f"mean), eta = fraction x 2/lambda_0 ({fracs})")
    assertions = {}
    for task, res in results.items():
        gaps, rise = res["gaps"], res["sharpening_exponent"]
        ratio = gaps["sharpness"]["ratio_ntp_over_mup_late"]
        assertions[f"late_sharpness_gap_ratio_at_least_3_before_eos[{task}]"] = bool(
            ratio is not None and ratio >= MIN_RATIO)
        assertions[f"measured_before_eos[{task}]"] = res["eos_step"] is None
        assertions[f"mup_sharpens_progressively_in_the_late_window[{task}]"] = \
            res["rise_in_window"]["late"]["progressive"]
        mup_sharp, mup_ntk = gaps["sharpness"]["mup"]["late"], gaps["ntk_top"]["mup"]["late"]
        assertions[f"mup_ntk_gap_larger_than_its_sharpness_gap[{task}]"] = bool(
            mup_sharp is not None and mup_ntk is not None and mup_ntk > mup_sharp)
        assertions[f"mup_rise_flat_in_width_within_0.15[{task}]"] = bool(
            "slope" in rise["mup"] and abs(rise["mup"]["slope"]) <= 0.15)
        ntp_rise, mup_rise = rise["ntp"]["rise_seed_mean"], rise["mup"]["rise_seed_mean"]
        assertions[f"ntp_rise_at_widest_below_quarter_of_mups[{task}]"] = bool(
            ntp_rise and mup_rise and ntp_rise[-1] < 0.25 * mup_rise[-1])
    summary = {
        "name": NAME,
        "claim": "Before the edge of stability, muP's progressive sharpening is width-"
                 "independent; NTP's vanishes with width.",
        "paper": "Noci et al. 2024, arXiv:2402.17457",
        "quick": args.quick,
        "settings": {"sweeps": settings, "early_steps": EARLY, "eos_level": EOS_LEVEL,
                     "min_ratio": MIN_RATIO, "gap": "pointwise, to the widest width, seeds "
                     "averaged, mean over the narrower widths and the window's steps"},
        "tasks": results,
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


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_table(summary: dict[str, Any]) -> None:
    print(f"{NAME}: {summary['paper']} (wall time {summary['wall_time_s']} s)")
    print(f"{'task':>12} {'quantity':>10} {'window':>6} {'muP gap':>8} {'NTP gap':>8} "
          f"{'NTP/muP':>8}")
    for task, res in summary["tasks"].items():
        for q, g in res["gaps"].items():
            for k in ("early", "late"):
                print(f"{task:>12} {q:>10} {k:>6} {_fmt(g['mup'][k]):>8} "
                      f"{_fmt(g['ntp'][k]):>8} {_fmt(g[f'ratio_ntp_over_mup_{k}']):>8}")
        for par, e in res["sharpening_exponent"].items():
            if "slope" in e:
                print(f"{task:>12} {par} rise by step {e['step']} ~ width^{e['slope']:+.2f} "
                      f"[{e['low']:+.2f}, {e['high']:+.2f}]")
        print(f"{task:>12} muP widest max / (2/eta): {res['mup_widest_max_over_threshold']:.2f}"
              f", EoS step: {res['eos_step']}")
    for name, ok in summary["assertions"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


if __name__ == "__main__":
    main()
