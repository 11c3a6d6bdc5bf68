"""The empirical neural tangent kernel, three ways, and a matrix-free kernel operator.

``Theta(x, x')_{ab} = <d f_a(x) / d theta, D d f_b(x') / d theta>`` (Jacot et al. 2018,
arXiv:1806.07572), with ``D = diag(scales)`` for the LR-weighted kernel ``J D J^T`` that drives one
gradient step, ``df = -eta Theta_D grad_f L`` (docs/math.md section 4). Output reductions:
``"full"`` ``(n1, n2, k, k)``, ``"trace"`` ``sum_a Theta_aa`` ``(n1, n2)`` (summed, not averaged
as in neural-tangents), ``"diagonal"`` ``(n1, n2, k)``.

Methods, with the cost model of Novak et al. 2022 (arXiv:2206.08720), ``N`` examples, ``O``
outputs, ``[FP]`` one forward pass of one example, ``P`` parameters:

- ``"jacobian"``: per-example Jacobians by ``vmap(jacrev)``, contracted: ``N O [FP] + N^2 O^2 P``
  flops and ``N O P`` memory. A forward with data-dependent control flow, which ``vmap`` over
  examples cannot run (Hugging Face's padding masks), is looped over the examples instead.
- ``"ntvp"``: NTK-vector products, ``J1 (D (J2^T e_jb))`` for every column: ``N^2 O [FP]``.
- ``"structured"``: per layer, for ``y = W h + b`` the kernel is ``<h(x), h(x')> <g_a(x), g_b(x')>``
  (plus ``<g_a, g_b>`` for ``b``), ``g_a`` the backward vector of output ``a`` at the layer output
  (one backward per output, summed over tokens and repeated calls): ``N O [FP] + N^2 O^2 sum_l
  (d_in + d_out) T^2``, no per-example Jacobian. Linear layers only (and only with scales that are
  constant per tensor); every other parameter falls back to per-example Jacobians.
- ``"auto"``: the smallest of these estimates (``[FP]`` taken as ``2 P`` flops).

Example:
    >>> import torch, curvlab as cl
    >>> model = torch.nn.Linear(3, 2).double()
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> K = cl.empirical_ntk(model, x)           # (4, 4, 2, 2)
    >>> torch.allclose(K[..., 0, 0], x @ x.T + 1) and bool((K[..., 0, 1] == 0).all())
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vjp, vmap

from curvlab import distributed, func
from curvlab.batches import Output, pick_output
from curvlab.operators import OperatorBase, select_params

OUTPUTS = ("full", "trace", "diagonal")
METHODS = ("auto", "structured", "jacobian", "ntvp")
_tree_map = torch.utils._pytree.tree_map


def _reduce(K: Tensor, outputs: str) -> Tensor:
    """``(n1, n2, k, k)`` to the requested reduction."""
    if outputs == "full":
        return K
    diag = torch.diagonal(K, dim1=2, dim2=3)  # (n1, n2, k)
    return diag if outputs == "diagonal" else diag.sum(-1)


def _contract(A: Tensor, B: Tensor, outputs: str) -> Tensor:
    """Kernel of per-example features ``A (n1, k, F)``, ``B (n2, k, F)`` in the output layout."""
    if outputs == "full":
        return torch.einsum("iaf,jbf->ijab", A, B)  # (n1, n2, k, k)
    diag = torch.einsum("iaf,jaf->ija", A, B)  # (n1, n2, k)
    return diag if outputs == "diagonal" else diag.sum(-1)


class _Setup:
    """Validated inputs shared by the methods: parameters, scales, a functional model."""

    def __init__(self, model: nn.Module, x1: Any, x2: Any, params: Iterable[str] | None,
                 scales: Tensor | None, call: str, output: Output = "auto") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{call}: model must be a torch.nn.Module, got {type(model).__name__}")
        model = func.unwrap_compiled(model)  # the eager module: vmap and hooks need it
        self.output = output
        batchnorm = [n for n, m in model.named_modules()
                     if isinstance(m, func.BATCHNORM) and m.training]
        if batchnorm:
            raise ValueError(f"{call}: BatchNorm modules {batchnorm[:4]} are in training mode, "
                             "where one example's output depends on the others and per-example "
                             "Jacobians would be wrong; call model.eval() first")
        self.model, self.call = model, call
        self.params = {n: p.detach() for n, p in select_params(model, params, call).items()}
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if n not in self.params}
        self.frozen.update({n: b.detach() for n, b in model.named_buffers()})
        self.layout = func.ParamLayout.from_params(self.params)
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.scales = self._split_scales(scales, first)
        self.x1, self.x2 = x1, x1 if x2 is None else x2
        self.symmetric = x2 is None
        self.k = self.outputs(self.params, self.x1, "x1").shape[1]
        if not self.symmetric:
            self.outputs(self.params, self.x2, "x2")

    def _split_scales(self, scales: Tensor | None, like: Tensor) -> dict[str, Tensor] | None:
        if scales is None:
            return None
        P = self.layout.numel
        if not isinstance(scales, Tensor) or scales.shape != (P,):
            got = tuple(scales.shape) if isinstance(scales, Tensor) else type(scales).__name__
            raise ValueError(f"{self.call}: scales must be a tensor of shape ({P},), got {got}")
        return self.layout.unravel(scales.to(like))

    def context(self) -> Any:
        return func.forward_context(self.model, train_mode=False, seed=0, device=self.device)

    def forward(self, params: dict[str, Tensor], x: Any,
                base: dict[str, Tensor] | None = None) -> Tensor:
        """``f(x; params)`` as ``(n, k)``: the tensor ``output`` picks, trailing dims flattened
        (a language model's ``(n, T, V)`` logits become ``(n, T V)``)."""
        tensors = {**(self.frozen if base is None else base), **params}
        f = pick_output(func.functional_forward(self.model, tensors, x), self.output, self.call)
        return f.reshape(f.shape[0], -1) if f.ndim > 2 else f  # (n, k)

    def outputs(self, params: dict[str, Tensor], x: Any, name: str = "x") -> Tensor:
        """``f(x; params)`` ``(n, k)`` with a clear error for inputs the model cannot take."""
        try:
            with self.context():
                f = self.forward(params, x)
        except RuntimeError as err:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.call}: the model cannot be applied to {name} of shape "
                             f"{shape} ({err}); pass a batch of inputs as the model expects"
                             ) from err
        if f.ndim != 2:
            raise ValueError(f"{self.call}: the model must return outputs of shape (n, k) (or "
                             f"(n, ...), flattened), got {tuple(f.shape)}; pick another tensor "
                             "with output=")
        return f

    def jacobians(self, x: Any, names: Iterable[str], chunk_size: int | None) -> Tensor:
        """Per-example Jacobians for ``names``, flattened and scaled by sqrt(D): ``(n, k, F)``."""
        names = list(names)
        sub = {n: self.params[n] for n in names}
        rest = {**self.frozen, **{n: p for n, p in self.params.items() if n not in sub}}

        def single(p: dict[str, Tensor], xi: Any) -> Tensor:
            xi = _tree_map(lambda t: t.unsqueeze(0), xi)
            return self.forward(p, xi, base=rest)[0]  # (k,)

        def take_row(tree: Any, i: int) -> Any:  # example i without its batch dimension
            return _tree_map(lambda t: t[i], tree)

        n = func.batch_size(x)
        with self.context():
            try:
                J = vmap(jacrev(single), in_dims=(None, 0), chunk_size=chunk_size)(sub, x)
            except RuntimeError as err:  # data-dependent control flow, e.g. HF's padding masks
                if "vmap" not in str(err):
                    raise
                rows = [jacrev(single)(sub, take_row(x, i)) for i in range(n)]  # name -> (k, ...)
                J = {name: torch.stack([r[name] for r in rows]) for name in names}  # (n, k, ...)
        flat = [self._scaled(name, J[name]).reshape(n, self.k, -1) for name in names]
        return torch.cat(flat, dim=2)  # (n, k, F)

    def _scaled(self, name: str, J: Tensor) -> Tensor:
        return J if self.scales is None else J * self.scales[name].sqrt()


