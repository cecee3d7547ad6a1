"""The custom training loop of `python -m train.main`: `run(config)`.

Read `run` top to bottom; each part has its own file:

  train/model_folder.py  the folder's run record, lock and checkpoints
  train/strategy.py      the strategy, the chief, the stop signals
  train/steps.py         the `tf.function`s: training loop, evaluation, BN averaging
  train/summary.py       the progress counters, summary.json, model.keras

Training runs in loops of `--steps_per_loop` steps, each loop one
`tf.function` call of `strategy.run(train_step)`; between loops the host
logs, writes summaries, evaluates, checkpoints and calls the Keras callbacks
(`_after_loop`), then stops if a worker got SIGTERM or SIGINT.

Why a custom loop: Keras 3.15's `model.fit` fails under
`MultiWorkerMirroredStrategy`, and `compile(jit_compile=True)` under
`MirroredStrategy` on CPU. The loop below is the same for every strategy.

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

import dataclasses
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

import lars_tf
from train import RunError, data, model_folder, models, optimizers
from train import config as config_lib
from train import strategy as strategy_lib
from train import summary as summary_lib
from train.config import Config
from train.steps import StepFunctions, make_step_functions, recompute_bn_statistics

SUMMARY_FILE = summary_lib.SUMMARY_FILE
MODEL_FILE = summary_lib.MODEL_FILE


def run(
    config: Config,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict:
    """Trains and evaluates as `config` says; returns (and writes) the summary.

    A folder holding a finished run of the same configuration is left as it is
    and its summary returned. A folder holding another configuration raises
    `train.UserError` before anything is written. SIGTERM or SIGINT stop the
    run after a checkpoint at the next loop boundary (`SystemExit` 143 or
    130, the segment recorded in summary.json); the previous handlers are
    restored when `run` ends.

    Args:
      config: the run (`train.config.make_config` or the command line's).
      callbacks: extra Keras callbacks, called between loops (`batch` is the
        loop's last step; logs hold the loop's mean loss and accuracy and the
        learning rate; `on_epoch_end` logs add `val_*` after an evaluation).

    Raises:
      train.UserError: the folder holds another run, or the data is unreadable.
      train.RunError: `--max_nonfinite_steps` non-finite steps in a row; under
        multi_worker, a worker lost (killed, hung, unreachable).
    """
    wall_start = time.time()
    try:
        with strategy_lib.StopSignals() as stop:
            record, previous = model_folder.check(config)
            if summary_lib.is_finished(config, previous):
                print(
                    f"The run in {config.model_dir} is already finished "
                    f"({previous['steps']} steps); its results are unchanged in "
                    f"{SUMMARY_FILE}."
                )
                return previous
            strategy = strategy_lib.make_strategy(config)  # It fixes the devices.
            # The set-up's collectives too: a peer refused the folder's lock
            # leaves the others waiting in the first one.
            with strategy_lib.lost_peer_reported(strategy, config.model_dir):
                parts, progress = _set_up(
                    config, strategy, callbacks, record, previous, wall_start
                )
                _train(parts, progress, stop)
                summary = _finish(parts, progress)
            if stop.received:  # After the last loop: the run is complete.
                name = signal.Signals(stop.received).name
                parts.log(f"{name} after the last step: the run finished; exiting.")
                sys.exit(128 + stop.received)
            return summary
    finally:
        model_folder.release()  # However the run ends.


@dataclasses.dataclass
class _Run:
    """The parts of a run that the host's actions between loops use."""

    config: Config
    strategy: tf.distribute.Strategy
    chief: bool
    log: Callable
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    step_counter: tf.Variable
    manager: tf.train.CheckpointManager
    write_dir: str
    input_fns: tuple  # Train, validation(, holdout): `data.InputFn`s.
    train_iterator: tf.distribute.DistributedIterator
    eval_datasets: dict  # "eval" (the validation split), "holdout": datasets.
    steps: StepFunctions
    callback_list: keras.callbacks.CallbackList
    monitor: lars_tf.TrustRatioMonitor | None
    record: dict | None
    previous: dict | None
    writers: dict = dataclasses.field(default_factory=dict)  # By `_writer`.


def _set_up(
    config: Config,
    strategy: tf.distribute.Strategy,
    callbacks: Sequence[keras.callbacks.Callback],
    record: dict | None,
    previous: dict | None,
    wall_start: float,
) -> tuple[_Run, summary_lib.Progress]:
    """The folder, the input, the model restored from the latest checkpoint,
    the step functions, writers and callbacks on `strategy`; the counters."""
    _check_replicas(config, strategy)
    chief = strategy_lib.is_chief(strategy)
    # Flushed: the lines come as they happen through a pipe (`| tee`, a test).
    log = functools.partial(print, flush=True) if chief else (lambda *a, **k: None)
    model_folder.prepare(config, chief, strategy)
    _set_up_process(config, log)
    input_fns = _make_input_fns(config)
    model, optimizer, step_counter, checkpoint = _build(config, strategy)
    manager, write_dir = model_folder.make_manager(
        checkpoint, step_counter, config, strategy, chief
    )
    latest = model_folder.restore_latest(checkpoint, config.model_dir, repair=chief)
    progress = summary_lib.Progress(
        start_step=int(step_counter.numpy()),
        last_saved=int(step_counter.numpy()) if latest else None,
        wall_start=wall_start,
    )
    _log_start(config, strategy, latest, progress.start_step, log)
    train_iterator, eval_datasets = _distribute(
        config, strategy, input_fns, progress.start_step
    )
    steps = make_step_functions(config, strategy, model, optimizer)
    monitor = None
    if config.trust_ratio_every_steps:
        monitor = _trust_ratio_monitor(
            config, input_fns[0], config.model_dir if chief else None
        )
    callback_list = keras.callbacks.CallbackList(
        list(callbacks) + ([monitor] if monitor else []), model=model
    )
    parts = _Run(
        config=config,
        strategy=strategy,
        chief=chief,
        log=log,
        model=model,
        optimizer=optimizer,
        step_counter=step_counter,
        manager=manager,
        write_dir=write_dir,
        input_fns=input_fns,
        train_iterator=train_iterator,
        eval_datasets=eval_datasets,
        steps=steps,
        callback_list=callback_list,
        monitor=monitor,
        record=record,
        previous=previous,
    )
    return parts, progress


def _check_replicas(config: Config, strategy: tf.distribute.Strategy) -> None:
    """The global batch must split evenly over the replicas."""
    replicas = strategy.num_replicas_in_sync
    if config.replicas is None and config.global_batch_size % replicas:
        raise config_lib.FlagError(
            "global_batch_size",
            f"{config.global_batch_size} is not divisible by the {replicas} replicas",
        )


def _set_up_process(config: Config, log: Callable) -> None:
    """Determinism, seeds and the precision policy, with their warnings."""
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


def _make_input_fns(config: Config) -> tuple:
    """The training and validation input functions, delivering uint8 pixels
    (4x fewer bytes than float32); the steps normalize them on the device."""
    input_settings = dict(
        source=config.data,
        global_batch_size=config.global_batch_size,
        image_size=config.data.image_size,
        dtype="uint8",
        seed=config.seed,
        cache=config.cache,
        deterministic=config.deterministic,
        max_skipped_records=config.max_skipped_records,
    )
    holdout = data.Holdout(config.holdout_fraction, config.holdout_seed)
    train_input_fn = data.make_input_fn(
        split="train",
        augmentation=config.augmentation,
        data_service=config.data_service,
        holdout=holdout,
        **input_settings,
    )
    input_fns = (
        train_input_fn,
        data.make_input_fn(split="validation", **input_settings),
    )
    if config.holdout_fraction:
        input_fns += (
            data.make_input_fn(split="holdout", holdout=holdout, **input_settings),
        )
    return input_fns


def _build(config: Config, strategy: tf.distribute.Strategy) -> tuple:
    """The model, optimizer, step counter and checkpoint, in the strategy's
    scope."""
    with strategy.scope():
        model = models.build_model(
            config.model,
            config.data.num_classes,
            config.data.image_size,
            config.data.channels,
        )
        optimizer = optimizers.build_optimizer(config, model)
        # Where compile() would put it: Keras callbacks (LearningRateWarmup,
        # TrustRatioMonitor, ...) look for the optimizer there.
        model.optimizer = optimizer
        step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, step=step_counter
        )
    return model, optimizer, step_counter, checkpoint


