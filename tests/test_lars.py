"""Tests of lars_tf.LARS against an independent float64 NumPy reference."""

import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    CASES,
    FORMS,
    compiled_model,
    expected_flags,
    fit_data,
    hyper_of,
    random_problem,
    reference_step,
)

import lars_tf


def reference_run(weights, grad_steps, lrs, adapted, decays, **hyper):
    weights = [w.astype(np.float64) for w in weights]
    velocities = [np.zeros_like(w) for w in weights]
    for grads, lr in zip(grad_steps, lrs):
        for i, g in enumerate(grads):
            weights[i], velocities[i] = reference_step(
                weights[i],
                velocities[i],
                g,
                lr,
                weight_decay=decays[i],
                adapted=adapted[i],
                **hyper,
            )
    return weights


def assert_close_to_reference(variables, expected):
    for variable, want in zip(variables, expected):
        np.testing.assert_allclose(
            variable.numpy(),
            want,
            rtol=1e-6,
            atol=1e-6 * np.abs(want).max(),
            err_msg=variable.path,
        )


# graph: tf.function; own_jit: LARS(jit_compile=True); outer_xla: the whole
# step XLA-compiled, as model.compile(jit_compile=True) runs it (the norms take
# another form there).
@pytest.mark.parametrize("mode", ["graph", "own_jit", "outer_xla"])
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case, form, mode):
    kwargs = dict(CASES[case], **FORMS[form])
    variables, weights, grad_steps = random_problem(seed=len(case), num_steps=4)
    lr = 0.7 if kwargs.get("clip") else 1.5
    optimizer = lars_tf.LARS(learning_rate=lr, jit_compile=mode == "own_jit", **kwargs)
    optimizer.build(variables)
    apply = tf.function(
        lambda grads: optimizer.apply_gradients(zip(grads, variables)),
        jit_compile=mode == "outer_xla",
    )
    for grads in grad_steps:
        apply([tf.constant(g) for g in grads])

    adapted, decays = expected_flags(variables, kwargs)
    if "exclusion" in case:  # the exclusions really select something
        assert not all(adapted) and any(adapted)
    assert [optimizer.variable_settings(v) for v in variables] == list(
        zip(adapted, decays)
    )
    expected = reference_run(
        weights, grad_steps, [lr] * len(grad_steps), adapted, decays, **hyper_of(kwargs)
    )
    assert_close_to_reference(variables, expected)


def test_learning_rate_schedule_and_callable():
    variables, weights, grad_steps = random_problem(seed=3, num_steps=4)
    # Keras's piecewise rule: values[0] while step <= boundaries[0], and so on.
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [1, 2], [2.0, 1.0, 0.5]
    )
    optimizer = lars_tf.LARS(learning_rate=schedule, weight_decay=1e-3)
    for grads in grad_steps:
        optimizer.apply_gradients(zip(grads, variables))
    expected = reference_run(
        weights,
        grad_steps,
        [2.0, 2.0, 1.0, 0.5],
        [True] * len(weights),
        [1e-3] * len(weights),
        **hyper_of({}),
    )
    assert_close_to_reference(variables, expected)

    variables, weights, grad_steps = random_problem(seed=4, num_steps=1)
    optimizer = lars_tf.LARS(learning_rate=lambda: 0.25)
    optimizer.apply_gradients(zip(grad_steps[0], variables))
    expected = reference_run(
        weights,
        grad_steps,
        [0.25],
        [True] * len(weights),
        [0.0] * len(weights),
        **hyper_of({}),
    )
    assert_close_to_reference(variables, expected)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_zero_norms_are_finite_and_match_reference(jit_compile):
    zero_weight = keras.Variable(np.zeros((3, 4), np.float32), name="zero_w")
    weight = keras.Variable(np.full((5,), 2.0, np.float32), name="w")
    variables = [zero_weight, weight]
    grad_steps = [
        [np.ones((3, 4), np.float32), np.zeros((5,), np.float32)],
        [np.zeros((3, 4), np.float32), np.zeros((5,), np.float32)],
        [np.full((3, 4), 0.5, np.float32), np.ones((5,), np.float32)],
    ]
    weights = [v.numpy() for v in variables]
    optimizer = lars_tf.LARS(
        learning_rate=0.1, weight_decay=1e-2, jit_compile=jit_compile
    )
    optimizer.apply_gradients(zip(grad_steps[0], variables))
    # By hand: ratio 1 for both (||w|| = 0, then ||g|| = 0), so the zero
    # weight moves by 0.1 * 1 and the other by 0.1 * (0 + 0.01 * 2).
    np.testing.assert_allclose(zero_weight.numpy(), np.full((3, 4), -0.1), rtol=1e-7)
    np.testing.assert_allclose(weight.numpy(), np.full((5,), 1.998), rtol=1e-7)
    for grads in grad_steps[1:]:
        optimizer.apply_gradients(zip(grads, variables))
    for v in variables:
        assert np.all(np.isfinite(v.numpy()))
    expected = reference_run(
        weights, grad_steps, [0.1] * 3, [True, True], [1e-2, 1e-2], **hyper_of({})
    )
    assert_close_to_reference(variables, expected)


