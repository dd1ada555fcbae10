"""File order, labels and class names, as ``keras.utils.image_dataset_from_directory`` indexes a directory.

Keras walks a directory in a fixed order, and both the meaning of a ``labels`` list and the files a
seed puts into the validation subset depend on it. For a prefix, :func:`index_items` reproduces
that order from the listing: with ``labels="inferred"``, the class folders in ``class_names`` order
(sorted folder names by default), and inside each class folder the files folder by folder, in
sorted path order, each folder's files sorted by name (so a folder's own files come before those
of its subfolders); otherwise the whole prefix, walked the same way. A list of URLs keeps its order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from s3cache.errors import EmptyListingError
from s3cache.items import Item
from s3cache.listing import ALLOWED_FORMATS
from s3cache.urls import prefix_of


def index_items(
    items: Sequence[Item], directory: str | Sequence[str], labels: Any, class_names: Sequence[str] | None
) -> tuple[list[Item], np.ndarray | None, list[str] | None]:
    """The items in Keras's order, their labels and the class names, as ``index_directory`` returns them.

    Args:
        items: The listed items (a prefix's in key order, a URL list's in its order).
        directory: The prefix URL or URL list they were listed from.
        labels: ``"inferred"``, ``None`` or one integer per item (in the order Keras walks the prefix).
        class_names: With ``"inferred"``: the classes to use, in label order (a subset of the folders).

    Returns:
        ``(items, labels, class_names)``: with ``"inferred"``, only the items inside one of the
        classes' folders; ``labels`` (``int32``) and ``class_names`` are ``None`` without labels,
        and for given labels the class names are their sorted distinct values, as strings.

    Raises:
        EmptyListingError: No image is left (Keras's "No images found in directory ...").
        ValueError: Given labels do not match the number of files, or ``class_names`` the folders.
    """
    if isinstance(labels, str):
        ordered, label_array, names = _inferred(items, directory, class_names)
    else:
        ordered = walk_order(items, directory)
        label_array, names = None, None
        if labels is not None:
            label_array = np.asarray(labels, dtype="int32").reshape(-1)
            if len(label_array) != len(ordered):
                raise ValueError(
                    "Expected the lengths of `labels` to match the number of files in the target directory. "
                    f"len(labels) is {len(label_array)} while we found {len(ordered)} files in directory "
                    f"{_describe(directory)}."
                )
            names = [str(label) for label in sorted(set(label_array.tolist()))]
    if not ordered:
        raise EmptyListingError(f"No images found in directory {_describe(directory)}. "
                                f"Allowed formats: {ALLOWED_FORMATS}")
    return ordered, label_array, names


def walk_order(items: Sequence[Item], directory: str | Sequence[str]) -> list[Item]:
    """The items in the order Keras walks a directory: by folder path, then by file name (a URL list: as given)."""
    if not isinstance(directory, str):
        return list(items)
    keys = [path.rpartition("/")[::2] for path in _relative_paths(items, prefix_of(directory)[1])]
    return [items[i] for i in sorted(range(len(items)), key=keys.__getitem__)]


def class_folder(item: Item, directory: str | Sequence[str]) -> str | None:
    """An item's class folder: the first path part under the prefix, or a listed URL's parent folder.

    ``None`` for an item directly under the prefix, and (under a prefix) for folders whose name
    starts with ``.``, which Keras does not take as classes.
    """
    if isinstance(directory, str):
        return _class_of(_relative_paths([item], prefix_of(directory)[1])[0])
    parent, sep, _ = item.name.rpartition("/")
    folder = parent.rpartition("/")[2]
    return folder if sep and folder else None


def _relative_paths(items: Sequence[Item], prefix: str) -> list[str]:
    """Each item's path under a folder prefix: a member's name inside its shard, else its key without the prefix."""
    cut = len(prefix)
    return [item.member if item.member is not None
            else item.key[cut:] if item.key.startswith(prefix) else item.key for item in items]


def _class_of(path: str) -> str | None:
    folder, sep, _ = path.partition("/")
    return folder if sep and folder and not folder.startswith(".") else None


def _inferred(
    items: Sequence[Item], directory: str | Sequence[str], class_names: Sequence[str] | None
) -> tuple[list[Item], np.ndarray, list[str]]:
    if isinstance(directory, str):
        paths = _relative_paths(items, prefix_of(directory)[1])
        folders = [_class_of(path) for path in paths]
    else:
        folders = [class_folder(item, directory) for item in items]
    found = sorted({folder for folder in folders if folder is not None})
    if not found and any(item.label is not None for item in items):
        return _stored_labels(items, directory, class_names)
    if class_names is not None:
        if not set(class_names).issubset(found):
            raise ValueError(
                "The `class_names` passed did not match the names of the subdirectories of the target directory. "
                f"Expected: {found} (or a subset of it), but received: class_names={list(class_names)}"
            )
        found = list(class_names)
    index = {name: i for i, name in enumerate(found)}
    kept = [i for i, folder in enumerate(folders) if folder in index]
    if isinstance(directory, str):  # class by class in label order, each class folder walked
        keys = {i: (index[folders[i]], *paths[i].rpartition("/")[::2]) for i in kept}
        kept.sort(key=keys.__getitem__)
    labels = np.fromiter((index[folders[i]] for i in kept), dtype="int32", count=len(kept))
    return [items[i] for i in kept], labels, found


def _stored_labels(
    items: Sequence[Item], directory: str | Sequence[str], class_names: Sequence[str] | None
) -> tuple[list[Item], np.ndarray, list[str]]:
    """Labels stored with the items (WebDataset ``.cls`` members), when there are no class folders.

    Items without a label are left out, as Keras leaves out files outside every class folder.
    """
    kept = [item for item in walk_order(items, directory) if item.label is not None]
    labels = np.fromiter((item.label for item in kept), dtype="int32", count=len(kept))
    names = list(class_names) if class_names else [str(i) for i in range(int(labels.max()) + 1)]
    return kept, labels, names


def _describe(directory: str | Sequence[str]) -> str:
    return directory if isinstance(directory, str) else f"<list of {len(directory)} URLs>"