def _log_start(config, strategy, latest: str | None, start_step: int, log) -> None:
    """The run's first lines: what trains where, and from which checkpoint."""
    log(
        f"{config.model} on {config.data.name} ({config.data.num_classes} classes, "
        f"{config.data.image_size}x{config.data.image_size}x{config.data.channels}), "
        f"{config.optimizer} at global batch {config.global_batch_size} on "
        f"{strategy.num_replicas_in_sync} replica(s) ({config.strategy}); "
        f"{config.train_steps} steps, {config.steps_per_epoch} per epoch"
        + (f"; resumed at step {start_step} from {latest}" if latest else "")
    )
    if config.holdout_fraction:
        total = config.data.train_examples
        held_out = data.Holdout(config.holdout_fraction).size(total)
        log(
            f"Held out {held_out} of the {total} training examples "
            f"(--holdout_fraction={config.holdout_fraction}, --holdout_seed="
            f"{config.holdout_seed}): evaluated during training; the "
            "validation split is evaluated at the end."
        )
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


def _distribute(config, strategy, input_fns, start_step: int) -> tuple:
    """The training iterator, resuming where the restored step left the data,
    and the distributed evaluation datasets ("eval", and "holdout")."""
    train_input_fn, *eval_input_fns = input_fns
    # Each input pipeline feeds its local replicas one batch each per step.
    # The service's order is not fixed, so there is no position to resume from.
    resume_step = 0 if config.data_service else start_step

    def train_dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_step = context.num_replicas_in_sync // context.num_input_pipelines
        return train_input_fn(context, skip_batches=resume_step * per_step)

    train_iterator = iter(strategy.distribute_datasets_from_function(train_dataset_fn))
    eval_datasets = {
        name: strategy.distribute_datasets_from_function(input_fn)
        for name, input_fn in zip(("eval", "holdout"), eval_input_fns)
    }
    return train_iterator, eval_datasets


