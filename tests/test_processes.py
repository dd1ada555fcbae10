"""Keras worker threads and processes, and several training processes sharing one cache directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import dataset_options, object_gets

import s3cache
from s3cache.store import ArrayStore
from s3cache.testing.locals3 import LocalS3

pytestmark = pytest.mark.slow  # Keras worker processes and two training subprocesses

URL = "s3://photos/train/"

TRAIN_SCRIPT = """
import sys, keras, s3cache
ds = s3cache.image_dataset_from_s3({url!r}, image_size=(32, 32), batch_size=4, seed=int(sys.argv[1]),
                                   cache_dir={cache_dir!r}, storage_options={options!r}, verbose=False)
model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                          keras.layers.Dense(len(ds.class_names))])
model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(ds, epochs=2, verbose=0)
print("trained", ds.stats["hits"], ds.stats["misses"])
"""


def tiny_model(classes: int):  # keras is imported lazily, so no return annotation
    import keras

    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                              keras.layers.Dense(classes)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


# Worker threads decode with TensorFlow's batches (as "auto" does in a training process that imported it) while
# the model trains; worker processes are forks, where "auto" falls back to NumPy.
@pytest.mark.parametrize(("use_multiprocessing", "decoder"), [(False, "tensorflow"), (True, "auto")])
def test_fit_with_keras_workers(s3: LocalS3, bucket: str, cache_dir: Path, use_multiprocessing: bool,
                                decoder: str) -> None:
    ds = s3cache.image_dataset_from_s3(
        URL, **dataset_options(s3, cache_dir, batch_size=4, shuffle=True, seed=2, workers=2,
                               use_multiprocessing=use_multiprocessing, decoder=decoder))
    history = tiny_model(len(ds.class_names)).fit(ds, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    if not use_multiprocessing:
        assert ds.loader.decoder == "tensorflow"
    assert sorted(object_gets(s3)) == sorted(set(object_gets(s3)))  # no object fetched twice
    assert len(object_gets(s3)) == 24
    with ArrayStore(cache_dir / "arrays") as store:
        assert len(store) == 24


def test_two_processes_train_on_one_cache_at_once(s3: LocalS3, bucket: str, cache_dir: Path) -> None:
    script = TRAIN_SCRIPT.format(url=URL, cache_dir=str(cache_dir), options=s3.storage_options)
    runs = [subprocess.Popen([sys.executable, "-c", script, str(seed)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    outputs = [run.communicate(timeout=240) for run in runs]
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-2000:]
        assert out.startswith("trained")
    assert 24 <= len(object_gets(s3)) <= 48
    with ArrayStore(cache_dir / "arrays") as store:
        assert len(store) == 24
        assert store.verify() == []
