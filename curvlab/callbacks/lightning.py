"""``CurvlabCallback``: run a :class:`~curvlab.Monitor` from a Lightning ``Trainer``.

Needs the ``lightning`` extra (``pip install curvlab[lightning]``). The step passed to the Monitor
is ``trainer.global_step`` (optimizer steps taken), so a Lightning run and a plain loop that calls
``monitor.on_train_batch_end(step)`` after each optimizer step log the same steps. With
``accumulate_grad_batches=n`` Lightning calls the hook after every micro-batch while
``global_step`` changes once per optimizer step; the Monitor ignores a step it has seen, so it
measures once per optimizer step, after the step (and after Lightning's step-interval LR
schedulers, which run before this hook).

Example (not run here)::

    monitor = cl.Monitor(model, loss_fn, probe, logger, [cl.Sharpness(every=10)], optimizer=None)
    trainer = lightning.Trainer(callbacks=[CurvlabCallback(monitor)])

With ``optimizer=None`` the callback takes the Trainer's first optimizer at train start. The probe
is the Monitor's, given explicitly: a fixed batch or list of batches in any form of
:mod:`curvlab.batches` (e.g. ``list(itertools.islice(DataLoader(val_set, 64), 2))``), never the
Trainer's shuffling training loader, which the Monitor refuses. Measurements fork the RNG and
restore the model's modes, so training with the callback is bit-identical to training without.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("curvlab.callbacks.lightning needs the 'lightning' extra: "
                      "pip install 'curvlab[lightning]'") from err

from curvlab.callbacks.monitor import Monitor


class CurvlabCallback(Callback):
    """Adapts a :class:`~curvlab.Monitor` to Lightning's callback hooks."""

    def __init__(self, monitor: Monitor) -> None:
        super().__init__()
        if not isinstance(monitor, Monitor):
            raise TypeError(f"CurvlabCallback: expected a curvlab.Monitor, got "
                            f"{type(monitor).__name__}")
        self.monitor = monitor

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor.optimizer is None and trainer.optimizers:
            self.monitor.optimizer = trainer.optimizers[0]
        self.monitor.on_train_start()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.monitor.on_train_batch_end(int(trainer.global_step))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.monitor.on_train_end()
