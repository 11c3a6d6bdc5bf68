"""What a batch is and what a model returns: the one convention every curvlab entry point uses.

**A batch** is a pair ``(inputs, targets)``. ``inputs`` decides how the model is called:

- a tensor ``x``: ``model(x)``;
- a tuple or list ``(a, b, ...)``: ``model(a, b, ...)`` (positional arguments);
- a dict ``{"input_ids": ..., "attention_mask": ...}``: ``model(**inputs)`` (keyword arguments,
  the Hugging Face convention). A model whose forward takes one dict positionally gets it as
  ``((d,), targets)``.

Every tensor inside ``inputs`` and ``targets`` whose leading size is the batch size ``n`` (that of
the first tensor of ``inputs``) is one row per example; :func:`take` slices all of them at once,
so a probe of any form can be cut to its first ``size`` examples. ``data`` (operators, the
Monitor's probe) is one batch or a re-iterable of batches: a list, or a ``DataLoader`` whose
sampler does not shuffle (a shuffling one would give every product other batches, so the
"operator" would not be one matrix, and is refused).

**What the model returns** may be a tensor, a tuple, a dict or a ``ModelOutput``-like object
(Hugging Face). ``output`` picks the tensor that curvlab differentiates, and ``loss_fn`` receives
that tensor:

- ``"auto"`` (the default): a tensor as it is; else the ``logits`` entry or attribute; else the
  first tensor (in the order of the tuple, dict or dataclass fields);
- a string: that key or attribute (``"pooler_output"``); an int: that position of a tuple;
- a callable ``outputs -> tensor`` (``lambda out: out.logits[:, -1]``);
- ``None``: the raw outputs, unchanged (for a ``loss_fn`` that wants the whole object).

**Batch weights.** An operator is the Hessian of the weighted mean
``L = sum_b w_b L_b / sum_b w_b`` of the batch means ``L_b``. By default ``w_b`` is the number of
examples, so ``L`` is the mean over examples. ``weights=fn`` with ``fn(inputs, targets) -> w_b``
weights by any count; for a language model whose loss is a mean over target tokens,
``weights=count_tokens()`` makes ``L`` the mean over every target token of ``data``, the
objective a token-mean training loss minimizes over the concatenated data.

Example:
    >>> import torch
    >>> inputs = {"input_ids": torch.arange(12).reshape(3, 4), "attention_mask": torch.ones(3, 4)}
    >>> batch_size(inputs), take(inputs, 2)["input_ids"].shape
    (3, torch.Size([2, 4]))
    >>> pick_output((torch.ones(2, 3), torch.zeros(2)), "auto").shape
    torch.Size([2, 3])
    >>> count_tokens()(inputs, torch.tensor([[1, 2, -100, -100], [3, 4, 5, 6], [7, -100, 8, 9]]))
    9
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

Batch = tuple[Any, Any]
Output = str | int | Callable[[Any], Tensor] | None
Weights = Callable[[Any, Any], float] | None


def call_args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the model call for ``inputs`` (see the module docstring)."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)`` by the form of ``inputs``."""
    args, kwargs = call_args(inputs)
    return model(*args, **kwargs)


def _fields(outputs: Any) -> list[tuple[str, Any]]:
    """The named entries of a dict, a dataclass or a ``ModelOutput`` (an ordered dict), in order."""
    if isinstance(outputs, Mapping):
        return list(outputs.items())
    if dataclasses.is_dataclass(outputs) and not isinstance(outputs, type):
        return [(f.name, getattr(outputs, f.name)) for f in dataclasses.fields(outputs)]
    return []