@pytest.mark.parametrize("mode", ["graph", "own_jit", "outer_xla"])
def test_decayed_gradient_norm_guards_on_the_decayed_gradient(mode):
    """A zero gradient with weight decay: the paper's ratio is 1, optax's is eta/d."""

    def one_step(decayed_gradient_norm):
        weight = keras.Variable(np.full((5,), 2.0, np.float32), name="w")
        optimizer = lars_tf.LARS(
            learning_rate=0.1,
            momentum=0.0,
            weight_decay=1e-2,
            decayed_gradient_norm=decayed_gradient_norm,
            jit_compile=mode == "own_jit",
        )
        optimizer.build([weight])
        apply = tf.function(
            lambda g: optimizer.apply_gradients([(g, weight)]),
            jit_compile=mode == "outer_xla",
        )
        apply(tf.zeros((5,)))
        return weight.numpy()

    results = {form: one_step(form) for form in (False, True)}
    # By hand: ||g|| = 0 gives ratio 1, so w = 2 - 0.1 * 1 * (0 + 0.01 * 2);
    # ||g + d w|| = 0.02 * sqrt(5) gives ratio 0.001 * ||w|| / (d ||w||) = 0.1.
    np.testing.assert_allclose(results[False], np.full(5, 1.998), rtol=1e-7)
    np.testing.assert_allclose(results[True], np.full(5, 1.9998), rtol=1e-7)


def test_indexed_slices_equal_dense():
    rng = np.random.default_rng(7)
    table = rng.normal(size=(10, 4)).astype(np.float32)
    values = rng.normal(size=(3, 4)).astype(np.float32)
    indices = np.array([1, 7, 1])  # a repeated row is summed, as in dense
    dense = np.zeros_like(table)
    np.add.at(dense, indices, values)

    results = []
    for gradient in (
        tf.IndexedSlices(
            tf.constant(values), tf.constant(indices), tf.constant(table.shape)
        ),
        tf.constant(dense),
    ):
        variable = keras.Variable(table, name="embeddings")
        optimizer = lars_tf.LARS(learning_rate=0.5, weight_decay=1e-3)
        for _ in range(3):
            optimizer.apply_gradients([(gradient, variable)])
        results.append(variable.numpy())
    np.testing.assert_array_equal(results[0], results[1])

    # And an Embedding layer's real sparse gradient trains.
    model = keras.Sequential(
        [
            keras.Input((2,), dtype="int32"),
            keras.layers.Embedding(10, 4),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(lars_tf.LARS(0.1, trust_coefficient=0.01), "mse")
    history = model.fit(
        np.array([[1, 2], [3, 4]] * 8), np.ones((16, 1)), epochs=5, verbose=0
    )
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize(
    "base_kwargs, transform",
    [
        (
            dict(clipnorm=0.5),
            lambda gs: [g * min(1.0, 0.5 / np.linalg.norm(g)) for g in gs],
        ),
        (dict(clipvalue=0.3), lambda gs: [np.clip(g, -0.3, 0.3) for g in gs]),
        (
            dict(global_clipnorm=0.5),
            lambda gs: [
                g
                * min(
                    1.0,
                    0.5 / np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in gs)),
                )
                for g in gs
            ],
        ),
        (dict(loss_scale_factor=8.0), lambda gs: [g / 8.0 for g in gs]),
    ],
    ids=["clipnorm", "clipvalue", "global_clipnorm", "loss_scale_factor"],
)
def test_base_gradient_arguments(base_kwargs, transform):
    variables, weights, grad_steps = random_problem(seed=11, num_steps=2)
    optimizer = lars_tf.LARS(learning_rate=1.0, weight_decay=1e-3, **base_kwargs)
    for grads in grad_steps:
        optimizer.apply_gradients(zip(grads, variables))
    expected = reference_run(
        weights,
        [transform(gs) for gs in grad_steps],
        [1.0, 1.0],
        [True] * len(weights),
        [1e-3] * len(weights),
        **hyper_of({}),
    )
    assert_close_to_reference(variables, expected)


