"""The empirical neural tangent kernel, three ways, and a matrix-free kernel operator.

``Theta(x, x')_{ab} = <d f_a(x) / d theta, D d f_b(x') / d theta>`` (Jacot et al. 2018,
arXiv:1806.07572), with ``D = diag(scales)`` for the LR-weighted kernel ``J D J^T`` that drives one
gradient step, ``df = -eta Theta_D grad_f L`` (docs/math.md section 4). Output reductions:
``"full"`` ``(n1, n2, k, k)``, ``"trace"`` ``sum_a Theta_aa`` ``(n1, n2)`` (summed, not averaged
as in neural-tangents), ``"diagonal"`` ``(n1, n2, k)``.

The kernel is computed by one of three exact methods of :mod:`curvlab.ntk_kernels`
(``"jacobian"``, ``"ntvp"``, ``"structured"``), or the cheapest by their cost model
(``method="auto"``). :func:`empirical_ntk_per_layer` splits it by module.

Example:
    >>> import torch, curvlab as cl
    >>> model = torch.nn.Linear(3, 2).double()
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> K = cl.empirical_ntk(model, x)           # (4, 4, 2, 2)
    >>> torch.allclose(K[..., 0, 0], x @ x.T + 1) and bool((K[..., 0, 1] == 0).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from curvlab import distributed, func
from curvlab.batches import Output
from curvlab.curvature import OperatorBase, select_params
from curvlab.ntk_kernels import (
    KernelSetup,
    jacobian_kernel,
    method_costs,
    ntvp_kernel,
    structured_kernel,
)

OUTPUTS = ("full", "trace", "diagonal")
METHODS = ("auto", "structured", "jacobian", "ntvp")
_tree_map = torch.utils._pytree.tree_map


def empirical_ntk(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    *,
    outputs: str = "full",
    method: str = "auto",
    params: Iterable[str] | None = None,
    scales: Tensor | None = None,
    chunk_size: int | None = None,
    group: Any = None,
    output: Output = "auto",
) -> Tensor:
    """The empirical NTK ``J(x1) D J(x2)^T`` of ``model`` (see the module docstring).

    Args:
        model: maps a batch to outputs ``(n, k)``; evaluated in eval mode. Outputs may be a
            tuple, dict or ``ModelOutput``: ``output`` picks the tensor (default ``"auto"``:
            ``.logits``, else the first tensor; :mod:`curvlab.batches`), and dimensions after
            the first are flattened into ``k`` (pick e.g. ``lambda o: o.logits[:, -1]`` for a
            language model's last position). A compiled model runs its eager module.
        x1, x2: batches of inputs (a tensor, a tuple of positional or a dict of keyword
            arguments); ``x2=None`` means ``x2 = x1``.
        outputs: ``"full"`` ``(n1, n2, k, k)``, ``"trace"`` ``(n1, n2)``, ``"diagonal"``
            ``(n1, n2, k)``.
        method: ``"structured"``, ``"jacobian"``, ``"ntvp"`` or ``"auto"`` (cheapest estimate).
        params: names of the parameters to differentiate (default: all that require grad).
        scales: ``d (P,)`` for the LR-weighted kernel ``J D J^T`` (``cl.lr_scales``).
        chunk_size: examples (jacobian) or columns (ntvp) per vmap call, to bound memory.
        group: a ``torch.distributed`` process group (default: a DDP model's, else the default
            group when initialized with several ranks). Each rank passes its shard as ``x1``
            (``x2`` must be None); the inputs are gathered, each rank computes its rows of the
            kernel over all examples, and every rank returns the whole kernel, rows in rank
            order. Collective: call it on every rank.

    Returns:
        the kernel in the ``outputs`` layout.
    """
    kwargs = {"outputs": outputs, "method": method, "params": params, "scales": scales,
              "chunk_size": chunk_size, "output": output}
    return _gathered(model, x1, x2, group, "empirical_ntk", lambda m, a, b: {
        "": _local_ntk(m, a, b, **kwargs)}, params)[""]  # type: ignore[arg-type]


def empirical_ntk_per_layer(
    model: nn.Module,
    x1: Any,
    x2: Any = None,
    *,
    outputs: str = "full",
    method: str = "auto",
    params: Iterable[str] | None = None,
    scales: Tensor | None = None,
    chunk_size: int | None = None,
    group: Any = None,
    output: Output = "auto",
) -> dict[str, Tensor]:
    """The empirical NTK split by module: ``Theta = sum_l J_l D_l J_l^T``, one term per module.

    Keys are module names (``""`` for parameters of the root module), each holding the kernel
    of that module's own parameters, in the ``outputs`` layout; the terms sum to
    :func:`empirical_ntk` with the same arguments, which are as there.

    Example:
        >>> import torch, curvlab as cl
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 1)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> parts = cl.empirical_ntk_per_layer(model, x, outputs="trace")
        >>> sorted(parts)
        ['0', '2']
        >>> torch.testing.assert_close(sum(parts.values()),
        ...                            cl.empirical_ntk(model, x, outputs="trace"))
    """
    call = "empirical_ntk_per_layer"

    def local(m: nn.Module, a: Any, b: Any) -> dict[str, Tensor]:
        m = func.unwrap_compiled(m)
        full = select_params(m, params, call)
        groups: dict[str, list[str]] = {}
        for n in full:
            groups.setdefault(n.rpartition(".")[0], []).append(n)
        return {g: _local_ntk(m, a, b, outputs=outputs, method=method, params=names,
                              chunk_size=chunk_size, output=output, call=call,
                              scales=None if scales is None else _subset(scales, full, names))
                for g, names in groups.items()}

    return _gathered(model, x1, x2, group, call, local, params)


def _gathered(model: nn.Module, x1: Any, x2: Any, group: Any, call: str,
              local: Callable[[nn.Module, Any, Any], dict[str, Tensor]],
              params: Iterable[str] | None) -> dict[str, Tensor]:
    """``local(model, x1, x2)`` on one process, or its rows over every rank's examples."""
    model, ddp_group = distributed.unwrap(model)
    group = ddp_group if group is None else group
    if not distributed.is_active(group):
        return local(model, x1, x2)
    if x2 is not None:
        raise ValueError(f"{call}: with a process group each rank passes only its shard as x1 "
                         "(the kernel is over every rank's examples); x2 must be None")
    chosen = select_params(model, params, call)
    shards = distributed.Shards(group, next(iter(chosen.values())).device)
    x_all = _tree_map(shards.all_gather_rows, x1)
    rows: dict[str, Tensor] = {}
    error: Exception | None = None
    try:
        rows = local(model, x1, x_all)
    except Exception as err:  # re-raised by check(), after every rank learns of it
        error = err
    shards.check(call, func.batch_size(x1), chosen, error)
    return {g: shards.all_gather_rows(K) for g, K in rows.items()}


