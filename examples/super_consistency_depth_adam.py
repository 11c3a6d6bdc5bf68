"""Super consistency across depth (Depth-muP against muP) and under Adam (muP against SP).

Claim (Noci et al. 2024, arXiv:2402.17457, in our words). Super consistency holds across depth
for residual networks under Depth-muP, whose branches are scaled by ``1/sqrt(L)``. It fails under
plain muP, whose unscaled branches make the curvature grow with depth. Under Adam, the
Adam-preconditioned sharpness, compared with ``38 / eta`` (Cohen et al. 2022, arXiv:2207.14484),
is consistent across widths under muP and not under SP. This script runs those two settings.
The width setting under SGD is ``examples/super_consistency_sharpening.py``, whose analysis is
reused here: gaps to the widest or deepest run, early (steps < 50) and late windows before the
EoS, and the loss and the NTK's top eigenvalue next to the sharpness.

- ``depth``:
  - Model: a ``curvlab.models.ResNet`` of width 128 with 2, 4, 8 and 16 blocks, trained by
    full-batch GD for 100 steps on the teacher task (MSE), 3 seeds.
  - ``cl.DepthMuP``: branch multiplier ``sqrt(2 / L)``, base depth 2. Its LR is
    ``0.5 x 2 / lambda_0`` at the base depth, shared by every depth, which is depth transfer.
  - The control, ``cl.MuP`` (branch multiplier 1), takes the same rule at the deepest network.
    That is the largest LR at which no depth diverges; taken at depth 2, every deeper network
    diverges and no gap can be measured.
- ``adam``:
  - Model: the 3-layer MLP at widths 64-512 under ``cl.MuP`` (with its Adam LRs) and ``cl.SP``,
    trained by full-batch Adam for 100 steps, 3 seeds.
  - LR: ``eta = 0.5 x 38 / lambda_0`` at the base width, with ``lambda_0`` the Adam-preconditioned
    sharpness after a first step at LR 0 (``curvlab.sweep.auto_lr``).
  - Measurement: ``cl.Sharpness(preconditioned="adam")`` every 2 steps. Step 0 is left out: before
    the first step Adam has no second moments, so it has no preconditioner.

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
DEPTHS = (2, 4, 8, 16)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "reproductions",
                   help="folder for the figures and the JSON (default: docs/reproductions)")
    p.add_argument("--setting", choices=("depth", "adam", "both"), default="both")
    p.add_argument("--quick", action="store_true", help="a small smoke setting (seconds)")
    return p.parse_args(argv)


def depth_runs(out: Path, quick: bool) -> tuple[list[cl.Run], dict[str, Any]]:
    depths = (2, 4) if quick else DEPTHS
    base: dict[str, Any] = {"model": "resnet", "widths": (128,), "depths": depths, "steps": 100,
                            "every": 2, "seeds": (0, 1, 2)}
    if quick:
        base.update(widths=(32,), steps=6, seeds=(0,), n=64, probe_size=32)
    paths, lrs = [], {}
    for par, at in (("depth-mup", min(depths)), ("mup", max(depths))):
        cfg = SweepConfig(**base, parametrizations=(par,), lr_fraction=0.5)
        lrs[par] = sweep.auto_lr(cfg, par, at, *sweep.load_data(cfg))
        paths += run_sweep(SweepConfig(**base, parametrizations=(par,), lrs=(lrs[par],)),
                           out / par, progress=False)
    return cl.load_runs(paths), {"sweep": {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in base.items()},
                                 "lr": lrs, "lr_rule": "0.5 x 2/lambda_0, depth-mup at the base "
                                 "depth, mup at the deepest (the largest LR stable at every "
                                 "depth)"}


def adam_runs(out: Path, quick: bool) -> tuple[list[cl.Run], dict[str, Any]]:
    kw: dict[str, Any] = {"parametrizations": ("mup", "sp"), "optimizer": "adam",
                          "lr_fraction": 0.5, "steps": 100, "every": 2, "seeds": (0, 1, 2)}
    if quick:
        kw.update(widths=(64, 128), steps=6, seeds=(0,), n=64, probe_size=32)
    cfg = SweepConfig(**kw)
    runs = cl.load_runs(run_sweep(cfg, out, progress=False))
    lrs = {p: float(next(r for r in runs if r.config["parametrization"] == p).config["lr"])
           for p in ("mup", "sp")}
    return runs, {"sweep": {k: list(v) if isinstance(v, tuple) else v
                            for k, v in vars(cfg).items()}, "lr": lrs,
                  "lr_rule": "0.5 x 38/lambda_0 at the base width (sweep.auto_lr)"}


def check(name: str, res: dict[str, Any]) -> dict[str, bool]:
    s = SETTINGS[name]
    ratio = res["gaps"]["sharpness"][f"ratio_{s['control']}_over_{s['test']}_late"]
    return {f"{name}: measured_before_eos": res["eos_step"] is None,  # the early ratio is
            f"{name}: late_sharpness_gap_ratio_at_least_{MIN_RATIO:g}": bool(  # reported only
                ratio is not None and ratio >= MIN_RATIO)}


def run_setting(name: str, args: argparse.Namespace) -> dict[str, Any]:
    start, load_start = time.perf_counter(), os.getloadavg()
    s = SETTINGS[name]
    with tempfile.TemporaryDirectory(prefix=f"curvlab_sc_{name}_") as tmp:
        runs, settings = (depth_runs if name == "depth" else adam_runs)(Path(tmp), args.quick)
        res = summarize(runs, by=s["by"], test=s["test"], control=s["control"],
                        metric=s["metric"], skip=s["skip"])
        res["lr"] = settings["lr"]
        res["sharpness_first_last"] = {  # seed means per width (depth), first and last step
            par: {str(int(w)): [float(g.values[i, g.steps >= s["skip"]][0]),
                                float(g.values[i, -1])] for i, w in enumerate(g.widths)}
            for par, g in cl.super_consistency(derived(runs, "sharpness", s["metric"]),
                                               metric="sharpness", by=s["by"],
                                               window=1).groups.items()}
        plot({"teacher_mse": runs}, {"teacher_mse": res},
             args.out / f"super_consistency_{name}.png",
             f"Super consistency across {s['by']}: {s['test']} against {s['control']} "
             f"({s['metric']}, threshold {s['paper_threshold']}; seed mean)",
             by=s["by"], test=s["test"], control=s["control"], metric=s["metric"],
             skip=s["skip"])
    assertions = check(name, res)
    summary = {
        "name": f"super_consistency_{name}",
        "claim": {"depth": "Under Depth-muP the sharpness is consistent across depth at one "
                           "LR; under muP with unscaled branches it is not.",
                  "adam": "Under Adam the Adam-preconditioned sharpness is consistent across "
                          "widths under muP, not under SP."}[name],
        "paper": "Noci et al. 2024, arXiv:2402.17457",
        "quick": args.quick,
        "settings": {**settings, **s, "early_steps": EARLY, "min_ratio": MIN_RATIO},
        "result": res,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "assertions": assertions,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }
    (args.out / f"super_consistency_{name}.json").write_text(json.dumps(summary, indent=1)
                                                              + "\n")
    print_table(summary)
    return summary


def print_table(summary: dict[str, Any]) -> None:
    s, res = summary["settings"], summary["result"]
    print(f"{summary['name']}: {summary['paper']} (wall time {summary['wall_time_s']} s), "
          f"LRs {res['lr']}")
    for q, g in res["gaps"].items():
        for k in ("early", "late"):
            ratio = g[f"ratio_{s['control']}_over_{s['test']}_{k}"]
            print(f"  {q:>9} {k:>5}: {s['test']} {g[s['test']][k]}, {s['control']} "
                  f"{g[s['control']][k]}, ratio {ratio}")
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
