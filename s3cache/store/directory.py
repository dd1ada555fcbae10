"""A cache directory: where it is, whether it can be trusted, how it is created, and the two stores inside it.

Trust: a cache is code-free data, but its arrays are served to training as they are. A directory
that someone else owns or can write could hold planted entries (a poisoned array under a valid
key, rows made to be unpickled). So a cache directory, its ``arrays/`` and ``meta/`` stores and
their databases must be owned by the current user and not writable by group or others
(symlinks are followed and their targets checked); otherwise :class:`CacheDirectory` refuses it
with a :class:`~s3cache.errors.CacheError` naming the path, the reason and the fixes. A team
that shares a cache on purpose opts in with ``S3CACHE_TRUST_SHARED=1`` or
``CacheConfig.create(trust_shared_cache=True)``; new files then follow the umask, not ``0600``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from s3cache.errors import CacheError
from s3cache.store.arrays import ArrayStore
from s3cache.store.disk import DBNAME, is_value_file
from s3cache.store.meta import MetaStore
from s3cache.store.repair import database_damage, header_page_size, read_setting, rebuild_store, write_on_full_disk
from s3cache.store.safecache import SafeCache, open_diskcache
from s3cache.store.verify import Problem

#: The environment variable that opts in to a shared cache directory (any of 1, true, yes).
TRUST_SHARED_ENV = "S3CACHE_TRUST_SHARED"
STORES = ("arrays", "meta")


def trust_shared_from_env() -> bool:
    """Whether ``$S3CACHE_TRUST_SHARED`` opts in to shared cache directories."""
    return os.environ.get(TRUST_SHARED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_trusted(path: Path) -> None:
    """Refuse a cache directory that someone else owns or can write.

    Checks the directory, its stores and their databases, following symlinks.

    Raises:
        CacheError: Naming the path, the reason and the fixes.
    """
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    if uid is None:  # no POSIX ownership (Windows): nothing to check
        return
    for candidate in (path, *(path / store for store in STORES), *(path / store / DBNAME for store in STORES)):
        try:
            info = os.stat(candidate)
        except FileNotFoundError:
            continue
        reasons = []
        if info.st_uid != uid:
            reasons.append(f"it is owned by {_user(info.st_uid)}, not by you ({_user(uid)})")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            writers = " and ".join(who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH))
                                   if info.st_mode & bit)
            reasons.append(f"it is writable by {writers} (mode {stat.S_IMODE(info.st_mode):04o})")
        if not reasons:
            continue
        shown = str(candidate)
        if candidate.is_symlink():
            shown += f" (a symlink to {candidate.resolve()})"
        fixes = []
        if info.st_uid != uid:
            fixes.append(f"`chown -R {_user(uid, bare=True)} {candidate}`")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            fixes.append(f"`chmod go-w {candidate}`")
        raise CacheError(
            f"refusing the cache directory {path}: {shown}: {'; '.join(reasons)}. Cached arrays are served to "
            "training as they are, so a cache someone else can write could feed it planted data. Run "
            f"{' and '.join(fixes)}, or choose a cache directory of your own (cache_dir=, --cache-dir, "
            f"$S3CACHE_DIR); for a team cache you trust, set {TRUST_SHARED_ENV}=1 (or trust_shared_cache=True)."
        )


def _user(uid: int, bare: bool = False) -> str:
    try:
        import pwd

        name = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)
    return name if bare else f"{name} (uid {uid})"


class SpecRecords:
    """Keeps spec records in a cache's metadata while a writer stores entries under them.

    ``s3cache clear`` (or a rebuilt metadata store) can remove a spec's record while a process
    keeps writing entries under it; :class:`~s3cache.store.arrays.ArrayStore` calls this, at most
    every few seconds, with the specs it wrote under, and a missing record is written again (one
    read per check, a write only when the record is missing).

    Args:
        meta: The metadata store (closed by :meth:`close`).
        descriptions: Spec descriptions by fingerprint.
    """

    def __init__(self, meta: MetaStore, descriptions: dict[str, dict[str, Any]]) -> None:
        self.meta = meta
        self.descriptions = dict(descriptions)

    def __call__(self, fingerprint: str) -> None:
        """Record the spec again if its record is missing."""
        description = self.descriptions.get(fingerprint)
        if description is not None:
            self.meta.put_spec(fingerprint, description)

    def close(self) -> None:
        """Close the metadata store."""
        self.meta.close()


class CacheDirectory:
    """The array store and the metadata store of one cache directory.

    Args:
        path: The cache directory (created ``0700`` if missing, unless ``must_exist``).
        size_limit: Size limit of the arrays in bytes; ``None`` keeps the stored one.
        must_exist: Refuse a directory that holds no cache instead of creating one.
        trust_shared: Accept a directory that someone else owns or can write (see the module).
        page_size: The page size of a new array store's database (see :class:`ArrayStore`).

    Raises:
        CacheError: The directory holds no cache (with ``must_exist``), is not trusted, or cannot
            be created or opened.
    """

    def __init__(self, path: str | os.PathLike[str], size_limit: int | None = None, *,
                 must_exist: bool = False, trust_shared: bool = False, page_size: int | None = None) -> None:
        self.path = Path(path)
        self.trust_shared = trust_shared
        prepare(self.path, must_exist=must_exist, trust_shared=trust_shared)
        self.arrays = ArrayStore(self.path / "arrays", size_limit, private=not trust_shared, page_size=page_size)
        try:
            self.meta = MetaStore(self.path / "meta")
        except BaseException:
            self.arrays.close()
            raise

    def record_spec(self, fingerprint: str, description: dict[str, Any]) -> None:
        """Record a spec, and keep it recorded while the array store writes under it.

        The metadata store then belongs to the array store (closed with it).
        """
        self.meta.put_spec(fingerprint, description)
        self.arrays.spec_recorder = SpecRecords(self.meta, {fingerprint: description})

    def __enter__(self) -> CacheDirectory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close both stores."""
        self.arrays.close()
        self.meta.close()


