"""``CurvlabTrainerCallback``: run a :class:`~curvlab.Monitor` from a Hugging Face ``Trainer``.

Needs the ``hf`` extra (``pip install 'curvlab[hf]'``, which brings ``transformers`` and
``accelerate``). The probe is given explicitly, as for every Monitor: a fixed batch (or list of
batches) in the form of :mod:`curvlab.batches`, e.g. ``({"input_ids": ids, "attention_mask":
mask}, labels)``, never the Trainer's shuffling training loader. ``loss_fn`` receives the
``logits`` of the model's output (``output="auto"``); for a causal LM, shift as the model does::

    def lm_loss(logits, labels):  # the mean over target tokens, as GPT2LMHeadModel computes it
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=-100)

    monitor = cl.Monitor(model, lm_loss, probe, logger, [cl.Sharpness(every=10,
                         preconditioned="adam")], weights=cl.count_tokens(shift=True))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train,
                                   callbacks=[CurvlabTrainerCallback(monitor)])

The Monitor measures at the start of training (step 0) and after every optimizer step, keyed by
``state.global_step`` (optimizer steps taken): with ``gradient_accumulation_steps`` it runs once
per optimizer step, as a plain loop calling ``monitor.on_train_batch_end(step)`` after each
``optimizer.step()`` does. With ``optimizer=None`` in the Monitor, the Trainer's optimizer is
taken when training begins (the Trainer creates it inside ``train()``). Measurements fork the RNG
and restore the model's modes, so training with the callback is bit-identical to training without.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("curvlab.callbacks.hf needs the 'hf' extra: pip install 'curvlab[hf]'"
                      ) from err

from curvlab.callbacks.monitor import Monitor


class CurvlabTrainerCallback(TrainerCallback):
    """Adapts a :class:`~curvlab.Monitor` to ``transformers.Trainer``'s callback events."""

    def __init__(self, monitor: Monitor) -> None:
        if not isinstance(monitor, Monitor):
            raise TypeError(f"CurvlabTrainerCallback: expected a curvlab.Monitor, got "
                            f"{type(monitor).__name__}; build one with cl.Monitor(model, "
                            "loss_fn, probe, logger, measurements)")
        self.monitor = monitor

    def on_train_begin(self, args: Any, state: Any, control: Any, *, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if self.monitor.optimizer is None and optimizer is not None:
            # The Trainer may hand over an accelerate wrapper; the torch optimizer is inside it.
            self.monitor.optimizer = getattr(optimizer, "optimizer", optimizer)
        self.monitor.on_train_start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.monitor.on_train_batch_end(int(state.global_step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.monitor.on_train_end()
