"""The CPU worker pool and the per-image jobs it runs besides ingest's probe.

:class:`WorkerPool` maps a function over tasks in worker processes and yields results in
task order, with a bounded number in flight: workers decode the next batches while the main
process runs a model on the current one, and memory stays flat however many images there
are. Processes are started with ``spawn`` (never ``fork`` a process that holds torch
threads) and die with the main process, SIGKILL included, so a killed build leaves no
orphans behind; with ``workers=0`` everything runs inline, which is easiest to debug.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datapipe.cache import StoredImages
from datapipe.resize import decode_stored, encode_stored_file


def _die_with_parent(parent: int) -> None:
    """Worker initializer: exit when the main process exits, however it ends."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class WorkerPool:
    """A process pool with an ordered, bounded ``map``.

    Args:
        workers: number of processes; 0 runs tasks in the calling process.
        window: tasks in flight per worker.
    """

    def __init__(self, workers: int, window: int = 8):
        self.workers = workers
        self.window = max(1, workers) * window
        self._pool = (
            ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_die_with_parent,
                initargs=(os.getpid(),),
            )
            if workers > 0
            else None
        )

    def map_ordered(self, fn: Callable, tasks: Iterable) -> Iterator:
        """``fn(task)`` for each task, in order; at most ``window`` tasks are queued ahead of the consumer."""
        if self._pool is None:
            yield from map(fn, tasks)
            return
        pending: deque[Future] = deque()
        it = iter(tasks)
        try:
            for task in it:
                pending.append(self._pool.submit(fn, task))
                if len(pending) >= self.window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class StoredTask:
    """One stored image to read; if its cache file is gone it is made again from the source."""

    sha256: str
    stored_dir: str
    source: str
    resolution: int
    quality: int
    resample: str
    draft: tuple[int, int] | None = None  # decode at reduced size, at least this big (for small model inputs)


def stored_bytes(task: StoredTask) -> bytes:
    """The stored JPEG bytes of an image (re-encoded from the source if the cache lost them)."""
    stored = StoredImages(Path(task.stored_dir))
    try:
        return stored.read(task.sha256)
    except FileNotFoundError:
        data = encode_stored_file(task.source, task.resolution, task.quality, task.resample).data
        stored.write(task.sha256, data)
        return data


def stored_pixels(task: StoredTask) -> np.ndarray:
    """The stored image decoded to an RGB array ``(H, W, 3)`` uint8: exactly what the models see."""
    return np.asarray(decode_stored(stored_bytes(task), task.draft))