def test_gradient_accumulation():
    variables, weights, grad_steps = random_problem(seed=12, num_steps=4)
    optimizer = lars_tf.LARS(learning_rate=1.0, gradient_accumulation_steps=2)
    for grads in grad_steps:
        optimizer.apply_gradients(zip(grads, variables))
    averaged = [
        [(a + b) / 2 for a, b in zip(grad_steps[i], grad_steps[i + 1])] for i in (0, 2)
    ]
    expected = reference_run(
        weights,
        averaged,
        [1.0, 1.0],
        [True] * len(weights),
        [0.0] * len(weights),
        **hyper_of({}),
    )
    assert_close_to_reference(variables, expected)


def test_ema_tracks_weights():
    variables, weights, grad_steps = random_problem(seed=13, num_steps=1)
    optimizer = lars_tf.LARS(learning_rate=1.0, use_ema=True, ema_momentum=0.5)
    optimizer.apply_gradients(zip(grad_steps[0], variables))
    expected = reference_run(
        weights,
        grad_steps,
        [1.0],
        [True] * len(weights),
        [0.0] * len(weights),
        **hyper_of({}),
    )
    assert_close_to_reference(variables, expected)
    # Keras's EMA starts from the variable's value after the first update.
    for average, variable in zip(optimizer._model_variables_moving_average, variables):
        np.testing.assert_allclose(average.numpy(), variable.numpy(), rtol=1e-6)


def test_base_exclude_from_weight_decay_method_is_honoured():
    variables, weights, grad_steps = random_problem(seed=14, num_steps=2)
    optimizer = lars_tf.LARS(learning_rate=1.0, weight_decay=0.05)
    optimizer.exclude_from_weight_decay(var_names=["kernel"])
    for grads in grad_steps:
        optimizer.apply_gradients(zip(grads, variables))
    decays = [0.0 if "kernel" in v.name else 0.05 for v in variables]
    expected = reference_run(
        weights, grad_steps, [1.0, 1.0], [True] * len(weights), decays, **hyper_of({})
    )
    assert_close_to_reference(variables, expected)


def test_keras_decoupled_weight_decay_is_not_applied():
    optimizer = lars_tf.LARS(weight_decay=0.1)
    assert optimizer.weight_decay is None
    assert optimizer.get_config()["weight_decay"] == 0.1


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(learning_rate=-0.1), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(learning_rate=float("inf")), "learning_rate"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(trust_coefficient=0.0), "trust_coefficient"),
        (dict(trust_coefficient=-1.0), "trust_coefficient"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(epsilon=-1e-9), "epsilon"),
        (dict(momentum=0.0, nesterov=True), "nesterov"),
        (dict(exclude_from_adaptation=["bias", "bn("]), "exclude_from_adaptation"),
        (dict(exclude_from_weight_decay="bias"), "exclude_from_weight_decay"),
        (dict(exclude_from_weight_decay=[3]), "exclude_from_weight_decay"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=re.escape(f"`{argument}`")):
        lars_tf.LARS(**kwargs)


