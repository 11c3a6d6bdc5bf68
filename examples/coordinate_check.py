"""Coordinate check: how each layer's activations and their updates scale with width.

Claim (Yang & Hu 2021, "Feature Learning in Infinite-Width Neural Networks", arXiv:2011.14522;
Yang et al. 2022, "Tensor Programs V", arXiv:2203.03466, whose "coordinate check" this is): under
the maximal update parametrization (muP) every layer's activations are Theta(1) per coordinate at
initialization *and* move by Theta(1) per coordinate in a training step, at any width, with one
base learning rate. Under the neural tangent parametrization (NTP) the hidden features move by
``O(n^{-1/2})`` (lazy, kernel regime) while the output still moves by Theta(1); under the standard
parametrization (SP) with a width-independent LR the updates grow with width (the output's like
``n``, the hidden features' like ``n^{1/2}``) until training blows up.

Setting: a ReLU MLP of depth 4 (input layer, two hidden layers, output layer, biases;
``curvlab.models.MLP``) with 16 inputs and 10 outputs, widths 64-2048, under
``cl.MuP(base_width=64)`` (SGD multipliers: input and output weights and hidden biases at
``eta * n/64``, hidden weights and the output bias at ``eta``; output multiplier ``64/n``),
``cl.NTP()`` and ``cl.SP()``, all with curvlab's default init scale ``sigma = sqrt(2)`` and the
*same* base SGD learning rate ``eta = 0.02``, built by ``parametrization.optimizer(model, "sgd",
lr=eta)``. One fixed batch of 64 Gaussian inputs with targets ``y`` from a random tanh teacher,
loss ``mean_i 0.5 ||f - y||^2`` (``cl.testing.mse``). Three init seeds per width; values are
averaged over seeds before fitting.

Centered targets: each network is trained on ``y + f_0(x)`` (its own output at init added to the
targets), so that the initial residual is ``-y`` at every width, as in the infinite-width limit
where muP's output at init vanishes. Without this, muP's first step is dominated by the residual's
batch mean, which at init is the network's own output offset; that offset shrinks like
``n^{-1/2}`` under muP (it is SP's at the base width), so the raw one-step change falls with width
at these widths (slopes about -0.2 to -0.4) for a reason that has nothing to do with the
parametrization's update scaling. Both are reported; the claims are asserted on the centered run.

Measured per layer (the pre-activations ``layers.0`` ... ``layers.3``, curvlab's default layers):
the RMS of the activations at init; the RMS of their change after one real SGD step
(``cl.feature_change``, the "delta coordinate check"); and the RMS of ``f_l(5) - f_l(0)`` after five
full-batch SGD steps (a run whose loss exceeds 1000x its initial value counts as diverged and is
left out). Each is summarised by the slope of a least-squares fit of ``log(RMS)`` on
``log(width)`` (slope 0: flat in width).

Run (from the repository root; about a minute on a 2-core CPU, a few seconds with ``--quick``):

    python examples/coordinate_check.py [--out docs/reproductions] [--quick] [--lr 0.02]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import curvlab as cl

NAME = "coordinate_check"
ROOT = Path(__file__).resolve().parents[1]
FULL = {"widths": [64, 128, 256, 512, 1024, 2048], "depth": 4, "d_in": 16, "d_out": 10,
        "batch": 64, "seeds": [0, 1, 2], "lr": 0.02, "sigma": 2 ** 0.5, "target_scale": 1.0,
        "steps": [1, 5], "data_seed": 1234}
QUICK = {**FULL, "widths": [32, 64, 128], "seeds": [0], "steps": [1, 2]}
PARAMETRIZATIONS = ("mup", "ntp", "sp")

# Thresholds on the slope of the one-step change (see docs/reproductions.md#coordinate_check).
MUP_FLAT = 0.15  # |slope| <= this for every layer under muP
NTP_SHRINK = -0.3  # slope below this for the input and hidden layers under NTP (theory -1/2)
NTP_OUTPUT_FLAT = 0.15  # |slope| <= this for the NTP output layer (theory 0: the NTK is Theta(1))
SP_OUTPUT_GROWS = 0.3  # slope above this for the SP output layer (theory +1)
DIVERGED = 1e3  # a multi-step run whose loss exceeds this times its initial loss has diverged


def make_batch(cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (batch, d_in) ~ N(0, I)``, ``y = tanh(x A) B`` with a fixed random teacher."""
    g = torch.Generator().manual_seed(cfg["data_seed"])
    x = torch.randn(cfg["batch"], cfg["d_in"], generator=g)  # (b, d_in)
    a = torch.randn(cfg["d_in"], 32, generator=g) / cfg["d_in"] ** 0.5  # (d_in, 32)
    b = torch.randn(32, cfg["d_out"], generator=g) / 32 ** 0.5  # (32, d_out)
    return x, cfg["target_scale"] * torch.tanh(x @ a) @ b  # (b, d_out)


