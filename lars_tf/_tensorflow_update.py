"""LARS's update of one variable on the TensorFlow backend, with fused kernels.

Memory traffic bounds this step on CPU, so each tensor is read as few times as
possible: `l2_loss` takes a norm in one pass (where `tf.norm` squares into a
temporary and then sums it), and the momentum and weight update is one
`ResourceApplyKerasMomentum` kernel. While XLA compiles the step (inside
`tf.function(jit_compile=True)`, as `model.compile(jit_compile=True)` or
`LARS(jit_compile=True)` make it) on a host with no GPU or TPU, a norm is
the trace of a small matrix product instead: XLA on CPU writes the squares of
a sum of squares to a temporary and reduces that in several passes, but reads
a matrix product's operands in place (BENCHMARKS.md, "Optimizer step"). The
local rate comes from `lars_tf.rule.local_learning_rate`, the same rule every
other path uses.

The slot holds `-v` (Keras's `SGD` convention), so on every backend
`slot = momentum * slot - local_lr * (g + d * w)` and `w = w + slot`.
"""

import tensorflow as tf
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util

from lars_tf.rule import local_learning_rate

# Folding the weight decay into the slot (below) divides by the momentum. Under
# this bound the quotient could overflow, or the momentum be a float32
# subnormal, so the plain `g + d * w` is used instead: the same formula.
FOLD_MIN_MOMENTUM = 1e-2

# Under XLA, `||x||^2 = trace(X @ X^T)` for `X = reshape(x, [GRAM_ROWS, -1])`.
# With 4 rows XLA hands the product to Eigen's matrix multiply, which reads x
# once per operand; 2 rows take a slower path that also loses accuracy.
# Only where no GPU or TPU is visible: there a float32 matrix product may run in
# reduced precision (TensorFloat-32 on NVIDIA GPUs, bfloat16 passes on TPUs),
# about 1e-3 off, and XLA fuses the plain sum of squares well anyway.
GRAM_ROWS = 4


def apply_update(
    variable: tf.Variable,
    velocity: tf.Variable | None,
    gradient: tf.Tensor,
    learning_rate: tf.Tensor,
    *,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    adapted: bool,
    trust_coefficient: float,
    epsilon: float,
    clip: bool,
    decayed_gradient_norm: bool = False,
) -> None:
    """Applies one LARS step to `variable` (and its slot `velocity`) in place.

    `gradient` and `learning_rate` are dense tensors of the variable's dtype;
    `velocity` is None without momentum. `weight_decay` and `adapted` are this
    variable's, as `LARS.build` decided them; `decayed_gradient_norm` is as in
    `lars_tf.LARS`.
    """
    # The weight decay the kernels below still have to add to the gradient.
    kernel_weight_decay = weight_decay
    if adapted:
        if weight_decay and decayed_gradient_norm:
            # The ratio needs `||g + d * w||`, so the decayed gradient is
            # formed here and the kernels below take it as it is.
            gradient = gradient + weight_decay * variable
            kernel_weight_decay = 0.0
        learning_rate = local_learning_rate(
            _norm(variable),
            _norm(gradient),
            learning_rate,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            epsilon=epsilon,
            clip=clip,
            adapted=True,
            decayed_gradient_norm=decayed_gradient_norm,
        )
    fold = velocity is not None and not nesterov and momentum >= FOLD_MIN_MOMENTUM
    if kernel_weight_decay and fold:
        # Subtracting `lr * d / momentum * w` from the slot in place makes the
        # kernel's `momentum * slot - lr * g` below equal
        # `momentum * slot - lr * (g + d * w)`: one pass and no temporary,
        # where `g + d * w` takes two passes and a gradient-sized temporary.
        tf.raw_ops.ResourceApplyGradientDescent(
            var=velocity.handle,
            alpha=learning_rate * (kernel_weight_decay / momentum),
            delta=variable,
            use_locking=False,
        )
    elif kernel_weight_decay:
        gradient = gradient + kernel_weight_decay * variable
    if velocity is None:
        variable.assign_sub(learning_rate * gradient)
        return
    tf.raw_ops.ResourceApplyKerasMomentum(
        var=variable.handle,
        accum=velocity.handle,
        lr=learning_rate,
        grad=gradient,
        momentum=tf.cast(momentum, variable.dtype),
        use_locking=False,
        use_nesterov=nesterov,
    )


def _norm(x) -> tf.Tensor:
    """`||x||` in the form the compiler at hand makes fastest (module docstring)."""
    size = x.shape.num_elements()
    under_xla = control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())
    if (
        under_xla
        and not _accelerator_visible()
        and x.dtype in (tf.float32, tf.float64)
        and size
        and size % GRAM_ROWS == 0
    ):
        rows = tf.reshape(x, [GRAM_ROWS, -1])
        return tf.sqrt(tf.linalg.trace(tf.matmul(rows, rows, transpose_b=True)))
    return tf.sqrt(2 * tf.nn.l2_loss(x))


def _accelerator_visible() -> bool:
    """Whether TensorFlow sees a GPU or TPU (decided while tracing)."""
    return bool(
        tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")
    )
