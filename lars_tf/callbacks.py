"""Keras callbacks for large-batch training: warm-up, trust-ratio monitor, throughput.

All three count training steps themselves (starting from ``optimizer.iterations``
at ``on_train_begin``), so they work in ``model.fit`` and in a custom training
loop that drives them through ``keras.callbacks.CallbackList`` (call
``on_train_begin``, then ``on_train_batch_begin``/``on_train_batch_end`` per step).
With ``steps_per_execution=k`` Keras reports ``k`` steps per batch call; the
callbacks count them all but act once per call.
"""

import importlib.util
import math
import time
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from lars_tf.lars import LARS, trust_ratio


def _inner_optimizer(model: keras.Model) -> keras.optimizers.Optimizer:
    """The model's optimizer, unwrapping a LossScaleOptimizer."""
    optimizer = model.optimizer
    return getattr(optimizer, "inner_optimizer", optimizer)


class _StepCounter(keras.callbacks.Callback):
    """Counts global training steps, including several per `steps_per_execution`."""

    def __init__(self):
        super().__init__()
        self.step = 0  # Steps completed, i.e. the step the next batch will run.
        self._batch_begin = None

    def on_train_begin(self, logs=None):
        self.step = int(_inner_optimizer(self.model).iterations.numpy())

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_begin = batch

    def on_train_batch_end(self, batch, logs=None):
        begin = batch if self._batch_begin is None else self._batch_begin
        self.step += max(batch - begin + 1, 1)
        self._batch_begin = None