def parametrization(name: str, base_width: int, sigma: float) -> cl.models.Parametrization:
    return {"mup": cl.MuP(base_width=base_width, sigma=sigma), "ntp": cl.NTP(sigma=sigma),
            "sp": cl.SP(sigma=sigma)}[name]


def features(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the modules ``names`` on ``x`` (no grad, eval mode)."""
    model.eval()
    with torch.no_grad(), cl.layers.recording(model, names) as rec:
        model(x)
    return [f.clone() for f in rec.features(names, "coordinate_check")]


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def measure(cfg: dict[str, Any], par: str, width: int, seed: int,
            batch: tuple[torch.Tensor, torch.Tensor], center: bool) -> dict[str, Any]:
    """Init RMS, one-step change (``cl.feature_change``) and the change after each of
    ``cfg["steps"]`` SGD steps (own loop), per layer. ``center``: train on ``y + f_0(x)`` so
    that the initial residual is ``-y`` at every width (as if the init output were 0)."""
    x, y = batch
    torch.manual_seed(seed)  # curvlab's models draw their init from the global generator
    p = parametrization(par, cfg["widths"][0], cfg["sigma"])
    model = cl.models.MLP(width, cfg["depth"], p, d_in=cfg["d_in"], d_out=cfg["d_out"])
    opt = p.optimizer(model, "sgd", lr=cfg["lr"])
    if center:
        model.eval()
        with torch.no_grad():
            y = y + model(x)  # (b, d_out): the residual f_0 - y' is -y
        batch = (x, y)
    one = cl.feature_change(model, cl.testing.mse, batch, opt)
    names = list(one.layers)
    before = features(model, names, x)
    out: dict[str, Any] = {"layers": names, "init_rms": one.feature_rms.tolist(),
                           "change_rms_1": one.change_rms.tolist()}
    last, first_loss, diverged = max(cfg["steps"]), None, False
    for step in range(1, last + 1):
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = cl.testing.mse(model(x), y)
        value = float(loss.detach())
        first_loss = value if first_loss is None else first_loss
        # diverged: the loss left [0, DIVERGED * initial loss] (or is not finite)
        diverged = diverged or not value <= DIVERGED * first_loss
        loss.backward()
        opt.step()
        if step in cfg["steps"]:
            after = features(model, names, x)
            out[f"own_change_rms_{step}"] = [
                None if diverged or not torch.isfinite(a).all() else rms(a - b)
                for a, b in zip(after, before, strict=True)]
    out["diverged"] = diverged
    return out


def slope(widths: list[int], values: list[float | None]) -> float | None:
    """Least-squares slope of ``log(value)`` on ``log(width)`` over the finite values."""
    pts = [(w, v) for w, v in zip(widths, values, strict=True)
           if v is not None and np.isfinite(v) and v > 0]
    if len(pts) < 2:
        return None
    w, v = np.array(pts).T
    return float(np.polyfit(np.log(w), np.log(v), 1)[0])


def run(cfg: dict[str, Any], center: bool) -> dict[str, Any]:
    batch = make_batch(cfg)
    quantities = ["init_rms", "change_rms_1"] + [f"own_change_rms_{s}" for s in cfg["steps"]]
    results: dict[str, Any] = {}
    for par in PARAMETRIZATIONS:
        per_width = {}
        for width in cfg["widths"]:
            runs = [measure(cfg, par, width, s, batch, center) for s in cfg["seeds"]]
            names = runs[0]["layers"]
            entry: dict[str, Any] = {}
            for q in quantities:
                vals = []
                for i in range(len(names)):
                    seen = [r[q][i] for r in runs]
                    vals.append(None if any(v is None for v in seen) else float(np.mean(seen)))
                entry[q] = vals
            entry["diverged_seeds"] = [s for s, r in zip(cfg["seeds"], runs, strict=True)
                                       if r["diverged"]]
            per_width[width] = entry
        table: dict[str, Any] = {"layers": names, "values": {}, "slopes": {},
                                 "diverged_widths": [w for w in cfg["widths"]
                                                     if per_width[w]["diverged_seeds"]]}
        for q in quantities:
            table["values"][q] = {str(w): per_width[w][q] for w in cfg["widths"]}
            table["slopes"][q] = {name: slope(cfg["widths"], [per_width[w][q][i]
                                                              for w in cfg["widths"]])
                                  for i, name in enumerate(names)}
        # feature_change (on a copy) against the first step of the own loop: must be equal
        table["feature_change_vs_own_step_max_rel_diff"] = max(
            abs(a / b - 1) for w in cfg["widths"]
            for a, b in zip(per_width[w]["change_rms_1"], per_width[w]["own_change_rms_1"],
                            strict=True) if a is not None and b)
        results[par] = table
    return results


def plot(res: dict[str, Any], raw: dict[str, Any], cfg: dict[str, Any], path: Path) -> None:
    quantities = [("init_rms", "activation RMS at init", res),
                  ("change_rms_1", "RMS change after 1 SGD step", res),
                  (f"own_change_rms_{max(cfg['steps'])}",
                   f"RMS change after {max(cfg['steps'])} SGD steps", res),
                  ("change_rms_1", "RMS change after 1 SGD step, raw targets", raw)]
    titles = {"mup": "muP", "ntp": "NTP", "sp": "SP"}
    fig, axes = plt.subplots(len(quantities), 3, figsize=(13, 13.5), constrained_layout=True,
                             sharex=True)
    widths = np.array(cfg["widths"], dtype=float)
    colors = ["C0", "C1", "C2", "C3"]
    for j, par in enumerate(PARAMETRIZATIONS):
        for i, (q, label, source) in enumerate(quantities):
            table = source[par]
            ax = axes[i, j]
            for k, name in enumerate(table["layers"]):
                vals = np.array([np.nan if v is None else v
                                 for v in (table["values"][q][str(w)][k] for w in cfg["widths"])])
                s = table["slopes"][q][name]
                tag = "n/a" if s is None else f"{s:+.2f}"
                role = ("input" if k == 0 else "output" if k == len(table["layers"]) - 1
                        else "hidden")
                ax.plot(widths, vals, "o-", color=colors[k % 4],
                        label=f"{name} ({role}): slope {tag}")
            bad = table["diverged_widths"]
            if q.startswith("own_change") and bad:
                ax.text(0.97, 0.03, f"diverged (loss > {DIVERGED:g}x initial)\nat widths "
                        f"{', '.join(map(str, bad))}: not drawn, not fitted",
                        transform=ax.transAxes, va="bottom", ha="right", fontsize=7)
                ref = vals[np.isfinite(vals)]
                if ref.size:  # the flat (width-independent) reference through the first point
                    ax.axhline(ref[0], color=colors[k % 4], ls=":", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{titles[par]}: {label}", fontsize=10)
            ax.set_ylabel(f"{label.split(' after')[0]} (RMS per coordinate)", fontsize=8)
            if i == len(quantities) - 1:
                ax.set_xlabel("width n (hidden units)")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"Coordinate check, ReLU MLP depth {cfg['depth']}, SGD base LR {cfg['lr']} "
                 "at every width (dotted: flat in width; slope = log-log fit)\n"
                 "rows 1-3: targets y + f_0(x) (initial residual -y at every width); row 4: "
                 "targets y\n"
                 "muP: flat; NTP: hidden updates shrink like n^-1/2; SP: updates grow "
                 "(Yang & Hu, arXiv:2011.14522; Yang et al., arXiv:2203.03466)", fontsize=11)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reproductions",
                        help="output folder (default: docs/reproductions)")
    parser.add_argument("--quick", action="store_true", help="a small smoke setting (< 30 s)")
    parser.add_argument("--lr", type=float, default=None, help="base SGD learning rate (0.02)")
    parser.add_argument("--sigma", type=float, default=None, help="base init scale (1.0)")
    parser.add_argument("--target-scale", type=float, default=None,
                        help="multiplies the teacher's targets (1.0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("lr", "sigma", "target_scale"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    res = run(cfg, center=True)
    raw = run(cfg, center=False)

    one = {par: res[par]["slopes"]["change_rms_1"] for par in PARAMETRIZATIONS}
    names = res["mup"]["layers"]
    inner, out_layer = names[:-1], names[-1]
    checks = {
        f"mup_one_step_change_flat_every_layer_abs_slope_le_{MUP_FLAT}":
            all(one["mup"][n] is not None and abs(one["mup"][n]) <= MUP_FLAT for n in names),
        f"ntp_one_step_change_input_hidden_slope_below_{NTP_SHRINK}":
            all(one["ntp"][n] is not None and one["ntp"][n] < NTP_SHRINK for n in inner),
        f"ntp_one_step_change_output_abs_slope_le_{NTP_OUTPUT_FLAT}":
            one["ntp"][out_layer] is not None and abs(one["ntp"][out_layer]) <= NTP_OUTPUT_FLAT,
        f"sp_one_step_change_output_slope_above_{SP_OUTPUT_GROWS}":
            one["sp"][out_layer] is not None and one["sp"][out_layer] > SP_OUTPUT_GROWS,
        f"mup_{max(cfg['steps'])}_step_change_flat_every_layer_abs_slope_le_{MUP_FLAT}": all(
            (v := res["mup"]["slopes"][f"own_change_rms_{max(cfg['steps'])}"][n]) is not None
            and abs(v) <= MUP_FLAT for n in names),
        "feature_change_equals_own_first_step": all(
            res[p]["feature_change_vs_own_step_max_rel_diff"] < 1e-4 for p in PARAMETRIZATIONS),
    }
    checks = {k: bool(v) for k, v in checks.items()}
    wall = time.perf_counter() - start
    result = {
        "name": NAME,
        "claim": "under muP each layer's activations and their one-step change are flat in "
                 "width; under NTP the hidden features' change shrinks; under SP (same LR) the "
                 "output's change grows",
        "papers": ["arXiv:2011.14522", "arXiv:2203.03466"],
        "quick": args.quick,
        "settings": {**cfg, "model": "curvlab.models.MLP (ReLU, biases)",
                     "parametrizations": {"mup": f"cl.MuP(base_width={cfg['widths'][0]})",
                                          "ntp": "cl.NTP()", "sp": "cl.SP()"},
                     "sigma": "curvlab default sqrt(2)", "optimizer": "sgd",
                     "loss": "cl.testing.mse", "dtype": "float32"},
        "seeds": {"init": cfg["seeds"], "data": cfg["data_seed"]},
        "torch_version": torch.__version__,
        "results": res,
        "one_step_change_slopes": one,
        "results_raw_targets": raw,
        "one_step_change_slopes_raw_targets": {
            par: raw[par]["slopes"]["change_rms_1"] for par in PARAMETRIZATIONS},
        "thresholds": {"mup_flat": MUP_FLAT, "ntp_shrink": NTP_SHRINK,
                       "ntp_output_flat": NTP_OUTPUT_FLAT, "sp_output_grows": SP_OUTPUT_GROWS},
        "assertions": checks,
        "wall_time_s": wall,
        "load_average_1min": {"start": load0, "end": os.getloadavg()[0]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(res, raw, cfg, args.out / f"{NAME}.png")
    (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")

    steps = max(cfg["steps"])
    print(f"slopes d log RMS / d log width, widths {cfg['widths']}, lr {cfg['lr']}")
    print(f"{'par':>4} {'layer':>9} {'init':>7} {'1 step':>7} {f'{steps} steps':>8}")
    for par in PARAMETRIZATIONS:
        s = res[par]["slopes"]
        for n in names:
            cells = [s[q][n] for q in ("init_rms", "change_rms_1", f"own_change_rms_{steps}")]
            text = [" n/a" if c is None else f"{c:+.2f}" for c in cells]
            print(f"{par:>4} {n:>9} {text[0]:>7} {text[1]:>7} {text[2]:>8}")
    raw_mup = result["one_step_change_slopes_raw_targets"]["mup"]
    print("raw targets (no centering), muP one-step slopes: "
          + ", ".join(f"{n} {'n/a' if v is None else f'{v:+.2f}'}" for n, v in raw_mup.items()))
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    print(f"wall time {wall:.1f} s, load {load0:.2f}")
    return result


if __name__ == "__main__":
    main()
