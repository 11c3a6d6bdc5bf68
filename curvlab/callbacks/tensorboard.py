"""``TensorBoardLogger``: a :class:`~curvlab.MetricLogger` that writes TensorBoard event files.

Needs the ``tensorboard`` extra (``pip install curvlab[tensorboard]``); the writer is
``torch.utils.tensorboard.SummaryWriter``, imported when a logger is built, so importing curvlab
never needs TensorBoard.

How metrics map to TensorBoard, which draws scalars:

- a scalar metric ``name`` is the scalar ``name``: ``add_scalar(name, value, step)``;
- a vector metric ``name`` of ``k`` entries (top-``k`` eigenvalues, one value per layer) is ``k``
  scalars ``name/<label>``, with the labels the metric was declared with (layer names; ``"0"``,
  ``"1"``, ... for top-k eigenvalues), and ``name/0``, ``name/1``, ... without labels. The
  ``name/`` prefix puts the entries in one section of the dashboard;
- a description is written once as text (``add_text``) under ``name/description``; thresholds
  need nothing extra (:class:`~curvlab.Sharpness` also logs them as ``<name>_threshold``), and
  codes (``<name>_skipped``) stay in :attr:`TensorBoardLogger.metrics`;
- ``update_env`` writes the environment (device, dtype, world size) as a text table ``env``.

Values are stored as float32, TensorBoard's scalar format. A log directory is not resumed (there
is no ``last_step``): a new logger in the same directory adds an event file, and TensorBoard
shows both. Under ``torch.distributed`` only rank 0 writes (``rank_zero_only=True``).

Example (needs the extra; docs/extending.md runs a whole loop)::

    with cl.TensorBoardLogger("tb/run0") as log:
        monitor = cl.Monitor(model, loss_fn, probe, log,
                             [cl.Loss(every=1), cl.Sharpness(k=3, every=10)])
        ...  # the training loop calls monitor.on_train_batch_end(step)
    # TensorBoard: scalars loss, sharpness/0, sharpness/1, sharpness/2, sharpness_matvecs, ...
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curvlab.distributed import is_writer

if TYPE_CHECKING:
    from curvlab.loggers import MetricLogger


@dataclass(frozen=True)
class TensorBoardMetric:
    """What a metric was declared with: ``size`` (``None`` for a scalar), its ``tags``."""

    name: str
    size: int | None
    tags: tuple[str, ...]
    description: str = ""
    threshold: float | None = None
    codes: tuple[str, ...] | None = None


class TensorBoardLogger:
    """Write a Monitor's metrics as TensorBoard scalars under ``log_dir`` (module docstring).

    Args:
        log_dir: the directory of the event files (created if missing); point
            ``tensorboard --logdir`` at it or at its parent.
        flush_secs: how often the writer flushes on its own (``flush()`` always does).
        rank_zero_only: under ``torch.distributed``, write on rank 0 only; the other ranks
            check their calls and write nothing (``writes`` is False).

    Attributes:
        metrics: ``name -> TensorBoardMetric``, every metric declared or logged.
        writer: the ``SummaryWriter`` (``None`` on a rank that does not write).
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, flush_secs: int = 10,
                 rank_zero_only: bool = True) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("TensorBoardLogger: needs the tensorboard package, which is not "
                              f"installed ({err}); pip install curvlab[tensorboard]") from err
        self.path = Path(log_dir)
        self.metrics: dict[str, TensorBoardMetric] = {}
        self.writes = not rank_zero_only or is_writer()
        self.writer: Any = SummaryWriter(str(self.path), flush_secs=flush_secs) \
            if self.writes else None
        self.closed = False

    def _check_open(self, call: str) -> None:
        if self.closed:  # a write after close would be lost without a word
            raise ValueError(f"{call}: the logger for {self.path} is closed; create a new "
                             "TensorBoardLogger to write more")

    def __contains__(self, name: object) -> bool:
        """Whether metric ``name`` was declared or logged."""
        return name in self.metrics

    def declare(self, name: str, *, size: int | None = None,
                labels: Sequence[str] | None = None, description: str = "",
                threshold: float | None = None, codes: Sequence[str] | None = None) -> None:
        """Create metric ``name``: a scalar (``size=None``), or ``size`` (or ``len(labels)``)
        scalars ``name/<label>``."""
        call = "TensorBoardLogger.declare"
        self._check_open(call)
        if name in self.metrics:
            raise ValueError(f"{call}: metric {name!r} exists already")
        if size is None and labels is not None:
            size = len(labels)
        if labels is not None and len(labels) != size:
            raise ValueError(f"{call}: {name!r} has {len(labels)} labels for {size} values; "
                             "give one label per entry")
        if size is None:
            tags: tuple[str, ...] = (name,)
        else:
            names = [str(i) for i in range(int(size))] if labels is None else list(labels)
            tags = tuple(f"{name}/{label}" for label in names)
        self.metrics[name] = TensorBoardMetric(name, size, tags, description, threshold,
                                               None if codes is None else tuple(codes))
        if description and self.writer is not None:
            self.writer.add_text(f"{name}/description", description, 0)

    def log(self, step: int, **scalars: float) -> None:
        """Add one step of scalar metrics (a name not declared yet is declared a scalar)."""
        self._check_open("TensorBoardLogger.log")
        for name, value in scalars.items():
            if name not in self.metrics:
                self.declare(name)
            if self.metrics[name].size is not None:
                raise ValueError(f"TensorBoardLogger.log: metric {name!r} is a vector of "
                                 f"{self.metrics[name].size} entries; use log_array")
            if self.writer is not None:
                self.writer.add_scalar(name, float(value), int(step))

    def log_array(self, step: int, name: str, values: Any) -> None:
        """Add one step of the vector metric ``name``, ``values (k,)``: one scalar per entry."""
        call = "TensorBoardLogger.log_array"
        self._check_open(call)
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"{call}: {name!r} values must be 1-D (k,), got shape "
                             f"{values.shape}")
        if name not in self.metrics:
            self.declare(name, size=values.shape[0])
        metric = self.metrics[name]
        if metric.size != values.shape[0]:
            raise ValueError(f"{call}: metric {name!r} was declared with "
                             f"{metric.size or 'a scalar'} entries, got {values.shape[0]}")
        if self.writer is not None:
            for tag, value in zip(metric.tags, values.tolist(), strict=True):
                self.writer.add_scalar(tag, value, int(step))

    def update_env(self, **entries: Any) -> None:
        """Write ``entries`` (device, dtype, ...) as a Markdown table under the text tag ``env``."""
        if self.writer is not None and entries:
            rows = "\n".join(f"| {key} | {value} |" for key, value in entries.items())
            self.writer.add_text("env", f"| entry | value |\n|---|---|\n{rows}", 0)

    def flush(self) -> None:
        """Write every pending event to disk."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file; later writes raise (a closed logger stays closed)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.closed = True

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if TYPE_CHECKING:  # mypy checks that TensorBoardLogger satisfies the protocol

    def _tensorboard_logger(logger: TensorBoardLogger) -> MetricLogger:
        return logger
