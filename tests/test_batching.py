"""The batching queue behind decoding and storing: batches of arrivals, drained on close, failures reported."""

from __future__ import annotations

import threading

import pytest

from s3cache.batching import Batcher


class Recorder:
    """A handler that records its batches; it can hold a batch until released."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.hold = hold
        self.abandoned: list[tuple[list[int], BaseException]] = []
        self.gave_up = threading.Event()

    def handle(self, batch: list[int]) -> None:
        self.started.set()
        if self.hold is not None:
            assert self.hold.wait(10)
        if -1 in batch:
            raise OSError("disk full")
        self.batches.append(batch)

    def abandon(self, batch: list[int], error: BaseException) -> None:
        self.abandoned.append((batch, error))
        self.gave_up.set()


def test_jobs_arriving_while_a_batch_runs_form_the_next_batch() -> None:
    release = threading.Event()
    recorder = Recorder(release)
    batcher: Batcher[int] = Batcher(recorder.handle, recorder.abandon, name="test", max_batch=3)
    batcher.submit(0)
    assert recorder.started.wait(10)  # the worker holds batch [0]
    for job in range(1, 6):
        batcher.submit(job)
    release.set()
    batcher.close()  # what was queued is done before the threads stop
    assert recorder.batches == [[0], [1, 2, 3], [4, 5]]


def test_a_failing_batch_is_abandoned_and_the_worker_goes_on() -> None:
    release = threading.Event()
    recorder = Recorder(release)
    batcher: Batcher[int] = Batcher(recorder.handle, recorder.abandon, name="test")
    batcher.submit(0)
    assert recorder.started.wait(10)
    batcher.submit(-1)
    batcher.submit(2)
    release.set()
    assert recorder.gave_up.wait(10)
    batcher.submit(3)
    batcher.close()
    assert [(batch, str(error)) for batch, error in recorder.abandoned] == [([-1, 2], "disk full")]
    assert recorder.batches[0] == [0] and [job for batch in recorder.batches for job in batch] == [0, 3]


def test_every_worker_stops_on_close() -> None:
    recorder = Recorder()
    batcher: Batcher[int] = Batcher(recorder.handle, recorder.abandon, name="test", threads=3, linger=0.001)
    for job in range(20):
        batcher.submit(job)
    batcher.close()
    assert sorted(job for batch in recorder.batches for job in batch) == list(range(20))
    assert not [thread for thread in threading.enumerate() if thread.name == "test"]
    with pytest.raises(RuntimeError, match="test is closed"):
        batcher.submit(20)


def test_an_idle_batcher_starts_no_thread() -> None:
    recorder = Recorder()
    Batcher(recorder.handle, recorder.abandon, name="idle-batcher").close()
    assert not [thread for thread in threading.enumerate() if thread.name == "idle-batcher"]


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(Recorder().handle, Recorder().abandon, name="test", threads=0)
