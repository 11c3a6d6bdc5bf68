"""Feature speed at depth: the angle between the feature update and the backward pass.

Claim (Chizat & Netrapalli 2023, "The Feature Speed Formula: a flexible approach to scale
hyper-parameters of deep neural networks", arXiv:2311.18718): for one gradient step, the change
of the features ``f_l`` obeys ``||df_l|| = dL_l / (||b_l|| cos theta_l)``, where ``b_l`` is the
backward pass at ``f_l``, ``dL_l`` the loss decay due to the layers up to ``l`` and ``theta_l``
the angle between ``df_l`` and ``-b_l``. At initialization, at the last hidden layer:

- a ReLU MLP with iid He init has ``cos theta_L ~ c / sqrt(L)`` (it falls with depth);
- a ResNet whose branches are scaled by ``1/sqrt(L)`` keeps ``cos theta_L = Theta(1)``;
- a ResNet with branch scale 1 loses alignment as it gets deeper.

Setting (as ``tests/test_features.py``, docs/math.md section 5): float64, width 512, a batch of 32
Gaussian inputs in 64 dimensions with Gaussian targets in 10, MSE, He init, no biases; ``L``
hidden layers (MLP: ``cl.models.MLP(512, L + 1)``) or residual blocks (``cl.models.ResNet``) for
``L`` = 2 .. 128; 5 seeds (model and batch). Measured with ``cl.feature_speed(..., lrs=1.0)``
(the angle does not depend on a common LR). Reported: the mean and spread over seeds of
``cos theta_L`` and the least-squares slope of ``log cos theta_L`` against ``log L``.

Second part: the formula's prediction against the real one-step feature change along a short
full-batch GD run (40 steps on the same batch, MLP and ResNet with 8 hidden layers, 1/sqrt(L)
branches). Each step: ``predicted_update_norm`` from ``cl.feature_speed(..., optimizer=opt)``
and the measured change from ``cl.feature_change`` (one real ``optimizer.step()`` on a copy,
RMS times ``sqrt(numel)``). The LRs are fractions of the stability threshold ``2 / lambda_0``
(``cl.sharpness`` at init); the ratio is 1 up to ``O(eta)``.

Command (about 1.5 minutes on 2 idle CPU cores)::

    python examples/feature_speed.py            # writes docs/reproductions/feature_speed.{png,json}
    python examples/feature_speed.py --quick    # smoke setting, a few seconds
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import curvlab as cl

NAME = "feature_speed"
ROOT = Path(__file__).resolve().parents[1]
KINDS = {"mlp": "ReLU MLP", "resnet_scaled": "ResNet, branch 1/sqrt(L)",
         "resnet_unit": "ResNet, branch 1"}
# Thresholds, set from the measurements (5 seeds, L = 2..128; see docs/reproductions).
MLP_SLOPE = (-0.7, -0.3)  # around -1/2
SCALED_MAX_ABS_SLOPE = 0.15  # flat
UNIT_MAX_SLOPE = -0.25  # falls
RATIO_TOL = 0.05  # |predicted / measured - 1| at the small LR


def build(kind: str, depth: int, width: int, seed: int) -> tuple[torch.nn.Module, str]:
    """The model (float64, He init, no biases) and the name of its last hidden layer."""
    torch.manual_seed(seed)
    model: torch.nn.Module
    if kind == "mlp":  # depth + 1 linear layers: depth hidden pre-activations, then the head
        model = cl.models.MLP(width, depth + 1, cl.SP(), d_in=64, d_out=10, bias=False)
        layer = f"layers.{depth - 1}"
    else:
        scale = 1.0 / math.sqrt(depth) if kind == "resnet_scaled" else 1.0
        model = cl.models.ResNet(width, depth, cl.SP(), branch_scale=scale, d_in=64, d_out=10,
                                 bias=False)
        layer = f"blocks.{depth - 1}"
    return model.double().eval(), layer


def batch(seed: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, 64, generator=g, dtype=torch.float64)  # (n, 64)
    y = torch.randn(n, 10, generator=g, dtype=torch.float64)  # (n, 10)
    return x, y


def slope(depths: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of log(values) against log(depths)."""
    return float(np.polyfit(np.log(depths), np.log(values), 1)[0])


