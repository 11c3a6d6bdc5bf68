"""The edge of stability: full-batch GD, SGD with momentum, Adam and muP + Adam drive their
(preconditioned) sharpness to their own stability thresholds and hover there.

Claims: Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of
Stability" (arXiv:2103.00065): with full-batch gradient descent at learning rate ``eta`` the
sharpness ``lambda_max(H)`` rises (progressive sharpening) until it reaches ``2 / eta``, then
hovers just around it while the loss keeps falling over long horizons, non-monotonically. Cohen et
al. 2022, "Adaptive Gradient Methods at the Edge of Stability" (arXiv:2207.14484): with full-batch
Adam the preconditioned sharpness ``lambda_max(P^-1/2 H P^-1/2)``, ``P_t = (1 - beta1^(t+1))
diag(sqrt(v_t / (1 - beta2^(t+1))) + eps)``, rises to ``(2 + 2 beta1) / ((1 - beta1) eta)`` =
``38 / eta`` at ``beta1 = 0.9`` and hovers there. Heavy-ball momentum ``beta`` moves the line to
``(2 + 2 beta) / eta`` = ``3.8 / eta`` at ``beta = 0.9`` (Cohen et al. 2021, appendix).

Setting: one generated regression task, the 512-point teacher-student data of ``curvlab.sweep``
(Gaussian inputs in 16 dimensions, a random tanh teacher's 4 outputs), MSE ``0.5 ||f - y||^2``
averaged over examples, float64. Model: ``cl.models.MLP(width=256, depth=3,
parametrization=cl.SP(sigma=1.0), d_in=16, d_out=4)`` (ReLU, standard parametrization with init
std ``1 / sqrt(fan_in)``), seed 0, the same initialization for both optimizers. GD:
``torch.optim.SGD(lr=0.028)`` (``2 / eta`` = 71.4, about 1.7x the initial sharpness 42.3), 900
steps. Adam: ``torch.optim.Adam(lr=2e-3, betas=(0.9, 0.999), eps=1e-8)``, 900 steps. SGD with
momentum: ``torch.optim.SGD(lr=0.3, momentum=0.9)`` (``3.8 / eta`` = 12.7, below the initial
sharpness: at the smaller rates that would start below the line, 0.053-0.1, the run converges
before any sharpening and sits at 0.3-0.5 of it). muP + Adam: the same MLP under
``cl.MuP(base_width=64, sigma=1.0)`` with its per-layer Adam LRs (``MuP.optimizer``, base LR 5e-3),
the preconditioner carrying the per-layer LR scales.

Measured: every 5 steps, on the whole training set, by a ``cl.Monitor`` with ``cl.Sharpness``
(raw for GD, ``preconditioned="adam"`` for Adam; Lanczos warm-started from the previous top
eigenvector; the Monitor stores the threshold ``2 / eta`` or ``38 / eta``), and the training loss at
every step. Asserted, for every run: the ratio sharpness / threshold reaches 0.9, and its level
(the median ratio over the last third of the run) is within [0.85, 1.1]; for GD, Adam and muP +
Adam also: from the first measurement at 0.9, every later one stays within [0.75, 1.15].

Command (from the repository root)::

    python examples/edge_of_stability.py            # about two minutes on 2 CPU cores
    python examples/edge_of_stability.py --quick    # smoke test, a few seconds

Writes ``docs/reproductions/edge_of_stability.png`` and ``.json`` (``--out DIR`` to change).
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
from curvlab.sweep import make_dataset

NAME = "edge_of_stability"
ROOT = Path(__file__).resolve().parents[1]
REACH = 0.9  # "reached the threshold": sharpness / threshold >= 0.9
BAND = (0.75, 1.15)  # afterwards every measurement must stay in this band (times the threshold)
DTYPE = torch.float64
KINDS = ("gd", "momentum", "adam", "mup_adam")
LEVEL = (0.85, 1.1)  # the level each run reaches, times its own threshold


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "reproductions",
                   help="folder for the figure and the JSON (default: docs/reproductions)")
    p.add_argument("--quick", action="store_true", help="a small smoke setting (seconds)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--n", type=int, default=512, help="training points (full batch)")
    p.add_argument("--gd-lr", type=float, default=0.028)
    p.add_argument("--adam-lr", type=float, default=2e-3)
    p.add_argument("--momentum-lr", type=float, default=0.3,
                   help="SGD with heavy-ball momentum 0.9 (threshold 3.8 / eta)")
    p.add_argument("--mup-adam-lr", type=float, default=5e-3, help="Adam on a muP MLP")
    p.add_argument("--mup-base", type=int, default=64, help="muP base width")
    p.add_argument("--steps", type=int, default=900, help="steps per optimizer")
    p.add_argument("--every", type=int, default=5, help="measure the sharpness every N steps")
    p.add_argument("--seed", type=int, default=0, help="init seed (the data seed is 0)")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.n, args.steps, args.every = 64, 128, 60, 10
    return args


def train(kind: str, args: argparse.Namespace, data: tuple[torch.Tensor, torch.Tensor],
          folder: Path) -> dict[str, Any]:
    """One full-batch run with a Monitor logging the (preconditioned) sharpness."""
    x, y = data
    torch.manual_seed(args.seed)
    par = cl.MuP(base_width=args.mup_base, sigma=1.0) if kind == "mup_adam" else cl.SP(sigma=1.0)
    model = cl.models.MLP(width=args.width, depth=3, parametrization=par,
                          d_in=x.shape[1], d_out=y.shape[1]).to(DTYPE)
    opt: torch.optim.Optimizer
    if kind == "gd":
        opt = torch.optim.SGD(model.parameters(), lr=args.gd_lr)
        measurement = cl.Sharpness(every=args.every)  # raw: threshold 2 / eta
    elif kind == "momentum":
        opt = torch.optim.SGD(model.parameters(), lr=args.momentum_lr, momentum=0.9)
        measurement = cl.Sharpness(every=args.every)  # raw: threshold (2 + 2 beta) / eta
    elif kind == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.adam_lr, betas=(0.9, 0.999), eps=1e-8)
        measurement = cl.Sharpness(every=args.every, preconditioned="adam")  # 38 / eta
    else:  # muP's per-layer Adam LRs, in the preconditioner through the LR scales
        opt = par.optimizer(model, "adam", args.mup_adam_lr, betas=(0.9, 0.999), eps=1e-8)
        measurement = cl.Sharpness(every=args.every, preconditioned="adam")  # 38 / eta
    losses = []
    path = folder / f"{kind}.h5"
    start = time.perf_counter()
    with cl.RunLogger(path, {"optimizer": kind, "width": args.width, "seed": args.seed}) as log:
        monitor = cl.Monitor(model, cl.testing.mse, (x, y), log, [measurement], optimizer=opt,
                             seed=args.seed)
        monitor.on_train_start()
        for step in range(1, args.steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = cl.testing.mse(model(x), y)  # loss at the parameters before this step
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            monitor.on_train_batch_end(step)
        monitor.on_train_end()
    seconds = time.perf_counter() - start
    metric = cl.load_run(path).metrics[measurement.name]
    if metric.threshold is None:
        raise RuntimeError(f"{kind}: the Monitor stored no threshold for {measurement.name}")
    ratio = metric.value / metric.threshold  # (T,)
    reached = np.flatnonzero(ratio >= REACH)
    out: dict[str, Any] = {
        "optimizer": kind, "lr": float(opt.defaults["lr"]), "metric": measurement.name,
        "threshold": float(metric.threshold), "steps": metric.step.tolist(),
        "sharpness": metric.value.tolist(), "ratio": ratio.tolist(), "loss": losses,
        "initial_ratio": float(ratio[0]), "final_loss": losses[-1],
        "mean_matvecs_per_measurement": float(np.mean(measurement.num_matvecs)),
        "seconds": round(seconds, 1),
    }
    if reached.size:
        first = int(reached[0])
        after = ratio[first:]
        loss_after = np.asarray(losses[int(metric.step[first]):])
        out.update(first_step_reached=int(metric.step[first]), min_ratio_after=float(after.min()),
                   max_ratio_after=float(after.max()), mean_ratio_after=float(after.mean()),
                   share_within_10pct_after=float(np.mean(np.abs(after - 1) <= 0.1)),
                   loss_increases_after=int(np.sum(np.diff(loss_after) > 0)),
                   largest_loss_jump_after=float(np.max(loss_after[1:] / loss_after[:-1]))
                   if loss_after.size > 1 else 1.0)
    else:
        out.update(first_step_reached=None, min_ratio_after=None, max_ratio_after=None,
                   mean_ratio_after=None, share_within_10pct_after=None,
                   loss_increases_after=None, largest_loss_jump_after=None)
    out["reached"] = bool(reached.size)
    # The level it settles at: the median ratio over the last third of the measurements.
    out["level"] = float(np.median(ratio[2 * len(ratio) // 3:]))
    out["level_in_range"] = bool(LEVEL[0] <= out["level"] <= LEVEL[1])
    out["stays_in_band"] = bool(reached.size and BAND[0] <= out["min_ratio_after"]
                                and out["max_ratio_after"] <= BAND[1])
    return out


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8.5, 7.0), sharex=True,
                                      constrained_layout=True)
    colors = {"gd": "tab:blue", "momentum": "tab:green", "adam": "tab:orange",
              "mup_adam": "tab:purple"}
    labels = {"gd": "GD, lambda_max(H) / (2/eta), eta = {lr:g}",
              "momentum": "SGD momentum 0.9, lambda_max(H) / (3.8/eta), eta = {lr:g}",
              "adam": "Adam, lambda_max(P^-1/2 H P^-1/2) / (38/eta), eta = {lr:g}",
              "mup_adam": "muP + Adam, lambda_max(P^-1/2 H P^-1/2) / (38/eta), eta = {lr:g}"}
    names = {"gd": "GD", "momentum": "SGD momentum", "adam": "Adam", "mup_adam": "muP + Adam"}
    top.axhspan(*BAND, color="0.9", label=f"asserted band {BAND[0]}-{BAND[1]} x threshold")
    top.axhline(1.0, color="crimson", ls="--", lw=1.3, label="each run's own threshold")
    top.axhline(REACH, color="0.5", ls=":", lw=1.0, label=f"{REACH} x threshold (reached)")
    for kind, res in results.items():
        c = colors[kind]
        top.plot(res["steps"], res["ratio"], color=c, lw=1.3,
                 label=labels[kind].format(lr=res["lr"]))
        if res["first_step_reached"] is not None:
            top.axvline(res["first_step_reached"], color=c, ls=":", lw=1.0)
        bottom.plot(np.arange(len(res["loss"])), res["loss"], color=c, lw=1.1,
                    label=f"{names[kind]}, eta = {res['lr']:g}")
    top.set_ylabel("sharpness / stability threshold\n(dimensionless)")
    top.set_ylim(0, 1.3)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, frameon=False, loc="lower right")
    top.set_title("Edge of stability, full batch (Cohen et al. 2021, arXiv:2103.00065; "
                  "2022, arXiv:2207.14484)\nReLU MLP width 256 (SP; muP, base 64, for muP + Adam), "
                  "teacher regression, MSE "
                  "(dotted verticals: first reach 0.9)", fontsize=10)
    bottom.set_yscale("log")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("training loss (MSE, log scale)")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8, frameon=False)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(1)  # small models: one thread is faster on a shared 2-core CPU
    start, load_start = time.perf_counter(), os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    x, y = make_dataset("teacher", args.n, seed=0)  # (n, 16), (n, 4)
    data = (x.to(DTYPE), y.to(DTYPE))
    with tempfile.TemporaryDirectory(prefix="curvlab_eos_") as tmp:
        results = {kind: train(kind, args, data, Path(tmp)) for kind in KINDS}
    plot(results, args.out / f"{NAME}.png")
    assertions = {}
    for kind, res in results.items():
        assertions[f"{kind}_reaches_0.9_threshold"] = res["reached"]
        if kind != "momentum":  # it starts above its threshold and is thrown below it first
            assertions[f"{kind}_stays_within_0.75_1.15_after_reaching"] = res["stays_in_band"]
        assertions[f"{kind}_level_within_0.85_1.1"] = res["level_in_range"]
    for res in results.values():  # keep the JSON small: the loss at every `every`-th step
        loss = res.pop("loss")
        res["loss_steps"] = list(range(0, len(loss), args.every))
        res["loss"] = [float(f"{v:.6g}") for v in loss[::args.every]]
        res["ratio"] = [round(v, 5) for v in res["ratio"]]
        res["sharpness"] = [float(f"{v:.7g}") for v in res["sharpness"]]
    summary: dict[str, Any] = {
        "name": NAME,
        "claim": "Full-batch GD: sharpness rises to 2/eta and hovers there. Full-batch Adam "
                 "(beta1 = 0.9): preconditioned sharpness rises to 38/eta and hovers there.",
        "paper": "Cohen et al. 2021, arXiv:2103.00065 (GD); Cohen et al. 2022, "
                 "arXiv:2207.14484 (adaptive methods)",
        "quick": args.quick,
        "settings": {"model": "cl.models.MLP(depth=3, SP(sigma=1.0), ReLU)", "width": args.width,
                     "data": "curvlab.sweep.make_dataset('teacher', n, seed=0)", "n": args.n,
                     "loss": "mse 0.5||f - y||^2, batch mean", "dtype": "float64",
                     "steps": args.steps, "every": args.every, "gd_lr": args.gd_lr,
                     "adam_lr": args.adam_lr, "adam_betas": [0.9, 0.999], "adam_eps": 1e-8,
                     "momentum_lr": args.momentum_lr, "momentum": 0.9,
                     "mup_adam_lr": args.mup_adam_lr, "mup_base_width": args.mup_base,
                     "reach": REACH, "band": list(BAND), "lanczos_tol": 1e-4,
                     "warm_start": True},
        "seeds": {"init": args.seed, "data": 0, "lanczos": "Monitor seed + step"},
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "results": results,
        "assertions": assertions,
        "passed": all(assertions.values()),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }
    (args.out / f"{NAME}.json").write_text(json.dumps(summary) + "\n")
    print_table(summary)
    return summary


def print_table(summary: dict[str, Any]) -> None:
    print(f"{NAME}: {summary['paper']} (wall time {summary['wall_time_s']} s)")
    print(f"{'opt':>5} {'eta':>7} {'threshold':>10} {'start':>6} {'reached@':>8} {'min':>6} "
          f"{'max':>6} {'mean':>6} {'final loss':>10} {'matvecs':>7}")
    for kind, r in summary["results"].items():
        fmt = (lambda v: f"{v:6.3f}" if v is not None else "   n/a")  # noqa: E731
        print(f"{kind:>5} {r['lr']:>7g} {r['threshold']:>10.4g} {r['initial_ratio']:>6.3f} "
              f"{r['first_step_reached']!s:>8} {fmt(r['min_ratio_after'])} "
              f"{fmt(r['max_ratio_after'])} {fmt(r['mean_ratio_after'])} "
              f"{r['final_loss']:>10.3g} {r['mean_matvecs_per_measurement']:>7.1f}")
    for name, ok in summary["assertions"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


if __name__ == "__main__":
    main()
