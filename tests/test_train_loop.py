"""The training loop (train/trainer.py), in-process on the default strategy:
Keras callbacks and checkpoints, the exported model.keras, and the guard that
skips non-finite steps.

Non-finite steps are injected through the data: the training batches at the
chosen steps get NaN images (so their loss, gradients and the forward pass's
BatchNormalization statistics are NaN), the rest are the real stream.
"""

import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from train import RunError, config, trainer

TINY = {
    "source": "synthetic",
    "num_classes": 10,
    "image_size": 16,
    "global_batch_size": 32,
    "warmup_epochs": 0,
}


def _config(tmp_path, **settings) -> config.Config:
    """The config of a TINY run with `settings`, writing to `tmp_path`."""
    return config.make_config(**{**TINY, **settings}, model_dir=str(tmp_path))


class _Recorder(keras.callbacks.Callback):
    """Records the calls, and after each loop the model's and optimizer's state."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.states = {}  # Step -> (model weights, optimizer variables).
        self.iterations = {}  # Step -> the optimizer's iteration count.

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin", None, None))

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("batch_end", batch, dict(logs)))
        self.states[batch + 1] = (
            [v.numpy().copy() for v in self.model.weights],
            [v.numpy().copy() for v in self.model.optimizer.variables],
        )
        self.iterations[batch + 1] = int(self.model.optimizer.iterations.numpy())

    def on_train_end(self, logs=None):
        self.calls.append(("train_end", None, dict(logs)))


def test_loop_drives_keras_callbacks_checkpoints_and_exports_the_model(tmp_path):
    """With the XLA-compiled step."""
    # Batch 500: evaluating the 50,000 synthetic images takes 100 batches.
    c = _config(
        tmp_path,
        global_batch_size=500,
        train_steps=10,
        steps_per_loop=5,
        jit_compile=True,
    )
    recorder = _Recorder()
    summary = trainer.run(c, callbacks=[recorder])
    kinds = [kind for kind, _, _ in recorder.calls]
    assert kinds == ["train_begin"] + ["batch_end"] * 3 + ["train_end"]
    # The first loop is one step (an early progress line), then up to 5.
    batches = [batch for kind, batch, _ in recorder.calls if kind == "batch_end"]
    assert batches == [0, 5, 9]
    for _, _, logs in recorder.calls[1:4]:
        assert set(logs) == {"loss", "accuracy", "learning_rate", "images_per_sec"}
        assert math.isfinite(logs["loss"]) and 0 <= logs["accuracy"] <= 1
    assert recorder.calls[-1][2]["top1"] == summary["eval"]["top1"]
    assert recorder.calls[3][2]["learning_rate"] == 0.0  # Poly decay ends at 0.
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-10")
    assert summary["nonfinite_steps"] == 0 and len(summary["segments"]) == 1

    # model.keras takes pixels (0-255 units) and gives the trained logits: the
    # same as the final checkpoint's model on the normalized images.
    exported = keras.saving.load_model(str(tmp_path / trainer.MODEL_FILE))
    from train import models

    restored = models.build_model(
        c.model, c.data.num_classes, c.data.image_size, c.data.channels
    )
    tf.train.Checkpoint(model=restored).read(
        tf.train.latest_checkpoint(str(tmp_path))
    ).expect_partial()
    normalized = np.random.default_rng(0).normal(size=(4, 16, 16, 3))
    pixels = normalized * np.array(c.data.std) + np.array(c.data.mean)
    np.testing.assert_allclose(
        exported.predict(pixels.astype("float32"), verbose=0),
        restored(normalized.astype("float32"), training=False).numpy(),
        rtol=1e-4,
        atol=1e-4,
    )


def _poison_steps(monkeypatch, steps: set[int]) -> None:
    """Makes the training batches of `steps` (1-based) NaN images."""
    real_make_input_fn = trainer.data.make_input_fn
    bad_indices = tf.constant(sorted(s - 1 for s in steps), tf.int64)

    class Poisoned:
        """The real InputFn (its counts too), with NaN images at `steps`."""

        def __init__(self, input_fn):
            self.input_fn = input_fn

        def __getattr__(self, name):
            return getattr(self.input_fn, name)

        def __call__(self, context=None, skip_batches=0):
            def poison(index, batch):
                images, labels = batch
                # uint8 pixels hold no NaN: as floats, which `data.normalize`
                # in the step takes as well.
                images = tf.cast(images, tf.float32)
                bad = tf.reduce_any(tf.equal(index + skip_batches, bad_indices))
                return tf.where(bad, images * np.nan, images), labels

            dataset = self.input_fn(context, skip_batches=skip_batches)
            return dataset.enumerate().map(poison)

    def make_input_fn(**kwargs):
        input_fn = real_make_input_fn(**kwargs)
        return Poisoned(input_fn) if kwargs["split"] == "train" else input_fn

    monkeypatch.setattr(trainer.data, "make_input_fn", make_input_fn)


def test_trust_ratio_probe_is_normalized_as_in_the_training_step(tmp_path):
    c = _config(tmp_path, train_steps=2, trust_ratio_every_steps=1)
    input_fn = trainer.data.make_input_fn(
        source=c.data, split="train", global_batch_size=4, dtype="uint8"
    )
    pixels, labels = next(iter(input_fn()))
    monitor = trainer._trust_ratio_monitor(c, input_fn, None)
    expected = (pixels.numpy().astype(np.float64) - c.data.mean) / np.array(c.data.std)
    assert pixels.dtype == tf.uint8 and monitor.probe_x.dtype == tf.float32
    np.testing.assert_allclose(monitor.probe_x[:4], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(monitor.probe_y[:4], labels)


def _same(state_a, state_b) -> bool:
    return all(
        np.array_equal(a, b)
        for part_a, part_b in zip(state_a, state_b)
        for a, b in zip(part_a, part_b)
    )


def test_a_nonfinite_step_changes_nothing_and_the_run_goes_on(tmp_path, monkeypatch):
    _poison_steps(monkeypatch, {3})
    c = _config(
        tmp_path, train_steps=6, steps_per_loop=1, log_every_steps=1, skip_eval=True
    )
    recorder = _Recorder()
    summary = trainer.run(c, callbacks=[recorder])
    states = recorder.states
    # Step 3: weights, BN statistics, momentum slots and the optimizer's
    # iteration count exactly as after step 2.
    assert _same(states[3], states[2])
    assert not _same(states[4], states[3])  # Training went on.
    assert recorder.iterations == {1: 1, 2: 2, 3: 2, 4: 3, 5: 4, 6: 5}
    assert all(np.isfinite(w).all() for w in states[6][0])
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 6


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_checkpoint(
    tmp_path, monkeypatch
):
    # Loops: step 1, then 2-3, 4-6 (checkpoints every 3); steps 4 and 5 are
    # NaN, so the loop stops after step 5.
    _poison_steps(monkeypatch, {4, 5})
    c = _config(
        tmp_path,
        train_steps=8,
        steps_per_loop=8,
        checkpoint_every_steps=3,
        max_nonfinite_steps=2,
        skip_eval=True,
    )
    recorder = _Recorder()
    with pytest.raises(RunError) as error:
        trainer.run(c, callbacks=[recorder])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("step 5: 2 steps in a row had non-finite")
    assert message.endswith(f"Last good checkpoint: {tmp_path / 'ckpt-3'}")
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-3")
    assert not (tmp_path / trainer.SUMMARY_FILE).exists()
    assert not (tmp_path / trainer.MODEL_FILE).exists()
    # The checkpoint holds the weights of step 3.
    from train import models

    restored = models.build_model(
        c.model, c.data.num_classes, c.data.image_size, c.data.channels
    )
    tf.train.Checkpoint(model=restored).read(str(tmp_path / "ckpt-3")).expect_partial()
    for saved, recorded in zip(restored.weights, recorder.states[3][0]):
        np.testing.assert_array_equal(saved.numpy(), recorded)


def test_the_first_progress_line_shows_no_eta_until_a_steady_loop_is_timed(
    tmp_path, capsys
):
    # The first loop (one step) includes tracing: an ETA from it would be
    # far too long. Steps 2 and 3 are loops after it.
    c = _config(
        tmp_path, train_steps=3, steps_per_loop=1, log_every_steps=1, skip_eval=True
    )
    trainer.run(c)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("train")]
    assert [x.split()[2] for x in lines] == ["1/3", "2/3", "3/3"]
    assert lines[0].endswith("images/s  ETA after the next loop"), lines[0]
    assert all(re.search(r"images/s  ETA \d+:\d\d$", x) for x in lines[1:]), lines


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_FLAGS = [f"--{name}={value}" for name, value in TINY.items()]


def _start_cli(model_dir, *flags: str) -> subprocess.Popen:
    """`python -m train.main` on TINY, SIGINT's default action restored (a
    shell's background job starts with SIGINT ignored)."""
    return subprocess.Popen(
        [sys.executable, "-m", "train.main", *TINY_FLAGS, f"--model_dir={model_dir}"]
        + [*flags],
        cwd=REPO_ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_line(stream, start: str) -> str:
    """Reads `stream` up to the first line starting with `start`."""
    for line in stream:
        if line.startswith(start):
            return line
    raise AssertionError(f"no line starting {start!r}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_records_the_segment_and_exits_128_plus_it(
    tmp_path, signum
):
    process = _start_cli(
        tmp_path, "--train_steps=1000", "--steps_per_loop=2", "--skip_eval"
    )
    _wait_for_line(process.stdout, "train step      1/1000")
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-3000:]
    name = signal.Signals(signum).name
    step = int(stdout.split(f"{name}: saved a checkpoint at step ")[1].split(";")[0])
    assert [x for x in stderr.splitlines() if name in x] == [
        f"{name}: stopping after a checkpoint at the end of this loop (exit status "
        f"{128 + signum})" + ("; SIGINT again exits now." if name == "SIGINT" else ".")
    ]
    assert "Traceback" not in stderr
    # The checkpoint holds the step it names; summary.json the segment.
    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest == str(tmp_path / f"ckpt-{step}")
    reader = tf.train.load_checkpoint(latest)
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == step
    summary = json.loads((tmp_path / trainer.SUMMARY_FILE).read_text())
    assert summary["steps"] == step and summary["stopped_by"] == name
    [segment] = summary["segments"]
    assert (segment["start_step"], segment["end_step"]) == (0, step)
    assert segment["stopped_by"] == name and segment["train"]["loss"] > 0
    assert not (tmp_path / trainer.MODEL_FILE).exists()


