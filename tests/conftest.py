"""Shared pytest setup: quiet TensorFlow's C++ logging before it is imported;
fixtures more than one test file uses."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def tfds_metadata_dir(tmp_path):
    """TFDS metadata of a prepared 'mnist' (train 2 files, test 1), no data."""
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder("mnist", data_dir=str(tmp_path))
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(name="train", shard_lengths=[6, 6], num_bytes=0),
                tfds.core.SplitInfo(name="test", shard_lengths=[5], num_bytes=0),
            ]
        )
    )
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    return str(tmp_path)
