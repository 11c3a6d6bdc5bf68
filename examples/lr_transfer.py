"""Learning-rate transfer in width: the optimal LR settles under muP and drifts under SP.

Claim (Hayou 2025, "A Proof of Learning Rate Transfer under muP", arXiv:2511.01734; the
empirical observation is Yang et al. 2022, "Tensor Programs V", arXiv:2203.03466): under the
maximal update parametrization the learning rate that is best at one width is (close to) best at
every width, because the optimal LR converges to a nonzero constant as width grows; under the
standard parametrization it drifts toward zero.

Part (a), the theorem's setting, built from curvlab's parametrizations (float64).
- Model: a deep linear MLP ``f(x) = V^T W_L ... W_1 W_0 x`` with input ``x in R^d``, width ``n``,
  ``L`` hidden ``n x n`` layers and a scalar output: ``cl.models.MLP`` with no activation and no
  biases.
- Training: one full-batch step on the mean loss ``(1/m) sum_i 0.5 (f(x_i) - y_i)^2``, by
  ``parametrization.optimizer(model, "sgd", eta)``. Only the hidden layers ``W_1..W_L`` train;
  ``W_0`` and ``V`` are frozen.
- Parametrizations (``PARAMETRIZATIONS_A``):
  - ``cl.MuP(base_width=1, sigma=1)`` gives the paper's muP: ``W_0 ~ N(0, 1/d)``,
    ``W_l ~ N(0, 1/n)``, and a readout of multiplier ``1/n`` on ``N(0, 1)``, i.e.
    ``V ~ N(0, 1/n^2)``.
  - ``cl.SP(sigma=1)`` has ``V ~ N(0, 1/n)``.
  - ``cl.NTP(sigma=1)`` has ``N(0, 1)`` weights times ``1/sqrt(fan_in)``.
- LR convention: under muP and SP the hidden layers train at ``eta``, not scaled by width, as in
  the paper (muP-SGD's hidden weights take a width-independent LR, Yang et al. 2022, Table 3).
  Under NTP they train at ``eta`` on the raw weights, which is ``eta / n`` on the effective ones.
- Method: after one step the output is a polynomial of degree ``L`` in ``eta``, because each
  hidden layer moves by a rank-one matrix (``V`` is one vector). So the post-step loss is an
  exact polynomial of degree ``2L``. We compute its coefficients from the model's effective
  matrices and LR factors, minimize it globally on a log grid of ``eta``, and refine with scipy's
  bounded scalar minimizer. This is cross-checked against the real roots of its derivative, and
  against a real ``optimizer.step()`` on the model.
- Prediction: as ``n -> infinity`` under muP the optimum converges to
  ``eta_inf = (m / L) y^T K y / ||K y||^2`` with ``K = X X^T / d``, at rate ``O(n^{-1/2})``.
  This is the infinite-width limit of the one-step update ``f_1 = eta (L/m) K y`` from
  ``f_0 ~ 0``. Under SP the one-step NTK grows like ``n`` and the optimum falls like ``1/n``.
  Under NTP (reported, not asserted) the kernel is ``Theta(1)`` in its own LR units.

Part (b), a nonlinear check with curvlab's sweep: a 3-layer ReLU MLP (curvlab.models.MLP) trained
for 100 steps of full-batch GD on curvlab's teacher-student task (512 points, MSE), at widths 64,
256, 1024 under muP (base width 64) and SP, on a factor-2 LR grid 0.0125..0.4, one seed
(``curvlab.sweep.SweepConfig`` / ``run_sweep``). The best LR is the one with the lowest final loss
(mean of the last 10 steps; a diverged run counts as infinite).

Measured: (a) the optimal one-step LR per width and seed, its relative deviation
``|eta_n / eta_inf - 1|`` averaged over seeds under muP, and the SP optimum's decay per 4x width;
(b) the best LR per width under muP and SP.

Run (from the repository root; a few minutes on a 2-core CPU, under 30 s with ``--quick``):

    python examples/lr_transfer.py [--out docs/reproductions] [--quick] [--seeds 16]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.optimize import minimize_scalar

import curvlab as cl
from curvlab.sweep import SweepConfig, run_sweep

NAME = "lr_transfer"
ROOT = Path(__file__).resolve().parents[1]

# Part (a): the deep linear MLP (Hayou 2025, arXiv:2511.01734).
FULL_A = {"m": 64, "d": 16, "depth": 3, "noise": 0.1, "data_seed": 0,
          "widths": [64, 256, 1024, 4096], "seeds": 16, "sp_seeds": 4}
QUICK_A = {**FULL_A, "widths": [32, 64, 128], "seeds": 2, "sp_seeds": 2}
# Part (b): the ReLU MLP LR sweep (the README's LR sweep).
FULL_B = {"widths": [64, 256, 1024], "lrs": [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4], "steps": 100,
          "seeds": [0], "n": 512, "depth": 3, "dataset": "teacher"}
QUICK_B = {**FULL_B, "widths": [16, 32], "lrs": [0.05, 0.2], "steps": 5, "n": 64}

# Thresholds of the claims (see the docstring and docs/reproductions.md#lr_transfer).
MUP_DEV_AT_1024 = 0.15  # mean relative deviation from eta_inf at width 1024 (16 seeds)
MUP_DEV_AT_WIDEST = 0.05  # ... at the widest width (4096)
SP_DECAY_PER_4X = 2.0  # the SP optimum falls at least this factor per 4x width


# ----------------------------------------------------------------------------------- part (a)
def make_data(m: int, d: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear teacher: ``x ~ N(0, I_d)``, ``y = w^T x + noise`` with ``w ~ N(0, I/d)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=torch.float64)  # (m, d)
    w = torch.randn(d, generator=g, dtype=torch.float64) / d ** 0.5  # (d,)
    y = x @ w + noise * torch.randn(m, generator=g, dtype=torch.float64)  # (m,)
    return x, y


def eta_limit(x: torch.Tensor, y: torch.Tensor, depth: int) -> float:
    """``eta_inf = (m / L) y^T K y / ||K y||^2`` with ``K = X X^T / d`` (arXiv:2511.01734)."""
    m, d = x.shape
    ky = (x @ x.T / d) @ y  # (m,)
    return float(m / depth * (y @ ky) / (ky @ ky))


# curvlab's parametrizations in the paper's conventions: muP relative to base width 1 with
# sigma = 1 gives W_0 ~ N(0, 1/d), W_l ~ N(0, 1/n) and a readout V / n with V ~ N(0, 1), i.e.
# N(0, 1/n^2); SP gives V ~ N(0, 1/n); NTP gives N(0, 1) weights times 1/sqrt(fan_in).
PARAMETRIZATIONS_A = {"mup": cl.MuP(base_width=1, sigma=1.0), "sp": cl.SP(sigma=1.0),
                      "ntp": cl.NTP(sigma=1.0)}


def linear_mlp(n: int, d: int, depth: int, par: str, seed: int) -> torch.nn.Module:
    """``cl.models.MLP`` without biases or activations (``depth`` hidden layers), float64,
    initialized by ``PARAMETRIZATIONS_A[par]`` under ``torch.manual_seed(10_000 + seed)``; the
    input layer and the readout are frozen, as in the paper."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(10_000 + seed)
        model = cl.models.MLP(n, depth + 2, PARAMETRIZATIONS_A[par], d_in=d, d_out=1,
                              act=torch.nn.Identity, bias=False)
    finally:
        torch.set_default_dtype(default)
    for layer in (model.layers[0], model.layers[-1]):
        layer.weight.requires_grad_(False)
    return model