def test_every_saveable_class_is_exported():
    """Each class a lars_tf module registers with Keras is `lars_tf.<name>`."""
    registered = set()
    for info in pkgutil.iter_modules(lars_tf.__path__):
        module = importlib.import_module(f"lars_tf.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if keras.saving.get_registered_name(cls) == f"lars_tf>{name}":
                registered.add(name)
    assert {"LARS", "WarmupCosineDecay"} <= registered  # the search works
    assert registered <= set(lars_tf.__all__)
    for name in registered:
        assert getattr(lars_tf, name) is keras.saving.get_registered_object(
            f"lars_tf>{name}"
        )


def test_config_round_trip():
    optimizer = lars_tf.LARS(
        learning_rate=lars_tf.WarmupPolynomialDecay(
            2.0, decay_steps=100, warmup_steps=10
        ),
        momentum=0.8,
        weight_decay=1e-4,
        trust_coefficient=0.002,
        epsilon=1e-7,
        nesterov=True,
        clip=True,
        decayed_gradient_norm=True,
        exclude_from_adaptation=["bias", "bn"],
        exclude_from_weight_decay=lars_tf.exclude_bias_and_norm,
        jit_compile=True,
        clipnorm=1.0,
        name="my_lars",
    )
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(optimizer)))
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, lars_tf.LARS)
    got, want = restored.get_config(), optimizer.get_config()
    assert got == want
    assert restored.weight_decay_exclusion is lars_tf.exclude_bias_and_norm
    assert restored.exclude_from_adaptation == ["bias", "bn"]
    assert (
        restored.momentum,
        restored.coupled_weight_decay,
        restored.nesterov,
        restored.clip,
        restored.decayed_gradient_norm,
        restored.jit_compile,
        restored.clipnorm,
    ) == (0.8, 1e-4, True, True, True, True, 1.0)
    assert lars_tf.LARS().get_config()["decayed_gradient_norm"] is False


def test_fit_decreases_loss():
    x, y = fit_data()
    model = compiled_model(exclude_from_adaptation=lars_tf.exclude_bias_and_norm)
    history = model.fit(x, y, batch_size=16, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0], losses


