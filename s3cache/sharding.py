"""Which part of the data a worker of a multi-worker job trains on."""

from __future__ import annotations

import json
import os


def resolve_shard(shard: tuple[int, int] | str | None) -> tuple[int, int]:
    """``(index, count)`` of this worker's shard: as given, from ``TF_CONFIG`` for ``"auto"``, else ``(0, 1)``.

    Raises:
        ValueError: An index outside ``0..count-1``, or an unknown value.
    """
    if shard is None:
        return 0, 1
    if shard == "auto":
        return shard_from_tf_config(os.environ.get("TF_CONFIG", ""))
    if isinstance(shard, str) or len(shard) != 2:
        raise ValueError(f'shard must be (index, count), "auto" or None, got {shard!r}')
    index, count = (int(v) for v in shard)
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in 0..{count - 1}, got {index} (of {count})")
    return index, count


def shard_from_tf_config(tf_config: str) -> tuple[int, int]:
    """This task's ``(index, count)`` among the chief and workers of a ``TF_CONFIG`` cluster.

    The chief (if any) comes first, then the workers in order, as in TensorFlow's own numbering
    of ``MultiWorkerMirroredStrategy`` tasks. Without a cluster, there is one shard.
    """
    config = json.loads(tf_config) if tf_config.strip() else {}
    cluster, task = config.get("cluster", {}), config.get("task", {})
    chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
    if not chiefs + workers:
        return 0, 1
    if task.get("type") not in ("chief", "worker"):
        raise ValueError(f"TF_CONFIG task type {task.get('type')!r} does not train; give shard=(index, count)")
    index = int(task.get("index", 0)) + (len(chiefs) if task["type"] == "worker" else 0)
    return index, len(chiefs) + len(workers)


def shard_slice(index: int, count: int) -> slice:
    """The positions of shard ``index`` of ``count``: every ``count``-th one, starting at ``index``."""
    return slice(index, None, count)