def test_a_second_sigint_exits_at_once_without_a_checkpoint(tmp_path):
    # The second loop is 9,999 steps: far longer than the test takes.
    process = _start_cli(
        tmp_path,
        "--train_steps=10000",
        "--steps_per_loop=10000",
        "--log_every_steps=10000",
        "--checkpoint_every_steps=10000",
        "--skip_eval",
    )
    _wait_for_line(process.stdout, "train step      1/10000")
    process.send_signal(signal.SIGINT)
    _wait_for_line(process.stderr, "SIGINT: stopping")  # Two would merge.
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT
    assert stderr.splitlines() == ["SIGINT again: exiting now, without a checkpoint."]
    assert (
        not list(tmp_path.glob("ckpt-*")) and not (tmp_path / "summary.json").exists()
    )


def test_run_gives_back_the_signal_handlers_it_found(tmp_path):
    def mine(signum, frame):
        del signum, frame

    previous = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.run(_config(tmp_path, train_steps=1, skip_eval=True))
        assert signal.getsignal(signal.SIGINT) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.set_wakeup_fd(-1) == -1  # None set, as before the run.
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_stop_signal_after_the_last_step_finishes_then_exits_with_it(tmp_path, capfd):
    """SIGINT during the final evaluation (sent by a callback at the end of
    training): the run writes its results, then exits 130 as announced."""

    class InterruptAtTheEnd(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            os.kill(os.getpid(), signal.SIGINT)

    c = _config(tmp_path, train_steps=2)
    with pytest.raises(SystemExit) as stopped:
        trainer.run(c, callbacks=[InterruptAtTheEnd()])
    assert stopped.value.code == 128 + signal.SIGINT
    output = capfd.readouterr()
    assert "SIGINT after the last step: the run finished" in output.out
    assert "SIGINT: stopping after a checkpoint" in output.err
    with open(tmp_path / trainer.SUMMARY_FILE, encoding="utf-8") as file:
        assert json.load(file)["steps"] == 2
    assert keras.saving.load_model(str(tmp_path / trainer.MODEL_FILE)).built