def angles_at_init(depths: list[int], seeds: list[int], width: int) -> dict:
    out = {}
    for kind in KINDS:
        cos = np.zeros((len(seeds), len(depths)))  # (seeds, depths)
        for j, depth in enumerate(depths):
            for i, seed in enumerate(seeds):
                model, layer = build(kind, depth, width, seed)
                r = cl.feature_speed(model, cl.testing.mse, batch(seed), layers=[layer], lrs=1.0)
                cos[i, j] = r.cos_theta[0]
        per_seed = [slope(np.array(depths), c) for c in cos]
        out[kind] = {"cos_theta": cos.tolist(), "mean": cos.mean(0).tolist(),
                     "std": cos.std(0).tolist(),
                     "slope": slope(np.array(depths), cos.mean(0)),
                     "slope_per_seed": per_seed,
                     "slope_spread": [float(min(per_seed)), float(max(per_seed))],
                     "cos_times_sqrt_depth": (cos.mean(0) * np.sqrt(depths)).tolist()}
    return out


def formula_along_training(kind: str, depth: int, width: int, fractions: list[float],
                           steps: int, seed: int = 0) -> dict:
    """Predicted ||df_l|| (feature speed formula) over the real one-step change, every step."""
    x, y = batch(seed)
    model, layer = build(kind, depth, width, seed)
    lam0 = cl.sharpness(model, cl.testing.mse, (x, y),
                        generator=torch.Generator().manual_seed(seed))
    runs = {}
    for frac in fractions:
        model, layer = build(kind, depth, width, seed)
        lr = frac * 2.0 / lam0
        opt = model.parametrization.optimizer(model, "sgd", lr)
        ratios, losses = [], []
        for _ in range(steps):
            speed = cl.feature_speed(model, cl.testing.mse, (x, y), optimizer=opt)
            change = cl.feature_change(model, cl.testing.mse, (x, y), opt,
                                       layers=list(speed.layers))
            # the RMS change times sqrt(numel) is the norm ||f_l(t+1) - f_l(t)||
            numel = np.array([len(x) * (10 if name == speed.layers[-1] else width)
                              for name in speed.layers])
            measured = change.change_rms * np.sqrt(numel)
            ratios.append(speed.predicted_update_norm / measured)
            opt.zero_grad(set_to_none=True)
            loss = cl.testing.mse(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        ratio = np.array(ratios)  # (steps, layers)
        col = list(speed.layers).index(layer)
        runs[f"{frac:g}"] = {
            "lr_fraction_of_2_over_lambda0": frac, "lr": lr, "layers": list(speed.layers),
            "last_hidden_layer": layer, "ratio_last_hidden": ratio[:, col].tolist(),
            "max_abs_dev_last_hidden": float(np.abs(ratio[:, col] - 1).max()),
            "max_abs_dev_all_layers": float(np.abs(ratio - 1).max()),
            "loss": losses}
    return {"kind": kind, "depth": depth, "lambda0": lam0, "runs": runs}


def plot(result: dict, path: Path) -> None:
    depths = np.array(result["settings"]["depths"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"mlp": "C0", "resnet_scaled": "C1", "resnet_unit": "C3"}
    for kind, label in KINDS.items():
        a = result["angles"][kind]
        ax1.errorbar(depths, a["mean"], yerr=a["std"], marker="o", capsize=3,
                     color=colors[kind], label=f"{label} (slope {a['slope']:.2f})")
    mlp = np.array(result["angles"]["mlp"]["mean"])
    c = float(np.exp(np.mean(np.log(mlp * np.sqrt(depths)))))
    ax1.plot(depths, c / np.sqrt(depths), "k--", lw=1, label="prediction c / sqrt(L) (MLP)")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("depth L (hidden layers or residual blocks)")
    ax1.set_ylabel("cos theta_L at the last hidden layer (unitless)")
    ax1.set_title("Angle at initialization (mean +- std over seeds)")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)
    styles = {"mlp": "-", "resnet_scaled": "--"}
    for tr in result["training"]:
        for j, (frac, run) in enumerate(tr["runs"].items()):
            ratio = run["ratio_last_hidden"]
            ax2.plot(np.arange(len(ratio)), ratio, styles[tr["kind"]], color=f"C{2 + j}",
                     label=f"{KINDS[tr['kind']]}, L={tr['depth']}, lr = {frac} x 2/lambda0")
    ax2.axhline(1.0, color="k", lw=1, label="formula exact (ratio 1)")
    for s in (1 - RATIO_TOL, 1 + RATIO_TOL):
        ax2.axhline(s, color="gray", lw=0.8, ls=":")
    ax2.set_xlabel("training step (full-batch GD)")
    ax2.set_ylabel("predicted ||df_L|| / measured one-step change (unitless)")
    ax2.set_title("Feature speed formula vs a real SGD step (dotted: 1 +- 0.05)")
    ax2.legend(fontsize=7)
    ax2.grid(True, alpha=0.3)
    fig.suptitle("Feature speed (Chizat & Netrapalli, arXiv:2311.18718)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "reproductions"))
    parser.add_argument("--quick", action="store_true", help="small smoke setting")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds")
    parser.add_argument("--steps", type=int, default=None, help="training steps (part 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.quick:
        depths, width, n_seeds, steps, train_depth = [2, 4, 8], 64, 2, 4, 3
    else:
        depths, width, n_seeds, steps, train_depth = [2, 4, 8, 16, 32, 64, 128], 512, 5, 40, 8
    width = args.width or width
    seeds = list(range(args.seeds or n_seeds))
    steps = args.steps or steps
    fractions = [0.05, 0.5]

    angles = angles_at_init(depths, seeds, width)
    training = [formula_along_training(kind, train_depth, width, fractions, steps)
                for kind in ("mlp", "resnet_scaled")]
    small, large = f"{fractions[0]:g}", f"{fractions[1]:g}"
    small_dev = max(t["runs"][small]["max_abs_dev_all_layers"] for t in training)
    large_dev = max(t["runs"][large]["max_abs_dev_all_layers"] for t in training)
    checks = {
        "mlp_slope_in_range": MLP_SLOPE[0] <= angles["mlp"]["slope"] <= MLP_SLOPE[1],
        "resnet_scaled_flat": abs(angles["resnet_scaled"]["slope"]) < SCALED_MAX_ABS_SLOPE,
        "resnet_unit_falls": angles["resnet_unit"]["slope"] < UNIT_MAX_SLOPE,
        "formula_ratio_small_lr": small_dev < RATIO_TOL,
        "formula_error_grows_with_lr": large_dev > small_dev,
    }
    result = {
        "name": NAME,
        "paper": "Chizat & Netrapalli 2023, arXiv:2311.18718",
        "settings": {"depths": depths, "width": width, "seeds": seeds, "batch": 32, "d_in": 64,
                     "d_out": 10, "loss": "mse", "dtype": "float64", "init": "He, no biases",
                     "train_depth": train_depth, "train_steps": steps,
                     "lr_fractions_of_2_over_lambda0": fractions, "quick": args.quick},
        "thresholds": {"mlp_slope": list(MLP_SLOPE), "resnet_scaled_max_abs_slope":
                       SCALED_MAX_ABS_SLOPE, "resnet_unit_max_slope": UNIT_MAX_SLOPE,
                       "formula_ratio_tol": RATIO_TOL},
        "angles": angles,
        "training": training,
        "formula_max_abs_dev_small_lr": small_dev,
        "formula_max_abs_dev_large_lr": large_dev,
        "checks": checks,
        "passed": all(checks.values()),
        "torch_version": torch.__version__,
        "curvlab_version": cl.__version__,
        "wall_time_s": None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / f"{NAME}.png")
    result["wall_time_s"] = round(time.perf_counter() - start, 1)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")

    print(f"{'setting':<28}{'slope of log cos':>18}{'seed range':>20}")
    for kind, label in KINDS.items():
        a = angles[kind]
        lo, hi = a["slope_spread"]
        print(f"{label:<28}{a['slope']:>18.3f}{f'[{lo:.3f}, {hi:.3f}]':>20}")
    print(f"formula / measured: max |ratio - 1| = {small_dev:.4f} at lr {small} x 2/lambda0, "
          f"{large_dev:.4f} at {large} x 2/lambda0")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    print(f"wall time {result['wall_time_s']} s; wrote {out / NAME}.png and .json")
    return result


if __name__ == "__main__":
    main()
