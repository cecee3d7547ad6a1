"""Learning-rate schedules and the batch-size scaling rule for large-batch training.

LARS is trained, in the paper (You, Gitman & Ginsburg 2017) and in the MLPerf
ResNet-50 reference, with a linear warm-up followed by polynomial decay of power 2.
Every warm-up of lars_tf ramps by `linear_warmup`: a schedule's through
`ScheduleWithWarmup`, a constant rate's in `lars_tf.LearningRateWarmup`; the
decays after it are Keras's own (`PolynomialDecay`, `CosineDecay`,
`PiecewiseConstantDecay`). The named schedules share one step convention, with
``t`` the optimizer step (``optimizer.iterations``, the updates already applied):

* warm-up, ``0 <= t < warmup_steps``:
  ``initial + (peak - initial) * t / warmup_steps`` (so step 0 uses ``initial``,
  as in Keras's ``CosineDecay`` warm-up and MLPerf's ``plr * epoch / w_epochs``);
* from ``t = warmup_steps`` on, the decay, which starts at ``peak`` there.

For `WarmupPolynomialDecay` and `WarmupCosineDecay`, ``decay_steps`` is the
*total* step count at which the end rate is reached, warm-up included (unlike
Keras's ``CosineDecay``, whose ``decay_steps`` counts after the warm-up); from
``decay_steps`` on the rate is ``end``. The schedules use ``keras.ops`` and run
on every Keras backend.
"""

import math

import keras
from keras import ops

from lars_tf.validation import (
    check_decay_steps,
    check_integer,
    check_learning_rate,
    check_number,
    check_power,
    check_warmup_steps,
)

_RULES = ("linear", "sqrt")
_schedules = keras.optimizers.schedules


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


@keras.saving.register_keras_serializable(package="lars_tf")
class ScheduleWithWarmup(_schedules.LearningRateSchedule):
    """Any schedule with a linear warm-up in front: the warm-up of lars_tf.

    Keras's schedules have no warm-up (only ``CosineDecay`` has its own), so
    this puts one in front of any of them; it is `lars_tf.LearningRateWarmup`'s
    and the named schedules' warm-up. Two ways to join the schedule:

    * ``warmup_target=None``: for ``t < warmup_steps`` the rate is
      ``initial + (schedule(t) - initial) * t / warmup_steps``, the wrapped
      schedule scaled by a ramp, so it keeps its own shape and meets it
      continuously; from ``warmup_steps`` on it is ``schedule(t)`` exactly.
    * ``warmup_target=peak``: the ramp goes from ``initial`` to ``peak``, and
      the schedule starts after it: ``schedule(t - warmup_steps)`` from
      ``warmup_steps`` on (Keras's ``CosineDecay`` convention with its
      ``warmup_target``), with the step as a float32 tensor.

    Args:
        schedule: The schedule to warm up (or its serialized config).
        warmup_steps: Number of warm-up steps, >= 0.
        initial_learning_rate: Rate at step 0, >= 0.
        warmup_target: Rate the ramp reaches, >= 0; None ramps to the schedule.
    """

    def __init__(
        self,
        schedule: _schedules.LearningRateSchedule,
        warmup_steps: int,
        initial_learning_rate: float = 0.0,
        warmup_target: float | None = None,
    ):
        super().__init__()
        if isinstance(schedule, dict):
            schedule = _schedules.deserialize(schedule)
        self.schedule = schedule
        self.warmup_steps = check_warmup_steps(warmup_steps)
        self.initial_learning_rate = check_learning_rate(
            initial_learning_rate, "initial_learning_rate"
        )
        if warmup_target is not None:
            warmup_target = check_learning_rate(warmup_target, "warmup_target")
        self.warmup_target = warmup_target

    def __call__(self, step):
        if self.warmup_target is None:
            after = target = self.schedule(step)
        else:
            shifted = ops.cast(step, "float32") - float(self.warmup_steps)
            after = self.schedule(ops.maximum(shifted, 0.0))
            target = ops.cast(self.warmup_target, after.dtype)
        step = ops.cast(step, after.dtype)
        initial = ops.cast(self.initial_learning_rate, after.dtype)
        warming = linear_warmup(step, self.warmup_steps, initial, target)
        return ops.where(step < self.warmup_steps, warming, after)

    def get_config(self) -> dict:
        return {
            "schedule": _schedules.serialize(self.schedule),
            "warmup_steps": self.warmup_steps,
            "initial_learning_rate": self.initial_learning_rate,
            "warmup_target": self.warmup_target,
        }


