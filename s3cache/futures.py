"""Small pieces of future plumbing: completing futures that callers may have cancelled, and a byte budget."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


class ByteBudget:
    """Admits work in order while the sum of its sizes stays within a capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._queue: collections.deque[tuple[int, concurrent.futures.Future[Any], Callable[[], None]]] = (
            collections.deque())
        self._lock = threading.Lock()

    def weigh(self, size: int) -> int:
        """What an object of ``size`` bytes counts for: its size, at most the whole budget."""
        return max(0, min(size, self.capacity))

    def submit(self, size: int, result: concurrent.futures.Future[Any], start: Callable[[], None]) -> None:
        """Call ``start`` now if ``size`` fits (and nobody waits), else once enough has been released."""
        with self._lock:
            admitted = not self._queue and self.in_use + size <= self.capacity
            if admitted:
                self.in_use += size
            else:
                self._queue.append((size, result, start))
        if admitted:
            start()

    def release(self, size: int) -> None:
        """Give back ``size`` and start what now fits, in order (skipping work cancelled while queued)."""
        starts = []
        with self._lock:
            self.in_use -= size
            while self._queue:
                head, result, start = self._queue[0]
                if result.cancelled():
                    self._queue.popleft()
                elif self.in_use + head <= self.capacity:
                    self._queue.popleft()
                    self.in_use += head
                    starts.append(start)
                else:
                    break
        for start in starts:
            start()


def done_future(value: _T) -> concurrent.futures.Future[_T]:
    """A future that already holds ``value``."""
    future: concurrent.futures.Future[_T] = concurrent.futures.Future()
    future.set_result(value)
    return future


def resolve(future: concurrent.futures.Future[_T], value: _T) -> None:
    """Resolve ``future``, unless the caller cancelled it meanwhile."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_result(value)


def fail(future: concurrent.futures.Future[Any], error: BaseException) -> None:
    """Fail ``future``, unless the caller cancelled it meanwhile."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        future.set_exception(error)


def forward(done: concurrent.futures.Future[_T], result: concurrent.futures.Future[_T]) -> None:
    """Give ``result`` the outcome of ``done``, unless the caller cancelled it meanwhile."""
    if done.cancelled():
        result.cancel()
    elif (error := done.exception()) is not None:
        fail(result, error)
    else:
        resolve(result, done.result())
