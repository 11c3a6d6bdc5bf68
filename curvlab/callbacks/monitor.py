"""``Monitor``: run curvlab measurements from a training loop and log them to a logger.

The logger is any :class:`~curvlab.MetricLogger` (:class:`~curvlab.RunLogger`, an HDF5 run file;
:class:`~curvlab.TensorBoardLogger`; or your own); a measurement is any :class:`Measurement`
subclass, whose ``measure(ctx)`` gets a :class:`Context` and returns :class:`Record` and
:class:`Skip` entries (docs/extending.md writes one).

Hooks follow Lightning's names so the same object serves plain loops and the Lightning adapter
(``curvlab.callbacks.lightning``): ``on_train_start()`` (measures step 0, the initialization),
``on_train_batch_end(step)`` with ``step`` the number of optimizer steps taken, ``on_train_end()``.

Under ``torch.distributed`` (DDP, torchrun) every rank runs the Monitor with its own shard as the
probe: curvature, loss and NTK measurements are collective over the ranks (the mean over every
rank's examples, the same value on each rank), and the ``RunLogger`` writes only on rank 0, with
the world size and backend in the run's environment. Feature measurements use each rank's own
first probe batch; rank 0's values are the ones logged. A ``DistributedDataParallel`` model is
measured through its ``.module``, so DDP's gradient hooks never fire.

Measurements never perturb training: they run on the live model in eval mode (so train-mode
BatchNorm and Dropout are measured deterministically, with running statistics) and restore every
module's mode afterwards; they never touch parameters, buffers, gradients or optimizer state, and
run with the global RNG forked (Lanczos start vectors come from a ``torch.Generator`` seeded per
step), so a run with a Monitor follows the same trajectory as one without.

Example:
    >>> import tempfile, pathlib, torch, curvlab as cl
    >>> _ = torch.manual_seed(0); model = cl.testing.MLP(3, 8, 2)
    >>> x, y = torch.randn(32, 3), torch.randn(32, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.h5"
    >>> with cl.RunLogger(path, {"lr": 0.1}) as log:
    ...     mon = cl.Monitor(model, cl.testing.mse, (x, y), log,
    ...                      [cl.Loss(every=5), cl.Sharpness(every=5)], optimizer=opt)
    ...     mon.on_train_start()
    ...     for step in range(1, 11):
    ...         opt.zero_grad(); cl.testing.mse(model(x), y).backward(); opt.step()
    ...         mon.on_train_batch_end(step)
    ...     mon.on_train_end()
    >>> run = cl.load_run(path)
    >>> run.metrics["sharpness"].step.tolist(), run.metrics["sharpness"].threshold
    ([0, 5, 10], 20.0)
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvlab import distributed
from curvlab.batches import Output, Weights, as_batches, check_weights
from curvlab.loggers import MetricLogger, check_logger


@dataclass(frozen=True)
class Schedule:
    """When a measurement runs: every ``every`` steps, at explicit ``steps``, or ``per_decade``
    log-spaced steps (0, 1, 2, ..., then about ``per_decade`` steps per factor of 10)."""

    every: int | None = None
    steps: frozenset[int] | None = None
    per_decade: int | None = None

    @classmethod
    def make(cls, every: int | None, steps: Iterable[int] | None, per_decade: int | None,
             call: str) -> Schedule:
        given = [every is not None, steps is not None, per_decade is not None]
        if sum(given) != 1:
            raise ValueError(f"{call}: give exactly one schedule: every=N, steps=[...] or "
                             "per_decade=N")
        for name, value in (("every", every), ("per_decade", per_decade)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{call}: {name} must be a positive int, got {value!r}")
        return cls(every, None if steps is None else frozenset(int(s) for s in steps), per_decade)

    def due(self, step: int) -> bool:
        if self.every is not None:
            return step % self.every == 0
        if self.steps is not None:
            return step in self.steps
        per_decade = self.per_decade or 1
        if step <= 0:
            return step == 0
        i = round(per_decade * math.log10(step))
        return any(round(10 ** (j / per_decade)) == step for j in (i - 1, i, i + 1))


@dataclass
class Context:
    """What a measurement sees: ``model`` (the live model, DDP unwrapped), ``loss_fn``,
    ``probe`` (the Monitor's probe data), ``optimizer`` (or ``None``), ``step`` (optimizer steps
    taken), ``generator`` (a ``torch.Generator`` seeded with the Monitor's ``seed + step``, for
    any randomness), and the Monitor's ``output`` and ``weights`` (pass them on to operators)."""

    model: nn.Module
    loss_fn: Callable[[Any, Any], Tensor]
    probe: Any
    optimizer: torch.optim.Optimizer | None
    step: int
    generator: torch.Generator
    output: Output = "auto"
    weights: Weights = None

    @property
    def first_batch(self) -> tuple[Any, Any]:
        """The probe's first ``(inputs, targets)`` batch (feature and NTK measurements)."""
        batches, _ = as_batches(self.probe, "Monitor")
        return next(iter(batches))


@dataclass(frozen=True)
class Record:
    """One value to log: ``value`` a scalar (a float or a 0-d tensor) or a vector ``(k,)`` (a
    1-D tensor or a sequence), with ``labels`` (``k`` strings, e.g. layer names) and, stored
    once when the metric is declared, ``description`` and ``threshold`` (a line to draw)."""

    name: str
    value: Any
    labels: Sequence[str] | None = None
    description: str = ""
    threshold: float | None = None


@dataclass(frozen=True)
class Skip:
    """A measurement not taken at a step, and why: ``reason`` is one of :data:`SKIP_REASONS`.

    The Monitor logs it as the scalar metric ``<name>_skipped`` whose value indexes the metric's
    ``codes`` attribute (the reason texts), so ``load_run(path).skipped(name)`` reads
    ``{step: reason}`` back. Every scheduled step of a measurement is thus in ``<name>`` or in
    ``<name>_skipped``.
    """

    name: str
    reason: str

    def __post_init__(self) -> None:
        if self.reason not in SKIP_REASONS:
            raise ValueError(f"Skip: reason must be one of curvlab.SKIP_REASONS {SKIP_REASONS}, "
                             f"got {self.reason!r}")


SKIP_REASONS = (
    "lr 0: every parameter group has learning rate 0 (no step is taken, so the LR-weighted "
    "quantity is 0 and its threshold infinite)",
    "no optimizer state: Adam's preconditioner exists only after the first optimizer step",
    "budget: the Monitor's share of wall time was spent",
)
LR_ZERO, NO_STATE, OVER_BUDGET = SKIP_REASONS


class Measurement:
    """Base class: a schedule, a name, and ``measure(ctx) -> Sequence[Record | Skip]``.

    Subclass it for a measurement of your own (docs/extending.md): set ``name`` (the default
    metric name; ``name=`` overrides it) and implement ``measure``; the base ``__init__`` takes
    the schedule (exactly one of ``every=``, ``steps=``, ``per_decade=``). At each due step the
    Monitor calls ``measure`` with a :class:`Context`, with the model in eval mode (unless
    ``eval_mode = False``) and the global RNG forked, and restores every module's mode after; a
    measurement must not change parameters, buffers, gradients (use ``torch.autograd.grad``, not
    ``backward``) or optimizer state. Each :class:`Record` is logged (its metric declared the
    first time, scalar or ``(k,)``), each :class:`Skip` as ``<name>_skipped``, and the call's
    seconds as ``time_<name>``. ``setup(ctx)``, called once at ``on_train_start``, may refuse a
    set-up that cannot work (a ``ValueError``).

    ``measure`` returns the records to log, or ``[Skip(self.name, reason)]`` when the quantity
    does not exist at this step (see :data:`SKIP_REASONS`); it never raises for a state that
    training passes through (an LR of 0 under a schedule, an optimizer without state yet).

    Example:
        >>> import torch, curvlab as cl
        >>> class ParamNorm(cl.callbacks.Measurement):
        ...     name = "param_norm"
        ...     def measure(self, ctx):
        ...         theta = torch.cat([p.detach().reshape(-1) for p in ctx.model.parameters()])
        ...         return [cl.callbacks.Record(self.name, theta.norm(), description="||theta||")]
        >>> ParamNorm(every=10).schedule.due(20)
        True
    """

    name = "measurement"
    eval_mode = True  # the Monitor runs it with the model in eval mode (flags restored after)

    def __init__(self, *, every: int | None = None, steps: Iterable[int] | None = None,
                 per_decade: int | None = None, name: str | None = None) -> None:
        self.schedule = Schedule.make(every, steps, per_decade, type(self).__name__)
        if name is not None:
            self.name = name

    def setup(self, ctx: Context) -> None:
        """Check the measurement can run (called once, at ``on_train_start``)."""

    def measure(self, ctx: Context) -> Sequence[Record | Skip]:
        raise NotImplementedError