def test_keras_save_load_continues_bit_identically(tmp_path):
    x, y = fit_data()
    fit = dict(batch_size=16, verbose=0, shuffle=False)
    straight = compiled_model(nesterov=True)
    straight.fit(x, y, epochs=4, **fit)

    first = compiled_model(nesterov=True)
    first.fit(x, y, epochs=2, **fit)
    path = str(tmp_path / "m.keras")
    first.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.optimizer, lars_tf.LARS)
    assert restored.optimizer.nesterov
    for a, b in zip(restored.optimizer.variables, first.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    restored.fit(x, y, epochs=2, **fit)
    for a, b in zip(restored.weights, straight.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_tf_train_checkpoint_round_trip(tmp_path):
    variables, weights, grad_steps = random_problem(seed=21, num_steps=4)
    optimizer = lars_tf.LARS(learning_rate=1.0, weight_decay=1e-3)
    for grads in grad_steps[:2]:
        optimizer.apply_gradients(zip(grads, variables))
    checkpoint = tf.train.Checkpoint(variables=variables, optimizer=optimizer)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    saved = [v.numpy() for v in variables]
    for grads in grad_steps[2:]:
        optimizer.apply_gradients(zip(grads, variables))
    continued = [v.numpy() for v in variables]

    # A fresh optimizer and fresh values, restored, continue identically.
    for v in variables:
        v.assign(np.zeros(v.shape, np.float32))
    fresh = lars_tf.LARS(learning_rate=1.0, weight_decay=1e-3)
    fresh.build(variables)
    tf.train.Checkpoint(variables=variables, optimizer=fresh).restore(path)
    for v, want in zip(variables, saved):
        np.testing.assert_array_equal(v.numpy(), want)
    assert int(fresh.iterations.numpy()) == 2
    for grads in grad_steps[2:]:
        fresh.apply_gradients(zip(grads, variables))
    for v, want in zip(variables, continued):
        np.testing.assert_array_equal(v.numpy(), want)


def test_backup_and_restore_resumes_identically(tmp_path):
    x, y = fit_data()
    fit = dict(batch_size=16, verbose=0, shuffle=False)
    straight = compiled_model()
    straight.fit(x, y, epochs=4, **fit)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("interrupted")

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    model = compiled_model()
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(x, y, epochs=4, callbacks=[backup, Interrupt()], **fit)
    resumed = compiled_model(seed=99)  # other initial weights: all is restored
    resumed.fit(x, y, epochs=4, callbacks=[backup], **fit)
    for a, b in zip(resumed.weights, straight.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_float32_slots(policy):
    x, y = fit_data()
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6, 6, 3))
        h = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
        h = keras.layers.BatchNormalization(name="bn1")(h)
        h = keras.layers.Flatten()(keras.layers.ReLU()(h))
        logits = keras.layers.Dense(5, name="fc", dtype="float32")(h)
        model = keras.Model(inputs, logits)
        model.compile(
            lars_tf.LARS(1.0, trust_coefficient=0.01, weight_decay=1e-4),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(x, y, batch_size=16, epochs=6, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    optimizer = model.optimizer
    if policy == "mixed_float16":
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        optimizer = optimizer.inner_optimizer
    assert isinstance(optimizer, lars_tf.LARS)
    assert {m.dtype for m in optimizer.momentums} == {"float32"}


def test_distributed_matches_single_device(check_scripts):
    """MirroredStrategy over 2 logical CPUs, in its own process."""
    report = check_scripts.run("lars_distributed_check.py")
    # Same global batch on one device and on two replicas: same weights.
    for jit in ("jit_off", "jit_on"):
        assert report[jit]["max_abs_diff_mirrored_vs_single"] < 1e-5, report
        assert report[jit]["mirrored_custom_loop_vs_fit"] < 1e-5, report
        assert report[jit]["moved"] > 0.1, report  # training really happened
    assert report["max_abs_diff_jit_on_vs_off"] < 1e-5, report
    assert report["skip_nonfinite_on_vs_off"] < 1e-6, report
    assert report["skip_nonfinite_iterations"] == 3 * 64 // 16, report
    # NaN on one replica at one step: no replica applies it; they stay equal.
    assert report["one_replica_nan_change"] == 0.0, report
    assert report["one_replica_nan_iterations"] == 3 * 64 // 16 - 1, report
    assert report["one_replica_nan_replicas_differ"] == 0.0, report
    assert report["one_replica_nan_finite"], report


def test_numpy_scalars_are_accepted():
    optimizer = lars_tf.LARS(
        learning_rate=np.float32(0.5),
        momentum=np.float32(0.9),
        weight_decay=np.float64(1e-4),
        trust_coefficient=np.float32(0.01),
        epsilon=np.float16(0),
    )
    config = optimizer.get_config()
    assert type(config["momentum"]) is float
    assert config["momentum"] == pytest.approx(0.9)
    assert config["weight_decay"] == 1e-4 and config["trust_coefficient"] > 0
    json.dumps(config)  # plain Python numbers: serializable


@pytest.mark.parametrize("jit_compile", [False, True])
def test_skip_nonfinite_leaves_weights_and_slots_then_continues(jit_compile):
    kwargs = dict(momentum=0.9, weight_decay=1e-3, nesterov=True)
    variables, weights, grad_steps = random_problem(seed=32, num_steps=4)
    grad_steps[2][3] = np.full_like(grad_steps[2][3], np.inf)  # one variable
    grad_steps[2][1] = grad_steps[2][1].copy()
    grad_steps[2][1].flat[0] = np.nan
    optimizer = lars_tf.LARS(
        learning_rate=1.5, skip_nonfinite=True, jit_compile=jit_compile, **kwargs
    )
    apply = tf.function(lambda grads: optimizer.apply_gradients(zip(grads, variables)))
    for step, grads in enumerate(grad_steps):
        before = [v.numpy() for v in variables + optimizer.variables]
        apply([tf.constant(g) for g in grads])
        if step == 2:
            for want, v in zip(before, variables + optimizer.variables):
                np.testing.assert_array_equal(v.numpy(), want, err_msg=v.path)
    assert int(optimizer.iterations.numpy()) == 3  # the skipped step not counted
    adapted, decays = expected_flags(variables, kwargs)
    finite_steps = grad_steps[:2] + grad_steps[3:]
    expected = reference_run(
        weights, finite_steps, [1.5] * 3, adapted, decays, **hyper_of(kwargs)
    )
    assert_close_to_reference(variables, expected)


def test_without_skip_a_nonfinite_gradient_poisons_its_variable():
    """The documented default: one NaN element, the whole variable and slot NaN.

    (Not a trust ratio of 1, which would apply the global rate to the rest.)
    """
    variables, _, grad_steps = random_problem(seed=33, num_steps=1)
    grads = [g.copy() for g in grad_steps[0]]
    grads[0].flat[0] = np.nan
    optimizer = lars_tf.LARS(learning_rate=1.0)
    optimizer.apply_gradients(zip(grads, variables))
    assert np.all(np.isnan(variables[0].numpy()))
    assert np.all(np.isnan(optimizer.momentums[0].numpy()))
    assert np.all(np.isfinite(variables[1].numpy()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(momentum=1.0), "`momentum` must be a finite number in [0, 1)"),
        (dict(momentum=np.float32("nan")), "`momentum` must be a finite number"),
        (
            dict(weight_decay=float("inf")),
            "`weight_decay` must be a finite number >= 0",
        ),
        (dict(trust_coefficient=0), "`trust_coefficient` must be a finite number > 0"),
        (dict(epsilon=True), "`epsilon` must be a finite number >= 0"),
    ],
)
def test_bad_arguments_name_the_allowed_range(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lars_tf.LARS(**kwargs)


def test_validation_module_needs_neither_keras_nor_tensorflow():
    """lars_tf/validation.py runs alone, with Keras and TensorFlow unimportable."""
    path = os.path.join(os.path.dirname(lars_tf.__file__), "validation.py")
    code = f"""
import importlib.util, sys
sys.modules["keras"] = sys.modules["tensorflow"] = None
spec = importlib.util.spec_from_file_location("validation", {path!r})
validation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(validation)
print(validation.check_momentum(0.9), validation.check_warmup_steps(5.0))
try:
    validation.check_momentum(1.5, "--momentum")
except ValueError as error:
    print(error)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "0.9 5",
        "`--momentum` must be a finite number in [0, 1). Received: 1.5",
    ]


@pytest.mark.parametrize(
    "check, value, message",
    [
        ("check_learning_rate", -1.0, "`learning_rate` must be a finite number >= 0"),
        ("check_weight_decay", float("nan"), "`weight_decay` must be a finite number"),
        (
            "check_trust_coefficient",
            0.0,
            "`trust_coefficient` must be a finite number > 0",
        ),
        ("check_epsilon", -1e-9, "`epsilon` must be a finite number >= 0"),
        ("check_power", 0.0, "`power` must be a finite number > 0"),
        ("check_warmup_steps", 2.5, "`warmup_steps` must be a whole number >= 0"),
        ("check_warmup_steps", -1, "`warmup_steps` must be a whole number >= 0"),
        ("check_decay_steps", 0, "`decay_steps` must be a whole number >= 1"),
    ],
)
def test_validation_names_argument_and_range(check, value, message):
    from lars_tf import validation

    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(validation, check)(value)
    assert validation.check_learning_rate(np.float32(0.5)) == 0.5
    with pytest.raises(ValueError, match=re.escape("`lr` must be a finite number > 0")):
        validation.check_learning_rate(0.0, "lr", allow_zero=False)
