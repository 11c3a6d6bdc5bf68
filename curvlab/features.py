"""Feature speed and one-step feature change, per layer.

Feature speed (Chizat & Netrapalli 2023, "The Feature Speed Formula", arXiv:2311.18718;
docs/math.md section 5). For features ``f_l`` (the whole batch stacked), backward pass
``b_l = dL/df_l`` and one gradient step ``dw_k = -eta_k dL/dw_k`` with per-parameter rates:

- first-order feature update ``df_l = sum_{k<=l} J_{k->l} dw_k`` (one forward-mode JVP along
  ``dw``, or the finite difference ``f_l(w + dw) - f_l(w)``);
- ``cos theta_l = <-b_l, df_l> / (||b_l|| ||df_l||)``;
- loss decay from the layers up to ``l``: ``dL_l = sum_{k<=l} eta_k ||dL/dw_k||^2``, the sum over
  the parameters upstream of ``f_l``;
- the feature speed formula ``||df_l|| = dL_l / (||b_l|| cos theta_l)``, exact because
  ``<-b_l, df_l> = dL_l`` whenever ``f_l`` is a cut of the graph (see ``curvlab.layers``; the
  default layers are cuts).

The one-step feature change (the "delta coordinate check" of microsoft/mup) is the RMS size of
``f_l(t+1) - f_l(t)`` after one real optimizer step, next to the RMS size of ``f_l(t)``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jvp

from curvlab import layers as _layers
from curvlab.batches import Output, call_model, pick_output
from curvlab.func import (
    forward_context,
    functional_forward,
    stochastic_modules_in_train_mode,
    unwrap_compiled,
)

Batch = tuple[Any, Any]
METHODS = ("jvp", "finite-difference")


@dataclasses.dataclass(frozen=True)
class FeatureSpeedResult:
    """Per-layer feature speed quantities; each array has shape ``(num_layers,)``, float64."""

    layers: tuple[str, ...]
    cos_theta: np.ndarray
    feature_update_norm: np.ndarray  # ||df_l||
    backward_norm: np.ndarray  # ||b_l||
    loss_decay: np.ndarray  # dL_l
    predicted_update_norm: np.ndarray  # dL_l / (||b_l|| cos theta_l)
    method: str
    cut: np.ndarray | None = None  # bool (num_layers,): whether f_l is a cut of the graph
    direction: str = "gd"  # "gd" (-eta_k dL/dw_k), or the optimizer whose update was taken

    def as_dict(self) -> dict[str, np.ndarray]:
        """The per-layer arrays by name (for logging)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("layers", "method", "cut", "direction")}


@dataclasses.dataclass(frozen=True)
class FeatureChangeResult:
    """RMS size of each layer's features and of their change after one optimizer step."""

    layers: tuple[str, ...]
    feature_rms: np.ndarray  # ||f_l(t)||_rms, (num_layers,)
    change_rms: np.ndarray  # ||f_l(t+1) - f_l(t)||_rms, (num_layers,)

    @property
    def relative_change(self) -> np.ndarray:
        return self.change_rms / self.feature_rms

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"feature_rms": self.feature_rms, "change_rms": self.change_rms,
                "relative_change": self.relative_change}


def _split(batch: Any, call: str) -> Batch:
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(f"{call}: batch must be an (inputs, targets) pair, got "
                        f"{type(batch).__name__}")
    return batch[0], batch[1]


def _rates(model: nn.Module, names: Sequence[str], lrs: Any, optimizer: Any, call: str
           ) -> dict[str, float]:
    """Learning rate ``eta_k`` of each trained parameter (see :func:`feature_speed`)."""
    if lrs is not None and optimizer is not None:
        raise ValueError(f"{call}: pass lrs or optimizer, not both")
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{call}: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        group_lr = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
        params = dict(model.named_parameters())
        return {n: group_lr.get(id(params[n]), 0.0) for n in names}
    if lrs is None:
        return dict.fromkeys(names, 1.0)
    if isinstance(lrs, int | float):
        return dict.fromkeys(names, float(lrs))
    if not isinstance(lrs, Mapping):
        raise TypeError(f"{call}: lrs must be a float or a dict of parameter or module names to "
                        f"rates, got {type(lrs).__name__}")
    rates: dict[str, float] = {}
    modules = {m for m, _ in model.named_modules() if m}
    unknown = [k for k in lrs if k not in names and k not in modules]
    if unknown:
        raise ValueError(f"{call}: lrs has unknown names {unknown}; use parameter names "
                         f"(e.g. {list(names)[:4]}) or module names")
    for n in names:  # the longest matching key wins: a parameter's own rate over its module's
        keys = [k for k in lrs if n == k or n.startswith(k + ".")]
        if keys:
            rates[n] = float(lrs[max(keys, key=len)])
    missing = [n for n in names if n not in rates]
    if missing:
        raise ValueError(f"{call}: lrs gives no rate for parameters {missing}; give every "
                         "trained parameter (or its module) a rate, or pass one float")
    return rates


