"""Indexing tar shards written by other tools in the WebDataset layout (``<key>.jpg``, ``<key>.cls``, ...).

A WebDataset sample is the run of members sharing a key: the member name up to the first dot of its
basename (``cat/0001.jpg`` and ``cat/0001.cls`` are sample ``cat/0001``). :func:`index_from_tars` makes
a :class:`~s3cache.shards.ShardIndex` of such shards: one member per sample with an image, labelled by
the sample's ``.cls`` member (an integer, as text) when there is one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from s3cache.errors import ShardError
from s3cache.shards import MemberInfo, ShardIndex, ShardInfo
from s3cache.tarformat import SkippedMember, TarMember
from s3cache.urls import IMAGE_EXTENSIONS

LABEL_EXTENSION = "cls"
_IMAGE_EXTENSIONS = frozenset(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)


def sample_key(name: str) -> tuple[str, str] | None:
    """Split a member name into sample key and extension at the basename's first dot.

    ``cat/0001.jpg`` -> ``("cat/0001", "jpg")``, ``a/b.seg.png`` -> ``("a/b", "seg.png")``; ``None`` for
    names without a dot in the basename.
    """
    folder, slash, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (folder + slash + stem, extension) if dot and stem else None


def is_label_member(name: str) -> bool:
    """Whether a member holds a sample's ``.cls`` label (whose data :func:`index_from_tars` needs)."""
    parts = sample_key(name)
    return parts is not None and parts[1] == LABEL_EXTENSION


def index_from_tars(
    source: str,
    shards: Iterable[tuple[ShardInfo, Iterable[TarMember]]],
    on_skip: Callable[[SkippedMember], None] | None = None,
) -> ShardIndex:
    """Index WebDataset shards: one member per sample with an image, with its ``.cls`` label if any.

    Args:
        source: The shard set's folder URL, ending in ``/`` (recorded as the index's source).
        shards: Each shard with its members, as :func:`~s3cache.tarformat.scan_tar` yields them with
            ``read=is_label_member``.
        on_skip: Called for members that do not become part of the index: other fields, a second image or
            label of a sample, a label without an image, an image name seen in an earlier shard.

    Raises:
        ShardError: A ``.cls`` member does not hold an integer.
    """
    infos: list[ShardInfo] = []
    indexed: list[MemberInfo] = []
    seen: set[str] = set()
    for shard, members in shards:
        samples: dict[str, _Sample] = {}
        for member in members:
            parts = sample_key(member.name)
            if parts is None:
                reason: str | None = "no sample key (no extension)"
            else:
                sample = samples.setdefault(parts[0], _Sample(parts[0]))
                reason = sample.add(parts[1], member, seen, f"{source}{shard.name}#{member.name}")
            if reason is not None and on_skip is not None:
                on_skip(SkippedMember(member.name, reason))
        for sample in samples.values():
            if sample.image is not None:
                seen.add(sample.image.name)
                indexed.append(MemberInfo(sample.image.name, len(infos), sample.image.offset, sample.image.size,
                                          None, sample.label))
            elif sample.label_name is not None and on_skip is not None:
                on_skip(SkippedMember(sample.label_name, f"label of sample {sample.key} without an image"))
        infos.append(shard)
    return ShardIndex(source, tuple(infos), tuple(indexed))


class _Sample:
    """The image and label members of one sample key in one shard."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.image: TarMember | None = None
        self.label: int | None = None
        self.label_name: str | None = None

    def add(self, extension: str, member: TarMember, seen: set[str], where: str) -> str | None:
        """Take a member into the sample; return why not, if it is not taken."""
        if extension == LABEL_EXTENSION:
            if self.label_name is not None:
                return f"second label of sample {self.key}"
            text = (member.data or b"").decode("utf-8", "replace").strip()
            if not re.fullmatch(r"[+-]?\d+", text):
                raise ShardError(f"{where}: a .cls label must be an integer, not {text[:40]!r}")
            self.label, self.label_name = int(text), member.name
            return None
        if extension.lower() not in _IMAGE_EXTENSIONS:
            return f"not an image or a .{LABEL_EXTENSION} label"
        if self.image is not None:
            return f"second image of sample {self.key}"
        if member.name in seen:
            return "same name as a member of an earlier shard"
        self.image = member
        return None
