"""lars_tf on one Keras backend, checked against float64 NumPy references.

Run by tests/test_backends.py once per backend, each in its own process with
KERAS_BACKEND set (Keras picks its backend at import). Prints one JSON line of
measured differences; the test decides what is close enough. With
`--without-tensorflow`, TensorFlow cannot be imported, as on a machine where it
is not installed.
"""

import argparse
import itertools
import json
import math
import os
import sys
import tempfile

if "--without-tensorflow" in sys.argv:
    sys.modules["tensorflow"] = None  # `import tensorflow` now fails.

import keras  # noqa: E402
import numpy as np  # noqa: E402
from helpers import (  # noqa: E402
    CASES,
    FORMS,
    compiled_model,
    expected_flags,
    fit_data,
    hyper_of,
    random_problem,
    reference_step,
)

import lars_tf  # noqa: E402


def reference_run(weights, grad_steps, lr, adapted, decays, kwargs, skip=()):
    hyper = hyper_of(kwargs)
    weights = [w.astype(np.float64) for w in weights]
    velocities = [np.zeros_like(w) for w in weights]
    for step, grads in enumerate(grad_steps):
        if step in skip:
            continue
        for i, g in enumerate(grads):
            weights[i], velocities[i] = reference_step(
                weights[i], velocities[i], g, lr,
                weight_decay=decays[i], adapted=adapted[i], **hyper,
            )  # fmt: skip
    return weights, velocities


def relative_error(got, want):
    """Largest |got - want|, relative to the largest |want| of each array."""
    return max(
        float(
            np.abs(keras.ops.convert_to_numpy(g) - w).max()
            / max(np.abs(w).max(), 1e-30)
        )
        for g, w in zip(got, want, strict=True)
    )


def check_reference_cases():
    errors = {}
    for (case, kwargs), (form, form_kwargs) in itertools.product(
        CASES.items(), FORMS.items()
    ):
        kwargs = dict(kwargs, **form_kwargs)
        variables, weights, grad_steps = random_problem(seed=len(case), num_steps=3)
        lr = 0.7 if kwargs.get("clip") else 1.5
        optimizer = lars_tf.LARS(learning_rate=lr, **kwargs)
        for grads in grad_steps:
            optimizer.apply_gradients(zip(grads, variables))
        adapted, decays = expected_flags(variables, kwargs)
        want, _ = reference_run(weights, grad_steps, lr, adapted, decays, kwargs)
        errors[f"{case}/{form}"] = relative_error(variables, want)
    return errors


def check_zero_norms():
    """Zero weight, then zero gradient: ratio 1, moves at the global rate."""
    zero_weight = keras.Variable(np.zeros((3, 4), np.float32), name="zero_w")
    weight = keras.Variable(np.full((5,), 2.0, np.float32), name="w")
    optimizer = lars_tf.LARS(learning_rate=0.1, weight_decay=1e-2)
    optimizer.apply_gradients(
        [(np.ones((3, 4), np.float32), zero_weight), (np.zeros(5, np.float32), weight)]
    )
    # By hand: -0.1 * 1, and 2 - 0.1 * (0 + 0.01 * 2).
    return relative_error(
        [zero_weight, weight], [np.full((3, 4), -0.1), np.full(5, 1.998)]
    )


def check_skip_nonfinite():
    """A NaN gradient at step 1 changes nothing; the steps after go on as if absent."""
    kwargs = dict(momentum=0.9, weight_decay=1e-3, skip_nonfinite=True)
    variables, weights, grad_steps = random_problem(seed=5, num_steps=4)
    grad_steps[1][0] = grad_steps[1][0].copy()
    grad_steps[1][0].flat[3] = np.nan
    optimizer = lars_tf.LARS(learning_rate=1.5, **kwargs)
    report = {}
    for step, grads in enumerate(grad_steps):
        before = [
            keras.ops.convert_to_numpy(v) for v in variables + optimizer.variables
        ]
        optimizer.apply_gradients(zip(grads, variables))
        if step == 1:
            after = [
                keras.ops.convert_to_numpy(v) for v in variables + optimizer.variables
            ]
            report["changed_by_nan_step"] = max(
                float(np.abs(a - b).max()) for a, b in zip(after, before)
            )
    adapted, decays = expected_flags(variables, kwargs)
    want, velocities = reference_run(
        weights, grad_steps, 1.5, adapted, decays, kwargs, skip={1}
    )
    report["weights_vs_reference"] = relative_error(variables, want)
    report["slots_vs_reference"] = relative_error(
        optimizer.momentums, [-v for v in velocities]
    )
    report["iterations"] = int(keras.ops.convert_to_numpy(optimizer.iterations))
    return report


