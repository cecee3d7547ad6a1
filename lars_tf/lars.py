"""The LARS optimizer for Keras 3 on TensorFlow."""

import math
import re
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

Exclusion = Sequence[str] | Callable[[keras.Variable], bool] | None


@keras.saving.register_keras_serializable(package="lars_tf")
def exclude_bias_and_norm(variable: keras.Variable) -> bool:
    """Exclusion predicate for biases and normalization parameters.

    True for every variable with at most one dimension: biases, and the
    `gamma`/`beta` of batch and layer normalization. Passed as both
    `exclude_from_adaptation` and `exclude_from_weight_decay`, it gives the
    setting of the MLPerf and tensorflow/tpu ResNet-50 LARS references.
    """
    return len(variable.shape) <= 1


def trust_ratio(
    weight_norm: tf.Tensor,
    gradient_norm: tf.Tensor,
    weight_decay: float,
    trust_coefficient: float,
    epsilon: float,
) -> tf.Tensor:
    """The LARS trust ratio of one variable, from its norms.

    `trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + epsilon)`,
    and 1 where `||w||` or `||g||` is zero, so the result is always finite.
    """
    ratio = tf.math.divide_no_nan(
        trust_coefficient * weight_norm,
        gradient_norm + weight_decay * weight_norm + epsilon,
    )
    both_nonzero = tf.logical_and(weight_norm > 0, gradient_norm > 0)
    return tf.where(both_nonzero, ratio, tf.ones_like(ratio))


