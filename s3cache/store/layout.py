"""How the array store lays entries out on disk, and how many bytes of its volume an entry takes.

Entries under :data:`INLINE_LIMIT` are rows of the database, larger ones value files. Measured on
ext4 (``benchmarks/results/inline.md``): for entries up to about 250 KB, a row in the write-ahead
log costs a fraction of a new file and its directories, and reading it through the readers' memory
map is no slower than opening the file.

A row larger than a page goes to overflow pages, each written to the write-ahead log as a frame of
its own and read through the pager one by one: larger pages mean fewer of them (a 147 KB row spans
37 pages of 4 KiB, 10 of 16 KiB). Measured in the same benchmark, 16 KiB pages cost a batched write
of 224x224 entries about 45% less CPU than 4 KiB pages and read them about 20% faster; 128x128
entries (48 KB) write at the same cost and read about 15% faster. But SQLite's rule for the part
of a row kept in its leaf page wastes up to a third of the space at some sizes (a 12 KB row takes a
whole 16 KiB page), and rows sharing a leaf page free it only together. So a new store takes the
largest page size at which its first dataset's rows span overflow pages and take at most 5% more
room than with SQLite's default (:func:`page_size_for`). A store keeps the page size it was created
with (SQLite fixes it once a database has content), so the estimates here take the page size as an
argument.
"""

from __future__ import annotations

import math

INLINE_LIMIT = 256 * 2**10
"""Entries smaller than this are stored inside the database, larger ones in value files."""

DEFAULT_PAGE_SIZE = 4096
"""SQLite's page size, for a store created before its entries' size is known."""

PAGE_SIZES = (4096, 8192, 16384)
"""The page sizes a new store may take (:func:`page_size_for`)."""

_SPACE_SLACK = 1.05

EMPTY_STORE_PAGES = 12
"""Pages of an empty store's database (its tables and indexes), whatever their size."""

# A row's payload is its value, its key and about 40 bytes of other columns; its index entries (key,
# tag, access_time) take about 56 bytes plus the key. A value file's row holds its name instead.
_ROW_BYTES = 40
_INDEX_BYTES = 56
_FILE_ROW_BYTES = 80


def footprint(value: int, key: int, page_size: int = DEFAULT_PAGE_SIZE, in_file: bool | None = None) -> int:
    """Bytes one entry adds to the store's volume: its row's share of leaf pages, overflow pages, index entries.

    Args:
        value: Bytes of the stored value.
        key: Characters of its key.
        page_size: The database's page size.
        in_file: Whether the value is in a value file (default: whether it is at least :data:`INLINE_LIMIT`).
    """
    index = _INDEX_BYTES + key
    if value >= INLINE_LIMIT if in_file is None else in_file:
        return value + _FILE_ROW_BYTES + key + index
    payload = value + key + _ROW_BYTES
    usable = page_size - 4  # bytes of an overflow page after its link to the next
    min_local = (page_size - 12) * 32 // 255 - 23
    overflow = 0
    local = payload
    if _overflows(payload, page_size):  # SQLite keeps part of the payload in the leaf and the rest in overflow pages
        local = min_local + (payload - min_local) % usable
        if _overflows(local, page_size):
            local = min_local
        overflow = math.ceil((payload - local) / usable)
        local += 4
    per_leaf = max(1, (page_size - 8) // (local + 4))
    return math.ceil(page_size / per_leaf) + overflow * page_size + index


def page_size_for(value: int, key: int = 100) -> int:
    """The page size for a new store whose entries have ``value`` bytes (see the module).

    Args:
        value: Bytes of an entry.
        key: Characters of a typical key.
    """
    if value >= INLINE_LIMIT:
        return DEFAULT_PAGE_SIZE
    room = footprint(value, key, DEFAULT_PAGE_SIZE) * _SPACE_SLACK
    fitting = [size for size in PAGE_SIZES
               if _overflows(value + key + _ROW_BYTES, size) and footprint(value, key, size) <= room]
    return max(fitting, default=DEFAULT_PAGE_SIZE)


def empty_store_bytes(page_size: int = DEFAULT_PAGE_SIZE) -> int:
    """Bytes an empty array store counts toward its limit (its database's own pages)."""
    return EMPTY_STORE_PAGES * page_size


def _overflows(payload: int, page_size: int) -> bool:
    """Whether SQLite keeps part of a row of ``payload`` bytes in overflow pages (a table leaf's largest local part)."""
    return payload > page_size - 35