def _check_warmup_and_total(warmup_steps, decay_steps) -> tuple[int, int]:
    """`warmup_steps` and `decay_steps` (the total), checked against each other."""
    warmup_steps = check_warmup_steps(warmup_steps)
    decay_steps = check_decay_steps(decay_steps)
    if warmup_steps > decay_steps:
        raise ValueError(
            "`warmup_steps` must be <= `decay_steps` (the total number of "
            f"steps). Received: warmup_steps={warmup_steps}, "
            f"decay_steps={decay_steps}"
        )
    return warmup_steps, decay_steps


class _WarmupThenDecay(ScheduleWithWarmup):
    """Warm-up to `peak_learning_rate`, then a Keras decay that reaches
    `end_learning_rate` at the total step `decay_steps`; subclasses give the
    decay (`_decay`). Holds the arguments the saved configs hold."""

    def __init__(
        self,
        peak_learning_rate: float,
        decay_steps: int,
        warmup_steps: int,
        initial_learning_rate: float,
        end_learning_rate: float,
        name: str | None,
    ):
        warmup_steps, self.decay_steps = _check_warmup_and_total(
            warmup_steps, decay_steps
        )
        self.peak_learning_rate = check_learning_rate(
            peak_learning_rate, "peak_learning_rate"
        )
        self.end_learning_rate = check_learning_rate(
            end_learning_rate, "end_learning_rate"
        )
        self.name = name or type(self).__name__
        length = self.decay_steps - warmup_steps
        # Keras's decays need a length >= 1; a decay of none is the end rate.
        decay = (
            self._decay(length)
            if length
            else _schedules.PolynomialDecay(
                self.end_learning_rate, 1, self.end_learning_rate, name=self.name
            )
        )
        super().__init__(
            decay,
            warmup_steps,
            initial_learning_rate,
            warmup_target=self.peak_learning_rate,
        )

    def _decay(self, length: int) -> _schedules.LearningRateSchedule:
        """The decay from the peak to the end rate over `length` steps."""
        raise NotImplementedError

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
class WarmupPolynomialDecay(_WarmupThenDecay):
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

    The decay is Keras's ``PolynomialDecay``, started at ``t = w`` by
    `ScheduleWithWarmup`; Keras's has no warm-up, so this class gives the pair
    one name and arguments (the total ``decay_steps``), which saved models hold.

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
        self.power = check_power(power)
        super().__init__(
            peak_learning_rate,
            decay_steps,
            warmup_steps,
            initial_learning_rate,
            end_learning_rate,
            name,
        )

    def _decay(self, length: int) -> _schedules.LearningRateSchedule:
        return _schedules.PolynomialDecay(
            self.peak_learning_rate,
            length,
            self.end_learning_rate,
            power=self.power,
            name=self.name,
        )

    def get_config(self) -> dict:
        return {**super().get_config(), "power": self.power}


