"""The custom training loop of `python -m train.main`: `run(config)`.

Read top to bottom: the model folder is checked against the run it holds (a
resumed run must mean the same); the strategy is built; the model, optimizer,
step counter and checkpoint are created in its scope; a checkpoint is restored
if the folder has one; then training runs in loops of `--steps_per_loop` steps,
each loop one `tf.function` call of `strategy.run(train_step)`; between loops
the host logs, writes summaries, evaluates, checkpoints and calls the Keras
callbacks. At the end it writes summary.json and the trained model as
`model.keras`.

Why a custom loop: Keras 3.15's `model.fit` fails under
`MultiWorkerMirroredStrategy`, and `compile(jit_compile=True)` under
`MirroredStrategy` on CPU. The loop below is the same for every strategy.

Losses: the per-example cross-entropy (float32 logits, label smoothing through
one-hot labels) is summed and divided by the GLOBAL batch on every replica
(`tf.nn.compute_average_loss`), and the optimizer sums the replicas' gradients,
so the update is the gradient of the global-batch mean whatever the replica
count.

Non-finite steps: a step whose loss or gradients are not finite on any replica
is not applied on any: the weights, the BatchNormalization statistics, the
optimizer's slots and its iteration count (which drives the learning rate)
stay as they were. The batch is consumed (the step counter of the data
position advances) and counted; `--max_nonfinite_steps` in a row stop the run
with `train.RunError`, leaving the last checkpoint as it was.

Exact resume: training data is an endless seeded stream (`train.data` shuffles
with a fixed seed and repeats), and a resumed run skips the batches that the
restored step already consumed (as undecoded records: cheap), so it sees the
same batches as an uninterrupted run; with `--deterministic` the final metrics
are the same. (Through `--data_service` the order is the workers', so a
resumed run starts a new shuffled stream instead.)

Input: the pipelines deliver uint8 pixels, and the steps normalize them
(`data.normalize`, in the compute dtype) on the device: 4x fewer bytes from host
to device than float32. Checkpoints are atomic: TensorFlow writes a checkpoint's files
first and then, by a rename, the `checkpoint` state file that names the latest
one, so a crash during a save leaves the previous checkpoint in use.
"""

import os
import signal
import sys
import time
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

import lars_tf
from train import RunError, data, model_folder, models, optimizers
from train import config as config_lib
from train.config import Config

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
SUMMARY_FILE = model_folder.SUMMARY_FILE
MODEL_FILE = "model.keras"


def make_strategy(config: Config) -> tf.distribute.Strategy:
    """The strategy of `--strategy`, after splitting the CPU if asked.

    Must run before TensorFlow touches a device (logical devices are fixed
    from then on); hence one strategy per process.
    """
    if config.num_cpu_devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * config.num_cpu_devices
        )
    if config.strategy == "one_device":
        device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if config.strategy == "mirrored":
        devices = None  # All GPUs, else the CPU.
        if config.num_cpu_devices and not tf.config.list_physical_devices("GPU"):
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if config.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if config.strategy == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu)
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


def next_stop(step: int, config: Config) -> int:
    """First step after `step` where the host must act (log, save, ...)."""
    stops = [
        config.train_steps,
        step + config.steps_per_loop,
        _next_multiple(step, config.log_every_steps),
        _next_multiple(step, config.steps_per_epoch),
        _next_multiple(step, config.checkpoint_every_steps),
    ]
    if config.eval_every_steps:
        stops.append(_next_multiple(step, config.eval_every_steps))
    return min(stops)


