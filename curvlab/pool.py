"""Jobs in worker processes: ``run_parallel`` trains many runs at once, one per process.

The workers start with "spawn" (so CUDA works in them), each with ``torch.set_num_threads(max(1,
os.cpu_count() // num_jobs))`` and a slot number (:func:`worker_slot`, 0 to ``num_jobs - 1``)
that a job can use to pick a GPU. A job returns ``None`` or its error as text; failures are
reported together, with the job names, once every other job has finished (:class:`RunsFailed`).

Example:
    >>> run_parallel(print, {}, 2)  # nothing to do: no process is started
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch
from tqdm import tqdm


class RunsFailed(RuntimeError):
    """Some runs of a parallel sweep failed; ``failed`` holds ``(run name, error)`` pairs."""

    def __init__(self, message: str, failed: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.failed = failed


_WORKER: dict[str, Any] = {"slot": 0}


def _init_worker(num_jobs: int, counter: Any) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_jobs))
    with counter.get_lock():
        _WORKER["slot"] = counter.value
        counter.value += 1


def worker_slot() -> int:
    """This worker's number, ``0 .. num_jobs - 1`` (0 outside a worker)."""
    return int(_WORKER["slot"])


def run_parallel(job: Callable[..., str | None], jobs: Mapping[str, tuple[Any, ...]],
                 num_jobs: int, *, progress: bool = True, what: str = "sweep") -> None:
    """Run ``job(*args)`` for every ``name -> args`` of ``jobs`` in ``num_jobs`` processes.

    ``job`` must be a module-level function (it is pickled by name) returning ``None`` on
    success or the error as text; a job whose process dies counts as failed too. Raises
    :class:`RunsFailed` listing every failed job after the others have finished.
    """
    if not jobs:
        return
    ctx = multiprocessing.get_context("spawn")
    bar = tqdm(total=len(jobs), unit="run", desc=f"{what}, {num_jobs} at once",
               disable=not progress)
    failed: list[tuple[str, str]] = []
    pool = ProcessPoolExecutor(max_workers=min(num_jobs, len(jobs)), mp_context=ctx,
                               initializer=_init_worker, initargs=(num_jobs, ctx.Value("i", 0)))
    try:
        futures = {pool.submit(job, *args): name for name, args in jobs.items()}
        for future in as_completed(futures):
            try:
                error = future.result()
            except Exception as err:  # the worker process died (killed, out of memory)
                error = f"{type(err).__name__}: {err}"
            if error is not None:
                failed.append((futures[future], error))
                if progress:
                    bar.write(f"{what}: run {futures[future]} failed: {error}")
            bar.update(1)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown()
    if failed:
        lines = "".join(f"\n  {name}: {error}" for name, error in sorted(failed))
        raise RunsFailed(f"{what}: {len(failed)} of {len(jobs)} runs failed (the other "
                         f"{len(jobs) - len(failed)} finished):{lines}\nFix the cause, then run "
                         "the same command with --resume to train only the unfinished runs.",
                         failed)
