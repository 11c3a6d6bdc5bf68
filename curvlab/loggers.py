"""``MetricLogger``: what a :class:`~curvlab.Monitor` writes its measurements to.

A logger is any object with the five methods of :class:`MetricLogger`; :class:`~curvlab.RunLogger`
(an HDF5 run file) and :class:`~curvlab.TensorBoardLogger` (TensorBoard event files) are two.
The protocol is structural (``typing.Protocol``): a logger does not inherit from it, and
``isinstance(obj, MetricLogger)`` checks only that the methods exist.

What the Monitor calls, in order, for a record ``name`` at a step:

- ``name in logger``: whether the metric exists yet; if not,
- ``logger.declare(name, size=..., labels=..., description=..., threshold=..., codes=...)``
  once: ``size=None`` for a scalar, ``k`` for a vector of ``k`` entries (``labels``, when given,
  name them: layer names, or ``"0"``, ``"1"``, ... for top-k eigenvalues); ``threshold`` is an
  edge-of-stability line; ``codes`` the texts of a coded scalar (``<name>_skipped``);
- ``logger.log(step, name=value)`` for a scalar, ``logger.log_array(step, name, values)`` for a
  vector ``values (k,)`` (a float64 numpy array). ``log`` is also called with names that were
  never declared (``time_<measurement>``, ``monitor_skipped``): a logger creates those itself;
- ``logger.flush()`` at ``on_train_end()``.

Steps increase for each metric, and one step may carry several metrics. Two optional methods
are used when the logger has them, and skipped otherwise:

- ``update_env(**entries)`` at ``on_train_start()``: the device, dtype and world size;
- ``last_step(name=None) -> int | None``: the last step a resumed logger already holds (the
  Monitor measures only after it; ``path``, if present, names the file in its warning). A logger
  without it is treated as a fresh run.

Example:
    >>> import curvlab as cl
    >>> class PrintLogger:  # the smallest logger: the five methods of the protocol
    ...     def __init__(self): self.names = set()
    ...     def __contains__(self, name): return name in self.names
    ...     def declare(self, name, *, size=None, labels=None, description="", threshold=None,
    ...                 codes=None): self.names.add(name)
    ...     def log(self, step, **scalars): self.names.update(scalars); print(step, scalars)
    ...     def log_array(self, step, name, values): print(step, name, list(values))
    ...     def flush(self): pass
    >>> isinstance(PrintLogger(), cl.MetricLogger), cl.loggers.missing_methods("run.h5")
    (True, ['declare', 'flush', 'log', 'log_array'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

REQUIRED = ("__contains__", "declare", "flush", "log", "log_array")
OPTIONAL = ("update_env", "last_step")


@runtime_checkable
class MetricLogger(Protocol):
    """The methods a :class:`~curvlab.Monitor` needs of its logger (see the module docstring)."""

    def __contains__(self, name: object) -> bool:
        """Whether metric ``name`` exists (was declared or logged)."""
        ...

    def declare(self, name: str, *, size: int | None = None,
                labels: Sequence[str] | None = None, description: str = "",
                threshold: float | None = None, codes: Sequence[str] | None = None) -> None:
        """Create metric ``name``: a scalar (``size=None``) or a vector of ``size`` entries."""
        ...

    def log(self, step: int, **scalars: float) -> None:
        """Append one step of scalar metrics (declared or not)."""
        ...

    def log_array(self, step: int, name: str, values: Any) -> None:
        """Append one step of the declared vector metric ``name``, ``values (k,)``."""
        ...

    def flush(self) -> None:
        """Make everything logged so far durable (or visible to readers)."""
        ...


def missing_methods(logger: Any) -> list[str]:
    """The methods of :class:`MetricLogger` that ``logger`` lacks (``[]`` for a logger)."""
    kind = type(logger)
    return [m for m in REQUIRED if not callable(getattr(kind, m, None))]


def check_logger(logger: Any, call: str) -> None:
    """Raise a ``TypeError`` naming the missing methods unless ``logger`` is a MetricLogger."""
    missing = missing_methods(logger)
    if missing:
        raise TypeError(f"{call}: logger must be a curvlab.MetricLogger (e.g. cl.RunLogger or "
                        f"cl.TensorBoardLogger), an object with the methods {list(REQUIRED)}; got "
                        f"{type(logger).__name__}, which lacks {missing}")


if TYPE_CHECKING:  # mypy checks that RunLogger satisfies the protocol
    from curvlab.hdf5 import RunLogger

    def _run_logger(logger: RunLogger) -> MetricLogger:
        return logger
