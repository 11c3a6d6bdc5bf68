"""Super consistency across widths (Noci et al. 2024, arXiv:2402.17457; docs/math.md section 8).

For a metric ``s(t, N)`` logged by runs at several widths ``N`` (one group per parametrization),
with ``N_max`` the widest run of the group:

- pointwise gap ``g(t, N) = |s(t, N) - s(t, N_max)| / |s(t, N_max)|`` on the steps all runs share;
- smoothed gap: the same on running means of ``s`` over ``window`` logged steps. At the edge of
  stability the sharpness oscillates around ``2 / eta`` from step to step; two runs sitting at the
  same edge then have large pointwise gaps although their trajectories coincide, so the smoothed
  gap is the one to read there (both are reported);
- per width the mean gap over ``t``, and the exponent ``beta`` of a least-squares fit
  ``mean gap ~ c N^(-beta)`` over the widths below ``N_max`` (``beta(t)`` per step likewise).

Super consistent: small gaps that do not grow with ``t``. Runs that share a width (several
seeds) are averaged first.

Also: :func:`sweep_report` (the report of ``curvlab sweep``), :func:`lr_report` (the best LR per
parametrization and width of an LR sweep, by the final loss) and :func:`run_summary` (``curvlab
inspect``: a run's config, environment and one line per metric).

Example:
    >>> import numpy as np, curvlab as cl
    >>> from curvlab.runs import Metric, Run
    >>> def run(width, p, curve):
    ...     m = Metric("sharpness", np.arange(5), np.asarray(curve, float))
    ...     return Run(None, {"width": width, "parametrization": p}, {"sharpness": m}, {}, {})
    >>> runs = [run(64, "mup", [1, 2, 3, 4, 5]), run(128, "mup", [1, 2, 3, 4, 5]),
    ...         run(64, "ntp", [1, 1, 1, 1, 1]), run(128, "ntp", [1, 2, 3, 4, 5])]
    >>> sc = cl.super_consistency(runs, metric="sharpness", window=1)
    >>> [round(float(sc.groups[p].mean_gap[0]), 3) for p in ("mup", "ntp")]  # mean |1 - t| / t
    [0.0, 0.543]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from curvlab.runs import Run, load_run


@dataclasses.dataclass(frozen=True)
class GroupConsistency:
    """One group's gaps; arrays over ``widths`` (the widest, the reference, last)."""

    widths: np.ndarray  # (W,)
    steps: np.ndarray  # (T,)
    values: np.ndarray  # (W, T) the metric, seeds averaged
    gaps: np.ndarray  # (W, T) pointwise gaps to the widest
    smoothed_gaps: np.ndarray  # (W, T) gaps of running means
    mean_gap: np.ndarray  # (W,)
    mean_smoothed_gap: np.ndarray  # (W,)
    beta: float  # fit of mean_gap ~ N^-beta over the narrower widths (NaN if fewer than 2)
    beta_smoothed: float
    beta_t: np.ndarray  # (T,) exponent per step (smoothed gaps)