@keras.saving.register_keras_serializable(package="lars_tf")
class ScheduleWithWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule with a linear warm-up in front: how `LearningRateWarmup` wraps one.

    For ``t < warmup_steps`` the rate is
    ``initial + (schedule(t) - initial) * t / warmup_steps``: the wrapped schedule
    scaled by a ramp, so it keeps its own shape and meets it continuously at the
    end of warm-up; from ``warmup_steps`` on it is ``schedule(t)`` exactly.
    """

    def __init__(
        self,
        schedule: keras.optimizers.schedules.LearningRateSchedule,
        warmup_steps: int,
        initial_learning_rate: float = 0.0,
    ):
        super().__init__()
        if isinstance(schedule, dict):
            schedule = keras.optimizers.schedules.deserialize(schedule)
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.initial_learning_rate = float(initial_learning_rate)

    def __call__(self, step):
        target = self.schedule(step)
        step = tf.cast(step, target.dtype)
        ramp = step / max(self.warmup_steps, 1)
        initial = tf.cast(self.initial_learning_rate, target.dtype)
        warming = initial + (target - initial) * ramp
        return tf.where(step < self.warmup_steps, warming, target)

    def get_config(self) -> dict:
        return {
            "schedule": keras.optimizers.schedules.serialize(self.schedule),
            "warmup_steps": self.warmup_steps,
            "initial_learning_rate": self.initial_learning_rate,
        }


class LearningRateWarmup(_StepCounter):
    """Ramps the learning rate linearly over the first steps of training.

    For users whose optimizer (any Keras optimizer, not only LARS) has a
    constant learning rate or their own schedule. At global step ``t`` (counted
    from ``optimizer.iterations``, so a resumed run continues the ramp) and
    target rate ``target``, the rate is
    ``initial_learning_rate + (target - initial_learning_rate) * t / warmup_steps``
    for ``t < warmup_steps``, then ``target``.

    * Constant rate (a variable in Keras): ``target`` is the rate at the first
      ``on_train_begin``. The callback assigns the ramped value before each
      batch and the target once warm-up ends, then leaves the variable alone
      (so e.g. ``ReduceLROnPlateau`` may change it later).
    * Schedule: a schedule cannot be assigned per batch, so at
      ``on_train_begin`` the optimizer's schedule is replaced by
      ``ScheduleWithWarmup(schedule, ...)``, whose ``target`` is the user's
      schedule at the same step. It is computed inside the training step from
      ``optimizer.iterations`` and equals the user's schedule from
      ``warmup_steps`` on. In ``model.fit`` the train function is rebuilt so the
      wrapper is traced; in a custom loop call ``on_train_begin`` before the
      train step is first traced. The wrapper is saved with the model.

    The rate used by each batch is put in ``logs["learning_rate"]``; place this
    callback before ``keras.callbacks.TensorBoard`` (with ``update_freq`` in
    batches) so that TensorBoard writes it.

    Args:
        warmup_steps: Number of warm-up steps. Give this or ``warmup_epochs``.
        warmup_epochs: Number of warm-up epochs (may be fractional), converted
            with ``steps_per_epoch``.
        steps_per_epoch: Steps per epoch, for ``warmup_epochs``; defaults to the
            ``steps`` that ``model.fit`` reports.
        initial_learning_rate: Rate at step 0.
        verbose: If > 0, prints when warm-up ends.
    """

    def __init__(
        self,
        warmup_steps: int | None = None,
        warmup_epochs: float | None = None,
        steps_per_epoch: int | None = None,
        initial_learning_rate: float = 0.0,
        verbose: int = 0,
    ):
        super().__init__()
        if (warmup_steps is None) == (warmup_epochs is None):
            raise ValueError(
                "Give exactly one of `warmup_steps` and `warmup_epochs`. Received: "
                f"warmup_steps={warmup_steps}, warmup_epochs={warmup_epochs}"
            )
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(
                f"Argument `warmup_steps` must be >= 0. Received: {warmup_steps}"
            )
        if warmup_epochs is not None and warmup_epochs < 0:
            raise ValueError(
                f"Argument `warmup_epochs` must be >= 0. Received: {warmup_epochs}"
            )
        if steps_per_epoch is not None and steps_per_epoch <= 0:
            raise ValueError(
                f"Argument `steps_per_epoch` must be > 0. Received: {steps_per_epoch}"
            )
        if initial_learning_rate < 0:
            raise ValueError(
                "Argument `initial_learning_rate` must be >= 0. "
                f"Received: {initial_learning_rate}"
            )
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.steps_per_epoch = steps_per_epoch
        self.initial_learning_rate = float(initial_learning_rate)
        self.verbose = verbose
        self._target = None  # Constant target rate; None while unknown.
        self._schedule = None  # The installed ScheduleWithWarmup, if any.
        self._rate = None  # Rate of the current batch, for the logs.
        self._warming_up = False

    def _resolve_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        steps_per_epoch = self.steps_per_epoch or (self.params or {}).get("steps")
        if not steps_per_epoch:
            raise ValueError(
                "`warmup_epochs` needs `steps_per_epoch`: pass it, or train with a "
                "dataset whose length model.fit knows."
            )
        return int(round(self.warmup_epochs * steps_per_epoch))

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.warmup_steps = self._resolve_warmup_steps()
        optimizer = _inner_optimizer(self.model)
        current = optimizer._learning_rate  # Keras keeps no public accessor.
        if isinstance(current, keras.optimizers.schedules.LearningRateSchedule):
            if not isinstance(current, ScheduleWithWarmup):
                self._schedule = ScheduleWithWarmup(
                    current, self.warmup_steps, self.initial_learning_rate
                )
                optimizer.learning_rate = self._schedule
                if getattr(self.model, "train_function", None) is not None:
                    self.model.make_train_function(force=True)
            else:
                self._schedule = current
        elif self._target is None:
            self._target = float(optimizer.learning_rate.numpy())

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        if self._schedule is not None:
            return  # The schedule warms up inside the training step.
        optimizer = _inner_optimizer(self.model)
        if self.step < self.warmup_steps:
            self._warming_up = True
            self._rate = self.initial_learning_rate + (
                self._target - self.initial_learning_rate
            ) * (self.step / self.warmup_steps)
            optimizer.learning_rate = self._rate
        elif self._warming_up:
            # First step after warm-up: hand the variable back at the target.
            self._warming_up = False
            optimizer.learning_rate = self._target
            if self.verbose:
                print(f"LearningRateWarmup: warm-up done at step {self.step}.")
        if not self._warming_up:
            # Not ours any more: report whatever the optimizer holds.
            self._rate = float(optimizer.learning_rate.numpy())

    def on_train_batch_end(self, batch, logs=None):
        step = self.step  # The step this batch ran (its first, if several).
        super().on_train_batch_end(batch, logs)
        if self._schedule is not None:
            self._rate = float(self._schedule(step))
            if self.verbose and step < self.warmup_steps <= self.step:
                print(f"LearningRateWarmup: warm-up done at step {self.step}.")
        if logs is not None:
            logs["learning_rate"] = self._rate


class Throughput(keras.callbacks.Callback):
    """Logs training examples per second and step time, skipping the first steps.

    Step time is the wall time from ``on_train_batch_begin`` to
    ``on_train_batch_end`` after waiting for the step's results (in
    ``model.fit`` Keras has already converted the logs to numbers; in a custom
    loop this callback fetches one tensor of ``logs``). The first
    ``skip_steps`` batches of each ``fit``, which trace and compile the step,
    are left out. Per batch it writes ``logs["examples_per_second"]`` and
    ``logs["step_time_ms"]``; per epoch the same keys averaged over the epoch
    (total examples / total time).

    Args:
        batch_size: Global examples per step.
        skip_steps: Batches to leave out at the start of training.
        verbose: If > 0, prints the epoch averages.

    Attributes:
        step_times: Measured seconds per step, one per counted batch call
            (divided by the steps it ran under ``steps_per_execution``).
    """

    def __init__(self, batch_size: int, skip_steps: int = 2, verbose: int = 0):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(
                f"Argument `batch_size` must be > 0. Received: {batch_size}"
            )
        if skip_steps < 0:
            raise ValueError(
                f"Argument `skip_steps` must be >= 0. Received: {skip_steps}"
            )
        self.batch_size = int(batch_size)
        self.skip_steps = int(skip_steps)
        self.verbose = verbose
        self.step_times: list[float] = []
        self._batches_seen = 0
        self._batch_begin = None
        self._start = None
        self._epoch_steps = 0
        self._epoch_seconds = 0.0

    def on_train_begin(self, logs=None):
        self._batches_seen = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_steps = 0
        self._epoch_seconds = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_begin = batch
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        _wait_for(logs)
        elapsed = time.perf_counter() - self._start
        self._batches_seen += 1
        if self._batches_seen <= self.skip_steps:
            return
        begin = batch if self._batch_begin is None else self._batch_begin
        steps = max(batch - begin + 1, 1)
        self.step_times.append(elapsed / steps)
        self._epoch_steps += steps
        self._epoch_seconds += elapsed
        if logs is not None:
            logs["step_time_ms"] = 1000.0 * elapsed / steps
            logs["examples_per_second"] = self.batch_size * steps / elapsed

    def on_epoch_end(self, epoch, logs=None):
        if not self._epoch_steps:
            return
        step_time = self._epoch_seconds / self._epoch_steps
        examples_per_second = self.batch_size / step_time
        if logs is not None:
            logs["step_time_ms"] = 1000.0 * step_time
            logs["examples_per_second"] = examples_per_second
        if self.verbose:
            print(
                f"Throughput: epoch {epoch + 1}: {examples_per_second:.1f} examples/s, "
                f"{1000.0 * step_time:.2f} ms/step"
            )


def _wait_for(logs) -> None:
    """Blocks until the step that produced `logs` has finished on the device."""
    for value in (logs or {}).values():
        if tf.is_tensor(value):
            value.numpy()
            return


class VariableStats(NamedTuple):
    """One variable's row of the trust-ratio monitor.

    ``effective_learning_rate`` is the step size LARS applies to the variable's
    (weight-decayed) gradient; for another optimizer, its global rate.
    """

    name: str
    weight_norm: float
    gradient_norm: float
    ratio: float  # ||w|| / ||g||, inf where ||g|| = 0.
    effective_learning_rate: float


def table_name(path: str) -> str:
    """Paper-style short name of a variable: ``conv1/kernel`` -> ``conv1.w``."""
    parts = path.split("/")
    parts[-1] = {"kernel": "w", "bias": "b"}.get(parts[-1], parts[-1])
    return ".".join(parts)


class TrustRatioMonitor(_StepCounter):
    """Records per-variable ||w||, ||g||, ||w||/||g|| and LARS's effective rate.

    Every ``every_n_steps`` training steps the monitor takes the gradient of the
    loss on a fixed probe batch with ``tf.GradientTape``, in its own
    ``tf.function`` traced once. The training step itself is not changed, so a
    model trained without the monitor (or between measurements) pays nothing;
    a measurement costs about one forward and backward pass on the probe batch.
    The forward pass is ``model.stateless_call(..., training=True)``, so batch
    norm uses batch statistics as in training but its moving averages (and any
    other model state) are left untouched. Under a ``tf.distribute`` strategy it
    runs in cross-replica context on the variables' values, which are the same
    on every replica.

    The effective learning rate is what the model's optimizer applies: for
    ``lars_tf.LARS``, ``lr * trust_ratio`` (``min(trust_ratio, lr)`` with
    ``clip=True``, ``lr`` for variables excluded from adaptation), using
    ``lars_tf.trust_ratio`` with each variable's weight decay; for any other
    optimizer, ``lr``. ``lr`` is the optimizer's rate at its current step.

    Args:
        probe_batch: ``(x, y)`` on which gradients are taken; keep it the size
            of a training batch for a faithful ||g||.
        every_n_steps: Measure after every this many training steps.
        loss_fn: ``loss_fn(y_true, y_pred)``, averaged over the batch if it
            returns per-example values; defaults to the loss the model was
            compiled with (one loss, not a dict or list of them). Losses added
            by layers (regularizers) are added to it.
        log_dir: If given, writes TensorBoard scalars per variable
            (``trust_ratio/weight_norm/<name>``, ``.../gradient_norm/<name>``,
            ``.../ratio/<name>``, ``.../effective_learning_rate/<name>``) and
            histograms of the ratio and the effective rate across variables.
        measure_at_start: Also measure at ``on_train_begin``, on the initial
            weights (the paper's "iteration 1").
        verbose: If > 0, prints the table at every measurement.

    Attributes:
        history: List of ``(step, [VariableStats, ...])``, one per measurement.
    """

    def __init__(
        self,
        probe_batch: tuple,
        every_n_steps: int = 100,
        loss_fn=None,
        log_dir: str | None = None,
        measure_at_start: bool = False,
        verbose: int = 0,
    ):
        super().__init__()
        if every_n_steps <= 0:
            raise ValueError(
                f"Argument `every_n_steps` must be > 0. Received: {every_n_steps}"
            )
        if not (isinstance(probe_batch, tuple | list) and len(probe_batch) == 2):
            raise ValueError(
                "Argument `probe_batch` must be a pair (x, y). "
                f"Received: {type(probe_batch).__name__}"
            )
        if log_dir is not None and importlib.util.find_spec("tensorboard") is None:
            raise ImportError(
                "TrustRatioMonitor(log_dir=...) writes with tf.summary, which needs "
                "the `tensorboard` package: pip install tensorboard"
            )
        self.probe_x = tf.nest.map_structure(tf.convert_to_tensor, probe_batch[0])
        self.probe_y = tf.nest.map_structure(tf.convert_to_tensor, probe_batch[1])
        self.every_n_steps = int(every_n_steps)
        self.loss_fn = loss_fn
        self.log_dir = log_dir
        self.measure_at_start = measure_at_start
        self.verbose = verbose
        self.history: list[tuple[int, list[VariableStats]]] = []
        self._norms = None  # The tf.function, built on first use.
        self._writer = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.measure_at_start:
            self._record()

    def on_train_batch_end(self, batch, logs=None):
        previous = self.step
        super().on_train_batch_end(batch, logs)
        # Measure when a multiple of every_n_steps was crossed.
        if self.step // self.every_n_steps > previous // self.every_n_steps:
            self._record()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def measure(self) -> list[VariableStats]:
        """Measures the model's current weights on the probe batch, now."""
        model = self.model
        variables = model.trainable_variables
        if not variables:
            raise ValueError("The model has no trainable variables; build it first.")
        if self._norms is None:
            self._norms = tf.function(self._probe_norms)
        weight_norms, gradient_norms = self._norms(self.probe_x, self.probe_y)
        learning_rates = self._effective_learning_rates(
            variables, weight_norms, gradient_norms
        )
        weight_norms = weight_norms.numpy().astype(float)
        gradient_norms = gradient_norms.numpy().astype(float)
        return [
            VariableStats(
                name=table_name(variable.path.removeprefix(f"{model.name}/")),
                weight_norm=w,
                gradient_norm=g,
                ratio=w / g if g > 0 else math.inf,
                effective_learning_rate=lr,
            )
            for variable, w, g, lr in zip(
                variables, weight_norms, gradient_norms, learning_rates, strict=True
            )
        ]

    def format_table(
        self, stats: list[VariableStats] | None = None, learning_rate: bool = True
    ) -> str:
        """The stats (default: the latest measurement) in the paper's Table 2 layout.

        One row per variable, kernel (``.w``) before bias (``.b``) of each layer,
        in the model's order; columns ``Layer | ||w|| | ||∇w|| | ||w||/||∇w||``,
        plus the effective learning rate if ``learning_rate``.
        """
        if stats is None:
            if not self.history:
                raise ValueError("Nothing measured yet: call measure() or train.")
            stats = self.history[-1][1]
        header = ["Layer", "||w||", "||∇w||", "||w||/||∇w||"]
        if learning_rate:
            header.append("LARS lr")
        rows = []
        for row in stats:
            cells = [
                row.name,
                f"{row.weight_norm:.3g}",
                f"{row.gradient_norm:.3g}",
                f"{row.ratio:.3g}",
            ]
            if learning_rate:
                cells.append(f"{row.effective_learning_rate:.3g}")
            rows.append(cells)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = []
        for cells in [header, *rows]:
            first, *numbers = cells
            padded = [first.ljust(widths[0])]
            padded += [c.rjust(w) for c, w in zip(numbers, widths[1:], strict=True)]
            lines.append(" | ".join(padded))
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines)

    def _probe_norms(self, x, y):
        """Per-variable ||w|| and ||g|| of the loss on (x, y), without side effects."""
        model = self.model
        weights = [tf.convert_to_tensor(v.value) for v in model.trainable_variables]
        state = [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables]
        loss_fn = self.loss_fn or keras.losses.get(model.loss)
        with tf.GradientTape() as tape:
            tape.watch(weights)
            y_pred, _, layer_losses = model.stateless_call(
                weights, state, x, training=True, return_losses=True
            )
            # A loss given by name (e.g. "mse") returns per-example values;
            # training minimizes their mean.
            loss = tf.reduce_mean(loss_fn(y, y_pred))
            if layer_losses:
                loss += tf.add_n(layer_losses)
        gradients = tape.gradient(loss, weights)
        weight_norms = tf.stack([tf.norm(w) for w in weights])
        gradient_norms = tf.stack(
            [
                tf.norm(tf.convert_to_tensor(g)) if g is not None else tf.zeros([])
                for g in gradients
            ]
        )
        return weight_norms, gradient_norms

    def _effective_learning_rates(self, variables, weight_norms, gradient_norms):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return [math.nan] * len(variables)
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        learning_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        if not isinstance(optimizer, LARS):
            return [learning_rate] * len(variables)
        adapted, decay_rates = _lars_flags(optimizer, self.model)
        ratios = trust_ratio(
            tf.cast(weight_norms, tf.float64),
            tf.cast(gradient_norms, tf.float64),
            tf.constant(decay_rates, tf.float64),
            optimizer.trust_coefficient,
            optimizer.epsilon,
        ).numpy()
        if optimizer.clip:
            local = np.minimum(ratios, learning_rate)
        else:
            local = learning_rate * ratios
        return [
            float(lr) if is_adapted else learning_rate
            for lr, is_adapted in zip(local, adapted, strict=True)
        ]

    def _record(self) -> None:
        stats = self.measure()
        self.history.append((self.step, stats))
        if self.log_dir is not None:
            self._write_summaries(self.step, stats)
        if self.verbose:
            print(f"TrustRatioMonitor: step {self.step}\n{self.format_table(stats)}")

    def _write_summaries(self, step: int, stats: list[VariableStats]) -> None:
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default(step=step):
            for row in stats:
                for field in (
                    "weight_norm",
                    "gradient_norm",
                    "ratio",
                    "effective_learning_rate",
                ):
                    tf.summary.scalar(
                        f"trust_ratio/{field}/{row.name}", getattr(row, field)
                    )
            finite = [r.ratio for r in stats if math.isfinite(r.ratio)]
            if finite:
                tf.summary.histogram("trust_ratio/ratio_across_variables", finite)
            tf.summary.histogram(
                "trust_ratio/effective_learning_rate_across_variables",
                [r.effective_learning_rate for r in stats],
            )


def _lars_flags(optimizer: LARS, model: keras.Model) -> tuple[list[bool], list[float]]:
    """Per-variable (adapted, weight decay) as the LARS optimizer decided them.

    An optimizer not built yet is built here, in the model's distribution
    strategy, exactly as its first step would build it.
    """
    variables = model.trainable_variables
    if not optimizer.built:
        with model.distribute_strategy.scope():
            optimizer.build(variables)
    settings = [optimizer.variable_settings(v) for v in variables]
    return [adapted for adapted, _ in settings], [decay for _, decay in settings]