def _jacobian_kernel(s: _Setup, outputs: str, chunk_size: int | None,
                     names: Iterable[str] | None = None) -> Tensor:
    names = list(s.params if names is None else names)
    J1 = s.jacobians(s.x1, names, chunk_size)  # (n1, k, F)
    J2 = J1 if s.symmetric else s.jacobians(s.x2, names, chunk_size)  # (n2, k, F)
    return _contract(J1, J2, outputs)


def _ntvp_kernel(s: _Setup, outputs: str, chunk_size: int | None) -> Tensor:
    def f1(p: dict[str, Tensor]) -> Tensor:
        return s.forward(p, s.x1)  # (n1, k)

    def f2(p: dict[str, Tensor]) -> Tensor:
        return s.forward(p, s.x2)  # (n2, k)

    n2, k = func.batch_size(s.x2), s.k
    with s.context():
        pullback = vjp(f2, s.params)[1]
        eye = torch.eye(n2 * k, dtype=s.dtype, device=s.device).view(n2 * k, n2, k)

        def column(e: Tensor) -> Tensor:  # e (n2, k) -> J1 D J2^T e (n1, k)
            (u,) = pullback(e)
            if s.scales is not None:
                u = {n: t * s.scales[n] for n, t in u.items()}
            return jvp(f1, (s.params,), (u,))[1]

        cols = vmap(column, chunk_size=chunk_size)(eye)  # (n2 k, n1, k)
    K = cols.view(n2, k, -1, k).permute(2, 0, 3, 1)  # (n1, n2, k_a, k_b)
    return _reduce(K, outputs)


