"""The one process pool of the experiments: independent jobs, in order, in this process or several."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

from sgsc._deps import require


def checked_workers(workers) -> int:
    """``workers``, an experiment's process count, or a ``ValueError`` naming it."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    return workers


def run_jobs(function: Callable, jobs: Sequence[tuple], workers: int, progress: bool = False) -> list:
    """``[function(*job) for job in jobs]``, with ``workers > 1`` spread over that many processes.

    Processes are spawned, not forked: a forked child would inherit this process's OpenMP and
    autograd threads' state. ``progress`` shows a bar over finished jobs.
    """
    tqdm = require("tqdm", "experiments").tqdm
    if workers == 1:
        return [function(*job) for job in tqdm(jobs, disable=not progress)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(function, *job) for job in jobs]
        return [future.result() for future in tqdm(futures, disable=not progress)]
