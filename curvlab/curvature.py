"""Operator base classes: ``OperatorBase``, and ``CurvatureOperator`` from one batch's product.

An operator has ``shape (P, P)``, ``dtype``, ``device``, ``num_matvecs`` and ``A @ v`` for
``v (P,)`` or ``V (P, m)``; every ``linalg`` estimator takes one, and ``to_scipy()`` hands it to
``scipy.sparse.linalg``. A :class:`CurvatureOperator` is the weighted mean over the batches of
``data`` of a per-batch product that a subclass supplies (``make_product``) from the batch in
functional form (:class:`BatchFunctions`); it does the rest: parameter selection, the forward
context (modes, seeded Dropout, math attention), the rev-rev/fwd-rev route and its fallback,
graph reuse, batch weights and ``torch.distributed`` sharding. The matrices themselves
(Hessian, Gauss-Newton) are in :mod:`curvlab.operators`; a new one is written the same way
(docs/extending.md).

Example:
    >>> import torch
    >>> from curvlab import products
    >>> class Hessian(CurvatureOperator):
    ...     def make_product(self, batch):
    ...         return products.make_hvp_fwdrev(batch.loss, batch.primals, batch.layout,
    ...                                         context=batch.context,
    ...                                         check_loss=batch.check_loss)
    >>> model = torch.nn.Linear(3, 1, bias=False)
    >>> x, y = torch.eye(3), torch.zeros(3, 1)
    >>> H = Hessian(model, lambda f, t: 0.5 * ((f - t) ** 2).sum(1).mean(), (x, y))
    >>> H @ torch.eye(3)  # (1/3) x^T x
    tensor([[0.3333, 0.0000, 0.0000],
            [0.0000, 0.3333, 0.0000],
            [0.0000, 0.0000, 0.3333]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from curvlab import distributed, fastpath, func
from curvlab.batches import Output, Weights, as_batches, batch_weight, check_weights, split_batch
from curvlab.func import ParamLayout, Product

METHODS = ("auto", "fwd-rev", "rev-rev")


class OperatorBase:
    """Shape bookkeeping, input checks and the scipy adapter shared by curvlab's operators."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    num_matvecs: int

    def _check_vectors(self, v: Any, call: str) -> Tensor:
        """Validate ``v (P,)`` or ``V (P, m)``; return it as a block ``(P, m)``."""
        P = self.shape[0]
        if not isinstance(v, Tensor):
            raise TypeError(f"{call}: expected a torch.Tensor of shape ({P},) or ({P}, m), "
                            f"got {type(v).__name__}")
        if v.ndim not in (1, 2) or v.shape[0] != P or v.numel() == 0:
            raise ValueError(f"{call}: expected a vector of shape ({P},) or a block ({P}, m) with "
                             f"m >= 1, got shape {tuple(v.shape)}")
        if v.dtype != self.dtype:
            raise TypeError(f"{call}: expected dtype {self.dtype} (the model's), got {v.dtype}; "
                            f"convert with v.to({self.dtype})")
        if v.device != self.device:
            raise ValueError(f"{call}: expected a tensor on {self.device} (the model's device), "
                             f"got one on {v.device}; move it with v.to('{self.device}')")
        return v if v.ndim == 2 else v[:, None]

    def broadcast(self, t: Tensor) -> Tensor:
        """``t`` as the first rank of the operator's process group holds it (``linalg`` draws its
        random vectors through this, so that every rank starts alike); unchanged in one process."""
        return t

    def to_scipy(self) -> LinearOperator:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` (numpy in, numpy out)."""
        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def matmat(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X).reshape(self.shape[0], -1), device=self.device)
            return (self @ V.to(self.dtype)).cpu().numpy()  # type: ignore[operator]

        return LinearOperator(self.shape, matvec=matmat, matmat=matmat, rmatvec=matmat,
                              dtype=np_dtype)


def select_params(model: nn.Module, params: Iterable[str] | None, call: str) -> dict[str, Tensor]:
    """The named parameters to differentiate: all that require grad, or the given names."""
    named: dict[str, Tensor] = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError(f"{call}: no parameter of the model requires grad; enable "
                             "requires_grad on some, or pass params=[names]")
        return chosen
    names = [params] if isinstance(params, str) else list(params)
    unknown = [n for n in names if n not in named]
    if unknown or not names:
        raise ValueError(f"{call}: unknown parameter names {unknown or names}; valid names "
                         f"include {list(named)[:8]}")
    return {n: named[n] for n in named if n in set(names)}


@dataclass(frozen=True)
class BatchFunctions:
    """One batch of an operator's ``data`` in functional form, what ``make_product`` builds on.

    ``theta`` is a dict ``name -> tensor`` of the selected parameters. ``loss``: ``theta -> L_b``
    (the batch mean, a scalar; built for the route ``method``); ``outputs``: ``theta -> f_b`` (the
    tensor ``loss_fn`` gets, ``(n, ...)``); ``loss_of_outputs``: ``f -> loss_fn(f, targets)``;
    ``primals``: ``theta`` at construction; ``layout``: the
    :class:`~curvlab.func.ParamLayout` between ``theta`` and flat ``(P,)``; ``context``: ``() ->``
    the context manager of every forward (the mode, seeded Dropout masks, math attention);
    ``check_loss(value, finite=True)`` refuses a non-scalar or non-finite loss; ``method``:
    ``"rev-rev"`` or ``"fwd-rev"``; ``reuse_graph``: whether the product is kept and called
    again (else once); ``inputs``, ``targets``, ``index``: the batch and its position in ``data``.
    """

    loss: Callable[[func.Params], Tensor]
    outputs: Callable[[func.Params], Any]
    loss_of_outputs: Callable[[Any], Tensor]
    primals: func.Params
    layout: ParamLayout
    context: Callable[[], Any]
    check_loss: Callable[..., None]
    method: str
    reuse_graph: bool
    inputs: Any
    targets: Any
    index: int


class CurvatureOperator(OperatorBase):
    """A curvature matrix of the mean loss from the product of one batch: subclass it.

    ``A = sum_b w_b A_b / sum_b w_b`` over the batches of ``data`` (weights as in
    :class:`~curvlab.operators.HessianOperator`, whose arguments it takes); a subclass's
    ``make_product(batch)`` returns ``V (P, m) -> A_b V`` for one :class:`BatchFunctions`, by a
    factory of :mod:`curvlab.products`. The rest (parameter selection and snapshot, modes and
    RNG, batch weights, kept graphs, the ``"auto"`` route's fall-back, process groups,
    ``to_scipy``) is this class's. Set what ``make_product`` reads before
    ``super().__init__()``, which builds a single batch's product at once.

    Example (``H + lam I``, a damped Hessian):
        >>> import torch, curvlab as cl
        >>> class DampedHessian(cl.HessianOperator):
        ...     def __init__(self, *args, lam, **kwargs):
        ...         self.lam = lam
        ...         super().__init__(*args, **kwargs)
        ...     def make_product(self, batch):
        ...         hvp = super().make_product(batch)
        ...         return lambda V: hvp(V) + self.lam * V
        >>> case = cl.testing.make_case("mlp_tanh")
        >>> A = DampedHessian(case.model, case.loss_fn, case.data, lam=0.5)
        >>> H = cl.testing.dense_hessian(case.model, case.loss_fn, case.data)  # (P, P)
        >>> I = torch.eye(A.shape[0], dtype=A.dtype)
        >>> bool(torch.allclose(A @ I, H + 0.5 * I))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Any,
        *,
        params: Iterable[str] | None = None,
        method: str = "auto",
        reuse_graph: bool | None = None,
        allow_train_mode: bool = False,
        seed: int = 0,
        group: Any = None,
        output: Output = "auto",
        weights: Weights = None,
    ) -> None:
        name = type(self).__name__
        if type(self).make_product is CurvatureOperator.make_product:
            raise TypeError(f"{name}: subclass CurvatureOperator and implement make_product(batch)"
                            " (docs/extending.md), or use cl.HessianOperator or cl.GGNOperator")
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: model must be a torch.nn.Module, got {type(model).__name__}")
        model, ddp_group = distributed.unwrap(model)
        group = ddp_group if group is None else group
        self.output, self.weights = output, check_weights(weights, name)
        self._shards: distributed.Shards | None = None
        if distributed.is_active(group):
            first = next(model.parameters(), None)
            self._shards = distributed.Shards(group, first.device if first is not None
                                              else torch.device("cpu"))
            error: Exception | None = None
            try:
                self._setup(name, model, loss_fn, data, params, method, reuse_graph,
                            allow_train_mode, seed)
            except Exception as err:  # re-raised by check(), after every rank learns of it
                error = err
            count = self._local_count() if error is None else 0
            chosen = self._primals if error is None else {}
            self._shards.check(name, count, chosen, error)
            self._count = count
            return
        self._setup(name, model, loss_fn, data, params, method, reuse_graph, allow_train_mode,
                    seed)

    def _setup(self, name: str, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor],
               data: Any, params: Iterable[str] | None, method: str, reuse_graph: bool | None,
               allow_train_mode: bool, seed: int) -> None:
        if not callable(loss_fn):
            raise TypeError(f"{name}: loss_fn must be callable as loss_fn(outputs, targets)")
        if method not in METHODS:
            raise ValueError(f"{name}: method must be one of {METHODS}, got {method!r}")
        inner = func.unwrap_compiled(model)  # names, modes and buffers of a compiled model
        stochastic = func.stochastic_modules_in_train_mode(inner)
        if stochastic and not allow_train_mode:
            raise ValueError(f"{name}: modules {stochastic[:4]} are in training mode, which would "
                             "make the curvature depend on batch statistics or random masks; call "
                             "model.eval() first, or pass allow_train_mode=True to measure the "
                             "train-mode loss (batch statistics, fixed dropout masks)")
        self._batches, single = as_batches(data, name)
        chosen = select_params(inner, params, name)
        dtypes = {p.dtype for p in chosen.values()}
        if len(dtypes) != 1:
            raise TypeError(f"{name}: the selected parameters mix dtypes "
                            f"{sorted(map(str, dtypes))}; cast the model to one dtype or select "
                            "a subset with params=")
        self.layout = ParamLayout.from_params(chosen)
        first = next(iter(chosen.values()))
        self.shape = (self.layout.numel, self.layout.numel)
        self.dtype, self.device = first.dtype, first.device
        # A snapshot: the operator is the curvature at the parameters it was built with.
        snapshot = self.layout.ravel({n: p.detach() for n, p in chosen.items()})  # (P,), a copy
        self._primals = self.layout.unravel(snapshot)  # name -> view of the snapshot
        self._frozen = {n: p.detach() for n, p in inner.named_parameters() if n not in chosen}
        self._frozen.update({n: b.detach().clone() for n, b in inner.named_buffers()})
        self.model, self.loss_fn = model, loss_fn
        self.allow_train_mode, self.seed = allow_train_mode, seed
        self._tied = func.has_tied_tensors(inner)
        # The Hessian's rev-rev route swaps the tensors in through slots looked up once
        # (fastpath.Reparametrized); tied tensors need functional_call's alias handling.
        self._call = None if self._tied else fastpath.Reparametrized(
            model, [*self._frozen, *self.layout.names])
        self.reuse_graph = single if reuse_graph is None else bool(reuse_graph)
        # auto: double backward, except where aot_autograd (torch.compile) cannot run it.
        self._auto = method == "auto"
        self.method = method if not self._auto else (
            "fwd-rev" if func.is_compiled(model) else "rev-rev")
        self.num_matvecs = 0
        self._cache: dict[int, Product] = {}
        self._name = name
        if self.reuse_graph:  # build (and validate) the kept graphs now
            for i, batch in enumerate(self._batches):
                if self._weight(batch, i) > 0:  # weight 0: an empty shard, or only padding
                    self._product(i, batch)
        if not self._cache and next(iter(self._batches), None) is None and self._shards is None:
            raise ValueError(f"{name}: data holds no batches; pass at least one (inputs, targets)")

    def _weight(self, batch: Any, index: int) -> float:
        """``w_b``: the batch's number of examples, or ``weights(inputs, targets)``."""
        inputs, targets = split_batch(batch, index, self._name)
        return batch_weight(self.weights, inputs, targets, index, self._name)

    def _local_count(self) -> float:
        """The total weight on this rank: the sum of its ``w_b`` (0 for an empty shard)."""
        return sum(self._weight(batch, i) for i, batch in enumerate(self._batches))

    def broadcast(self, t: Tensor) -> Tensor:
        return t if self._shards is None else self._shards.broadcast(t)

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.layout.names

    def _check_loss(self, value: Tensor, index: int, finite: bool = True) -> None:
        if not isinstance(value, Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{self._name}: loss_fn must return the batch mean as a scalar "
                             f"tensor, got {shape} for batch {index}; use reduction='mean'")
        if finite and not math.isfinite(loss := value.item()):
            raise ValueError(f"{self._name}: the loss of batch {index} is {loss}; "
                             "curvature is undefined there (check the data and the parameters)")

    def _context(self, index: int) -> Any:
        return func.forward_context(self.model, train_mode=self.allow_train_mode,
                                    seed=self.seed + index, device=self.device)

    def _split(self, batch: Any, index: int) -> tuple[Any, Any, float]:
        inputs, targets = split_batch(batch, index, self._name)
        if func.batch_size(inputs) == 0:
            raise ValueError(f"{self._name}: batch {index} is empty; drop it from data")
        return inputs, targets, batch_weight(self.weights, inputs, targets, index, self._name)

    def make_product(self, batch: BatchFunctions) -> Product:
        """``V (P, m) -> A_b V (P, m)`` for one batch; what a subclass supplies."""
        raise NotImplementedError

    def _make_product(self, inputs: Any, targets: Any, index: int) -> Product:
        call = self._call if self.method == "rev-rev" else None  # torch.func: functional_call
        loss_fn, model, frozen = self.loss_fn, self.model, self._frozen
        return self.make_product(BatchFunctions(
            func.make_functional_loss(model, loss_fn, frozen, inputs, targets,
                                      tie_weights=self._tied, call=call, output=self.output),
            func.make_functional_outputs(model, frozen, inputs, self.output),
            lambda f: loss_fn(f, targets), self._primals, self.layout,
            partial(self._context, index), partial(self._check_loss, index=index), self.method,
            self.reuse_graph, inputs, targets, index))

    def _product(self, index: int, batch: Any) -> Product:
        if index in self._cache:
            return self._cache[index]
        inputs, targets, _ = self._split(batch, index)
        try:
            product = self._make_product(inputs, targets, index)
        except RuntimeError as err:
            if not self._fall_back(err):
                raise
            product = self._make_product(inputs, targets, index)
        if self.reuse_graph:
            self._cache[index] = product
        return product

    def _fall_back(self, err: RuntimeError) -> bool:
        """Under ``method="auto"``, switch from rev-rev to fwd-rev when ``err`` says the model
        has no double backward (a compiled function inside the forward, a once-differentiable
        custom Function); ``False`` when there is nothing to switch to."""
        if not (self._auto and self.method == "rev-rev" and _unsupported_route(err)):
            return False
        self.method, self._cache = "fwd-rev", {}
        return True

    def _apply(self, index: int, batch: Any, V: Tensor) -> Tensor:
        """``H_b V`` of batch ``index``, with the error of a route the model lacks explained."""
        try:
            return self._product(index, batch)(V)
        except RuntimeError as err:
            if self._fall_back(err):
                return self._product(index, batch)(V)
            if not _unsupported_route(err):
                raise
            reason = str(err).splitlines()[0]
            if self._auto:  # both routes were tried (or rev-rev cannot run on a compiled model)
                raise ValueError(
                    f"{self._name}: neither double backward nor forward-over-reverse runs on this "
                    f"model ({reason}); give its custom autograd Functions a setup_context and a "
                    "jvp (or a differentiable backward), or pass the eager module "
                    "(model._orig_mod of a torch.compile wrapper)") from err
            other = "rev-rev" if self.method == "fwd-rev" else "fwd-rev"
            raise ValueError(f"{self._name}: method={self.method!r} does not run on this model "
                             f"({reason}); try method={other!r} or 'auto'") from err

    def __matmul__(self, v: Tensor) -> Tensor:
        call = f"{self._name} @ v"
        V = self._check_vectors(v, call)  # (P, m)
        if self._shards is not None:
            mean = self._shards.mean(self._local_sum(V), self._count)  # (P, m)
            if not torch.isfinite(mean).all():
                raise ValueError(f"{call}: the product is not finite; the loss or its derivatives "
                                 "overflow on some rank's data (try float64 or check the inputs)")
            self.num_matvecs += V.shape[1]
            return mean if v.ndim == 2 else mean[:, 0]
        total: Tensor | None = None
        first = count = 0.0
        for index, batch in enumerate(self._batches):
            _, _, n = self._split(batch, index)
            if n == 0:  # no weight (e.g. only padding tokens): the batch is not in the objective
                continue
            out = self._apply(index, batch, V)  # (P, m), curvature of the batch mean
            if not math.isfinite(out.sum().item()) and not torch.isfinite(out).all():  # cheap first
                raise ValueError(f"{call}: the product for batch {index} is not finite; the "
                                 "loss or its derivatives overflow there (try float64 or check "
                                 "the inputs)")
            if total is None:  # a single batch needs no weighting: no extra pass over (P, m)
                total, first = out, n
            else:
                if count == first:
                    total = total * first
                total.add_(out, alpha=n)
            count += n
        if total is None:
            raise ValueError(f"{call}: data holds no batches of positive weight; pass at least "
                             "one (inputs, targets) whose weight is not 0")
        if count != first:
            total /= count  # sum_b w_b (H_b V) / sum_b w_b
        self.num_matvecs += V.shape[1]
        return total if v.ndim == 2 else total[:, 0]

    def _local_sum(self, V: Tensor) -> Tensor:
        """``sum_b w_b (H_b V)`` over this rank's batches ``(P, m)``; zeros for an empty shard."""
        total = torch.zeros_like(V)  # (P, m)
        for index, batch in enumerate(self._batches):
            if func.batch_size(batch[0]) > 0 and (n := self._weight(batch, index)) > 0:
                total.add_(self._apply(index, batch, V), alpha=n)
        return total


_ROUTE_ERRORS = ("double backward", "differentiate twice", "once_differentiable", "jvp",
                 "forward mode", "forward-mode", "forward AD")


def _unsupported_route(err: RuntimeError) -> bool:
    """Whether ``err`` is autograd saying that a derivative the route needs does not exist."""
    text = str(err)
    return any(key in text for key in _ROUTE_ERRORS)
