"""Measurements a :class:`~curvlab.Monitor` runs: loss, sharpness, Hessian spectrum, NTK spectrum,
feature speed and feature change. Each takes a schedule (``every=``, ``steps=`` or
``per_decade=``) and returns records that the Monitor logs; definitions are in docs/math.md.

Per-block curvature: ``blocks="layers"`` (one block per module that owns parameters) or a list of
parameter-name patterns (``fnmatch``, e.g. ``["0.*", "2.*"]``) or a dict ``label -> patterns``;
each block's diagonal Hessian block ``H_bb`` gets its own top eigenvalue (and trace).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curvlab import distributed
from curvlab.batches import (
    Output,
    as_batches,
    batch_weight,
    call_model,
    first_examples,
    pick_output,
    take_batch,
)
from curvlab.callbacks.monitor import LR_ZERO, NO_STATE, Context, Measurement, Record, Skip
from curvlab.features import feature_change, feature_speed
from curvlab.func import forward_context, unwrap_compiled
from curvlab.kernel_metrics import kernel_alignment, kernel_distance
from curvlab.linalg import hutchpp_trace, lanczos, spectral_density, subspace_eigs
from curvlab.ntk import empirical_ntk
from curvlab.operators import GGNOperator, HessianOperator
from curvlab.preconditioning import adam_scales, lr_scales, preconditioned

PRECONDITIONERS = (None, "lr", "adam")
MATRICES = {"hessian": HessianOperator, "ggn": GGNOperator}  # the curvature Sharpness tracks
LRS = ("current", "base")  # which LR of a scheduled group a preconditioned sharpness uses
TRACKING_TOL = 1e-3  # the default relative accuracy of Sharpness and HessianSpectrum


def resolve_blocks(model: nn.Module, blocks: Any, call: str) -> dict[str, list[str]]:
    """``label -> parameter names`` for ``blocks`` (see the module docstring)."""
    model = unwrap_compiled(model)  # names as the operators give them (no "_orig_mod.")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if blocks == "layers":
        found = {}
        for module_name, module in model.named_modules():
            own = [f"{module_name}.{n}" if module_name else n
                   for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if own:
                found[module_name or "(root)"] = own
        return found
    if isinstance(blocks, str) or not isinstance(blocks, Sequence | Mapping):
        raise TypeError(f"{call}: blocks must be 'layers', a list of parameter-name patterns or a "
                        f"dict label -> patterns, got {blocks!r}")
    pairs = blocks.items() if isinstance(blocks, Mapping) else ((b, b) for b in blocks)
    found = {}
    for label, patterns in pairs:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not chosen:
            raise ValueError(f"{call}: block {label!r} matches no trained parameter; names look "
                             f"like {names[:6]}")
        found[str(label)] = chosen
    return found


def _scales(kind: str | None, optimizer: Any, model: nn.Module, call: str,
            scheduled: bool = True) -> Any:
    if kind is None:
        return None
    if optimizer is None:
        raise ValueError(f"{call}: preconditioned={kind!r} needs the Monitor's optimizer")
    params = {n: p for n, p in unwrap_compiled(model).named_parameters() if p.requires_grad}
    return (lr_scales if kind == "lr" else adam_scales)(optimizer, params, scheduled=scheduled)


def _all_lr_zero(optimizer: Any) -> bool:
    """Whether no parameter group of ``optimizer`` takes a step (every LR is 0)."""
    return all(float(g["lr"]) == 0 for g in optimizer.param_groups if g["params"])


def eos_threshold(kind: str | None, optimizer: Any) -> float | None:
    """The edge-of-stability line for the sharpness that ``kind`` preconditions, or ``None``.

    Each is the curvature at which the optimizer's linearized step on a quadratic (curvature
    ``lam`` along the top eigenvector, the preconditioner frozen) gets an eigenvalue ``-1``;
    ``eta`` is the base LR for preconditioned sharpness (``kind="lr"`` or ``"adam"``, whose
    ``D`` carries the per-group LR over the base LR) and the common group LR for raw sharpness:

    - SGD: ``2 / eta`` (Cohen et al. 2021, arXiv:2103.00065);
    - SGD with heavy-ball momentum ``beta`` and dampening ``d``, PyTorch's form
      ``b = beta b + (1 - d) g``, ``theta -= eta b``: ``(2 + 2 beta) / ((1 - d) eta)`` (Cohen et
      al. 2021, appendix; 3.8 / eta at beta = 0.9, 38 at eta = 0.1);
    - Nesterov (PyTorch's ``theta -= eta (g + beta b)``): ``(2 + 2 beta) / ((1 + 2 beta) eta)``
      (derived: the characteristic polynomial ``z^2 - (1 + beta)(1 - a) z + beta (1 - a)`` with
      ``a = eta lam``, at ``z = -1``; 1.36 / eta at beta = 0.9);
    - Adam: ``(2 + 2 beta1) / ((1 - beta1) eta)``, 38 / eta at beta1 = 0.9 (Cohen et al. 2022,
      arXiv:2207.14484, with ``P`` of :func:`~curvlab.adam_scales`);
    - AdamW with decoupled decay ``w``: ``(1 + beta1) (2 - eta w) / ((1 - beta1) eta)`` (derived
      the same way: ``theta -= eta w theta`` each step shrinks the threshold by ``(1+beta1) w /
      (1-beta1)``, 0.01% at eta w = 3e-4).

    ``None`` when there is no single line: groups with different momenta or betas, a raw
    sharpness under several LRs, an LR of 0 (no step is taken), or a sharpness that Adam's
    preconditioner does not enter (``kind`` None or ``"lr"`` with Adam). AdamW groups with different
    decays (none for biases and norms, as Hugging Face sets them) get the line of the largest
    decay, the lowest, within ``eta w_max / 2`` (relative) of the others.
    """
    if optimizer is None:
        return None
    groups = optimizer.param_groups
    if kind is None:
        lrs = {float(g["lr"]) for g in groups}
        if len(lrs) != 1:
            return None
        eta = lrs.pop()
    else:
        eta = float(optimizer.defaults["lr"])
    if not eta > 0:
        return None
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        if kind != "adam":  # Adam's line is for the Adam-preconditioned sharpness only
            return None
        betas = {float(g["betas"][0]) for g in groups}
        if len(betas) != 1:
            return None
        beta1 = betas.pop()
        # Groups may differ in decay (none for biases and norms, as Hugging Face sets it): the
        # line of the largest decay, the lowest, within eta * w_max / 2 of the others.
        w = max(float(g["weight_decay"]) for g in groups) \
            if isinstance(optimizer, torch.optim.AdamW) else 0.0
        return (1 + beta1) * (2 - eta * w) / ((1 - beta1) * eta)
    if isinstance(optimizer, torch.optim.SGD):
        forms = {(float(g["momentum"]), float(g["dampening"]), bool(g["nesterov"]))
                 for g in groups}
        if len(forms) != 1:
            return None
        beta, dampening, nesterov = forms.pop()
        if nesterov:
            return (2 + 2 * beta) / ((1 + 2 * beta) * eta)
        return (2 + 2 * beta) / ((1 - dampening) * eta) if beta else 2.0 / eta
    return 2.0 / eta  # plain gradient steps


def _check_preconditioner(kind: str | None, optimizer: Any, call: str) -> None:
    """Refuse ``preconditioned="adam"`` with an optimizer that is not Adam or AdamW."""
    if kind == "adam" and not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise ValueError(f"{call}: preconditioned='adam' needs torch.optim.Adam or AdamW as the "
                         f"Monitor's optimizer, got {type(optimizer).__name__}; use "
                         "preconditioned='lr' for SGD-like optimizers")


class Loss(Measurement):
    """The mean loss over the probe (size-weighted over batches), in eval mode."""

    name = "loss"

    def measure(self, ctx: Context) -> list[Record]:
        batches, _ = as_batches(ctx.probe, "Loss")
        total, count = 0.0, 0.0
        device = next(ctx.model.parameters()).device
        with forward_context(ctx.model, train_mode=False, seed=0, device=device), \
                torch.no_grad():
            for i, (x, y) in enumerate(batches):
                n = batch_weight(ctx.weights, x, y, i, "Loss")
                if n > 0:
                    out = pick_output(call_model(ctx.model, x), ctx.output, "Loss")
                    total += float(ctx.loss_fn(out, y)) * n
                    count += n
        if distributed.is_active():  # the mean over every rank's probe examples
            sums = torch.tensor([total, count], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(sums)
            total, count = float(sums[0]), float(sums[1])
        return [Record(self.name, total / count, description="mean loss over the probe "
                       "(batches weighted as the operators weight them)")]


class _HessianMeasurement(Measurement):
    """Shared by :class:`Sharpness` and :class:`HessianSpectrum`: the operator on the probe (or
    its first ``probe_size`` examples), preconditioned by ``kind``, and the top-``k`` search
    warm-started from the previous measurement's ``warm_vectors`` leading Ritz vectors."""

    def __init__(self, *, k: int, tol: float, max_iters: int | None, blocks: Any,
                 preconditioned: str | None, warm_start: bool = True,
                 warm_vectors: int | None = None, probe_size: int | None = None,
                 lr: str = "current", matrix: str = "hessian", **schedule: Any) -> None:
        super().__init__(**schedule)
        call = type(self).__name__
        if matrix not in MATRICES:
            raise ValueError(f"{call}: matrix must be one of {tuple(MATRICES)} (the Hessian or "
                             f"the Gauss-Newton matrix), got {matrix!r}")
        self.matrix, self.label = matrix, "Hessian" if matrix == "hessian" else "GGN"
        if preconditioned not in PRECONDITIONERS:
            raise ValueError(f"{call}: preconditioned must be one of {PRECONDITIONERS}, got "
                             f"{preconditioned!r}")
        if lr not in LRS:
            raise ValueError(f"{call}: lr must be one of {LRS} (which LR of a scheduled group "
                             f"the preconditioner uses), got {lr!r}")
        if lr == "base" and preconditioned is None:
            raise ValueError(f"{call}: lr='base' applies to a preconditioned sharpness; pass "
                             "preconditioned='lr' or 'adam' (the raw Hessian has no LR in it)")
        warm_vectors = k + 3 if warm_vectors is None else warm_vectors
        if isinstance(warm_vectors, bool) or not isinstance(warm_vectors, int) \
                or warm_vectors < k:
            raise ValueError(f"{call}: warm_vectors must be an int >= k = {k} (the previous "
                             f"Ritz vectors that start the next measurement), got "
                             f"{warm_vectors!r}")
        if probe_size is not None and (isinstance(probe_size, bool)
                                       or not isinstance(probe_size, int) or probe_size < 1):
            raise ValueError(f"{call}: probe_size must be a positive int or None, got "
                             f"{probe_size!r}")
        self.k, self.tol, self.max_iters = k, tol, max_iters
        self.blocks, self.kind, self.lr = blocks, preconditioned, lr
        self.warm_start, self.warm_vectors, self.probe_size = warm_start, warm_vectors, probe_size
        self._previous: Any = None  # (P, warm_vectors) Ritz vectors of the last measurement
        self.num_matvecs: list[int] = []

    def probe(self, ctx: Context) -> Any:
        """The probe measured on: the Monitor's, or its first ``probe_size`` examples."""
        if self.probe_size is None:
            return ctx.probe
        batches = first_examples(ctx.probe, self.probe_size, type(self).__name__)
        return batches[0] if len(batches) == 1 else batches

    def setup(self, ctx: Context) -> None:
        if self.kind is not None and ctx.optimizer is None:
            raise ValueError(f"{type(self).__name__}: preconditioned={self.kind!r} needs the "
                             "Monitor's optimizer")
        _check_preconditioner(self.kind, ctx.optimizer, type(self).__name__)
        if self.blocks is not None:
            self._blocks = resolve_blocks(ctx.model, self.blocks, type(self).__name__)

    def operator(self, ctx: Context, params: list[str] | None = None) -> Any:
        """The Hessian (or GGN, ``matrix``) on the probe (of ``params`` only, a diagonal block,
        when given), preconditioned by ``kind``; ``None`` when that preconditioner is 0 on every
        parameter (an LR of 0), which leaves the operator 0."""
        H: Any = MATRICES[self.matrix](ctx.model, ctx.loss_fn, self.probe(ctx), params=params,
                                       output=ctx.output, weights=ctx.weights)
        scales = _scales(self.kind, ctx.optimizer, ctx.model, type(self).__name__,
                         scheduled=self.lr == "current")
        if scales is not None:
            if params is not None:
                named = unwrap_compiled(ctx.model).named_parameters()
                names, sizes = zip(*[(n, p.numel()) for n, p in named if p.requires_grad],
                                   strict=True)
                parts = dict(zip(names, scales.split(sizes), strict=True))
                scales = torch.cat([parts[n] for n in H.param_names])
            if not (scales > 0).any():
                return None
            H = preconditioned(H, scales)
        return H

    def operator_or_skip(self, ctx: Context) -> tuple[Any, Skip | None]:
        """The operator, or why it does not exist now: Adam's preconditioner exists only after
        the first optimizer step, and a preconditioner that is 0 on every parameter (an LR of 0
        in every group, the ends of a warm-up + cosine schedule) takes no step."""
        if self.kind == "adam" and not (ctx.optimizer is not None and ctx.optimizer.state):
            return None, Skip(self.name, NO_STATE)
        A = self.operator(ctx)
        return A, Skip(self.name, LR_ZERO) if A is None else None

    def top(self, A: Any, ctx: Context) -> Any:
        """Top-``k`` eigenpairs of ``A``: from the previous Ritz vectors by
        :func:`~curvlab.linalg.subspace_eigs` when there are any (and ``warm_start``), else by
        Lanczos from a random vector; the products are kept in ``num_matvecs``."""
        P, previous = A.shape[0], self._previous if self.warm_start else None
        keep = max(min(self.warm_vectors, P), self.k)
        # A float32 operator gets a float32 basis where the tolerance allows (half the traffic)
        basis = torch.float32 if A.dtype != torch.float64 and self.tol >= 1e-5 else torch.float64
        if previous is not None and previous.shape[0] == P:
            result = subspace_eigs(A, self.k, start=previous, tol=self.tol,
                                   max_iters=self.max_iters, keep=keep, generator=ctx.generator,
                                   basis_dtype=basis)
        else:
            result = lanczos(A, k=self.k, tol=self.tol, max_iters=self.max_iters, keep=keep,
                             generator=ctx.generator, basis_dtype=basis)
        ritz = result.ritz_vectors  # (P, keep), the next start, kept in the operator's dtype
        self._previous = None if ritz is None else ritz.to(A.dtype)
        self.num_matvecs.append(result.num_matvecs)
        return result

    def matvec_record(self, result: Any) -> Record:
        return Record(f"{self.name}_matvecs", result.num_matvecs,
                      description=f"{self.label}-vector products of this measurement's top-k "
                      "search")

    def block_records(self, ctx: Context, with_trace: bool) -> list[Record]:
        if self.blocks is None:
            return []
        if not hasattr(self, "_blocks"):  # measure() called without on_train_start()
            self._blocks = resolve_blocks(ctx.model, self.blocks, type(self).__name__)
        labels = list(self._blocks)
        tops, traces = [], []
        for label in labels:
            A = self.operator(ctx, self._blocks[label])
            if A is None:  # a block frozen by its LR: its preconditioned block is 0
                tops.append(0.0)
                traces += [0.0] if with_trace else []
            elif A.shape[0] == 1:
                tops.append(float((A @ torch.ones(1, dtype=A.dtype, device=A.device))[0]))
            else:
                tops.append(float(lanczos(A, k=1, tol=self.tol, max_iters=self.max_iters,
                                          generator=ctx.generator).eigenvalues[0]))
            if with_trace and A is not None:
                traces.append(self.trace(A, ctx))
        records = [Record(f"{self.name}_blocks", tops, labels,
                          f"top eigenvalue of each diagonal {self.label} block")]
        if with_trace:
            records.append(Record(f"{self.name}_block_trace", traces, labels,
                                  f"trace of each diagonal {self.label} block (Hutch++)"))
        return records

    def trace(self, A: Any, ctx: Context) -> float:
        """Exact ``tr(A)`` from ``A @ I`` when the block has at most ``trace_matvecs`` columns,
        else Hutch++ with ``trace_matvecs`` products (Meyer et al. 2021, arXiv:2010.09649)."""
        P, budget = A.shape[0], getattr(self, "trace_matvecs", 0)
        if P <= budget:
            eye = torch.eye(P, dtype=A.dtype, device=A.device)  # (P, P)
            return float(torch.diagonal(A @ eye).sum())
        return hutchpp_trace(A, budget, generator=ctx.generator).estimate


class Sharpness(_HessianMeasurement):
    """Top-``k`` Hessian (or Gauss-Newton) eigenvalues, tracked along training.

    ``preconditioned``: ``None`` (raw), ``"lr"`` (``D = lr_scales``) or ``"adam"``
    (``D = adam_scales``); the EoS threshold (:func:`eos_threshold`) is stored as the metric's
    ``threshold`` attribute and logged as ``<name>_threshold``. Metric name: ``sharpness``,
    ``sharpness_lr`` or ``sharpness_adam`` unless ``name=``. ``matrix="ggn"`` tracks the
    Gauss-Newton matrix ``G`` (:class:`~curvlab.GGNOperator`) instead of ``H``, with everything
    below alike: metrics ``sharpness_ggn``, ``sharpness_ggn_lr``, ... against the same line (the
    top of ``G``, the curvature of the linearized model, tracks that of ``H`` where the
    residual term is small).

    Tracking mode (the default): ``tol=1e-3`` relative accuracy (``cl.sharpness`` keeps 1e-4);
    the first measurement runs Lanczos from a random vector, each later one starts from the
    previous measurement's ``warm_vectors`` (default ``k + 3``) leading Ritz vectors by
    :func:`~curvlab.linalg.subspace_eigs`, which reuses their whole span and resolves the gap to
    the next eigenvalue from the first check. Why ``k + 3`` and not ``k + 1``: the top of a
    cross-entropy Hessian is a cluster of near eigenvalues whose order changes during training,
    and a block that spans only the previous top two cannot see an eigenvalue that overtakes
    them from further down (measured in ``benchmarks/monitor.py``). ``probe_size=n`` measures
    on the probe's first ``n`` examples only (a fixed subset; the cost of a product scales with
    it). A float32 model gets a float32 Krylov basis when ``tol >= 1e-5`` (half the memory and
    traffic of float64).
    ``warm_start=False`` starts every measurement from a random vector (for comparison). The
    products of each measurement are logged as ``<name>_matvecs`` and kept in ``num_matvecs``.

    Learning rates under a scheduler. A preconditioned sharpness is ``lambda_max(D H)`` in units
    of the base LR ``eta_0 = optimizer.defaults["lr"]``, with ``D`` built from each group's LR in
    ``optimizer.param_groups`` at measurement time over ``eta_0``: the LR of the step about to be
    taken, since torch's schedulers (called after ``optimizer.step()``), Lightning and the HF
    Trainer update it before the Monitor runs. The threshold is the line of ``eta_0``
    (:func:`eos_threshold`), a constant, so ``sharpness / threshold`` is the stability ratio of
    the next step. ``lr="base"`` builds ``D`` from each group's LR before any scheduler changed
    it (``initial_lr``; metric ``<name>_base``, e.g. ``sharpness_adam_base``): the curvature the
    run would meet at its base LR, readable during a warm-up, against the same line. While every
    group's LR is 0 the scheduled quantity is skipped (``<name>_skipped``, reason
    ``SKIP_REASONS[0]``; no step is taken), and parameters whose own LR is 0 drop out of ``D H``
    (their rows are 0). Adam's preconditioner does not exist before the first optimizer step:
    those measurements are skipped too. A raw sharpness does not depend on the LR; its threshold
    ``2 / eta`` follows the scheduled LR and is not logged while the LR is 0.
    """

    def __init__(self, *, k: int = 1, preconditioned: str | None = None,
                 tol: float = TRACKING_TOL, max_iters: int | None = None, blocks: Any = None,
                 warm_start: bool = True, warm_vectors: int | None = None,
                 probe_size: int | None = None, lr: str = "current", matrix: str = "hessian",
                 **schedule: Any) -> None:
        schedule.setdefault("name", "sharpness" + ("_ggn" if matrix == "ggn" else "")
                            + (f"_{preconditioned}" if preconditioned else "")
                            + ("_base" if lr == "base" else ""))
        super().__init__(k=k, tol=tol, max_iters=max_iters, blocks=blocks,
                         preconditioned=preconditioned, warm_start=warm_start,
                         warm_vectors=warm_vectors, probe_size=probe_size, lr=lr, matrix=matrix,
                         **schedule)

    def measure(self, ctx: Context) -> list[Record | Skip]:
        A, skip = self.operator_or_skip(ctx)
        if skip is not None:
            return [skip]
        result = self.top(A, ctx)
        values = result.eigenvalues
        threshold = eos_threshold(self.kind, ctx.optimizer)
        records: list[Record | Skip] = [Record(self.name, values[0] if self.k == 1 else values,
                          None if self.k == 1 else [str(i) for i in range(self.k)],
                          f"top {self.label} eigenvalue" + ("s" if self.k > 1 else "")
                          + (f", preconditioned by {self.kind}" if self.kind else ""), threshold)]
        if threshold is not None:
            records.append(Record(f"{self.name}_threshold", threshold,
                                  description="edge-of-stability threshold"))
        records.append(self.matvec_record(result))
        return records + self.block_records(ctx, with_trace=False)


class HessianSpectrum(_HessianMeasurement):
    """Top-``k`` eigenvalues (``hessian_top``), the SLQ spectral density (``hessian_density_nodes``
    and ``hessian_density_weights``, ``num_probes * num_iters`` each, Ubaru et al. 2017) and its
    trace estimate (``hessian_trace``); with ``blocks=``, each diagonal block's top eigenvalue and
    Hutch++ trace (``trace_matvecs`` products, exact when that reaches the block size). The
    top-``k`` search is tracked as in :class:`Sharpness` (``tol``, ``warm_vectors``,
    ``hessian_matvecs``); ``probe_size`` applies to every part of it."""

    def __init__(self, *, k: int = 5, density: bool = True, num_probes: int = 2,
                 num_iters: int = 30, trace_matvecs: int = 60, tol: float = TRACKING_TOL,
                 max_iters: int | None = None, blocks: Any = None,
                 preconditioned: str | None = None, warm_vectors: int | None = None,
                 probe_size: int | None = None, lr: str = "current", **schedule: Any) -> None:
        schedule.setdefault("name", "hessian")
        super().__init__(k=k, tol=tol, max_iters=max_iters, blocks=blocks,
                         preconditioned=preconditioned, warm_vectors=warm_vectors,
                         probe_size=probe_size, lr=lr, **schedule)
        self.density, self.num_probes, self.num_iters = density, num_probes, num_iters
        self.trace_matvecs = trace_matvecs

    def measure(self, ctx: Context) -> list[Record | Skip]:
        A, skip = self.operator_or_skip(ctx)
        if skip is not None:
            return [skip]
        result = self.top(A, ctx)
        records: list[Record | Skip] = [
            Record(f"{self.name}_top", result.eigenvalues, [str(i) for i in range(self.k)],
                   f"top-{self.k} Hessian eigenvalues"), self.matvec_record(result)]
        if self.density:
            sd = spectral_density(A, num_probes=self.num_probes,
                                  num_iters=min(self.num_iters, A.shape[0]),
                                  generator=ctx.generator)
            records += [Record(f"{self.name}_density_nodes", sd.nodes.reshape(-1),
                               description="SLQ Ritz nodes, probes concatenated"),
                        Record(f"{self.name}_density_weights", sd.weights.reshape(-1),
                               description="SLQ weights (each probe's sum to 1)"),
                        Record(f"{self.name}_trace", sd.trace(),
                               description="trace estimate from SLQ")]
        return records + self.block_records(ctx, with_trace=True)


class NTKSpectrum(Measurement):
    """Empirical NTK on the probe's first batch (trace over outputs, ``(n, n)``): its top-``k``
    eigenvalues (``ntk_top``), alignment with the targets (``ntk_alignment``; class labels are
    one-hot encoded) and distance from the first measured kernel (``ntk_distance_from_start``).
    ``size`` keeps only the first ``size`` examples (the kernel costs ``size^2``). With the
    Monitor's optimizer the kernel is LR-weighted, ``J D J^T`` with ``D = lr_scales`` (the kernel
    of one step, ``df = -eta J D J^T grad_f L``; docs/math.md section 4), so that per-layer learning
    rates (muP) count; ``lr_weighted=False`` gives ``J J^T``. ``output`` picks the kernel's output
    tensor (default: the Monitor's ``output``), e.g. ``lambda o: o.logits[:, -1]`` for a language
    model's last position; outputs beyond ``(n, k)`` are flattened. Alignment is logged when the
    targets are one row per example (labels or regression targets)."""

    name = "ntk"

    def __init__(self, *, k: int = 10, size: int | None = None, lr_weighted: bool = True,
                 output: Output | None = None, **schedule: Any) -> None:
        super().__init__(**schedule)
        self.k, self.size, self.lr_weighted, self.output = k, size, lr_weighted, output
        self._first: torch.Tensor | None = None

    def measure(self, ctx: Context) -> list[Record | Skip]:
        weighted = self.lr_weighted and ctx.optimizer is not None
        if weighted and _all_lr_zero(ctx.optimizer):
            return [Skip(self.name, LR_ZERO)]  # the kernel of a step of size 0 is 0
        x, y = ctx.first_batch if self.size is None else take_batch(ctx.first_batch, self.size)
        scales = _scales("lr", ctx.optimizer, ctx.model, "NTKSpectrum") if weighted else None
        K = empirical_ntk(ctx.model, x, outputs="trace", scales=scales,
                          output=ctx.output if self.output is None else self.output)  # (n, n)
        if not isinstance(K, torch.Tensor):  # per_layer=True is never asked for here
            raise TypeError("NTKSpectrum: expected one kernel tensor")
        k = min(self.k, K.shape[0])
        eig = torch.linalg.eigvalsh(K.double()).flip(0)[:k]  # (k,), largest first
        if self._first is None:
            self._first = K.detach().clone()
        records: list[Record | Skip] = [Record(f"{self.name}_top", eig, [str(i) for i in range(k)],
                          "top eigenvalues of the empirical NTK (trace over outputs)")]
        if isinstance(y, torch.Tensor) and y.shape[:1] == K.shape[:1] and (
                y.is_floating_point() or y.ndim == 1):  # one target row per example
            targets = y if y.is_floating_point() else F.one_hot(y).to(K.dtype)  # (n, c)
            records.append(Record(f"{self.name}_alignment",
                                  kernel_alignment(K, targets.reshape(len(y), -1)),
                                  description="centered kernel-target alignment"))
        records.append(Record(f"{self.name}_distance_from_start", kernel_distance(K, self._first),
                              description="1 - cos(K_t, K_first)"))
        return records


class FeatureSpeed(Measurement):
    """:func:`~curvlab.feature_speed` on the probe's first batch, with the optimizer's per-group
    learning rates when the Monitor has an optimizer. One ``(layers,)`` metric per quantity.
    Skipped (``feature_skipped``) while every group's LR is 0: the step moves no feature, so the
    angle between the feature update and the backward pass does not exist."""

    name = "feature"

    def __init__(self, *, layers: Sequence[str] | None = None, **schedule: Any) -> None:
        super().__init__(**schedule)
        self.layers = layers

    def measure(self, ctx: Context) -> list[Record | Skip]:
        if ctx.optimizer is not None and _all_lr_zero(ctx.optimizer):
            return [Skip(self.name, LR_ZERO)]  # no feature update: its angle is undefined
        r = feature_speed(ctx.model, ctx.loss_fn, ctx.first_batch, layers=self.layers,
                          optimizer=ctx.optimizer, output=ctx.output)
        return [Record(f"{self.name}_{key}", value, r.layers, f"feature speed: {key} per layer")
                for key, value in r.as_dict().items()]


class FeatureChange(Measurement):
    """:func:`~curvlab.feature_change` (one real optimizer step, on a copy) on the probe's first
    batch: ``feature_rms`` and ``feature_change_rms`` per layer. Needs the Monitor's optimizer."""

    name = "feature_change"
    eval_mode = False  # its optimizer step runs in the model's own mode, on a copy

    def __init__(self, *, layers: Sequence[str] | None = None, **schedule: Any) -> None:
        super().__init__(**schedule)
        self.layers = layers

    def setup(self, ctx: Context) -> None:
        if ctx.optimizer is None:
            raise ValueError("FeatureChange: needs the Monitor's optimizer (Monitor(..., "
                             "optimizer=opt))")

    def measure(self, ctx: Context) -> list[Record]:
        if ctx.optimizer is None:
            raise ValueError("FeatureChange: needs the Monitor's optimizer")
        r = feature_change(ctx.model, ctx.loss_fn, ctx.first_batch, ctx.optimizer,
                           layers=self.layers, output=ctx.output)
        return [Record("feature_rms", r.feature_rms, r.layers, "RMS of the features"),
                Record(f"{self.name}_rms", r.change_rms, r.layers,
                       "RMS change of the features after one optimizer step")]
