"""Super consistency across depth (Depth-muP against muP) and under Adam (muP against SP).

Claim (Noci et al. 2024, arXiv:2402.17457, in our words). Super consistency holds across depth
for residual networks under Depth-muP, whose branches are scaled by ``1/sqrt(L)``. It fails under
plain muP, whose unscaled branches make the curvature grow with depth. Under Adam, the
Adam-preconditioned sharpness, compared with ``38 / eta`` (Cohen et al. 2022, arXiv:2207.14484),
is consistent across widths under muP and not under SP. This script runs those two settings.
The width setting under SGD is ``examples/super_consistency_sharpening.py``, whose analysis is
reused here: gaps to the widest or deepest run, early (steps < 50) and late windows before the
EoS, and the loss and the NTK's top eigenvalue next to the sharpness.

Each setting runs two tasks: the teacher task with MSE (512 points) and scikit-learn's bundled
digits with cross-entropy (1,024 points, 10 classes).

- ``depth``:
  - Model: a ``curvlab.models.ResNet`` of width 128 with 2, 4, 8 and 16 blocks, trained by
    full-batch GD for 100 steps, 3 seeds.
  - ``cl.DepthMuP``: branch multiplier ``sqrt(2 / L)``, base depth 2. Its LR is
    ``fraction x 2 / lambda_0`` at the base depth (0.5 for MSE, 0.1 for cross-entropy), shared
    by every depth, which is depth transfer.
  - The control, ``cl.MuP`` (branch multiplier 1), takes the same rule at the deepest network.
    That is the largest LR at which no depth diverges; taken at depth 2, every deeper network
    diverges and no gap can be measured.
- ``adam``:
  - Model: the 3-layer MLP at widths 64-512 under ``cl.MuP`` (with its Adam LRs) and ``cl.SP``,
    trained by full-batch Adam for 100 steps, 3 seeds.
  - LR: ``eta = fraction x 38 / lambda_0`` at the base width (0.5 for MSE, 0.25 for
    cross-entropy), with ``lambda_0`` the Adam-preconditioned sharpness after a first step at LR
    0 (``curvlab.sweep.auto_lr``).
  - Measurement: ``cl.Sharpness(preconditioned="adam")`` every 2 steps. Step 0 is left out:
    before the first step Adam has no second moments, so it has no preconditioner. On the
    digits the first 10 steps are left out too: while the second moments fill, the
    preconditioned sharpness is 2-60x its later value.
  - On the digits the ratio is reported, not asserted: the preconditioned sharpness spikes (at
    step 10 the seed mean at width 256 is 2.2x ``38 / eta``, back at the next measurements),
    which dominates a 3-seed mean.
    The cause is not pinned down here; one candidate is the pixels that are nonzero in few
    images, whose tiny second moments make Adam's preconditioner huge along them.

Run (from the repository root; a few minutes on a 2-core CPU, seconds with ``--quick``):

    python examples/super_consistency_depth_adam.py [--setting depth|adam|both] [--quick]
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

import torch
from super_consistency_sharpening import EARLY, MIN_RATIO, derived, plot, summarize

import curvlab as cl
from curvlab import sweep
from curvlab.sweep import SweepConfig, run_sweep

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "depth": {"by": "depth", "test": "depth-mup", "control": "mup", "metric": "sharpness_lr",
              "skip": 0, "paper_threshold": "2/eta"},
    "adam": {"by": "width", "test": "mup", "control": "sp", "metric": "sharpness_adam",
             "skip": 1, "paper_threshold": "38/eta"},
}
# Per setting and task: the data, the loss, the LR fraction and the first step counted. The
# cross-entropy runs take smaller fractions (they sharpen several times over from their value at
# init); under Adam their first 10 steps are left out, the transient of the second moments
# (preconditioned sharpness of 2-60x its later value). Only the tasks in ASSERTED have their
# gap ratio asserted: see the module docstring for Adam on the digits.
TASKS = {
    "depth": {"teacher_mse": {"dataset": "teacher", "loss": "mse", "n": 512, "lr_fraction": 0.5},
              "digits_xent": {"dataset": "digits", "loss": "xent", "n": 1024,
                              "lr_fraction": 0.1}},
    "adam": {"teacher_mse": {"dataset": "teacher", "loss": "mse", "n": 512, "lr_fraction": 0.5},
             "digits_xent": {"dataset": "digits", "loss": "xent", "n": 1024, "lr_fraction": 0.25,
                             "skip": 10}},
}
ASSERTED = {("depth", "teacher_mse"), ("depth", "digits_xent"), ("adam", "teacher_mse")}
# The tasks whose late window (steps 50-100) is one of progressive sharpening under the test
# parametrization (asserted): there the control's gap is measured while the test sharpens. The
# ResNets on MSE lose sharpness over all 100 steps; cross-entropy under Adam is not asserted.
SHARPENING = {("depth", "digits_xent"), ("adam", "teacher_mse")}
DEPTHS = (2, 4, 8, 16)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "reproductions",
                   help="folder for the figures and the JSON (default: docs/reproductions)")
    p.add_argument("--setting", choices=("depth", "adam", "both"), default="both")
    p.add_argument("--quick", action="store_true", help="a small smoke setting (seconds)")
    return p.parse_args(argv)


def depth_runs(out: Path, quick: bool, task: dict[str, Any]) -> tuple[list[cl.Run],
                                                                      dict[str, Any]]:
    depths = (2, 4) if quick else DEPTHS
    base: dict[str, Any] = {"model": "resnet", "widths": (128,), "depths": depths, "steps": 100,
                            "every": 2, "seeds": (0, 1, 2), "dataset": task["dataset"],
                            "loss": task["loss"], "n": task["n"]}
    if quick:
        base.update(widths=(32,), steps=6, seeds=(0,), n=64, probe_size=32)
    paths, lrs = [], {}
    for par, at in (("depth-mup", min(depths)), ("mup", max(depths))):
        cfg = SweepConfig(**base, parametrizations=(par,), lr_fraction=task["lr_fraction"])
        lrs[par] = sweep.auto_lr(cfg, par, at, *sweep.load_data(cfg))
        paths += run_sweep(SweepConfig(**base, parametrizations=(par,), lrs=(lrs[par],)),
                           out / par, progress=False)
    return cl.load_runs(paths), {"sweep": {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in base.items()},
                                 "lr": lrs, "lr_rule": f"{task['lr_fraction']:g} x "
                                 "2/lambda_0, depth-mup at the base depth, mup at the deepest "
                                 "(the largest LR stable at every depth)"}


def adam_runs(out: Path, quick: bool, task: dict[str, Any]) -> tuple[list[cl.Run],
                                                                     dict[str, Any]]:
    kw: dict[str, Any] = {"parametrizations": ("mup", "sp"), "optimizer": "adam",
                          "lr_fraction": task["lr_fraction"], "steps": 100, "every": 2,
                          "seeds": (0, 1, 2), "dataset": task["dataset"], "loss": task["loss"],
                          "n": task["n"]}
    if quick:
        kw.update(widths=(64, 128), steps=6, seeds=(0,), n=64, probe_size=32)
    cfg = SweepConfig(**kw)
    runs = cl.load_runs(run_sweep(cfg, out, progress=False))
    lrs = {p: float(next(r for r in runs if r.config["parametrization"] == p).config["lr"])
           for p in ("mup", "sp")}
    return runs, {"sweep": {k: list(v) if isinstance(v, tuple) else v
                            for k, v in vars(cfg).items()}, "lr": lrs,
                  "lr_rule": f"{task['lr_fraction']:g} x 38/lambda_0 at the base width "
                             "(sweep.auto_lr)"}


def check(name: str, task: str, res: dict[str, Any]) -> dict[str, bool]:
    """Before the EoS; for the tasks in ASSERTED the control's late gap at least MIN_RATIO x the
    test's; for those in SHARPENING a late window of progressive sharpening. The early ratio
    is reported."""
    s = SETTINGS[name]
    ratio = res["gaps"]["sharpness"][f"ratio_{s['control']}_over_{s['test']}_late"]
    out = {f"{name}[{task}]: measured_before_eos": res["eos_step"] is None}
    if (name, task) in ASSERTED:
        out[f"{name}[{task}]: late_sharpness_gap_ratio_at_least_{MIN_RATIO:g}"] = bool(
            ratio is not None and ratio >= MIN_RATIO)
    if (name, task) in SHARPENING:
        out[f"{name}[{task}]: {s['test']}_sharpens_progressively_in_the_late_window"] = \
            res["rise_in_window"]["late"]["progressive"]
    return out


def run_setting(name: str, args: argparse.Namespace) -> dict[str, Any]:
    start, load_start = time.perf_counter(), os.getloadavg()
    s = SETTINGS[name]
    results: dict[str, Any] = {}
    runs_by_task: dict[str, list[cl.Run]] = {}
    settings: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=f"curvlab_sc_{name}_") as tmp:
        for task, spec in TASKS[name].items():
            skip = s["skip"] if args.quick else spec.get("skip", s["skip"])  # quick: 6 steps
            runs, settings[task] = (depth_runs if name == "depth" else adam_runs)(
                Path(tmp) / task, args.quick, spec)
            settings[task]["skip"] = skip
            res = summarize(runs, by=s["by"], test=s["test"], control=s["control"],
                            metric=s["metric"], skip=skip)
            res["lr"] = settings[task]["lr"]
            res["sharpness_first_last"] = {  # seed means per width (depth), first and last step
                par: {str(int(w)): [float(g.values[i, g.steps >= skip][0]),
                                    float(g.values[i, -1])] for i, w in enumerate(g.widths)}
                for par, g in cl.super_consistency(derived(runs, "sharpness", s["metric"]),
                                                   metric="sharpness", by=s["by"],
                                                   window=1).groups.items()}
            results[task], runs_by_task[task] = res, runs
        plot(runs_by_task, results, args.out / f"super_consistency_{name}.png",
             f"Super consistency across {s['by']}: {s['test']} against {s['control']} "
             f"({s['metric']}, threshold {s['paper_threshold']}; seed mean)",
             by=s["by"], test=s["test"], control=s["control"], metric=s["metric"],
             skip=min(v["skip"] for v in settings.values()))
    assertions = {k: v for task, res in results.items() for k, v in check(name, task, res).items()}
    summary = {
        "name": f"super_consistency_{name}",
        "claim": {"depth": "Under Depth-muP the sharpness is consistent across depth at one "
                           "LR; under muP with unscaled branches it is not.",
                  "adam": "Under Adam the Adam-preconditioned sharpness is consistent across "
                          "widths under muP, not under SP."}[name],
        "paper": "Noci et al. 2024, arXiv:2402.17457",
        "quick": args.quick,
        "settings": {"tasks": settings, **s, "early_steps": EARLY, "min_ratio": MIN_RATIO,
                     "asserted": sorted(t for n, t in ASSERTED if n == name)},
        "tasks": results,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "assertions": assertions,
        "passed": all(assertions.values()),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }
    (args.out / f"super_consistency_{name}.json").write_text(json.dumps(summary, indent=1)
                                                              + "\n")
    print_table(summary)
    return summary


def print_table(summary: dict[str, Any]) -> None:
    s = summary["settings"]
    print(f"{summary['name']}: {summary['paper']} (wall time {summary['wall_time_s']} s)")
    for task, res in summary["tasks"].items():
        print(f" {task}: LRs {res['lr']}")
        for q, g in res["gaps"].items():
            for k in ("early", "late"):
                ratio = g[f"ratio_{s['control']}_over_{s['test']}_{k}"]
                print(f"  {q:>9} {k:>5}: {s['test']} {g[s['test']][k]}, {s['control']} "
                      f"{g[s['control']][k]}, ratio {ratio}")
        print(f"  sharpening in the windows: {res['rise_in_window']}")
    for name, ok in summary["assertions"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(1)  # small models: one thread is faster on a shared 2-core CPU
    args.out.mkdir(parents=True, exist_ok=True)
    names = ("depth", "adam") if args.setting == "both" else (args.setting,)
    return {name: run_setting(name, args) for name in names}


if __name__ == "__main__":
    main()
