"""LARS under MirroredStrategy on 2 logical CPUs versus one device.

Run by tests/test_lars.py in its own process (the logical devices must be
set before TensorFlow starts, and one process holds one MirroredStrategy).
Prints one JSON line of measured differences.
"""

import json

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402

import lars_tf  # noqa: E402

GLOBAL_BATCH = 16
EPOCHS = 3
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 6, 6, 3)).astype(np.float32)
y = rng.integers(0, 5, size=(64,)).astype(np.int32)


def make_model(jit_compile, skip_nonfinite=False):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3, name="conv1"),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(5, name="fc"),
        ]
    )
    model.compile(
        optimizer=lars_tf.LARS(
            learning_rate=2.0,
            weight_decay=1e-3,
            nesterov=True,
            exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
            jit_compile=jit_compile,
            skip_nonfinite=skip_nonfinite,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def fit(model):
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    return [w.numpy() for w in model.weights]


def custom_loop(strategy, model, poisoned_step=None):
    """strategy.run + apply_gradients, the way train/ trains.

    At `poisoned_step` (of the first epoch), replica 1's first gradient is NaN.
    Returns the final weights and, for that step, the largest change of any
    variable on any replica.
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="none"
    )
    dataset = strategy.distribute_datasets_from_function(
        lambda context: tf.data.Dataset.from_tensor_slices((x, y)).batch(
            context.get_per_replica_batch_size(GLOBAL_BATCH)
        )
    )
    # Slots are made here, not on the first traced step.
    model.optimizer.build(model.trainable_variables)

    def replica_step(images, labels, poison):
        with tf.GradientTape() as tape:
            per_example = loss_fn(labels, model(images, training=True))
            loss = tf.nn.compute_average_loss(
                per_example, global_batch_size=GLOBAL_BATCH
            )
        grads = tape.gradient(loss, model.trainable_variables)
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        poisoned = tf.logical_and(poison, tf.equal(replica, 1))
        grads[0] = grads[0] * tf.where(poisoned, np.float32("nan"), 1.0)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def train_step(images, labels, poison):
        strategy.run(replica_step, args=(images, labels, poison))

    def every_replica():
        return [
            v.numpy()
            for w in model.weights + model.optimizer.variables
            for v in strategy.experimental_local_results(w.value)
        ]

    change_at_poisoned_step = None
    for epoch in range(EPOCHS):
        for step, (images, labels) in enumerate(dataset):
            poison = epoch == 0 and step == poisoned_step
            before = every_replica() if poison else None
            train_step(images, labels, tf.constant(poison))
            if poison:
                change_at_poisoned_step = max_diff(before, every_replica())
    return [w.numpy() for w in model.weights], change_at_poisoned_step


def max_diff(a, b):
    return max(float(np.abs(u - v).max()) for u, v in zip(a, b))


strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
report = {}
for jit in (False, True):
    single = fit(make_model(jit))
    with strategy.scope():
        mirrored_model = make_model(jit)
    mirrored = fit(mirrored_model)
    with strategy.scope():
        loop_model = make_model(jit)
        looped, _ = custom_loop(strategy, loop_model)
    report["jit_on" if jit else "jit_off"] = {
        "max_abs_diff_mirrored_vs_single": max_diff(mirrored, single),
        "mirrored_custom_loop_vs_fit": max_diff(looped, mirrored),
        "moved": max_diff(single, [w.numpy() for w in make_model(jit).weights]),
        "weights": mirrored,
    }
# The replicas agree on the finite-gradient check (all finite here): same steps.
with strategy.scope():
    skipping_model = make_model(False, skip_nonfinite=True)
report["skip_nonfinite_on_vs_off"] = max_diff(
    fit(skipping_model), report["jit_off"]["weights"]
)
report["skip_nonfinite_iterations"] = int(skipping_model.optimizer.iterations.numpy())
# A NaN on one replica only: both replicas skip the step, and stay equal.
with strategy.scope():
    poisoned_model = make_model(False, skip_nonfinite=True)
    _, change = custom_loop(strategy, poisoned_model, poisoned_step=1)
report["one_replica_nan_change"] = change
report["one_replica_nan_iterations"] = int(poisoned_model.optimizer.iterations.numpy())
report["one_replica_nan_replicas_differ"] = max(
    max_diff(*strategy.experimental_local_results(w.value))
    for w in poisoned_model.weights
)
report["one_replica_nan_finite"] = all(
    np.all(np.isfinite(w.numpy())) for w in poisoned_model.weights
)
report["max_abs_diff_jit_on_vs_off"] = max_diff(
    report["jit_on"]["weights"], report["jit_off"]["weights"]
)
for key in ("jit_on", "jit_off"):
    del report[key]["weights"]
print(json.dumps(report))