def _local_ntk(model: nn.Module, x1: Any, x2: Any, *, outputs: str, method: str,
               params: Iterable[str] | None, scales: Tensor | None, chunk_size: int | None,
               output: Output = "auto", call: str = "empirical_ntk") -> Tensor:
    model = func.unwrap_compiled(model)
    if outputs not in OUTPUTS:
        raise ValueError(f"{call}: outputs must be one of {OUTPUTS}, got {outputs!r}")
    if method not in METHODS:
        raise ValueError(f"{call}: method must be one of {METHODS}, got {method!r}")
    s = KernelSetup(model, x1, x2, params, scales, call, output)
    if method == "auto":
        costs = method_costs(s, outputs)
        method = min(costs, key=costs.__getitem__)
    if method == "jacobian":
        return jacobian_kernel(s, outputs, chunk_size)
    if method == "ntvp":
        return ntvp_kernel(s, outputs, chunk_size)
    return structured_kernel(s, outputs, chunk_size)


def _subset(scales: Tensor, full: dict[str, Tensor], names: list[str]) -> Tensor:
    pieces = func.ParamLayout.from_params(full).unravel(scales)
    return torch.cat([pieces[n].reshape(-1) for n in names])


class NTKOperator(OperatorBase):
    """The kernel ``J D J^T`` on ``x`` as a matrix-free ``(n k, n k)`` operator.

    ``v -> J (D (J^T v))``: one vjp and one jvp per vector (vmapped over the columns of V), so
    ``lanczos`` finds top eigenvalues of kernels too large to form. Rows are ordered example-major
    (index ``i k + a``), as ``K.permute(0, 2, 1, 3).reshape(n k, n k)`` of the full kernel.
    """

    def __init__(self, model: nn.Module, x: Any, *, params: Iterable[str] | None = None,
                 scales: Tensor | None = None, group: Any = None,
                 output: Output = "auto") -> None:
        model, ddp_group = distributed.unwrap(model)
        group = ddp_group if group is None else group
        self._s = s = KernelSetup(model, x, None, params, scales, "NTKOperator", output)
        n = func.batch_size(x)
        self.n, self.k = n, s.k
        self.shape = (n * s.k, n * s.k)
        self.dtype, self.device = s.dtype, s.device
        self.num_matvecs = 0
        self._shards: distributed.Shards | None = None
        if distributed.is_active(group):  # rows of every rank: (N k, N k)
            self._shards = distributed.Shards(group, s.device)
            self._shards.check("NTKOperator", n, s.params, None)
            counts = self._shards.all_gather_rows(torch.tensor([n], device=s.device))  # (R,)
            rank = torch.distributed.get_rank(group)
            self._rows = slice(int(counts[:rank].sum()) * s.k, int(counts[:rank + 1].sum()) * s.k)
            self.shape = (int(counts.sum()) * s.k,) * 2

        def f(p: dict[str, Tensor]) -> Tensor:
            return s.forward(p, s.x1)  # (n, k)

        self._f = f
        with s.context():
            self._pullback = vjp(f, s.params)[1]

    def broadcast(self, t: Tensor) -> Tensor:
        return t if self._shards is None else self._shards.broadcast(t)

    def _sharded(self, V: Tensor) -> Tensor:
        """``J (D (J^T V))`` with ``J^T V`` summed over the ranks and the rows gathered."""
        s, shards = self._s, self._shards
        assert shards is not None

        def pull(c: Tensor) -> Tensor:  # c (n k,) -> J_r^T c (P,)
            (u,) = self._pullback(c.view(self.n, self.k))
            return s.layout.ravel(u)

        def push(u: Tensor) -> Tensor:  # u (P,) -> J_r D u (n k,)
            d = s.layout.unravel(u)
            if s.scales is not None:
                d = {name: t * s.scales[name] for name, t in d.items()}
            return jvp(self._f, (s.params,), (d,))[1].reshape(-1)

        with s.context():
            U = vmap(pull, in_dims=1, out_dims=1)(V[self._rows])  # (P, m), this rank's part
            torch.distributed.all_reduce(U, group=shards.group)  # J^T V
            mine = vmap(push, in_dims=1, out_dims=1)(U)  # (n k, m)
        return shards.all_gather_rows(mine)  # (N k, m)

    def __matmul__(self, v: Tensor) -> Tensor:
        V = self._check_vectors(v, "NTKOperator @ v")  # (n k, m)
        if self._shards is not None:
            out = self._sharded(V)  # (N k, m)
            self.num_matvecs += V.shape[1]
            return out if v.ndim == 2 else out[:, 0]
        s = self._s

        def column(c: Tensor) -> Tensor:  # c (n k,) -> (n k,)
            (u,) = self._pullback(c.view(self.n, self.k))
            if s.scales is not None:
                u = {name: t * s.scales[name] for name, t in u.items()}
            return jvp(self._f, (s.params,), (u,))[1].reshape(-1)

        with s.context():
            out = vmap(column, in_dims=1, out_dims=1)(V)  # (n k, m)
        self.num_matvecs += V.shape[1]
        return out if v.ndim == 2 else out[:, 0]