def prepare(path: Path, *, must_exist: bool, trust_shared: bool) -> None:
    """Create a cache directory and its stores' directories (owner-only), and check that it is trusted.

    Raises:
        CacheError: No cache there (with ``must_exist``), not trusted, or cannot be created.
    """
    if must_exist and not (path / "arrays").is_dir():
        raise CacheError(f"no s3cache cache in {path} (nothing cached yet; run `s3cache warm` first)")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not trust_shared:
            check_trusted(path)
        for store in STORES:
            # Owner-only, whatever the umask; diskcache would create them 0755.
            (path / store).mkdir(mode=0o777 if trust_shared else 0o700, exist_ok=True)
    except CacheError:
        raise
    except OSError as exc:
        raise CacheError(f"cannot open the cache in {path}: {exc}. "
                         "Check that it is a writable directory, or choose another cache_dir.") from exc
    if not trust_shared:
        check_trusted(path)


def verify_directory(path: Path, fix: bool = False, *, trust_shared: bool = False) -> list[Problem]:
    """Check both stores of a cache directory: each database as a whole, then every row and file.

    A damaged database is reported and, with ``fix``, rebuilt empty (arrays are fetched from S3
    again, listings listed again); its rows are not checked. The arrays' entries are checked as in
    :meth:`ArrayStore.verify`; the metadata's rows must be in s3cache's form and hold JSON.

    Args:
        path: The cache directory.
        fix: Repair what is found.
        trust_shared: Accept a directory that someone else owns or can write.

    Returns:
        The problems found (before fixing); a rebuilt store's problem says so in its ``action``.

    Raises:
        CacheError: No cache there, not trusted, or the file system is full where a fix must write.
    """
    prepare(path, must_exist=True, trust_shared=trust_shared)
    problems: list[Problem] = []
    usable = []
    for store in STORES:
        directory = path / store
        damage = database_damage(directory)
        if damage is None:
            usable.append(store)
            continue
        if not fix:
            problems.append(Problem(f"<{store} database>", damage))
            continue
        limit = read_setting(directory, "size_limit") if store == "arrays" else None
        page_size = header_page_size(directory)  # kept, as its first dataset's arrays chose it
        files = rebuild_store(directory)
        what = (f"arrays store rebuilt empty ({files} value files removed): its images are fetched from S3 again"
                if store == "arrays" else "metadata store rebuilt empty: listings are listed again on the next "
                "online run, spec records are written again by the next run of each spec")
        problems.append(Problem(f"<{store} database>", damage, what))
        if store == "arrays":
            ArrayStore(directory, limit if isinstance(limit, int) else None, private=not trust_shared,
                       page_size=page_size).close()
        else:
            MetaStore(directory).close()
    if "arrays" in usable:
        with ArrayStore(path / "arrays", private=not trust_shared) as arrays:
            problems += arrays.verify(fix)
    if "meta" in usable and (path / "meta" / DBNAME).exists():
        meta = open_diskcache(path / "meta", private=not trust_shared, eviction_policy="none")
        try:
            problems += _verify_meta(meta, fix)
        finally:
            meta.close()
    return problems


def _verify_meta(meta: SafeCache, fix: bool) -> list[Problem]:
    """Rows of the metadata store that are not in s3cache's form or do not hold JSON; ``fix`` deletes them."""
    problems: list[Problem] = []
    doomed: list[tuple[int, str | None]] = []
    sql = meta._sql
    for rowid, key, raw, mode, filename, value in sql("SELECT rowid, key, raw, mode, filename, value FROM Cache"):
        named = raw == 1 and isinstance(key, str)
        reason = None
        if not named:
            reason = "a key stored pickled (raw = 0) or not as text: s3cache never writes one, nor reads it"
        elif mode == 1 and isinstance(value, bytes):
            reason = _json_problem(value)
        elif mode == 2 and value is None and is_value_file(filename):
            try:
                reason = _json_problem(Path(meta.directory, filename).read_bytes())
            except OSError as exc:
                reason = f"cannot read the value file: {exc}"
        else:
            reason = f"a value stored in an unexpected form (mode {mode}): s3cache never reads it"
        if reason is not None:
            problems.append(Problem(key if named else f"<meta row {rowid}>", reason))
            doomed.append((rowid, filename if is_value_file(filename) else None))
    if fix and doomed:
        for _, filename in doomed:
            if filename is not None:
                meta.disk.remove(filename)  # first: room on a full disk
        meta.close()  # (reopened on demand) no connection of ours may hold the database
        write_on_full_disk(Path(meta.directory, DBNAME), lambda con: con.executemany(
            "DELETE FROM Cache WHERE rowid = ?", [(rowid,) for rowid, _ in doomed]))
    return problems


def _json_problem(data: bytes) -> str | None:
    try:
        json.loads(data)
    except ValueError as exc:
        return f"metadata is not JSON: {exc}"
    return None