def pick_output(outputs: Any, output: Output = "auto", call: str = "curvlab") -> Any:
    """The tensor that ``output`` selects from the model's ``outputs`` (module docstring)."""
    if output is None:
        return outputs
    picked: Any
    if callable(output):
        picked = output(outputs)
    elif isinstance(output, str) and output != "auto":
        named = dict(_fields(outputs))
        picked = named[output] if output in named else getattr(outputs, output, None)
    elif isinstance(output, int) and not isinstance(output, bool):
        picked = outputs[output] if isinstance(outputs, tuple | list) else None
    elif output == "auto":
        if isinstance(outputs, Tensor):
            return outputs
        named = dict(_fields(outputs))
        picked = named.get("logits", getattr(outputs, "logits", None))
        if not isinstance(picked, Tensor):
            items = [v for _, v in _fields(outputs)] or (
                list(outputs) if isinstance(outputs, tuple | list) else [])
            picked = next((v for v in items if isinstance(v, Tensor)), None)
    else:
        raise TypeError(f"{call}: output must be 'auto', a key or attribute name, a tuple index, "
                        f"a callable or None, got {output!r}")
    if not isinstance(picked, Tensor):
        raise ValueError(f"{call}: output={output!r} found no tensor in the model's outputs "
                         f"({type(outputs).__name__}); pass output='name', an index, or a "
                         "callable outputs -> tensor")
    return picked


