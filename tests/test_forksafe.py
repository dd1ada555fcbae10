"""Forking while other threads use the cache: a child never inherits one of SQLite's mutexes locked."""

from __future__ import annotations

import contextlib
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

# Python 3.12+ warns that forking a multi-threaded process may deadlock: what the gate prevents.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")

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


def test_children_forked_while_a_thread_writes_the_store_open_it(busy_store: Path) -> None:
    # Without the gate, a thread committing in a loop left about 45% of forked children hung for good.
    for fork in range(FORKS):
        pid = os.fork()
        if pid == 0:
            _child_reads(busy_store)
        assert _wait(pid) == 0, f"fork {fork}: the child hung or failed opening the store"


def test_a_fork_waits_for_a_transaction_in_flight(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite"
    with contextlib.closing(forksafe.connect(database, isolation_level=None)) as setup:
        setup.execute("PRAGMA journal_mode = WAL")
        setup.execute("CREATE TABLE t (x)")
    inside, release, committed = threading.Event(), threading.Event(), threading.Event()

    def write() -> None:
        with contextlib.closing(forksafe.connect(database, isolation_level=None, check_same_thread=False)) as con:
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO t VALUES (1)")
            inside.set()
            release.wait(CHILD_DEADLINE_S)
            con.execute("COMMIT")
            committed.set()

    forked: list[tuple[int, bool]] = []

    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with contextlib.closing(forksafe.connect(database, isolation_level=None)) as con:
                    con.execute("BEGIN IMMEDIATE")  # the write lock: free in the child's eyes too
                    con.execute("ROLLBACK")
                code = 0
            finally:
                os._exit(code)
        forked.append((pid, committed.is_set()))

    writer = threading.Thread(target=write)
    writer.start()
    assert inside.wait(CHILD_DEADLINE_S)
    forking = threading.Thread(target=fork)
    forking.start()
    deadline = time.monotonic() + CHILD_DEADLINE_S
    while not forksafe._GATE._waiting and time.monotonic() < deadline:  # the fork waits for the writer
        time.sleep(0.001)
    assert forksafe._GATE._waiting, "the fork did not wait for the transaction"
    release.set()
    writer.join()
    forking.join()
    (pid, after_commit), = forked
    assert after_commit and _wait(pid) == 0


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