def effective(model: torch.nn.Module, par: str
              ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[float]]:
    """The effective matrices ``W_0 (n, d)``, ``W_l (n, n)``, ``V (n,)`` (weight times forward
    multiplier) and each hidden layer's effective LR factor ``c_l``: the parametrization's LR
    multiplier times the forward multiplier squared (``W' = a W`` trained at ``lr`` moves like
    ``W'`` trained at ``a^2 lr``)."""
    opt = PARAMETRIZATIONS_A[par].optimizer(model, "sgd", 1.0)
    lrs = {id(q): g["lr"] for g in opt.param_groups for q in g["params"]}
    mats = [(layer.weight * layer.multiplier).detach() for layer in model.layers]
    rates = [lrs[id(layer.weight)] * layer.multiplier ** 2 for layer in model.layers[1:-1]]
    return mats[0], mats[1:-1], mats[-1][0], rates


def post_step_coefficients(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor,
                           ws: list[torch.Tensor], v: torch.Tensor, rates: list[float]
                           ) -> np.ndarray:
    """Coefficients ``c (L+1, m)`` of the post-step output ``f_1(x_i) = sum_k c[k, i] eta^k``.

    The gradient of the mean loss for hidden layer ``l`` is rank one, ``a_l g_l^T``, with the
    backward vector ``a_l = W_{l+1}^T ... W_L^T V`` (the same for every example: the net is linear
    with one output) and ``g_l = H_{l-1} r / m`` (``H_{l-1}`` the layer's inputs, ``r = f_0 - y``).
    So ``f_1 = V^T (W_L - eta c_L a_L g_L^T) ... (W_1 - eta c_1 a_1 g_1^T) H_0`` (``c_l`` the
    layers' effective LR factors): expand the product from the left as a polynomial of row
    vectors (matrix-vector products only).
    """
    m, depth = len(y), len(ws)
    hs = [w0 @ x.T]  # H_0 (n, m)
    for w in ws:
        hs.append(w @ hs[-1])  # H_l (n, m)
    r = v @ hs[-1] - y  # (m,) residual at init
    backs = [v]  # a_L, a_{L-1}, ..., a_1: each (n,)
    for w in reversed(ws[1:]):
        backs.append(w.T @ backs[-1])
    backs.reverse()  # backs[l-1] = a_l
    rows = [v]  # row-vector coefficients of V^T prod(...), each (n,)
    for layer in range(depth, 0, -1):
        w, a, g = ws[layer - 1], backs[layer - 1], hs[layer - 1] @ r / m  # g: (n,)
        new = [u @ w for u in rows] + [torch.zeros_like(v)]
        for k, u in enumerate(rows):
            new[k + 1] = new[k + 1] - rates[layer - 1] * (u @ a) * g
        rows = new
    return torch.stack([u @ hs[0] for u in rows]).numpy()  # (L+1, m)


