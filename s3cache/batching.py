"""Work handed over by any thread, done in batches on worker threads.

A :class:`Batcher` is the queue behind the fetcher's two batched stages: decoding (many images in
one call, see :mod:`s3cache.decoders`) and storing (many entries in one transaction, see
:mod:`s3cache.writer`). A worker takes the first job waiting, then whatever arrives within
``linger`` seconds, up to ``max_batch`` jobs, and hands the batch to ``handle``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

_Job = TypeVar("_Job")

log = logging.getLogger(__name__)


class Batcher(Generic[_Job]):
    """Collects jobs from any thread and hands them to ``handle`` in batches, on its own threads.

    Threads start with the first job, so an idle batcher costs nothing.

    Args:
        handle: Does a batch of jobs; it must settle every job (complete or fail its future).
        abandon: Called with the batch and the error when ``handle`` raises, to fail every job.
        name: Thread name.
        threads: Worker threads.
        max_batch: Most jobs per batch.
        linger: Seconds a batch waits for more arrivals after its first; 0 takes what is queued now.
    """

    def __init__(self, handle: Callable[[list[_Job]], None], abandon: Callable[[list[_Job], BaseException], None], *,
                 name: str, threads: int = 1, max_batch: int = 64, linger: float = 0.0) -> None:
        if threads < 1 or max_batch < 1:
            raise ValueError(f"threads and max_batch must be at least 1, got {threads} and {max_batch}")
        self.max_batch = max_batch
        self.linger = linger
        self._handle = handle
        self._abandon = abandon
        self._name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards starting and closing the threads
        self._thread_count = threads
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, job: _Job) -> None:
        """Queue a job.

        Raises:
            RuntimeError: The batcher is closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            if not self._threads:
                self._threads = [threading.Thread(target=self._run, name=self._name, daemon=True)
                                 for _ in range(self._thread_count)]
                for thread in self._threads:
                    thread.start()
            self._queue.put(job)

    def close(self) -> None:
        """Do what is queued, then stop the threads."""
        with self._lock:
            self._closed = True
            threads = self._threads
            for _ in threads:
                self._queue.put(None)  # one stop mark per thread: a worker stops collecting at the first it takes
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()

    def _run(self) -> None:
        # One batch per call of _do: its jobs are let go before the wait for the next (they may hold large buffers).
        while self._do(self._collect()):
            pass

    def _do(self, batch: list[_Job | None]) -> bool:
        """Hand a batch to ``handle``; whether to go on (no stop mark came with it)."""
        jobs = [job for job in batch if job is not None]
        if jobs:
            try:
                self._handle(jobs)
            except BaseException as exc:  # every job of the batch hears why
                log.debug("%s: a batch of %d failed", self._name, len(jobs), exc_info=True)
                self._abandon(jobs, exc)
        return batch[-1] is not None

    def _collect(self) -> list[_Job | None]:
        """The next batch: the first job waiting and those that follow within ``linger``, or a stop mark."""
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.linger
        while len(batch) < self.max_batch and batch[-1] is not None:
            try:
                remaining = deadline - time.monotonic()
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch
