"""Subprocess entry points for the concurrency tests: ``python workers.py READY GO {warm|train} ARGS...``.

Each worker imports what it needs, creates READY, then waits for GO, so that processes with slow
imports (TensorFlow) still hit the cache at the same moment as the quick ones.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any


def wait_for_go(ready: Path, go: Path) -> None:
    ready.touch()
    deadline = time.monotonic() + 120
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} never appeared")
        time.sleep(0.01)


def digests(ds: Any) -> dict[str, Any]:
    """Two epochs of batches, read as Keras reads them: the SHA-256 of every image, in file order."""
    epochs = []
    for _ in range(2):
        images = [image for index in range(len(ds)) for image in ds[index]]
        ds.on_epoch_end()
        epochs.append([hashlib.sha256(image.tobytes()).hexdigest() for image in images])
    return {"paths": ds.file_paths, "epochs": epochs}


def main() -> int:
    ready, go, command, *args = sys.argv[1:]
    if command == "warm":
        from s3cache.cli import main as cli

        wait_for_go(Path(ready), Path(go))
        return cli(args)
    # Imported before the barrier: TensorFlow takes seconds.
    from s3cache.api import image_dataset_from_s3

    wait_for_go(Path(ready), Path(go))
    print(json.dumps(digests(image_dataset_from_s3(**json.loads(args[0])))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