def check_fit_and_save_load():
    x, y = fit_data()
    fit = dict(batch_size=16, verbose=0, shuffle=False)
    kwargs = dict(nesterov=True, exclude_from_adaptation=lars_tf.exclude_bias_and_norm)
    straight = compiled_model(**kwargs)
    losses = straight.fit(x, y, epochs=4, **fit).history["loss"]

    first = compiled_model(**kwargs)
    first.fit(x, y, epochs=2, **fit)
    path = os.path.join(tempfile.mkdtemp(), "m.keras")
    first.save(path)
    restored = keras.saving.load_model(path)
    slots_after_load = relative_error(
        restored.optimizer.variables,
        [keras.ops.convert_to_numpy(v) for v in first.optimizer.variables],
    )
    restored.fit(x, y, epochs=2, **fit)
    return {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "restored_class": type(restored.optimizer).__name__,
        "restored_config_equal": restored.optimizer.get_config()
        == first.optimizer.get_config(),
        "slots_after_load_max_diff": slots_after_load,
        "resumed_vs_straight": relative_error(
            restored.weights, [keras.ops.convert_to_numpy(w) for w in straight.weights]
        ),
    }


# A linear layer with a mean-squared-error loss, whose gradient is known by
# hand, trained by LARS on a schedule that reads the optimizer's step count.
LINEAR_SCHEDULE = dict(peak_learning_rate=0.5, decay_steps=20, warmup_steps=4)


def linear_model(steps_per_execution=1):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
    model.compile(
        lars_tf.LARS(
            lars_tf.WarmupPolynomialDecay(**LINEAR_SCHEDULE),
            momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, nesterov=True,
            exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
        ),
        "mean_squared_error",
        steps_per_execution=steps_per_execution,
    )  # fmt: skip
    model.layers[0].bias.assign(np.linspace(-1, 1, 3).astype(np.float32))
    return model


def linear_batches(num_steps):
    rng = np.random.default_rng(7)
    return [
        (rng.normal(size=(8, 4)).astype(np.float32),
         rng.normal(size=(8, 3)).astype(np.float32))
        for _ in range(num_steps)
    ]  # fmt: skip


def check_steps_per_execution():
    """`model.fit` with `steps_per_execution=2` against 1, for 8 steps.

    The schedule must see each step's count, not each execution's. Returns
    None where the backend has no `steps_per_execution` (PyTorch).
    """
    if keras.backend.backend() == "torch":
        return None
    x, y = (np.concatenate(arrays) for arrays in zip(*linear_batches(8)))
    weights = []
    for steps_per_execution in (1, 2):
        model = linear_model(steps_per_execution)
        initial = [keras.ops.convert_to_numpy(w) for w in model.weights]
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        weights.append([keras.ops.convert_to_numpy(w) for w in model.weights])
    return {
        "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "two_vs_one": relative_error(weights[1], weights[0]),
        "moved": relative_error(weights[0], initial),
    }


