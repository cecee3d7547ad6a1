"""End-to-end runs of `python -m train.main`, one subprocess per strategy.

Tiny settings (16x16 images, small AlexNet, a few dozen steps). The data is
MNIST when /work/shared/data has it (`--source=auto`), else synthetic images of
MNIST's shape; the multi_worker-vs-mirrored comparison needs MNIST and skips
without it. Each process pays TensorFlow's start-up (~5-10 s), so runs are
shared between checks.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import helpers
import numpy as np
import pytest

from train import shared_data_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_DIR = os.path.join(shared_data_dir(), "mnist")
HAVE_MNIST = os.path.isfile(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz"))
TINY = [
    "--model=small_alexnet_bn",
    "--image_size=16",
    "--global_batch_size=64",
    "--warmup_epochs=0.01",  # 9 steps: 937 steps per epoch at batch 64.
    "--base_learning_rate=8",
    "--steps_per_loop=5",
    "--log_every_steps=10",
]
TIMEOUT = 300  # Seconds; a hung collective must not hang the suite.


def _env(**extra: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _command(model_dir, *args: str) -> list[str]:
    return [sys.executable, "-m", "train.main", *TINY, f"--model_dir={model_dir}"] + [
        *args
    ]


def _start(command: list[str], env: dict | None = None, **streams) -> subprocess.Popen:
    """Starts `command` in the repository root, in the background."""
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env or _env(), **streams)


def _run_cli(model_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(model_dir, *args),
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _run(model_dir, *args: str) -> tuple[dict, str]:
    """Runs the CLI to completion; returns summary.json and stdout."""
    result = _run_cli(model_dir, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(os.path.join(model_dir, "summary.json"), encoding="utf-8") as file:
        return json.load(file), result.stdout


def _assert_finite(summary: dict) -> None:
    values = [summary["train"]["loss"], summary["train"]["accuracy"]]
    values += [summary["eval"][name] for name in ("loss", "top1", "top5")]
    assert all(math.isfinite(v) for v in values), summary
    assert summary["eval"]["examples"] == 10_000  # Every validation example.


def _read_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of one event folder: name -> [(step, value)]."""
    import tensorflow as tf

    scalars: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(folder)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor))
                scalars.setdefault(value.tag, []).append((event.step, number))
    return scalars


