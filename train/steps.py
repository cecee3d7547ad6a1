"""The device side of the training loop: the `tf.function`s `trainer.run` calls.

`make_step_functions` builds them: `train_loop` (up to N training steps in one
call, each `strategy.run(train_step)`), `evaluate` (one pass over a dataset)
and `average_statistics` (the replicas' BatchNormalization statistics to
their mean); `recompute_bn_statistics` is --precise_bn_examples. Built once
the mixed-precision policy is set: the steps normalize the uint8 pixels
(`data.normalize`) in its compute dtype, on the device.

Losses: the per-example cross-entropy (float32 logits, label smoothing through
one-hot labels) is summed and divided by the GLOBAL batch on every replica
(`tf.nn.compute_average_loss`), and the optimizer sums the replicas' gradients,
so the update is the gradient of the global-batch mean whatever the replica
count.

Non-finite steps: a step whose loss or gradients are not finite on any replica
is not applied on any: the weights, the BatchNormalization statistics, the
optimizer's slots and its iteration count stay as they were. `train_loop`
stops early after `--max_nonfinite_steps` of them in a row.
"""

from collections.abc import Callable
from typing import NamedTuple

import keras
import tensorflow as tf

from train import data, optimizers
from train.config import Config


class StepFunctions(NamedTuple):
    """The `tf.function`s of a run (see the module's docstring)."""

    train_loop: Callable
    evaluate: Callable
    average_statistics: Callable


def make_step_functions(
    config: Config,
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
) -> StepFunctions:
    """The training loop, one evaluation pass, and the averaging of the
    replicas' BatchNormalization statistics, for `model` under `strategy`."""
    train_step = _make_train_step(config, model, optimizer)
    return StepFunctions(
        train_loop=_make_train_loop(config, strategy, train_step),
        evaluate=_make_evaluate(config, strategy, model),
        average_statistics=_make_average_statistics(strategy, model),
    )


def _per_example_loss_fn(config: Config) -> Callable:
    """Cross-entropy per example, with `--label_smoothing`, in float32."""
    cross_entropy = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=config.label_smoothing, reduction=None
    )

    def per_example_loss(logits, labels):
        one_hot = tf.one_hot(labels, config.data.num_classes, dtype=tf.float32)
        return cross_entropy(one_hot, logits)

    return per_example_loss


def _make_forward_backward(
    config: Config, model: keras.Model, optimizer: keras.optimizers.Optimizer
) -> Callable:
    """images, labels -> this replica's loss (its share of the global-batch
    mean), correct predictions, and gradients (of the scaled loss)."""
    per_example_loss = _per_example_loss_fn(config)
    source = config.data
    compute_dtype = keras.mixed_precision.global_policy().compute_dtype
    l2_loss = optimizers.l2_loss_fn(config, model)

    def forward_backward(images, labels):
        images = data.normalize(images, source, compute_dtype)
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            loss = tf.nn.compute_average_loss(
                per_example_loss(logits, labels),
                global_batch_size=config.global_batch_size,
            )
            if l2_loss is not None:  # Counted once over the replicas.
                loss += tf.nn.scale_regularization_loss(l2_loss())
            scaled_loss = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, model.trainable_variables)
        correct = tf.reduce_sum(
            tf.cast(
                tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), "float32"
            )
        )
        return loss, correct, gradients

    if config.jit_compile:  # The optimizer's cross-replica update stays outside XLA.
        return tf.function(forward_backward, jit_compile=True)
    return forward_backward


