"""Tests of train/data.py and train/preprocessing.py on small hand-written files."""

import gzip
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading

import helpers
import numpy as np
import pytest
import tensorflow as tf
from helpers import HEIGHT, WIDTH
from helpers import imagenet_example as _example
from helpers import smooth_image as _image
from helpers import write_records as _write

from train import UserError, data, preprocessing, sources

NUM_TRAIN_FILES = 4
PER_FILE = 6
MEAN = np.array([0.485, 0.456, 0.406], np.float64) * 255  # ImageNet statistics.
STD = np.array([0.229, 0.224, 0.225], np.float64) * 255


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    """4 train files, file k holding only label k+1 (1-based), some with boxes;
    2 validation files. Returns (dir, {filename: [(image uint8, label)]})."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    contents = {}
    for split, num_files in (("train", NUM_TRAIN_FILES), ("validation", 2)):
        for k in range(num_files):
            name = f"{split}-{k:05d}-of-{num_files:05d}"
            records, kept = [], []
            for i in range(PER_FILE):
                image = _image(rng)
                # No chroma subsampling: decode-and-crop then decodes the window
                # exactly as a full decode would (no upsampling at its edges).
                jpeg = tf.io.encode_jpeg(
                    image, quality=100, chroma_downsampling=False
                ).numpy()
                boxes = [(0.1, 0.2, 0.6, 0.7)] if i % 2 else ()
                records.append(_example(jpeg, k + 1, boxes))
                kept.append((tf.io.decode_jpeg(jpeg).numpy(), k + 1))
            _write(str(root / name), records)
            contents[name] = kept
    return str(root), contents


def _collect(dataset, max_batches=100):
    images, labels = [], []
    for image, label in dataset.take(max_batches):
        images.append(image.numpy())
        labels.append(label.numpy())
    return np.concatenate(images), np.concatenate(labels)


def _input_fn(data_dir, split="validation", **kwargs):
    config = dict(
        source="imagenet",
        split=split,
        data_dir=data_dir,
        global_batch_size=4,
        image_size=16,
        augmentation="none",
        seed=1,
        deterministic=True,
        num_classes=NUM_TRAIN_FILES,
    )
    config.update(kwargs)
    return data.make_input_fn(**config)


def test_labels_become_zero_based(imagenet_dir):
    data_dir, _ = imagenet_dir
    _, labels = _collect(_input_fn(data_dir)())
    assert labels.dtype == np.int32
    # validation-00000 holds stored label 1, validation-00001 stored label 2.
    assert sorted(labels.tolist()) == [0] * PER_FILE + [1] * PER_FILE


def test_1001_class_convention_keeps_stored_labels(imagenet_dir):
    data_dir, _ = imagenet_dir
    input_fn = _input_fn(data_dir, label_offset=0, num_classes=None)
    _, labels = _collect(input_fn())
    assert sorted(set(labels.tolist())) == [1, 2]
    info = sources.describe("imagenet", data_dir, label_offset=0)
    assert info.num_classes == 1001
    assert sources.describe("imagenet", data_dir).num_classes == 1000


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_training_batches_shape_and_dtype(imagenet_dir, dtype):
    data_dir, _ = imagenet_dir
    input_fn = _input_fn(
        data_dir, split="train", augmentation="extended", dtype=dtype, image_size=24
    )
    images, labels = next(iter(input_fn()))
    assert images.shape == (4, 24, 24, 3)
    assert images.dtype == tf.as_dtype(dtype)
    assert labels.shape == (4,) and labels.dtype == tf.int32


def test_training_repeats_and_drops_remainder(imagenet_dir):
    data_dir, _ = imagenet_dir
    input_fn = _input_fn(data_dir, split="train", global_batch_size=5)
    # 24 examples per epoch, 5 per batch: 20 batches span 4+ epochs, all full.
    sizes = [int(labels.shape[0]) for _, labels in input_fn().take(20)]
    assert sizes == [5] * 20


def test_evaluation_keeps_last_partial_batch(imagenet_dir):
    data_dir, _ = imagenet_dir
    sizes = [int(y.shape[0]) for _, y in _input_fn(data_dir, global_batch_size=5)()]
    assert sizes == [5, 5, 2]


def test_evaluation_matches_numpy_reference(imagenet_dir):
    """Center crop of 0.875 of the shorter side, bilinear resize, mean/std."""
    data_dir, contents = imagenet_dir
    images, labels = _collect(_input_fn(data_dir, global_batch_size=PER_FILE)())
    decoded = [image for image, _ in contents["validation-00000-of-00002"]]
    images = images[labels == 0]  # The first file's, in file order.
    side = int(0.875 * min(HEIGHT, WIDTH))  # 35
    top, left = (HEIGHT - side + 1) // 2, (WIDTH - side + 1) // 2
    for got, original in zip(images, decoded, strict=True):
        window = original[top : top + side, left : left + side].astype(np.float64)
        # Bilinear resize by half-pixel centers, 35 -> 16, in float64.
        centers = (np.arange(16) + 0.5) * side / 16 - 0.5
        low = np.clip(np.floor(centers).astype(int), 0, side - 1)
        high = np.clip(low + 1, 0, side - 1)
        frac = np.clip(centers - np.floor(centers), 0, 1)
        rows = (
            window[low] * (1 - frac)[:, None, None] + window[high] * frac[:, None, None]
        )
        resized = (
            rows[:, low] * (1 - frac)[None, :, None]
            + rows[:, high] * frac[None, :, None]
        )
        np.testing.assert_allclose(got, (resized - MEAN) / STD, atol=1e-3)


def test_evaluation_is_deterministic(imagenet_dir):
    data_dir, _ = imagenet_dir
    first, _ = _collect(_input_fn(data_dir, seed=None, deterministic=False)())
    second, _ = _collect(_input_fn(data_dir, seed=None, deterministic=False)())
    np.testing.assert_array_equal(np.sort(first, axis=0), np.sort(second, axis=0))


def test_fixed_seed_gives_same_order_and_augmentation(imagenet_dir):
    data_dir, _ = imagenet_dir

    def run(seed):
        input_fn = _input_fn(
            data_dir, split="train", seed=seed, augmentation="extended"
        )
        return _collect(input_fn(), max_batches=8)

    images_a, labels_a = run(3)
    images_b, labels_b = run(3)
    images_c, labels_c = run(4)
    np.testing.assert_array_equal(labels_a, labels_b)
    np.testing.assert_array_equal(images_a, images_b)
    assert not np.array_equal(images_a, images_c)


@pytest.mark.parametrize("augmentation", ["minimal", "extended"])
def test_cache_keeps_the_decoded_images_and_gives_the_same_batches(
    imagenet_dir, augmentation
):
    data_dir, _ = imagenet_dir

    def run(cache):
        input_fn = _input_fn(
            data_dir, split="train", augmentation=augmentation, cache=cache
        )
        return _collect(input_fn(), max_batches=12)  # Two epochs.

    cached, uncached = run(True), run(False)
    # The first epoch (6 batches of 4) is the uncached one; the second holds
    # every example once again, in an order of its own.
    np.testing.assert_array_equal(cached[1][:24], uncached[1][:24])
    np.testing.assert_array_equal(cached[0][:24], uncached[0][:24])
    assert sorted(cached[1][24:]) == sorted(uncached[1][:24])
    again = run(True)
    np.testing.assert_array_equal(again[0], cached[0])


def test_cache_skips_names_and_counts_an_undecodable_record_once(bad_dir, capfd):
    input_fn = _input_fn(str(bad_dir), num_classes=2, cache=True)
    dataset = input_fn()
    for _ in range(2):  # The second pass reads the cache: nothing is decoded.
        _, labels = _collect(dataset)
        np.testing.assert_array_equal(np.sort(labels), [0, 0, 0, 1, 1])
    assert input_fn.skipped_records() == 1
    name = f"{bad_dir / 'validation-00000-of-00001'} record 3"
    assert input_fn.skipped_record_names() == [name]
    assert capfd.readouterr().err.count(name) == 1


def test_input_pipelines_read_disjoint_files(imagenet_dir):
    data_dir, _ = imagenet_dir
    seen = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2,
            input_pipeline_id=pipeline_id,
            num_replicas_in_sync=2,
        )
        input_fn = _input_fn(
            data_dir, split="train", global_batch_size=8, deterministic=False
        )
        images, labels = _collect(input_fn(context), max_batches=6)
        assert images.shape[0] == 6 * 4  # Per-replica batch: 8 global / 2 replicas.
        seen.append(set(labels.tolist()))
    # File k holds only label k: pipeline 0 reads files 0 and 2, pipeline 1 1 and 3.
    assert seen == [{0, 2}, {1, 3}]


def test_deterministic_batches_do_not_depend_on_the_pipeline_count(imagenet_dir):
    """Two pipelines of one replica each get the batches that one pipeline
    feeding two replicas hands out in turn: batch k goes to replica k % 2."""
    data_dir, _ = imagenet_dir
    input_fn = _input_fn(
        data_dir, split="train", global_batch_size=8, augmentation="extended"
    )
    one_pipeline = list(input_fn(tf.distribute.InputContext(1, 0, 2)).take(8))
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(2, pipeline_id, 2)
        own = list(input_fn(context).take(4))
        for step, (images, labels) in enumerate(own):
            want_images, want_labels = one_pipeline[2 * step + pipeline_id]
            np.testing.assert_array_equal(labels.numpy(), want_labels.numpy())
            np.testing.assert_array_equal(images.numpy(), want_images.numpy())
    # And the two pipelines' batches differ (they are not the same stream twice).
    assert not np.array_equal(one_pipeline[0][0].numpy(), one_pipeline[1][0].numpy())


@pytest.mark.parametrize(
    "context",
    [None, tf.distribute.InputContext(1, 0, 2), tf.distribute.InputContext(2, 1, 2)],
    ids=["one pipeline", "two replicas", "second of two pipelines"],
)
def test_skip_batches_resumes_where_the_unskipped_stream_is(imagenet_dir, context):
    """A resumed run's pipeline gives the batches an uninterrupted one gives next,
    augmentation included (the per-example seeds are skipped with the examples)."""
    input_fn = _input_fn(
        imagenet_dir[0], split="train", global_batch_size=8, augmentation="extended"
    )
    uninterrupted = list(input_fn(context).take(7))
    resumed = list(input_fn(context, skip_batches=5).take(2))
    for (images, labels), (want_images, want_labels) in zip(
        resumed, uninterrupted[5:], strict=True
    ):
        np.testing.assert_array_equal(labels.numpy(), want_labels.numpy())
        np.testing.assert_array_equal(images.numpy(), want_images.numpy())


def test_skipped_batches_are_not_decoded(tmp_path):
    """Records skipped for a resume never reach the decoder: corrupt ones among
    them are not counted, and the batches after them are the good records."""
    rng = np.random.default_rng(2)
    truncated = tf.io.encode_jpeg(_image(rng)).numpy()[:100]
    good = [tf.io.encode_jpeg(_image(rng)).numpy() for _ in range(8)]
    records = [_example(truncated, 1)] * 8
    records += [_example(jpeg, 2 + i % 2) for i, jpeg in enumerate(good)]
    _write(str(tmp_path / "validation-00000-of-00001"), records)
    input_fn = _input_fn(str(tmp_path), split="validation")  # batch 4, in file order
    _, labels = _collect(input_fn(skip_batches=2))
    np.testing.assert_array_equal(labels, [1, 2] * 4)  # 0-based labels of `good`
    assert input_fn.skipped_records() == 0
    _collect(input_fn())
    assert input_fn.skipped_records() == 8  # The same records, decoded.


def test_fewer_files_than_pipelines_shards_examples_with_warning(imagenet_dir, caplog):
    data_dir, _ = imagenet_dir
    counts = []
    for pipeline_id in range(3):
        context = tf.distribute.InputContext(3, pipeline_id, 3)
        with caplog.at_level(logging.WARNING):
            input_fn = _input_fn(data_dir, global_batch_size=3, deterministic=False)
            _, labels = _collect(input_fn(context))
        counts.append(len(labels))
    assert "sharding by example" in caplog.text
    assert counts == [4, 4, 4]  # 12 validation examples over 3 pipelines.


def test_augmented_values_stay_in_normalized_range(imagenet_dir):
    data_dir, _ = imagenet_dir
    images, _ = _collect(
        _input_fn(data_dir, split="train", augmentation="extended")(), max_batches=10
    )
    assert np.all(images >= (0 - MEAN) / STD - 1e-4)
    assert np.all(images <= (255 - MEAN) / STD + 1e-4)


def _map_seeds(fn, count):
    """fn(seed) for seeds [i, 17], i < count, run as one graph; NumPy results."""
    seeds = tf.stack([tf.range(count), tf.fill([count], 17)], 1)
    dataset = tf.data.Dataset.from_tensor_slices(seeds).map(fn).batch(count)
    return tf.nest.map_structure(lambda t: t.numpy(), next(iter(dataset)))


def test_inception_crop_windows_stay_in_range():
    shape = tf.constant([100, 200, 3])
    y, x, h, w = _map_seeds(
        lambda seed: preprocessing.inception_crop_window(
            shape, tf.zeros([1, 0, 4]), seed, 0.875
        ),
        200,
    )
    assert np.all((y >= 0) & (y + h <= 100) & (x >= 0) & (x + w <= 200))
    areas, aspects = h * w / 20000, w / h
    fallback = (h == 87) & (w == 87)  # Center crop of 0.875 * 100.
    sampled = ~fallback
    assert sampled.sum() > 150
    assert np.all(areas[sampled] >= 0.08 - 0.01) and np.all(areas[sampled] <= 1.0)
    # Integer rounding of h and w moves the aspect ratio a little.
    assert np.all(aspects[sampled] >= 0.75 * 0.95)
    assert np.all(aspects[sampled] <= 4 / 3 * 1.05)
    # Within [3/4, 4/3] a 100x200 image allows areas up to 100*133/20000.
    assert areas[sampled].min() < 0.2 and areas[sampled].max() > 0.4


def test_inception_crop_windows_cover_the_box():
    shape = tf.constant([100, 100, 3])
    box = tf.constant([[[0.5, 0.5, 0.9, 0.9]]])  # ymin, xmin, ymax, xmax.
    y, x, h, w = _map_seeds(
        lambda seed: preprocessing.inception_crop_window(shape, box, seed, 0.875), 100
    )
    sampled = ~((h == 87) & (w == 87))  # The center-crop fallback ignores the box.
    overlap_h = np.maximum(0, np.minimum(y + h, 90) - np.maximum(y, 50))
    overlap_w = np.maximum(0, np.minimum(x + w, 90) - np.maximum(x, 50))
    assert sampled.sum() > 50
    assert np.all((overlap_h * overlap_w)[sampled] >= 0.1 * 40 * 40 - 1)


def test_minimal_crop_windows():
    shape = tf.constant([40, 56, 3])
    y, x, h, w = _map_seeds(
        lambda seed: preprocessing.minimal_crop_window(shape, seed), 50
    )
    assert np.all(h == 35) and np.all(w == 49)  # int(0.875 * side)
    assert np.all((0 <= y) & (y <= 5) & (0 <= x) & (x <= 7))
    assert len(set(zip(y, x, strict=True))) > 10


def test_color_distortion_stays_in_unit_range():
    image = tf.random.stateless_uniform([8, 8, 3], [1, 2])
    out = _map_seeds(lambda seed: preprocessing.distort_color(image, seed), 30)
    assert out.shape == (30, 8, 8, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.abs(out - image.numpy()).max() > 0.1  # It does change colours.


def test_flip_mirrors_the_image():
    # Columns increase left to right; a flip makes them decrease.
    image = tf.constant(np.tile(np.arange(8, dtype=np.uint8) * 30, (8, 1))[..., None])

    def augment(seed):
        return preprocessing.preprocess_image(
            image,
            is_encoded=False,
            image_size=8,
            training=True,
            augmentation="minimal",
            seed=seed,
            channels=1,
        )

    out = _map_seeds(augment, 40)[..., 0]
    direction = np.sign(out[:, 0, -1] - out[:, 0, 0])
    assert np.all(direction != 0)
    assert 5 < np.sum(direction < 0) < 35  # Both orientations, about half each.


@pytest.fixture
def bad_dir(tmp_path):
    rng = np.random.default_rng(1)
    good = [tf.io.encode_jpeg(_image(rng)).numpy() for _ in range(5)]
    truncated = good[0][: len(good[0]) // 3]
    records = [_example(jpeg, 1) for jpeg in good[:3]]
    records += [_example(truncated, 1)] + [_example(jpeg, 2) for jpeg in good[3:]]
    _write(str(tmp_path / "validation-00000-of-00001"), records)
    return tmp_path


def test_undecodable_record_is_skipped_counted_and_named(bad_dir, capfd):
    input_fn = _input_fn(str(bad_dir), num_classes=2)
    _, labels = _collect(input_fn())
    np.testing.assert_array_equal(np.sort(labels), [0, 0, 0, 1, 1])
    assert input_fn.skipped_records() == 1
    name = f"{bad_dir / 'validation-00000-of-00001'} record 3"
    assert input_fn.skipped_record_names() == [name]
    assert name in capfd.readouterr().err  # Printed whatever TF's log level.
    _collect(input_fn())  # A second pass: the same record, counted once.
    assert input_fn.skipped_records() == 1


def test_undecodable_records_over_the_bound_stop_the_pipeline(bad_dir):
    input_fn = _input_fn(str(bad_dir), num_classes=2, max_skipped_records=0)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        _collect(input_fn())
    assert str(data.user_error(error.value)) == (
        "more than --max_skipped_records=0 records do not decode; the last: "
        f"{bad_dir / 'validation-00000-of-00001'} record 3"
    )


def test_label_out_of_range_names_the_record(bad_dir):
    input_fn = _input_fn(str(bad_dir), num_classes=1)  # Stored label 2 is invalid.
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        _collect(input_fn())
    assert str(data.user_error(error.value)) == (
        f"label out of range: {bad_dir / 'validation-00000-of-00001'} record 4 has "
        "label 2 (allowed: 1..1, from label_offset=1 and num_classes=1)"
    )


def test_label_out_of_range_counts_no_record_as_undecodable(two_shards, capfd):
    input_fn = _input_fn(str(two_shards[0].parent), num_classes=1)  # 2 is invalid.
    iterator = iter(input_fn())
    errors = []
    for _ in range(2):  # Pulled again after the error, as a prefetch thread may.
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            for _ in range(10):
                next(iterator)
        errors.append(str(data.user_error(error.value)))
    assert errors[0].startswith(f"label out of range: {two_shards[1]} record 0 has")
    assert errors[1].startswith(f"label out of range: {two_shards[1]} record 1 has")
    assert "Skipped" not in capfd.readouterr().err  # Every image decodes.
    assert input_fn.skipped_records() == 0


def test_missing_dir_names_path_and_patterns(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match=f"^--data_dir={missing}: no such folder"):
        _input_fn(missing, split="train")
    with pytest.raises(UserError, match="no ImageNet TFRecords .train-\\*-of-\\*"):
        _input_fn(str(tmp_path))
    _write(str(tmp_path / "train-00000-of-00001"), [])
    with pytest.raises(UserError, match="no validation files matching valid"):
        _input_fn(str(tmp_path))()


def test_under_mirrored_strategy(check_scripts):
    """Per-replica batches, and the skip counter built inside strategy.scope()."""
    report = check_scripts.run("data_distributed_check.py")
    assert report["train_image_shapes"] == [[4, 16, 16, 3], [4, 16, 16, 3]]
    assert report["train_dtype"] == "float32"
    # 5 records of stored label 1 and 5 of label 2, one of those corrupt.
    assert report["eval_labels"] == [0] * 5 + [1] * 4
    assert report["eval_skipped"] == 1


def test_synthetic_batches():
    input_fn = data.make_input_fn(
        source="synthetic",
        split="train",
        data_dir=None,
        global_batch_size=8,
        image_size=32,
        dtype="bfloat16",
        num_classes=10,
        seed=0,
    )
    context = tf.distribute.InputContext(1, 0, 2)  # 2 replicas: 4 per replica.
    first, second = list(input_fn(context).take(2))
    assert first[0].shape == (4, 32, 32, 3) and first[0].dtype == tf.bfloat16
    assert first[1].dtype == tf.int32
    assert 0 <= int(tf.reduce_min(first[1])) and int(tf.reduce_max(first[1])) < 10
    # One batch made once and repeated: constant cost per step.
    np.testing.assert_array_equal(first[0].numpy(), second[0].numpy())
    assert sources.describe("synthetic", None).num_classes == 1000


# ----------------------------------------------------------------------------
# IDX (MNIST format)


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {}
    for split, (images_name, labels_name) in sources.IDX_FILES.items():
        count = 12 if split == "train" else 7
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        helpers.write_idx(tmp_path / images_name, images)
        helpers.write_idx(tmp_path / labels_name, labels)
        arrays[split] = (images, labels)
    return tmp_path, arrays


def test_read_idx_returns_stored_array(mnist_dir):
    path, arrays = mnist_dir
    images = sources.read_idx(str(path / "t10k-images-idx3-ubyte.gz"))
    np.testing.assert_array_equal(images, arrays["validation"][0])
    raw = path / "raw-labels-idx1-ubyte"  # Uncompressed files work too.
    raw.write_bytes(gzip.decompress((path / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    np.testing.assert_array_equal(sources.read_idx(str(raw)), arrays["validation"][1])


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(UserError, match=f"^{bad}: not an IDX file"):
        sources.read_idx(str(bad))
    short = tmp_path / "short-idx"
    short.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(UserError, match=f"^{short}: header says shape .5,. "):
        sources.read_idx(str(short))


def _mnist_input_fn(path, split, **kwargs):
    """The input_fn of the MNIST files in `path`, batches of 4, deterministic."""
    config = dict(
        source="mnist",
        split=split,
        data_dir=str(path),
        global_batch_size=4,
        deterministic=True,
    )
    config.update(kwargs)
    return data.make_input_fn(**config)


def test_mnist_pipeline_matches_numpy_reference(mnist_dir):
    path, arrays = mnist_dir
    input_fn = _mnist_input_fn(
        path, "validation", source="fashion_mnist", image_size=28, augmentation="none"
    )
    images, labels = _collect(input_fn())
    expected_images, expected_labels = arrays["validation"]
    mean, std = 0.2860 * 255, 0.3530 * 255
    assert images.shape == (7, 28, 28, 1)
    np.testing.assert_allclose(
        images[..., 0], (expected_images.astype(np.float64) - mean) / std, atol=1e-4
    )
    np.testing.assert_array_equal(labels, expected_labels.astype(np.int32))
    info = sources.describe("mnist", str(path))
    assert (info.num_classes, info.channels) == (10, 1)


def test_mnist_training_resizes_and_shards(mnist_dir):
    path, arrays = mnist_dir
    input_fn = _mnist_input_fn(
        path, "train", image_size=32, augmentation="minimal", seed=0
    )
    seen = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(2, pipeline_id, 2)
        images, labels = _collect(input_fn(context), max_batches=3)
        assert images.shape == (6, 32, 32, 1)
        seen.append(labels.tolist())
    # Together the two pipelines' first 3 batches are one epoch, each example once.
    train_labels = arrays["train"][1]
    assert sorted(seen[0] + seen[1]) == sorted(train_labels.tolist())


def test_missing_idx_file_is_named(mnist_dir):
    path, _ = mnist_dir
    os.remove(path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(UserError, match="missing train-labels-idx1-ubyte.gz"):
        _mnist_input_fn(path, "train", image_size=28)


# ----------------------------------------------------------------------------
# TFDS


def test_tfds_mock_data(tfds_metadata_dir):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(
        num_examples=10,
        policy=tfds.testing.MockPolicy.USE_FILES,
        data_dir=tfds_metadata_dir,
    ):
        info = sources.describe("tfds", tfds_metadata_dir, "mnist")
        input_fn = data.make_input_fn(
            source="tfds",
            tfds_name="mnist",
            split="validation",  # MNIST's is called "test".
            data_dir=tfds_metadata_dir,
            global_batch_size=4,
            image_size=32,
            augmentation="none",
        )
        images, labels = _collect(input_fn())
        train_fn = data.make_input_fn(
            source="tfds",
            tfds_name="mnist",
            split="train",
            data_dir=tfds_metadata_dir,
            global_batch_size=4,
            image_size=28,
            augmentation="extended",
            seed=0,
        )
        train_images, _ = next(iter(train_fn()))
    facts = (info.num_classes, info.train_examples, info.eval_examples, info.channels)
    assert facts == (10, 12, 5, 1)
    assert images.shape == (10, 32, 32, 1) and images.dtype == np.float32
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10
    assert train_images.shape == (4, 28, 28, 1)


def test_tfds_unprepared_dataset_is_an_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(UserError, match="not prepared.*never downloads"):
        sources.describe("tfds", str(tmp_path), "mnist")


# ----------------------------------------------------------------------------
# Damaged files: each stops the run with one line naming the file


def _good_records(count: int, label: int = 1) -> list[bytes]:
    rng = np.random.default_rng(label)
    return [_example(tf.io.encode_jpeg(_image(rng)).numpy(), label)] * count


@pytest.fixture
def two_shards(tmp_path):
    """validation-0000{0,1}-of-00002, 6 good records each (labels 1 and 2)."""
    paths = [tmp_path / f"validation-0000{k}-of-00002" for k in range(2)]
    for k, path in enumerate(paths):
        _write(str(path), _good_records(6, k + 1))
    return paths


def test_a_file_gone_during_training_stops_the_pipeline_naming_it(tmp_path):
    paths = [tmp_path / f"train-0000{k}-of-00003" for k in range(3)]
    for k, path in enumerate(paths):
        _write(str(path), _good_records(4, k + 1))
    iterator = iter(_input_fn(str(tmp_path), split="train", num_classes=3)())
    next(iterator)
    os.remove(paths[1])  # Read again in the next epoch (3 batches of 4).
    errors = []

    def read_on():
        try:
            for _ in range(30):
                next(iterator)
        except tf.errors.OpError as error:
            errors.append(error)

    reader = threading.Thread(target=read_on, daemon=True)  # A hang must not
    reader.start()  # hang the suite: the guard is far above the ~0.1 s needed.
    reader.join(timeout=120)
    assert not reader.is_alive(), "the pipeline hangs"
    assert [str(data.user_error(error)) for error in errors] == [
        f"a data file is gone: {paths[1]} (it held 4 records when the run "
        "started; put it back and resume, or train on the files left in a new "
        "--model_dir)"
    ]


# Reads a batch of the 3 files in argv[1], makes train-00001-of-00003 present
# but unopenable (argv[2]: "permissions", "socket"), reads on; prints the
# UserError the pipeline stops with.
_READ_ON = """
import json, os, socket, sys
import tensorflow as tf
from train import data
iterator = iter(data.make_input_fn(**json.loads(sys.argv[3]))())
next(iterator)
os.chdir(sys.argv[1])  # A socket's path is short.
name = "train-00001-of-00003"
if sys.argv[2] == "permissions":
    os.chmod(name, 0)
