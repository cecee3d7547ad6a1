"""Designs of LARS's per-variable update, timed by `benchmarks.optimizer_step
--variants`.

Each design is a `lars_tf.LARS` subclass that replaces only `_fused_update`
(the two norms, the trust ratio and the momentum update of one variable), so
every other behaviour (flags per variable, slots, schedules, distribution) is
LARS's own. All of them compute the same update to float32 rounding;
`check_designs` compares each, and LARS, against a float64 NumPy reference in
every mode.

What the designs vary: how a norm is taken (TensorFlow's one-pass `L2Loss`
kernel; the trace of `X @ X^T` for `X = reshape(x, [4, -1])`, which XLA on CPU
reads in place where it writes a sum of squares' squares to a temporary; a
`[1, n] x [n, 1]` product) and how the update is written under XLA (the fused
kernels, plain expressions, or all variables' updates in one computation).
`lars_tf.LARS` takes `mode_aware_norm`'s norms and `kernel_update`.
"""

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util

import lars_tf
from lars_tf.rule import trust_ratio

# Rows of the matrix whose Gram trace is the squared norm under XLA: with 4,
# Eigen's GEMM reads each value once per operand; 2 takes XLA's own dot
# emitter (slower and less accurate); 8 or more cost more multiply-adds for
# no less traffic.
GRAM_ROWS = 4


def in_xla_context() -> bool:
    """True while tracing code that XLA will compile.

    That is, inside a `tf.function(jit_compile=True)` (what
    `model.compile(jit_compile=True)` and `LARS(jit_compile=True)` use) or any
    function traced within one.
    """
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def l2_norm(x: tf.Tensor) -> tf.Tensor:
    """`||x||` as `L2Loss`: one pass over `x` in TensorFlow's kernel."""
    return tf.sqrt(2 * tf.nn.l2_loss(x))


def gram_norm(x: tf.Tensor) -> tf.Tensor:
    """`||x||` as `sqrt(trace(X @ X^T))`, X = `x` as `GRAM_ROWS` rows.

    Falls back to `l2_norm` when the size of `x` is not a multiple of
    `GRAM_ROWS`.
    """
    size = int(np.prod(x.shape))
    if size % GRAM_ROWS or size == 0:
        return l2_norm(x)
    rows = tf.reshape(x, [GRAM_ROWS, -1])
    return tf.sqrt(tf.linalg.trace(tf.matmul(rows, rows, transpose_b=True)))


def dot_norm(x: tf.Tensor) -> tf.Tensor:
    """`||x||` as the product of `x` as one [1, n] row with itself."""
    row = tf.reshape(x, [1, -1])
    return tf.sqrt(tf.matmul(row, row, transpose_b=True)[0, 0])


def mode_aware_norm(x: tf.Tensor) -> tf.Tensor:
    """`gram_norm` while XLA compiles, `l2_norm` otherwise."""
    return gram_norm(x) if in_xla_context() else l2_norm(x)


def kernel_update(optimizer, variable, velocity, gradient, learning_rate, decay):
    """LARS's update after the norms: decay folded into the slot, then the
    fused momentum kernel (as `lars_tf.LARS`, without Nesterov)."""
    if decay:
        tf.raw_ops.ResourceApplyGradientDescent(
            var=velocity.handle,
            alpha=learning_rate * (decay / optimizer.momentum),
            delta=variable,
            use_locking=False,
        )
    tf.raw_ops.ResourceApplyKerasMomentum(
        var=variable.handle,
        accum=velocity.handle,
        lr=learning_rate,
        grad=gradient,
        momentum=tf.cast(optimizer.momentum, variable.dtype),
        use_locking=False,
        use_nesterov=False,
    )


def expression_update(optimizer, variable, velocity, gradient, learning_rate, decay):
    """The update as plain expressions, `s = m s - lr (g + d w); w += s`, for
    XLA to fuse as it likes (the slot `s` holds -v, as in Keras's SGD)."""
    weights = variable.read_value()
    slot = optimizer.momentum * velocity.read_value() - learning_rate * (
        gradient + decay * weights if decay else gradient
    )
    velocity.assign(slot)
    variable.assign(weights + slot)


def design(norm, update=kernel_update) -> type:
    """A LARS class whose per-variable update takes its norms with `norm`
    and then runs `update` (no Nesterov, momentum > 0: the benchmark's setting)."""

    class DesignLARS(lars_tf.LARS):
        def _fused_update(
            self, variable, velocity, gradient, learning_rate, *, weight_decay, adapted
        ):
            if self.nesterov or velocity is None:
                raise NotImplementedError("designs cover momentum without Nesterov")
            if adapted:
                ratio = trust_ratio(
                    norm(variable),
                    norm(gradient),
                    weight_decay,
                    self.trust_coefficient,
                    self.epsilon,
                )
                if self.clip:
                    learning_rate = tf.minimum(ratio, learning_rate)
                else:
                    learning_rate = learning_rate * ratio
            update(self, variable, velocity, gradient, learning_rate, weight_decay)

    return DesignLARS