def _weight_multiplier(m: nn.Module) -> float | None:
    """``c`` for a module computing ``c W h + b`` (``nn.Linear``: 1; curvlab's ``ScaledLinear``:
    its multiplier); ``None`` for anything else, including Linear subclasses that override
    ``forward`` (their kernel comes from per-example Jacobians)."""
    if not isinstance(m, nn.Linear):
        return None
    if type(m).forward is nn.Linear.forward:
        return 1.0
    from curvlab.models.parametrizations import ScaledLinear

    return float(m.multiplier) if isinstance(m, ScaledLinear) else None


def _structured_layers(s: _Setup) -> dict[str, nn.Linear]:
    """Linear modules whose parameters are all selected, with scales constant per tensor."""
    layers = {}
    for name, m in s.model.named_modules():
        if _weight_multiplier(m) is None:
            continue
        names = [f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False)]
        if not all(n in s.params for n in names):
            continue
        if s.scales is not None and any((s.scales[n] != s.scales[n].flatten()[0]).any()
                                        for n in names):
            continue  # scales vary inside the tensor: the factorization does not hold
        layers[name] = m
    return layers


def _layer_features(s: _Setup, x: Any, layers: dict[str, nn.Linear]
                    ) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer: inputs ``h (n, U, d_in)`` and backward vectors ``g (n, k, U, d_out)``.

    ``U`` stacks tokens and repeated calls of the layer (both add up in its gradient).
    """
    if not layers:
        return {}
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
    hooks = [m.register_forward_hook(
        lambda mod, args, out, name=name: calls[name].append((args[0].detach(), out)))
        for name, m in layers.items()]
    leaves = {n: p.detach().requires_grad_(True) for n, p in s.params.items()}
    try:
        with torch.enable_grad(), s.context():
            f = s.forward(leaves, x)  # (n, k)
    finally:
        for hook in hooks:
            hook.remove()
    n = f.shape[0]
    ys = [y for name in layers for _, y in calls[name]]
    grads = [torch.autograd.grad(f[:, a].sum(), ys, retain_graph=True, allow_unused=True)
             for a in range(s.k)]  # examples are independent in eval mode: sum, then split
    features, i = {}, 0
    for name in layers:
        hs, gs = [], []
        for h, y in calls[name]:
            hs.append(h.reshape(n, -1, h.shape[-1]))  # (n, U_c, d_in)
            g = torch.stack([torch.zeros_like(y) if gr[i] is None else gr[i] for gr in grads], 1)
            gs.append(g.reshape(n, s.k, -1, y.shape[-1]))  # (n, k, U_c, d_out)
            i += 1
        features[name] = (torch.cat(hs, 1), torch.cat(gs, 2))
    return features


def _structured_kernel(s: _Setup, outputs: str, chunk_size: int | None) -> Tensor:
    layers = _structured_layers(s)
    covered = {f"{name}.{p}" if name else p
               for name, m in layers.items() for p, _ in m.named_parameters(recurse=False)}
    rest = [n for n in s.params if n not in covered]
    F1 = _layer_features(s, s.x1, layers)
    F2 = F1 if s.symmetric else _layer_features(s, s.x2, layers)
    K = _jacobian_kernel(s, outputs, chunk_size, rest) if rest else 0.0
    b, out = ("b", "ijab") if outputs == "full" else ("a", "ija")
    for name, m in layers.items():
        (h1, g1), (h2, g2) = F1[name], F2[name]
        prefix = f"{name}." if name else ""
        c = _weight_multiplier(m) or 1.0  # y = c W h + b: the weight's kernel carries c^2
        d_w = c * c * (1.0 if s.scales is None else s.scales[prefix + "weight"].flatten()[0])
        d_b = 0.0 if m.bias is None else (
            1.0 if s.scales is None else s.scales[prefix + "bias"].flatten()[0])
        if h1.shape[1] == h2.shape[1] == 1:  # one token, one call: add into K by row blocks
            if isinstance(K, float):
                K = torch.zeros(_kernel_shape(g1.shape[0], g2.shape[0], s.k, outputs),
                                dtype=g1.dtype, device=g1.device)
            rows = max(1, g1.shape[0] // 8)  # transient memory: an eighth of the kernel
            for i in range(0, g1.shape[0], rows):
                block = _contract(g1[i : i + rows, :, 0], g2[:, :, 0], outputs)  # <g_a, g_b>
                factor = d_w * (h1[i : i + rows, 0] @ h2[:, 0].T) + d_b  # (rows, n2)
                K[i : i + rows].addcmul_(block, factor.view(*factor.shape,
                                                            *[1] * (block.ndim - 2)))
            continue
        else:
            Kh = torch.einsum("iud,jvd->ijuv", h1, h2)  # (n1, n2, U1, U2)
            term = torch.einsum(f"ijuv,iaue,j{b}ve->{out}", Kh, g1, g2)  # (n1, n2, k[, k])
            term = d_w * (term if outputs == "full" else _reduce_pairs(term, outputs))
            if m.bias is not None:
                term += d_b * _contract(g1.sum(2), g2.sum(2), outputs)
        K = term if isinstance(K, float) else K.add_(term)
    return K  # type: ignore[return-value]


def _kernel_shape(n1: int, n2: int, k: int, outputs: str) -> tuple[int, ...]:
    return {"full": (n1, n2, k, k), "diagonal": (n1, n2, k), "trace": (n1, n2)}[outputs]


def _reduce_pairs(term: Tensor, outputs: str) -> Tensor:
    """``term (n1, n2, k)`` holds the diagonal already; sum it for ``"trace"``."""
    return term if outputs == "diagonal" else term.sum(-1)


def _costs(s: _Setup, outputs: str) -> dict[str, float]:
    """The flop estimates of the module docstring for this model and these inputs."""
    n1, n2 = func.batch_size(s.x1), func.batch_size(s.x2)
    N, O, P = n1 + (0 if s.symmetric else n2), s.k, s.layout.numel
    O2 = O * O if outputs == "full" else O
    FP = 2.0 * P
    layers = _structured_layers(s)
    one = _tree_map(lambda t: t[:1], s.x1)
    tokens = {name: h.shape[1] for name, (h, _) in _layer_features(s, one, layers).items()}
    covered = sum(p.numel() for m in layers.values() for p in m.parameters(recurse=False))
    per_pair = sum(tokens[name] ** 2 * (m.in_features + m.out_features + 1)
                   for name, m in layers.items())
    return {
        "jacobian": N * O * FP + n1 * n2 * O2 * P,
        "ntvp": n2 * O * (n1 + n2) * FP,
        "structured": N * O * FP + n1 * n2 * O2 * (per_pair + P - covered),
    }


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
    per_layer: bool = False,
    group: Any = None,
    output: Output = "auto",
) -> Tensor | dict[str, Tensor]:
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
        per_layer: return a dict of kernels by module (its parameters), summing to the whole.
        group: a ``torch.distributed`` process group (default: a DDP model's, else the default
            group when initialized with several ranks). Each rank passes its shard as ``x1``
            (``x2`` must be None); the inputs are gathered, each rank computes its rows of the
            kernel over all examples, and every rank returns the whole kernel, rows in rank
            order. Collective: call it on every rank.
    """
    model, ddp_group = distributed.unwrap(model)
    group = ddp_group if group is None else group
    kwargs = {"outputs": outputs, "method": method, "params": params, "scales": scales,
              "chunk_size": chunk_size, "per_layer": per_layer, "output": output}
    if not distributed.is_active(group):
        return _local_ntk(model, x1, x2, **kwargs)  # type: ignore[arg-type]
    call = "empirical_ntk"
    if x2 is not None:
        raise ValueError(f"{call}: with a process group each rank passes only its shard as x1 "
                         "(the kernel is over every rank's examples); x2 must be None")
    chosen = select_params(model, params, call)
    shards = distributed.Shards(group, next(iter(chosen.values())).device)
    x_all = _tree_map(shards.all_gather_rows, x1)
    rows: Tensor | dict[str, Tensor] | None = None
    error: Exception | None = None
    try:
        rows = _local_ntk(model, x1, x_all, **kwargs)  # type: ignore[arg-type]
    except Exception as err:  # re-raised by check(), after every rank learns of it
        error = err
    shards.check(call, func.batch_size(x1), chosen, error)
    if isinstance(rows, dict):
        return {g: shards.all_gather_rows(K) for g, K in rows.items()}
    return shards.all_gather_rows(_as_tensor(rows))  # type: ignore[arg-type]