def test_default_strategy_trains_evaluates_and_writes_results(tmp_path):
    model_dir = tmp_path / "run"
    summary, stdout = _run(
        model_dir, "--train_steps=30", "--trust_ratio_every_steps=10"
    )
    _assert_finite(summary)
    assert summary["steps"] == 30 and summary["num_replicas"] == 1
    assert "images/s" in stdout and f"Results in {model_dir}" in stdout
    # The trust-ratio monitor: measured at the start and every 10 steps,
    # written to TensorBoard, and its last Table 2 printed.
    assert "Trust ratios at step 30:" in stdout and "||w||/||∇w||" in stdout
    import tensorflow as tf

    ratio_steps = set()
    for name in os.listdir(model_dir / "trust_ratio"):
        path = os.path.join(model_dir / "trust_ratio", name)
        for event in tf.compat.v1.train.summary_iterator(path):
            if any(v.tag == "trust_ratio/ratio/conv1.w" for v in event.summary.value):
                ratio_steps.add(event.step)
    assert sorted(ratio_steps) == [0, 10, 20, 30]
    train = _read_scalars(str(model_dir / "train"))
    # After the first step (the first progress line), then every 10.
    assert [step for step, _ in train["loss"]] == [1, 10, 20, 30]
    assert train["loss"][-1][1] == pytest.approx(summary["train"]["loss"], rel=1e-6)
    assert set(train) >= {"accuracy", "learning_rate", "images_per_sec"}
    eval_scalars = _read_scalars(str(model_dir / "eval"))
    assert eval_scalars["top1"] == [(30, pytest.approx(summary["eval"]["top1"]))]

    # The reported evaluation against one recomputed in NumPy from the final
    # checkpoint, on the same preprocessed validation images: the uint8 pixels
    # the run's pipeline delivers, normalized here in float64.
    import keras
    import tensorflow as tf

    from train import data, models

    source = summary["source"]
    keras.mixed_precision.set_global_policy("float32")  # As the run's.
    model = models.build_model(
        "small_alexnet_bn", 10, 16, 1 if source == "mnist" else 3
    )
    tf.train.Checkpoint(model=model).restore(
        tf.train.latest_checkpoint(str(model_dir))
    ).expect_partial()
    input_fn = data.make_input_fn(
        source=source,
        split="validation",
        data_dir=summary["config"]["data_dir"],
        global_batch_size=1000,
        image_size=16,
        num_classes=10,
        dtype="uint8",
    )
    mean, std = np.array(summary["config"]["mean"]), np.array(summary["config"]["std"])
    logits, labels = [], []
    for pixels, batch_labels in input_fn(None):
        images = ((pixels.numpy().astype(np.float64) - mean) / std).astype(np.float32)
        logits.append(model(images, training=False).numpy().astype(np.float64))
        labels.append(batch_labels.numpy())
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    ranks = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(1)
    assert len(labels) == summary["eval"]["examples"]
    assert summary["eval"]["top1"] == pytest.approx(np.mean(ranks == 0), abs=2e-4)
    assert summary["eval"]["top5"] == pytest.approx(np.mean(ranks < 5), abs=2e-4)
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    assert summary["eval"]["loss"] == pytest.approx(loss, rel=1e-4)

    # The exported model.keras classifies raw MNIST pixels (resized to the
    # run's 16x16) as the run's evaluation did.
    if source == "mnist":
        exported = keras.saving.load_model(str(model_dir / "model.keras"))
        pixels, pixel_labels = data.load_idx_split(
            summary["config"]["data_dir"], "validation"
        )
        resized = tf.image.resize(pixels.astype("float32"), (16, 16)).numpy()
        predictions = exported.predict(resized, batch_size=1000, verbose=0).argmax(1)
        assert np.mean(predictions == pixel_labels) == pytest.approx(
            summary["eval"]["top1"], abs=2e-3
        )

    # The same command again: already finished, nothing in the folder changed.
    before = _folder_state(model_dir)
    result = _run_cli(model_dir, "--train_steps=30", "--trust_ratio_every_steps=10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already finished (30 steps)" in result.stdout
    assert _folder_state(model_dir) == before

    # Other settings in the same folder: one line per change, exit 2, nothing
    # changed.
    result = _run_cli(
        model_dir, "--train_steps=30", "--global_batch_size=32", "--optimizer=sgd"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = _our_lines(result.stderr)
    assert lines[0].startswith(f"train.main: error: --model_dir={model_dir} holds")
    assert lines[1:] == [
        "--global_batch_size: 64 -> 32",
        "--optimizer: lars -> sgd",
    ]
    assert _folder_state(model_dir) == before


def _our_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's C++ log lines (printed at start-up whatever
    TF_CPP_MIN_LOG_LEVEL says)."""
    return [
        line
        for line in stderr.splitlines()
        if not re.match(r"WARNING: All log messages before|[IWE]\d{4} ", line)
    ]


def _folder_state(folder) -> dict:
    """Every file under `folder`: its size, modification time and content hash."""
    import hashlib

    state = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                digest = hashlib.sha256(file.read()).hexdigest()
            state[path] = (os.stat(path).st_mtime_ns, digest)
    return state


def _wait_for(path: str, process: subprocess.Popen) -> None:
    """Polls until `path` exists; fails if the process ends or time runs out."""
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        assert process.poll() is None, "the run ended before its checkpoint"
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.02)


def test_one_device_run_killed_and_preempted_resumes_to_the_same_result(tmp_path):
    args = ["--strategy=one_device", "--train_steps=60", "--deterministic"]
    args += ["--checkpoint_every_steps=10"]
    # The uninterrupted reference runs meanwhile.
    reference_dir = tmp_path / "reference"
    reference_process = _start(
        _command(reference_dir, *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    model_dir = tmp_path / "interrupted"
    # 1. SIGKILL as soon as the first checkpoint is complete: the manager
    # writes its `checkpoint` state file after the checkpoint's own files.
    process = _start(
        _command(model_dir, *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for(str(model_dir / "checkpoint"), process)
    process.kill()
    assert process.wait(TIMEOUT) == -signal.SIGKILL
    assert not (model_dir / "summary.json").exists()

    # 2. Rerun; SIGTERM once it has resumed: it saves and exits with 143.
    process = _start(
        _command(model_dir, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    first_line = process.stdout.readline()
    assert "resumed at step" in first_line, first_line
    resumed_at = int(first_line.split("resumed at step ")[1].split()[0])
    assert resumed_at >= 10
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 128 + signal.SIGTERM, stdout
    saved_at = int(stdout.split("saved a checkpoint at step ")[1].split(";")[0])
    assert resumed_at < saved_at < 60
    assert (model_dir / f"ckpt-{saved_at}.index").exists()

    # 3. Rerun to the end: same metrics as the uninterrupted run.
    summary, _ = _run(model_dir, *args)
    assert summary["resumed_from_step"] == saved_at
    _, stderr = reference_process.communicate(timeout=TIMEOUT)
    assert reference_process.returncode == 0, stderr[-3000:]
    with open(reference_dir / "summary.json", encoding="utf-8") as file:
        reference = json.load(file)
    _assert_finite(reference)
    assert summary["steps"] == reference["steps"] == 60
    for part in ("train", "eval"):
        for name in ("loss", "accuracy", "top1", "top5"):
            if name in reference[part]:
                assert summary[part][name] == pytest.approx(
                    reference[part][name], rel=1e-5, abs=1e-6
                ), (part, name)


# Runs train.main with the checkpoint manager's last act of a save, the
# rename of the `checkpoint` state file, blocked for the checkpoint named in
# argv[1] until the process is killed: the new checkpoint's files are written,
# the state file still names the previous one.
_BLOCKING_MAIN = """
import runpy, sys
from tensorflow.python.checkpoint import checkpoint_management

update_state = checkpoint_management.update_checkpoint_state_internal
blocked_name = sys.argv.pop(1)

def blocking_update(*args, **kwargs):
    if kwargs["model_checkpoint_path"].endswith(blocked_name):
        print("saving " + blocked_name, flush=True)
        sys.stdin.read()  # Until SIGKILL.
    return update_state(*args, **kwargs)

checkpoint_management.update_checkpoint_state_internal = blocking_update
runpy.run_module("train.main", run_name="__main__")
"""


def test_kill_during_a_checkpoint_save_resumes_from_the_previous_one(tmp_path):
    model_dir = tmp_path / "run"
    args = ["--train_steps=15", "--checkpoint_every_steps=5", "--skip_eval"]
    command = _command(model_dir, *args)
    process = _start(
        [sys.executable, "-c", _BLOCKING_MAIN, "ckpt-10", *command[3:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in process.stdout:  # Blocks until the save of ckpt-10 is under way.
        if line.startswith("saving ckpt-10"):
            break
    process.kill()
    assert process.wait(TIMEOUT) == -signal.SIGKILL
    # The killed save's files are there; make its data half-written too.
    data_file = model_dir / "ckpt-10.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])

    summary, stdout = _run(model_dir, *args)
    assert f"resumed at step 5 from {model_dir / 'ckpt-5'}" in stdout
    assert summary["steps"] == 15 and summary["resumed_from_step"] == 5
    import tensorflow as tf

    assert tf.train.latest_checkpoint(str(model_dir)) == str(model_dir / "ckpt-15")
    reader = tf.train.load_checkpoint(str(model_dir / "ckpt-10"))  # Rewritten.
    assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == 10


def test_mirrored_and_multi_worker_agree(tmp_path):
    args = ["--train_steps=60", "--deterministic"]
    # Two local workers, one replica each, started together.
    workers = helpers.local_worker_addresses(2)
    model_dir = tmp_path / "multi_worker"
    processes = []
    for index in range(2):
        tf_config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": index},
        }
        processes.append(
            _start(
                _command(model_dir, "--strategy=multi_worker", *args),
                env=_env(TF_CONFIG=json.dumps(tf_config)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    # Meanwhile, mirrored over two logical CPU devices at the same global batch.
    mirrored, _ = _run(
        tmp_path / "mirrored", "--strategy=mirrored", "--num_cpu_devices=2", *args
    )
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    with open(model_dir / "summary.json", encoding="utf-8") as file:
        multi_worker = json.load(file)
    assert not [p for p in os.listdir(model_dir) if p.startswith("workertemp")]

    assert mirrored["num_replicas"] == multi_worker["num_replicas"] == 2
    _assert_finite(mirrored)
    _assert_finite(multi_worker)
    if not HAVE_MNIST:
        pytest.skip(f"no MNIST under {MNIST_DIR}: compared only finiteness")
    # With --deterministic both train on the same batches at every step (see
    # train/data.py) with the same kernels (train.main turns oneDNN off), and
    # the replicas' BN statistics are averaged after each loop: the two train
    # and evaluate bit for bit alike.
    assert mirrored["eval"]["top1"] > 0.5, mirrored["eval"]  # It learned.
    assert multi_worker["train"]["loss"] == mirrored["train"]["loss"]
    assert multi_worker["train"]["accuracy"] == mirrored["train"]["accuracy"]
    for key in ("loss", "top1", "top5"):
        assert multi_worker["eval"][key] == mirrored["eval"][key], key
