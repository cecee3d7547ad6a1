"""The custom training loop of `python -m train.main`.

Read top to bottom: the strategy is built once; the model, optimizer, step
counter and checkpoint are created in its scope; a checkpoint is restored if
the model dir has one; then training runs in loops of `--steps_per_loop` steps,
each loop one `tf.function` call of `strategy.run(train_step)`; between loops
the host logs, writes summaries, evaluates, checkpoints and calls the Keras
callbacks.

Why a custom loop: Keras 3.15's `model.fit` fails under
`MultiWorkerMirroredStrategy`, and `compile(jit_compile=True)` under
`MirroredStrategy` on CPU. The loop below is the same for every strategy.

Losses: the per-example cross-entropy (float32 logits, label smoothing through
one-hot labels) is summed and divided by the GLOBAL batch on every replica
(`tf.nn.compute_average_loss`), and the optimizer sums the replicas' gradients,
so the update is the gradient of the global-batch mean whatever the replica
count.

Exact resume: training data is an endless seeded stream (`train.data` shuffles
with a fixed seed and repeats), and a resumed run skips the batches that the
restored step already consumed (as undecoded records: cheap), so it sees the
same batches as an uninterrupted run; with `--deterministic` the final metrics
are the same.
"""

import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import flags
from tensorflow.core.framework import summary_pb2

import lars_tf
from train import FlagError, data, models, optimizers

# `--source=auto` without MNIST trains on synthetic data of MNIST's shape.
AUTO_SYNTHETIC = data.DatasetInfo(10, 60_000, 10_000, 3)
NATURAL_IMAGE_SIZE = {"mnist": 28, "fashion_mnist": 28}
DEFAULT_AUGMENTATION = {"imagenet": "minimal", "tfds": "minimal"}  # Else none.
DEFAULT_IMAGE_SIZE = 224
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


def make_strategy(f: flags.FlagValues) -> tf.distribute.Strategy:
    """The strategy of `--strategy`, after splitting the CPU if asked.

    Must run before TensorFlow touches a device (logical devices are fixed
    from then on); hence one strategy per process.
    """
    if f.num_cpu_devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * f.num_cpu_devices
        )
    if f.strategy == "one_device":
        device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if f.strategy == "mirrored":
        devices = None  # All GPUs, else the CPU.
        if f.num_cpu_devices and not tf.config.list_physical_devices("GPU"):
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if f.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if f.strategy == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=f.tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints, summaries and logs."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


@dataclasses.dataclass
class Schedule:
    """Training length and the step intervals of the loop's events."""

    steps_per_epoch: int
    train_steps: int
    warmup_steps: int
    checkpoint_every: int
    eval_every: int  # 0: only at the end.

    def next_stop(self, step: int, f: flags.FlagValues) -> int:
        """First step after `step` where the host must act (log, save, ...)."""
        stops = [
            self.train_steps,
            step + f.steps_per_loop,
            _next_multiple(step, f.log_every_steps),
            _next_multiple(step, self.steps_per_epoch),
            _next_multiple(step, self.checkpoint_every),
        ]
        if self.eval_every:
            stops.append(_next_multiple(step, self.eval_every))
        return min(stops)


