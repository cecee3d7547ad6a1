"""MultiWorker and mirrored train alike, bit for bit, with `--deterministic`.

Two local `multi_worker` processes (one replica each) against `mirrored` over
two logical CPU devices, at the same global batch, on random MNIST-format
files: real files, whose multi_worker pipelines keep every other batch of one
stream (a filter: a stream of unknown length, unlike synthetic data's). At
28x28 a per-replica batch of 32 gives BatchNormalization reductions over
32 * 28 * 28 values, not a power of two, where a step traced with an unknown
batch size rounds differently from one with a known size (16x16 hides it).
"""

import json
import os
import subprocess
import sys

import helpers
import numpy as np
import tensorflow as tf

from train import sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--source=mnist",
    "--model=small_alexnet_bn",
    "--global_batch_size=64",
    "--warmup_epochs=0",
    "--train_steps=3",
    "--seed=3",
    "--deterministic",
]
TIMEOUT = 300  # Seconds; a hung collective must not hang the suite.


def _write_mnist(folder) -> None:
    """Random images and labels in MNIST's four IDX files."""
    rng = np.random.default_rng(0)
    for split, (images_name, labels_name) in sources.IDX_FILES.items():
        count = 512 if split == "train" else 200
        helpers.write_idx(folder / images_name, rng.integers(0, 256, (count, 28, 28)))
        helpers.write_idx(folder / labels_name, rng.integers(0, 10, count))


def _start(model_dir, *args: str, tf_config: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    if tf_config:
        env["TF_CONFIG"] = json.dumps(tf_config)
    command = [sys.executable, "-m", "train.main", *ARGS, f"--model_dir={model_dir}"]
    return subprocess.Popen(
        [*command, *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _weights(model_dir) -> dict[str, np.ndarray]:
    """Every numeric value of the folder's latest checkpoint, by name."""
    reader = tf.train.load_checkpoint(str(model_dir))
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if "OBJECT_GRAPH" not in name
    }


def test_multi_worker_trains_bit_identically_to_mirrored(tmp_path):
    _write_mnist(tmp_path)
    data = f"--data_dir={tmp_path}"
    workers = helpers.local_worker_addresses(2)
    processes = [
        _start(
            tmp_path / "multi_worker",
            "--strategy=multi_worker",
            data,
            tf_config={
                "cluster": {"worker": workers},
                "task": {"type": "worker", "index": index},
            },
        )
        for index in range(2)
    ]
    processes.append(
        _start(
            tmp_path / "mirrored", "--strategy=mirrored", "--num_cpu_devices=2", data
        )
    )
    for process in processes:
        output = process.communicate(timeout=TIMEOUT)[0]
        assert process.returncode == 0, output[-3000:]

    mirrored = _weights(tmp_path / "mirrored")
    multi_worker = _weights(tmp_path / "multi_worker")
    assert sorted(mirrored) == sorted(multi_worker)
    conv1 = "optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"
    assert mirrored[conv1].shape == (5, 5, 1, 16)  # The weights are compared.
    differing = [
        name
        for name, value in mirrored.items()
        if not np.array_equal(value, multi_worker[name])
    ]
    assert not differing, differing
    summaries = []
    for folder in ("mirrored", "multi_worker"):
        with open(tmp_path / folder / "summary.json", encoding="utf-8") as file:
            summaries.append(json.load(file))
    assert summaries[0]["steps"] == summaries[1]["steps"] == 3
    assert summaries[0]["train"]["loss"] == summaries[1]["train"]["loss"]
    assert summaries[0]["eval"]["examples"] == 200
    assert summaries[0]["eval"] == summaries[1]["eval"]