def loss_polynomial(c: np.ndarray, y: np.ndarray) -> np.polynomial.Polynomial:
    """The post-step loss ``(1/m) sum_i 0.5 (sum_k c[k, i] eta^k - y_i)^2`` as a polynomial."""
    res = c.copy()
    res[0] -= y
    coef = sum(np.convolve(res[:, i], res[:, i]) for i in range(res.shape[1]))
    return np.polynomial.Polynomial(coef / (2 * len(y)))


def optimal_lr(p: np.polynomial.Polynomial, scale: float) -> tuple[float, float]:
    """Global minimizer of ``p`` over ``eta > 0``: a log grid ``scale * [1e-5, 1e3]`` then
    scipy's bounded minimizer between the grid neighbours. Returns ``(eta, eta_exact)`` where
    ``eta_exact`` is the best real positive root of ``p'`` (a cross-check)."""
    grid = scale * np.logspace(-5, 3, 4001)
    i = int(np.argmin(p(grid)))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    eta = float(minimize_scalar(p, bounds=(lo, hi), method="bounded",
                                options={"xatol": 1e-12 * hi}).x)
    roots = p.deriv().roots()
    roots = roots[(np.abs(roots.imag) < 1e-9 * np.abs(roots)) & (roots.real > 0)].real
    exact = float(roots[np.argmin(p(roots))]) if roots.size else float("nan")
    return eta, exact


