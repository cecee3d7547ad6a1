"""lars_tf's callbacks: warm-up, trust-ratio monitor and throughput.

Learning rates are checked by what was applied: a one-weight model ``w * x``
with ``x = 1``, target -100 and the mean absolute error has gradient 1 while
``w > -100``, so plain SGD moves the weight by exactly each step's rate.
"""

import importlib.util

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import conv_bn_model

import lars_tf
from lars_tf import (
    LearningRateWarmup,
    ScheduleWithWarmup,
    Throughput,
    TrustRatioMonitor,
)


def _unit_gradient_model(optimizer):
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
        ]
    )
    model.compile(optimizer=optimizer, loss="mean_absolute_error")
    return model


class _RecordSteps(keras.callbacks.Callback):
    """Records each batch's weight change and logged learning rate."""

    def __init__(self):
        super().__init__()
        self.applied_rates, self.logged_rates = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self._before = float(self.model.weights[0].numpy().ravel()[0])

    def on_train_batch_end(self, batch, logs=None):
        after = float(self.model.weights[0].numpy().ravel()[0])
        self.applied_rates.append(self._before - after)
        self.logged_rates.append(logs["learning_rate"])


def _fit_unit_model(optimizer, warmup, epochs=2, batches_per_epoch=4):
    model = _unit_gradient_model(optimizer)
    recorder = _RecordSteps()
    ones = np.ones((batches_per_epoch, 1), np.float32)
    model.fit(
        ones, -100 * ones, batch_size=1, epochs=epochs, shuffle=False, verbose=0,
        callbacks=[warmup, recorder],
    )  # fmt: skip
    return model, recorder


def test_warmup_of_a_constant_rate_ramps_then_hands_back():
    # 2 epochs x 3 steps/epoch of warm-up from 0.1 to 0.7, 8 steps over 2 fits.
    warmup = LearningRateWarmup(
        warmup_epochs=2, steps_per_epoch=3, initial_learning_rate=0.1
    )
    model, recorder = _fit_unit_model(keras.optimizers.SGD(0.7), warmup)
    expected = [0.1 + 0.6 * t / 6 for t in range(6)] + [0.7, 0.7]
    np.testing.assert_allclose(recorder.applied_rates, expected, rtol=1e-5)
    np.testing.assert_allclose(recorder.logged_rates, expected, rtol=1e-5)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.7)

    # Another fit continues from the global step: warm-up is over, rate untouched.
    model.optimizer.learning_rate = 0.3
    model.fit(np.ones((2, 1)), np.full((2, 1), -100.0), batch_size=1, verbose=0,
              callbacks=[warmup, recorder])  # fmt: skip
    np.testing.assert_allclose(recorder.applied_rates[-2:], [0.3, 0.3], rtol=1e-5)


def test_warmup_wraps_a_schedule_and_returns_to_it():
    schedule = lars_tf.WarmupPolynomialDecay(0.5, decay_steps=20)
    warmup = LearningRateWarmup(warmup_steps=4)
    model, recorder = _fit_unit_model(keras.optimizers.SGD(schedule), warmup)
    steps = np.arange(8, dtype=np.float64)
    poly = 0.5 * (1 - steps / 20) ** 2
    expected = np.where(steps < 4, poly * steps / 4, poly)
    np.testing.assert_allclose(recorder.applied_rates, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(recorder.logged_rates, expected, rtol=1e-5, atol=1e-7)
    assert isinstance(model.optimizer._learning_rate, ScheduleWithWarmup)


def test_wrapped_schedule_survives_a_keras_save(tmp_path):
    schedule = lars_tf.WarmupCosineDecay(0.5, decay_steps=20)
    model, _ = _fit_unit_model(
        keras.optimizers.SGD(schedule), LearningRateWarmup(warmup_steps=10), epochs=1
    )
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras", compile=True)
    wrapper = restored.optimizer._learning_rate
    assert isinstance(wrapper, ScheduleWithWarmup)
    assert isinstance(wrapper.schedule, lars_tf.WarmupCosineDecay)
    # 4 steps done: 0.5 * cos-decay(4/20) * 4/10.
    expected = 0.5 * 0.5 * (1 + np.cos(np.pi * 4 / 20)) * 4 / 10
    assert float(restored.optimizer.learning_rate) == pytest.approx(expected, rel=1e-5)

    # A new callback on the restored model continues the saved ramp: it does
    # not put a second one in front (that would apply (t / 10) ** 2).
    recorder = _RecordSteps()
    ones = np.ones((2, 1), np.float32)
    restored.fit(ones, -100 * ones, batch_size=1, shuffle=False, verbose=0,
                 callbacks=[LearningRateWarmup(warmup_steps=10), recorder])  # fmt: skip
    steps = np.array([4.0, 5.0])
    expected = 0.5 * 0.5 * (1 + np.cos(np.pi * steps / 20)) * steps / 10
    np.testing.assert_allclose(recorder.applied_rates, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({}, "warmup_steps"),
        ({"warmup_steps": 2, "warmup_epochs": 1}, "warmup_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_epochs": -1.0}, "warmup_epochs"),
        ({"warmup_epochs": 1, "steps_per_epoch": 0}, "steps_per_epoch"),
        ({"warmup_steps": 2, "initial_learning_rate": -1.0}, "initial_learning_rate"),
    ],
)
def test_warmup_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        LearningRateWarmup(**kwargs)


