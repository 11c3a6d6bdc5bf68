"""Reading run files: ``load_run`` and ``load_runs`` return plain numpy data, read-only.

The writer (:mod:`curvlab.hdf5`) builds on the rules defined here: the schema version, the
committed-row rule (:func:`committed_rows`) and how a file is opened for reading
(:func:`open_read`).

A file is opened with SWMR (so runs still being written, and files left by a killed writer, open
without repair), only committed rows are returned (see ``curvlab.hdf5``), and nothing in the file
is executed: the config is parsed as JSON, labels are strings.

Example:
    >>> import tempfile, pathlib, curvlab as cl
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "w64.h5"
    >>> with cl.RunLogger(path, {"width": 64}) as log:
    ...     log.log(0, sharpness=3.0)
    >>> [run.config["width"] for run in cl.load_runs(str(path.parent / "*.h5"))]
    [64]
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

SCHEMA_VERSION = 1
STEP_FILL = -1  # the pre-filled step of a row not yet committed


_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _stored_eof(path: Path) -> int | None:
    """End-of-file address recorded in a version 2/3 superblock (the format curvlab writes)."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head.startswith(_SIGNATURE) or len(head) < 48 or head[8] not in (2, 3):
        return None
    size = head[9]  # bytes per file offset
    start = 12 + 2 * size  # after version, sizes, flags, base address, extension address
    return int.from_bytes(head[start:start + size], "little")


def open_read(path: Path, call: str) -> h5py.File:
    """Open a run file read-only: a cleanly closed file directly; a file that a writer holds (or
    left behind when killed) in SWMR mode.

    The plain open is tried first because HDF5's SWMR reader retries failed metadata reads for a
    long time instead of failing, which would hang on a damaged file; the plain open fails fast on
    truncation and on the write flags that mark a file held (or left) by a SWMR writer.
    """
    if not path.exists():
        raise FileNotFoundError(f"{call}: no file at {path}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        first = err
    # A SWMR file is checked against the end of file its superblock recorded when SWMR writing
    # began; a file cut shorter than that is refused here (the SWMR reader would hang on it). A
    # SWMR file damaged beyond that point is not detected before reading.
    eof = _stored_eof(path)
    if eof is None or "truncated" in str(first) or path.stat().st_size < eof:
        raise ValueError(f"{call}: {path} is not a readable HDF5 file ({first}); it may be "
                         "truncated or not HDF5 at all") from None
    try:
        return h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as err:
        raise ValueError(f"{call}: {path} is not a readable HDF5 file ({err})") from None


def committed_rows(step: np.ndarray) -> int:
    """Number of leading rows whose step is written and strictly increasing."""
    if step.size == 0:
        return 0
    bad = (step == STEP_FILL) | np.r_[False, np.diff(step) <= 0]
    return int(np.argmax(bad)) if bad.any() else int(step.size)


@dataclasses.dataclass(frozen=True)
class Metric:
    """One logged metric: ``step (T,)`` and ``value (T,)`` or ``(T, k)``."""

    name: str
    step: np.ndarray
    value: np.ndarray
    labels: tuple[str, ...] | None = None
    description: str = ""
    threshold: float | None = None
    codes: tuple[str, ...] | None = None  # the text of each integer value, for coded metrics


@dataclasses.dataclass(frozen=True)
class Run:
    """A run file's contents: ``config`` (dict), ``metrics[name]``, ``attrs`` and ``env``."""

    path: Path
    config: dict[str, Any]
    metrics: Mapping[str, Metric]
    attrs: Mapping[str, Any]
    env: Mapping[str, str]

    def __getitem__(self, name: str) -> Metric:
        return self.metrics[name]

    def skipped(self, name: str) -> dict[int, str]:
        """``{step: reason}`` for the steps at which the Monitor skipped measurement ``name``
        (the metric ``<name>_skipped``; empty when it never skipped)."""
        m = self.metrics.get(f"{name}_skipped")
        if m is None:
            if name not in self.metrics:
                raise KeyError(f"Run.skipped: {self.path} has no metric {name!r} nor "
                               f"{name}_skipped; metrics: {sorted(self.metrics)}")
            return {}
        codes = m.codes or ()
        return {int(s): codes[int(v)] if 0 <= int(v) < len(codes) else f"code {int(v)}"
                for s, v in zip(m.step, m.value, strict=True)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (numbers, strings, lists)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def _read_metric(name: str, g: h5py.Group) -> Metric:
    if not isinstance(g, h5py.Group) or "step" not in g or "value" not in g:
        raise ValueError(f"metric {name!r} lacks its step/value datasets")
    step = np.asarray(g["step"][()], dtype=np.int64)  # (T,)
    value = np.asarray(g["value"][()], dtype=np.float64)  # (T,) or (T, k)
    rows = min(committed_rows(step), len(value))
    labels = tuple(_text(x) for x in g.attrs["labels"]) if "labels" in g.attrs else None
    threshold = float(g.attrs["threshold"]) if "threshold" in g.attrs else None
    codes = tuple(_text(x) for x in g.attrs["codes"]) if "codes" in g.attrs else None
    return Metric(name, step[:rows], value[:rows], labels, _text(g.attrs.get("description", "")),
                  threshold, codes)


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read the run file ``path`` (read-only; works while it is being written, or after a crash)."""
    call, path = "load_run", Path(path)
    with open_read(path, call) as f:
        if "schema_version" not in f.attrs or "config" not in f.attrs:
            raise ValueError(f"{call}: {path} is an HDF5 file but not a curvlab run (no "
                             "schema_version/config attributes)")
        version = int(f.attrs["schema_version"])
        if version > SCHEMA_VERSION:
            raise ValueError(f"{call}: {path} has schema version {version}; this curvlab reads "
                             f"up to {SCHEMA_VERSION}; upgrade curvlab")
        try:
            config = json.loads(_text(f.attrs["config"]))
        except json.JSONDecodeError as err:
            raise ValueError(f"{call}: the config of {path} is not valid JSON ({err})") from None
        try:
            metrics = {name: _read_metric(name, g) for name, g in f.get("metrics", {}).items()}
        except (ValueError, OSError, KeyError) as err:
            raise ValueError(f"{call}: {path} is damaged: {err}") from None
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
        env = {k: _text(v) for k, v in f["env"].attrs.items()} if "env" in f else {}
    return Run(path, config, metrics, attrs, env)


def load_runs(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Run]:
    """Load several runs: a glob pattern (``"runs/*.h5"``) or a list of paths, sorted by path."""
    call = "load_runs"
    if isinstance(paths, str | os.PathLike):
        found = sorted(glob.glob(os.fspath(paths)))
        if not found:
            raise ValueError(f"{call}: no file matches {os.fspath(paths)!r}")
    else:
        found = sorted(os.fspath(p) for p in paths)
        if not found:
            raise ValueError(f"{call}: no paths given")
    return [load_run(p) for p in found]