def _make_train_step(
    config: Config, model: keras.Model, optimizer: keras.optimizers.Optimizer
) -> Callable:
    """One step on a replica, applied only if finite on every replica."""
    forward_backward = _make_forward_backward(config, model, optimizer)
    # With a loss scale, overflowing gradients are the scale's business: it
    # skips the step and lowers the scale. The guard then checks the loss only.
    check_gradients = not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def apply(gradients):
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))

    def restore(statistics):
        for variable, value in zip(model.non_trainable_variables, statistics):
            variable.assign(value)

    def train_step(batch):
        """One step on this replica; returns its loss, hits, and 1.0 when the
        step was skipped as non-finite on some replica (then on all), else 0."""
        images, labels = batch
        # The BN statistics before the forward pass updates them.
        statistics = [tf.identity(v.value) for v in model.non_trainable_variables]
        loss, correct, gradients = forward_backward(images, labels)
        finite = [tf.math.is_finite(loss)]
        if check_gradients:
            finite += [tf.reduce_all(tf.math.is_finite(g)) for g in gradients]
        replica = tf.distribute.get_replica_context()
        skipped = replica.all_reduce(
            "SUM", 1.0 - tf.cast(tf.reduce_all(finite), tf.float32)
        )
        skipped = tf.minimum(skipped, 1.0)  # The same on every replica.
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            tf.cond(skipped == 0, lambda: apply(gradients), lambda: restore(statistics))
        else:
            # As Keras's LossScaleOptimizer: a branch that calls merge_call (as
            # apply_gradients does) must be taken in the cross-replica context.
            def cross_replica(distribution, skipped, gradients, statistics):
                skip = distribution.experimental_local_results(skipped)[0] > 0
                for_each = distribution.extended.call_for_each_replica
                tf.cond(
                    skip,
                    lambda: for_each(restore, args=(statistics,)),
                    lambda: for_each(apply, args=(gradients,)),
                )

            replica.merge_call(cross_replica, args=(skipped, gradients, statistics))
        return loss, correct, skipped

    return train_step


def _make_train_loop(
    config: Config, strategy: tf.distribute.Strategy, train_step: Callable
) -> Callable:
    """`train_step` on every replica, up to N times in one `tf.function` call."""
    global_batch = config.global_batch_size
    max_in_a_row = config.max_nonfinite_steps

    @tf.function
    def train_loop(iterator, num_steps, in_a_row):
        """Runs up to `num_steps` steps, fewer when `--max_nonfinite_steps`
        non-finite steps come in a row. Returns the applied steps' mean loss
        and accuracy, the steps run, those skipped, and the skipped in a row."""
        loss_sum = tf.constant(0.0)
        correct_sum = tf.constant(0.0)
        applied = tf.constant(0.0)
        steps_run = tf.constant(0)
        skipped_sum = tf.constant(0)
        for _ in tf.range(num_steps):
            loss, correct, skipped = strategy.run(train_step, args=(next(iterator),))
            skipped = strategy.reduce("SUM", skipped, axis=None) > 0
            steps_run += 1
            if skipped:
                skipped_sum += 1
                in_a_row += 1
                if in_a_row >= max_in_a_row:
                    break
            else:
                in_a_row = tf.zeros_like(in_a_row)
                applied += 1.0
                loss_sum += strategy.reduce("SUM", loss, axis=None)
                correct_sum += strategy.reduce("SUM", correct, axis=None)
        mean_loss = tf.math.divide_no_nan(loss_sum, applied)
        accuracy = tf.math.divide_no_nan(correct_sum, applied * global_batch)
        return mean_loss, accuracy, steps_run, skipped_sum, in_a_row

    return train_loop