@keras.saving.register_keras_serializable(package="lars_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling (LARS), and LARC with `clip=True`.

    Each variable `w` gets its own "local" learning rate from the ratio of
    its norm to its gradient's norm, so that every layer moves by a similar
    fraction of its size whatever the batch size. For a variable with
    gradient `g`, at learning rate `lr`:

    ```python
    d = weight_decay              # 0 if w is excluded from weight decay
    ratio = trust_coefficient * norm(w) / (norm(g) + d * norm(w) + epsilon)
    ratio = 1 if norm(w) == 0 or norm(g) == 0 or w is excluded from adaptation
    local_lr = min(ratio, lr) if clip else lr * ratio     # clip: LARC
    if w is excluded from adaptation: local_lr = lr
    v = momentum * v + local_lr * (g + d * w)
    w = w - v                                       # nesterov=False
    w = w - (momentum * v + local_lr * (g + d * w))     # nesterov=True
    ```

    Weight decay is coupled, as in the paper: it is part of the gradient and
    enters the trust ratio. Keras's decoupled `weight_decay` of the base
    class is never applied as well. Norms are taken of the aggregated
    gradient, so under `tf.distribute` every replica computes the same ratio
    without extra communication. A sparse gradient (`tf.IndexedSlices`) is
    applied as its dense equivalent, since momentum and weight decay change
    every row anyway.

    The momentum slot of each variable stores `-v`, the convention of Keras's
    `SGD`, so that after the two norms the update is one fused
    `ResourceApplyKerasMomentum` kernel (plus one in-place kernel that folds
    the coupled weight decay into the slot, without Nesterov).

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or a
            callable that takes no arguments and returns the actual value to
            use. The global learning rate. Defaults to `0.1`.
        momentum: Float in `[0, 1)`. Defaults to `0.9`.
        weight_decay: Float >= 0, the coupled L2 weight decay `d` above.
            Defaults to `0.0`.
        trust_coefficient: Float > 0, the paper's `eta`. Defaults to `0.001`.
        epsilon: Float >= 0 added to the ratio's denominator. Defaults to
            `0.0`.
        nesterov: Whether to use Nesterov momentum (needs `momentum > 0`).
            Defaults to `False`.
        clip: If `True`, LARC: the local learning rate is `min(ratio, lr)`,
            never above the global one. Defaults to `False`.
        exclude_from_adaptation: Variables that get `ratio = 1`: a list of
            regular expressions, any of which `re.search`-matches the Keras
            variable's `path` (e.g. `["bias", "bn\\d*/"]`), or a predicate
            `callable(variable) -> bool` such as `exclude_bias_and_norm`.
            Defaults to `None`: every variable is adapted, as in the paper.
        exclude_from_weight_decay: Variables that get `d = 0`, in the same
            forms. Defaults to `None`: every variable is decayed. Variables
            passed to the base class's `exclude_from_weight_decay()` method
            are excluded as well.
        jit_compile: If `True`, each variable's update (norms, ratio,
            momentum and weight update) runs as one XLA-compiled function.
            Defaults to `False`.
        name: String, the name of the optimizer. Defaults to `"lars"`.
        **kwargs: Keras's base optimizer arguments: `clipnorm`, `clipvalue`,
            `global_clipnorm`, `use_ema`, `ema_momentum`,
            `ema_overwrite_frequency`, `loss_scale_factor`,
            `gradient_accumulation_steps`.

    Example:

    ```python
    model.compile(
        optimizer=lars_tf.LARS(
            learning_rate=lars_tf.WarmupPolynomialDecay(
                peak_learning_rate=9.0, warmup_steps=500, decay_steps=5000
            ),
            momentum=0.9,
            weight_decay=5e-4,
            exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
            exclude_from_weight_decay=lars_tf.exclude_bias_and_norm,
        ),
        loss="sparse_categorical_crossentropy",
    )
    ```

    Reference:
        - [You, Gitman & Ginsburg, 2017](https://arxiv.org/abs/1708.03888),
          Algorithm 1.
    """

    def __init__(
        self,
        learning_rate: float | Callable = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        epsilon: float = 0.0,
        nesterov: bool = False,
        clip: bool = False,
        exclude_from_adaptation: Exclusion = None,
        exclude_from_weight_decay: Exclusion = None,
        jit_compile: bool = False,
        name: str = "lars",
        **kwargs,
    ):
        if isinstance(learning_rate, int | float) and not (
            math.isfinite(learning_rate) and learning_rate >= 0
        ):
            raise ValueError(
                "`learning_rate` must be a finite float >= 0. "
                f"Received: learning_rate={learning_rate}"
            )
        _check_range("momentum", momentum, low=0.0, high=1.0, high_open=True)
        _check_range("weight_decay", weight_decay, low=0.0)
        _check_range("epsilon", epsilon, low=0.0)
        _check_range("trust_coefficient", trust_coefficient, low=0.0, low_open=True)
        if nesterov and momentum == 0:
            raise ValueError(
                "`nesterov` needs `momentum` in (0, 1). "
                "Received: nesterov=True, momentum=0"
            )
        # LARS's weight decay is coupled (inside the trust ratio); the base
        # class's `weight_decay` is decoupled, so it stays None here.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.coupled_weight_decay = float(weight_decay)
        self.trust_coefficient = float(trust_coefficient)
        self.epsilon = float(epsilon)
        self.nesterov = bool(nesterov)
        self.clip = bool(clip)
        self.exclude_from_adaptation = _check_exclusion(
            "exclude_from_adaptation", exclude_from_adaptation
        )
        # `exclude_from_weight_decay` is also the name of a base-class method,
        # which stays usable; the argument lives under another name.
        self.weight_decay_exclusion = _check_exclusion(
            "exclude_from_weight_decay", exclude_from_weight_decay
        )
        self.jit_compile = bool(jit_compile)
        # With XLA: one compiled computation per variable, traced once for
        # each shape and set of flags.
        self._update = (
            tf.function(self._fused_update, jit_compile=True, reduce_retracing=False)
            if self.jit_compile
            else self._fused_update
        )

    def build(self, variables):
        """Creates the momentum slots and decides each variable's flags.

        Flags are decided here, where the Keras variables (with `path`) are
        at hand; `update_step` only sees the raw TensorFlow variables.
        """
        if self.built:
            return
        super().build(variables)
        self.momentums = []
        if self.momentum > 0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")
        self._adapted = [
            not _excluded(self.exclude_from_adaptation, v) for v in variables
        ]
        self._decay_rates = [
            0.0
            if _excluded(self.weight_decay_exclusion, v)
            or not self._use_weight_decay(v)
            else self.coupled_weight_decay
            for v in variables
        ]

    def variable_settings(self, variable) -> tuple[bool, float]:
        """Whether `variable` is adapted, and its weight decay, as `build` set.

        For tools that show what LARS does per layer, such as
        `lars_tf.TrustRatioMonitor`. The optimizer must be built.
        """
        index = self._get_variable_index(variable)
        return self._adapted[index], self._decay_rates[index]

    def update_step(self, gradient, variable, learning_rate):
        """Applies one LARS step to `variable`."""
        index = self._get_variable_index(variable)
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        velocity = self.momentums[index].value if self.momentums else None
        self._update(
            variable,
            velocity,
            tf.cast(gradient, variable.dtype),
            tf.cast(learning_rate, variable.dtype),
            weight_decay=self._decay_rates[index],
            adapted=self._adapted[index],
        )

    def _fused_update(
        self, variable, velocity, gradient, learning_rate, *, weight_decay, adapted
    ):
        # Memory traffic bounds this step on CPU, so each tensor is read as
        # few times as possible (BENCHMARKS.md, "Optimizer step"): `l2_loss`
        # is one pass, where `tf.norm` squares into a temporary and sums it.
        if adapted:
            ratio = trust_ratio(
                tf.sqrt(2 * tf.nn.l2_loss(variable)),
                tf.sqrt(2 * tf.nn.l2_loss(gradient)),
                weight_decay,
                self.trust_coefficient,
                self.epsilon,
            )
            if self.clip:
                learning_rate = tf.minimum(ratio, learning_rate)
            else:
                learning_rate = learning_rate * ratio
        if weight_decay and velocity is not None and not self.nesterov:
            # The slot holds -v. Subtracting `lr * d / momentum * w` from it in
            # place makes the kernel's `momentum * slot - lr * g` below equal
            # `momentum * slot - lr * (g + d * w)`: one pass and no temporary,
            # where `g + d * w` takes two passes and a gradient-sized temporary.
            tf.raw_ops.ResourceApplyGradientDescent(
                var=velocity.handle,
                alpha=learning_rate * (weight_decay / self.momentum),
                delta=variable,
                use_locking=False,
            )
        elif weight_decay:
            gradient = gradient + weight_decay * variable
        if velocity is None:
            variable.assign_sub(learning_rate * gradient)
            return
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle,
            accum=velocity.handle,
            lr=learning_rate,
            grad=gradient,
            momentum=tf.cast(self.momentum, variable.dtype),
            use_locking=False,
            use_nesterov=self.nesterov,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay": self.coupled_weight_decay,
                "trust_coefficient": self.trust_coefficient,
                "epsilon": self.epsilon,
                "nesterov": self.nesterov,
                "clip": self.clip,
                "exclude_from_adaptation": _serialize_exclusion(
                    self.exclude_from_adaptation
                ),
                "exclude_from_weight_decay": _serialize_exclusion(
                    self.weight_decay_exclusion
                ),
                "jit_compile": self.jit_compile,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("exclude_from_adaptation", "exclude_from_weight_decay"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return super().from_config(config, custom_objects=custom_objects)


def _check_range(name, value, low, high=math.inf, low_open=False, high_open=False):
    in_range = (
        isinstance(value, int | float)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not in_range:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(
            f"`{name}` must be a finite float in {interval}. Received: {name}={value!r}"
        )


def _check_exclusion(name, exclusion):
    if exclusion is None or callable(exclusion):
        return exclusion
    if isinstance(exclusion, str) or not isinstance(exclusion, Sequence):
        raise ValueError(
            f"`{name}` must be None, a list of regular expressions or a "
            f"callable(variable) -> bool. Received: {name}={exclusion!r}"
        )
    for pattern in exclusion:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(
                f"`{name}` holds an invalid regular expression {pattern!r}: {error}"
            ) from None
    return list(exclusion)


def _excluded(exclusion, variable):
    if exclusion is None:
        return False
    if callable(exclusion):
        return bool(exclusion(variable))
    return any(re.search(pattern, variable.path) for pattern in exclusion)


def _serialize_exclusion(exclusion):
    if callable(exclusion):
        return keras.saving.serialize_keras_object(exclusion)
    return exclusion
