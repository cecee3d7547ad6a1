"""The optimizer, its learning-rate schedule and the weight-decay term of a Config.

The learning rate is the peak rate (the base rate scaled to the global batch,
decided in `train/config.py`), reached by a linear warm-up from 0 and then
decayed (`--lr_schedule`): poly of `--poly_power` and cosine come from
`lars_tf`, the step schedule is below.

Weight decay is applied once, where each optimizer expects it: coupled inside
LARS (it enters the trust ratio), as the L2 loss term `wd/2 * sum ||w||^2` for
SGD (the tensorflow/tpu ResNet reference), and decoupled for Lamb and AdamW
(their own `weight_decay` argument). With `--exclude_bias_and_norm`, biases and
normalization parameters are neither decayed nor (for LARS) adapted.
"""

import keras
from keras import ops

import lars_tf
from train.config import Config


class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to a peak rate, then a factor `decay_factor` at each boundary.

    The warm-up is `lars_tf.linear_warmup` from 0: step `t < warmup_steps`
    has rate `peak * t / warmup_steps`; from `warmup_steps` on the rate is
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
        warmup_rate = lars_tf.linear_warmup(
            step, self.warmup_steps, 0.0, self.peak_learning_rate
        )
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


def learning_rate_schedule(
    config: Config,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Warm-up then the decay of `config.lr_schedule`, over the training steps."""
    peak = config.peak_learning_rate
    if config.lr_schedule == "step":
        return WarmupStepDecay(
            peak, config.lr_decay_steps, config.lr_decay_factor, config.warmup_steps
        )
    if config.lr_schedule == "cosine":
        return lars_tf.WarmupCosineDecay(
            peak,
            decay_steps=config.train_steps,
            warmup_steps=config.warmup_steps,
            end_learning_rate=config.end_learning_rate,
        )
    return lars_tf.WarmupPolynomialDecay(
        peak,
        decay_steps=config.train_steps,
        warmup_steps=config.warmup_steps,
        end_learning_rate=config.end_learning_rate,
        power=config.poly_power,
    )


def build_optimizer(config: Config, model: keras.Model) -> keras.optimizers.Optimizer:
    """The optimizer of `config.optimizer` with its schedule, built on `model`.

    Call inside `strategy.scope()`. With `--precision=mixed_float16` it is
    wrapped in Keras's `LossScaleOptimizer` (dynamic loss scale); the training
    step then differentiates `optimizer.scale_loss(loss)` and `apply_gradients`
    unscales. Built eagerly so that a checkpoint restores its slots at once.
    """
    learning_rate = learning_rate_schedule(config)
    exclude = lars_tf.exclude_bias_and_norm if config.exclude_bias_and_norm else None
    if config.optimizer == "lars":
        optimizer = lars_tf.LARS(
            learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            trust_coefficient=config.trust_coefficient,
            epsilon=config.epsilon,
            clip=config.clip,
            exclude_from_adaptation=exclude,
            exclude_from_weight_decay=exclude,
        )
    elif config.optimizer == "sgd":  # Weight decay: see l2_loss().
        optimizer = keras.optimizers.SGD(learning_rate, momentum=config.momentum)
    else:
        adaptive = {"lamb": keras.optimizers.Lamb, "adamw": keras.optimizers.AdamW}
        optimizer = adaptive[config.optimizer](
            learning_rate,
            beta_1=config.momentum,
            epsilon=config.epsilon or 1e-6,
            weight_decay=config.weight_decay,
        )
        if exclude:
            optimizer.exclude_from_weight_decay(
                var_list=[v for v in model.trainable_variables if exclude(v)]
            )
    if config.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer


def l2_loss_fn(config: Config, model: keras.Model):
    """For SGD, a function computing `wd/2 * sum ||w||^2` over the decayed
    weights; None for the other optimizers (their weight decay is their own).

    Its gradient `wd * w` is the coupled weight decay LARS applies itself. The
    choice of weights is made here, once, not in the traced step.
    """
    if config.optimizer != "sgd" or config.weight_decay == 0:
        return None
    decayed = [
        v
        for v in model.trainable_variables
        if not (config.exclude_bias_and_norm and lars_tf.exclude_bias_and_norm(v))
    ]
    half_decay = 0.5 * config.weight_decay

    def l2_loss():
        return half_decay * ops.sum([ops.sum(ops.square(v)) for v in decayed])

    return l2_loss