def _next_multiple(step: int, interval: int) -> int:
    return (step // interval + 1) * interval


class PreemptionFlag:
    """Set by SIGTERM; the loop saves a checkpoint and exits at its next stop."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True


def run(
    config: Config,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict:
    """Trains and evaluates as `config` says; returns (and writes) the summary.

    A folder holding a finished run of the same configuration is left as it is
    and its summary returned. A folder holding another configuration raises
    `train.UserError` before anything is written.

    Args:
      config: the run (`train.config.make_config` or the command line's).
      callbacks: extra Keras callbacks, called between loops (`batch` is the
        loop's last step; logs hold the loop's mean loss and accuracy and the
        learning rate; `on_epoch_end` logs add `val_*` after an evaluation).

    Raises:
      train.UserError: the folder holds another run, or the data is unreadable.
      train.RunError: `--max_nonfinite_steps` non-finite steps in a row.
    """
    try:
        return _run(config, callbacks)
    finally:
        model_folder.release()  # However the run ends.


def _run(config: Config, callbacks: Sequence[keras.callbacks.Callback]) -> dict:
    wall_start = time.time()
    model_dir = config.model_dir
    record, previous = model_folder.check(config)
    if previous is not None and previous.get("steps", 0) >= config.train_steps:
        print(
            f"The run in {model_dir} is already finished ({previous['steps']} "
            f"steps); its results are unchanged in {SUMMARY_FILE}."
        )
        return previous
    preemption = PreemptionFlag()  # From now on SIGTERM means "save and exit".
    strategy = make_strategy(config)  # First: it fixes the devices.
    replicas = strategy.num_replicas_in_sync
    if config.replicas is None and config.global_batch_size % replicas:
        raise config_lib.FlagError(
            "global_batch_size",
            f"{config.global_batch_size} is not divisible by the {replicas} replicas",
        )
    chief = is_chief(strategy)
    log = print if chief else (lambda *args, **kwargs: None)
    model_folder.prepare(config, chief, strategy)
    if config.synthetic_fallback:
        log(
            "Warning: no MNIST in the default data folder "
            f"({os.path.dirname(str(config_lib.sources.default_data_dir('mnist')))}): "
            "training on synthetic images of MNIST's shape. Give --data_dir or "
            "--source to train on real data."
        )
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
        if os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0":
            log(
                "Warning: --deterministic with TensorFlow's oneDNN CPU kernels on: "
                "results may differ from run to run in the last bits. Set "
                "TF_ENABLE_ONEDNN_OPTS=0 before TensorFlow starts (train.main "
                "does) for bit-identical runs."
            )
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.precision)

    # Data: uint8 pixels to the device (4x fewer bytes than float32); the
    # steps normalize them there (`data.normalize`).
    input_settings = dict(
        source=config.data_source(),
        global_batch_size=config.global_batch_size,
        image_size=config.image_size,
        dtype="uint8",
        seed=config.seed,
        cache=config.cache,
        deterministic=config.deterministic,
        max_skipped_records=config.max_skipped_records,
    )
    train_input_fn = data.make_input_fn(
        split="train",
        augmentation=config.augmentation,
        data_service=config.data_service,
        **input_settings,
    )
    eval_input_fn = data.make_input_fn(split="validation", **input_settings)

    # Model, optimizer and checkpoint, in the strategy's scope.
    with strategy.scope():
        model = models.build_model(
            config.model, config.num_classes, config.image_size, config.channels
        )
        optimizer = optimizers.build_optimizer(config, model)
        # Where compile() would put it: Keras callbacks (LearningRateWarmup,
        # TrustRatioMonitor, ...) look for the optimizer there.
        model.optimizer = optimizer
        step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, step=step_counter
        )
    manager, write_dir = model_folder.make_manager(
        checkpoint, step_counter, config, strategy, chief
    )
    latest = model_folder.restore_latest(checkpoint, model_dir, repair=chief)
    start_step = int(step_counter.numpy())
    log(
        f"{config.model} on {config.source} ({config.num_classes} classes, "
        f"{config.image_size}x{config.image_size}x{config.channels}), "
        f"{config.optimizer} at global batch {config.global_batch_size} on "
        f"{replicas} replica(s) ({config.strategy}); {config.train_steps} steps, "
        f"{config.steps_per_epoch} per epoch"
        + (f"; resumed at step {start_step} from {latest}" if latest else "")
    )

    # The training data resumes where the restored step left it: each input
    # pipeline feeds its local replicas one batch each per step. The service's
    # order is not fixed, so there is no position to resume from.
    resume_step = 0 if config.data_service else start_step
    if config.data_service:
        log(
            f"Training batches from the tf.data service at {config.data_service}; "
            "undecodable records are skipped and counted on its workers (not "
            "in this run's counts)"
            + (
                "; a resumed run does not skip the examples already seen."
                if start_step
                else "."
            )
        )

    def train_dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_step = context.num_replicas_in_sync // context.num_input_pipelines
        return train_input_fn(context, skip_batches=resume_step * per_step)

    train_iterator = iter(strategy.distribute_datasets_from_function(train_dataset_fn))
    eval_dataset = strategy.distribute_datasets_from_function(eval_input_fn)
    train_loop, evaluate, average_statistics = _make_step_functions(
        config, strategy, model, optimizer
    )

    summary_writers = {
        name: tf.summary.create_file_writer(os.path.join(model_dir, name))
        if chief
        else tf.summary.create_noop_writer()
        for name in ("train", "eval")
    }
    callbacks = list(callbacks)
    if config.trust_ratio_every_steps:
        monitor = _trust_ratio_monitor(
            config, train_input_fn, model_dir if chief else None
        )
        callbacks.append(monitor)
    callback_list = keras.callbacks.CallbackList(callbacks, model=model)
    train_logs: dict[str, float] = {}
    eval_logs: dict[str, float] = {}
    # Throughput leaves out the first loop, which includes tracing.
    images_trained, train_seconds, steady_images, steady_seconds = 0, 0.0, 0, 0.0
    last_saved = start_step if latest else None  # The same on every worker.
    nonfinite_steps, nonfinite_in_a_row = 0, 0
    step = start_step
    callback_list.on_train_begin()
    while step < config.train_steps:
        if step % config.steps_per_epoch == 0:
            callback_list.on_epoch_begin(step // config.steps_per_epoch)
        # The first loop is one step, so the first progress line comes as soon
        # as the first step (and its tracing) is done.
        stop = start_step + 1 if step == start_step else next_stop(step, config)
        callback_list.on_train_batch_begin(step)
        loop_start = time.time()
        results = _reading_data(
            train_loop,
            train_iterator,
            tf.constant(stop - step),
            tf.constant(nonfinite_in_a_row),
        )
        loss, accuracy, steps_run, skipped, nonfinite_in_a_row = (
            r.numpy()
            for r in results  # Waits for the loop.
        )
        loss, accuracy = float(loss), float(accuracy)
        steps_run, nonfinite_in_a_row = int(steps_run), int(nonfinite_in_a_row)
        seconds = time.time() - loop_start
        images = steps_run * config.global_batch_size
        if images_trained:
            steady_images += images
            steady_seconds += seconds
        images_trained += images
        train_seconds += seconds
        step += steps_run
        step_counter.assign(step)
        record = model_folder.write_record(config, record, chief)
        if replicas > 1:
            with strategy.scope():  # Assigns every replica's copy.
                average_statistics()
        if skipped:
            nonfinite_steps += int(skipped)
            log(
                f"Skipped {int(skipped)} step(s) with non-finite loss or gradients "
                f"before step {step} ({nonfinite_in_a_row} in a row; "
                f"{nonfinite_steps} in this run)."
            )
        if nonfinite_in_a_row >= config.max_nonfinite_steps:
            raise RunError(
                f"step {step}: {nonfinite_in_a_row} steps in a row had non-finite "
                f"loss or gradients (--max_nonfinite_steps="
                f"{config.max_nonfinite_steps}); stopped without saving. Last good "
                f"checkpoint: {manager.latest_checkpoint or 'none'}"
            )
        train_logs = {
            "loss": loss,
            "accuracy": accuracy,
            "learning_rate": float(optimizer.learning_rate),
            "images_per_sec": images / seconds,
        }
        callback_list.on_train_batch_end(step - 1, train_logs)
        if (
            step % config.log_every_steps == 0
            or step == config.train_steps
            or step == start_step + 1
        ):
            rate = steady_seconds / steady_images if steady_images else seconds / images
            eta = (config.train_steps - step) * config.global_batch_size * rate
            _log_train(log, summary_writers["train"], step, config, train_logs, eta)
        if (
            not config.skip_eval
            and config.eval_every_steps
            and step % config.eval_every_steps == 0
        ):
            eval_logs = _evaluate(evaluate, eval_dataset, summary_writers, step, log)
        if step % config.checkpoint_every_steps == 0 or step == config.train_steps:
            last_saved = model_folder.save(manager, chief, write_dir, step, last_saved)
        if step % config.steps_per_epoch == 0:
            epoch_logs = dict(
                train_logs, **{f"val_{k}": v for k, v in eval_logs.items()}
            )
            callback_list.on_epoch_end(step // config.steps_per_epoch - 1, epoch_logs)
        if _any_worker_preempted(strategy, preemption.requested):
            model_folder.save(manager, chief, write_dir, step, last_saved)
            log(f"SIGTERM: saved a checkpoint at step {step}; exiting.")
            sys.exit(PREEMPTED_EXIT_CODE)

    if not config.skip_eval and (
        not eval_logs or config.train_steps % config.eval_every_steps
    ):
        eval_logs = _evaluate(evaluate, eval_dataset, summary_writers, step, log)
    callback_list.on_train_end(dict(train_logs, **eval_logs))
    if config.trust_ratio_every_steps and monitor.history:
        log(f"Trust ratios at step {monitor.history[-1][0]}:")
        log(monitor.format_table())
    skipped_records = {
        "train": train_input_fn.skipped_records(),
        "validation": eval_input_fn.skipped_records(),
    }
    segment = {
        "start_step": start_step,
        "end_step": step,
        "train": train_logs,
        "eval": eval_logs,
        "nonfinite_steps": nonfinite_steps,
        "skipped_records": skipped_records,
        "skipped_record_names": train_input_fn.skipped_record_names()
        + eval_input_fn.skipped_record_names(),
        "wall_time_sec": time.time() - wall_start,
        "train_time_sec": train_seconds,
        "images_per_sec": (
            steady_images / steady_seconds
            if steady_seconds
            else (images_trained / train_seconds if train_seconds else None)
        ),
    }
    segments = (previous or {}).get("segments", []) + [segment]
    summary = {
        "model_dir": os.path.abspath(model_dir),
        "flags": config.flags,
        "config": config.to_dict(),
        "source": config.source,
        "image_size": config.image_size,
        "augmentation": config.augmentation,
        "num_classes": config.num_classes,
        "num_replicas": replicas,
        "steps": step,
        "steps_per_epoch": config.steps_per_epoch,
        "epochs": step / config.steps_per_epoch,
        "resumed_from_step": start_step,
        # The latest figures; a segment that trained no step keeps the last.
        "train": train_logs or (previous or {}).get("train", {}),
        "eval": eval_logs or (previous or {}).get("eval", {}),
        "nonfinite_steps": sum(s["nonfinite_steps"] for s in segments),
        "skipped_records": {
            split: sum(s.get("skipped_records", {}).get(split, 0) for s in segments)
            for split in ("train", "validation")
        },
        "wall_time_sec": segment["wall_time_sec"],
        "train_time_sec": train_seconds,
        "images_per_sec": segment["images_per_sec"]
        or (previous or {}).get("images_per_sec"),
        "segments": segments,
    }
    if chief:
        train_where = (
            "; those of the tf.data service's workers not counted"
            if config.data_service
            else ""
        )
        _export_model(model, config, os.path.join(model_dir, MODEL_FILE))
        config_lib.write_json(os.path.join(model_dir, SUMMARY_FILE), summary)
        log(
            f"Done in {segment['wall_time_sec']:.0f} s; skipped: "
            f"{nonfinite_steps} non-finite step(s), undecodable records "
            f"{skipped_records['train']} (train{train_where}), "
            f"{skipped_records['validation']} "
            f"(validation). Results in {model_dir}: "
            f"{SUMMARY_FILE}, {MODEL_FILE}, checkpoints; "
            f"`tensorboard --logdir {model_dir}`."
        )
    return summary


def _export_model(model: keras.Model, config: Config, path: str) -> None:
    """Saves the trained model with its input normalization in front, so it
    takes images of pixel values 0-255 (as `keras.saving.load_model(path)`);
    written to a temporary file first, then renamed."""
    mean = np.array(config.mean, np.float32)
    std = np.array(config.std, np.float32)
    inputs = keras.Input(
        (config.image_size, config.image_size, config.channels), name="pixels"
    )
    normalized = keras.layers.Normalization(
        mean=mean, variance=std**2, name="normalization"
    )(inputs)
    exported = keras.Model(inputs, model(normalized), name=f"{config.model}_export")
    temporary = os.path.join(os.path.dirname(path), f"tmp-{os.getpid()}-{MODEL_FILE}")
    exported.save(temporary)
    os.replace(temporary, path)


def _trust_ratio_monitor(
    config: Config, train_input_fn, model_dir: str | None
) -> lars_tf.TrustRatioMonitor:
    """The monitor on one probe batch of training data (at most 256 images),
    normalized as the training step does.

    It runs on every worker, on its own copy of the variables (no collectives);
    only the chief, given `model_dir`, writes summaries.
    """
    images, labels = next(iter(train_input_fn(None).unbatch().batch(256).take(1)))
    compute_dtype = keras.mixed_precision.global_policy().compute_dtype
    probe = (data.normalize(images, config.data_source(), compute_dtype), labels)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return lars_tf.TrustRatioMonitor(
        probe_batch=probe,
        every_n_steps=config.trust_ratio_every_steps,
        loss_fn=lambda labels, logits: loss(labels, tf.cast(logits, tf.float32)),
        log_dir=os.path.join(model_dir, "trust_ratio") if model_dir else None,
        measure_at_start=True,
    )


def _make_step_functions(
    config: Config,
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
):
    """The `tf.function`s: a loop of training steps, one evaluation pass, and
    the averaging of the replicas' BatchNormalization statistics."""
    global_batch = config.global_batch_size
    num_classes = config.num_classes
    top_k = min(5, num_classes)
    source = config.data_source()
    compute_dtype = keras.mixed_precision.global_policy().compute_dtype
    cross_entropy = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=config.label_smoothing, reduction=None
    )
    l2_loss = optimizers.l2_loss_fn(config, model)
    # With a loss scale, overflowing gradients are the scale's business: it
    # skips the step and lowers the scale. The guard then checks the loss only.
    check_gradients = not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    max_in_a_row = config.max_nonfinite_steps

    def per_example_loss(logits, labels):
        one_hot = tf.one_hot(labels, num_classes, dtype=tf.float32)
        return cross_entropy(one_hot, logits)

    def forward_backward(images, labels):
        images = data.normalize(images, source, compute_dtype)
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            loss = tf.nn.compute_average_loss(
                per_example_loss(logits, labels), global_batch_size=global_batch
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
        forward_backward = tf.function(forward_backward, jit_compile=True)

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

    @tf.function
    def average_statistics():
        """Sets every replica's BatchNormalization statistics to their mean.

        Keras keeps one copy per replica, each updated from that replica's
        part of the batch, and evaluation reads the local copy: without this,
        results would depend on which replica evaluates which example.
        """
        for variable in model.non_trainable_variables:
            local = strategy.run(lambda v=variable: tf.identity(v.value))
            variable.assign(strategy.reduce("MEAN", local, axis=None))

    return train_loop, evaluate, average_statistics


def _reading_data(function, *args):
    """`function(*args)`, with errors about the input data (a corrupted file,
    too many undecodable images) raised as `train.UserError`."""
    try:
        return function(*args)
    except tf.errors.OpError as error:
        user_error = data.user_error(error)
        if user_error is None:
            raise
        raise user_error from None


def _evaluate(evaluate, eval_dataset, summary_writers, step: int, log) -> dict:
    """One pass over the validation split: loss, top-1 and top-5 accuracy."""
    loss_sum, top1, top5, count = _reading_data(evaluate, eval_dataset)
    loss_sum, top1, top5, count = (float(x) for x in (loss_sum, top1, top5, count))
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


def _log_train(
    log, writer, step: int, config: Config, logs: dict, eta_seconds: float
) -> None:
    """A progress line (with the estimated time left) and the training scalars
    for TensorBoard."""
    with writer.as_default(step=step):
        for name, value in logs.items():
            _write_scalar(name, value)
    minutes, seconds = divmod(round(eta_seconds), 60)
    log(
        f"train step {step:6d}/{config.train_steps}  epoch "
        f"{step / config.steps_per_epoch:6.2f}  loss {logs['loss']:.4f}  "
        f"acc {logs['accuracy']:.4f}  lr {logs['learning_rate']:.4g}  "
        f"{logs['images_per_sec']:.0f} images/s  ETA {minutes}:{seconds:02d}"
    )


def _any_worker_preempted(strategy: tf.distribute.Strategy, requested: bool) -> bool:
    """Whether any worker got SIGTERM; all workers must stop at the same step."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return requested
    flag = tf.constant(float(requested))
    per_replica = strategy.run(lambda: tf.identity(flag))
    return bool(strategy.reduce("SUM", per_replica, axis=None).numpy() > 0)
