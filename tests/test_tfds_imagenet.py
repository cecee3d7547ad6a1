"""TFDS `imagenet2012` for real: the TFDS builder prepares a tiny manual download
in ImageNet's own tar layout, then `train.data` reads it with 2 input pipelines.

The manual download holds Imagenette JPEGs (real ImageNet photos, 224x224):
``ILSVRC2012_img_train.tar`` of per-synset tars (``n01440764.tar`` of
``n01440764_0.JPEG``, ...) and ``ILSVRC2012_img_val.tar`` of
``ILSVRC2012_val_0000000N.JPEG``, whose labels TFDS takes from its own
``validation_labels.txt`` (line i labels the i-th name in sorted order). Each
training synset holds one photo, so a training label names its example. TFDS
writes each split as 4 files; both pipelines must read disjoint files and
together all of them. Prepared once per module in a temporary folder; skips
when Imagenette is absent.
"""

import glob
import io
import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from train import data, shared_data_dir

tfds = pytest.importorskip("tensorflow_datasets")

IMAGENETTE = os.path.join(shared_data_dir(), "imagenette2-224", "train")
NUM_TRAIN = 24  # Synsets (one photo each).
NUM_VALIDATION = 8
NUM_FILES = 4  # Per split.
LABELS_DIR = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012")


def _lines(name: str) -> list[str]:
    with open(os.path.join(LABELS_DIR, name)) as f:
        return f.read().split()


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(TFDS data dir, {train label: synset}, validation labels), prepared."""
    photos = sorted(glob.glob(os.path.join(IMAGENETTE, "*", "*.JPEG")))
    if len(photos) < NUM_TRAIN + NUM_VALIDATION:
        pytest.skip(f"Imagenette JPEGs not found under {IMAGENETTE}")
    photos = photos[:: len(photos) // (NUM_TRAIN + NUM_VALIDATION)]
    jpegs = [open(path, "rb").read() for path in photos]
    synsets = _lines("labels.txt")
    # Every 40th of the 1000 synsets: labels 0, 40, ..., 920.
    train_labels = {40 * i: synsets[40 * i] for i in range(NUM_TRAIN)}
    manual_dir = tmp_path_factory.mktemp("manual")
    with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train_tar:
        for jpeg, synset in zip(jpegs, train_labels.values(), strict=False):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as synset_tar:
                _add(synset_tar, f"{synset}_0.JPEG", jpeg)
            _add(train_tar, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val_tar:
        for number, jpeg in enumerate(jpegs[NUM_TRAIN:][:NUM_VALIDATION], start=1):
            _add(val_tar, f"ILSVRC2012_val_{number:08d}.JPEG", jpeg)
    validation_synsets = _lines("validation_labels.txt")[:NUM_VALIDATION]
    validation_labels = sorted(synsets.index(s) for s in validation_synsets)

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(manual_dir), num_shards=NUM_FILES
        )
    )
    return data_dir, train_labels, validation_labels


def _labels_by_file(data_dir: str, split: str) -> list[set[int]]:
    """The labels in each of the split's files, read straight from the records."""
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    by_file = []
    for path in builder.info.splits[split].filepaths:
        labels = set()
        for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            example = tf.train.Example.FromString(record)
            labels.update(example.features.feature["label"].int64_list.value)
        by_file.append(labels)
    return by_file


def _whole_files(labels: set[int], by_file: list[set[int]]) -> list[int]:
    """Indices of the files whose examples are all in labels; asserts that
    labels holds nothing else (a pipeline reads whole files)."""
    files = [
        index for index, file_labels in enumerate(by_file) if file_labels <= labels
    ]
    assert set().union(*(by_file[index] for index in files)) == labels
    return files


def _contexts(count: int) -> list[tf.distribute.InputContext]:
    return [
        tf.distribute.InputContext(count, pipeline, count) for pipeline in range(count)
    ]


def _input_fn(data_dir: str, split: str) -> data.InputFn:
    return data.make_input_fn(
        source="tfds",
        tfds_name="imagenet2012",
        split=split,
        data_dir=data_dir,
        global_batch_size=4,
        image_size=32,
        seed=0,
    )


def test_builder_wrote_every_example_in_several_files(prepared):
    data_dir, train_labels, _ = prepared
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    assert builder.info.splits["train"].num_examples == len(train_labels)
    assert builder.info.splits["validation"].num_examples == NUM_VALIDATION
    assert len(builder.info.splits["train"].filepaths) == NUM_FILES


def test_two_pipelines_read_disjoint_validation_files_and_all_examples(prepared):
    data_dir, _, validation_labels = prepared
    input_fn = _input_fn(data_dir, "validation")
    per_pipeline = [
        np.concatenate([labels for _, labels in input_fn(context)]).tolist()
        for context in _contexts(2)
    ]
    # Each of the 4 files holds 2 of the 8 examples: each pipeline reads 2 files.
    assert [len(labels) for labels in per_pipeline] == [4, 4]
    assert sorted(per_pipeline[0] + per_pipeline[1]) == validation_labels
    by_file = _labels_by_file(data_dir, "validation")
    files = [_whole_files(set(labels), by_file) for labels in per_pipeline]
    assert len(files[0]) == len(files[1]) == 2
    assert sorted(files[0] + files[1]) == list(range(NUM_FILES))


def test_two_training_pipelines_see_disjoint_examples_covering_all(prepared):
    data_dir, train_labels, _ = prepared
    input_fn = _input_fn(data_dir, "train")
    seen = []
    for context in _contexts(2):
        batches = list(input_fn(context).take(2 * NUM_TRAIN))  # Several passes.
        assert {tuple(images.shape) for images, _ in batches} == {(2, 32, 32, 3)}
        labels = np.concatenate([labels for _, labels in batches])
        seen.append(set(labels.tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(train_labels)
    by_file = _labels_by_file(data_dir, "train")
    files = [_whole_files(labels, by_file) for labels in seen]
    assert len(files[0]) == len(files[1]) == 2
    assert sorted(files[0] + files[1]) == list(range(NUM_FILES))
