"""Process bodies for tests/test_distributed.py, spawned with torch.multiprocessing (gloo, CPU).

Each rank holds a contiguous shard of a zoo case's examples, of unequal size (weights 1 : 2 : 3),
itself split into two batches of unequal size; results are saved per rank for the parent test.
"""

from __future__ import annotations

import atexit
import gc
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

import curvlab as cl
from curvlab.testing import make_case

CASES = ("mlp_tanh", "cnn", "transformer", "batchnorm", "dict_input")
GGN_CASES = ("mlp_tanh", "cnn", "transformer")
NTK_CASES = ("mlp_tanh", "cnn")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rows(data: Any, start: int, stop: int) -> Any:
    return tree_map(lambda t: t[start:stop], data)


def shard(data: tuple[Any, Any], rank: int, world: int) -> list[tuple[Any, Any]]:
    """Rank ``rank``'s batches: a shard of weight ``rank + 1``, split 1 : 2 into two batches."""
    n = cl.func.batch_size(data[0])
    total = world * (world + 1) // 2
    cuts = [round(n * sum(range(1, r + 1)) / total) for r in range(world + 1)]  # (world + 1,)
    lo, hi = cuts[rank], cuts[rank + 1]
    mid = lo + max(1, (hi - lo) // 3) if hi - lo > 1 else hi
    return [rows(data, a, b) for a, b in ((lo, mid), (mid, hi)) if b > a]


def vectors(P: int) -> torch.Tensor:
    return torch.randn(P, 3, generator=generator(1), dtype=torch.float64)  # (P, 3)


def measure(name: str, data: Any) -> dict[str, Any]:
    """Every collective estimator on the case with ``data`` (this rank's batches, or all)."""
    c = make_case(name)
    H = cl.HessianOperator(c.model, c.loss_fn, data)
    V = vectors(H.shape[0])
    out: dict[str, Any] = {"Hv": H @ V[:, 0], "HV": H @ V}
    if name in GGN_CASES:
        out["GV"] = cl.GGNOperator(c.model, c.loss_fn, data) @ V
    out["lanczos5"] = cl.lanczos(H, 5, tol=1e-10, generator=generator()).eigenvalues
    density = cl.spectral_density(H, num_probes=2, num_iters=8, generator=generator())
    out["slq_nodes"], out["slq_weights"] = density.nodes, density.weights
    out["trace"] = torch.tensor(cl.hutchinson_trace(H, 4, generator=generator())
                                .estimate)
    torch.manual_seed(dist.get_rank() if dist.is_initialized() else 0)  # differs per rank:
    out["unseeded"] = cl.lanczos(H, 2, tol=1e-10).eigenvalues  # rank 0's start vector is used
    out["sharpness"] = torch.tensor(cl.sharpness(c.model, c.loss_fn, data, tol=1e-10,
                                                 generator=generator()))
    return out


def measure_ntk(name: str, x: Any) -> dict[str, Any]:
    """The empirical NTK of inputs ``x`` (this rank's shard, or all), by each route."""
    model = make_case(name).model
    return {"K": cl.empirical_ntk(model, x),
            "K_trace_jacobian": cl.empirical_ntk(model, x, outputs="trace", method="jacobian"),
            "dense_eigs": cl.ntk_eigenvalues(model, x, k=4, solver="dense"),
            "lanczos_eigs": cl.ntk_eigenvalues(model, x, k=4, solver="lanczos", tol=1e-10,
                                               generator=generator())}


def inputs_of(batches: list[tuple[Any, Any]]) -> Any:
    return torch.cat([b[0] for b in batches])


def check_errors(rank: int, world: int) -> None:
    """The clear errors, raised on every rank alike (no rank left waiting)."""
    c = make_case("mlp_tanh")
    data = shard(c.data, rank, world)
    perturbed = make_case("mlp_tanh").model
    if rank == world - 1:
        with torch.no_grad():
            perturbed[2].weight[0, 0] += 1e-9
    with pytest.raises(ValueError, match=r"parameter '2.weight' differs between rank 0 and "
                       rf"rank\(s\) \[{world - 1}\]"):
        cl.HessianOperator(perturbed, c.loss_fn, data)
    with pytest.raises(ValueError, match=rf"rank\(s\) \[{world - 1}\] hold an empty shard"):
        cl.HessianOperator(c.model, c.loss_fn, [] if rank == world - 1 else data)
    params = ["0.weight"] if rank == 1 else None
    with pytest.raises(ValueError, match="the ranks disagree on the vector size P"):
        cl.HessianOperator(c.model, c.loss_fn, data, params=params)
    x_shard = inputs_of(data)
    with pytest.raises(ValueError, match="each rank passes only its shard as x1"):
        cl.empirical_ntk(c.model, x_shard, x_shard)
    x, y = data[0]  # one batch: its graph is built, and the loss evaluated, at construction
    bad = (x, y[:, :2]) if rank == 0 else (x, y)  # a shape error on rank 0 only
    expected = (RuntimeError, "must match") if rank == 0 else (
        ValueError, r"failed on rank\(s\) \[0\]")
    with pytest.raises(expected[0], match=expected[1]):
        cl.HessianOperator(c.model, c.loss_fn, bad)


def check_ddp(rank: int, world: int) -> dict[str, Any]:
    """A DDP-wrapped model: its .module is used; a product leaves DDP's training unaffected."""
    c = make_case("mlp_tanh")
    data = shard(c.data, rank, world)
    ddp = torch.nn.parallel.DistributedDataParallel(c.model)
    H = cl.HessianOperator(ddp, c.loss_fn, data)
    hv = H @ vectors(H.shape[0])[:, 0]
    assert all(p.grad is None for p in ddp.parameters())  # no gradient hook has fired
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    c.loss_fn(ddp(x), y).backward()  # DDP's own all-reduce still works after the products
    opt.step()
    return {"ddp_Hv": hv, "after_step": torch.cat([p.detach().reshape(-1)
                                                   for p in ddp.parameters()])}


def worker(rank: int, world: int, folder: str) -> None:
    """Every measurement on this rank's shards, saved to ``folder/rank{rank}.pt``."""
    results = {name: measure(name, shard(make_case(name).data, rank, world)) for name in CASES}
    results["ddp"] = check_ddp(rank, world)
    results["ntk"] = {name: measure_ntk(name, inputs_of(shard(make_case(name).data, rank, world)))
                      for name in NTK_CASES}
    check_errors(rank, world)
    torch.save(results, Path(folder) / f"rank{rank}.pt")


def rank_main(rank: int, body: Callable[..., None], world: int, folder: str, tag: str,
              args: tuple[Any, ...]) -> None:
    """One gloo process: ``body(rank, world, folder, *args)``, then an orderly teardown.

    DDP modules sit in reference cycles, so they (and their reducers, which hold the group) are
    freed by an explicit collection while the group still exists, not at interpreter exit; a
    barrier keeps every rank from tearing the group down while another still uses it. The marker
    ``{tag}-done{rank}`` records that this rank finished its work and passed the barrier.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/{tag}-rendezvous", rank=rank,
                            world_size=world)
    try:
        body(rank, world, folder, *args)
        gc.collect()
        dist.barrier()
        (Path(folder) / f"{tag}-done{rank}").touch()
    finally:
        dist.destroy_process_group()


def run_ranks(body: Callable[..., None], world: int, folder: Path, tag: str,
              *args: Any) -> None:
    """Run ``body`` on ``world`` gloo processes (each with one thread); raise if any rank failed.

    CI once saw one rank of three die by SIGABRT inside gloo (``terminate called without an
    active exception``), which 40 local repetitions did not reproduce. So a rank that dies
    without a Python exception (a signal, a C++ abort) after *every* rank finished its work and
    passed the final barrier (a death in torch.distributed's own teardown; the results are
    complete) only warns, and such a death before that point is retried once, with a warning: a
    crash that curvlab causes (an unmatched collective, say) happens again and raises. Python
    exceptions always raise.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for attempt in (1, 2):
        run = f"{tag}{attempt}"  # a fresh rendezvous file for the second attempt
        try:
            torch.multiprocessing.spawn(rank_main, args=(body, world, str(folder), run, args),
                                        nprocs=world, join=True)
            return
        except torch.multiprocessing.ProcessExitedException as error:
            if all((folder / f"{run}-done{r}").exists() for r in range(world)):
                warnings.warn(f"rank {error.error_index} died by {error.signal_name} in "
                              "torch.distributed's teardown, after every rank's work was done "
                              "and saved", stacklevel=2)
                return
            if attempt == 2:
                raise
            warnings.warn(f"rank {error.error_index} died by {error.signal_name} during its "
                          "work; running every rank once more", stacklevel=2)


def abort_at_exit(rank: int, world: int, folder: str, during_work: bool) -> None:
    """Rank 1 aborts: during its work, or at interpreter exit (after the teardown)."""
    if rank == 1:
        if during_work:
            os.abort()
        atexit.register(os.abort)


def spawn(world: int, folder: Path) -> list[dict[str, Any]]:
    """Run :func:`worker` on ``world`` gloo processes; return every rank's results."""
    run_ranks(worker, world, folder, "measure")
    return [torch.load(folder / f"rank{r}.pt") for r in range(world)]


def training_data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = generator(3)
    return (torch.randn(n, 6, generator=g, dtype=torch.float64),
            torch.randn(n, 3, generator=g, dtype=torch.float64))


def train(model: torch.nn.Module, data: tuple[Any, Any], steps: int, logger: Any) -> None:
    """Full-batch SGD (lr 0.05) on ``data``; a Monitor (loss and sharpness every 5 steps) when
    ``logger`` is given. ``model`` may be DDP-wrapped (``data`` is then this rank's shard)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = None if logger is None else cl.Monitor(
        model, cl.testing.mse, data, logger, [cl.Loss(every=5), cl.Sharpness(every=5, tol=1e-10)],
        optimizer=opt)
    if monitor:
        monitor.on_train_start()
    for step in range(1, steps + 1):
        opt.zero_grad()
        cl.testing.mse(model(data[0]), data[1]).backward()
        opt.step()
        if monitor:
            monitor.on_train_batch_end(step)
    if monitor:
        monitor.on_train_end()


def ddp_training_worker(rank: int, world: int, folder: str, with_monitor: bool) -> None:
    """DDP training on equal shards of :func:`training_data`, with or without a Monitor."""
    x, y = training_data()
    n = x.shape[0] // world
    ddp = torch.nn.parallel.DistributedDataParallel(make_case("mlp_tanh").model)
    shard_data = (x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
    if with_monitor:
        with cl.RunLogger(Path(folder) / "run.h5", {"lr": 0.05}) as logger:
            train(ddp, shard_data, 10, logger)
    else:
        train(ddp, shard_data, 10, None)
    params = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
    torch.save(params, Path(folder) / f"params_{int(with_monitor)}_{rank}.pt")
