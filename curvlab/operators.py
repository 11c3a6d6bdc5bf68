"""Exact curvature operators of the mean training loss: Hessian, Gauss-Newton, preconditioning.

``H = d^2 L / d theta^2`` with ``L = (1/N) sum_i l(f(x_i), y_i)`` over every example of ``data``
(one ``(inputs, targets)`` batch, or an iterable of batches weighted by size; docs/math.md
section 0).
``G = (1/N) sum_i J_i^T (d^2 l / d f^2) J_i`` is the Gauss-Newton matrix (docs/math.md section 0).

Operators have ``shape (P, P)``, ``dtype``, ``device``, ``num_matvecs`` and ``A @ v`` for
``v (P,)`` or ``V (P, m)``; every ``linalg`` estimator takes them, and ``to_scipy()`` hands them to
``scipy.sparse.linalg``. Both are :class:`~curvlab.curvature.CurvatureOperator` subclasses that
supply only the product of one batch (``make_product``); a new curvature matrix is written the
same way (docs/extending.md).

Example:
    >>> import torch, curvlab as cl
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> H = cl.HessianOperator(model, torch.nn.functional.mse_loss, (x, y))
    >>> H.shape, (H @ torch.randn(H.shape[0], 5)).shape
    ((21, 21), torch.Size([21, 5]))
"""

from __future__ import annotations

from curvlab import products
from curvlab.curvature import (
    METHODS,
    BatchFunctions,
    CurvatureOperator,
    OperatorBase,
    select_params,
)
from curvlab.func import Product

__all__ = ["METHODS", "BatchFunctions", "CurvatureOperator", "GGNOperator", "HessianOperator",
           "OperatorBase", "select_params"]  # the base classes are re-exported from here


class HessianOperator(CurvatureOperator):
    """The Hessian of the mean loss over ``data`` with respect to the selected parameters.

    Args:
        model: the network; called as ``model(x)``, ``model(*inputs)`` for a tuple and
            ``model(**inputs)`` for a dict (:mod:`curvlab.batches`). A ``torch.compile`` wrapper
            is accepted: parameter names are those of the eager module (no ``_orig_mod.``).
        loss_fn: ``loss_fn(outputs, targets)`` -> the batch mean (a scalar tensor); ``outputs``
            is the tensor that ``output`` picks.
        data: one ``(inputs, targets)`` tuple, or a re-iterable of them (list, DataLoader without
            shuffling; a shuffling one is refused); batches are weighted by ``weights``.
        params: ``None`` (every parameter that requires grad) or names: a diagonal block of ``H``.
        method: ``"rev-rev"`` (double backward), ``"fwd-rev"`` (``jvp`` of ``grad``, vmapped over
            the columns of V), or ``"auto"``, which takes ``"rev-rev"``, and ``"fwd-rev"`` for a
            compiled model (aot_autograd, behind ``torch.compile``, has no double backward; a
            compiled function found inside the forward at the first product switches too);
            ``H.method`` says which was taken. The reason for rev-rev: measured on
            CPU (torch 2.13, benchmarks/hvp.py), one second backward through a kept first-order
            graph costs 1.3-2.0 gradients against 2.7-3.5 for forward-over-reverse, and double
            backward without reuse is still the cheaper of the two (2.3-3.1); reverse mode also
            needs no forward-mode formulas, which some operators lack. Attention runs on the
            math SDPA backend, whose double backward exists on every device.
        reuse_graph: keep each batch's first-order graph between products, so a product is one
            second backward. Default: ``True`` for a single batch, ``False`` for an iterable. The
            kept graph holds the activations and the gradient's graph, about two to three times
            the memory of one training step per batch; pass ``False`` to recompute instead.
        allow_train_mode: measure the train-mode loss: BatchNorm uses batch statistics (its
            running statistics are never written) and Dropout replays one fixed mask per batch.
        seed: the RNG seed for those masks (batch ``i`` uses ``seed + i``).
        output: which tensor of the model's outputs ``loss_fn`` gets: ``"auto"`` (a tensor as it
            is, else ``.logits``, else the first tensor), a key or attribute name, a tuple index,
            a callable, or ``None`` for the raw outputs (:mod:`curvlab.batches`).
        weights: ``None`` weights batch ``b`` by its number of examples; a callable
            ``(inputs, targets) -> w_b`` by any count, e.g. ``cl.count_tokens()`` for a loss
            that is a mean over target tokens. The operator is the Hessian of
            ``sum_b w_b L_b / sum_b w_b``; batches of weight 0 are left out.
        group: a ``torch.distributed`` process group whose ranks each hold a shard of the data;
            default: the group of a ``DistributedDataParallel`` model, else the default group
            when one is initialized with more than one rank. The operator is then the Hessian of
            the mean loss over every rank's examples (:mod:`curvlab.distributed`); construction
            and every product are collective: call them on every rank of the group.

    The operator is the Hessian at the parameter values of its construction (a snapshot). Products
    leave the model's modes, parameters, buffers and the global RNG state as they were.
    """

    def make_product(self, batch: BatchFunctions) -> Product:
        """The Hessian-vector product of one batch by the route ``batch.method``."""
        if batch.method == "rev-rev":
            return products.make_hvp_revrev(batch.loss, batch.primals, batch.layout,
                                            context=batch.context, check_loss=batch.check_loss,
                                            reuse=batch.reuse_graph)
        return products.make_hvp_fwdrev(batch.loss, batch.primals, batch.layout,
                                        context=batch.context, check_loss=batch.check_loss)


class GGNOperator(CurvatureOperator):
    """The generalized Gauss-Newton matrix ``G = (1/N) sum_i J_i^T (d^2 l / d f^2) J_i``.

    Same arguments as :class:`HessianOperator`. The output-space Hessian comes from ``loss_fn``
    itself by automatic differentiation, so MSE, cross-entropy and custom losses are all exact;
    for MSE with ``l = 0.5 ||f - y||^2``, ``G = J^T J / N``. ``G`` is positive semi-definite when
    the loss is convex in the outputs. ``"rev-rev"`` uses reverse mode only (the double-vjp trick
    for ``J v``) and keeps the graph like the Hessian; ``"fwd-rev"`` uses ``jvp`` for ``J v``.
    """

    def make_product(self, batch: BatchFunctions) -> Product:
        """The Gauss-Newton-vector product of one batch by the route ``batch.method``."""
        factory = (products.make_ggnvp_revrev if batch.method == "rev-rev"
                   else products.make_ggnvp_fwdrev)
        return factory(batch.outputs, batch.loss_of_outputs, batch.primals, batch.layout,
                       context=batch.context, check_loss=batch.check_loss)
