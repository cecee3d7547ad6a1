"""The optimizer, its learning-rate schedule and the weight-decay term, from flags.

The learning rate is the base rate scaled to the global batch (`--lr_scaling`),
reached by a linear warm-up from 0 and then decayed (`--lr_schedule`): poly of
`--poly_power` and cosine come from `lars_tf`, the step schedule is below.

Weight decay is applied once, where each optimizer expects it: coupled inside
LARS (it enters the trust ratio), as the L2 loss term `wd/2 * sum ||w||^2` for
SGD (the tensorflow/tpu ResNet reference), and decoupled for Lamb and AdamW
(their own `weight_decay` argument). With `--exclude_bias_and_norm`, biases and
normalization parameters are neither decayed nor (for LARS) adapted.
"""

import keras
from absl import flags
from keras import ops

import lars_tf


class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to a peak rate, then a factor `decay_factor` at each boundary.

    Uses `lars_tf`'s warm-up convention: step `t < warmup_steps` has rate
    `peak * t / warmup_steps`; from `warmup_steps` on the rate is
    `peak * decay_factor ** (number of boundaries <= t)`.
    """

    def __init__(
        self,
        peak_learning_rate: float,
        boundaries: list[int],
        decay_factor: float = 0.1,
        warmup_steps: int = 0,
    ):
        super().__init__()
        self.peak_learning_rate = float(peak_learning_rate)
        self.boundaries = [int(b) for b in boundaries]
        self.decay_factor = float(decay_factor)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup_rate = self.peak_learning_rate * step / max(self.warmup_steps, 1)
        passed = sum(ops.cast(step >= b, "float32") for b in self.boundaries)
        decayed_rate = self.peak_learning_rate * ops.power(self.decay_factor, passed)
        return ops.where(step < self.warmup_steps, warmup_rate, decayed_rate)

    def get_config(self) -> dict:
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "boundaries": self.boundaries,
            "decay_factor": self.decay_factor,
            "warmup_steps": self.warmup_steps,
        }


def peak_learning_rate(f: flags.FlagValues) -> float:
    """`--base_learning_rate` scaled from `--base_batch_size` to the global batch."""
    if f.lr_scaling == "none":
        return f.base_learning_rate
    return lars_tf.scaled_learning_rate(
        f.base_learning_rate, f.global_batch_size, f.base_batch_size, f.lr_scaling
    )


def learning_rate_schedule(
    f: flags.FlagValues, steps_per_epoch: int, train_steps: int
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Warm-up then the decay of `--lr_schedule`, over `train_steps` steps."""
    peak = peak_learning_rate(f)
    warmup_steps = round(f.warmup_epochs * steps_per_epoch)
    if f.lr_schedule == "step":
        boundaries = [round(float(e) * steps_per_epoch) for e in f.lr_decay_epochs]
        return WarmupStepDecay(peak, boundaries, f.lr_decay_factor, warmup_steps)
    if f.lr_schedule == "cosine":
        return lars_tf.WarmupCosineDecay(
            peak,
            decay_steps=train_steps,
            warmup_steps=warmup_steps,
            end_learning_rate=f.end_learning_rate,
        )
    return lars_tf.WarmupPolynomialDecay(
        peak,
        decay_steps=train_steps,
        warmup_steps=warmup_steps,
        end_learning_rate=f.end_learning_rate,
        power=f.poly_power,
    )


def build_optimizer(
    f: flags.FlagValues,
    learning_rate: keras.optimizers.schedules.LearningRateSchedule,
    model: keras.Model,
) -> keras.optimizers.Optimizer:
    """The optimizer of `--optimizer`, built on `model`'s variables.

    Call inside `strategy.scope()`. With `--precision=mixed_float16` it is
    wrapped in Keras's `LossScaleOptimizer` (dynamic loss scale); the training
    step then differentiates `optimizer.scale_loss(loss)` and `apply_gradients`
    unscales. Built eagerly so that a checkpoint restores its slots at once.
    """
    exclude = lars_tf.exclude_bias_and_norm if f.exclude_bias_and_norm else None
    if f.optimizer == "lars":
        optimizer = lars_tf.LARS(
            learning_rate,
            momentum=f.momentum,
            weight_decay=f.weight_decay,
            trust_coefficient=f.trust_coefficient,
            epsilon=f.epsilon,
            clip=f.clip,
            exclude_from_adaptation=exclude,
            exclude_from_weight_decay=exclude,
        )
    elif f.optimizer == "sgd":  # Weight decay: see l2_loss().
        optimizer = keras.optimizers.SGD(learning_rate, momentum=f.momentum)
    else:
        adaptive = {"lamb": keras.optimizers.Lamb, "adamw": keras.optimizers.AdamW}
        optimizer = adaptive[f.optimizer](
            learning_rate,
            beta_1=f.momentum,
            epsilon=f.epsilon or 1e-6,
            weight_decay=f.weight_decay,
        )
        if exclude:
            optimizer.exclude_from_weight_decay(
                var_list=[v for v in model.trainable_variables if exclude(v)]
            )
    if f.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer


def l2_loss(f: flags.FlagValues, model: keras.Model):
    """`wd/2 * sum ||w||^2` over the decayed weights for SGD, else None.

    Its gradient `wd * w` is the coupled weight decay LARS applies itself.
    """
    if f.optimizer != "sgd" or f.weight_decay == 0:
        return None
    decayed = [
        v
        for v in model.trainable_variables
        if not (f.exclude_bias_and_norm and lars_tf.exclude_bias_and_norm(v))
    ]
    return 0.5 * f.weight_decay * ops.sum([ops.sum(ops.square(v)) for v in decayed])