else:
    os.remove(name)
    socket.socket(socket.AF_UNIX).bind(name)
try:
    for _ in range(30):  # Reads train-00001-of-00003 again in the next epoch.
        next(iterator)
except tf.errors.OpError as error:
    print(data.user_error(error))
"""


@pytest.mark.parametrize("how", ["permissions", "socket"])
def test_a_file_that_stops_opening_stops_the_pipeline_naming_it(tmp_path, how):
    """A file there but unopenable (TensorFlow retries a failed open without
    moving on) ends the pipeline, as a file gone does: it must not hang."""
    prefix = []
    if how == "permissions" and os.geteuid() == 0:  # Root reads a mode-000 file
        if not shutil.which("setpriv"):  # unless it gives up the capabilities.
            pytest.skip("as root a mode-000 file reads; no setpriv to drop that")
        prefix = ["setpriv", "--inh-caps=-all"]
        prefix += ["--bounding-set=-dac_override,-dac_read_search"]
    paths = [tmp_path / f"train-0000{k}-of-00003" for k in range(3)]
    for k, path in enumerate(paths):
        _write(str(path), _good_records(4, k + 1))
    settings = dict(
        source="imagenet",
        split="train",
        data_dir=str(tmp_path),
        global_batch_size=4,
        image_size=16,
        augmentation="none",
        seed=1,
        deterministic=True,
        num_classes=3,
    )
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-c", _READ_ON, str(tmp_path), how]
    try:  # A hang must not hang the suite: far above the ~10 s needed.
        result = subprocess.run(
            prefix + command + [json.dumps(settings)],
            cwd=repo_root,
            env=dict(os.environ, PYTHONPATH=repo_root),
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the pipeline hangs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == (
        f"a data file cannot be opened: {paths[1]} (it held 4 records when the "
        "run started; make it readable and resume, or train on the files left "
        "in a new --model_dir)\n"
    )


def test_check_files_names_a_file_gone_or_unopenable_since_the_pipeline_read_it(
    tmp_path, monkeypatch
):
    paths = [tmp_path / f"train-0000{k}-of-00002" for k in range(2)]
    for k, path in enumerate(paths):
        _write(str(path), _good_records(4, k + 1))
    input_fn = _input_fn(str(tmp_path), split="train", num_classes=2)
    input_fn()
    input_fn.check_files()  # All there.
    os.remove(paths[0])
    with pytest.raises(UserError) as error:
        input_fn.check_files()
    assert str(error.value) == (
        f"a data file is gone: {paths[0]} (it held 4 records when the run "
        "started; put it back and resume, or train on the files left in a new "
        "--model_dir)"
    )
    monkeypatch.chdir(tmp_path)  # A socket's path is short.
    socket.socket(socket.AF_UNIX).bind(paths[0].name)  # There, but no opening.
    with pytest.raises(UserError) as error:
        input_fn.check_files()
    assert str(error.value) == (
        f"a data file cannot be opened: {paths[0]} (No such device or address; "
        "it held 4 records when the run started; make it readable and resume, "
        "or train on the files left in a new --model_dir)"
    )


def test_a_resume_without_a_training_file_is_refused(tmp_path):
    from train import config as config_lib

    for k in range(3):
        _write(str(tmp_path / f"train-0000{k}-of-00003"), _good_records(4, k + 1))
    _write(str(tmp_path / "validation-00000-of-00001"), _good_records(4))
    flags = dict(source="imagenet", data_dir=str(tmp_path), model_dir=str(tmp_path))
    record = config_lib.run_record(config_lib.make_config(**flags))
    config_lib.check_resume(config_lib.make_config(**flags), record)  # Unchanged.
    os.remove(tmp_path / "train-00001-of-00003")
    with pytest.raises(UserError) as error:
        config_lib.check_resume(config_lib.make_config(**flags), record)
    assert str(error.value).splitlines()[1:] == ["--data_dir (train files): 3 -> 2"]


def _error_of(input_fn) -> UserError:
    """The UserError of building and reading the pipeline (either may raise)."""
    try:
        _collect(input_fn())
    except UserError as error:
        return error
    except tf.errors.OpError as error:
        converted = data.user_error(error)
        assert converted is not None, error.message
        return converted
    raise AssertionError("the pipeline read damaged data without an error")


def test_truncated_shard_is_named(two_shards):
    contents = two_shards[1].read_bytes()
    two_shards[1].write_bytes(contents[: len(contents) - 100])
    error = _error_of(_input_fn(str(two_shards[0].parent), num_classes=2))
    assert str(error).startswith(f"{two_shards[1]}: truncated TFRecord file: ")
    assert "\n" not in str(error)


def test_garbage_shard_is_named(two_shards):
    two_shards[0].write_bytes(np.random.default_rng(0).bytes(5000))
    error = _error_of(_input_fn(str(two_shards[0].parent), num_classes=2))
    assert str(error) == f"{two_shards[0]}: not a TFRecord file (no valid record " + (
        "header at its start)"
    )


def test_folder_of_garbage_shards_is_named(two_shards):
    for path in two_shards:
        path.write_bytes(np.random.default_rng(1).bytes(300))
    error = _error_of(_input_fn(str(two_shards[0].parent), num_classes=2))
    assert str(error).startswith(f"{two_shards[0]}: not a TFRecord file")


def test_record_failing_its_checksum_names_the_file(two_shards):
    """A damaged byte inside a record's data passes the framing check; reading
    it fails, and the file's end check names the file."""
    contents = bytearray(two_shards[1].read_bytes())
    length = int.from_bytes(contents[:8], "little")  # All 6 records are alike.
    contents[2 * (length + 16) + 12 + length // 2] ^= 0xFF  # Record 2's data.
    two_shards[1].write_bytes(bytes(contents))
    error = _error_of(_input_fn(str(two_shards[0].parent), num_classes=2))
    assert str(error) == (
        f"corrupted TFRecord file: {two_shards[1]} (a record fails its checksum: "
        "not all of its 6 records could be read)"
    )


def test_shards_are_checked_once_per_input_fn(two_shards, monkeypatch):
    input_fn = _input_fn(str(two_shards[0].parent), num_classes=2)
    checked = []
    count_records = sources.count_records
    monkeypatch.setattr(
        sources,
        "count_records",
        lambda path: checked.append(path) or count_records(path),
    )
    _collect(input_fn())
    _collect(input_fn())  # An evaluation every epoch builds the pipeline again.
    assert checked == [str(path) for path in two_shards]


def test_garbage_mnist_file_is_named(mnist_dir):
    path, _ = mnist_dir
    (path / "t10k-images-idx3-ubyte.gz").write_bytes(
        np.random.default_rng(3).bytes(999)
    )
    with pytest.raises(UserError) as error:
        data.make_input_fn(
            source="mnist", split="validation", data_dir=str(path), global_batch_size=4
        )
    assert str(error.value).startswith(f"{path / 't10k-images-idx3-ubyte.gz'}: ")


def test_truncated_mnist_file_is_named(mnist_dir):
    path, _ = mnist_dir
    images = path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-50])  # Header intact, data cut.
    input_fn = data.make_input_fn(
        source="mnist", split="validation", data_dir=str(path), global_batch_size=4
    )
    with pytest.raises(UserError) as error:
        input_fn()
    assert str(error.value).startswith(f"{images}: unreadable (")