def batch_size(inputs: Any) -> int:
    """Number of examples in ``inputs``: the leading size of its first tensor."""
    leaves = [t for t in tree_leaves(inputs) if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError(f"inputs must be a tensor or a container of tensors, got {type(inputs)!r}")
    return int(leaves[0].shape[0]) if leaves[0].ndim else 1


def take(tree: Any, stop: int, n: int | None = None) -> Any:
    """The first ``stop`` examples of a tensor, tuple, list or dict of tensors.

    Tensors whose leading size is the batch size ``n`` (default: that of ``tree``) are sliced;
    other leaves (scalars, shared tensors, strings) are kept whole.
    """
    n = batch_size(tree) if n is None else n

    def cut(t: Any) -> Any:
        return t[:stop] if isinstance(t, Tensor) and t.ndim and t.shape[0] == n else t

    return tree_map(cut, tree)


def take_batch(batch: Batch, stop: int) -> Batch:
    """``(inputs, targets)`` cut to the first ``stop`` examples (the batch size of ``inputs``)."""
    inputs, targets = batch
    n = batch_size(inputs)
    return take(inputs, stop, n), take(targets, stop, n)


def first_examples(data: Any, size: int, call: str) -> list[Batch]:
    """The batches of ``data`` cut to its first ``size`` examples in order (a fixed subset).

    Raises ``ValueError`` if ``data`` holds fewer than ``size`` examples.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{call}: probe_size must be a positive int, got {size!r}")
    batches, _ = as_batches(data, call)
    out: list[Batch] = []
    left = size
    for batch in batches:
        inputs, _ = batch
        n = batch_size(inputs)
        out.append(batch if n <= left else take_batch(batch, left))
        left -= min(n, left)
        if left == 0:
            return out
    raise ValueError(f"{call}: probe_size={size} but the probe holds {size - left} examples; "
                     "pass a smaller probe_size or a larger probe")


def is_batch(data: Any) -> bool:
    """Whether ``data`` is one ``(inputs, targets)`` pair rather than a sequence of batches.

    A 2-tuple is one batch when its first entry is a tensor or a dict, or when it is a tuple or
    list of tensors and the second entry is a tensor (tuple inputs). ``((x1, y1), (x2, y2))`` is
    two batches.
    """
    if not (isinstance(data, tuple) and len(data) == 2):
        return False
    first, second = data
    if isinstance(first, Tensor | Mapping):
        return True
    return (isinstance(first, tuple | list) and isinstance(second, Tensor)
            and all(isinstance(t, Tensor) for t in first))


def _sampler(data: Any) -> Any:
    """The sampler that orders a ``DataLoader``'s examples (``None`` for anything else)."""
    if not isinstance(data, torch.utils.data.DataLoader):
        return None
    batch_sampler = getattr(data, "batch_sampler", None)
    return getattr(batch_sampler, "sampler", None) or data.sampler


def _shuffles(data: Any) -> bool:
    """Whether ``data`` is a ``DataLoader`` whose sampler may draw a new order on every pass
    (anything but a ``SequentialSampler``: random, weighted, distributed with shuffling)."""
    sampler = _sampler(data)
    if sampler is None or isinstance(sampler, torch.utils.data.SequentialSampler):
        return False
    return bool(getattr(sampler, "shuffle", True))  # DistributedSampler(shuffle=False) is fixed


def as_batches(data: Any, call: str) -> tuple[Sequence[Batch] | Iterable[Batch], bool]:
    """``(batches, is_single)`` for ``data``: one batch, or a re-iterable that repeats itself."""
    if is_batch(data):
        return [data], True
    if isinstance(data, Tensor | Mapping) or not isinstance(data, Iterable):
        raise TypeError(f"{call}: data must be an (inputs, targets) tuple or an iterable of such "
                        f"batches, got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError(f"{call}: data is a one-shot iterator ({type(data).__name__}), but every "
                        "product passes over the data again; pass a list of batches or a "
                        "DataLoader (without shuffling)")
    if _shuffles(data):
        raise ValueError(f"{call}: data is a DataLoader that shuffles (its sampler is "
                         f"{type(_sampler(data)).__name__}), so every pass sees other batches and "
                         "the products are not those of one matrix; pass "
                         "DataLoader(dataset, batch_size, shuffle=False) or a fixed list of "
                         "batches, e.g. list(loader)")
    return data, False


def split_batch(batch: Any, index: int, call: str) -> tuple[Any, Any]:
    """``(inputs, targets)`` of batch ``index``, with a clear error for anything else."""
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(f"{call}: batch {index} must be an (inputs, targets) pair, got "
                        f"{type(batch).__name__}")
    return batch[0], batch[1]


def batch_weight(weights: Weights, inputs: Any, targets: Any, index: int, call: str) -> float:
    """``w_b`` of one batch: its number of examples, or ``weights(inputs, targets)``."""
    if weights is None:
        return float(batch_size(inputs))
    w = weights(inputs, targets)
    w = float(w.item() if isinstance(w, Tensor) else w)
    if not w >= 0 or w == float("inf"):
        raise ValueError(f"{call}: weights(inputs, targets) must give a finite count >= 0, got "
                         f"{w} for batch {index}")
    return w


def check_weights(weights: Any, call: str) -> Weights:
    """``weights`` if it is ``None`` or callable, else a ``TypeError`` that says what to pass."""
    if weights is not None and not callable(weights):
        raise TypeError(f"{call}: weights must be None (examples) or a callable "
                        f"(inputs, targets) -> count, e.g. cl.count_tokens(); got "
                        f"{type(weights).__name__}")
    return weights


def count_tokens(ignore_index: int = -100, *, shift: bool = False,
                 key: str | None = None) -> Callable[[Any, Any], int]:
    """A batch weight: the number of target tokens that are not ``ignore_index``.

    Args:
        ignore_index: the label of padding (``-100`` in PyTorch and Hugging Face losses).
        shift: count ``targets[:, 1:]``, for a causal LM loss that predicts token ``t + 1`` from
            the first ``t`` tokens (Hugging Face's ``labels`` convention).
        key: the entry of a dict of targets that holds the labels.

    Returns:
        ``fn(inputs, targets) -> int``, for ``weights=`` of the operators and the Monitor.
    """

    def count(inputs: Any, targets: Any) -> int:
        labels = targets[key] if key is not None else targets
        if not isinstance(labels, Tensor):
            raise TypeError(f"count_tokens: expected the targets to be a tensor of labels"
                            f"{'' if key is None else f' under {key!r}'}, got "
                            f"{type(labels).__name__}; pass key= for a dict of targets")
        labels = labels[:, 1:] if shift else labels
        return int((labels != ignore_index).sum())

    return count
