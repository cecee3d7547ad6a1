"""The training app's optimizers, schedules and weight decay (train/optimizers.py),
built from Configs (train/config.py)."""

import dataclasses
import math

import keras
import numpy as np
import pytest

import lars_tf
from train import config, optimizers

# Synthetic ImageNet-sized data: no data folder needed.
SYNTHETIC = {"source": "synthetic", "num_classes": 10, "model_dir": "/tmp/unused"}


def _config(**overrides) -> config.Config:
    return config.make_config(**{**SYNTHETIC, **overrides})


@pytest.mark.parametrize(
    "rule, expected", [("linear", 6.4), ("sqrt", 1.6), ("none", 0.4)]
)
def test_peak_learning_rate_follows_the_scaling_rule(rule, expected):
    c = _config(base_learning_rate=0.4, global_batch_size=4096, lr_scaling=rule)
    assert c.peak_learning_rate == pytest.approx(expected)


def test_step_schedule_warms_up_then_divides_at_each_boundary():
    schedule = optimizers.WarmupStepDecay(1.0, [10, 20], 0.1, warmup_steps=5)
    steps = [0, 2, 5, 9, 10, 19, 20, 100]
    expected = [0.0, 0.4, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert [float(schedule(s)) for s in steps] == pytest.approx(expected)


def test_schedules_from_flags_match_their_formulas():
    # 1,281,167 images: 1251 steps per epoch at batch 1024, 2 warm-up epochs =
    # 2502 steps, 5004 steps in all, peak 0.8.
    common = {"base_learning_rate": 0.2, "global_batch_size": 1024}
    common.update(warmup_epochs=2, train_epochs=4)
    peak, warmup, total = 0.8, 2502, 5004

    def rate(step, **extra):
        c = _config(**common, **extra)
        assert (c.warmup_steps, c.train_steps) == (warmup, total)
        return float(optimizers.learning_rate_schedule(c)(step))

    assert rate(1251, lr_schedule="poly") == pytest.approx(peak * 1251 / warmup)
    assert rate(3753, lr_schedule="poly", poly_power=2) == pytest.approx(
        peak * (1 - 1251 / 2502) ** 2
    )
    assert rate(3753, lr_schedule="cosine") == pytest.approx(
        peak * 0.5 * (1 + math.cos(math.pi * 1251 / 2502))
    )
    # Boundaries at epochs 3 and 3.5 = steps 3753 and 4378.5 -> 4378.
    step = {"lr_schedule": "step", "lr_decay_epochs": "3,3.5"}
    assert rate(4377, **step) == pytest.approx(peak * 0.1)
    assert rate(4378, **step) == pytest.approx(peak * 0.01)


def _tiny_model() -> keras.Model:
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="fc")(x))


def test_l2_loss_is_half_weight_decay_times_squared_kernels():
    keras.utils.set_random_seed(1)
    model = _tiny_model()
    c = _config(optimizer="sgd", weight_decay=0.01)
    kernels = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    kernels = [k for k in kernels if k.ndim > 1]
    assert len(kernels) == 2
    expected = 0.005 * sum((k**2).sum() for k in kernels)
    l2_loss = optimizers.l2_loss_fn(c, model)
    assert float(l2_loss()) == pytest.approx(expected, rel=1e-6)
    everything = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    c = _config(optimizer="sgd", weight_decay=0.01, exclude_bias_and_norm=False)
    assert float(optimizers.l2_loss_fn(c, model)()) == pytest.approx(
        0.005 * sum((v**2).sum() for v in everything), rel=1e-6
    )
    for name in ("lars", "lamb", "adamw"):  # Their weight decay is their own.
        assert optimizers.l2_loss_fn(_config(optimizer=name), model) is None


def test_optimizers_from_flags():
    model = _tiny_model()
    lars = optimizers.build_optimizer(
        _config(weight_decay=0.001, trust_coefficient=0.02), model
    )
    assert isinstance(lars, lars_tf.LARS) and lars.built
    assert lars.coupled_weight_decay == 0.001 and lars.trust_coefficient == 0.02
    sgd = optimizers.build_optimizer(_config(optimizer="sgd"), model)
    assert isinstance(sgd, keras.optimizers.SGD) and not sgd.weight_decay
    assert not sgd.nesterov and not lars.nesterov
    for name in ("sgd", "lars"):
        config = _config(optimizer=name, nesterov=True)
        assert optimizers.build_optimizer(config, model).nesterov
    adamw = optimizers.build_optimizer(_config(optimizer="adamw"), model)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == 5e-4
    excluded = [v for v in model.trainable_variables if adamw._use_weight_decay(v)]
    assert [len(v.shape) for v in excluded] == [4, 2]  # Kernels only.
    lamb = optimizers.build_optimizer(
        _config(optimizer="lamb", precision="mixed_float16"), model
    )
    assert isinstance(lamb, keras.optimizers.LossScaleOptimizer)
    assert isinstance(lamb.inner_optimizer, keras.optimizers.Lamb)


def test_optimizer_arguments_from_flags():
    model = _tiny_model()
    nesterov = optimizers.build_optimizer(
        _config(optimizer="sgd", momentum=0.8, nesterov=True), model
    )
    assert isinstance(nesterov, keras.optimizers.SGD) and nesterov.built
    assert nesterov.nesterov and nesterov.momentum == 0.8
    lars = optimizers.build_optimizer(
        _config(trust_coefficient=0.02, weight_decay=0), model
    )
    assert (lars.trust_coefficient, lars.coupled_weight_decay) == (0.02, 0.0)
    lamb = optimizers.build_optimizer(_config(optimizer="lamb", momentum=0.7), model)
    assert (lamb.beta_1, lamb.epsilon) == (0.7, 1e-6)
    with pytest.raises(config.FlagError, match="--optimizer"):
        _config(optimizer="adam")
    with pytest.raises(config.FlagError, match="--lr_schedule"):
        _config(lr_schedule="linear")
    # A Config made past the flags' checks is still refused, by name.
    with pytest.raises(ValueError, match="optimizer .* Received: 'adam'"):
        optimizers.build_optimizer(
            dataclasses.replace(_config(), optimizer="adam"), model
        )
    with pytest.raises(ValueError, match="lr_schedule .* Received: 'linear'"):
        optimizers.learning_rate_schedule(
            dataclasses.replace(_config(), lr_schedule="linear")
        )


def test_lars_from_flags_is_lars_built_by_hand():
    model = _tiny_model()
    c = _config(lr_schedule="cosine", global_batch_size=512, warmup_epochs=1)
    from_config = optimizers.build_optimizer(c, model)
    schedule = lars_tf.WarmupCosineDecay(
        c.peak_learning_rate, c.train_steps, warmup_steps=c.warmup_steps
    )
    by_hand = lars_tf.LARS(
        schedule,
        weight_decay=c.weight_decay,
        exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
        exclude_from_weight_decay=lars_tf.exclude_bias_and_norm,
    )
    assert from_config.get_config() == by_hand.get_config()