@pytest.mark.parametrize("folder", ["empty", "mistyped"])
def test_explicit_folder_without_data_is_named(tmp_path, folder):
    data_dir = tmp_path if folder == "empty" else tmp_path / "imagnet"
    with pytest.raises(UserError, match=f"^--data_dir={data_dir}: no "):
        data.make_input_fn(
            source="auto", split="train", data_dir=str(data_dir), global_batch_size=4
        )


def test_synthetic_stand_in_for_mnist_has_its_shape_and_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("LARS_TF_DATA_DIR", str(tmp_path))  # No MNIST there.
    stand_in = sources.describe("auto", None)
    train_fn = data.make_input_fn(source=stand_in, split="train", global_batch_size=64)
    images, labels = next(iter(train_fn()))
    assert images.shape == (64, 28, 28, 1)
    assert int(tf.reduce_max(labels)) < 10
    eval_fn = data.make_input_fn(
        source=stand_in, split="validation", global_batch_size=128
    )
    assert sum(int(y.shape[0]) for _, y in eval_fn()) == 10_000
    shares = [  # Two pipelines of one replica each: 64 per batch.
        sum(int(y.shape[0]) for _, y in eval_fn(tf.distribute.InputContext(2, i, 2)))
        for i in range(2)
    ]
    # Batch k of the stream is pipeline k % 2's: 156 batches of 64, then one of 16.
    assert shares == [78 * 64 + 16, 78 * 64]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_uint8_images_normalized_in_the_step_match_the_float_pipeline(
    imagenet_dir, split
):
    """dtype="uint8" delivers the preprocessed pixels (rounded once); `normalize`
    then gives the float pipeline's images up to that rounding."""
    data_dir, _ = imagenet_dir
    options = dict(split=split, augmentation="extended", global_batch_size=8)
    floats, labels = _collect(_input_fn(data_dir, **options)(), max_batches=3)
    uint8_fn = _input_fn(data_dir, dtype="uint8", **options)
    pixels, uint8_labels = _collect(uint8_fn(), max_batches=3)
    assert pixels.dtype == np.uint8 and pixels.shape == floats.shape
    np.testing.assert_array_equal(uint8_labels, labels)
    normalized = data.normalize(tf.constant(pixels), uint8_fn.source).numpy()
    np.testing.assert_allclose(
        normalized, (pixels.astype(np.float64) - MEAN) / STD, atol=1e-4
    )
    # Rounding to the nearest pixel value moves each value by at most 0.5 / std.
    np.testing.assert_allclose(normalized, floats, atol=0.5 / STD.min() + 1e-4)


