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
import signal
import socket
import subprocess
import sys
import time

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


def _run(model_dir, *args: str, env: dict | None = None) -> tuple[dict, str]:
    """Runs the CLI to completion; returns summary.json and stdout."""
    result = subprocess.run(
        _command(model_dir, *args),
        cwd=REPO_ROOT,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
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
    assert [step for step, _ in train["loss"]] == [10, 20, 30]
    assert train["loss"][-1][1] == pytest.approx(summary["train"]["loss"], rel=1e-6)
    assert set(train) >= {"accuracy", "learning_rate", "images_per_sec"}
    eval_scalars = _read_scalars(str(model_dir / "eval"))
    assert eval_scalars["top1"] == [(30, pytest.approx(summary["eval"]["top1"]))]

    # The reported evaluation against one recomputed in NumPy from the final
    # checkpoint, on the same preprocessed validation images.
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
        data_dir=summary["flags"]["data_dir"],
        global_batch_size=1000,
        image_size=16,
        num_classes=10,
    )
    logits, labels = [], []
    for images, batch_labels in input_fn(None):
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
    reference_process = subprocess.Popen(
        _command(reference_dir, *args),
        cwd=REPO_ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    model_dir = tmp_path / "interrupted"
    # 1. SIGKILL as soon as the first checkpoint is complete: the manager
    # writes its `checkpoint` state file after the checkpoint's own files.
    process = subprocess.Popen(
        _command(model_dir, *args),
        cwd=REPO_ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for(str(model_dir / "checkpoint"), process)
    process.kill()
    assert process.wait(TIMEOUT) == -signal.SIGKILL
    assert not (model_dir / "summary.json").exists()

    # 2. Rerun; SIGTERM once it has resumed: it saves and exits with 143.
    process = subprocess.Popen(
        _command(model_dir, *args),
        cwd=REPO_ROOT,
        env=_env(),
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


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_mirrored_and_multi_worker_agree(tmp_path):
    args = ["--train_steps=60", "--deterministic"]
    # Two local workers, one replica each, started together.
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    model_dir = tmp_path / "multi_worker"
    processes = []
    for index in range(2):
        tf_config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": index},
        }
        processes.append(
            subprocess.Popen(
                _command(model_dir, "--strategy=multi_worker", *args),
                cwd=REPO_ROOT,
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
    # train/data.py): the training figures agree to float precision.
    assert mirrored["eval"]["top1"] > 0.5, mirrored["eval"]  # It learned.
    for key in ("loss", "accuracy"):
        want = mirrored["train"][key]
        assert multi_worker["train"][key] == pytest.approx(want, rel=1e-5), key
    # Evaluation agrees to one example in 10,000 and 0.2% of the loss; seen:
    # top-1 0.8704 vs 0.8705, loss 0.4118 vs 0.4123 (not yet explained; each
    # worker evaluates its own shard in other batch shapes).
    for key in ("top1", "top5"):
        want = mirrored["eval"][key]
        assert multi_worker["eval"][key] == pytest.approx(want, abs=3e-4), key
    assert multi_worker["eval"]["loss"] == pytest.approx(
        mirrored["eval"]["loss"], rel=3e-3
    )