class Monitor:
    """Run ``measurements`` on a schedule during training and log them to ``logger``.

    Args:
        model, loss_fn: the trained model and its batch-mean loss.
        probe: the fixed data measured on: one ``(inputs, targets)`` batch or a list (or
            non-shuffling DataLoader) of batches, in any form of :mod:`curvlab.batches`; feature
            and NTK measurements use the first batch.
        logger: a :class:`~curvlab.MetricLogger`: a :class:`~curvlab.RunLogger`, a
            :class:`~curvlab.TensorBoardLogger`, or any object with the protocol's methods
            (``update_env`` and ``last_step`` are used when it has them).
        measurements: e.g. ``[cl.Loss(every=1), cl.Sharpness(every=10)]``.
        optimizer: the training optimizer (LR and Adam preconditioning, feature change).
        budget: optional share of wall time (e.g. 0.2) that measurements may take; a due
            measurement is skipped while the share spent so far exceeds it (the schedule
            stretches), and the skip is counted in ``monitor_skipped``.
        seed: seeds the per-step ``torch.Generator`` of stochastic estimators.
        output: the tensor of the model's outputs that ``loss_fn`` (and the NTK) gets, as in
            :class:`~curvlab.HessianOperator` (default ``"auto"``: a tensor, ``.logits``, or the
            first tensor).
        weights: batch weights of the probe, as in :class:`~curvlab.HessianOperator` (default:
            examples; ``cl.count_tokens()`` for a token-mean loss).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], probe: Any,
                 logger: MetricLogger, measurements: Sequence[Measurement], *,
                 optimizer: torch.optim.Optimizer | None = None, budget: float | None = None,
                 seed: int = 0, output: Output = "auto", weights: Weights = None) -> None:
        call = "Monitor"
        check_logger(logger, call)
        bad = [m for m in measurements if not isinstance(m, Measurement)]
        if bad or not measurements:
            raise TypeError(f"{call}: measurements must be a non-empty list of curvlab "
                            f"measurements (cl.Loss, cl.Sharpness, ...), got {bad or 'none'}")
        names = [m.name for m in measurements]
        if len(set(names)) != len(names):
            raise ValueError(f"{call}: measurement names must differ, got {names}; pass name=")
        if budget is not None and not 0 < budget < 1:
            raise ValueError(f"{call}: budget must be a share of wall time in (0, 1), got {budget}")
        model = distributed.unwrap(model)[0]  # DDP: measure its module (no DDP hooks fire)
        self.model, self.loss_fn, self.probe, self.logger = model, loss_fn, probe, logger
        self.measurements, self.optimizer = list(measurements), optimizer
        self.budget, self.seed = budget, seed
        self.output, self.weights = output, check_weights(weights, call)
        as_batches(probe, call)  # refuse a shuffling DataLoader or a one-shot iterator now
        self.spent = 0.0  # seconds inside measurements
        self.skipped = 0
        self._start: float | None = None
        self._last: int | None = None  # the last step given to the hooks
        self._resumed_after: int | None = None  # the resumed file's last committed step

    def _context(self, step: int) -> Context:
        generator = torch.Generator(device=_device(self.model)).manual_seed(self.seed + step)
        return Context(self.model, self.loss_fn, self.probe, self.optimizer, step, generator,
                       self.output, self.weights)

    def on_train_start(self, step: int = 0) -> None:
        """Set up the measurements and measure at ``step`` (0, the initialization; a resumed run
        passes the optimizer steps its checkpoint had taken).

        With a resumed logger (``RunLogger(..., mode="a")``) the steps the file already holds are
        not measured again: measuring continues after the file's last committed step, and the
        skipped range is reported once (a ``UserWarning``), since the training that follows
        repeats steps whose values in the file come from the earlier attempt.
        """
        call = "Monitor.on_train_start"
        _check_step(step, call)
        self._start = time.perf_counter()
        p = next(self.model.parameters())
        if callable(update_env := getattr(self.logger, "update_env", None)):  # optional
            update_env(device=p.device, dtype=p.dtype, **distributed.world_info())
        self._resumed_after = self._resumed_step()
        if self._resumed_after is not None and step < self._resumed_after:
            where = getattr(self.logger, "path", type(self.logger).__name__)
            warnings.warn(f"{call}: {where} already holds steps up to "
                          f"{self._resumed_after}; training restarts at step {step}, so steps "
                          f"{step}..{self._resumed_after} are not measured again (their rows "
                          "come from the earlier attempt) and measuring continues after them",
                          UserWarning, stacklevel=2)
        ctx = self._context(step)
        for m in self.measurements:
            m.setup(ctx)
        self._last = None
        self._advance(step, call)

    def on_train_batch_end(self, step: int) -> None:
        """Measure after an optimizer step; ``step`` is the number of optimizer steps taken.

        A call with the step already seen is ignored, so a loop with gradient accumulation may
        call it after every micro-batch (the step changes only when the optimizer steps). A step
        before the last one is an error.
        """
        call = "Monitor.on_train_batch_end"
        if self._start is None:
            raise ValueError(f"{call}: call on_train_start() first")
        _check_step(step, call)
        self._advance(step, call)

    def on_train_end(self) -> None:
        self.logger.flush()

    def _advance(self, step: int, call: str) -> None:
        if self._last is not None and step < self._last:
            raise ValueError(f"{call}: step {step} comes before step {self._last}, given earlier; "
                             "steps are optimizer steps taken and never go back. After loading a "
                             "checkpoint, build a new Monitor and call on_train_start(step) with "
                             "the checkpoint's step")
        if step == self._last:
            return
        self._last = step
        if self._resumed_after is not None and step <= self._resumed_after:
            return  # already in the resumed file
        self.measure(step)

    def measure(self, step: int) -> None:
        """Run the measurements due at ``step`` (respecting the budget) and log them."""
        due = [m for m in self.measurements if m.schedule.due(step)]
        if not due:
            return
        if self._over_budget():
            self.skipped += len(due)
            self.logger.log(step, monitor_skipped=self.skipped)
            for m in due:
                self._log_skip(step, Skip(m.name, OVER_BUDGET))
            return
        device = _device(self.model)
        for m in due:
            start = time.perf_counter()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    _modes_restored(self.model, eval_mode=m.eval_mode):
                records = m.measure(self._context(step))
            seconds = time.perf_counter() - start
            self.spent += seconds
            for r in records:
                if isinstance(r, Skip):
                    self._log_skip(step, r)
                else:
                    self._log_record(step, r)
            self.logger.log(step, **{f"time_{m.name}": seconds})

    def _log_record(self, step: int, r: Record) -> None:
        value = (r.value.detach().cpu().double().numpy() if isinstance(r.value, Tensor)
                 else np.asarray(r.value, dtype=np.float64))  # lists stay float64
        if r.name not in self.logger:
            self.logger.declare(r.name, size=value.size if value.ndim else None, labels=r.labels,
                                description=r.description, threshold=r.threshold)
        if value.ndim == 0:
            self.logger.log(step, **{r.name: float(value)})
        else:
            self.logger.log_array(step, r.name, value)

    def _log_skip(self, step: int, skip: Skip) -> None:
        name = f"{skip.name}_skipped"
        if name not in self.logger:
            self.logger.declare(name, codes=SKIP_REASONS, description=(
                f"steps at which {skip.name!r} was not measured; the value indexes the codes "
                "(the reasons)"))
        self.logger.log(step, **{name: float(SKIP_REASONS.index(skip.reason))})

    def _resumed_step(self) -> int | None:
        """The logger's last committed step (``None`` for a logger without ``last_step``); under
        ``torch.distributed``, rank 0's (the writer's), so that every rank skips the same steps
        and the collective measurements stay matched."""
        last_step = getattr(self.logger, "last_step", None)
        last = last_step() if callable(last_step) else None
        if not distributed.is_active():
            return last
        t = torch.tensor([-1 if last is None else last], device=_device(self.model))
        torch.distributed.broadcast(t, src=0)
        return None if int(t) < 0 else int(t)

    def _over_budget(self) -> bool:
        if self.budget is None or self._start is None:
            return False
        elapsed = time.perf_counter() - self._start
        return elapsed > 0 and self.spent / elapsed > self.budget


@contextlib.contextmanager
def _modes_restored(model: nn.Module, *, eval_mode: bool) -> Iterator[None]:
    """Optionally switch ``model`` to eval mode; restore every module's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _check_step(step: Any, call: str) -> None:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise TypeError(f"{call}: step must be a non-negative int (optimizer steps taken), got "
                        f"{step!r}")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device
