"""What the large-batch study needs of the app, as flags every user gets:
`--precise_bn_examples` (BatchNormalization statistics recomputed after
training) and `--holdout_fraction` (a seeded held-out part of the training set
evaluated during training, the validation split once at the end).

The data are tiny MNIST- and ImageNet-format folders whose examples can be
told apart by their pixels or labels; the expected values are computed with
NumPy from those files."""

import json
import os
import subprocess
import sys

import helpers
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import imagenet_example, write_records

from train import config, data, models, sources, trainer

NUM_TRAIN, NUM_VALIDATION = 32, 20


@pytest.fixture
def mnist_dir(tmp_path):
    """MNIST-format files: image i of the training split has pixel (0, 0) = i
    (so a batch names its examples) and a brightness of its own."""
    rng = np.random.default_rng(5)
    arrays = {}
    for split, count in (("train", NUM_TRAIN), ("validation", NUM_VALIDATION)):
        images = (
            rng.integers(0, 128, (count, 28, 28))
            + rng.integers(0, 128, count)[:, None, None]
        )
        images[:, 0, 0] = np.arange(count)
        labels = rng.integers(0, 10, count)
        images_name, labels_name = sources.IDX_FILES[split]
        helpers.write_idx(tmp_path / images_name, images)
        helpers.write_idx(tmp_path / labels_name, labels)
        arrays[split] = images.astype(np.uint8)
    return tmp_path, arrays


def _bn_first_model(num_classes, image_size, channels=3):
    """BatchNormalization on the normalized pixels, so that its statistics are
    those of the images."""
    inputs = keras.Input((image_size, image_size, channels))
    x = keras.layers.BatchNormalization(name="bn")(inputs)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setitem(
        models._BUILDERS,
        "small_alexnet_bn",
        lambda n, image_size, channels: _bn_first_model(n, image_size, channels),
    )


def _settings(data_dir, model_dir, **overrides) -> dict:
    """A few steps on the MNIST-format folder, each batch the whole training
    set (in some order): every batch's statistics are those of all of it."""
    return {
        "source": "mnist",
        "data_dir": str(data_dir),
        "global_batch_size": NUM_TRAIN,
        "train_steps": 3,
        "warmup_epochs": 0,
        "deterministic": True,
        "model_dir": str(model_dir),
        **overrides,
    }


def _expected_statistics(images: np.ndarray) -> tuple[float, float]:
    """Mean and (biased) variance of the normalized pixels, in float64."""
    mnist = sources.SOURCES["mnist"]
    normalized = (images.astype(np.float64) - mnist.mean[0]) / mnist.std[0]
    return normalized.mean(), normalized.var()


