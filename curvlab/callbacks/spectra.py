"""The curvature measurements: ``Sharpness`` (top eigenvalues, optionally preconditioned, of the
Hessian or the Gauss-Newton matrix) and ``HessianSpectrum`` (top eigenvalues, trace and spectral
density), whole or per block, warm-started between measurements (docs/math.md sections 1-3).
"""

from __future__ import annotations

from typing import Any

import torch

from curvlab.batches import first_examples
from curvlab.callbacks.measurements import (
    LRS,
    MATRICES,
    PRECONDITIONERS,
    TRACKING_TOL,
    _check_preconditioner,
    _scales,
    eos_threshold,
    resolve_blocks,
)
from curvlab.callbacks.monitor import LR_ZERO, NO_STATE, Context, Measurement, Record, Skip
from curvlab.func import unwrap_compiled
from curvlab.linalg import hutchpp_trace, lanczos, spectral_density, subspace_eigs
from curvlab.preconditioning import preconditioned


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

    @property
    def warm_block(self) -> Any:
        """``(P, warm_vectors)`` the Ritz vectors that start the next measurement (``None``
        before the first); read it to save the tracking state, assign it to restore one."""
        return self._previous

    @warm_block.setter
    def warm_block(self, block: Any) -> None:
        if block is not None and not (isinstance(block, torch.Tensor) and block.ndim == 2):
            raise ValueError(f"{type(self).__name__}.warm_block: expected None or a tensor "
                             f"(P, j) of start vectors, got {type(block).__name__} "
                             f"{tuple(getattr(block, 'shape', ()))}")
        self._previous = block

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