def _make_evaluate(
    config: Config, strategy: tf.distribute.Strategy, model: keras.Model
) -> Callable:
    """One pass over a distributed dataset: sums of loss, top-1 and top-k
    (k = 5, or the class count if fewer) hits, and examples."""
    per_example_loss = _per_example_loss_fn(config)
    source = config.data
    compute_dtype = keras.mixed_precision.global_policy().compute_dtype
    top_k = min(5, config.data.num_classes)

    def eval_sums(images, labels):
        images = data.normalize(images, source, compute_dtype)
        logits = tf.cast(model(images, training=False), tf.float32)
        top1 = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
        topk = tf.math.in_top_k(labels, logits, top_k)
        return tf.stack(
            [
                tf.reduce_sum(per_example_loss(logits, labels)),
                tf.reduce_sum(tf.cast(top1, tf.float32)),
                tf.reduce_sum(tf.cast(topk, tf.float32)),
                tf.cast(tf.shape(labels)[0], tf.float32),
            ]
        )

    def eval_step(batch):
        # The last, partial batch can leave a replica with no examples, on
        # which Keras's BatchNormalization fails: skip the model there.
        images, labels = batch
        return tf.cond(
            tf.shape(labels)[0] > 0,
            lambda: eval_sums(images, labels),
            lambda: tf.zeros([4]),
        )

    @tf.function
    def evaluate(dataset):
        """Sums of loss, top-1 and top-k hits and examples over `dataset`."""
        totals = tf.zeros([4])
        for batch in dataset:
            totals += strategy.reduce(
                "SUM", strategy.run(eval_step, args=(batch,)), axis=None
            )
        return totals

    return evaluate


def _make_average_statistics(
    strategy: tf.distribute.Strategy, model: keras.Model
) -> Callable:
    """Sets every replica's BatchNormalization statistics to their mean.

    Keras keeps one copy per replica, each updated from that replica's part of
    the batch, and evaluation reads the local copy: without this, results
    would depend on which replica evaluates which example.
    """

    @tf.function
    def average_statistics():
        for variable in model.non_trainable_variables:
            local = strategy.run(lambda v=variable: tf.identity(v.value))
            variable.assign(strategy.reduce("MEAN", local, axis=None))

    return average_statistics


def batch_norm_layers(layer: keras.layers.Layer) -> list:
    """The BatchNormalization layers of `layer`, nested models' included."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return [layer]
    found = []
    for inner in getattr(layer, "layers", ()):
        found += batch_norm_layers(inner)
    return found


def recompute_bn_statistics(
    config: Config,
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    iterator,
    num_batches: int,
) -> None:
    """Sets every BatchNormalization layer's moving mean and variance to the
    average over `num_batches` global batches from `iterator` of the global
    batch's statistics, computed with the weights as they are (precise BN).

    A training-mode forward pass with momentum 0 leaves each replica's batch
    mean m_r and variance v_r in its copy of the moving statistics; the global
    batch's (replicas' batches are equally big) are mean(m_r) and
    mean(v_r) + (mean(m_r**2) - mean(m_r)**2). With one replica they are the
    batch's own, exactly. Only the moving statistics change."""
    layers = batch_norm_layers(model)
    if not layers:
        return
    source = config.data
    compute_dtype = keras.mixed_precision.global_policy().compute_dtype

    def replica_moments(batch):
        images, _ = batch
        model(data.normalize(images, source, compute_dtype), training=True)
        # Copies: a variable's own value would come back as the variable,
        # whose reduction is the first replica's copy.
        return [
            (
                tf.identity(layer.moving_mean.value),
                tf.identity(layer.moving_variance.value),
                tf.square(layer.moving_mean.value),
            )
            for layer in layers
        ]

    @tf.function
    def average_moments(iterator, num_batches):
        sums = [(tf.zeros_like(layer.moving_mean.value),) * 2 for layer in layers]
        for _ in tf.range(num_batches):
            moments = tf.nest.map_structure(
                lambda value: strategy.reduce("MEAN", value, axis=None),
                strategy.run(replica_moments, args=(next(iterator),)),
            )
            sums = [
                (total_mean + mean, total_variance + variance + (square - mean**2))
                for (total_mean, total_variance), (mean, variance, square) in zip(
                    sums, moments
                )
            ]
        return sums

    momenta = [layer.momentum for layer in layers]
    for layer in layers:  # Read when the function is traced.
        layer.momentum = 0.0
    try:
        sums = average_moments(iterator, tf.constant(num_batches))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    with strategy.scope():  # Assigns every replica's copy.
        for layer, (total_mean, total_variance) in zip(layers, sums):
            layer.moving_mean.assign(total_mean / num_batches)
            layer.moving_variance.assign(total_variance / num_batches)