def _exported_statistics(model_dir) -> tuple[float, float]:
    exported = keras.saving.load_model(str(model_dir / trainer.MODEL_FILE))
    (bn,) = [
        layer
        for inner in exported.layers
        for layer in getattr(inner, "layers", [inner])
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    return float(bn.moving_mean.numpy()[0]), float(bn.moving_variance.numpy()[0])


@pytest.mark.parametrize("examples", [64, 0])
def test_precise_bn_sets_the_statistics_of_the_training_batches(
    tmp_path, mnist_dir, tiny_model, examples
):
    """examples=0 (the flag off) is the check that the test can fail: the
    moving averages after 3 steps at momentum 0.99 are far from them."""
    data_dir, arrays = mnist_dir
    settings = _settings(data_dir, tmp_path / "run", precise_bn_examples=examples)
    summary = trainer.run(config.make_config(**settings))
    mean, variance = _exported_statistics(tmp_path / "run")
    expected = _expected_statistics(arrays["train"])
    if not examples:
        assert abs(mean - expected[0]) > 0.1 and "eval_moving_bn" not in summary
        return
    np.testing.assert_allclose([mean, variance], expected, rtol=1e-5)
    # The evaluation before the recomputation is kept beside the one after.
    assert summary["eval_moving_bn"]["examples"] == NUM_VALIDATION
    assert summary["eval_moving_bn"]["loss"] != summary["eval"]["loss"]
    on_disk = json.loads((tmp_path / "run" / trainer.SUMMARY_FILE).read_text())
    assert on_disk["eval"] == summary["eval"]


BN_FIRST_MAIN = """
import sys
import keras
from absl import app, flags
from train import config, main, models
def build(n, image_size, channels):
    inputs = keras.Input((image_size, image_size, channels))
    x = keras.layers.BatchNormalization(name="bn")(inputs)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(n)(x))
models._BUILDERS["small_alexnet_bn"] = build
config.define_flags(flags.FLAGS)
app.run(main.main, argv=["train.main"] + sys.argv[1:], flags_parser=main.parse_flags)
"""


def test_precise_bn_under_two_replicas_gives_the_global_batch_statistics(
    tmp_path, mnist_dir
):
    """Each replica sees half of the batch; the statistics must be those of
    the whole batch (the replicas' variances alone would miss the spread of
    their means)."""
    data_dir, arrays = mnist_dir
    settings = _settings(
        data_dir,
        tmp_path / "run",
        precise_bn_examples=NUM_TRAIN,
        strategy="mirrored",
        num_cpu_devices=2,
    )
    flags = [f"--{name}={value}" for name, value in settings.items()]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", BN_FIRST_MAIN, *flags],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mean, variance = _exported_statistics(tmp_path / "run")
    np.testing.assert_allclose(
        [mean, variance], _expected_statistics(arrays["train"]), rtol=1e-5
    )


# ----------------------------------------------------------------------------
# --holdout_fraction


def _mnist_ids(input_fn, context=None, batches=None, skip_batches=0) -> list[int]:
    """Pixel (0, 0) of each example a pipeline gives: the training index."""
    dataset = input_fn(context, skip_batches=skip_batches)
    if batches is not None:
        dataset = dataset.take(batches)
    return [int(i) for images, _ in dataset for i in images.numpy()[:, 0, 0, 0]]


def _mnist_fn(data_dir, split, holdout, batch=4, deterministic=True):
    return data.make_input_fn(
        source="mnist",
        split=split,
        data_dir=str(data_dir),
        global_batch_size=batch,
        dtype="uint8",
        seed=3,
        deterministic=deterministic,
        holdout=holdout,
    )


def test_holdout_splits_the_idx_training_set_the_same_for_any_pipelines(mnist_dir):
    data_dir, _ = mnist_dir
    holdout = data.Holdout(0.25, seed=7)
    held = set(_mnist_ids(_mnist_fn(data_dir, "holdout", holdout)))
    assert len(held) == round(0.25 * NUM_TRAIN)  # Each once: one pass.
    assert len(_mnist_ids(_mnist_fn(data_dir, "holdout", holdout))) == len(held)
    expected = np.random.default_rng(7).permutation(NUM_TRAIN)[: len(held)]
    assert held == set(expected.tolist())
    # Three epochs of the training stream see every kept example, never a
    # held-out one, under one pipeline and under two (each its share).
    kept = set(range(NUM_TRAIN)) - held
    trained = set(_mnist_ids(_mnist_fn(data_dir, "train", holdout), batches=18))
    assert trained == kept
    for deterministic in (True, False):
        train_fn = _mnist_fn(data_dir, "train", holdout, deterministic=deterministic)
        holdout_fn = _mnist_fn(data_dir, "holdout", holdout, 2, deterministic)
        seen, held_seen = set(), []
        for pipeline in (0, 1):
            context = tf.distribute.InputContext(2, pipeline, 2)
            seen |= set(_mnist_ids(train_fn, context, batches=40))
            held_seen += _mnist_ids(holdout_fn, context)
        assert seen == kept and sorted(held_seen) == sorted(held)


def test_holdout_keeps_exact_resume(mnist_dir):
    data_dir, _ = mnist_dir
    train_fn = _mnist_fn(data_dir, "train", data.Holdout(0.25, seed=7))
    whole = _mnist_ids(train_fn, batches=9)
    assert _mnist_ids(train_fn, batches=5, skip_batches=4) == whole[16:]


def test_holdout_splits_tfrecords_by_position_in_the_sorted_files(tmp_path):
    """Three files of 5, 4 and 6 records, written out of name order; record k
    over the files in name order has label k + 1."""
    jpeg = tf.io.encode_jpeg(tf.zeros([8, 8, 3], tf.uint8)).numpy()
    sizes = {"train-00002-of-00003": 6, "train-00000-of-00003": 5}
    sizes["train-00001-of-00003"] = 4
    first = {"train-00000-of-00003": 0, "train-00001-of-00003": 5}
    first["train-00002-of-00003"] = 9
    for name, size in sizes.items():
        labels = range(first[name] + 1, first[name] + size + 1)
        write_records(str(tmp_path / name), [imagenet_example(jpeg, k) for k in labels])
    write_records(
        str(tmp_path / "validation-00000-of-00001"), [imagenet_example(jpeg, 1)]
    )
    holdout = data.Holdout(0.4, seed=11)

    def labels(split, context=None, batches=None):
        input_fn = data.make_input_fn(
            source="imagenet",
            split=split,
            data_dir=str(tmp_path),
            global_batch_size=2,
            image_size=8,
            num_classes=20,
            seed=3,
            holdout=holdout,
        )
        dataset = input_fn(context)
        if batches:
            dataset = dataset.take(batches)
        return [int(label) for _, batch in dataset for label in batch.numpy()]

    held = labels("holdout")
    assert len(held) == len(set(held)) == round(0.4 * 15)
    expected = np.random.default_rng(11).permutation(15)[:6]
    assert set(held) == set(expected.tolist())  # Labels are positions here.
    kept = set(range(15)) - set(held)
    assert set(labels("train", batches=30)) == kept
    # Two pipelines, each reading its own files.
    seen, held_seen = set(), []
    for pipeline in (0, 1):
        context = tf.distribute.InputContext(2, pipeline, 2)
        seen |= set(labels("train", context, batches=30))
        held_seen += labels("holdout", context)
    assert seen == kept and sorted(held_seen) == sorted(held)


def test_holdout_run_tunes_on_the_holdout_and_reports_both(
    tmp_path, mnist_dir, tiny_model, capsys
):
    data_dir, _ = mnist_dir
    settings = _settings(
        data_dir,
        tmp_path / "run",
        global_batch_size=8,
        train_steps=6,
        epochs_between_evals=1,
        holdout_fraction=0.25,
        precise_bn_examples=8,
    )
    summary = trainer.run(config.make_config(**settings))
    assert summary["steps_per_epoch"] == (NUM_TRAIN - 8) // 8
    assert summary["holdout"]["examples"] == 8
    assert summary["eval"]["examples"] == NUM_VALIDATION
    assert summary["holdout_moving_bn"]["examples"] == 8
    assert summary["eval_moving_bn"]["examples"] == NUM_VALIDATION
    assert summary["holdout"]["loss"] != summary["eval"]["loss"]
    assert set(summary["skipped_records"]) == {"train", "validation", "holdout"}
    # An evaluation per epoch of 3 steps; the last one is the moving averages'.
    assert [entry["step"] for entry in summary["history"]] == [3, 6]
    assert summary["history"][-1]["holdout"] == summary["holdout_moving_bn"]
    assert all(entry["train"]["loss"] > 0 for entry in summary["history"])
    assert os.listdir(tmp_path / "run" / "holdout")  # Its TensorBoard scalars.
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("Held out 8 of the 32 training ") for line in lines)
    assert "0 (validation), 0 (holdout). Results in" in lines[-1]
    # Both are settings of what the run computes: a resume may not change them.
    for changed in (dict(holdout_fraction=0.125), dict(precise_bn_examples=16)):
        with pytest.raises(config.UserError, match="--model_dir=.* other settings"):
            trainer.run(config.make_config(**{**settings, **changed}))