def torch_step_loss(model: torch.nn.Module, par: str, x: torch.Tensor, y: torch.Tensor,
                    eta: float) -> float:
    """The post-step loss after one real step of ``parametrization.optimizer(model, "sgd",
    eta)`` on a copy of the model (checks the polynomial)."""
    model = copy.deepcopy(model)
    opt = PARAMETRIZATIONS_A[par].optimizer(model, "sgd", eta)
    (0.5 * ((model(x)[:, 0] - y) ** 2).mean()).backward()
    opt.step()
    with torch.no_grad():
        return float(0.5 * ((model(x)[:, 0] - y) ** 2).mean())


def part_a(cfg: dict[str, Any]) -> dict[str, Any]:
    x, y = make_data(cfg["m"], cfg["d"], cfg["noise"], cfg["data_seed"])
    depth = cfg["depth"]
    seeds = {"mup": list(range(cfg["seeds"])), "sp": list(range(cfg["sp_seeds"])),
             "ntp": list(range(cfg["sp_seeds"]))}
    eta_inf = eta_limit(x, y, depth)
    out: dict[str, Any] = {"eta_inf": eta_inf, "widths": cfg["widths"], "seeds": seeds}
    check_err, root_err = 0.0, 0.0
    curves = {}
    for par in ("mup", "sp", "ntp"):
        rows = []
        for n in cfg["widths"]:
            etas = []
            for s in seeds[par]:
                model = linear_mlp(n, cfg["d"], depth, par, s)
                w0, ws, v, rates = effective(model, par)
                p = loss_polynomial(post_step_coefficients(x, y, w0, ws, v, rates), y.numpy())
                eta, exact = optimal_lr(p, eta_inf / rates[0])
                root_err = max(root_err, abs(eta / exact - 1))
                etas.append(eta)
                if n == cfg["widths"][0] and s == 0:  # the polynomial against a real GD step
                    for e in (0.1 * eta, eta, 3 * eta):
                        real = torch_step_loss(model, par, x, y, e)
                        check_err = max(check_err, abs(p(e) / real - 1))
                    grid = eta_inf / rates[0] * np.logspace(-4, 1, 300)
                    curves[par] = (grid.tolist(), p(grid).tolist())
                del model, w0, ws, v
            e = np.array(etas)
            dev = np.abs(e / eta_inf - 1)
            rows.append({"width": n, "eta_opt": e.tolist(), "eta_opt_mean": float(e.mean()),
                         "rel_dev": dev.tolist(), "rel_dev_mean": float(dev.mean()),
                         "rel_dev_stderr": float(dev.std(ddof=1) / len(dev) ** 0.5)
                         if len(dev) > 1 else float("nan"),
                         "rel_dev_mean_seeds_0_2": float(dev[:3].mean())})
        out[par] = rows
    out["polynomial_vs_autograd_max_rel_err"] = check_err
    out["grid_refine_vs_derivative_roots_max_rel_err"] = root_err
    out["post_step_loss_curves_smallest_width_seed0"] = curves
    mup_dev = [r["rel_dev_mean"] for r in out["mup"]]
    widths = np.array(cfg["widths"], dtype=float)
    tail = widths >= 256
    out["mup_dev_slope_from_256"] = float(np.polyfit(np.log(widths[tail]), np.log(
        np.array(mup_dev)[tail]), 1)[0]) if tail.sum() >= 2 else float("nan")
    if tail.sum() >= 2 and len(seeds["mup"]) > 1:  # the same fit, with an interval over seeds
        devs = np.array([r["rel_dev"] for r in out["mup"]]).T[:, tail]  # (seeds, widths)
        out["mup_dev_exponent_from_256"] = cl.fit_exponent(widths[tail], devs).as_dict()
    sp_eta = [r["eta_opt_mean"] for r in out["sp"]]
    out["sp_decay_per_step"] = [sp_eta[i] / sp_eta[i + 1] for i in range(len(sp_eta) - 1)]
    ntp_eta = [r["eta_opt_mean"] for r in out["ntp"]]
    out["ntp_change_per_step"] = [ntp_eta[i + 1] / ntp_eta[i] for i in range(len(ntp_eta) - 1)]
    out["sp_width_ratio_per_step"] = [float(widths[i + 1] / widths[i])
                                      for i in range(len(widths) - 1)]
    return out


