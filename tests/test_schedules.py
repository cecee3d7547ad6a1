"""lars_tf.schedules against hand-computed values and a float64 NumPy reference."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from lars_tf.schedules import (
    ScheduleWithWarmup,
    WarmupCosineDecay,
    WarmupPolynomialDecay,
    linear_warmup,
    scaled_learning_rate,
)


def _numpy_poly(step, peak, total, warmup, initial, end, power):
    """Float64 reference of the documented warm-up + polynomial formula."""
    step = np.asarray(step, np.float64)
    warm = initial + (peak - initial) * step / max(warmup, 1)
    progress = np.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    decay = (peak - end) * (1.0 - progress) ** power + end
    rate = np.where(step < warmup, warm, decay)
    return np.where(step >= total, end, rate)


def _numpy_cosine(step, peak, total, warmup, initial, end):
    step = np.asarray(step, np.float64)
    warm = initial + (peak - initial) * step / max(warmup, 1)
    progress = np.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    decay = end + (peak - end) * 0.5 * (1.0 + np.cos(np.pi * progress))
    rate = np.where(step < warmup, warm, decay)
    return np.where(step >= total, end, rate)


def _rate(schedule, step):
    return float(schedule(step))


def test_poly_boundaries_hand_computed():
    # peak 2, warm-up 4 steps from 0.4, decay to 0.1 at step 10, power 2.
    schedule = WarmupPolynomialDecay(
        2.0,
        decay_steps=10,
        warmup_steps=4,
        initial_learning_rate=0.4,
        end_learning_rate=0.1,
    )
    assert _rate(schedule, 0) == pytest.approx(0.4)  # step 0: initial
    assert _rate(schedule, 3) == pytest.approx(0.4 + 1.6 * 3 / 4)  # last warm-up
    assert _rate(schedule, 4) == pytest.approx(2.0)  # first decay step: peak
    assert _rate(schedule, 5) == pytest.approx(1.9 * (5 / 6) ** 2 + 0.1)
    assert _rate(schedule, 9) == pytest.approx(1.9 * (1 / 6) ** 2 + 0.1)  # last
    assert _rate(schedule, 10) == pytest.approx(0.1)  # end reached
    assert _rate(schedule, 1000) == pytest.approx(0.1)  # beyond: stays at end


def test_cosine_boundaries_hand_computed():
    schedule = WarmupCosineDecay(1.0, decay_steps=6, warmup_steps=2)
    assert _rate(schedule, 0) == pytest.approx(0.0)
    assert _rate(schedule, 1) == pytest.approx(0.5)
    assert _rate(schedule, 2) == pytest.approx(1.0)
    assert _rate(schedule, 4) == pytest.approx(0.5, abs=1e-7)  # half-way: cos(pi/2)
    assert _rate(schedule, 5) == pytest.approx(0.5 * (1 + math.cos(0.75 * math.pi)))
    assert _rate(schedule, 6) == pytest.approx(0.0, abs=1e-7)
    assert _rate(schedule, 7) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(
    "warmup, total, initial, end, power",
    [(5, 50, 0.0, 0.0, 2.0), (0, 20, 0.0, 0.01, 1.0), (7, 7, 0.1, 0.02, 0.5)],
)
def test_poly_matches_numpy_over_all_steps(warmup, total, initial, end, power):
    peak = 3.2
    schedule = WarmupPolynomialDecay(peak, total, warmup, initial, end, power)
    steps = np.arange(total + 5)
    got = np.array([_rate(schedule, tf.constant(s, tf.int64)) for s in steps])
    want = _numpy_poly(steps, peak, total, warmup, initial, end, power)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_cosine_matches_numpy_over_all_steps():
    schedule = WarmupCosineDecay(0.8, 40, 8, initial_learning_rate=0.05)
    steps = np.arange(45)
    got = np.array([_rate(schedule, int(s)) for s in steps])
    want = _numpy_cosine(steps, 0.8, 40, 8, 0.05, 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_works_under_xla_with_a_variable_step():
    schedule = WarmupPolynomialDecay(1.0, decay_steps=10, warmup_steps=2)
    step = tf.Variable(0, dtype=tf.int64)

    @tf.function(jit_compile=True)
    def rate_at_current_step():
        return schedule(step)

    got = []
    for s in range(12):
        step.assign(s)
        got.append(float(rate_at_current_step()))
    want = _numpy_poly(np.arange(12), 1.0, 10, 2, 0.0, 0.0, 2.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [WarmupPolynomialDecay, WarmupCosineDecay])
def test_config_round_trip(cls):
    schedule = cls(1.5, decay_steps=30, warmup_steps=3, end_learning_rate=0.01)
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    assert type(restored) is cls
    assert restored.get_config() == schedule.get_config()
    for s in (0, 2, 3, 17, 30, 40):
        assert _rate(restored, s) == _rate(schedule, s)


def test_keras_save_round_trip(tmp_path):
    schedule = WarmupPolynomialDecay(0.3, decay_steps=100, warmup_steps=10, power=3.0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    model.fit(np.ones((8, 3)), np.zeros((8, 2)), batch_size=4, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    restored_schedule = restored.optimizer._learning_rate
    assert isinstance(restored_schedule, WarmupPolynomialDecay)
    assert restored_schedule.get_config() == schedule.get_config()
    # Two updates were applied: the rate is the schedule's at step 2.
    assert float(restored.optimizer.learning_rate) == pytest.approx(0.3 * 2 / 10)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(decay_steps=10, warmup_steps=11), "warmup_steps"),
        (dict(decay_steps=10, warmup_steps=-1), "warmup_steps"),
        (dict(decay_steps=-5), "decay_steps"),
        (dict(decay_steps=0), "decay_steps"),
        (dict(decay_steps=10, power=0.0), "power"),
        (dict(decay_steps=10, power=-1.0), "power"),
        (dict(decay_steps=10, end_learning_rate=-0.1), "end_learning_rate"),
        (dict(decay_steps=10, initial_learning_rate=-0.1), "initial_learning_rate"),
    ],
)
def test_bad_schedule_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        WarmupPolynomialDecay(1.0, **kwargs)


def test_negative_peak_rate_is_rejected():
    with pytest.raises(ValueError, match="`peak_learning_rate`"):
        WarmupCosineDecay(-1.0, decay_steps=10)


def test_scaled_learning_rate_rules():
    assert scaled_learning_rate(0.1, 8192) == pytest.approx(3.2)
    assert scaled_learning_rate(0.1, 1024, rule="sqrt") == pytest.approx(0.2)
    assert scaled_learning_rate(2.0, 512, base_batch_size=1024) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(rule="cubic"), "rule"),
        (dict(batch_size=0), "batch_size"),
        (dict(base_batch_size=-1), "base_batch_size"),
        (dict(base_learning_rate=-0.1), "base_learning_rate"),
    ],
)
def test_scaled_learning_rate_bad_arguments(kwargs, argument):
    arguments = {"base_learning_rate": 0.1, "batch_size": 512, **kwargs}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        scaled_learning_rate(**arguments)


def test_linear_warmup_hand_computed():
    assert linear_warmup(0, 4, 0.2, 1.0) == pytest.approx(0.2)
    assert linear_warmup(3, 4, 0.2, 1.0) == pytest.approx(0.2 + 0.8 * 3 / 4)
    assert linear_warmup(5, 0, 0.2, 1.0) == pytest.approx(0.2 + 0.8 * 5)  # no 1/0
    got = linear_warmup(tf.constant([0.0, 2.0]), 4, 0.0, tf.constant(2.0))
    np.testing.assert_allclose(got.numpy(), [0.0, 1.0])


def test_schedule_with_warmup_ramps_any_schedule():
    inner = keras.optimizers.schedules.PiecewiseConstantDecay([5], [1.0, 0.5])
    schedule = ScheduleWithWarmup(inner, warmup_steps=4, initial_learning_rate=0.2)
    got = [_rate(schedule, s) for s in range(8)]
    want = [0.2 + 0.8 * t / 4 for t in range(4)] + [1.0, 1.0, 0.5, 0.5]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    assert [_rate(restored, s) for s in range(8)] == got


def test_numpy_scalars_are_accepted():
    schedule = WarmupPolynomialDecay(
        np.float32(2.0), decay_steps=np.int64(10), warmup_steps=np.int32(2),
        power=np.float64(2.0),
    )  # fmt: skip
    assert _rate(schedule, 2) == pytest.approx(2.0)
    assert type(schedule.get_config()["decay_steps"]) is int


@pytest.mark.parametrize("power", [float("nan"), float("inf")])
def test_non_finite_power_is_rejected(power):
    with pytest.raises(ValueError, match=r"`power` must be a finite number > 0"):
        WarmupPolynomialDecay(1.0, decay_steps=10, power=power)