def save_for_other_backends(directory):
    """Two steps of `linear_model`, saved as `.keras` with what it holds.

    `state.npz` keeps the weights, slots and step count (in the order the
    `.keras` file keeps them; variable paths differ between backends) and the
    next batch, apart from the `.keras` format, for `check_load_saved`.
    """
    model = linear_model()
    batches = linear_batches(3)
    for x, y in batches[:2]:
        model.train_on_batch(x, y)
    model.save(os.path.join(directory, "model.keras"))
    numpy = keras.ops.convert_to_numpy
    state = {f"weight_{i}": numpy(w) for i, w in enumerate(model.weights)}
    state.update(
        {f"slot_{i}": numpy(m) for i, m in enumerate(model.optimizer.momentums)}
    )
    state["iterations"] = numpy(model.optimizer.iterations)
    x, y = batches[2]
    np.savez(os.path.join(directory, "state.npz"), x=x, y=y, **state)
    slots = [state[f"slot_{i}"] for i in range(len(model.optimizer.momentums))]
    return {"smallest_slot_max": min(float(np.abs(m).max()) for m in slots)}


def check_load_saved(directory):
    """Loads `save_for_other_backends`'s model and takes one more step.

    The loaded weights, slots and step count must equal the saved ones, and the
    step must match Algorithm 1 in float64 from the saved state, with the
    gradient of the mean squared error by hand and the schedule's rate at the
    saved step.
    """
    # Loading needs the classes the file names defined (lars_tf/__init__.py):
    # LARS alone, which also defines the schedule this model uses.
    from lars_tf import LARS  # noqa: F401

    saved = dict(np.load(os.path.join(directory, "state.npz")))
    model = keras.saving.load_model(os.path.join(directory, "model.keras"))
    optimizer = model.optimizer
    weights = [saved[f"weight_{i}"] for i in range(len(model.weights))]
    slots = [saved[f"slot_{i}"] for i in range(len(optimizer.momentums))]
    iterations = saved["iterations"]
    report = {
        "class": type(optimizer).__name__,
        "variables": [len(model.weights), len(optimizer.momentums), len(saved)],
        "weights_max_diff": relative_error(model.weights, weights),
        "slots_max_diff": relative_error(optimizer.momentums, slots),
        "iterations": [
            int(iterations),
            int(keras.ops.convert_to_numpy(optimizer.iterations)),
        ],
    }
    x, y = saved["x"].astype(np.float64), saved["y"].astype(np.float64)
    kernel, bias = (w.astype(np.float64) for w in weights)
    residual = x @ kernel + bias - y
    gradients = [
        2 * x.T @ residual / residual.size,
        2 * residual.sum(0) / residual.size,
    ]
    peak, warmup = (
        LINEAR_SCHEDULE["peak_learning_rate"],
        LINEAR_SCHEDULE["warmup_steps"],
    )
    learning_rate = peak * int(iterations) / warmup  # still warming up
    want_weights, want_slots = [], []
    for weight, slot, gradient, adapted in zip(
        (kernel, bias), slots, gradients, (True, False)
    ):
        w, v = reference_step(
            weight, -slot.astype(np.float64), gradient, learning_rate,
            momentum=0.9, weight_decay=1e-2, eta=0.02, epsilon=0.0, nesterov=True,
            clip=False, adapted=adapted,
        )  # fmt: skip
        want_weights.append(w)
        want_slots.append(-v)
    model.train_on_batch(saved["x"], saved["y"])
    report["step_vs_reference"] = relative_error(model.weights, want_weights)
    report["slots_vs_reference"] = relative_error(optimizer.momentums, want_slots)
    return report


def check_config_round_trip():
    optimizer = lars_tf.LARS(
        learning_rate=lars_tf.WarmupPolynomialDecay(2.0, 100, warmup_steps=10),
        momentum=0.8, weight_decay=1e-4, trust_coefficient=0.002, epsilon=1e-7,
        nesterov=True, clip=True, decayed_gradient_norm=True,
        exclude_from_adaptation=["bias", "bn"],
        exclude_from_weight_decay=lars_tf.exclude_bias_and_norm, skip_nonfinite=True,
        clipnorm=1.0, name="my_lars",
    )  # fmt: skip
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(optimizer)))
    restored = keras.saving.deserialize_keras_object(config)
    return (
        restored.get_config() == optimizer.get_config()
        and restored.weight_decay_exclusion is lars_tf.exclude_bias_and_norm
        and restored.decayed_gradient_norm is True
    )


