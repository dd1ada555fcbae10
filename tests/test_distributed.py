"""Sharding for multi-worker training, to_tf_dataset, and two MultiWorkerMirroredStrategy workers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import dataset_options, object_gets

import s3cache
from s3cache.sharding import shard_from_tf_config
from s3cache.testing.locals3 import LocalS3

URL = "s3://photos/train/"

# Keras 3's model.fit does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585), so the
# workers train with the custom loop TensorFlow documents for distribute_datasets_from_function.
WORKER_SCRIPT = """
import json, sys
import numpy as np, tensorflow as tf, keras, s3cache
strategy = tf.distribute.MultiWorkerMirroredStrategy()
ds = s3cache.image_dataset_from_s3({url!r}, image_size=(16, 16), batch_size=4, seed=5, shard="auto",
                                   cache_dir=sys.argv[1], storage_options={options!r}, verbose=False)
batches = strategy.distribute_datasets_from_function(lambda context: ds.to_tf_dataset())
keras.utils.set_random_seed(0)
with strategy.scope():
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                              keras.layers.Dense(len(ds.class_names))])
    optimizer = keras.optimizers.SGD(0.05)
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

def replica_step(x, y):
    with tf.GradientTape() as tape:
        value = tf.nn.compute_average_loss(loss(y, model(x, training=True)), global_batch_size=8)
    optimizer.apply_gradients(zip(tape.gradient(value, model.trainable_variables), model.trainable_variables))

@tf.function
def train_step(x, y):
    strategy.run(replica_step, args=(x, y))

for epoch in range(2):
    for x, y in batches:
        train_step(x, y)
np.savez(sys.argv[2], *[v.numpy() for v in model.trainable_variables])
print("RESULT " + json.dumps({{"files": ds.file_paths, "stats": ds.stats}}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_shard_from_tf_config() -> None:
    cluster = {"chief": ["h:1"], "worker": ["h:2", "h:3"]}
    assert shard_from_tf_config(json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}})) == (0, 3)
    assert shard_from_tf_config(json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})) == (2, 3)
    assert shard_from_tf_config("") == (0, 1)
    with pytest.raises(ValueError, match="evaluator"):
        shard_from_tf_config(json.dumps({"cluster": cluster, "task": {"type": "evaluator", "index": 0}}))


def test_shards_are_disjoint_complete_and_balanced(s3: LocalS3, bucket: str, cache_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    shards = [s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, shuffle=True, seed=1,
                                                                   shard=(i, 5)))
              for i in range(5)]
    files = [set(ds.file_paths) for ds in shards]
    assert sum(len(f) for f in files) == 24 and len(set().union(*files)) == 24
    assert {len(f) for f in files} == {4, 5}
    assert {ds.steps_per_epoch for ds in shards} == {1}
    config = {"cluster": {"worker": ["a:1", "b:2", "c:3", "d:4", "e:5"]}, "task": {"type": "worker", "index": 3}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    auto = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, shuffle=True, seed=1, shard="auto"))
    assert set(auto.file_paths) == files[3]
    with pytest.raises(ValueError, match="shard index"):
        s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, shard=(2, 2)))


def test_to_tf_dataset_has_shapes_and_reads_through_the_cache(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    ds = s3cache.image_dataset_from_s3(URL, **dataset_options(s3, cache_dir, label_mode="categorical",
                                                              shuffle=True, seed=3))
    tfds = ds.to_tf_dataset()
    images_spec, labels_spec = tfds.element_spec
    assert tuple(images_spec.shape) == (None, 32, 32, 3) and tuple(labels_spec.shape) == (None, len(ds.class_names))
    assert int(tfds.cardinality()) == len(ds) == 3
    first = [x.numpy() for x, _ in tfds]
    second = [x.numpy() for x, _ in tfds]
    assert sum(len(x) for x in first) == 24 and len(object_gets(s3)) == 24
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))  # reshuffled per epoch
    assert ds.stats["hits"] == 24 and ds.epoch == 2


@pytest.mark.slow
def test_two_multiworker_workers_train_on_disjoint_shards(s3: LocalS3, bucket: str, tmp_path: Path) -> None:
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    script = WORKER_SCRIPT.format(url=URL, options=s3.storage_options)
    runs = []
    for index in range(2):
        env = os.environ | {"TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                                     "task": {"type": "worker", "index": index}})}
        runs.append(subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / f"cache{index}"), str(tmp_path / f"weights{index}.npz")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    files = [set(result["files"]) for result in results]
    assert not files[0] & files[1] and len(files[0] | files[1]) == 24
    assert sorted(object_gets(s3)) == sorted({path.removeprefix("s3:/") for path in files[0] | files[1]})
    for result in results:  # each fetched its own shard once: epoch 2 came from its cache
        assert result["stats"]["misses"] == result["stats"]["s3_requests"] == 12
    weights = [np.load(tmp_path / f"weights{index}.npz") for index in range(2)]
    for name in weights[0].files:
        np.testing.assert_allclose(weights[0][name], weights[1][name], rtol=1e-6)