@keras.saving.register_keras_serializable(package="lars_tf")
class WarmupCosineDecay(_WarmupThenDecay):
    """Linear warm-up to a peak rate, then half-cosine decay to the end rate.

    For step ``t`` (see the module docstring for the warm-up phase), with
    ``w = warmup_steps`` and ``T = decay_steps``::

        w <= t < T:  end + (peak - end) * 0.5 * (1 + cos(pi * (t - w) / (T - w)))
        t >= T:      end

    The decay is Keras's ``CosineDecay`` (its ``alpha`` is ``end / peak``),
    warmed up by `ScheduleWithWarmup` like the other schedules here rather than
    by its own warm-up, which cannot end at ``t = T`` (its ``decay_steps`` must
    be > 0). This class keeps the arguments of the poly schedule (the total
    ``decay_steps``, an end rate), which saved models hold.

    Args:
        peak_learning_rate: Rate at the end of warm-up (``t = warmup_steps``).
        decay_steps: Total step at which ``end_learning_rate`` is reached,
            warm-up included.
        warmup_steps: Number of linear warm-up steps; 0 starts at the peak.
        initial_learning_rate: Rate at step 0 when ``warmup_steps > 0``.
        end_learning_rate: Rate from ``decay_steps`` on; 0 when the peak is 0.
        name: Name scope of the ops.
    """

    def __init__(
        self,
        peak_learning_rate: float,
        decay_steps: int,
        warmup_steps: int = 0,
        initial_learning_rate: float = 0.0,
        end_learning_rate: float = 0.0,
        name: str | None = None,
    ):
        if peak_learning_rate == 0 and end_learning_rate != 0:
            raise ValueError(
                "`end_learning_rate` must be 0 when `peak_learning_rate` is 0 "
                "(the cosine scales the peak). Received: "
                f"end_learning_rate={end_learning_rate!r}"
            )
        super().__init__(
            peak_learning_rate,
            decay_steps,
            warmup_steps,
            initial_learning_rate,
            end_learning_rate,
            name,
        )

    def _decay(self, length: int) -> _schedules.LearningRateSchedule:
        peak = self.peak_learning_rate
        return _schedules.CosineDecay(
            peak,
            length,
            alpha=self.end_learning_rate / peak if peak else 0.0,
            name=self.name,
        )


@keras.saving.register_keras_serializable(package="lars_tf")
class WarmupStepDecay(ScheduleWithWarmup):
    """Linear warm-up from 0 to a peak rate, then a factor at each boundary.

    Step ``t < warmup_steps`` has rate ``peak * t / warmup_steps``; from
    ``warmup_steps`` on the rate is
    ``peak * decay_factor ** (number of boundaries <= t)``. The decay is Keras's
    ``PiecewiseConstantDecay``, started at ``t = warmup_steps`` by
    `ScheduleWithWarmup`; this class adds the warm-up, which Keras's lacks, and
    takes the boundaries as absolute steps and a factor, which saved models hold.

    Args:
        peak_learning_rate: Rate at the end of warm-up, >= 0.
        boundaries: Non-decreasing steps >= 0 at which the rate is multiplied
            by ``decay_factor`` (a repeated step multiplies it again).
        decay_factor: The factor, in (0, 1].
        warmup_steps: Number of linear warm-up steps, >= 0.
    """

    def __init__(
        self,
        peak_learning_rate: float,
        boundaries: list[int],
        decay_factor: float = 0.1,
        warmup_steps: int = 0,
    ):
        self.peak_learning_rate = check_learning_rate(
            peak_learning_rate, "peak_learning_rate"
        )
        self.boundaries = [check_integer("boundaries", b, 0) for b in boundaries]
        if self.boundaries != sorted(self.boundaries):
            raise ValueError(
                "`boundaries` must be non-decreasing. Received: "
                f"boundaries={list(boundaries)}"
            )
        self.decay_factor = check_number(
            "decay_factor", decay_factor, 0.0, 1.0, low_open=True
        )
        warmup_steps = check_warmup_steps(warmup_steps)
        rates = [
            self.peak_learning_rate * self.decay_factor**passed
            for passed in range(len(self.boundaries) + 1)
        ]
        # The decay counts steps from the end of warm-up, and Keras's moves to
        # the next rate at `step > boundary`: t >= b is t - w > b - w - 1.
        shifted = [b - warmup_steps - 1 for b in self.boundaries]
        if not shifted:  # Keras's needs a boundary: no decay is two equal rates.
            shifted, rates = [0], rates * 2
        super().__init__(
            _schedules.PiecewiseConstantDecay(shifted, rates),
            warmup_steps,
            warmup_target=self.peak_learning_rate,
        )

    def get_config(self) -> dict:
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "boundaries": self.boundaries,
            "decay_factor": self.decay_factor,
            "warmup_steps": self.warmup_steps,
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