# ----------------------------------------------------------------------------------- part (b)
def part_b(cfg: dict[str, Any]) -> dict[str, Any]:
    sweep = SweepConfig(model="mlp", widths=tuple(cfg["widths"]), depths=(cfg["depth"],),
                        parametrizations=("mup", "sp", "ntp"), lrs=tuple(cfg["lrs"]),
                        steps=cfg["steps"], seeds=tuple(cfg["seeds"]), n=cfg["n"],
                        dataset=cfg["dataset"], every=cfg["steps"], probe_size=32)
    final: dict[str, dict[int, dict[float, list[float]]]] = {"mup": {}, "sp": {}, "ntp": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = run_sweep(sweep, Path(tmp) / "sweep", progress=False)
        for run in cl.load_runs([str(p) for p in paths]):
            c = run.config
            loss = run["loss"].value
            value = np.inf if "diverged" in run.metrics else float(np.mean(loss[-10:]))
            cell = final[c["parametrization"]].setdefault(c["width"], {})
            cell.setdefault(c["lr"], []).append(value)
    lrs = list(cfg["lrs"])
    out: dict[str, Any] = {"widths": cfg["widths"], "lrs": lrs}
    for par, table in final.items():
        loss = {w: [float(np.mean(table[w][lr])) for lr in lrs] for w in cfg["widths"]}
        best = {w: lrs[int(np.argmin(loss[w]))] for w in cfg["widths"]}
        out[par] = {"final_loss": {str(w): [v if np.isfinite(v) else None for v in loss[w]]
                                   for w in cfg["widths"]},
                    "best_lr": {str(w): best[w] for w in cfg["widths"]},
                    "best_lr_grid_index": [lrs.index(best[w]) for w in cfg["widths"]]}
    return out


# ----------------------------------------------------------------------------------- figure
def plot(a: dict[str, Any], b: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.2), constrained_layout=True)
    widths = np.array(a["widths"], dtype=float)
    eta_inf = a["eta_inf"]

    ax = axes[0, 0]
    for par, color, label in (("mup", "C0", "muP"), ("sp", "C3", "SP"), ("ntp", "C2", "NTP")):
        rows = a[par]
        for r in rows:
            ax.plot([r["width"]] * len(r["eta_opt"]), r["eta_opt"], ".", color=color, alpha=0.35)
        ax.plot(widths, [r["eta_opt_mean"] for r in rows], "o-", color=color,
                label=f"{label}: optimal one-step LR (mean over seeds)")
    ax.axhline(eta_inf, color="k", ls="--", label=f"prediction eta_inf = {eta_inf:.3g}")
    sp0 = a["sp"][0]["eta_opt_mean"]
    ax.plot(widths, sp0 * widths[0] / widths, ":", color="C3", label="1 / width")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width n (hidden units)")
    ax.set_ylabel("optimal learning rate eta (dimensionless)")
    ax.set_title("(a) deep linear MLP: one-step optimal LR (NTP: in its own LR units)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[0, 1]
    dev = [r["rel_dev_mean"] for r in a["mup"]]
    err = [r["rel_dev_stderr"] for r in a["mup"]]
    ax.errorbar(widths, dev, yerr=err, fmt="o-", color="C0", capsize=3,
                label=f"muP: mean |eta_n / eta_inf - 1| ({len(a['seeds']['mup'])} seeds, "
                      "+-1 s.e.)")
    for r in a["mup"]:
        ax.plot([r["width"]] * len(r["rel_dev"]), r["rel_dev"], ".", color="C0", alpha=0.35)
    ax.plot(widths, dev[0] * np.sqrt(widths[0] / widths), ":", color="gray",
            label="width^(-1/2) (theory's rate)")
    ax.axhline(MUP_DEV_AT_WIDEST, color="k", ls="--",
               label=f"threshold {MUP_DEV_AT_WIDEST} at the widest width")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width n (hidden units)")
    ax.set_ylabel("relative deviation from eta_inf (dimensionless)")
    ax.set_title(f"(a) muP converges to eta_inf (slope {a['mup_dev_slope_from_256']:.2f})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    cmap = plt.get_cmap("viridis")
    for ax, par, label in ((axes[1, 0], "mup", "muP"), (axes[1, 1], "sp", "SP")):
        lrs = np.array(b["lrs"])
        finite = [v for w in b["widths"] for v in b[par]["final_loss"][str(w)] if v is not None]
        cap = max(finite) * 1.5 if finite else 1.0
        for i, w in enumerate(b["widths"]):
            vals = np.array([cap if v is None else min(v, cap)
                             for v in b[par]["final_loss"][str(w)]])
            color = cmap(0.1 + 0.75 * i / max(len(b["widths"]) - 1, 1))
            ax.plot(lrs, vals, "o-", color=color, label=f"width {w}")
            best = int(np.argmin(vals))
            ax.plot(lrs[best], vals[best], "*", ms=15, color=color, mec="k")
            ax.axvline(lrs[best], color=color, ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(lrs, [f"{v:g}" for v in lrs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("base learning rate (GD)")
        ax.set_ylabel(f"final train loss (MSE, last 10 of {b.get('steps', '')} steps)")
        ax.set_title(f"(b) ReLU MLP LR sweep, {label} (star: best LR; diverged at top)",
                     fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Learning-rate transfer in width: muP keeps its optimal LR, SP does not "
                 "(Hayou 2025, arXiv:2511.01734)")
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reproductions",
                        help="output folder (default: docs/reproductions)")
    parser.add_argument("--quick", action="store_true", help="a small smoke setting (< 30 s)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="part (a): muP init seeds per width (default 16; quick 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    cfg_a = dict(QUICK_A if args.quick else FULL_A)
    if args.seeds is not None:
        cfg_a["seeds"] = args.seeds
    cfg_b = dict(QUICK_B if args.quick else FULL_B)

    t0 = time.perf_counter()
    a = part_a(cfg_a)
    time_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = part_b(cfg_b)
    b["steps"] = cfg_b["steps"]
    time_b = time.perf_counter() - t0

    mup_dev = {r["width"]: r["rel_dev_mean"] for r in a["mup"]}
    ws = cfg_a["widths"]
    upto = [w for w in ws if w <= 1024]
    best_mup = b["mup"]["best_lr_grid_index"]
    best_sp = b["sp"]["best_lr_grid_index"]
    checks = {
        "a_mup_deviation_falls_up_to_width_1024": all(
            mup_dev[u] > mup_dev[v] for u, v in itertools.pairwise(upto)),
        f"a_mup_deviation_below_{MUP_DEV_AT_1024}_at_width_1024":
            1024 in mup_dev and mup_dev[1024] < MUP_DEV_AT_1024,
        f"a_mup_deviation_below_{MUP_DEV_AT_WIDEST}_at_widest_width":
            mup_dev[ws[-1]] < MUP_DEV_AT_WIDEST,
        "a_mup_deviation_exponent_interval_holds_-1/2_and_excludes_0": bool(
            "mup_dev_exponent_from_256" in a
            and a["mup_dev_exponent_from_256"]["low"] <= -0.5 < a["mup_dev_exponent_from_256"]
            ["high"] < 0),
        f"a_sp_optimum_falls_{SP_DECAY_PER_4X:g}x_per_4x_width": all(
            d >= SP_DECAY_PER_4X for d, r in zip(a["sp_decay_per_step"],
                                                 a["sp_width_ratio_per_step"], strict=True)
            if r == 4),
        "a_polynomial_matches_autograd_step": a["polynomial_vs_autograd_max_rel_err"] < 1e-8,
        "b_mup_best_lr_same_at_every_width": len(set(best_mup)) == 1,
        "b_sp_best_lr_moves_at_least_one_grid_step": abs(best_sp[-1] - best_sp[0]) >= 1,
    }
    checks = {k: bool(v) for k, v in checks.items()}
    wall = time.perf_counter() - start
    result = {
        "name": NAME,
        "claim": "LR transfer in width: the one-step optimal LR converges to eta_inf under muP "
                 "and drifts to 0 under SP (deep linear MLP); the best LR of a ReLU MLP LR sweep "
                 "stays put under muP and moves under SP",
        "papers": ["arXiv:2511.01734", "arXiv:2203.03466"],
        "quick": args.quick,
        "settings": {"part_a": cfg_a, "part_b": cfg_b,
                     "part_a_lr_convention": "plain GD, one LR eta for the L hidden layers, not "
                                             "scaled by width; W_0 and V frozen",
                     "part_b_lr_convention": "curvlab MuP(base_width=smallest width) SGD "
                                             "multipliers / SP one LR everywhere"},
        "seeds": {"part_a_data": cfg_a["data_seed"], "part_a_init": a["seeds"],
                  "part_b": cfg_b["seeds"]},
        "torch_version": torch.__version__,
        "part_a": a,
        "part_b": b,
        "thresholds": {"mup_dev_at_1024": MUP_DEV_AT_1024, "mup_dev_at_widest": MUP_DEV_AT_WIDEST,
                       "mup_dev_exponent": "95% interval over seeds holds -1/2, excludes 0",
                       "sp_decay_per_4x": SP_DECAY_PER_4X},
        "assertions": checks,
        "wall_time_s": {"total": wall, "part_a": time_a, "part_b": time_b},
        "load_average_1min": {"start": load0, "end": os.getloadavg()[0]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(a, b, args.out / f"{NAME}.png")
    (args.out / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")

    print(f"(a) deep linear MLP, m={cfg_a['m']} d={cfg_a['d']} L={cfg_a['depth']}, "
          f"eta_inf = {a['eta_inf']:.4f}")
    print(f"{'width':>6} {'muP eta*':>9} {'muP |dev|':>10} {'SP eta*':>9} {'NTP eta*':>9} "
          f"{'NTP spread':>10}")
    for rm, rs, rn in zip(a["mup"], a["sp"], a["ntp"], strict=True):
        spread = np.std(rn["eta_opt"]) / rn["eta_opt_mean"]
        print(f"{rm['width']:>6} {rm['eta_opt_mean']:>9.4f} {rm['rel_dev_mean']:>10.4f} "
              f"{rs['eta_opt_mean']:>9.5f} {rn['eta_opt_mean']:>9.4f} {spread:>10.3f}")
    print(f"(b) ReLU MLP LR sweep, best LR per width {b['widths']}: "
          f"muP {list(b['mup']['best_lr'].values())}, SP {list(b['sp']['best_lr'].values())}, "
          f"NTP {list(b['ntp']['best_lr'].values())}")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    print(f"wall time {wall:.1f} s (a {time_a:.1f} s, b {time_b:.1f} s), load {load0:.2f}")
    return result


if __name__ == "__main__":
    main()
