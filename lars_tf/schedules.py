"""Learning-rate schedules and the batch-size scaling rule for large-batch training.

LARS is trained, in the paper (You, Gitman & Ginsburg 2017) and in the MLPerf
ResNet-50 reference, with a linear warm-up followed by polynomial decay of power 2.
Both schedules here share one step convention, with ``t`` the optimizer step
(``optimizer.iterations``, the number of updates already applied):

* warm-up, ``0 <= t < warmup_steps``:
  ``initial + (peak - initial) * t / warmup_steps`` (so step 0 uses ``initial``,
  as in Keras's ``CosineDecay`` warm-up and MLPerf's ``plr * epoch / w_epochs``);
* decay, ``warmup_steps <= t < decay_steps``: a curve from ``peak`` at
  ``t = warmup_steps`` down to ``end`` at ``t = decay_steps``;
* ``t >= decay_steps``: ``end``.

``decay_steps`` is the *total* step count at which the end rate is reached, warm-up
included (unlike Keras's ``CosineDecay``, whose ``decay_steps`` counts after the
warm-up). Both formulas give ``peak`` at ``t = warmup_steps``, so the rate is
continuous. ``ScheduleWithWarmup`` puts the same ramp in front of any other
schedule; the ramp is ``linear_warmup``, the one warm-up formula of lars_tf.
The schedules use ``keras.ops`` and run on every Keras backend.
"""

import math

import keras
from keras import ops

from lars_tf.validation import (
    check_decay_steps,
    check_integer,
    check_learning_rate,
    check_power,
    check_warmup_steps,
)

_RULES = ("linear", "sqrt")


def linear_warmup(step, warmup_steps: int, initial_rate, target_rate):
    """The rate at `step` of a linear ramp from `initial_rate` to `target_rate`.

    `initial + (target - initial) * step / warmup_steps`, the one warm-up
    formula of lars_tf: step 0 uses `initial_rate`, and the ramp would reach
    `target_rate` at `step = warmup_steps`, where the caller switches to the
    target. Works on Python floats and on tensors of any backend (the caller
    casts `step` to the rates' dtype); `warmup_steps = 0` gives no division
    by zero.
    """
    return initial_rate + (target_rate - initial_rate) * (step / max(warmup_steps, 1))