@dataclasses.dataclass(frozen=True)
class SuperConsistency:
    """Per-group results of :func:`super_consistency` and a text table."""

    metric: str
    by: str
    group: str
    window: int
    groups: dict[str, GroupConsistency]

    def table(self) -> str:
        lines = [f"super consistency of {self.metric!r} across {self.by} (gap to the widest run; "
                 f"smoothed: running mean over {self.window} logged steps)", "",
                 f"| {self.group} | {self.by} | mean gap | mean smoothed gap |",
                 "|---|---:|---:|---:|"]
        for name, g in self.groups.items():
            for w, a, b in zip(g.widths, g.mean_gap, g.mean_smoothed_gap, strict=True):
                lines.append(f"| {name} | {w:g} | {a:.3f} | {b:.3f} |")
            lines.append(f"| {name} | fit exponent beta | {g.beta:.2f} | {g.beta_smoothed:.2f} |")
        return "\n".join(lines) + "\n"

    def mean_gap(self, name: str, smoothed: bool = True) -> float:
        """Mean over the narrower widths of a group's mean gap (the report's summary number)."""
        g = self.groups[name]
        gaps = (g.mean_smoothed_gap if smoothed else g.mean_gap)[:-1]
        return float(np.mean(gaps)) if gaps.size else float("nan")


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean along the last axis (shorter windows at the start)."""
    csum = np.cumsum(np.pad(values, [(0, 0)] * (values.ndim - 1) + [(1, 0)]), axis=-1)
    idx = np.arange(values.shape[-1])
    start = np.maximum(idx + 1 - window, 0)
    return (csum[..., idx + 1] - csum[..., start]) / (idx + 1 - start)


def _fit_beta(widths: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """``-slope`` of ``log gap`` against ``log width`` along axis 0 of ``gaps (W,)`` or
    ``(W, T)``; NaN with fewer than two widths."""
    flat = gaps.reshape(gaps.shape[0], -1)  # (W, T')
    if widths.size < 2:
        return np.full(flat.shape[1], np.nan).reshape(gaps.shape[1:])
    logs = np.log(np.maximum(flat, 1e-300))  # (W, T')
    x = np.log(widths) - np.log(widths).mean()  # (W,)
    slope = (x[:, None] * (logs - logs.mean(0))).sum(0) / (x**2).sum()  # (T',)
    return (-slope).reshape(gaps.shape[1:])


def _key(run: Run, name: str, call: str) -> Any:
    if name not in run.config:
        raise ValueError(f"{call}: run {run.path} has no config key {name!r}; its keys are "
                         f"{sorted(run.config)}")
    return run.config[name]


def super_consistency(runs: Sequence[Run], metric: str = "sharpness_lr", by: str = "width",
                      group: str = "parametrization", window: int = 5) -> SuperConsistency:
    """Gaps of ``metric`` to the widest run, per ``group`` (see the module docstring)."""
    call = "super_consistency"
    if not runs:
        raise ValueError(f"{call}: no runs given")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"{call}: window must be a positive int, got {window!r}")
    grouped: dict[str, dict[float, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if metric not in run.metrics:
            raise ValueError(f"{call}: run {run.path} has no metric {metric!r}; it has "
                             f"{sorted(run.metrics)}")
        m = run.metrics[metric]
        if m.value.ndim != 1:
            raise ValueError(f"{call}: metric {metric!r} is not a scalar per step")
        grouped[str(_key(run, group, call))][float(_key(run, by, call))].append(m)
    results = {}
    for name, by_width in grouped.items():
        widths = np.array(sorted(by_width))
        steps = functools.reduce(np.intersect1d, [m.step for ms in by_width.values() for m in ms])
        values = np.array([np.mean([m.value[np.searchsorted(m.step, steps)] for m in by_width[w]],
                                   axis=0) for w in widths])  # (W, T)
        smooth = _running_mean(values, window)  # (W, T)
        with np.errstate(divide="ignore", invalid="ignore"):
            gaps = np.abs(values - values[-1]) / np.abs(values[-1])  # (W, T)
            sgaps = np.abs(smooth - smooth[-1]) / np.abs(smooth[-1])  # (W, T)
        mean_gap, mean_sgap = gaps.mean(axis=1), sgaps.mean(axis=1)  # (W,)
        narrow = widths[:-1]
        results[name] = GroupConsistency(
            widths, steps, values, gaps, sgaps, mean_gap, mean_sgap,
            float(_fit_beta(narrow, mean_gap[:-1])), float(_fit_beta(narrow, mean_sgap[:-1])),
            _fit_beta(narrow, sgaps[:-1]))
    return SuperConsistency(metric, by, group, window, dict(sorted(results.items())))


def sweep_report(runs: Sequence[Run], window: int = 5) -> str:
    """The sweep report: super consistency of the LR-preconditioned sharpness (pointwise and
    smoothed gaps, per parametrization), how close each run's sharpness comes to its EoS line,
    and the same gaps for the loss."""
    sharp = next((m for m in ("sharpness_lr", "sharpness_adam", "sharpness")
                  if all(m in r.metrics for r in runs)), None)
    if sharp is None:
        raise ValueError("sweep_report: the runs share no sharpness metric")
    sc = super_consistency(runs, metric=sharp, window=window)
    lines = ["# Sweep report", "", sc.table(), "| parametrization | mean gap over widths | "
             "mean smoothed gap |", "|---|---:|---:|"]
    for name in sc.groups:
        lines.append(f"| {name} | {sc.mean_gap(name, smoothed=False):.3f} | "
                     f"{sc.mean_gap(name):.3f} |")
    if "mup" in sc.groups and "ntp" in sc.groups:
        a, b = sc.mean_gap("mup"), sc.mean_gap("ntp")
        lines += ["", f"Smoothed gap ratio NTP / muP: {b / a:.1f}x "
                  f"({'muP is super consistent, NTP is not' if b >= 3 * a else 'no clear split'})."]
    lines += ["", "Sharpness against the edge of stability (final smoothed value / threshold):",
              "", "| parametrization | width | seed | lr | EoS threshold | final / threshold |",
              "|---|---:|---:|---:|---:|---:|"]
    for run in sorted(runs, key=lambda r: (str(r.config.get("parametrization")),
                                           r.config.get("width", 0), r.config.get("seed", 0))):
        m = run.metrics[sharp]
        if m.threshold and m.value.size:
            final = float(np.mean(m.value[-window:]))
            lines.append(f"| {run.config.get('parametrization')} | {run.config.get('width')} | "
                         f"{run.config.get('seed', '')} | "
                         f"{run.config.get('lr', float('nan')):.4g} | {m.threshold:.4g} | "
                         f"{final / m.threshold:.2f} |")
    if all("loss" in r.metrics for r in runs):
        lines += ["", super_consistency(runs, metric="loss", window=window).table()]
    return "\n".join(lines) + "\n"


def lr_report(runs: Sequence[Run], last: int = 10) -> str:
    """Best LR per (parametrization, width) by the final loss: the mean of the last ``last``
    logged losses (infinite for a run that diverged), as a Markdown table."""
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for r in runs:
        loss = r.metrics["loss"].value
        final = float(np.mean(loss[-last:])) if loss.size and "diverged" not in r.metrics \
            else float("inf")
        key = (str(r.config["parametrization"]), int(r.config["width"]))
        if key not in best or final < best[key][1]:
            best[key] = (float(r.config["lr"]), final)
    lines = ["# LR sweep report", "", "| parametrization | width | best lr | final loss |",
             "|---|---:|---:|---:|"]
    lines += [f"| {p} | {w} | {lr:.4g} | {v:.4g} |" for (p, w), (lr, v) in sorted(best.items())]
    return "\n".join(lines) + "\n"


def run_summary(path: str | os.PathLike[str]) -> str:
    """A run file's config, environment and one line per metric: its shape per step, rows, step
    span, last value (the first 6 entries of a vector) and EoS threshold."""
    run = load_run(path)
    lines = [f"run {run.path} (schema {run.attrs.get('schema_version')}, curvlab "
             f"{run.attrs.get('curvlab_version')}, created {run.attrs.get('created')})", "config:"]
    lines += [f"  {k} = {json.dumps(v)}" for k, v in sorted(run.config.items())]
    lines += ["env: " + ", ".join(f"{k}={v}" for k, v in sorted(run.env.items())), "metrics:"]
    if not run.metrics:
        lines.append("  (none)")
    for name, m in sorted(run.metrics.items()):
        shape = "x".join(map(str, m.value.shape[1:])) or "scalar"
        span = f"steps {m.step[0]}..{m.step[-1]}" if m.step.size else "no steps"
        last = m.value[-1] if m.value.size else None
        shown = (f"{last:.6g}" if np.ndim(last) == 0 else
                 "[" + ", ".join(f"{v:.4g}" for v in np.ravel(last)[:6])
                 + (", ...]" if np.size(last) > 6 else "]")) if last is not None else "-"
        extra = f", threshold {m.threshold:.6g}" if m.threshold is not None else ""
        lines.append(f"  {name:<28} {shape:<8} {len(m.step):>6} rows, {span}, last {shown}{extra}")
    return "\n".join(lines)