def _writer(parts: "_Run", name: str) -> tf.summary.SummaryWriter:
    """The TensorBoard writer of `name` ("train", "eval", "holdout"), made at
    its first scalar (the chief's only), so a run that fails before its first
    step leaves no event files in the folder."""
    if name not in parts.writers:
        parts.writers[name] = (
            tf.summary.create_file_writer(os.path.join(parts.config.model_dir, name))
            if parts.chief
            else tf.summary.create_noop_writer()
        )
    return parts.writers[name]


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


def _train(
    parts: _Run, progress: summary_lib.Progress, stop: strategy_lib.StopSignals
) -> None:
    """Loops until `--train_steps`, or until a worker got a stop signal."""
    config = parts.config
    parts.callback_list.on_train_begin()
    while progress.step < config.train_steps:
        if progress.step % config.steps_per_epoch == 0:
            parts.callback_list.on_epoch_begin(progress.step // config.steps_per_epoch)
        # The first loop is one step, so the first progress line comes as soon
        # as the first step (and its tracing) is done.
        if progress.step == progress.start_step:
            end = progress.start_step + 1
        else:
            end = next_stop(progress.step, config)
        parts.callback_list.on_train_batch_begin(progress.step)
        _train_loop(parts, progress, end - progress.step)
        _after_loop(parts, progress)
        for input_fn in parts.input_fns:  # A file deleted while open reads on.
            input_fn.check_files()
        signum = strategy_lib.stop_signal(parts.strategy, stop.received)
        if signum:
            _stop(parts, progress, signal.Signals(signum))


def _train_loop(parts: _Run, progress: summary_lib.Progress, num_steps: int) -> None:
    """One call of the training loop, then its counts and checks on the host."""
    config = parts.config
    loop_start = time.time()
    results = _reading_data(
        parts.steps.train_loop,
        parts.train_iterator,
        tf.constant(num_steps),
        tf.constant(progress.nonfinite_in_a_row),
    )
    loss, accuracy, steps_run, skipped, in_a_row = (
        r.numpy()
        for r in results  # Waits for the loop.
    )
    seconds = time.time() - loop_start
    images = int(steps_run) * config.global_batch_size
    progress.add_loop(int(steps_run), images, seconds)
    progress.nonfinite_in_a_row = int(in_a_row)
    step = progress.step
    parts.step_counter.assign(step)
    parts.record = model_folder.write_record(config, parts.record, parts.chief)
    if parts.strategy.num_replicas_in_sync > 1:
        with parts.strategy.scope():  # Assigns every replica's copy.
            parts.steps.average_statistics()
    if skipped:
        progress.nonfinite_steps += int(skipped)
        parts.log(
            f"Skipped {int(skipped)} step(s) with non-finite loss or gradients "
            f"before step {step} ({progress.nonfinite_in_a_row} in a row; "
            f"{progress.nonfinite_steps} in this run)."
        )
    if progress.nonfinite_in_a_row >= config.max_nonfinite_steps:
        raise RunError(
            f"step {step}: {progress.nonfinite_in_a_row} steps in a row had "
            f"non-finite loss or gradients (--max_nonfinite_steps="
            f"{config.max_nonfinite_steps}); stopped without saving. Last good "
            f"checkpoint: {parts.manager.latest_checkpoint or 'none'}"
        )
    progress.train_logs = {
        "loss": float(loss),
        "accuracy": float(accuracy),
        "learning_rate": float(parts.optimizer.learning_rate),
        "images_per_sec": images / seconds,
    }


def _after_loop(parts: _Run, progress: summary_lib.Progress) -> None:
    """The host's actions at a loop's end: callbacks, the progress line,
    evaluation, checkpoint, end of epoch."""
    config, step = parts.config, progress.step
    parts.callback_list.on_train_batch_end(step - 1, progress.train_logs)
    if (
        step % config.log_every_steps == 0
        or step == config.train_steps
        or step == progress.start_step + 1
    ):
        _log_train(parts, progress)
    if (
        not config.skip_eval
        and config.eval_every_steps
        and step % config.eval_every_steps == 0
    ):
        split = _tuning_split(config)
        progress.eval_logs = _evaluate(parts, step, split)
        progress.eval_step = step
        progress.history.append(
            {"step": step, "train": progress.train_logs, split: progress.eval_logs}
        )
    if step % config.checkpoint_every_steps == 0 or step == config.train_steps:
        _save(parts, progress)
    if step % config.steps_per_epoch == 0:
        epoch_logs = dict(
            progress.train_logs,
            **{f"val_{k}": v for k, v in progress.eval_logs.items()},
        )
        parts.callback_list.on_epoch_end(step // config.steps_per_epoch - 1, epoch_logs)


def _save(parts: _Run, progress: summary_lib.Progress) -> None:
    progress.last_saved = model_folder.save(
        parts.manager, parts.chief, parts.write_dir, progress.step, progress.last_saved
    )


def _stop(parts: _Run, progress: summary_lib.Progress, signum: signal.Signals):
    """Saves a checkpoint, records the segment, and exits with 128 + signum."""
    _save(parts, progress)
    contents = summary_lib.summary(
        parts.config,
        parts.strategy.num_replicas_in_sync,
        progress,
        summary_lib.segment(parts.config, progress, *parts.input_fns),
        parts.previous,
    )
    summary_lib.record_stop(parts.config, contents, signum.name, parts.chief)
    parts.log(f"{signum.name}: saved a checkpoint at step {progress.step}; exiting.")
    sys.exit(128 + signum)


def _tuning_split(config: Config) -> str:
    """The split evaluated during training: "holdout" with a held-out part of
    the training set, else "eval" (the validation split)."""
    return "holdout" if config.holdout_fraction else "eval"


def _final_evaluations(parts: _Run, progress: summary_lib.Progress) -> None:
    """Precise BN statistics if asked, and the evaluation of every split at
    the end (before the recomputation too: `<split>_moving_bn`)."""
    config, step = parts.config, progress.step
    tuning = _tuning_split(config)
    at_end = progress.eval_step == step
    splits = [] if config.skip_eval else list(parts.eval_datasets)
    if config.precise_bn_examples:
        for split in splits:
            logs = progress.eval_logs if split == tuning and at_end else None
            progress.final_logs[f"{split}_moving_bn"] = logs or _evaluate(
                parts, step, split
            )
        batches = -(-config.precise_bn_examples // config.global_batch_size)
        _reading_data(
            recompute_bn_statistics,
            config,
            parts.strategy,
            parts.model,
            parts.train_iterator,
            batches,
        )
        parts.log(
            f"BatchNormalization statistics recomputed over {batches} batches "
            f"({batches * config.global_batch_size} training images)."
        )
        at_end = False
    for split in splits:
        if split == tuning and at_end:
            continue
        logs = _evaluate(parts, step, split)
        if split == tuning:
            progress.eval_logs = logs
        else:
            progress.final_logs[split] = logs


def _finish(parts: _Run, progress: summary_lib.Progress) -> dict:
    """The final evaluations, callbacks' end, summary.json and model.keras."""
    config, log = parts.config, parts.log
    _final_evaluations(parts, progress)
    parts.callback_list.on_train_end(dict(progress.train_logs, **progress.eval_logs))
    if parts.monitor and parts.monitor.history:
        log(f"Trust ratios at step {parts.monitor.history[-1][0]}:")
        log(parts.monitor.format_table())
    segment = summary_lib.segment(config, progress, *parts.input_fns)
    summary = summary_lib.summary(
        config, parts.strategy.num_replicas_in_sync, progress, segment, parts.previous
    )
    if parts.chief:
        summary_lib.export_model(parts.model, config)
        summary_lib.write(config, summary)
        skipped = segment["skipped_records"]
        train_where = (
            "; those of the tf.data service's workers not counted"
            if config.data_service
            else ""
        )
        log(
            f"Done in {segment['wall_time_sec']:.0f} s; skipped: "
            f"{progress.nonfinite_steps} non-finite step(s), undecodable records "
            f"{skipped['train']} (train{train_where}), {skipped['validation']} "
            f"(validation)"
            + (f", {skipped['holdout']} (holdout)" if "holdout" in skipped else "")
            + f". Results in {config.model_dir}: "
            f"{SUMMARY_FILE}, {MODEL_FILE}, checkpoints; "
            f"`tensorboard --logdir {config.model_dir}`."
        )
    return summary


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
    probe = (data.normalize(images, config.data, compute_dtype), labels)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return lars_tf.TrustRatioMonitor(
        probe_batch=probe,
        every_n_steps=config.trust_ratio_every_steps,
        loss_fn=lambda labels, logits: loss(labels, tf.cast(logits, tf.float32)),
        log_dir=os.path.join(model_dir, "trust_ratio") if model_dir else None,
        measure_at_start=True,
    )


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


def _evaluate(parts: _Run, step: int, split: str) -> dict:
    """One pass over `split` ("eval": the validation split; "holdout"): loss,
    top-1 and top-5 accuracy, and the number of examples."""
    sums = _reading_data(parts.steps.evaluate, parts.eval_datasets[split])
    loss_sum, top1, top5, count = (float(x) for x in sums)
    results = {"loss": loss_sum / count, "top1": top1 / count, "top5": top5 / count}
    results["examples"] = count
    with _writer(parts, split).as_default(step=step):
        for name in ("loss", "top1", "top5"):
            tf.summary.scalar(name, results[name])
    parts.log(
        f"{split:<5} step {step:6d}  loss {results['loss']:.4f}  top-1 "
        f"{results['top1']:.4f}  top-5 {results['top5']:.4f}  ({count:.0f} images)"
    )
    return results


def _log_train(parts: _Run, progress: summary_lib.Progress) -> None:
    """A progress line (with the estimated time left, once a loop after the
    first, which includes tracing, has been timed) and the training scalars
    for TensorBoard."""
    config, step, logs = parts.config, progress.step, progress.train_logs
    with _writer(parts, "train").as_default(step=step):
        for name, value in logs.items():
            tf.summary.scalar(name, value)
    seconds_left = progress.seconds_left(config)
    if seconds_left is None:
        eta = "ETA after the next loop"
    else:
        minutes, seconds = divmod(round(seconds_left), 60)
        eta = f"ETA {minutes}:{seconds:02d}"
    parts.log(
        f"train step {step:6d}/{config.train_steps}  epoch "
        f"{step / config.steps_per_epoch:6.2f}  loss {logs['loss']:.4f}  "
        f"acc {logs['accuracy']:.4f}  lr {logs['learning_rate']:.4g}  "
        f"{logs['images_per_sec']:.0f} images/s  {eta}"
    )