def _probe_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=(8,)).astype(np.int32)
    return x, y


def _reference_norms(model, x, y, loss_fn=None):
    """||w|| in float64 NumPy, ||g|| of a GradientTape gradient on the model itself."""
    weight_norms = [
        np.linalg.norm(v.numpy().astype(np.float64)) for v in model.trainable_variables
    ]
    loss_fn = loss_fn or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    gradients = tape.gradient(loss, model.trainable_variables)
    gradient_norms = [np.linalg.norm(g.numpy().astype(np.float64)) for g in gradients]
    return np.array(weight_norms), np.array(gradient_norms)


@pytest.mark.parametrize("clip", [False, True])
def test_monitor_matches_independent_norms_and_lars_rates(clip):
    learning_rate, weight_decay, eta = 0.5, 1e-2, 0.02
    optimizer = lars_tf.LARS(
        learning_rate,
        weight_decay=weight_decay,
        trust_coefficient=eta,
        clip=clip,
        exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
    )
    model = conv_bn_model(optimizer)
    x, y = _probe_batch()
    monitor = TrustRatioMonitor((x, y))
    monitor.set_model(model)
    state_before = [v.numpy() for v in model.non_trainable_variables]
    stats = monitor.measure()
    # Measuring must not touch batch-norm statistics.
    for before, v in zip(state_before, model.non_trainable_variables, strict=True):
        np.testing.assert_array_equal(before, v.numpy())

    weight_norms, gradient_norms = _reference_norms(model, x, y)
    names = [row.name for row in stats]
    assert names == ["conv1.w", "bn1.gamma", "bn1.beta", "fc.w", "fc.b"]
    np.testing.assert_allclose([r.weight_norm for r in stats], weight_norms, rtol=1e-5)
    np.testing.assert_allclose(
        [r.gradient_norm for r in stats], gradient_norms, rtol=1e-4
    )
    np.testing.assert_allclose(
        [r.ratio for r in stats], weight_norms / gradient_norms, rtol=1e-4
    )
    # The paper's local rate, float64; kernels adapted, 1-D variables not.
    ratio = eta * weight_norms / (gradient_norms + weight_decay * weight_norms)
    local = np.minimum(ratio, learning_rate) if clip else learning_rate * ratio
    adapted = np.array([v.ndim > 1 for v in model.trainable_variables])
    expected = np.where(adapted, local, learning_rate)
    np.testing.assert_allclose(
        [r.effective_learning_rate for r in stats], expected, rtol=1e-4
    )


def test_monitor_averages_a_loss_given_by_name():
    model = conv_bn_model(lars_tf.LARS(1.0))
    model.compile(optimizer=model.optimizer, loss="mean_squared_error")
    x, labels = _probe_batch()
    y = np.eye(3, dtype=np.float32)[labels]
    monitor = TrustRatioMonitor((x, y))
    monitor.set_model(model)
    stats = monitor.measure()
    _, gradient_norms = _reference_norms(model, x, y, keras.losses.MeanSquaredError())
    np.testing.assert_allclose(
        [r.gradient_norm for r in stats], gradient_norms, rtol=1e-4
    )