def check_mixed_precision(policy):
    x, y = fit_data()
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6, 6, 3))
        h = keras.layers.Conv2D(4, 3)(inputs)
        h = keras.layers.Flatten()(keras.layers.ReLU()(h))
        logits = keras.layers.Dense(5, dtype="float32")(h)
        model = keras.Model(inputs, logits)
        model.compile(
            lars_tf.LARS(1.0, trust_coefficient=0.01, weight_decay=1e-4),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        losses = model.fit(x, y, batch_size=16, epochs=4, verbose=0).history["loss"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    return {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "finite": bool(np.all(np.isfinite(losses))),
        "slot_dtypes": sorted({str(m.dtype) for m in optimizer.momentums}),
    }


def applied_rates(learning_rate, warmup, steps=8):
    """The rate each step applied, with a unit gradient: w * 1 toward -100 (MAE).

    Also runs `Throughput`, and returns its number of timed steps.
    """
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
        ]
    )
    model.compile(keras.optimizers.SGD(learning_rate), loss="mean_absolute_error")
    weights = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            # Through `self.model`: on JAX that attaches the step's state.
            weight = keras.ops.convert_to_numpy(self.model.weights[0])
            weights.append(float(weight.ravel()[0]))

    ones = np.ones((steps, 1), np.float32)
    throughput = lars_tf.Throughput(batch_size=1, skip_steps=2)
    model.fit(ones, -100 * ones, batch_size=1, shuffle=False, verbose=0,
              callbacks=[warmup, Record(), throughput])  # fmt: skip
    return -np.diff([0.0, *weights]), len(throughput.step_times)


def check_schedule_and_warmup():
    """`LearningRateWarmup` on a schedule and on a constant rate, by hand."""
    schedule = lars_tf.WarmupPolynomialDecay(0.5, decay_steps=20)
    scheduled, timed_steps = applied_rates(
        schedule, lars_tf.LearningRateWarmup(warmup_steps=4)
    )
    steps = np.arange(8, dtype=np.float64)
    poly = 0.5 * (1 - steps / 20) ** 2
    expected = np.where(steps < 4, poly * steps / 4, poly)
    constant, _ = applied_rates(
        0.7, lars_tf.LearningRateWarmup(warmup_steps=3, initial_learning_rate=0.1)
    )
    ramp = [0.1, 0.3, 0.5] + [0.7] * 5
    return {
        "schedule_max_abs_diff": float(np.abs(scheduled - expected).max()),
        "constant_max_abs_diff": float(np.abs(constant - ramp).max()),
        "throughput_timed_steps": timed_steps,
    }