def _check_loss(loss: Any, call: str) -> None:
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise ValueError(f"{call}: loss_fn must return a scalar tensor (the batch mean), got "
                         f"{getattr(loss, 'shape', type(loss).__name__)}")
    if not torch.isfinite(loss):
        raise ValueError(f"{call}: the loss is not finite ({loss.item()}); check the model and "
                         "the batch")


def _norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.detach(), dtype=torch.float64)


def feature_speed(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Batch,
    *,
    layers: Sequence[str] | str | None = None,
    lrs: float | Mapping[str, float] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    method: str = "jvp",
    allow_train_mode: bool = False,
    seed: int = 0,
    output: Output = "auto",
) -> FeatureSpeedResult:
    """Per-layer angle between the feature update and the backward pass (docs/math.md section 5).

    Args:
        model: the network; evaluated in eval mode unless ``allow_train_mode`` (then BatchNorm uses
            batch statistics without updating its buffers, and Dropout draws fixed masks from
            ``seed``). Nothing about the model is changed. A ``torch.compile`` wrapper is
            measured through its eager module (same function; hooks need the eager forward).
        loss_fn: ``loss_fn(outputs, targets)``, the batch-mean loss, on the tensor that
            ``output`` picks (:mod:`curvlab.batches`; batches of any form it describes).
        batch: ``(inputs, targets)``.
        layers: module names (``model.named_modules()``, or ``"name:in"`` for a module's first
            input); ``None`` takes the default of ``curvlab.layers``: every parametrized module
            that runs once and whose output is a cut (pre-activations, residual stream after each
            block, the output); for a transformer (GPT-2-, BERT-, ViT-style stacks of attention
            blocks) the embedding output (``"<first block>:in"``), the output of every block and
            the final norm. A module that runs more than once per forward is refused.
        lrs: per-parameter rates ``eta_k``: one float, or a dict from parameter or module names to
            rates (the longest matching name wins; every trained parameter needs one).
        optimizer: measure along the update ``dw`` this optimizer would take from the batch's
            gradient: its own ``step()`` (momentum, Adam's moments and bias corrections, weight
            decay, per-group LRs) on float64 copies of the parameters and of its state, so the
            caller's model and optimizer are untouched (gradient clipping and LR schedulers
            belong to the loop and are not applied). Parameters outside it do not move. The
            loss decay is then ``dL_l = -sum_{k<=l} <dL/dw_k, dw_k>``. Neither ``lrs`` nor
            ``optimizer``: the GD step with ``eta_k = 1`` (angles do not depend on a scale).
        method: ``"jvp"`` (exact first order, one forward-mode pass) or ``"finite-difference"``
            (the actual change ``f_l(w + dw) - f_l(w)``, which differs by ``O(eta^2)``).
        seed: seed of the fixed RNG state for train-mode Dropout.

    Returns:
        A :class:`FeatureSpeedResult` with float64 arrays ``(num_layers,)``. ``cos_theta`` is NaN
        where a layer's features do not move (no trained parameter upstream). ``cut`` says
        which layers are cuts of the graph, where the formula is exact; on the others (a branch
        inside a block; the residual stream of a model with tied input and output embeddings,
        whose embedding also reaches the loss through the head) the angle is still exact but
        ``predicted_update_norm`` is not ``feature_update_norm``. ``direction`` says which
        update was measured: ``"gd"`` or the optimizer's class name.

    Cost: one forward and backward with the features kept, plus one forward-mode pass (JVP) or one
    forward (finite difference), about two training steps.

    Example:
        >>> import torch, curvlab as cl
        >>> model = cl.testing.MLP(d_in=3, width=8, d_out=2).double()
        >>> x, y = torch.randn(16, 3).double(), torch.randn(16, 2).double()
        >>> r = cl.feature_speed(model, cl.testing.mse, (x, y), lrs=0.1)
        >>> r.layers
        ('0', '2', '4')
        >>> bool(abs(r.predicted_update_norm / r.feature_update_norm - 1).max() < 1e-12)
        True
    """
    call = "feature_speed"
    if method not in METHODS:
        raise ValueError(f"{call}: method must be one of {METHODS}, got {method!r}")
    inputs, targets = _split(batch, call)
    model = unwrap_compiled(model)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trained:
        raise ValueError(f"{call}: no parameter of the model requires grad")
    rates = _rates(model, list(trained), lrs, optimizer, call)
    chosen = None if layers is None else _layers.check_layers(model, layers, call)
    busy = stochastic_modules_in_train_mode(model)
    if busy and not allow_train_mode:
        raise ValueError(f"{call}: modules {busy} are in training mode; call model.eval() or pass "
                         "allow_train_mode=True (fixed Dropout masks, BatchNorm batch statistics)")
    device = next(iter(trained.values())).device
    context = functools.partial(forward_context, model, train_mode=allow_train_mode, seed=seed,
                                device=device)

    # Pass 1: features, backward pass b_l and the gradient, from one forward and backward.
    watch, pick = (chosen, None) if chosen is not None else _layers.defaults(model)
    with context(), _layers.recording(model, watch) as rec:
        loss = loss_fn(pick_output(call_model(model, inputs), output, call), targets)
    _check_loss(loss, call)
    if pick is not None:
        picked = pick(loss, rec)
        names, feats = [n for n, _ in picked], [f for _, f in picked]
    else:
        names, feats = list(watch), rec.features(watch, call)
    for name, f in zip(names, feats, strict=True):
        if f.grad_fn is None:
            raise ValueError(f"{call}: layer {name!r} does not depend on any trained parameter")
    grads = torch.autograd.grad(loss, [*trained.values(), *feats], allow_unused=True)
    g = {n: torch.zeros_like(p) if d is None else d
         for (n, p), d in zip(trained.items(), grads, strict=False)}
    backward = grads[len(trained):]
    for name, b in zip(names, backward, strict=True):
        if b is None:
            raise ValueError(f"{call}: layer {name!r} does not influence the loss; choose layers "
                             "on the path from the inputs to the loss")
    ids = {id(p): n for n, p in trained.items()}
    theta = {n: p.detach() for n, p in trained.items()}
    if optimizer is not None:  # the optimizer's own update, taken on float64 copies
        dw = {n: d.to(theta[n].dtype) for n, d in
              _optimizer_update(model, optimizer, trained, g, call).items()}
    else:  # the GD step -eta_k g_k
        dw = {n: -rates[n] * g[n].detach() for n in trained}
    step_size = {n: -float(torch.sum(g[n].double() * dw[n].double()))
                 for n in trained}  # -<g_k, dw_k>, eta_k ||g_k||^2 for GD
    loss_decay = [sum(step_size[ids[i]] for i in _layers.upstream_params(f.grad_fn) if i in ids)
                  for f in feats]
    cut = np.array([_layers.is_cut(loss, f) for f in feats], dtype=bool)

    # Pass 2: the feature update along dw.
    frozen = {**dict(model.named_buffers()),
              **{n: p.detach() for n, p in model.named_parameters() if n not in trained}}

    def features_at(w: dict[str, Tensor]) -> tuple[Tensor, ...]:
        with _layers.recording(model, names) as rec2:
            functional_forward(model, {**frozen, **w}, inputs)
        return tuple(rec2.features(names, call))

    with context():
        if method == "jvp":
            updates = jvp(features_at, (theta,), (dw,))[1]
        else:
            with torch.no_grad():
                moved = features_at({n: theta[n] + dw[n] for n in trained})
            updates = tuple(a - f.detach() for a, f in zip(moved, feats, strict=True))

    dot = np.array([float(torch.sum(b.detach().double() * d.double()))
                    for b, d in zip(backward, updates, strict=True)])
    b_norm = np.array([float(_norm(b)) for b in backward])
    d_norm = np.array([float(_norm(d)) for d in updates])
    decay = np.array(loss_decay, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = -dot / (b_norm * d_norm)
        predicted = decay / (b_norm * cos)
    direction = "gd" if optimizer is None else type(optimizer).__name__
    return FeatureSpeedResult(tuple(names), cos, d_norm, b_norm, decay, predicted, method, cut,
                              direction)


def _optimizer_update(model: nn.Module, optimizer: torch.optim.Optimizer,
                      trained: Mapping[str, Tensor], grads: Mapping[str, Tensor], call: str
                      ) -> dict[str, Tensor]:
    """``dw``: the change one ``optimizer.step()`` would make from the gradients ``grads``.

    The step runs on float64 clones of the parameters, in a new optimizer of the same class and
    param groups with the state loaded from ``optimizer.state_dict()`` (which casts it to the
    clones' dtype), so that a small update of large float32 weights keeps its digits. An
    optimizer that cannot be rebuilt from its groups steps on deep copies instead.
    """
    _check_owned(model, optimizer, call)
    names = {id(p): n for n, p in model.named_parameters()}
    clones: dict[str, Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        members = []
        for p in group["params"]:
            name = names[id(p)]
            clones[name] = p.detach().to(torch.float64).clone().requires_grad_(True)
            members.append(clones[name])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": members})
    try:
        copy_opt = cast(Any, type(optimizer))(groups)
        # A deep copy: loading keeps tensors that already have the clones' dtype (no cast).
        copy_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    except (TypeError, ValueError, KeyError):  # a custom optimizer: step on deep copies
        work, work_opt = _copy_training(model, optimizer, call)
        params = dict(work.named_parameters())
        before = {n: params[n].detach().clone() for n in trained}
        for n, p in params.items():
            p.grad = grads[n].detach().clone() if n in trained else None
        work_opt.step()
        return {n: (params[n].detach() - before[n]).double() for n in trained}
    before = {n: t.detach().clone() for n, t in clones.items()}
    for n, t in clones.items():
        t.grad = grads[n].detach().to(torch.float64) if n in trained else None
    copy_opt.step()
    return {n: clones[n].detach() - before[n] if n in clones else torch.zeros_like(
        trained[n], dtype=torch.float64) for n in trained}


def _check_owned(model: nn.Module, optimizer: torch.optim.Optimizer, call: str) -> None:
    """Refuse an optimizer that updates tensors other than ``model``'s parameters."""
    owned = {id(p) for p in model.parameters()}
    foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in owned]
    if foreign:
        raise ValueError(f"{call}: the optimizer updates {len(foreign)} tensors that are not "
                         "parameters of the model; pass the optimizer that trains this model")


def _copy_training(model: nn.Module, optimizer: torch.optim.Optimizer, call: str
                   ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Deep copies of ``model`` and ``optimizer`` whose optimizer updates the copied parameters."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{call}: optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    _check_owned(model, optimizer, call)
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    return model_copy, optimizer_copy


def feature_change(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    layers: Sequence[str] | str | None = None,
    seed: int = 0,
    output: Output = "auto",
) -> FeatureChangeResult:
    """RMS size of each layer's features and of their change after one real optimizer step.

    The step (``zero_grad``, forward in the model's own mode, ``backward``, ``optimizer.step()``)
    runs on deep copies of the model and the optimizer, with the global RNG forked and seeded with
    ``seed``; the caller's model, optimizer state, gradients and RNG are left bit-identical.
    Features are measured before and after the step in eval mode, on ``batch``. ``layers`` as in
    :func:`feature_speed`, and so are ``output`` and a compiled model. Under muP the change is
    flat in width; under NTP it shrinks (the "delta coordinate check", docs/math.md section 5).

    Example:
        >>> import torch, curvlab as cl
        >>> model = cl.testing.MLP(d_in=3, width=8, d_out=2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 2)
        >>> r = cl.feature_change(model, cl.testing.mse, (x, y), opt)
        >>> r.layers, bool((r.change_rms > 0).all())
        (('0', '2', '4'), True)
    """
    call = "feature_change"
    inputs, targets = _split(batch, call)
    model = unwrap_compiled(model)
    chosen = None if layers is None else _layers.check_layers(model, layers, call)
    work, opt = _copy_training(model, optimizer, call)
    device = next(work.parameters()).device
    cuda = [device] if device.type == "cuda" else []

    def measure(names: Sequence[str] | None) -> tuple[list[str], list[Tensor]]:
        with forward_context(work, train_mode=False, seed=seed, device=device):
            if names is None:
                picked = _layers.default_layers(work, loss_fn, inputs, targets, output)
                return [n for n, _ in picked], [f.detach() for _, f in picked]
            with torch.no_grad(), _layers.recording(work, names) as rec:
                call_model(work, inputs)
            return list(names), rec.features(names, call)

    names, before = measure(chosen)
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(pick_output(call_model(work, inputs), output, call), targets)
        _check_loss(loss, call)
        loss.backward()
        opt.step()
    _, after = measure(names)

    def rms(t: Tensor) -> float:
        return float(_norm(t)) / max(t.numel(), 1) ** 0.5

    return FeatureChangeResult(tuple(names), np.array([rms(f) for f in before]),
                               np.array([rms(a - f) for a, f in zip(after, before, strict=True)]))