def test_monitor_during_fit_records_every_n_steps():
    model = conv_bn_model(lars_tf.LARS(1.0, trust_coefficient=0.01))
    x, y = _probe_batch()
    monitor = TrustRatioMonitor((x, y), every_n_steps=3, measure_at_start=True)
    model.fit(np.tile(x, (4, 1, 1, 1)), np.tile(y, 4), batch_size=4, epochs=1,
              verbose=0, callbacks=[monitor])  # fmt: skip
    assert [step for step, _ in monitor.history] == [0, 3, 6]
    # A second fit measures at its start (step 8), then at step 9: final weights.
    model.fit(x[:4], y[:4], batch_size=4, verbose=0, callbacks=[monitor])
    assert [step for step, _ in monitor.history] == [0, 3, 6, 8, 9]
    weight_norms, gradient_norms = _reference_norms(model, x, y)
    last = monitor.history[-1][1]
    np.testing.assert_allclose([r.weight_norm for r in last], weight_norms, rtol=1e-5)
    np.testing.assert_allclose(
        [r.gradient_norm for r in last], gradient_norms, rtol=1e-4
    )
    table = monitor.format_table().splitlines()
    assert table[0].split("|")[0].strip() == "Layer"
    assert [line.split("|")[0].strip() for line in table[2:]] == [r.name for r in last]


def test_monitor_and_warmup_in_a_custom_loop():
    """Driven through CallbackList as train/ drives them, with apply_gradients."""
    model = conv_bn_model(lars_tf.LARS(0.8, trust_coefficient=0.01))
    x, y = _probe_batch()
    monitor = TrustRatioMonitor((x, y), every_n_steps=2)
    warmup = LearningRateWarmup(warmup_steps=3)
    logged = []  # As a callback after the warm-up (e.g. TensorBoard) sees them.
    recorder = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: logged.append(logs["learning_rate"])
    )
    callbacks = keras.callbacks.CallbackList([warmup, recorder, monitor], model=model)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return {"loss": loss}

    callbacks.on_train_begin()
    for step in range(4):
        callbacks.on_train_batch_begin(step)
        logs = train_step(x, y)
        callbacks.on_train_batch_end(step, logs)
    callbacks.on_train_end()
    np.testing.assert_allclose(logged, [0.0, 0.8 / 3, 1.6 / 3, 0.8], rtol=1e-6)
    assert [step for step, _ in monitor.history] == [2, 4]
    assert monitor.history[-1][1][0].effective_learning_rate > 0


def test_monitor_bad_arguments():
    with pytest.raises(ValueError, match="`every_n_steps`"):
        TrustRatioMonitor(_probe_batch(), every_n_steps=0)
    with pytest.raises(ValueError, match="`probe_batch`"):
        TrustRatioMonitor(_probe_batch()[0])


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="tensorboard is not installed; tf.summary cannot write",
)
def test_monitor_writes_tensorboard_summaries(tmp_path):
    model = conv_bn_model(lars_tf.LARS(1.0))
    monitor = TrustRatioMonitor(_probe_batch(), log_dir=str(tmp_path))
    monitor.set_model(model)
    monitor.on_train_begin()
    monitor._record()
    monitor.on_train_end()
    tags = set()
    for path in tmp_path.iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    assert "trust_ratio/ratio/conv1.w" in tags
    assert "trust_ratio/effective_learning_rate/fc.b" in tags
    assert "trust_ratio/ratio_across_variables" in tags


def test_throughput_skips_compilation_steps_and_logs_rates():
    throughput = Throughput(batch_size=2, skip_steps=3)
    epoch_logs = []
    model = _unit_gradient_model(keras.optimizers.SGD(0.1))
    model.fit(
        np.ones((10, 1)), np.zeros((10, 1)), batch_size=2, epochs=2, verbose=0,
        callbacks=[throughput, keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: epoch_logs.append(dict(logs)))],
    )  # fmt: skip
    assert len(throughput.step_times) == 2 * 5 - 3
    assert all(t > 0 for t in throughput.step_times)
    for logs in epoch_logs:
        assert logs["examples_per_second"] == pytest.approx(
            2 / (logs["step_time_ms"] / 1000)
        )
    with pytest.raises(ValueError, match="`batch_size`"):
        Throughput(batch_size=0)


def test_monitor_under_mirrored_strategy(check_scripts):
    """MirroredStrategy over 2 logical CPUs, in its own process."""
    report = check_scripts.run("callbacks_distributed_check.py")
    assert report["replicas"] == 2
    for loop in ("fit", "custom_loop"):
        assert report[loop]["steps"] == [0, 2, 4], report
        assert report[loop]["max_rel_diff_weight_norm"] < 1e-5, report
        assert report[loop]["max_rel_diff_gradient_norm"] < 1e-4, report