def ntk_eigenvalues(
    model: nn.Module,
    x: Any,
    k: int | None = None,
    *,
    solver: str = "auto",
    max_dense: int = 2048,
    params: Iterable[str] | None = None,
    scales: Tensor | None = None,
    tol: float = 1e-8,
    generator: torch.Generator | None = None,
    group: Any = None,
    output: Output = "auto",
) -> Tensor:
    """Eigenvalues of the full kernel ``(n k, n k)`` on ``x``, largest first, float64.

    ``solver="dense"`` forms the kernel (``empirical_ntk``) and calls ``torch.linalg.eigvalsh``;
    ``"lanczos"`` runs :func:`~curvlab.linalg.lanczos` on :class:`NTKOperator` (``k`` required);
    ``"auto"`` is dense up to ``max_dense`` rows (or when all eigenvalues are asked for).
    With a process group (``group``, as for :func:`empirical_ntk`) ``x`` is this rank's shard
    and the eigenvalues are those of the kernel over every rank's examples. ``output`` picks
    the model's output tensor as in :func:`empirical_ntk`.
    """
    from curvlab.linalg import lanczos  # linalg is a sibling layer; imported where used

    call = "ntk_eigenvalues"
    if solver not in ("auto", "dense", "lanczos"):
        raise ValueError(f"{call}: solver must be 'auto', 'dense' or 'lanczos', got {solver!r}")
    model, ddp_group = distributed.unwrap(model)
    group = ddp_group if group is None else group
    n = func.batch_size(x)
    if distributed.is_active(group):  # the examples of every rank
        device = next(model.parameters()).device
        n = int(distributed.Shards(group, device).all_gather_rows(
            torch.tensor([n], device=device)).sum())
    size = n * KernelSetup(model, x, None, params, scales, call, output).k
    if solver == "lanczos" or (solver == "auto" and k is not None and size > max_dense):
        if k is None:
            raise ValueError(f"{call}: the Lanczos solver needs k, the number of eigenvalues")
        A = NTKOperator(model, x, params=params, scales=scales, group=group, output=output)
        res = lanczos(A, k, tol=tol, generator=generator, throw=True)
        return res.eigenvalues
    K = empirical_ntk(model, x, params=params, scales=scales, group=group, output=output)
    M = K.permute(0, 2, 1, 3).reshape(size, size)  # (N k, N k)
    eigs = torch.linalg.eigvalsh(M.double()).flip(0).cpu()  # (n k,)
    return eigs if k is None else eigs[:k]