def check_monitor(decayed_gradient_norm=False):
    """Norms and rates of a linear model with an MSE loss, whose gradient is known.

    The weight decay is large, so that the two forms of the ratio give kernel
    rates 0.6% apart, far beyond the tolerance.
    """
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.normal(size=(8, 3)).astype(np.float32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
    model.compile(
        lars_tf.LARS(0.5, weight_decay=0.5, trust_coefficient=0.02,
                     exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
                     decayed_gradient_norm=decayed_gradient_norm),
        "mean_squared_error",
    )  # fmt: skip
    model.layers[0].bias.assign(rng.normal(size=3).astype(np.float32))
    monitor = lars_tf.TrustRatioMonitor((x, y))
    monitor.set_model(model)
    stats = monitor.measure()
    kernel, bias = (
        keras.ops.convert_to_numpy(v).astype(np.float64) for v in model.weights
    )
    residual = x.astype(np.float64) @ kernel + bias - y
    grads = [2 * x.T @ residual / residual.size, 2 * residual.sum(0) / residual.size]
    w_norms = np.array([np.linalg.norm(kernel), np.linalg.norm(bias)])
    g_norms = np.array([np.linalg.norm(g) for g in grads])
    if decayed_gradient_norm:
        denominator = np.linalg.norm(grads[0] + 0.5 * kernel)
    else:
        denominator = g_norms[0] + 0.5 * w_norms[0]
    kernel_rate = 0.5 * 0.02 * w_norms[0] / denominator
    return {
        "names": [row.name for row in stats],
        "weight_norms": relative_error([[r.weight_norm for r in stats]], [w_norms]),
        "gradient_norms": relative_error([[r.gradient_norm for r in stats]], [g_norms]),
        "rates": relative_error(
            [[r.effective_learning_rate for r in stats]], [np.array([kernel_rate, 0.5])]
        ),
    }


OPTAX_SCALES = (1.0, 1e-3, 1e-5)


def check_optax(steps=20):
    """`optax.lars` and `lars_tf.LARS` in both forms, on JAX, per gradient scale.

    Four variables, constant rate, momentum 0.9, weight decay 1e-4, eta 1e-3,
    epsilon 0; the same random gradients, multiplied by each scale. Each
    figure is the largest weight difference to optax after `steps` steps,
    relative to the largest distance optax moved that variable. None where
    the backend is not JAX or optax is not installed.
    """
    if keras.backend.backend() != "jax":
        return None
    try:
        import optax
    except ImportError:
        return None
    import jax.numpy as jnp

    rng = np.random.default_rng(17)
    shapes = [(3, 3, 2, 4), (4,), (8, 5), (5,)]
    initial = [rng.normal(size=shape).astype(np.float32) for shape in shapes]
    unit_gradients = [
        [rng.normal(size=shape).astype(np.float32) for shape in shapes]
        for _ in range(steps)
    ]
    hyper = dict(learning_rate=2.0, momentum=0.9, weight_decay=1e-4,
                 trust_coefficient=1e-3)  # fmt: skip
    report = {}
    for scale in OPTAX_SCALES:
        gradients = [[scale * g for g in step] for step in unit_gradients]
        transform = optax.lars(**hyper, eps=0.0)
        params = [jnp.asarray(w) for w in initial]
        state = transform.init(params)
        for step in gradients:
            updates, state = transform.update(
                [jnp.asarray(g) for g in step], state, params
            )
            params = optax.apply_updates(params, updates)
        want = [np.asarray(p, np.float64) for p in params]
        moved = [np.abs(w - w0).max() for w, w0 in zip(want, initial, strict=True)]
        for form, form_kwargs in FORMS.items():
            variables = [keras.Variable(w) for w in initial]
            optimizer = lars_tf.LARS(**hyper, epsilon=0.0, **form_kwargs)
            for step in gradients:
                optimizer.apply_gradients(zip(step, variables))
            report[f"{scale:g}/{form}"] = max(
                float(np.abs(keras.ops.convert_to_numpy(v) - w).max() / m)
                for v, w, m in zip(variables, want, moved, strict=True)
            )
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--without-tensorflow", action="store_true")
    parser.add_argument("--save-to", help="folder for save_for_other_backends")
    parser.add_argument("--load-from", help="a --save-to folder to check_load_saved")
    args = parser.parse_args()
    backend = keras.backend.backend()
    policies = ["mixed_bfloat16"] + (["mixed_float16"] if backend != "torch" else [])
    report = {
        "backend": backend,
        "reference": check_reference_cases(),
        "zero_norms": check_zero_norms(),
        "skip_nonfinite": check_skip_nonfinite(),
        "config_round_trip": check_config_round_trip(),
        "fit_save_load": check_fit_and_save_load(),
        "mixed_precision": {p: check_mixed_precision(p) for p in policies},
        "warmup": check_schedule_and_warmup(),
        "monitor": {form: check_monitor(**kwargs) for form, kwargs in FORMS.items()},
        "steps_per_execution": check_steps_per_execution(),
        "optax": check_optax(),
    }
    if args.save_to:
        report["saved"] = save_for_other_backends(args.save_to)
    if args.load_from:
        report["loaded"] = check_load_saved(args.load_from)
    report["tensorflow_imported"] = sys.modules.get("tensorflow") is not None
    print(json.dumps(report, default=lambda v: None if math.isnan(v) else v))


if __name__ == "__main__":
    main()
