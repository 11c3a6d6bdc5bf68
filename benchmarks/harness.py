"""The shared harness of the benchmark scripts (``benchmarks/README.md``, section "Harness").

- :func:`options` (an argparse parent: ``--quick``, ``--out``, ``--device``, ``--threads``,
  ``--repeats``, ``--warmup``, ``--stats``, ``--malloc-tuning``), :func:`setup`, :func:`out_path`;
- :func:`time_interleaved`, :func:`time_call`: seconds per call after a warm-up, CUDA synchronized
  around every call; :func:`summary`: median, quartiles, min and max;
- :func:`paired_ratio`, :func:`pooled_ratio`: the median per-round ratio of two callables timed in
  the same rounds, with a 95% interval (order statistics; ``--stats bootstrap``: ``stats.py``);
- :func:`environment`, :func:`busy_seconds`, :func:`other_load`: the machine and its other load;
- :func:`save`, :func:`header`, :func:`write_section`: JSON, Markdown table, README sections.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
median = statistics.median


# ------------------------------------------------------------------ options

def options(*, repeats: tuple[int, int] | None = None, device: bool = True,
            stats: bool = False, threads: bool = True) -> argparse.ArgumentParser:
    """The common options as a parent parser (``ArgumentParser(parents=[options()])``).

    Always ``--quick`` and ``--out``; ``--device`` and ``--threads`` unless turned off;
    ``repeats=(full, quick)`` (a timing script) adds ``--repeats`` with those defaults,
    ``--warmup`` and ``--malloc-tuning``; ``stats`` adds ``--stats``. Then call :func:`setup`.
    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--quick", action="store_true", help="small problems, few repeats: a smoke "
                   "run of under two minutes")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/"
                   "results/<name>_<device>[_quick].json); the .md table goes next to it")
    if device:
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="default: cuda when available, else cpu")
    if threads:
        p.add_argument("--threads", type=int, default=None,
                       help="torch.set_num_threads (default: torch's; 1 with --quick)")
    if repeats:
        p.set_defaults(repeats_defaults=repeats)
        p.add_argument("--repeats", type=int, default=None,
                       help=f"timed rounds (default {repeats[0]}; {repeats[1]} with --quick)")
        p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
        p.add_argument("--malloc-tuning", action="store_true", help="make glibc's malloc keep "
                       "freed memory (keep_freed_memory; see benchmarks/README.md)")
    if stats:
        p.add_argument("--stats", choices=("simple", "bootstrap"), default="simple",
                       help="ratio intervals: order statistics of the median (simple, the "
                       "default) or a bootstrap (stats.py)")
    return p


def setup(args: argparse.Namespace) -> dict[str, int] | None:
    """Fill in ``--repeats``, apply ``--threads`` (1 with ``--quick``: a smoke run must not stall
    next to other work) and ``--malloc-tuning``; returns the malloc settings (``None``: as is)."""
    if hasattr(args, "repeats_defaults"):
        args.repeats = args.repeats or args.repeats_defaults[args.quick]
        del args.repeats_defaults
    if hasattr(args, "threads") and (args.threads or args.quick):
        torch.set_num_threads(args.threads or 1)
    if not getattr(args, "malloc_tuning", False):
        return None
    from malloc import keep_freed_memory  # opt-in

    return keep_freed_memory()


def out_path(args: argparse.Namespace, name: str, device: str = "cpu", suffix: str = "") -> Path:
    """``--out``, or ``results/<name>_<device><suffix>[_quick].json``."""
    return args.out or RESULTS / f"{name}_{device}{suffix}{'_quick' if args.quick else ''}.json"


# ------------------------------------------------------------------ timing

