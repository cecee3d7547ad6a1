"""The training app's optimizers, schedules and weight decay (train/optimizers.py),
and its loop driving Keras callbacks (train/trainer.py, in-process)."""

import math
import signal

import keras
import numpy as np
import pytest
from absl import flags

import lars_tf
from train import main, optimizers


def _parse(*args: str) -> flags.FlagValues:
    flag_values = flags.FlagValues()
    main.define_flags(flag_values)
    flag_values(["train.main", *args])
    return flag_values


@pytest.mark.parametrize(
    "rule, expected", [("linear", 6.4), ("sqrt", 1.6), ("none", 0.4)]
)
def test_peak_learning_rate_follows_the_scaling_rule(rule, expected):
    f = _parse(
        "--base_learning_rate=0.4", "--global_batch_size=4096", f"--lr_scaling={rule}"
    )
    assert optimizers.peak_learning_rate(f) == pytest.approx(expected)


def test_step_schedule_warms_up_then_divides_at_each_boundary():
    schedule = optimizers.WarmupStepDecay(1.0, [10, 20], 0.1, warmup_steps=5)
    steps = [0, 2, 5, 9, 10, 19, 20, 100]
    expected = [0.0, 0.4, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert [float(schedule(s)) for s in steps] == pytest.approx(expected)


def test_schedules_from_flags_match_their_formulas():
    # 10 steps per epoch, 100 steps, 2 warm-up epochs = 20 steps, peak 0.8.
    common = ["--base_learning_rate=0.2", "--global_batch_size=1024"]
    common += ["--warmup_epochs=2"]
    peak, warmup, total = 0.8, 20, 100

    def rate(schedule_flag, step, *extra):
        f = _parse(*common, schedule_flag, *extra)
        return float(optimizers.learning_rate_schedule(f, 10, total)(step))

    assert rate("--lr_schedule=poly", 10) == pytest.approx(peak * 10 / warmup)
    assert rate("--lr_schedule=poly", 60, "--poly_power=2") == pytest.approx(
        peak * (1 - 40 / 80) ** 2
    )
    assert rate("--lr_schedule=cosine", 60) == pytest.approx(
        peak * 0.5 * (1 + math.cos(math.pi * 40 / 80))
    )
    step = ("--lr_schedule=step", 50, "--lr_decay_epochs=3,4.5")
    assert rate(*step) == pytest.approx(peak * 0.01)


def _tiny_model() -> keras.Model:
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="fc")(x))


def test_l2_loss_is_half_weight_decay_times_squared_kernels():
    keras.utils.set_random_seed(1)
    model = _tiny_model()
    f = _parse("--optimizer=sgd", "--weight_decay=0.01")
    kernels = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    kernels = [k for k in kernels if k.ndim > 1]
    assert len(kernels) == 2
    expected = 0.005 * sum((k**2).sum() for k in kernels)
    assert float(optimizers.l2_loss(f, model)) == pytest.approx(expected, rel=1e-6)
    everything = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    f = _parse("--optimizer=sgd", "--weight_decay=0.01", "--noexclude_bias_and_norm")
    assert float(optimizers.l2_loss(f, model)) == pytest.approx(
        0.005 * sum((v**2).sum() for v in everything), rel=1e-6
    )
    for name in ("lars", "lamb", "adamw"):  # Their weight decay is their own.
        assert optimizers.l2_loss(_parse(f"--optimizer={name}"), model) is None


def test_optimizers_from_flags():
    model = _tiny_model()
    schedule = optimizers.WarmupStepDecay(1.0, [10])
    lars = optimizers.build_optimizer(
        _parse("--weight_decay=0.001", "--trust_coefficient=0.02"), schedule, model
    )
    assert isinstance(lars, lars_tf.LARS) and lars.built
    assert lars.coupled_weight_decay == 0.001 and lars.trust_coefficient == 0.02
    sgd = optimizers.build_optimizer(_parse("--optimizer=sgd"), schedule, model)
    assert isinstance(sgd, keras.optimizers.SGD) and not sgd.weight_decay
    adamw = optimizers.build_optimizer(_parse("--optimizer=adamw"), schedule, model)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == 5e-4
    excluded = [v for v in model.trainable_variables if adamw._use_weight_decay(v)]
    assert [len(v.shape) for v in excluded] == [4, 2]  # Kernels only.
    lamb = optimizers.build_optimizer(
        _parse("--optimizer=lamb", "--precision=mixed_float16"), schedule, model
    )
    assert isinstance(lamb, keras.optimizers.LossScaleOptimizer)
    assert isinstance(lamb.inner_optimizer, keras.optimizers.Lamb)


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.calls = []

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin", None, None))

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("batch_end", batch, dict(logs)))

    def on_train_end(self, logs=None):
        self.calls.append(("train_end", None, dict(logs)))


def test_loop_drives_keras_callbacks_and_checkpoints(tmp_path):
    """In-process on the default strategy, with the XLA-compiled step."""
    import tensorflow as tf

    from train import trainer

    f = _parse(
        "--source=synthetic",
        "--num_classes=10",
        "--image_size=16",
        "--global_batch_size=32",
        "--train_steps=10",
        "--warmup_epochs=0",
        "--steps_per_loop=5",
        "--jit_compile",
        f"--model_dir={tmp_path}",
    )
    recorder = _Recorder()
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        summary = trainer.run(f, source="synthetic", callbacks=[recorder])
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    kinds = [kind for kind, _, _ in recorder.calls]
    assert kinds == ["train_begin", "batch_end", "batch_end", "train_end"]
    assert [batch for kind, batch, _ in recorder.calls if kind == "batch_end"] == [4, 9]
    for _, _, logs in recorder.calls[1:3]:
        assert set(logs) == {"loss", "accuracy", "learning_rate", "images_per_sec"}
        assert math.isfinite(logs["loss"]) and 0 <= logs["accuracy"] <= 1
    assert recorder.calls[-1][2]["top1"] == summary["eval"]["top1"]
    assert recorder.calls[2][2]["learning_rate"] == 0.0  # Poly decay ends at 0.
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-10")
