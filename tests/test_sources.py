"""Tests of train/sources.py: the data-source facts, checked before TensorFlow."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from train import UserError, sources

IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _write_idx(path, shape: tuple[int, ...]) -> None:
    """A gzipped IDX file of unsigned bytes (magic 0, 0, 0x08, rank; sizes)."""
    header = bytes([0, 0, 0x08, len(shape)])
    header += b"".join(n.to_bytes(4, "big") for n in shape)
    with gzip.open(path, "wb") as file:
        file.write(header + bytes(int(np.prod(shape))))


@pytest.fixture
def idx_dir(tmp_path):
    """An MNIST-format folder of 12 training and 7 test images."""
    _write_idx(tmp_path / IDX_NAMES[0], (12, 28, 28))
    _write_idx(tmp_path / IDX_NAMES[1], (12,))
    _write_idx(tmp_path / IDX_NAMES[2], (7, 28, 28))
    _write_idx(tmp_path / IDX_NAMES[3], (7,))
    return tmp_path


def test_import_does_not_start_tensorflow():
    code = "import sys, train.sources; print('tensorflow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_mnist_counts_come_from_the_file_headers(idx_dir):
    facts = sources.describe("mnist", str(idx_dir))
    assert (facts.train_examples, facts.eval_examples) == (12, 7)
    assert (facts.num_classes, facts.image_size, facts.channels) == (10, 28, 1)
    assert facts.default_augmentation == "none"
    np.testing.assert_allclose(facts.mean, [0.1307 * 255])
    np.testing.assert_allclose(facts.std, [0.3081 * 255])
    assert facts.data_dir == str(idx_dir)
    fashion = sources.describe("fashion_mnist", str(idx_dir), image_size=32)
    np.testing.assert_allclose(fashion.mean, [0.2860 * 255])
    assert fashion.image_size == 32


def test_auto_finds_the_files_of_an_explicit_folder(idx_dir, tmp_path_factory):
    assert sources.describe("auto", str(idx_dir)).name == "mnist"
    records = tmp_path_factory.mktemp("records")
    (records / "validation-00000-of-00001").write_bytes(b"")
    assert sources.find_source(str(records)) == "imagenet"
    assert sources.describe("auto", str(records)).name == "imagenet"


@pytest.mark.parametrize("folder", ["empty", "mistyped"])
def test_explicit_folder_without_data_never_means_synthetic(tmp_path, folder):
    data_dir = tmp_path if folder == "empty" else tmp_path / "mnsit"
    with pytest.raises(UserError) as error:
        sources.describe("auto", str(data_dir))
    message = str(error.value)
    assert message.startswith(f"--data_dir={data_dir}: ")
    assert "\n" not in message
    if folder == "empty":  # Says what it looked for.
        assert "train-images-idx3-ubyte.gz" in message and "train-*-of-*" in message


def test_no_flag_job_without_the_default_folder_gets_mnist_shaped_synthetic(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("LARS_TF_DATA_DIR", str(tmp_path))  # No mnist/ in it.
    facts = sources.describe("auto", None)
    assert facts.name == "synthetic"
    assert (facts.image_size, facts.channels, facts.num_classes) == (28, 1, 10)
    assert (facts.train_examples, facts.eval_examples) == (60_000, 10_000)
    assert facts.data_dir is None


def test_no_flag_job_reads_the_default_mnist_folder(idx_dir, monkeypatch):
    (idx_dir.parent / "mnist").mkdir()
    for name in IDX_NAMES:
        (idx_dir / name).rename(idx_dir.parent / "mnist" / name)
    monkeypatch.setenv("LARS_TF_DATA_DIR", str(idx_dir.parent))
    assert sources.default_data_dir("mnist") == str(idx_dir.parent / "mnist")
    assert sources.describe("auto", None).train_examples == 12


def test_default_folder_present_but_empty_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "mnist").mkdir()
    monkeypatch.setenv("LARS_TF_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="mnist: no IDX files"):
        sources.describe("auto", None)


def test_explicit_synthetic_has_imagenet_sizes():
    facts = sources.describe("synthetic", None, num_classes=10)
    assert (facts.image_size, facts.channels, facts.num_classes) == (224, 3, 10)
    assert facts.train_examples == 1_281_167


def test_missing_idx_file_is_named(idx_dir):
    (idx_dir / IDX_NAMES[3]).unlink()
    with pytest.raises(UserError, match=f"missing {IDX_NAMES[3]} "):
        sources.describe("mnist", str(idx_dir))


@pytest.mark.parametrize(
    "contents, problem",
    [
        (np.random.default_rng(0).bytes(300), "unreadable"),  # Not gzip at all.
        (gzip.compress(b"\x01\x02\x08\x03" + bytes(12)), "not an IDX file"),
        (gzip.compress(b"\0\0\x08\x03\0\0"), "truncated IDX header"),
        (gzip.compress(bytes([0, 0, 0x08, 3]) + bytes(100))[:12], "unreadable"),
    ],
    ids=["random bytes", "bad magic", "short header", "gzip cut in the header"],
)
def test_garbage_idx_file_is_named(idx_dir, contents, problem):
    """Only the header is read here; train.data reads (and checks) the rest."""
    path = idx_dir / IDX_NAMES[2]
    path.write_bytes(contents)
    with pytest.raises(UserError) as error:
        sources.describe("mnist", str(idx_dir))
    assert str(error.value).startswith(f"{path}: {problem}")


def test_imagenet_counts_and_classes_from_the_converter_info(tmp_path):
    (tmp_path / "train-00000-of-00001").write_bytes(b"")
    info = {"num_classes": 3, "num_examples": {"train": 12, "validation": 5}}
    (tmp_path / sources.INFO_FILENAME).write_text(json.dumps(info))
    facts = sources.describe("imagenet", str(tmp_path))
    assert (facts.num_classes, facts.train_examples, facts.eval_examples) == (3, 12, 5)
    assert facts.label_offset == 1 and facts.default_augmentation == "minimal"
    # Offset 0 keeps 1-based labels: class 0 exists but is never used.
    assert sources.describe("imagenet", str(tmp_path), label_offset=0).num_classes == 4


def test_imagenet_without_converter_info_has_imagenet_sizes(tmp_path):
    (tmp_path / "validation-00000-of-00001").write_bytes(b"")
    facts = sources.describe("imagenet", str(tmp_path))
    assert (facts.num_classes, facts.train_examples, facts.eval_examples) == (
        1000,
        1_281_167,
        50_000,
    )


def test_unreadable_converter_info_is_named(tmp_path):
    (tmp_path / "train-00000-of-00001").write_bytes(b"")
    (tmp_path / sources.INFO_FILENAME).write_text("{not json")
    with pytest.raises(UserError, match=f"{tmp_path / sources.INFO_FILENAME}: "):
        sources.describe("imagenet", str(tmp_path))


def test_imagenet_folder_without_records_is_named(tmp_path):
    with pytest.raises(UserError, match=f"--data_dir={tmp_path}: no ImageNet"):
        sources.describe("imagenet", str(tmp_path))
    with pytest.raises(UserError, match="nowhere: no such folder"):
        sources.describe("imagenet", str(tmp_path / "nowhere"))


def test_folder_with_two_kinds_of_data_is_ambiguous(idx_dir):
    (idx_dir / "train-00000-of-00001").write_bytes(b"")
    with pytest.raises(UserError, match="both"):
        sources.find_source(str(idx_dir))


def test_names_and_defaults():
    assert sources.SOURCE_NAMES == (
        "synthetic",
        "imagenet",
        "mnist",
        "fashion_mnist",
        "tfds",
    )
    assert sources.default_data_dir("synthetic") is None
    assert sources.default_data_dir("tfds") is None
    with pytest.raises(UserError, match="--tfds_name"):
        sources.describe("tfds", None)
