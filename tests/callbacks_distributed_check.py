"""TrustRatioMonitor under MirroredStrategy on 2 logical CPUs.

Run by tests/test_callbacks.py in its own process (the logical devices must be
set before TensorFlow starts, and one process holds one MirroredStrategy).
Trains with LARS and a WarmupPolynomialDecay schedule, once with model.fit and
once with a strategy.run custom loop driving the callbacks through
CallbackList, and compares the monitor's first and last measurements with
norms computed on a single-device copy of the weights. Prints one JSON line.
"""

import json

import keras
import numpy as np
import tensorflow as tf
from helpers import conv_bn_model

import lars_tf
from lars_tf import LearningRateWarmup, TrustRatioMonitor

GLOBAL_BATCH = 8
rng = np.random.default_rng(0)
x = rng.normal(size=(32, 6, 6, 2)).astype(np.float32)
y = rng.integers(0, 3, size=(32,)).astype(np.int32)
probe = (x[:GLOBAL_BATCH], y[:GLOBAL_BATCH])


def make_model():
    schedule = lars_tf.WarmupPolynomialDecay(2.0, decay_steps=8, warmup_steps=2)
    return conv_bn_model(
        lars_tf.LARS(schedule, trust_coefficient=0.01, weight_decay=1e-3)
    )


def reference_norms(weights):
    """Norms on a single-device model holding `weights`, via GradientTape."""
    model = make_model()  # Called outside any strategy scope.
    model.set_weights(weights)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(probe[1], model(probe[0], training=True))
    gradients = tape.gradient(loss, model.trainable_variables)
    return (
        np.array([np.linalg.norm(v.numpy()) for v in model.trainable_variables]),
        np.array([np.linalg.norm(g.numpy()) for g in gradients]),
    )


def relative_difference(got, want):
    """Largest |got - want| / want, with zero norms (fresh biases) compared exactly."""
    return float(np.max(np.abs(got - want) / np.maximum(want, 1e-30)))


def compare(monitor, first_weights, last_weights):
    diffs = {"weight": [], "gradient": []}
    for (_, stats), weights in zip(
        (monitor.history[0], monitor.history[-1]), (first_weights, last_weights)
    ):
        weight_norms, gradient_norms = reference_norms(weights)
        got_w = np.array([r.weight_norm for r in stats])
        got_g = np.array([r.gradient_norm for r in stats])
        diffs["weight"].append(relative_difference(got_w, weight_norms))
        diffs["gradient"].append(relative_difference(got_g, gradient_norms))
    return {
        "steps": [step for step, _ in monitor.history],
        "max_rel_diff_weight_norm": max(diffs["weight"]),
        "max_rel_diff_gradient_norm": max(diffs["gradient"]),
    }


def run_fit(strategy):
    with strategy.scope():
        model = make_model()
    first = model.get_weights()
    monitor = TrustRatioMonitor(probe, every_n_steps=2, measure_at_start=True)
    model.fit(
        x[:32],
        y[:32],
        batch_size=GLOBAL_BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[LearningRateWarmup(warmup_steps=2), monitor],
    )
    return compare(monitor, first, model.get_weights())


def run_custom_loop(strategy):
    with strategy.scope():
        model = make_model()
    first = model.get_weights()
    monitor = TrustRatioMonitor(probe, every_n_steps=2, measure_at_start=True)
    callbacks = keras.callbacks.CallbackList([monitor], model=model)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="none"
    )
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            per_example = loss_fn(labels, model(images, training=True))
            loss = tf.nn.compute_average_loss(
                per_example, global_batch_size=GLOBAL_BATCH
            )
        gradients = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def train_step(images, labels):
        losses = strategy.run(replica_step, args=(images, labels))
        return strategy.reduce("SUM", losses, axis=None)

    callbacks.on_train_begin()
    for step, (images, labels) in enumerate(
        strategy.experimental_distribute_dataset(dataset)
    ):
        callbacks.on_train_batch_begin(step)
        loss = train_step(images, labels)
        callbacks.on_train_batch_end(step, {"loss": loss})
    callbacks.on_train_end()
    return compare(monitor, first, model.get_weights())


def main():
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    report = {
        "replicas": strategy.num_replicas_in_sync,
        "fit": run_fit(strategy),
        "custom_loop": run_custom_loop(strategy),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