def _local_ntk(model: nn.Module, x1: Any, x2: Any, *, outputs: str, method: str,
               params: Iterable[str] | None, scales: Tensor | None, chunk_size: int | None,
               per_layer: bool, output: Output = "auto") -> Tensor | dict[str, Tensor]:
    call = "empirical_ntk"
    model = func.unwrap_compiled(model)
    if outputs not in OUTPUTS:
        raise ValueError(f"{call}: outputs must be one of {OUTPUTS}, got {outputs!r}")
    if method not in METHODS:
        raise ValueError(f"{call}: method must be one of {METHODS}, got {method!r}")
    if per_layer:
        groups: dict[str, list[str]] = {}
        for n in select_params(model, params, call):
            groups.setdefault(n.rpartition(".")[0], []).append(n)
        full = select_params(model, params, call)
        return {g: _as_tensor(_local_ntk(
            model, x1, x2, outputs=outputs, method=method, params=names, chunk_size=chunk_size,
            scales=None if scales is None else _subset(scales, full, names), per_layer=False,
            output=output)) for g, names in groups.items()}
    s = _Setup(model, x1, x2, params, scales, call, output)
    if method == "auto":
        costs = _costs(s, outputs)
        method = min(costs, key=costs.__getitem__)
    if method == "jacobian":
        return _jacobian_kernel(s, outputs, chunk_size)
    if method == "ntvp":
        return _ntvp_kernel(s, outputs, chunk_size)
    return _structured_kernel(s, outputs, chunk_size)


def _as_tensor(K: Tensor | dict[str, Tensor]) -> Tensor:
    if not isinstance(K, Tensor):
        raise TypeError("expected a tensor kernel")
    return K


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
        self._s = s = _Setup(model, x, None, params, scales, "NTKOperator", output)
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
    size = n * _Setup(model, x, None, params, scales, call, output).k
    if solver == "lanczos" or (solver == "auto" and k is not None and size > max_dense):
        if k is None:
            raise ValueError(f"{call}: the Lanczos solver needs k, the number of eigenvalues")
        A = NTKOperator(model, x, params=params, scales=scales, group=group, output=output)
        res = lanczos(A, k, tol=tol, generator=generator, throw=True)
        return res.eigenvalues
    K = _as_tensor(empirical_ntk(model, x, params=params, scales=scales, group=group,
                                 output=output))
    M = K.permute(0, 2, 1, 3).reshape(size, size)  # (N k, N k)
    eigs = torch.linalg.eigvalsh(M.double()).flip(0).cpu()  # (n k,)
    return eigs if k is None else eigs[:k]