class _WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up then a decay curve; subclasses define the curve."""

    def __init__(
        self,
        peak_learning_rate: float,
        decay_steps: int,
        warmup_steps: int = 0,
        initial_learning_rate: float = 0.0,
        end_learning_rate: float = 0.0,
        name: str | None = None,
    ):
        super().__init__()
        self.peak_learning_rate = check_learning_rate(
            peak_learning_rate, "peak_learning_rate"
        )
        self.decay_steps = check_decay_steps(decay_steps)
        self.warmup_steps = check_warmup_steps(warmup_steps)
        if self.warmup_steps > self.decay_steps:
            raise ValueError(
                "`warmup_steps` must be <= `decay_steps` (the total number of "
                f"steps). Received: warmup_steps={warmup_steps}, "
                f"decay_steps={decay_steps}"
            )
        self.initial_learning_rate = check_learning_rate(
            initial_learning_rate, "initial_learning_rate"
        )
        self.end_learning_rate = check_learning_rate(
            end_learning_rate, "end_learning_rate"
        )
        self.name = name or type(self).__name__

    def _decayed_fraction(self, progress):
        """Maps decay progress in [0, 1] to the weight of (peak - end)."""
        raise NotImplementedError

    def __call__(self, step):
        with keras.name_scope(self.name):
            step = ops.cast(step, "float32")
            warmup_steps = float(self.warmup_steps)
            warmup_rate = linear_warmup(
                step,
                self.warmup_steps,
                self.initial_learning_rate,
                self.peak_learning_rate,
            )
            # max(.., 1) keeps the division finite when the decay has zero
            # length; its branch is then never selected.
            decay_length = max(float(self.decay_steps) - warmup_steps, 1.0)
            decay_progress = ops.clip((step - warmup_steps) / decay_length, 0.0, 1.0)
            decay_rate = self.end_learning_rate + self._decayed_fraction(
                decay_progress
            ) * (self.peak_learning_rate - self.end_learning_rate)
            rate = ops.where(step < warmup_steps, warmup_rate, decay_rate)
            return ops.where(
                step >= float(self.decay_steps), self.end_learning_rate, rate
            )

    def get_config(self) -> dict:
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "decay_steps": self.decay_steps,
            "warmup_steps": self.warmup_steps,
            "initial_learning_rate": self.initial_learning_rate,
            "end_learning_rate": self.end_learning_rate,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="lars_tf")
class WarmupPolynomialDecay(_WarmupDecay):
    """Linear warm-up to a peak rate, then polynomial decay (the paper's "poly(2)").

    For step ``t`` (see the module docstring for the warm-up phase), with
    ``w = warmup_steps`` and ``T = decay_steps``::

        w <= t < T:  (peak - end) * (1 - (t - w) / (T - w)) ** power + end
        t >= T:      end

    This is the LARS paper's and MLPerf's poly schedule, ``power=2`` by default.
    MLPerf's TF reference (``lars_util.poly_rate_schedule``) computes the same curve
    with a decay length one step longer, ``train_steps - w + 1``, and
    ``max(t - w, 1)``; its rate never quite reaches ``end``. The two differ by
    ``O(1 / (T - w))`` of the peak rate.

    Args:
        peak_learning_rate: Rate at the end of warm-up (``t = warmup_steps``).
        decay_steps: Total step at which ``end_learning_rate`` is reached,
            warm-up included.
        warmup_steps: Number of linear warm-up steps; 0 starts at the peak.
        initial_learning_rate: Rate at step 0 when ``warmup_steps > 0``.
        end_learning_rate: Rate from ``decay_steps`` on.
        power: Exponent of the decay; must be > 0.
        name: Name scope of the ops.
    """

    def __init__(
        self,
        peak_learning_rate: float,
        decay_steps: int,
        warmup_steps: int = 0,
        initial_learning_rate: float = 0.0,
        end_learning_rate: float = 0.0,
        power: float = 2.0,
        name: str | None = None,
    ):
        super().__init__(
            peak_learning_rate,
            decay_steps,
            warmup_steps,
            initial_learning_rate,
            end_learning_rate,
            name,
        )
        self.power = check_power(power)

    def _decayed_fraction(self, progress):
        return ops.power(1.0 - progress, self.power)

    def get_config(self) -> dict:
        return {**super().get_config(), "power": self.power}


@keras.saving.register_keras_serializable(package="lars_tf")
class WarmupCosineDecay(_WarmupDecay):
    """Linear warm-up to a peak rate, then half-cosine decay to the end rate.

    For step ``t`` (see the module docstring for the warm-up phase), with
    ``w = warmup_steps`` and ``T = decay_steps``::

        w <= t < T:  end + (peak - end) * 0.5 * (1 + cos(pi * (t - w) / (T - w)))
        t >= T:      end

    Args:
        peak_learning_rate: Rate at the end of warm-up (``t = warmup_steps``).
        decay_steps: Total step at which ``end_learning_rate`` is reached,
            warm-up included.
        warmup_steps: Number of linear warm-up steps; 0 starts at the peak.
        initial_learning_rate: Rate at step 0 when ``warmup_steps > 0``.
        end_learning_rate: Rate from ``decay_steps`` on.
        name: Name scope of the ops.
    """

    def _decayed_fraction(self, progress):
        return 0.5 * (1.0 + ops.cos(math.pi * progress))


@keras.saving.register_keras_serializable(package="lars_tf")
class ScheduleWithWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Any schedule with a linear warm-up in front (`lars_tf.LearningRateWarmup`'s).

    For ``t < warmup_steps`` the rate is
    ``initial + (schedule(t) - initial) * t / warmup_steps``: the wrapped schedule
    scaled by a ramp, so it keeps its own shape and meets it continuously at the
    end of warm-up; from ``warmup_steps`` on it is ``schedule(t)`` exactly.

    Args:
        schedule: The schedule to warm up (or its serialized config).
        warmup_steps: Number of warm-up steps, >= 0.
        initial_learning_rate: Rate at step 0, >= 0.
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
        self.warmup_steps = check_warmup_steps(warmup_steps)
        self.initial_learning_rate = check_learning_rate(
            initial_learning_rate, "initial_learning_rate"
        )

    def __call__(self, step):
        target = self.schedule(step)
        step = ops.cast(step, target.dtype)
        initial = ops.cast(self.initial_learning_rate, target.dtype)
        warming = linear_warmup(step, self.warmup_steps, initial, target)
        return ops.where(step < self.warmup_steps, warming, target)

    def get_config(self) -> dict:
        return {
            "schedule": keras.optimizers.schedules.serialize(self.schedule),
            "warmup_steps": self.warmup_steps,
            "initial_learning_rate": self.initial_learning_rate,
        }


def scaled_learning_rate(
    base_learning_rate: float,
    batch_size: int,
    base_batch_size: int = 256,
    rule: str = "linear",
) -> float:
    """Scales a learning rate tuned at ``base_batch_size`` to ``batch_size``.

    ``"linear"`` multiplies by ``batch_size / base_batch_size`` (Goyal et al. 2017);
    ``"sqrt"`` by its square root (Krizhevsky 2014, Hoffer et al. 2017). The LARS
    paper notes that linear scaling alone diverges for large batches without
    warm-up and LARS.

    Args:
        base_learning_rate: Rate that works at ``base_batch_size``; must be >= 0.
        batch_size: Global batch size to scale to; must be > 0.
        base_batch_size: Batch size the base rate was tuned for; must be > 0.
        rule: ``"linear"`` or ``"sqrt"``.

    Returns:
        The scaled learning rate as a Python float.
    """
    check_learning_rate(base_learning_rate, "base_learning_rate")
    check_integer("batch_size", batch_size, 1)
    check_integer("base_batch_size", base_batch_size, 1)
    if rule not in _RULES:
        raise ValueError(f"`rule` must be one of {_RULES}. Received: {rule!r}")
    ratio = batch_size / base_batch_size
    return float(base_learning_rate * (ratio if rule == "linear" else math.sqrt(ratio)))
