"""Labels and class names: from class folders under a prefix, or given by the caller."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from s3cache.items import Item
from s3cache.urls import prefix_of, relative_name


def labels_for(
    items: Sequence[Item], directory: str | Sequence[str], labels: Any, class_names: Sequence[str] | None
) -> tuple[np.ndarray, list[str]]:
    """Integer labels per item (``-1`` for items outside any class folder) and the class names.

    Args:
        items: The listed items.
        directory: The prefix URL or URL list they were listed from.
        labels: ``"inferred"``, ``None`` or one integer per item.
        class_names: Class names in label order, or ``None``.

    Raises:
        ValueError: Given labels do not match the items, or ``class_names`` the folders.
    """
    if labels is None:
        return np.zeros(len(items), dtype="int64"), []
    if not isinstance(labels, str):
        given = np.asarray(labels, dtype="int64")
        if len(given) != len(items):
            raise ValueError(f"labels has {len(given)} entries but {len(items)} image objects were found")
        names = list(class_names) if class_names else [str(i) for i in range(int(given.max()) + 1)]
        return given, names
    folders = [class_folder(item, directory) for item in items]
    found = sorted({f for f in folders if f})
    if not found and any(item.label is not None for item in items):
        return _stored_labels(items, class_names)
    if class_names is not None and set(class_names) != set(found):
        raise ValueError(f"class_names {list(class_names)} do not match the class folders found: {found}")
    names = list(class_names) if class_names is not None else found
    index = {name: i for i, name in enumerate(names)}
    return np.array([index.get(f, -1) if f else -1 for f in folders], dtype="int64"), names


def _stored_labels(items: Sequence[Item], class_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """Labels stored with the items (WebDataset ``.cls`` members); items without one are left out (``-1``)."""
    labels = np.array([-1 if item.label is None else item.label for item in items], dtype="int64")
    names = list(class_names) if class_names else [str(i) for i in range(int(labels.max()) + 1)]
    return labels, names


def class_folder(item: Item, directory: str | Sequence[str]) -> str | None:
    """An item's class folder: the first path part under the prefix, or a listed URL's parent folder.

    For a tar member it is the first path part of the member's name (its key relative to the packed prefix).
    """
    if item.member is not None:
        folder, sep, _ = item.member.partition("/")
    elif isinstance(directory, str):
        folder, sep, _ = relative_name(item.key, prefix_of(directory)[1]).partition("/")
    else:
        parent, sep, _ = item.key.rpartition("/")
        folder = parent.rpartition("/")[2]
    return folder if sep and folder else None
