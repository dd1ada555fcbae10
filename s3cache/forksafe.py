"""SQLite connections that let a threaded process fork: no thread is inside SQLite when ``os.fork`` runs.

SQLite keeps process-wide state: mutexes (its memory allocator's, the file system layer's, one per
open database file) and, per database file, the locks this process's connections hold. ``os.fork``
copies only the forking thread, so a mutex another thread held at that instant stays locked in the
child for good, and a transaction open at that instant leaves the child believing one of its own
connections holds the write lock. Either way the child's first query waits forever. Keras forks its
worker processes (``use_multiprocessing=True``) from a thread of its own while the training process
may read or write the cache on others: in a dev run, a thread committing in a loop left 134 of 300
forked children hung.

Every SQLite call s3cache makes goes through a :func:`connect` connection. Its calls (opening,
queries, fetching rows, closing, and the clean-up of one dropped unclosed) and its open
transactions, from ``BEGIN`` to the end, take a shared gate. Before a fork, the forking thread waits
until no thread is inside, then closes the gate until the fork is done. A fork therefore waits for
the calls and transactions in flight (a commit, or a wait for another process's lock), and only
calls that start in the instant of the fork itself wait for it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar


class _Depth:
    """How deep one thread is inside the gate (0: outside)."""

    __slots__ = ("__weakref__", "n")

    def __init__(self) -> None:
        self.n = 0


class _Gate:
    """Many threads inside at once; a fork waits until none is, and keeps them out while it runs.

    Entering takes no lock: a thread marks itself inside, then looks whether a fork is under way,
    and if so steps out and waits. The forking thread marks the fork, then looks at the threads.
    Python runs one thread's bytecode at a time, so either the fork sees the thread's mark or the
    thread sees the fork's. A thread inside may enter again (a garbage collection during a query
    may close a connection) and passes at once; so does the forking thread. A transaction is held
    by the thread that began it, which must end it (as s3cache's do).
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._threads: weakref.WeakSet[_Depth] = weakref.WeakSet()  # a thread's mark goes with it
        self._forker: int | None = None  # the thread forking, between the fork's two hooks
        self._waiting = False  # a fork waits for the threads inside
        self._changed = threading.Condition()  # reentrant: a collection in the forking thread may enter

    def depth(self) -> _Depth:
        """This thread's depth."""
        try:
            return self._local.depth  # type: ignore[no-any-return]
        except AttributeError:
            depth = self._local.depth = _Depth()
            self._threads.add(depth)
            return depth

    def __enter__(self) -> None:
        self.enter()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.leave(self._local.depth)

    def enter(self) -> _Depth:
        """Enter for this thread (waiting while a fork is under way); returns what :meth:`leave` takes."""
        depth = self.depth()
        depth.n += 1
        while depth.n == 1 and self._forker is not None and self._forker != threading.get_ident():
            depth.n = 0
            with self._changed:
                while self._forker is not None:
                    self._changed.wait()
            depth.n = 1
        return depth

    def leave(self, depth: _Depth) -> None:
        """Leave once for the thread whose depth it is (a transaction may end on another thread)."""
        depth.n -= 1
        if not depth.n and self._waiting:
            with self._changed:
                self._changed.notify_all()

    def before_fork(self) -> None:
        """Wait until no thread is inside, then keep them out until the fork is done.

        The gate is closed first and the threads looked at after (a thread that entered before is
        then seen); if one is inside, the gate opens again until a thread leaves, and the fork
        looks again. So threads wait for a fork only while no thread is inside, and none of them
        can hold up one that is.
        """
        own = getattr(self._local, "depth", None)
        forker = threading.get_ident()
        with self._changed:
            self._waiting = True  # before looking: a thread that leaves after the look then calls back
            try:
                while True:
                    self._forker = forker
                    if not any(depth.n for depth in list(self._threads) if depth is not own):
                        return
                    self._forker = None
                    self._changed.notify_all()  # those that stepped back meanwhile
                    self._changed.wait()
            finally:
                self._waiting = False

    def after_fork_in_parent(self) -> None:
        """Let in the threads that waited for the fork."""
        with self._changed:
            self._forker = None
            self._changed.notify_all()

    def after_fork_in_child(self) -> None:
        """Start open: the forking thread is the child's only thread."""
        self._changed = threading.Condition()
        self._forker = None


T = TypeVar("T")
_GATE = _Gate()
os.register_at_fork(before=_GATE.before_fork, after_in_parent=_GATE.after_fork_in_parent,
                    after_in_child=_GATE.after_fork_in_child)


class Cursor(sqlite3.Cursor):
    """A cursor whose every call into SQLite takes the gate."""

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor:
        """``sqlite3.Cursor.execute``, inside the gate."""
        return self.connection.gated(super().execute, sql, parameters)  # type: ignore[attr-defined,no-any-return]

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> Cursor:
        """``sqlite3.Cursor.executemany``, inside the gate."""
        return self.connection.gated(super().executemany, sql, seq_of_parameters)  # type: ignore[attr-defined,no-any-return]

    def executescript(self, sql_script: str, /) -> Cursor:
        """``sqlite3.Cursor.executescript``, inside the gate."""
        return self.connection.gated(super().executescript, sql_script)  # type: ignore[attr-defined,no-any-return]

    def fetchone(self) -> Any:
        """``sqlite3.Cursor.fetchone``, inside the gate."""
        with _GATE:
            return super().fetchone()

    def fetchmany(self, size: int | None = None) -> list[Any]:
        """``sqlite3.Cursor.fetchmany``, inside the gate."""
        with _GATE:
            return super().fetchmany(self.arraysize if size is None else size)

    def fetchall(self) -> list[Any]:
        """``sqlite3.Cursor.fetchall``, inside the gate."""
        with _GATE:
            return super().fetchall()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        with _GATE:
            return super().__next__()

    def close(self) -> None:
        """``sqlite3.Cursor.close``, inside the gate."""
        with _GATE:
            super().close()

    def __del__(self) -> None:
        # A dropped cursor resets its statement, a call into SQLite: made here, inside the gate.
        with _GATE, contextlib.suppress(sqlite3.Error):
            super().close()


class Connection(sqlite3.Connection):
    """A connection whose every call into SQLite, and every open transaction, takes the gate.

    Its cursors are :class:`Cursor`. The methods s3cache does not call (``backup``, ``blobopen``,
    ``iterdump``, ``create_function`` and the like) are left as they are, outside the gate.
    """

    _transaction: _Depth | None = None  # the depth the open transaction holds the gate on

    def track_transaction(self) -> None:
        """Hold the gate while a transaction is open (locks are then held), and only then."""
        if self.in_transaction and self._transaction is None:
            self._transaction = _GATE.enter()
        elif not self.in_transaction and self._transaction is not None:
            depth, self._transaction = self._transaction, None
            _GATE.leave(depth)

    def gated(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` inside the gate, then :meth:`track_transaction`: the call may begin or end a transaction."""
        with _GATE:
            try:
                return call(*args)
            finally:
                self.track_transaction()

    def cursor(self, factory: type[sqlite3.Cursor] = Cursor) -> Any:  # type: ignore[override]
        """A new cursor, a :class:`Cursor` by default."""
        return super().cursor(factory)

    # sqlite3.Connection's own shortcuts make plain cursors: these make ours.
    def execute(self, sql: str, parameters: Any = (), /) -> Cursor:
        """``execute`` on a new :class:`Cursor`."""
        return self.cursor().execute(sql, parameters)  # type: ignore[no-any-return]

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor:
        """``executemany`` on a new :class:`Cursor`."""
        return self.cursor().executemany(sql, parameters)  # type: ignore[no-any-return]

    def executescript(self, sql_script: str, /) -> Cursor:
        """``executescript`` on a new :class:`Cursor`."""
        return self.cursor().executescript(sql_script)  # type: ignore[no-any-return]

    def commit(self) -> None:
        """``sqlite3.Connection.commit``, inside the gate."""
        self.gated(super().commit)

    def rollback(self) -> None:
        """``sqlite3.Connection.rollback``, inside the gate."""
        self.gated(super().rollback)

    def close(self) -> None:
        """``sqlite3.Connection.close``, inside the gate."""
        with _GATE:
            try:
                super().close()
            finally:  # a transaction left open was rolled back: the gate is no longer held for it
                if self._transaction is not None:
                    depth, self._transaction = self._transaction, None
                    _GATE.leave(depth)

    def __exit__(self, *exc_info: Any) -> Any:
        return self.gated(super().__exit__, *exc_info)

    def __del__(self) -> None:
        # An unclosed connection closes when collected, on whatever thread: through close(), inside the gate.
        with contextlib.suppress(sqlite3.Error):
            self.close()


def connect(database: str | os.PathLike[str], **kwargs: Any) -> Connection:
    """Open a connection that takes the gate (``sqlite3.connect``'s arguments, but ``factory``)."""
    with _GATE:
        return sqlite3.connect(database, factory=Connection, **kwargs)  # type: ignore[return-value]
