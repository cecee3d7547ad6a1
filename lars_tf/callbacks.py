"""Keras callbacks for large-batch training: learning-rate warm-up and throughput.

They count training steps with `StepCounter` (starting from
``optimizer.iterations`` at ``on_train_begin``), as does
``lars_tf.TrustRatioMonitor``, so they work in ``model.fit`` and in a custom
training loop that drives them through ``keras.callbacks.CallbackList`` (call
``on_train_begin``, then ``on_train_batch_begin``/``on_train_batch_end`` per
step), on every Keras backend. With ``steps_per_execution=k`` Keras reports
``k`` steps per batch call; the callbacks count them all but act once per call.
"""

import time

import keras
from keras import ops

from lars_tf import validation
from lars_tf.schedules import ScheduleWithWarmup, linear_warmup


def inner_optimizer(model: keras.Model) -> keras.optimizers.Optimizer:
    """The model's optimizer, unwrapping a `LossScaleOptimizer`.

    The wrapper delegates to the inner optimizer, whose learning rate, step
    counter and class are what the callbacks read.
    """
    optimizer = model.optimizer
    return getattr(optimizer, "inner_optimizer", optimizer)


class StepCounter(keras.callbacks.Callback):
    """Base of the callbacks here: counts global training steps.

    ``step`` is the number of steps completed, i.e. the step the next batch
    will run; it starts from the optimizer's ``iterations``, so a resumed run
    continues the count. ``steps_in_last_call`` is how many steps the last
    batch call ran: more than 1 under ``steps_per_execution``, where Keras
    calls ``on_train_batch_begin`` with the first batch and
    ``on_train_batch_end`` with the last.
    """

    def __init__(self):
        super().__init__()
        self.step = 0
        self.steps_in_last_call = 0
        self._batch_begin = None

    def on_train_begin(self, logs=None):
        iterations = inner_optimizer(self.model).iterations
        self.step = int(ops.convert_to_numpy(iterations))

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_begin = batch

    def on_train_batch_end(self, batch, logs=None):
        begin = batch if self._batch_begin is None else self._batch_begin
        self.steps_in_last_call = max(batch - begin + 1, 1)
        self.step += self.steps_in_last_call
        self._batch_begin = None


class LearningRateWarmup(StepCounter):
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
        if warmup_steps is not None:
            warmup_steps = validation.check_warmup_steps(warmup_steps)
        if warmup_epochs is not None:
            warmup_epochs = validation.check_number("warmup_epochs", warmup_epochs, 0.0)
        if steps_per_epoch is not None:
            steps_per_epoch = validation.check_integer(
                "steps_per_epoch", steps_per_epoch, 1
            )
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.steps_per_epoch = steps_per_epoch
        self.initial_learning_rate = validation.check_learning_rate(
            initial_learning_rate, "initial_learning_rate"
        )
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
        optimizer = inner_optimizer(self.model)
        current = optimizer._learning_rate  # Keras keeps no public accessor.
        if isinstance(current, keras.optimizers.schedules.LearningRateSchedule):
            # A bare ScheduleWithWarmup is warmed up already (this callback's,
            # or one saved with the model); its subclasses, the named decays,
            # are wrapped like any schedule.
            if type(current) is not ScheduleWithWarmup:
                self._schedule = ScheduleWithWarmup(
                    current, self.warmup_steps, self.initial_learning_rate
                )
                optimizer.learning_rate = self._schedule
                if getattr(self.model, "train_function", None) is not None:
                    self.model.make_train_function(force=True)
            else:
                self._schedule = current
        elif self._target is None:
            self._target = float(ops.convert_to_numpy(optimizer.learning_rate))

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        if self._schedule is not None:
            return  # The schedule warms up inside the training step.
        optimizer = inner_optimizer(self.model)
        if self.step < self.warmup_steps:
            self._warming_up = True
            self._rate = linear_warmup(
                self.step, self.warmup_steps, self.initial_learning_rate, self._target
            )
            optimizer.learning_rate = self._rate
        elif self._warming_up:
            # First step after warm-up: hand the variable back at the target.
            self._warming_up = False
            optimizer.learning_rate = self._target
            if self.verbose:
                print(f"LearningRateWarmup: warm-up done at step {self.step}.")
        if not self._warming_up:
            # Not ours any more: report whatever the optimizer holds.
            self._rate = float(ops.convert_to_numpy(optimizer.learning_rate))

    def on_train_batch_end(self, batch, logs=None):
        step = self.step  # The step this batch ran (its first, if several).
        super().on_train_batch_end(batch, logs)
        if self._schedule is not None:
            self._rate = float(ops.convert_to_numpy(self._schedule(step)))
            if self.verbose and step < self.warmup_steps <= self.step:
                print(f"LearningRateWarmup: warm-up done at step {self.step}.")
        if logs is not None:
            logs["learning_rate"] = self._rate


class Throughput(StepCounter):
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
        self.batch_size = validation.check_integer("batch_size", batch_size, 1)
        self.skip_steps = validation.check_integer("skip_steps", skip_steps, 0)
        self.verbose = verbose
        self.step_times: list[float] = []
        self._batches_seen = 0
        self._start = None
        self._epoch_steps = 0
        self._epoch_seconds = 0.0

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._batches_seen = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_steps = 0
        self._epoch_seconds = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        _wait_for(logs)
        elapsed = time.perf_counter() - self._start
        super().on_train_batch_end(batch, logs)
        self._batches_seen += 1
        if self._batches_seen <= self.skip_steps:
            return
        steps = self.steps_in_last_call
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
        if ops.is_tensor(value):
            ops.convert_to_numpy(value)
            return