def test_random_flip_draws_as_tf_stateless_flip():
    """The pipeline's flip mirrors exactly when TF's stateless flip does."""
    image = tf.constant(np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3))

    def both(seed):
        return (
            preprocessing.random_flip_left_right(image, seed),
            tf.image.stateless_random_flip_left_right(image, seed),
        )

    ours, tfs = _map_seeds(both, 64)
    np.testing.assert_array_equal(ours, tfs)
    mirrored = np.all(ours == image.numpy()[:, ::-1], axis=(1, 2, 3))
    unchanged = np.all(ours == image.numpy(), axis=(1, 2, 3))
    assert np.all(mirrored ^ unchanged)
    assert 10 < mirrored.sum() < 54  # Both outcomes, about half each.


def _bilinear(window: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize by half-pixel centers of an [H, W, C] window, float64."""

    def axis_taps(length):
        centers = (np.arange(size) + 0.5) * length / size - 0.5
        low = np.clip(np.floor(centers).astype(int), 0, length - 1)
        high = np.clip(low + 1, 0, length - 1)
        frac = np.clip(centers - np.floor(centers), 0, 1)
        return low, high, frac

    window = window.astype(np.float64)
    low, high, frac = axis_taps(window.shape[0])
    rows = window[low] * (1 - frac)[:, None, None] + window[high] * frac[:, None, None]
    low, high, frac = axis_taps(window.shape[1])
    return (
        rows[:, low] * (1 - frac)[None, :, None] + rows[:, high] * frac[None, :, None]
    )


def test_minimal_training_image_matches_numpy_reference():
    """A "minimal" training image is the bilinear resize of a window of 0.875 of
    each side at some position of the decoded JPEG, mirrored or not."""
    rng = np.random.default_rng(5)
    picture = _image(rng)
    jpeg = tf.io.encode_jpeg(picture, quality=100, chroma_downsampling=False)
    decoded = tf.io.decode_jpeg(jpeg).numpy()
    crop_h, crop_w = int(0.875 * HEIGHT), int(0.875 * WIDTH)  # 35, 49
    candidates = {
        (top, left, mirrored): _bilinear(
            decoded[top : top + crop_h, left : left + crop_w][
                :, :: -1 if mirrored else 1
            ],
            16,
        )
        for top in range(HEIGHT - crop_h + 1)
        for left in range(WIDTH - crop_w + 1)
        for mirrored in (False, True)
    }
    outputs = _map_seeds(
        lambda seed: preprocessing.preprocess_image(
            jpeg,
            is_encoded=True,
            image_size=16,
            training=True,
            augmentation="minimal",
            seed=seed,
        ),
        40,
    )
    found = []
    for output in outputs:
        errors = {key: np.abs(output - ref).max() for key, ref in candidates.items()}
        best = min(errors, key=errors.get)
        assert errors[best] < 1e-3, (best, errors[best])
        found.append(best)
    assert {mirrored for _, _, mirrored in found} == {False, True}
    assert len({(top, left) for top, left, _ in found}) > 10


def test_uint8_images_are_the_rounded_pixels_at_black_and_white(tmp_path):
    """dtype="uint8" gives the resized pixels rounded, 0 and 255 included: the
    pipeline casts without clipping, relying on the resize to stay in range."""
    picture = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    picture[:, WIDTH // 2 :] = 255
    picture[::3, WIDTH // 3 : 2 * WIDTH // 3] = 255  # Sharp stripes between.
    jpeg = tf.io.encode_jpeg(picture, quality=100, chroma_downsampling=False).numpy()
    _write(str(tmp_path / "validation-00000-of-00001"), [_example(jpeg, 1)] * 2)
    pixels, _ = _collect(_input_fn(str(tmp_path), dtype="uint8", num_classes=1)())
    decoded = tf.io.decode_jpeg(jpeg).numpy()
    side = int(0.875 * min(HEIGHT, WIDTH))
    top, left = (HEIGHT - side + 1) // 2, (WIDTH - side + 1) // 2
    expected = np.round(_bilinear(decoded[top : top + side, left : left + side], 16))
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 16, 16, 3)
    assert pixels.min() == 0 and pixels.max() == 255
    # float32 and float64 may round a value at .5 apart: at most 1 level.
    assert np.abs(pixels.astype(int) - expected).max() <= 1