def test_a_resumed_holdout_run_ends_as_an_uninterrupted_one(
    tmp_path, mnist_dir, tiny_model
):
    """--lr_schedule=step lets a resume extend a run: 3 steps, then on to 6,
    against 6 in one go (the held-out filter runs before the resume's skip)."""
    data_dir, _ = mnist_dir
    settings = dict(
        global_batch_size=8,
        holdout_fraction=0.25,
        lr_schedule="step",
        skip_eval=True,
        checkpoint_every_steps=3,
    )
    whole = _settings(data_dir, tmp_path / "whole", train_steps=6, **settings)
    trainer.run(config.make_config(**whole))
    for steps in (3, 6):
        resumed = _settings(data_dir, tmp_path / "resumed", train_steps=steps)
        summary = trainer.run(config.make_config(**{**resumed, **settings}))
    assert summary["resumed_from_step"] == 3
    weights = [
        keras.saving.load_model(str(tmp_path / run / trainer.MODEL_FILE)).get_weights()
        for run in ("whole", "resumed")
    ]
    for whole_weight, resumed_weight in zip(*weights, strict=True):
        np.testing.assert_array_equal(whole_weight, resumed_weight)


def test_a_resumed_runs_history_keeps_the_evaluations_before_its_start(tmp_path):
    from train import summary as summary_lib

    run = config.make_config(
        source="synthetic",
        train_steps=9,
        warmup_epochs=0,
        model_dir=str(tmp_path / "run"),
    )
    previous = {
        "segments": [],
        "history": [{"step": 3, "eval": {"top1": 0.1}}, {"step": 6, "eval": {}}],
    }
    progress = summary_lib.Progress(start_step=3, last_saved=3, wall_start=0.0)
    progress.history = [{"step": 6, "eval": {"top1": 0.3}}]
    segment = {"nonfinite_steps": 0, "wall_time_sec": 1.0, "images_per_sec": None}
    contents = summary_lib.summary(run, 1, progress, segment, previous)
    assert contents["history"] == [
        {"step": 3, "eval": {"top1": 0.1}},
        {"step": 6, "eval": {"top1": 0.3}},
    ]
