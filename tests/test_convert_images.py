"""Tests of train/convert_images.py, and the converter + pipeline on real photos."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from train import convert_images, data, shared_data_dir, sources

CLASSES = ("n01440764", "n02102040", "n03000684")  # Sorted synset folder names.
PER_CLASS = 4


def _read_records(pattern: str) -> list[dict]:
    """Every record of the matching files, parsed with tf.train.Example."""
    examples = []
    for path in sorted(tf.io.gfile.glob(pattern)):
        for record in tf.data.TFRecordDataset(path):
            example = tf.train.Example.FromString(record.numpy())
            features = example.features.feature
            examples.append(
                {
                    "file": os.path.basename(path),
                    "label": features["image/class/label"].int64_list.value[0],
                    "text": features["image/class/text"].bytes_list.value[0].decode(),
                    "name": features["image/filename"].bytes_list.value[0].decode(),
                    "jpeg": features["image/encoded"].bytes_list.value[0],
                    "xmin": list(features["image/object/bbox/xmin"].float_list.value),
                    "ymax": list(features["image/object/bbox/ymax"].float_list.value),
                }
            )
    return examples


@pytest.fixture
def image_folders(tmp_path):
    """train/<synset>/*.JPEG with one greyscale JPEG and one PNG; val/ likewise."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for class_index, name in enumerate(CLASSES):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(PER_CLASS):
                image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
                stem = f"{name}_{split}_{i}"
                if class_index == 0 and i == 0:  # Greyscale JPEG.
                    encoded = tf.io.encode_jpeg(image[..., :1]).numpy()
                    (folder / f"{stem}.JPEG").write_bytes(encoded)
                elif class_index == 1 and i == 0:
                    (folder / f"{stem}.png").write_bytes(
                        tf.io.encode_png(image).numpy()
                    )
                else:
                    encoded = tf.io.encode_jpeg(image).numpy()
                    (folder / f"{stem}.JPEG").write_bytes(encoded)
            (folder / "notes.txt").write_text("not an image")
    return tmp_path


def test_dense_labels_layout_and_rgb(image_folders, tmp_path):
    output = tmp_path / "records"
    info = convert_images.convert(
        str(output),
        train_dir=str(image_folders / "train"),
        validation_dir=str(image_folders / "val"),
        train_shards=3,
        validation_shards=2,
    )
    names = sorted(os.listdir(output))
    assert names == [
        "dataset_info.json",
        "train-00000-of-00003",
        "train-00001-of-00003",
        "train-00002-of-00003",
        "validation-00000-of-00002",
        "validation-00001-of-00002",
    ]
    assert info["num_examples"] == {"train": 12, "validation": 12}
    assert info["num_classes"] == 3
    examples = _read_records(str(output / "train-*"))
    assert len(examples) == 3 * PER_CLASS
    for example in examples:
        # Dense labels: 1-based position of the folder among the sorted folders.
        assert example["label"] == CLASSES.index(example["text"]) + 1
        assert example["name"].startswith(example["text"])
        assert tf.io.is_jpeg(example["jpeg"])  # The PNG was re-encoded too.
        assert tf.io.decode_jpeg(example["jpeg"]).shape == (12, 16, 3)  # RGB.
        assert example["xmin"] == []
    # Shuffled before sharding: the first shard mixes classes.
    first_shard = {e["label"] for e in examples if e["file"].startswith("train-00000")}
    assert len(first_shard) > 1
    stored = json.loads((output / sources.INFO_FILENAME).read_text())
    facts = sources.describe("imagenet", str(output))
    assert (
        facts.num_classes,
        facts.train_examples,
        facts.eval_examples,
        facts.channels,
    ) == (3, 12, 12, 3)
    assert stored["classes"] == {name: i + 1 for i, name in enumerate(CLASSES)}


def test_rgb_jpeg_bytes_are_kept(image_folders, tmp_path):
    convert_images.convert(
        str(tmp_path / "out"), train_dir=str(image_folders / "train")
    )
    by_name = {e["name"]: e for e in _read_records(str(tmp_path / "out" / "train-*"))}
    original = image_folders / "train" / CLASSES[2] / f"{CLASSES[2]}_train_1.JPEG"
    assert by_name[original.name]["jpeg"] == original.read_bytes()


def test_shorter_side_resizes_every_image_keeping_its_colour(tmp_path):
    # Flat colours survive an antialiased resize and JPEG exactly enough to
    # name the image; 24x40 -> shorter side 6 is 6x10.
    colours = {"a": (200, 30, 90), "b": (20, 180, 240)}
    for name, colour in colours.items():
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        image = np.broadcast_to(np.array(colour, np.uint8), (24, 40, 3))
        encoded = tf.io.encode_png(np.ascontiguousarray(image)).numpy()
        (folder / f"{name}.png").write_bytes(encoded)
    convert_images.convert(
        str(tmp_path / "out"), train_dir=str(tmp_path / "images"), shorter_side=6
    )
    for example in _read_records(str(tmp_path / "out" / "train-*")):
        image = tf.io.decode_jpeg(example["jpeg"]).numpy()
        assert image.shape == (6, 10, 3)
        colour = colours[example["text"]]
        np.testing.assert_allclose(image.mean(axis=(0, 1)), colour, atol=3)


def test_imagenet_labels_from_synset_list(image_folders, tmp_path):
    synsets = tmp_path / "synsets.txt"
    # A made-up sorted list: the class folders sit at positions 2, 5 and 7.
    listed = ["n00000001", "n01440764", "n01500000", "n01600000", "n02102040"]
    listed += ["n02200000", "n03000684", "n04000000"]
    synsets.write_text("\n".join(listed) + "\n")
    info = convert_images.convert(
        str(tmp_path / "out"),
        validation_dir=str(image_folders / "val"),
        label_mode="imagenet",
        synsets_file=str(synsets),
        validation_shards=1,
    )
    labels = {e["text"]: e["label"] for e in _read_records(str(tmp_path / "out/v*"))}
    assert labels == {"n01440764": 2, "n02102040": 5, "n03000684": 7}
    assert info["num_classes"] == 8


def test_builtin_synset_list_gives_standard_labels(image_folders, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    info = convert_images.convert(
        str(tmp_path / "out"),
        validation_dir=str(image_folders / "val"),
        label_mode="imagenet",
        validation_shards=1,
    )
    # Standard ImageNet labels (1-based): tench 1, English springer 218,
    # chain saw 492.
    assert info["classes"] == {"n01440764": 1, "n02102040": 218, "n03000684": 492}
    assert info["num_classes"] == 1000


def test_unknown_synset_is_an_error(image_folders, tmp_path):
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n01440764\n")
    with pytest.raises(ValueError, match="n02102040.*labels=dense"):
        convert_images.convert(
            str(tmp_path / "out"),
            train_dir=str(image_folders / "train"),
            label_mode="imagenet",
            synsets_file=str(synsets),
        )


def test_bounding_boxes_from_csv(image_folders, tmp_path):
    boxes = tmp_path / "boxes.csv"
    name = f"{CLASSES[1]}_train_2.JPEG"
    boxes.write_text(f"{name},0.1,0.2,0.5,0.6\n{name},0.3,0.0,0.9,1.0\n")
    convert_images.convert(
        str(tmp_path / "out"),
        train_dir=str(image_folders / "train"),
        bbox_csv=str(boxes),
        train_shards=1,
    )
    by_name = {e["name"]: e for e in _read_records(str(tmp_path / "out" / "train-*"))}
    np.testing.assert_allclose(by_name[name]["xmin"], [0.1, 0.3])
    np.testing.assert_allclose(by_name[name]["ymax"], [0.6, 1.0])
    assert by_name[f"{CLASSES[1]}_train_1.JPEG"]["xmin"] == []


def test_missing_input_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert_images.convert(
            str(tmp_path / "out"), train_dir=str(tmp_path / "nowhere")
        )


IMAGENETTE = os.path.join(shared_data_dir(), "imagenette2-224")


@pytest.mark.skipif(
    not os.path.isdir(IMAGENETTE),
    reason=f"Imagenette not found at {IMAGENETTE} (set LARS_TF_DATA_DIR)",
)
def test_imagenette_subset_through_the_full_pipeline(tmp_path):
    """20 real photos of each of 3 classes, converted, then trained/evaluated on."""
    classes = ["n01440764", "n02102040", "n02979186"]
    info = convert_images.convert(
        str(tmp_path),
        train_dir=os.path.join(IMAGENETTE, "train"),
        validation_dir=os.path.join(IMAGENETTE, "val"),
        label_mode="imagenet",
        train_shards=4,
        validation_shards=2,
        max_per_class=20,
        classes=classes,
    )
    assert info["num_examples"] == {"train": 60, "validation": 60}
    common = dict(source="imagenet", data_dir=str(tmp_path), global_batch_size=16)
    train_fn = data.make_input_fn(
        split="train", image_size=64, augmentation="extended", seed=0, **common
    )
    images, labels = next(iter(train_fn()))
    assert images.shape == (16, 64, 64, 3) and images.dtype == tf.float32
    # Standard 0-based ImageNet labels: tench 0, springer 217, cassette 482.
    assert set(labels.numpy().tolist()) <= {0, 217, 482}
    eval_fn = data.make_input_fn(
        split="validation", image_size=128, augmentation="none", **common
    )
    eval_labels = np.concatenate([y.numpy() for _, y in eval_fn()])
    assert sorted(eval_labels.tolist()) == [0] * 20 + [217] * 20 + [482] * 20
    assert eval_fn.skipped_records() == 0
