"""The LARS rule, written once: the trust ratio and each variable's local rate.

The rule itself is stated in `lars_tf.LARS`'s docstring. `lars_tf.LARS` (its
TensorFlow kernels and its `keras.ops` path) and `lars_tf.TrustRatioMonitor`
all compute the local learning rate with `local_learning_rate`, so what the
monitor shows is what the optimizer applies. Written with `keras.ops`, it runs
on every Keras backend, inside a traced or XLA-compiled step as well as
eagerly.
"""

from keras import ops


def trust_ratio(
    weight_norm,
    gradient_norm,
    weight_decay,
    trust_coefficient: float,
    epsilon: float,
    decayed_gradient_norm: bool = False,
):
    """The LARS trust ratio of one variable (or of many, elementwise), from norms.

    `gradient_norm` is `||g||`, or with `decayed_gradient_norm` the norm of
    the weight-decayed gradient `||g + weight_decay * w||`; the denominator
    and the zero-norm guard are `lars_tf.LARS`'s (see its docstring). The
    result is finite for finite norms; a NaN norm gives a NaN ratio.
    """
    denominator = gradient_norm + epsilon
    if not decayed_gradient_norm:
        denominator = denominator + weight_decay * weight_norm
    ratio = ops.divide_no_nan(trust_coefficient * weight_norm, denominator)
    # Written as "either is zero", not "both are positive", so that a NaN norm
    # gives a NaN ratio rather than the ratio 1 of the global rate.
    either_zero = ops.logical_or(weight_norm == 0, gradient_norm == 0)
    return ops.where(either_zero, ops.ones_like(ratio), ratio)


def local_learning_rate(
    weight_norm,
    gradient_norm,
    learning_rate,
    *,
    weight_decay,
    trust_coefficient: float,
    epsilon: float,
    clip: bool,
    adapted: bool,
    decayed_gradient_norm: bool = False,
):
    """The step size LARS applies to a variable's weight-decayed gradient.

    `learning_rate * trust_ratio` (LARS), `min(trust_ratio, learning_rate)`
    with `clip` (LARC), and `learning_rate` itself for a variable excluded
    from adaptation (`adapted=False`). `weight_decay` is the variable's own
    (0 if it is excluded from weight decay); `gradient_norm` and
    `decayed_gradient_norm` are as in `trust_ratio`.
    """
    if not adapted:
        return learning_rate
    ratio = trust_ratio(
        weight_norm,
        gradient_norm,
        weight_decay,
        trust_coefficient,
        epsilon,
        decayed_gradient_norm,
    )
    if clip:
        return ops.minimum(ratio, learning_rate)
    return learning_rate * ratio
