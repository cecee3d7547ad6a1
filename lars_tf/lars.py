"""The LARS optimizer for Keras 3, on the TensorFlow, JAX and PyTorch backends."""

import numbers
import re
from collections.abc import Callable, Sequence

import keras
from keras import ops

# `schedules` is imported for its side effect too: its classes get registered,
# so `from lars_tf import LARS` is enough to load a model saved with LARS and
# one of this package's schedules.
from lars_tf import schedules, validation  # noqa: F401
from lars_tf.rule import local_learning_rate, trust_ratio

Exclusion = Sequence[str] | Callable[[keras.Variable], bool] | None

# trust_ratio: also importable from here (it is defined in lars_tf.rule).
__all__ = ["LARS", "exclude_bias_and_norm", "trust_ratio"]


@keras.saving.register_keras_serializable(package="lars_tf")
def exclude_bias_and_norm(variable: keras.Variable) -> bool:
    """Exclusion predicate for biases and normalization parameters.

    True for every variable with at most one dimension: biases, and the
    `gamma`/`beta` of batch and layer normalization. Passed as both
    `exclude_from_adaptation` and `exclude_from_weight_decay`, it gives the
    setting of the MLPerf and tensorflow/tpu ResNet-50 LARS references.
    """
    return len(variable.shape) <= 1


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
    ratio = 1 if norm(w) == 0 or norm(g) == 0
    # decayed_gradient_norm=True: the norm of the decayed gradient instead
    ratio = trust_coefficient * norm(w) / (norm(g + d * w) + epsilon)
    ratio = 1 if norm(w) == 0 or norm(g + d * w) == 0
    local_lr = min(ratio, lr) if clip else lr * ratio     # clip: LARC
    if w is excluded from adaptation: local_lr = lr
    v = momentum * v + local_lr * (g + d * w)
    w = w - v                                       # nesterov=False
    w = w - (momentum * v + local_lr * (g + d * w))     # nesterov=True
    ```

    Weight decay is coupled, as in the paper: it is part of the gradient and
    enters the trust ratio. The paper's form (Algorithm 1, and MLPerf's
    reference) adds `d * norm(w)` to the gradient's norm; optax's `lars`, TF
    Model Garden's and SimCLR's LARS take the norm of the decayed gradient
    `g + d * w` (`decayed_gradient_norm=True`). The two agree while
    `norm(g)` is much larger than `d * norm(w)`, and part when the gradient
    gets small. Under `keras.distribution` with sharded variables, norms are
    of the whole variable. Keras's decoupled `weight_decay` of the base
    class is never applied as well. Norms are taken of the aggregated
    gradient, so under `tf.distribute` or `keras.distribution` every replica
    computes the same ratio without extra communication. A sparse gradient
    (`tf.IndexedSlices`) is applied as its dense equivalent, since momentum
    and weight decay change every row anyway.

    The momentum slot of each variable stores `-v`, the convention of Keras's
    `SGD`, on every backend. On TensorFlow the update after the two norms is one fused
    `ResourceApplyKerasMomentum` kernel (plus, without Nesterov and with
    momentum >= 0.01, one in-place kernel that folds the weight decay into
    the slot); on JAX and PyTorch it is written with `keras.ops`. Both paths
    take the local rate from `lars_tf.rule.local_learning_rate`.

    A NaN anywhere in a variable's gradient makes its norm, ratio and whole
    update NaN: by default all its weights and its slot become NaN and stay
    so (an inf makes the elements it is in NaN). With `skip_nonfinite=True` a
    step whose gradient has a NaN or inf in any variable changes no weight and
    no slot of any variable, and `iterations` does not advance, so the
    learning-rate schedule does not move either; the next finite step
    proceeds as if the bad one had never been given.

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
        decayed_gradient_norm: If `True`, the ratio's denominator is the
            norm of the decayed gradient, `norm(g + d * w) + epsilon`, and its
            zero-norm guard looks at that norm (optax, TF Model Garden,
            SimCLR); `False` is the paper's form (see above). Defaults to
            `False`.
        exclude_from_adaptation: Variables that get `ratio = 1`: a list of
            regular expressions, any of which `re.search`-matches the Keras
            variable's `path` (e.g. `["bias", "bn\\d*/"]`), or a predicate
            `callable(variable) -> bool` such as `exclude_bias_and_norm`.
            Defaults to `None`: every variable is adapted, as in the paper.
        exclude_from_weight_decay: Variables that get `d = 0`, in the same
            forms. Defaults to `None`: every variable is decayed. Variables
            passed to the base class's `exclude_from_weight_decay()` method
            are excluded as well.
        skip_nonfinite: If `True`, a step whose gradient has a NaN or inf in
            any variable is not applied (see above). Defaults to `False`.
        jit_compile: TensorFlow only: if `True`, each variable's update
            (norms, ratio, momentum and weight update) runs as one
            XLA-compiled function. JAX compiles the whole training step
            anyway. Defaults to `False`.
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
        decayed_gradient_norm: bool = False,
        exclude_from_adaptation: Exclusion = None,
        exclude_from_weight_decay: Exclusion = None,
        skip_nonfinite: bool = False,
        jit_compile: bool = False,
        name: str = "lars",
        **kwargs,
    ):
        if isinstance(learning_rate, numbers.Real):
            learning_rate = validation.check_learning_rate(learning_rate)
        momentum = validation.check_momentum(momentum)
        weight_decay = validation.check_weight_decay(weight_decay)
        trust_coefficient = validation.check_trust_coefficient(trust_coefficient)
        epsilon = validation.check_epsilon(epsilon)
        nesterov = validation.check_nesterov(nesterov, momentum)
        # LARS's weight decay is coupled (inside the trust ratio); the base
        # class's `weight_decay` is decoupled, so it stays None here.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = momentum
        self.coupled_weight_decay = weight_decay
        self.trust_coefficient = trust_coefficient
        self.epsilon = epsilon
        self.nesterov = nesterov
        self.clip = bool(clip)
        self.decayed_gradient_norm = bool(decayed_gradient_norm)
        self.exclude_from_adaptation = _check_exclusion(
            "exclude_from_adaptation", exclude_from_adaptation
        )
        # `exclude_from_weight_decay` is also the name of a base-class method,
        # which stays usable; the argument lives under another name.
        self.weight_decay_exclusion = _check_exclusion(
            "exclude_from_weight_decay", exclude_from_weight_decay
        )
        self.skip_nonfinite = bool(skip_nonfinite)
        self.jit_compile = bool(jit_compile)
        self._tensorflow = keras.backend.backend() == "tensorflow"
        self._apply_this_step = None  # With skip_nonfinite: the step's flag.
        if self._tensorflow and self.jit_compile:
            import tensorflow as tf

            # One compiled computation per variable, traced once for each
            # shape and set of flags.
            self._fused_update = tf.function(
                self._fused_update, jit_compile=True, reduce_retracing=False
            )

    def build(self, variables):
        """Creates the momentum slots and decides each variable's flags.

        Flags are decided here, where the Keras variables (with `path`) are
        at hand; on TensorFlow `update_step` only sees the raw variables.
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

    def local_learning_rate(
        self, weight_norm, gradient_norm, learning_rate, *, weight_decay, adapted
    ):
        """The step size this optimizer applies to a variable's decayed gradient.

        `lars_tf.rule.local_learning_rate` with this optimizer's trust
        coefficient, epsilon, `clip` and `decayed_gradient_norm`, for a
        variable with these norms, its weight decay and whether it is adapted
        (see `variable_settings`). `gradient_norm` is `norm(g)`, or
        `norm(g + d * w)` with `decayed_gradient_norm=True`.
        """
        return local_learning_rate(
            weight_norm,
            gradient_norm,
            learning_rate,
            weight_decay=weight_decay,
            trust_coefficient=self.trust_coefficient,
            epsilon=self.epsilon,
            clip=self.clip,
            adapted=adapted,
            decayed_gradient_norm=self.decayed_gradient_norm,
        )

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not self.skip_nonfinite:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            return
        # One reading pass per gradient and no temporary: a sum is finite
        # exactly when no element is NaN or inf (or the float32 sum overflows,
        # past 3e38: a step as unusable).
        sums = [ops.sum(ops.cast(g, "float32")) for g in grads if g is not None]
        finite = ops.all(ops.isfinite(ops.stack(sums)))
        if self._tensorflow:
            finite = _agree_across_replicas(finite)
        self._apply_this_step = finite
        super()._backend_update_step(grads, trainable_variables, learning_rate)
        self._apply_this_step = None
        if not self.gradient_accumulation_steps:
            # `apply` adds 1 after this: a skipped step is not counted.
            self.iterations.assign_sub(
                ops.cast(ops.logical_not(finite), self.iterations.dtype)
            )

    def update_step(self, gradient, variable, learning_rate):
        """Applies one LARS step to `variable`."""
        index = self._get_variable_index(variable)
        velocity = self.momentums[index] if self.momentums else None
        flags = dict(
            weight_decay=self._decay_rates[index], adapted=self._adapted[index]
        )
        if self._tensorflow:
            import tensorflow as tf

            if isinstance(gradient, tf.IndexedSlices):
                gradient = tf.convert_to_tensor(gradient)
            arguments = (
                variable,
                velocity.value if velocity is not None else None,
                tf.cast(gradient, variable.dtype),
                tf.cast(learning_rate, variable.dtype),
            )
            if self._apply_this_step is None:
                self._fused_update(*arguments, **flags)
            else:
                tf.cond(
                    self._apply_this_step,
                    lambda: self._fused_update(*arguments, **flags),
                    lambda: None,
                )
            return
        self._keras_ops_update(
            variable,
            velocity,
            ops.cast(gradient, variable.dtype),
            ops.cast(learning_rate, variable.dtype),
            **flags,
        )

    def _fused_update(
        self, variable, velocity, gradient, learning_rate, *, weight_decay, adapted
    ):
        """The TensorFlow path: `lars_tf._tensorflow_update.apply_update`."""
        from lars_tf import _tensorflow_update

        _tensorflow_update.apply_update(
            variable,
            velocity,
            gradient,
            learning_rate,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=weight_decay,
            adapted=adapted,
            trust_coefficient=self.trust_coefficient,
            epsilon=self.epsilon,
            clip=self.clip,
            decayed_gradient_norm=self.decayed_gradient_norm,
        )

    def _keras_ops_update(
        self, variable, velocity, gradient, learning_rate, *, weight_decay, adapted
    ):
        """The JAX and PyTorch path, the same formula as the TensorFlow kernels."""
        weights = variable.value
        rate = learning_rate
        decayed = weight_decay and self.decayed_gradient_norm
        if decayed:  # The ratio takes the norm of the decayed gradient.
            gradient = gradient + weight_decay * weights
        if adapted:  # Norms only where used: PyTorch runs eagerly.
            # Sums of squares: JAX's XLA:CPU reduces them in one pass, and the
            # Gram traces of the TensorFlow XLA path are slower there and less
            # accurate on PyTorch (BENCHMARKS.md, "JAX backend").
            rate = self.local_learning_rate(
                ops.sqrt(ops.sum(ops.square(weights))),
                ops.sqrt(ops.sum(ops.square(gradient))),
                learning_rate,
                weight_decay=weight_decay,
                adapted=True,
            )
        if weight_decay and not decayed:
            gradient = gradient + weight_decay * weights
        step = rate * gradient
        if velocity is None:
            self._assign(variable, weights - step)
            return
        slot = self.momentum * velocity.value - step
        if self.nesterov:
            self._assign(variable, weights + self.momentum * slot - step)
        else:
            self._assign(variable, weights + slot)
        self._assign(velocity, slot)

    def _assign(self, variable, value):
        """`variable = value`, or unchanged in a skipped non-finite step."""
        if self._apply_this_step is not None:
            value = ops.where(self._apply_this_step, value, variable.value)
        self.assign(variable, value)

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
                "decayed_gradient_norm": self.decayed_gradient_norm,
                "exclude_from_adaptation": _serialize_exclusion(
                    self.exclude_from_adaptation
                ),
                "exclude_from_weight_decay": _serialize_exclusion(
                    self.weight_decay_exclusion
                ),
                "skip_nonfinite": self.skip_nonfinite,
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


def _agree_across_replicas(finite):
    """`finite` of every replica AND-ed, under a `tf.distribute` strategy.

    Each replica checks the gradients it computed, before they are summed;
    all of them must skip together or none.
    """
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return finite
    nonfinite_replicas = context.all_reduce(
        tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.float32)
    )
    return nonfinite_replicas == 0


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
