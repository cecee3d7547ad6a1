"""tf.data service on 127.0.0.1: `python -m train.data_service` processes started
by the test (a dispatcher and two workers), read through `distribute`.

Each worker runs in its own folder holding a file with its number; datasets
read that file by a relative path, so every element says which worker made it.
The processes start once for the module (TensorFlow's start-up, ~5-10 s each,
runs in parallel) and are stopped with SIGTERM at the end.
"""

import collections
import json
import os
import selectors
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from train import FlagError, convert_images, data, data_service, sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds for a process to print its ready line: ~10 s alone (TensorFlow's
# import), minutes on a machine loaded many times over.
START_TIMEOUT = 300
WORKER_TIMEOUT = 90  # A worker past this is replaced (see `cluster`).
NUM_EXAMPLES = 24  # Labels 1..24: one class per example, so labels name them.


def _start(args: list[str], cwd: str) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO_ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "train.data_service", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_line(
    process: subprocess.Popen, prefix: str, timeout: float = START_TIMEOUT
) -> str:
    """The process's first output line starting with prefix (it is up then)."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    seen = []
    while True:
        if not selector.select(timeout=timeout):
            raise TimeoutError(f"no {prefix!r} line in {timeout} s: {seen}")
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"process ended before {prefix!r}: {seen}")
        if line.startswith(prefix):
            return line
        seen.append(line)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(dispatcher address, worker processes); stopped after the module."""
    # Port 0: the dispatcher binds a free port itself (no race with other
    # programs) and names it in its ready line.
    dispatcher = _start(["--port=0"], REPO_ROOT)
    processes = [dispatcher]
    try:
        # Workers start once it listens: one that finds no dispatcher retries
        # only after a back-off.
        line = _wait_for_line(dispatcher, "tf.data service dispatcher at")
        port = int(line.strip().rpartition(":")[2])
        workers = []
        for number in range(2):
            folder = tmp_path_factory.mktemp(f"worker{number}")
            (folder / "worker_id.txt").write_text(str(number))
            # Seen here about once in ten suite runs: a worker stays at
            # "registering" for minutes (TF's registration back-off), though
            # the dispatcher is up. A fresh worker process registers at once,
            # so a worker not ready in WORKER_TIMEOUT is replaced (3 tries).
            for attempt in range(3):
                worker = _start(
                    ["--port=0", f"--dispatcher=127.0.0.1:{port}"], str(folder)
                )
                processes.append(worker)
                try:
                    _wait_for_line(worker, "tf.data service worker at", WORKER_TIMEOUT)
                    break
                except TimeoutError:
                    if attempt == 2:
                        raise
                    worker.kill()
            workers.append(worker)
        yield f"grpc://127.0.0.1:{port}", workers
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait(timeout=60)
            process.stdout.close()


def _worker_of_element(value):
    """(value, number of the worker that made this element)."""
    worker = tf.strings.to_number(tf.io.read_file("worker_id.txt"), tf.int32)
    return value, worker


def test_every_example_once_per_epoch_over_both_workers(cluster):
    address, _ = cluster
    epochs, count = 2, 200
    ids = tf.data.Dataset.range(count).repeat(epochs).map(_worker_of_element)
    ids = data_service.distribute(ids, address, job_name="ids")
    seen = collections.Counter()
    workers = set()
    for value, worker in ids.as_numpy_iterator():
        seen[int(value)] += 1
        workers.add(int(worker))
    assert seen == {i: epochs for i in range(count)}
    # Both registered before the job began, so the dispatcher handed each of
    # them a task; each asks for the next split as it finishes one.
    assert workers == {0, 1}


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    """4 train and 4 validation files of NUM_EXAMPLES 32x32 JPEGs, labels 1..N."""
    folder = tmp_path_factory.mktemp("records")
    rng = np.random.default_rng(0)
    for split in sources.SPLITS:
        for shard in range(4):
            name = f"{split}-{shard:05d}-of-00004"
            with tf.io.TFRecordWriter(str(folder / name)) as writer:
                for label in range(shard + 1, NUM_EXAMPLES + 1, 4):
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    jpeg = tf.io.encode_jpeg(pixels).numpy()
                    example = convert_images.make_example(
                        jpeg, label, f"c{label}", f"{label}.jpg", 32, 32
                    )
                    writer.write(example.SerializeToString())
    return str(folder)


def _input_fn(records_dir, split):
    return data.make_input_fn(
        source="imagenet",
        split=split,
        data_dir=records_dir,
        global_batch_size=8,
        image_size=16,
        num_classes=NUM_EXAMPLES,
        seed=0,
    )


def test_evaluation_pipeline_reads_every_example_once(records_dir, cluster):
    address, _ = cluster
    batches = data_service.distribute(
        _input_fn(records_dir, "validation")(), address, job_name="eval"
    )
    labels = np.concatenate([labels for _, labels in batches.as_numpy_iterator()])
    assert sorted(labels) == list(range(NUM_EXAMPLES))


def test_short_training_run_reads_through_the_service(records_dir, cluster):
    address, _ = cluster
    batches = data_service.distribute(
        _input_fn(records_dir, "train")(), address, job_name="train"
    )
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Flatten(),
            keras.layers.Dense(NUM_EXAMPLES),
        ]
    )
    model.compile(
        "sgd",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(batches, epochs=1, steps_per_epoch=3, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_training_app_reads_its_batches_through_the_service(
    records_dir, cluster, tmp_path
):
    address, _ = cluster
    model_dir = tmp_path / "model"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.main",
            "--source=imagenet",
            f"--data_dir={records_dir}",
            f"--num_classes={NUM_EXAMPLES}",
            "--image_size=16",
            "--global_batch_size=8",
            "--train_steps=2",
            "--warmup_epochs=0",
            "--skip_eval",
            f"--data_service={address}",
            f"--model_dir={model_dir}",
        ],
        cwd=REPO_ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    host_port = address.removeprefix("grpc://")
    assert f"Training batches from the tf.data service at {host_port}" in (
        result.stdout
    )
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["config"]["data_service"] == host_port
    assert np.isfinite(summary["train"]["loss"])


def test_workers_stop_cleanly_on_sigterm(cluster):
    _, workers = cluster
    for worker in workers:
        worker.terminate()
    assert [worker.wait(timeout=60) for worker in workers] == [0, 0]


@pytest.mark.parametrize(
    "args, flag",
    [
        ([], "--port"),
        (["--port=70000"], "--port"),
        (["--port=0", "--dispatcher=nohost"], "--dispatcher"),
        (["--port=0", "--worker_address=h:1"], "--worker_address"),
    ],
)
def test_bad_flags_give_one_line_and_status_2(args, flag):
    result = subprocess.run(
        [sys.executable, "-m", "train.data_service", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train.data_service: error: {flag}")


def test_parse_address_accepts_host_port_and_names_the_flag_otherwise():
    assert data_service.parse_address("data_service", "grpc://h1:5050") == "h1:5050"
    assert data_service.parse_address("data_service", "10.0.0.2:80") == "10.0.0.2:80"
    for bad in ("h1", "h1:", ":5050", "h1:port", "h1:0", "h1:65536"):
        with pytest.raises(FlagError, match="^--data_service: must be HOST:PORT"):
            data_service.parse_address("data_service", bad)
