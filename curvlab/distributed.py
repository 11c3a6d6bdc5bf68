"""torch.distributed helpers: sharded curvature products, rank consistency, rank-0 I/O.

With a process group active (or passed as ``group=``), every rank holds its own shard of the data
and an operator is the curvature of the mean loss over all ranks' examples (docs/math.md section 0):

    H V = (sum_r sum_b n_rb H_rb V) / (sum_r sum_b n_rb),

``H_rb`` the Hessian of the mean loss of batch ``b`` on rank ``r`` and ``n_rb`` its size. Each rank
computes its size-weighted sum; one ``all_reduce`` per product (per block ``V``) adds the sums and
the counts together (the counts ride in one extra row), so shards of unequal size are weighted
correctly.

Consistency. ``all_reduce`` hands every rank the same reduced bits, and every random start vector
or probe of ``curvlab.linalg`` is broadcast from the group's first rank (:meth:`Shards.broadcast`,
reached through the operator's ``broadcast``). Estimators then run the same deterministic
arithmetic on the same numbers and return the same answer on every rank; the tests check this
bit for bit. At construction, :meth:`Shards.check` refuses, on every rank alike, ranks with an
empty shard, ranks that disagree on the vector size, ranks whose construction failed and ranks
whose parameters differ (by per-parameter checksums: sum, sum of squares, position-weighted sum).

A ``DistributedDataParallel`` model is unwrapped to its ``.module``: products call it with
detached copies of the parameters swapped in (``torch.func.functional_call``, or the same swap
through :class:`curvlab.fastpath.Reparametrized` on the Hessian's reverse-over-reverse route), so
DDP's gradient hooks never fire (DDP supports neither double backward nor ``create_graph``) and
its buffers are not synced.

Example (each of two processes started by ``torchrun --nproc-per-node 2``)::

    dist.init_process_group("gloo")
    H = cl.HessianOperator(model, loss_fn, my_shard)   # the default group is used
    top = cl.lanczos(H, 5)                             # the same on every rank
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_active(group: Any = None) -> bool:
    """Whether products would be reduced over ``group`` (default: the default group)."""
    return dist.is_available() and dist.is_initialized() and (
        group is not None or dist.get_world_size() > 1)


def unwrap(model: nn.Module) -> tuple[nn.Module, Any]:
    """``(module, DDP's process group or None)``: the model inside ``DistributedDataParallel``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, model.process_group
    return model, None


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_writer() -> bool:
    """True on the process that writes files: rank 0 of the default group; before a group is
    initialized (a logger built before ``Trainer.fit`` or ``init_process_group``), the process
    whose launcher rank variables (torchrun's, Lightning's, SLURM's) are all 0 or unset."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def world_info() -> dict[str, Any]:
    """``{"world_size", "backend"}`` of the default group (1 and None without one)."""
    if dist.is_available() and dist.is_initialized():
        return {"world_size": dist.get_world_size(), "backend": str(dist.get_backend())}
    return {"world_size": 1, "backend": None}


def _checksums(params: Mapping[str, Tensor]) -> Tensor:
    """``(num_params, 3)`` float64: sum, sum of squares and a position-weighted sum per tensor."""
    rows = []
    for p in params.values():
        x = p.detach().reshape(-1).double()  # (numel,)
        w = torch.linspace(1.0, 2.0, x.numel(), dtype=torch.float64, device=x.device)  # (numel,)
        rows.append(torch.stack([x.sum(), (x * x).sum(), (w * x).sum()]))
    return torch.stack(rows)  # (num_params, 3)


class Shards:
    """A process group that an operator reduces its products over."""

    def __init__(self, group: Any, device: torch.device) -> None:
        self.group, self.device = group, device
        self.size = dist.get_world_size(group)
        self.root = dist.get_global_rank(group, 0) if group is not None else 0

    def check(self, call: str, count: float, params: Mapping[str, Tensor],
              error: Exception | None) -> None:
        """Raise the same ``ValueError`` on every rank if the shards cannot form one operator.

        ``error``: this rank's own construction failure (re-raised here after the collective,
        so that no rank waits forever for one that has already given up).
        """
        P = sum(p.numel() for p in params.values())
        mine = {"count": count, "P": P, "names": list(params), "error": repr(error) if error
                else None}
        metas: list[Any] = [None] * self.size
        dist.all_gather_object(metas, mine, group=self.group)
        failed = {r: m["error"] for r, m in enumerate(metas) if m["error"]}
        if error is not None:
            raise error
        if failed:
            raise ValueError(f"{call}: building the operator failed on rank(s) "
                             f"{sorted(failed)}: {next(iter(failed.values()))}; fix the data or "
                             "model there (every rank stops with this error)")
        empty = [r for r, m in enumerate(metas) if m["count"] == 0]
        if empty:
            raise ValueError(f"{call}: rank(s) {empty} hold an empty shard (no examples); every "
                             "rank needs at least one example: reshard the data, or pass a group "
                             "without those ranks (group=)")
        sizes = {r: m["P"] for r, m in enumerate(metas)}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{call}: the ranks disagree on the vector size P: {sizes}; every "
                             "rank must select the same parameters (same model and params=)")
        names = {r: m["names"] for r, m in enumerate(metas)}
        if any(n != names[0] for n in names.values()):
            raise ValueError(f"{call}: the ranks select different parameter names; rank 0 has "
                             f"{names[0][:4]}...; pass the same params= everywhere")
        sums = _checksums(params).to(self.device)  # (num_params, 3)
        gathered = [torch.empty_like(sums) for _ in range(self.size)]
        dist.all_gather(gathered, sums, group=self.group)
        for i, name in enumerate(params):
            differ = [r for r, g in enumerate(gathered) if not torch.equal(g[i], gathered[0][i])]
            if differ:
                raise ValueError(f"{call}: parameter {name!r} differs between rank 0 and "
                                 f"rank(s) {differ}; every rank must hold the same parameters "
                                 "(broadcast them from rank 0, or wrap the model in "
                                 "DistributedDataParallel, which does)")

    def mean(self, local_sum: Tensor, count: float) -> Tensor:
        """``sum_r local_sum_r / sum_r count_r`` for ``local_sum (P, m)``: one all_reduce."""
        m = local_sum.shape[1]
        dtype = torch.promote_types(local_sum.dtype, torch.float32)  # counts exact in bf16 too
        buf = torch.cat([local_sum.to(dtype), local_sum.new_full((1, m), float(count),
                                                                 dtype=dtype)])  # (P + 1, m)
        dist.all_reduce(buf, group=self.group)
        return (buf[:-1] / buf[-1:]).to(local_sum.dtype)  # (P, m)

    def broadcast(self, t: Tensor) -> Tensor:
        """``t`` as the group's first rank holds it (same shape on every rank)."""
        t = t.contiguous()
        dist.broadcast(t, src=self.root, group=self.group)
        return t

    def all_gather_rows(self, rows: Tensor) -> Tensor:
        """Concatenate every rank's ``rows (n_r, ...)`` along dim 0 in rank order."""
        counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(self.size)]
        dist.all_gather(counts, torch.tensor([rows.shape[0]], device=rows.device),
                        group=self.group)
        n_max = int(max(c.item() for c in counts))
        padded = rows.new_zeros(n_max, *rows.shape[1:])  # (n_max, ...)
        padded[: rows.shape[0]] = rows
        out = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(out, padded, group=self.group)
        return torch.cat([o[: int(c.item())] for o, c in zip(out, counts, strict=True)])