def _next_multiple(step: int, interval: int) -> int:
    return (step // interval + 1) * interval


def make_schedule(f: flags.FlagValues, info: data.DatasetInfo) -> Schedule:
    """Converts the flags' epochs to steps; checks what needs the dataset size."""
    steps_per_epoch = info.num_train_examples // f.global_batch_size
    if steps_per_epoch < 1:
        raise FlagError(
            "global_batch_size",
            f"{f.global_batch_size} exceeds the {info.num_train_examples} "
            "training examples",
        )
    train_steps = f.train_steps or round(f.train_epochs * steps_per_epoch)
    warmup_steps = round(f.warmup_epochs * steps_per_epoch)
    if warmup_steps >= train_steps:
        raise FlagError(
            "warmup_epochs",
            f"{f.warmup_epochs} epochs = {warmup_steps} steps is not shorter "
            f"than training ({train_steps} steps)",
        )
    return Schedule(
        steps_per_epoch=steps_per_epoch,
        train_steps=train_steps,
        warmup_steps=warmup_steps,
        checkpoint_every=f.checkpoint_every_steps or steps_per_epoch,
        eval_every=round(f.epochs_between_evals * steps_per_epoch),
    )


class PreemptionFlag:
    """Set by SIGTERM; the loop saves a checkpoint and exits at its next stop."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True


def run(
    f: flags.FlagValues,
    *,
    source: str,
    flag_dict: dict | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict:
    """Trains and evaluates as `f` says; returns (and writes) the JSON summary.

    Args:
      f: parsed and validated flags (see `train.main.define_flags`).
      source: the concrete data source (`--source=auto` resolved).
      flag_dict: the flags recorded in summary.json; default: `f`'s values.
      callbacks: extra Keras callbacks, called between loops (`batch` is the
        loop's last step; logs hold the loop's mean loss and accuracy and the
        learning rate; `on_epoch_end` logs add `val_*` after an evaluation).
    """
    wall_start = time.time()
    preemption = PreemptionFlag()  # From now on SIGTERM means "save and exit".
    strategy = make_strategy(f)  # First: it fixes the devices.
    replicas = strategy.num_replicas_in_sync
    if f.global_batch_size % replicas:
        raise FlagError(
            "global_batch_size",
            f"{f.global_batch_size} is not divisible by the {replicas} replicas",
        )
    chief = is_chief(strategy)
    if f.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(f.seed)
    keras.mixed_precision.set_global_policy(f.precision)

    # Data.
    if source == "synthetic" and f.source == "auto":
        info = dataclasses.replace(
            AUTO_SYNTHETIC, num_classes=f.num_classes or AUTO_SYNTHETIC.num_classes
        )
        image_size = f.image_size or 28
    else:
        info = data.dataset_info(
            source, f.data_dir, f.tfds_name, num_classes=f.num_classes
        )
        image_size = f.image_size or NATURAL_IMAGE_SIZE.get(source, DEFAULT_IMAGE_SIZE)
    schedule = make_schedule(f, info)
    input_dtype = keras.mixed_precision.global_policy().compute_dtype
    common = dict(
        source=source,
        data_dir=f.data_dir,
        global_batch_size=f.global_batch_size,
        image_size=image_size,
        dtype=input_dtype,
        seed=f.seed,
        tfds_name=f.tfds_name,
        num_classes=info.num_classes,
        cache=f.cache,
        deterministic=f.deterministic,
    )
    augmentation = f.augmentation or DEFAULT_AUGMENTATION.get(source, "none")
    train_input_fn = data.make_input_fn(
        split="train", augmentation=augmentation, **common
    )
    eval_input_fn = data.make_input_fn(split="validation", **common)

    # Model, optimizer and checkpoint, in the strategy's scope.
    with strategy.scope():
        model = models.build_model(f.model, info.num_classes, image_size, info.channels)
        learning_rate = optimizers.learning_rate_schedule(
            f, schedule.steps_per_epoch, schedule.train_steps
        )
        optimizer = optimizers.build_optimizer(f, learning_rate, model)
        # Where compile() would put it: Keras callbacks (LearningRateWarmup,
        # TrustRatioMonitor, ...) look for the optimizer there.
        model.optimizer = optimizer
        step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, step=step_counter
        )
    model_dir = f.model_dir
    write_dir = model_dir if chief else _worker_temp_dir(strategy, model_dir)
    manager = tf.train.CheckpointManager(
        checkpoint, write_dir, max_to_keep=f.keep_checkpoints, step_counter=step_counter
    )
    latest = tf.train.latest_checkpoint(model_dir)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
    start_step = int(step_counter.numpy())
    log = print if chief else (lambda *args, **kwargs: None)
    log(
        f"{f.model} on {source} ({info.num_classes} classes, {image_size}x"
        f"{image_size}x{info.channels}), {f.optimizer} at global batch "
        f"{f.global_batch_size} on {replicas} replica(s) ({f.strategy}); "
        f"{schedule.train_steps} steps, {schedule.steps_per_epoch} per epoch"
        + (f"; resumed at step {start_step} from {latest}" if latest else "")
    )

    # The training data resumes where the restored step left it: each input
    # pipeline feeds its local replicas one batch each per step.
    def train_dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        batches_per_step = context.num_replicas_in_sync // context.num_input_pipelines
        return train_input_fn(context, skip_batches=start_step * batches_per_step)

    train_iterator = iter(strategy.distribute_datasets_from_function(train_dataset_fn))
    eval_dataset = strategy.distribute_datasets_from_function(eval_input_fn)
    train_loop, evaluate = _make_step_functions(f, strategy, model, optimizer, info)

    summary_writers = {
        name: tf.summary.create_file_writer(os.path.join(model_dir, name))
        if chief
        else tf.summary.create_noop_writer()
        for name in ("train", "eval")
    }
    callbacks = list(callbacks)
    if f.trust_ratio_every_steps:
        monitor = _trust_ratio_monitor(f, train_input_fn, model_dir if chief else None)
        callbacks.append(monitor)
    callback_list = keras.callbacks.CallbackList(callbacks, model=model)
    train_logs: dict[str, float] = {}
    eval_logs: dict[str, float] = {}
    # Throughput leaves out the first loop, which includes tracing.
    images_trained, train_seconds, steady_images, steady_seconds = 0, 0.0, 0, 0.0
    last_saved = start_step if latest else None  # The same on every worker.
    step = start_step
    callback_list.on_train_begin()
    while step < schedule.train_steps:
        if step % schedule.steps_per_epoch == 0:
            callback_list.on_epoch_begin(step // schedule.steps_per_epoch)
        stop = schedule.next_stop(step, f)
        callback_list.on_train_batch_begin(step)
        loop_start = time.time()
        loss, accuracy = train_loop(train_iterator, tf.constant(stop - step))
        loss, accuracy = float(loss), float(accuracy)  # Waits for the loop.
        seconds = time.time() - loop_start
        images = (stop - step) * f.global_batch_size
        if images_trained:
            steady_images += images
            steady_seconds += seconds
        images_trained += images
        train_seconds += seconds
        step = stop
        step_counter.assign(step)
        train_logs = {
            "loss": loss,
            "accuracy": accuracy,
            "learning_rate": float(optimizer.learning_rate),
            "images_per_sec": images / seconds,
        }
        callback_list.on_train_batch_end(step - 1, train_logs)
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        if step % f.log_every_steps == 0 or step == schedule.train_steps:
            _log_train(log, summary_writers["train"], step, schedule, train_logs)
        if not f.skip_eval and schedule.eval_every and step % schedule.eval_every == 0:
            eval_logs = _evaluate(evaluate, eval_dataset, summary_writers, step, log)
        if step % schedule.checkpoint_every == 0 or step == schedule.train_steps:
            last_saved = _save(manager, chief, write_dir, step, last_saved)
        if step % schedule.steps_per_epoch == 0:
            epoch_logs = dict(
                train_logs, **{f"val_{k}": v for k, v in eval_logs.items()}
            )
            callback_list.on_epoch_end(step // schedule.steps_per_epoch - 1, epoch_logs)
        if _any_worker_preempted(strategy, preemption.requested):
            _save(manager, chief, write_dir, step, last_saved)
            log(f"SIGTERM: saved a checkpoint at step {step}; exiting.")
            sys.exit(PREEMPTED_EXIT_CODE)

    if not f.skip_eval and (
        not eval_logs or schedule.train_steps % schedule.eval_every
    ):
        eval_logs = _evaluate(evaluate, eval_dataset, summary_writers, step, log)
    callback_list.on_train_end(dict(train_logs, **eval_logs))
    if f.trust_ratio_every_steps and monitor.history:
        log(f"Trust ratios at step {monitor.history[-1][0]}:")
        log(monitor.format_table())
    summary = {
        "model_dir": os.path.abspath(model_dir),
        "flags": flag_dict if flag_dict is not None else f.flag_values_dict(),
        "source": source,
        "image_size": image_size,
        "augmentation": augmentation,
        "num_classes": info.num_classes,
        "num_replicas": replicas,
        "steps": step,
        "steps_per_epoch": schedule.steps_per_epoch,
        "epochs": step / schedule.steps_per_epoch,
        "resumed_from_step": start_step,
        "train": train_logs,
        "eval": eval_logs,
        "wall_time_sec": time.time() - wall_start,
        "train_time_sec": train_seconds,
        "images_per_sec": (
            steady_images / steady_seconds
            if steady_seconds
            else (images_trained / train_seconds if train_seconds else None)
        ),
    }
    if chief:
        path = os.path.join(model_dir, "summary.json")
        with open(path, "w", encoding="utf-8") as file:
            json.dump(summary, file, indent=2, default=str)
        log(
            f"Done in {summary['wall_time_sec']:.0f} s. Results in {model_dir}: "
            f"summary.json, checkpoints; `tensorboard --logdir {model_dir}`."
        )
    return summary


def _trust_ratio_monitor(
    f: flags.FlagValues, train_input_fn, model_dir: str | None
) -> lars_tf.TrustRatioMonitor:
    """The monitor on one probe batch of training data (at most 256 images).

    It runs on every worker, on its own copy of the variables (no collectives);
    only the chief, given `model_dir`, writes summaries.
    """
    probe = next(iter(train_input_fn(None).unbatch().batch(256).take(1)))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return lars_tf.TrustRatioMonitor(
        probe_batch=probe,
        every_n_steps=f.trust_ratio_every_steps,
        loss_fn=lambda labels, logits: loss(labels, tf.cast(logits, tf.float32)),
        log_dir=os.path.join(model_dir, "trust_ratio") if model_dir else None,
        measure_at_start=True,
    )


def _worker_temp_dir(strategy: tf.distribute.Strategy, model_dir: str) -> str:
    """Where a non-chief worker writes its (discarded) copy of a checkpoint.

    Every worker must take part in saving (variables may be collective), but
    only the chief's copy is kept.
    """
    resolver = strategy.cluster_resolver
    return os.path.join(
        model_dir, f"workertemp_{resolver.task_type}_{resolver.task_id}"
    )


def _save(
    manager: tf.train.CheckpointManager,
    chief: bool,
    write_dir: str,
    step: int,
    last_saved: int | None,
) -> int:
    """Saves a checkpoint numbered `step` unless it was the last saved; returns
    `step`. Every worker decides alike, since saving can be collective."""
    if step != last_saved:
        manager.save(checkpoint_number=step)
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    return step


def _make_step_functions(
    f: flags.FlagValues,
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    info: data.DatasetInfo,
):
    """The `tf.function`s: a loop of training steps, and one evaluation pass."""
    global_batch = f.global_batch_size
    top_k = min(5, info.num_classes)
    cross_entropy = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=f.label_smoothing, reduction=None
    )

    def per_example_loss(logits, labels):
        one_hot = tf.one_hot(labels, info.num_classes, dtype=tf.float32)
        return cross_entropy(one_hot, logits)

    def forward_backward(images, labels):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            loss = tf.nn.compute_average_loss(
                per_example_loss(logits, labels), global_batch_size=global_batch
            )
            l2 = optimizers.l2_loss(f, model)
            if l2 is not None:  # Counted once over the replicas.
                loss += tf.nn.scale_regularization_loss(l2)
            scaled_loss = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, model.trainable_variables)
        correct = tf.reduce_sum(
            tf.cast(
                tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), "float32"
            )
        )
        return loss, correct, gradients

    if f.jit_compile:  # The optimizer's cross-replica update stays outside XLA.
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def train_step(batch):
        images, labels = batch
        loss, correct, gradients = forward_backward(images, labels)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss, correct

    @tf.function
    def train_loop(iterator, num_steps):
        """Runs `num_steps` steps; returns their mean loss and accuracy."""
        loss_sum = tf.constant(0.0)
        correct_sum = tf.constant(0.0)
        for _ in tf.range(num_steps):
            loss, correct = strategy.run(train_step, args=(next(iterator),))
            loss_sum += strategy.reduce("SUM", loss, axis=None)
            correct_sum += strategy.reduce("SUM", correct, axis=None)
        steps = tf.cast(num_steps, tf.float32)
        return loss_sum / steps, correct_sum / (steps * global_batch)

    def eval_sums(images, labels):
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

    return train_loop, evaluate


def _evaluate(evaluate, eval_dataset, summary_writers, step: int, log) -> dict:
    """One pass over the validation split: loss, top-1 and top-5 accuracy."""
    loss_sum, top1, top5, count = evaluate(eval_dataset).numpy().tolist()
    results = {"loss": loss_sum / count, "top1": top1 / count, "top5": top5 / count}
    results["examples"] = count
    with summary_writers["eval"].as_default(step=step):
        for name in ("loss", "top1", "top5"):
            _write_scalar(name, results[name])
    log(
        f"eval  step {step:6d}  loss {results['loss']:.4f}  top-1 "
        f"{results['top1']:.4f}  top-5 {results['top5']:.4f}  ({count:.0f} images)"
    )
    return results


def _write_scalar(name: str, value: float) -> None:
    """`tf.summary.scalar` without the tensorboard package (TF does not need it).

    Same record as TensorBoard's scalar plugin writes, so TensorBoard shows it.
    """
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    metadata.data_class = summary_pb2.DATA_CLASS_SCALAR
    tf.summary.write(name, tf.constant(value, tf.float32), metadata=metadata)


def _log_train(log, writer, step: int, schedule: Schedule, logs: dict) -> None:
    """A progress line and the training scalars for TensorBoard."""
    with writer.as_default(step=step):
        for name, value in logs.items():
            _write_scalar(name, value)
    log(
        f"train step {step:6d}/{schedule.train_steps}  epoch "
        f"{step / schedule.steps_per_epoch:6.2f}  loss {logs['loss']:.4f}  "
        f"acc {logs['accuracy']:.4f}  lr {logs['learning_rate']:.4g}  "
        f"{logs['images_per_sec']:.0f} images/s"
    )


def _any_worker_preempted(strategy: tf.distribute.Strategy, requested: bool) -> bool:
    """Whether any worker got SIGTERM; all workers must stop at the same step."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return requested
    flag = tf.constant(float(requested))
    per_replica = strategy.run(lambda: tf.identity(flag))
    return bool(strategy.reduce("SUM", per_replica, axis=None).numpy() > 0)