def mode_aware_update(optimizer, variable, velocity, gradient, learning_rate, decay):
    """`expression_update` while XLA compiles, `kernel_update` otherwise."""
    update = expression_update if in_xla_context() else kernel_update
    update(optimizer, variable, velocity, gradient, learning_rate, decay)


class OneXLAUpdateLARS(lars_tf.LARS):
    """Norms per variable as LARS takes them, then every variable's momentum
    update in one XLA computation: `s = m s - lr (g + d w); w += s`.

    Not distributed-aware (it replaces the base class's per-variable loop),
    so the benchmark times it on one device only.
    """

    single_device = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._all_updates = tf.function(self._update_all, jit_compile=True)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        variables = [
            v.value if isinstance(v, keras.Variable) else v for v in trainable_variables
        ]
        rates = []
        for gradient, variable in zip(grads, variables, strict=True):
            index = self._get_variable_index(variable)
            rate = tf.cast(learning_rate, variable.dtype)
            if self._adapted[index]:
                rate = rate * trust_ratio(
                    mode_aware_norm(variable),
                    mode_aware_norm(gradient),
                    self._decay_rates[index],
                    self.trust_coefficient,
                    self.epsilon,
                )
            rates.append(rate)
        self._all_updates(list(grads), variables, rates)

    def _update_all(self, grads, variables, rates):
        for gradient, variable, rate in zip(grads, variables, rates, strict=True):
            index = self._get_variable_index(variable)
            expression_update(
                self,
                variable,
                self.momentums[index].value,
                gradient,
                rate,
                self._decay_rates[index],
            )


DESIGNS = {
    "L2Loss norms in every mode": design(l2_norm),
    "Gram norms in every mode": design(gram_norm),
    "dot norms ([1,n] x [n,1]) in every mode": design(dot_norm),
    "expression update under XLA": design(mode_aware_norm, mode_aware_update),
    "one XLA computation for all updates": OneXLAUpdateLARS,
}


def check_designs(jit_modes=("graph", "xla", "own_jit"), steps: int = 3) -> dict:
    """Largest error of each design (and LARS) against float64 NumPy, relative
    to the largest displacement of each adapted (matrix) variable.

    A small conv + dense + BN problem (one variable of 402 values, not a
    multiple of `GRAM_ROWS`, exercises the fallback), `steps` steps, in each
    mode. Returns {(name, mode): error}.
    """
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 8, 16), (16,), (64, 10), (10,), (201, 2)]
    weights = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [
        [rng.standard_normal(s).astype(np.float32) * 0.1 for s in shapes]
        for _ in range(steps)
    ]
    settings = dict(learning_rate=50.0, momentum=0.9, weight_decay=1e-3)
    want = _reference(weights, grads, **settings)
    errors = {}
    classes = {"LARS": lars_tf.LARS, **DESIGNS}
    for name, cls in classes.items():
        for mode in jit_modes:
            optimizer = cls(
                **settings,
                exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
                exclude_from_weight_decay=lars_tf.exclude_bias_and_norm,
                jit_compile=mode == "own_jit",
            )
            variables = [keras.Variable(w) for w in weights]
            optimizer.build(variables)
            step = _apply_step(optimizer, variables, jit_compile=mode == "xla")
            for g in grads:
                step([tf.constant(x) for x in g])
            # Of the displacement from the initial weights, so that a wrong
            # norm shows; adapted variables only (biases take no norm).
            errors[(name, mode)] = max(
                float(np.max(np.abs(v.numpy() - w)) / np.max(np.abs(w - w0)))
                for v, w, w0 in zip(variables, want, weights)
                if w.ndim > 1
            )
    return errors


def _apply_step(optimizer, variables, jit_compile):
    """`apply_gradients` on `variables` as a `tf.function`."""

    @tf.function(jit_compile=jit_compile)
    def step(gradients):
        optimizer.apply_gradients(zip(gradients, variables))

    return step


def _reference(weights, grads, learning_rate, momentum, weight_decay):
    """LARS in float64 from the formula (matrices adapted and decayed)."""
    weights = [w.astype(np.float64) for w in weights]
    velocities = [np.zeros_like(w) for w in weights]
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            w, g = weights[i], g.astype(np.float64)
            decay, rate = 0.0, learning_rate
            if w.ndim > 1:
                decay = weight_decay
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                rate *= 0.001 * w_norm / (g_norm + decay * w_norm)
            velocities[i] = momentum * velocities[i] + rate * (g + decay * w)
            weights[i] = w - velocities[i]
    return weights
