"""lars_tf.schedules against hand-computed values and a float64 NumPy reference."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from lars_tf.schedules import (
    ScheduleWithWarmup,
    WarmupCosineDecay,
    WarmupPolynomialDecay,
    WarmupStepDecay,
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


# Configs as the schedules' earlier classes saved them (a `.keras` file's
# config.json holds these dicts); they must load and give the same rates.
SAVED_POLY = (
    '{"module": "lars_tf.schedules", "class_name": "WarmupPolynomialDecay", '
    '"config": {"peak_learning_rate": 2.0, "decay_steps": 10, "warmup_steps": 4, '
    '"initial_learning_rate": 0.4, "end_learning_rate": 0.1, '
    '"name": "WarmupPolynomialDecay", "power": 2.0}, '
    '"registered_name": "lars_tf>WarmupPolynomialDecay"}'
)
SAVED_COSINE = (
    '{"module": "lars_tf.schedules", "class_name": "WarmupCosineDecay", '
    '"config": {"peak_learning_rate": 1.0, "decay_steps": 6, "warmup_steps": 2, '
    '"initial_learning_rate": 0.0, "end_learning_rate": 0.0, '
    '"name": "WarmupCosineDecay"}, "registered_name": "lars_tf>WarmupCosineDecay"}'
)
SAVED_WRAPPER = (
    '{"module": "lars_tf.schedules", "class_name": "ScheduleWithWarmup", '
    '"config": {"schedule": {"module": "keras.optimizers.schedules", '
    '"class_name": "PiecewiseConstantDecay", "config": {"boundaries": [5], '
    '"values": [1.0, 0.5], "name": "PiecewiseConstant"}, "registered_name": null}, '
    '"warmup_steps": 4, "initial_learning_rate": 0.2}, '
    '"registered_name": "lars_tf>ScheduleWithWarmup"}'
)


@pytest.mark.parametrize(
    "saved, cls, steps, want",
    [
        (SAVED_POLY, WarmupPolynomialDecay, [0, 3, 4, 5, 10],
         [0.4, 0.4 + 1.6 * 3 / 4, 2.0, 1.9 * (5 / 6) ** 2 + 0.1, 0.1]),
        (SAVED_COSINE, WarmupCosineDecay, [1, 2, 4, 6], [0.5, 1.0, 0.5, 0.0]),
        (SAVED_WRAPPER, ScheduleWithWarmup, [0, 2, 4, 6], [0.2, 0.6, 1.0, 0.5]),
    ],
)  # fmt: skip
def test_earlier_saved_configs_load(saved, cls, steps, want):
    schedule = keras.optimizers.schedules.deserialize(json.loads(saved))
    assert type(schedule) is cls
    got = [_rate(schedule, s) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_warmup_to_a_target_starts_the_schedule_after_it():
    # Ramp 0.1 -> 1.0 over 3 steps, then PolynomialDecay(1.0 -> 0, 4 steps, power 1)
    # from step 3: 1.0, 0.75, 0.5, 0.25, 0.0, 0.0.
    inner = keras.optimizers.schedules.PolynomialDecay(1.0, 4, 0.0, power=1.0)
    schedule = ScheduleWithWarmup(inner, 3, 0.1, warmup_target=1.0)
    want = [0.1, 0.4, 0.7, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    got = [_rate(schedule, s) for s in range(9)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="`warmup_target`"):
        ScheduleWithWarmup(inner, 3, warmup_target=-1.0)


@pytest.mark.parametrize("warmup, total", [(8, 40), (5, 5), (0, 12)])
def test_cosine_with_an_end_rate_matches_numpy(warmup, total):
    schedule = WarmupCosineDecay(0.8, total, warmup, 0.05, end_learning_rate=0.1)
    steps = np.arange(total + 3)
    got = np.array([_rate(schedule, int(s)) for s in steps])
    want = _numpy_cosine(steps, 0.8, total, warmup, 0.05, 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_cosine_needs_a_peak_to_decay_from():
    with pytest.raises(ValueError, match="`end_learning_rate`"):
        WarmupCosineDecay(0.0, decay_steps=10, end_learning_rate=0.1)
    assert _rate(WarmupCosineDecay(0.0, decay_steps=10), 5) == 0.0


def test_step_decay_hand_computed():
    # Boundary 2 lies inside the warm-up: the ramp still reaches the peak, and
    # from step 4 on two boundaries (2 and 6 at step 6) have passed.
    schedule = WarmupStepDecay(2.0, [2, 6, 6], decay_factor=0.5, warmup_steps=4)
    got = [_rate(schedule, s) for s in range(9)]
    want = [0.0, 0.5, 1.0, 1.5, 1.0, 1.0, 0.25, 0.25, 0.25]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    constant = WarmupStepDecay(0.3, [], warmup_steps=2)
    np.testing.assert_allclose(
        [_rate(constant, s) for s in range(5)], [0.0, 0.15, 0.3, 0.3, 0.3], rtol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(peak_learning_rate=-1.0), "peak_learning_rate"),
        (dict(boundaries=[5, 3]), "boundaries"),
        (dict(boundaries=[-1]), "boundaries"),
        (dict(boundaries=[2.5]), "boundaries"),
        (dict(decay_factor=0.0), "decay_factor"),
        (dict(decay_factor=1.5), "decay_factor"),
        (dict(warmup_steps=-1), "warmup_steps"),
    ],
)
def test_bad_step_decay_arguments_name_the_argument(kwargs, argument):
    arguments = {"peak_learning_rate": 1.0, "boundaries": [10], **kwargs}
    with pytest.raises(ValueError, match=f"`{argument}`") as error:
        WarmupStepDecay(**arguments)
    assert "\n" not in str(error.value)


def _sgd_with_schedule_saved_after(steps, schedule, path):
    """A tiny model trained `steps` steps with SGD on `schedule`, saved, loaded."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    model.fit(np.ones((steps, 3)), np.zeros((steps, 2)), batch_size=1, verbose=0)
    model.save(path)
    return keras.saving.load_model(path).optimizer


@pytest.mark.parametrize(
    "schedule, want",
    [
        # 3 steps done: cos-decay of 1.0 to 0.2 from step 1 over 4 steps, at 2/4.
        (WarmupCosineDecay(1.0, 5, 1, end_learning_rate=0.2), 0.2 + 0.8 * 0.5),
        (WarmupStepDecay(1.0, [3], 0.1, warmup_steps=2), 0.1),
        (ScheduleWithWarmup(keras.optimizers.schedules.PolynomialDecay(
            1.0, 4, 0.0, power=1.0), 2, warmup_target=0.8), 0.75),
    ],
)  # fmt: skip
def test_every_schedule_survives_a_keras_save(schedule, want, tmp_path):
    optimizer = _sgd_with_schedule_saved_after(3, schedule, tmp_path / "m.keras")
    restored = optimizer._learning_rate
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    assert float(optimizer.learning_rate) == pytest.approx(want, rel=1e-6)
