"""Forking while other threads use the cache: a child never inherits one of SQLite's mutexes locked."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from s3cache import codec, forksafe
from s3cache.store import ArrayStore

FORKS = 40
CHILD_DEADLINE_S = 60  # a healthy child is done in milliseconds; a hung one never is


@pytest.fixture
def busy_store(tmp_path: Path) -> Iterator[Path]:
    """A store that a thread of this process writes to and reads from until the test ends."""
    directory = tmp_path / "arrays"
    store = ArrayStore(directory)
    stop = threading.Event()

    def churn() -> None:
        round_ = 0
        while not stop.is_set():
            keys = [f"k{round_ % 50}-{i}" for i in range(8)]
            store.put_many([(key, codec.encode_array(np.full((16, 16, 3), round_ % 256, np.uint8), key))
                            for key in keys], tag="t")
            store.get_many(keys)
            round_ += 1

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        yield directory
    finally:
        stop.set()
        thread.join()
        store.close()


def _child_reads(directory: Path) -> None:
    """In a forked child: open the store and read from it, then leave at once (exit code 1 on error)."""
    code = 1
    try:
        store = ArrayStore(directory)
        store.get_many(["k0-0"])
        store.close()
        code = 0
    finally:
        os._exit(code)


def _wait(pid: int) -> int | None:
    """A child's exit code, or ``None`` if it has not ended by the deadline (it is then killed)."""
    deadline = time.monotonic() + CHILD_DEADLINE_S
    while time.monotonic() < deadline:
        ended, status = os.waitpid(pid, os.WNOHANG)
        if ended:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_children_forked_while_a_thread_writes_the_store_open_it(busy_store: Path) -> None:
    # Without the gate, a thread committing in a loop left about 45% of forked children hung for good.
    for fork in range(FORKS):
        pid = os.fork()
        if pid == 0:
            _child_reads(busy_store)
        assert _wait(pid) == 0, f"fork {fork}: the child hung or failed opening the store"


class CountingGate:
    """Wraps the gate and counts the times it is entered."""

    def __init__(self, gate: object) -> None:
        self.gate, self.entered = gate, 0

    def __enter__(self) -> None:
        self.entered += 1
        self.gate.__enter__()  # type: ignore[attr-defined]

    def __exit__(self, *exc_info: object) -> None:
        self.gate.__exit__(*exc_info)  # type: ignore[attr-defined]


def test_a_connection_dropped_unclosed_closes_inside_the_gate(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    con = forksafe.connect(tmp_path / "db.sqlite", isolation_level=None)
    con.execute("CREATE TABLE t (x)")
    counting = CountingGate(forksafe._GATE)
    monkeypatch.setattr(forksafe, "_GATE", counting)
    del con
    gc.collect()  # a connection is part of a reference cycle (its statement cache)
    assert counting.entered == 1, "the collected connection closed outside the gate"
