"""Overlay figures of logged metrics across widths (matplotlib).

``plot_overlay(runs, metric="sharpness_lr", hue="width", col="parametrization")`` draws one
panel per ``col`` value and one line per ``hue`` value (a sequential colormap: darker = wider),
the edge-of-stability line ``2 / eta`` from the metric's ``threshold`` attribute, labelled axes and
a legend. Runs that share a panel and a hue (seeds) are drawn as their mean with their range as a
band. Vector metrics plot column ``index``: by default the largest of a top-k metric
(``ntk_top``) and the last layer of a per-layer one (``feature_cos_theta``).

Example:
    >>> import numpy as np, curvlab as cl
    >>> from curvlab.runs import Metric, Run
    >>> runs = [Run(None, {"width": w, "parametrization": "mup"},
    ...             {"loss": Metric("loss", np.arange(3), np.ones(3) / w)}, {}, {})
    ...         for w in (64, 128)]
    >>> fig = cl.plot_overlay(runs, metric="loss", eos=False)
    >>> len(fig.axes[0].lines)
    2
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from curvlab.runs import Run

LABELS = {"sharpness_lr": "LR-preconditioned sharpness", "sharpness": "sharpness",
          "sharpness_adam": "Adam-preconditioned sharpness", "loss": "training loss",
          "sharpness_adam_base": "Adam-preconditioned sharpness at the base LR",
          "sharpness_lr_base": "LR-preconditioned sharpness at the base LR",
          "ntk_top": "top NTK eigenvalue", "feature_cos_theta": "cos theta (feature speed)"}


def plot_overlay(runs: Sequence[Run], metric: str = "sharpness_lr", *, hue: str = "width",
                 col: str = "parametrization", eos: bool = True, log_steps: bool = False,
                 log_y: bool = False, index: int | None = None, title: str | None = None
                 ) -> Figure:
    """One panel per ``col`` value, one line per run coloured by ``hue`` (see module docstring)."""
    call = "plot_overlay"
    if not runs:
        raise ValueError(f"{call}: no runs given")
    if index is None:  # the largest of a top-k metric; the last layer of a per-layer one
        index = 0 if metric.endswith("_top") else -1
    panels: dict[Any, list[Run]] = defaultdict(list)
    for run in runs:
        if metric not in run.metrics:
            raise ValueError(f"{call}: run {run.path} has no metric {metric!r}; it has "
                             f"{sorted(run.metrics)}")
        panels[run.config.get(col, "")].append(run)
    hues = sorted({run.config.get(hue) for run in runs}, key=lambda v: (v is None, v))
    cmap = plt.get_cmap("viridis")
    colors = {h: cmap(0.15 + 0.7 * i / max(len(hues) - 1, 1)) for i, h in enumerate(hues)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False,
                             constrained_layout=True)
    for ax, (name, members) in zip(axes[0], sorted(panels.items(), key=lambda kv: str(kv[0])),
                                   strict=True):
        thresholds: set[float] = set()
        by_hue: dict[Any, list[Any]] = defaultdict(list)
        for run in members:
            by_hue[run.config.get(hue)].append(run.metrics[metric])
        for h in sorted(by_hue, key=lambda v: (v is None, v)):
            metrics = by_hue[h]  # several seeds: their mean, and their range as a band
            steps = functools.reduce(np.intersect1d, [m.step for m in metrics])
            values = np.array([(m.value if m.value.ndim == 1 else m.value[:, index])[
                np.searchsorted(m.step, steps)] for m in metrics])  # (seeds, T)
            x = np.maximum(steps, 1) if log_steps else steps
            ax.plot(x, values.mean(0), color=colors[h], lw=1.6, label=f"{hue} {h}")
            if len(metrics) > 1:
                ax.fill_between(x, values.min(0), values.max(0), color=colors[h], alpha=0.15,
                                lw=0)
            thresholds.update(round(m.threshold, 12) for m in metrics if m.threshold is not None)
        if eos:
            for i, t in enumerate(sorted(thresholds)):
                label = "Adam EoS (2 + 2 b1) / ((1 - b1) eta)" if "adam" in metric \
                    else "EoS 2/eta"
                ax.axhline(t, color="crimson", ls="--", lw=1.2, label=label if i == 0 else None)
        lr = {r.config.get("lr") for r in members}
        lr_text = f", lr {lr.pop():.3g}" if len(lr) == 1 and None not in lr else ""
        ax.set_title(f"{col} {name}{lr_text}" if name != "" else metric)
        ax.set_xlabel("step")
        ax.set_ylabel(LABELS.get(metric, metric))
        if log_steps:
            ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def plot_metrics(run: Run, metrics: Sequence[str], *, eos: bool = True, log_y: bool = False,
                 index: int | None = None, title: str | None = None) -> Figure:
    """Several metrics of one run on one axis, each with its threshold line (dashed, same
    colour) and its skipped steps (``<name>_skipped``) as ticks at the bottom.

    Made for a sharpness under an LR schedule: ``["sharpness_adam", "sharpness_adam_base"]``
    shows the sharpness of the scheduled step and the one at the base LR, whose line the
    scheduled curve approaches as the warm-up ends.
    """
    call = "plot_metrics"
    missing = [m for m in metrics if m not in run.metrics]
    if not metrics or missing:
        raise ValueError(f"{call}: run {run.path} lacks metrics {missing or 'none given'}; it has "
                         f"{sorted(run.metrics)}")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(metrics):
        m, color = run.metrics[name], colors(i % 10)
        column = (0 if name.endswith("_top") else -1) if index is None else index
        values = m.value if m.value.ndim == 1 else m.value[:, column]  # (T,)
        ax.plot(m.step, values, color=color, lw=1.6, label=LABELS.get(name, name))
        if eos and m.threshold is not None:
            ax.axhline(m.threshold, color=color, ls="--", lw=1.0,
                       label=f"threshold of {name} ({m.threshold:.3g})")
        skipped = run.skipped(name)
        if skipped:
            ax.plot(sorted(skipped), np.zeros(len(skipped)), "|", color=color, ms=12,
                    transform=ax.get_xaxis_transform(), label=f"{name} skipped")
    ax.set_xlabel("step")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    return fig


def plot_lr_sweep(runs: Sequence[Run], *, hue: str = "width", col: str = "parametrization",
                  metric: str = "loss", last: int = 10) -> Figure:
    """Final ``metric`` (mean of the last ``last`` logged values; diverged runs at the top) against
    the learning rate, one line per ``hue`` value, the optimum of each line marked."""
    if not runs:
        raise ValueError("plot_lr_sweep: no runs given")
    panels: dict[Any, dict[Any, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        m = run.metrics[metric]
        final = float(np.mean(m.value[-last:])) if m.value.size else np.nan
        if "diverged" in run.metrics or not np.isfinite(final):
            final = np.inf
        panels[run.config.get(col, "")][run.config.get(hue)].append((run.config["lr"], final))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False,
                             constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    for ax, (name, lines) in zip(axes[0], sorted(panels.items(), key=lambda kv: str(kv[0])),
                                 strict=True):
        finite = [v for pts in lines.values() for _, v in pts if np.isfinite(v)]
        cap = max(finite) * 1.5 if finite else 1.0
        for i, (h, pts) in enumerate(sorted(lines.items())):
            pts.sort()
            lr = np.array([p[0] for p in pts])
            val = np.minimum(np.array([p[1] for p in pts]), cap)
            c = cmap(0.15 + 0.7 * i / max(len(lines) - 1, 1))
            ax.plot(lr, val, "o-", color=c, label=f"{hue} {h}")
            best = int(np.argmin(val))
            ax.plot(lr[best], val[best], "*", color=c, ms=14, mec="k")
        ax.set_xscale("log")
        ax.set_yscale("log")
        grid = sorted({p[0] for pts in lines.values() for p in pts})
        ax.set_xticks(grid, [f"{v:g}" for v in grid])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"final {LABELS.get(metric, metric)}")
        ax.set_title(f"{col} {name} (star: best LR)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    return fig
