"""HDF5 run files (schema version 1, docs/design.md): the crash-safe writer ``RunLogger``.

The reading side (the committed-row rule, opening held files, ``load_run``) is in
:mod:`curvlab.runs`, which this module builds on.

Layout: root attributes ``schema_version``, ``curvlab_version``, ``created``, ``config`` (JSON text)
and flat copies of the sweep keys; group ``env`` (attributes: torch version, device, dtype, ...);
one group per metric under ``metrics/`` with datasets ``step`` (int64, ``(T,)``) and ``value``
(float64, ``(T,)`` or ``(T, k)``), resizable and chunked, and attributes ``labels``,
``description`` and, where it applies, ``threshold``.

Crash safety and live reading. Appends run in HDF5's single-writer/multiple-reader mode (SWMR):
a writer killed at any moment leaves a file that opens with ``swmr=True`` and holds every flushed
step (a writer without SWMR, in the latest file format, leaves files that no mode opens). A row is
committed by writing ``value`` first and ``step`` last, each flushed; a reader keeps the rows whose
step is written (``step`` is pre-filled with -1) and strictly increasing. SWMR forbids creating
datasets or attributes, so structural changes (a new metric, environment entries) are made on a
copy of the closed file that then atomically replaces it (``os.replace``): a kill during the change
leaves the previous file. Files left by a killed writer keep HDF5's "open for write" flags; readers
open them with ``swmr=True`` and ``mode="a"`` rebuilds the file by copying its committed rows, so
no repair tool is ever needed. Nothing read from a file is executed: the config is JSON.

One writer per file: a RunLogger holds an exclusive OS lock (``flock``) on ``.<name>.lock`` beside
the run file while it is open (deleted on close), and a second RunLogger on the same path (any
mode, any process) is refused with an error that says what to do.

Example:
    >>> import tempfile, pathlib, curvlab as cl
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.h5"
    >>> with cl.RunLogger(path, {"width": 64, "lr": 0.1}) as log:
    ...     log.log(0, loss=1.0)
    ...     log.log(10, loss=0.5)
    ...     log.log_array(10, "cos_theta", [0.9, 0.5], labels=["0", "2"])
    >>> run = cl.load_run(path)
    >>> run.config["width"], run.metrics["loss"].step.tolist(), run.metrics["cos_theta"].labels
    (64, [0, 10], ('0', '2'))
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from curvlab.runs import SCHEMA_VERSION, STEP_FILL, load_run, open_read
from curvlab.writer_lock import WriterLock

SWEEP_KEYS = ("width", "depth", "parametrization", "lr", "seed", "model", "optimizer")
MODES = ("w-", "w", "a")


def _environment(extra: Mapping[str, Any] | None) -> dict[str, str]:
    import torch  # local: keeps the module light for readers

    env = {"torch": torch.__version__, "numpy": np.__version__, "h5py": h5py.__version__,
           "python": platform.python_version(), "platform": platform.platform(),
           **(extra or {})}
    return {str(k): str.__str__(str(v)) for k, v in env.items()}  # plain str: TorchVersion is not


def _config_json(config: Any, call: str) -> str:
    if not isinstance(config, Mapping):
        raise TypeError(f"{call}: config must be a dict, got {type(config).__name__}")
    try:
        return json.dumps(dict(config), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{call}: config must be JSON-serializable (numbers, strings, lists, "
                        f"dicts): {err}") from None


def _check_name(name: str, call: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"{call}: metric names must be non-empty strings without '/', got "
                         f"{name!r}")


class RunLogger:
    """Write one run to an HDF5 file; see the module docstring for the layout and crash safety.

    Args:
        path: the run file.
        config: the run config (JSON-serializable dict), stored as JSON plus flat copies of the
            sweep keys (``width``, ``depth``, ``parametrization``, ``lr``, ``seed``, ``model``,
            ``optimizer``) as root attributes.
        mode: ``"w-"`` creates and refuses an existing file (default); ``"w"`` replaces an
            existing file (explicit); ``"a"`` resumes an existing run (or creates one): new steps
            must follow the logged ones, and a different config is refused unless
            ``allow_config_change``.
        env: extra environment entries (e.g. device, dtype) next to the software versions.
        rank_zero_only: under ``torch.distributed``, only rank 0 touches the file; on the other
            ranks the logger checks its calls but writes nothing (``writes`` is False), so every
            rank can run the same code. Pass False to let each rank write its own path.
    """

    def __init__(self, path: str | os.PathLike[str], config: Mapping[str, Any], *,
                 mode: str = "w-", env: Mapping[str, Any] | None = None,
                 allow_config_change: bool = False, rank_zero_only: bool = True) -> None:
        call = "RunLogger"
        if mode not in MODES:
            raise ValueError(f"{call}: mode must be one of {MODES}, got {mode!r}")
        self.path = Path(path)
        self.config = json.loads(_config_json(config, call))
        self._file: h5py.File | None = None
        self._last: dict[str, int] = {}
        from curvlab.distributed import is_writer  # local: keeps torch out of this import

        self.writes = not rank_zero_only or is_writer()
        self._names: set[str] = set()  # metrics declared (what a rank that does not write knows)
        self._lock: WriterLock | None = None
        if not self.writes:
            return
        self._lock = WriterLock(self.path, call)  # one writer per file (curvlab.writer_lock)
        try:
            self._start(mode, env, allow_config_change, call)
        except BaseException:
            self._release_lock()
            raise

    def _start(self, mode: str, env: Mapping[str, Any] | None, allow_config_change: bool,
               call: str) -> None:
        exists = self.path.exists()
        if exists and mode == "w-":
            raise FileExistsError(f"{call}: {self.path} exists; pass mode='a' to resume that run "
                                  "or mode='w' to replace it, or choose another path")
        if exists and mode == "a":
            self._resume(allow_config_change, env)
        else:
            self._create(env, replace=exists)
        self._open()

    # --------------------------------------------------------------- file life cycle
    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _create(self, env: Mapping[str, Any] | None, replace: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._staging() as tmp:
            with h5py.File(tmp, "w", libver="latest") as f:
                f.attrs["schema_version"] = SCHEMA_VERSION
                f.attrs["curvlab_version"] = _curvlab_version()
                f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
                f.attrs["config"] = json.dumps(self.config, sort_keys=True)
                for key in SWEEP_KEYS:
                    if isinstance(self.config.get(key), int | float | str | bool):
                        f.attrs[key] = self.config[key]
                f.create_group("env").attrs.update(_environment(env))
                f.create_group("metrics")
            if replace:
                os.replace(tmp, self.path)
            else:  # link fails if a file appeared meanwhile: never overwrite by accident
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    raise FileExistsError(f"RunLogger: {self.path} appeared while creating it; "
                                          "not overwriting it") from None
                except OSError:  # no hard links on this file system
                    if self.path.exists():
                        raise FileExistsError(f"RunLogger: {self.path} appeared while creating "
                                              "it; not overwriting it") from None
                    os.replace(tmp, self.path)

    def _resume(self, allow_config_change: bool, env: Mapping[str, Any] | None) -> None:
        """Rebuild the file from its committed rows (clears a killed writer's state)."""
        old = load_run(self.path)
        if old.config != self.config and not allow_config_change:
            changed = sorted(k for k in {*old.config, *self.config}
                             if old.config.get(k) != self.config.get(k))
            raise ValueError(f"RunLogger: resuming {self.path} with a different config (keys "
                             f"{changed} differ); pass the run's own config, or "
                             "allow_config_change=True to record the new one")
        with self._staging() as tmp:
            with open_read(self.path, "RunLogger") as src, h5py.File(tmp, "w",
                                                                      libver="latest") as dst:
                for key, value in src.attrs.items():
                    dst.attrs[key] = value
                dst.attrs["config"] = json.dumps(self.config, sort_keys=True)
                dst.create_group("env").attrs.update({**dict(src["env"].attrs),
                                                      **_environment(env)})
                dst.create_group("metrics")
                for name, metric in old.metrics.items():
                    self._make_metric(dst, name, metric.value.shape[1:], metric.labels,
                                      metric.description, metric.threshold, rows=metric.value,
                                      codes=metric.codes)
                    dst[f"metrics/{name}/step"][:] = metric.step
                    if len(metric.step):
                        self._last[name] = int(metric.step[-1])
            os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _staging(self) -> Iterator[Path]:
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                    dir=self.path.parent)
        os.close(fd)
        try:
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    def _open(self) -> None:
        """Open the file for SWMR appends in one call (``H5Fopen`` with ``ACC_SWMR_WRITE``).

        Opening it ``"r+"`` and then starting SWMR (``swmr_mode = True``) leaves a moment in which
        the superblock says "open for write" without "SWMR", and a writer killed then leaves a
        file that no mode opens. In one call the superblock gets both flags in the same write
        (benchmarks/README.md, History).
        """
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)  # libver="latest"
        flags = h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE
        self._file = h5py.File(h5py.h5f.open(os.fsencode(self.path), flags, fapl=fapl))

    def _restructure(self, change: Any) -> None:
        """Apply ``change(file)`` (creating datasets or attributes) on a copy, then swap it in."""
        if self._file is not None:  # the lock stays held
            self._file.close()
            self._file = None
        with self._staging() as tmp:
            shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "r+", libver="latest") as f:
                change(f)
            os.replace(tmp, self.path)
        self._open()

    @staticmethod
    def _make_metric(f: h5py.File, name: str, shape: tuple[int, ...], labels: Sequence[str] | None,
                     description: str, threshold: float | None, rows: np.ndarray | None = None,
                     codes: Sequence[str] | None = None) -> None:
        n = 0 if rows is None else len(rows)
        g = f["metrics"].create_group(name)
        g.create_dataset("step", shape=(n,), maxshape=(None,), dtype="int64", chunks=(256,),
                         fillvalue=STEP_FILL)
        g.create_dataset("value", shape=(n, *shape), maxshape=(None, *shape), dtype="float64",
                         chunks=(max(1, 4096 // max(1, int(np.prod(shape)))), *shape),
                         fillvalue=np.nan, data=rows)
        if labels is not None:
            g.attrs["labels"] = np.array([str(label) for label in labels],
                                         dtype=h5py.string_dtype())
        if codes is not None:
            g.attrs["codes"] = np.array([str(c) for c in codes], dtype=h5py.string_dtype())
        g.attrs["description"] = description
        if threshold is not None:
            g.attrs["threshold"] = float(threshold)

    # --------------------------------------------------------------- public API
    def declare(self, name: str, *, size: int | None = None, labels: Sequence[str] | None = None,
                description: str = "", threshold: float | None = None,
                codes: Sequence[str] | None = None) -> None:
        """Create metric ``name`` (scalar, or a vector of ``size`` / ``len(labels)`` entries).

        ``codes``: for a scalar metric whose values are integer codes, the text of each code
        (value ``i`` means ``codes[i]``), stored as the attribute ``codes``.
        """
        call = "RunLogger.declare"
        _check_name(name, call)
        if codes is not None and size is not None:
            raise ValueError(f"{call}: codes= describe a scalar metric's values; {name!r} was "
                             f"given size={size}")
        if size is None and labels is not None:
            size = len(labels)
        if labels is not None and len(labels) != size:
            raise ValueError(f"{call}: {name!r} has {len(labels)} labels for {size} values")
        if not self.writes:
            self._names.add(name)
            return
        if self._handle(call)["metrics"].get(name) is not None:
            raise ValueError(f"{call}: metric {name!r} exists already")
        shape = () if size is None else (int(size),)
        self._restructure(lambda f: self._make_metric(f, name, shape, labels, description,
                                                      threshold, codes=codes))

    def update_env(self, **entries: Any) -> None:
        """Add or change entries of the ``env`` group (e.g. device, dtype)."""
        if self.writes:
            self._restructure(lambda f: f["env"].attrs.update(_environment(entries)))

    def log(self, step: int, **scalars: float) -> None:
        """Append one step of scalar metrics, e.g. ``log(10, loss=0.3, sharpness=12.1)``."""
        for name, value in scalars.items():
            self._append("RunLogger.log", step, name, np.asarray(value, dtype=np.float64), None)

    def log_array(self, step: int, name: str, values: Any, labels: Sequence[str] | None = None,
                  *, description: str = "", threshold: float | None = None) -> None:
        """Append one step of a vector metric ``values (k,)`` (top-k eigenvalues, per layer ...)."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"RunLogger.log_array: {name!r} values must be 1-D, got shape "
                             f"{values.shape}")
        self._append("RunLogger.log_array", step, name, values, labels, description, threshold)

    def last_step(self, name: str | None = None) -> int | None:
        """The last committed step of metric ``name``, or of any metric; ``None`` when none.

        After ``mode="a"`` these are the steps the file already held, so a resumed run logs
        from ``last_step() + 1`` on (the Monitor does this itself).
        """
        if name is not None:
            return self._last.get(name)
        return max(self._last.values(), default=None)

    def __contains__(self, name: object) -> bool:
        """Whether metric ``name`` exists in the file."""
        if not self.writes:
            return name in self._names
        return isinstance(name, str) and name in self._handle("RunLogger")["metrics"]

    def _handle(self, call: str) -> h5py.File:
        if self._file is None:
            raise ValueError(f"{call}: the logger for {self.path} is closed")
        return self._file

    def _append(self, call: str, step: int, name: str, value: np.ndarray,
                labels: Sequence[str] | None, description: str = "",
                threshold: float | None = None) -> None:
        _check_name(name, call)
        if isinstance(step, bool) or not isinstance(step, int | np.integer):
            raise TypeError(f"{call}: step must be an int, got {type(step).__name__}")
        if not self.writes:
            self._names.add(name)
            return
        metrics = self._handle(call)["metrics"]
        if name not in metrics:
            self.declare(name, size=None if value.ndim == 0 else value.shape[0], labels=labels,
                         description=description, threshold=threshold)
            metrics = self._handle(call)["metrics"]
        g = metrics[name]
        values, steps = g["value"], g["step"]
        if values.shape[1:] != value.shape:
            raise ValueError(f"{call}: metric {name!r} holds values of shape {values.shape[1:]}, "
                             f"got {value.shape}")
        last = self._last.get(name)
        if last is not None and step <= last:
            raise ValueError(f"{call}: step {step} of {name!r} does not follow the last committed "
                             f"step {last} of that metric in {self.path}; steps must increase. "
                             "A resumed run (mode='a') continues after the file's last step "
                             "(RunLogger.last_step()); with gradient accumulation, log once per "
                             "optimizer step")
        n = steps.shape[0]
        values.resize(n + 1, axis=0)
        values[n] = value
        values.flush()  # the value lands before the step that commits the row
        steps.resize(n + 1, axis=0)
        steps[n] = step
        steps.flush()
        self._last[name] = int(step)

    def flush(self) -> None:
        if self.writes:
            self._handle("RunLogger.flush").flush()

    def close(self) -> None:
        """Close the file and release the writer's lock (a logger cannot be reopened)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._release_lock()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _curvlab_version() -> str:
    return importlib.metadata.version("curvlab")