def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                     device: torch.device | str = "cpu",
                     before: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` rounds after ``warmup`` untimed rounds.

    Within a round every function runs once, in a rotating order, so that round ``r`` of two
    functions saw the same machine state (pair them with :func:`paired_ratio`). ``before`` runs,
    untimed, before each timed call (e.g. a ``torch.distributed`` barrier).
    """
    names, samples = list(fns), {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if before is not None:
                before()
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def time_call(fn: Callable[[], Any], repeats: int, warmup: int,
              device: torch.device | str = "cpu", before: Callable[[], Any] | None = None
              ) -> list[float]:
    """Seconds per call of one function (see :func:`time_interleaved`)."""
    return time_interleaved({"fn": fn}, repeats, warmup, device, before)["fn"]


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min and max of timings (seconds)."""
    q1, med, q3 = np.percentile(np.asarray(samples, dtype=float), [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(min(samples)),
            "max": float(max(samples)), "repeats": len(samples)}


# ------------------------------------------------------------------ ratios

def median_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval of the median of ``x``: the order statistics ``x_(j)`` and
    ``x_(n+1-j)`` with the largest ``j`` whose coverage, from the binomial (sign test), is at least
    ``level``; the min and the max when no such pair exists (fewer than 6 values at 95%)."""
    x, n = np.sort(np.asarray(x, dtype=float)), len(x)
    cdf, j = 0.0, 0  # cdf = P(B <= j - 1), B ~ Binomial(n, 1/2)
    while j < n // 2 and cdf + math.comb(n, j) / 2**n <= (1 - level) / 2:
        cdf += math.comb(n, j) / 2**n
        j += 1
    j = max(j, 1)
    return float(x[j - 1]), float(x[n - j])


def pooled_ratio(runs: list[dict[str, list[float]]], stats: str = "simple") -> dict[str, float]:
    """Median per-round ratio ``curvlab / other`` over the rounds of every run (process).

    ``low``/``high``: a 95% interval of that median, from :func:`median_interval` of all rounds
    pooled (``stats="simple"``) or from ``stats.bootstrap_interval`` (``"bootstrap"``: with
    several runs, processes and then rounds are resampled, so that it includes the variation
    between processes).
    """
    ratios = [np.asarray(r["curvlab"]) / np.asarray(r["other"]) for r in runs]  # each (rounds,)
    if stats == "bootstrap":
        from stats import bootstrap_interval  # opt-in: scipy and resampling only when asked

        low, high = bootstrap_interval(ratios)
    elif stats == "simple":
        low, high = median_interval(np.concatenate(ratios))
    else:
        raise ValueError(f"stats must be 'simple' or 'bootstrap', got {stats!r}")
    return {"median": float(np.median(np.concatenate(ratios))), "low": low, "high": high}


def paired_ratio(num: Sequence[float], den: Sequence[float], scale: float = 1.0,
                 stats: str = "simple") -> dict[str, float]:
    """Median over rounds of ``num[r] / (scale * den[r])`` with a 95% interval (one run of
    :func:`pooled_ratio`). Pairing by round cancels the slow drifts of a shared machine."""
    return pooled_ratio([{"curvlab": list(num), "other": [scale * d for d in den]}], stats)


def verdict(q: dict[str, float] | None) -> str:
    """A ratio against the target <= 1: met, not distinguishable from 1, or missed."""
    if q is None:
        return "n/a"
    if q["median"] <= 1:
        return "yes"
    return "within noise" if q["low"] <= 1 else "no"


def fmt(q: dict[str, float] | None) -> str:
    if q is None:
        return "n/a"
    return f"{q['median']:.3f} [{q['low']:.3f}, {q['high']:.3f}] ({verdict(q)})"


# ------------------------------------------------------------------ environment

def busy_seconds() -> tuple[float, float, float] | None:
    """``(wall, CPU seconds busy on the machine incl. steal, CPU seconds of this process and
    its finished children)``; ``None`` without ``/proc/stat``."""
    try:
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    own = os.times()
    return (time.perf_counter(), busy,
            own.user + own.system + own.children_user + own.children_system)


def other_load(start: tuple[float, float, float] | None) -> float | None:
    """Average number of cores busy with other work (other processes, steal) since ``start``."""
    end = busy_seconds()
    if start is None or end is None:
        return None
    wall, busy, own = (b - a for a, b in zip(start, end, strict=True))
    return max(0.0, busy - own) / max(wall, 1e-9)


def _git(*cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", *cmd], cwd=HERE, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device | str = "cpu", **extra: Any) -> dict[str, Any]:
    """torch and Python versions, device, CPU, threads, load, date and git commit (+ ``extra``)."""
    device = torch.device(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpus = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    cpu = cpus[0] if cpus else platform.processor() or platform.machine()
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cuda": torch.version.cuda if device.type == "cuda" else None, "cpu": cpu,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status), **extra}


# ------------------------------------------------------------------ output

def header(result: dict[str, Any], detail: str) -> list[str]:
    """The machine and run lines that open every benchmark's table."""
    env = result["environment"]
    load = env.get("other_load_cores_during_run")
    return [f"### {env.get('device', 'cpu')}: {env.get('device_name') or env.get('cpu', '?')}",
            f"torch {env['torch']}, Python {env['python']}, {env['torch_threads']} threads, "
            f"{env['date']}, commit {(env['git_commit'] or '?')[:10]}, {detail}; other load "
            "during the run: " + (f"{load:.2f} cores." if load is not None else "not measured."),
            ""]


def save(result: dict[str, Any], start: Any, out: Path, markdown_of: Callable[[dict], str],
         write_readme: Callable[[], None] | None = None) -> None:
    """Record the other load since ``start``, write ``out`` (JSON) and its ``.md`` table, print
    the table, and refresh the README section when ``out`` is a full run in ``results/``."""
    env = result["environment"]
    env["other_load_cores_during_run"] = other_load(start)  # above 0.1 cores: noisy timings
    env["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown_of(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    if (write_readme is not None and out.resolve().parent == RESULTS.resolve()
            and not result["settings"]["quick"]):
        write_readme()


def write_section(name: str, title: str, intro: str, markdown_of: Callable[[dict], str]) -> None:
    """Regenerate one benchmark's section of benchmarks/README.md from every full-run
    ``results/<name>_*.json``; other sections are kept (markers ``<!-- <name>.py:start -->``
    and ``<!-- <name>.py:end -->``)."""
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{name}_*.json"))]
    body = "\n".join(markdown_of(r) for r in runs if not r["settings"]["quick"])
    start, end = f"<!-- {name}.py:start -->", f"<!-- {name}.py:end -->"
    section = f"{start}\n## {title}\n\n{intro}\n\n{body}{end}\n"
    readme = HERE / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    readme.write_text(text)
