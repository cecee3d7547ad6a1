"""The optimizer, its learning-rate schedule and the weight-decay term of a run.

The learning rate is the peak rate (the base rate scaled to the global batch,
decided in `train/config.py`), reached by a linear warm-up from 0 and then
decayed (`--lr_schedule`): poly of `--poly_power`, cosine, or a step decay at
`--lr_decay_epochs`, all from `lars_tf.schedules`.

Weight decay is applied once, where each optimizer expects it: coupled inside
LARS (it enters the trust ratio), as the L2 loss term `wd/2 * sum ||w||^2` for
SGD (the tensorflow/tpu ResNet reference), and decoupled for Lamb and AdamW
(their own `weight_decay` argument). With `--exclude_bias_and_norm`, biases and
normalization parameters are neither decayed nor (for LARS) adapted.
"""

import keras
from keras import ops

import lars_tf
from lars_tf.schedules import WarmupCosineDecay, WarmupPolynomialDecay, WarmupStepDecay
from train.config import OPTIMIZERS, SCHEDULES, Config


def learning_rate_schedule(
    config: Config,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Warm-up from 0 to the peak rate, then the decay `--lr_schedule`.

    `"poly"` (of `--poly_power`) and `"cosine"` reach `--end_learning_rate`
    at the run's last step; `"step"` multiplies the rate by
    `--lr_decay_factor` at each of `config.lr_decay_steps` (absolute steps).
    """
    if config.lr_schedule == "step":
        return WarmupStepDecay(
            config.peak_learning_rate,
            list(config.lr_decay_steps),
            config.lr_decay_factor,
            config.warmup_steps,
        )
    decay = {"poly": WarmupPolynomialDecay, "cosine": WarmupCosineDecay}
    if config.lr_schedule not in decay:
        raise ValueError(
            f"lr_schedule must be one of {SCHEDULES}. Received: {config.lr_schedule!r}"
        )
    extra = {"power": config.poly_power} if config.lr_schedule == "poly" else {}
    return decay[config.lr_schedule](
        config.peak_learning_rate,
        decay_steps=config.train_steps,
        warmup_steps=config.warmup_steps,
        end_learning_rate=config.end_learning_rate,
        **extra,
    )


def build_optimizer(config: Config, model: keras.Model) -> keras.optimizers.Optimizer:
    """`--optimizer` with its schedule, built on `model`'s trainable variables.

    `--momentum` is Lamb's and AdamW's `beta_1`; their `epsilon` is 1e-6 when
    `--epsilon` is 0. `--weight_decay` is coupled for LARS, decoupled for Lamb
    and AdamW, and not applied for SGD (see `l2_loss_fn`);
    `--exclude_bias_and_norm` picks the variables neither decayed nor adapted;
    `--nesterov` applies to LARS and SGD. With `--precision=mixed_float16` the
    optimizer is wrapped in Keras's `LossScaleOptimizer` (dynamic loss scale):
    the training step differentiates `optimizer.scale_loss(loss)`, and
    `apply_gradients` unscales. Call inside `strategy.scope()`; built eagerly
    so that a checkpoint restores its slots at once.
    """
    name, variables = config.optimizer, model.trainable_variables
    learning_rate = learning_rate_schedule(config)
    exclude = lars_tf.exclude_bias_and_norm if config.exclude_bias_and_norm else None
    if name == "lars":
        optimizer = lars_tf.LARS(
            learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            trust_coefficient=config.trust_coefficient,
            epsilon=config.epsilon,
            nesterov=config.nesterov,
            clip=config.clip,
            exclude_from_adaptation=exclude,
            exclude_from_weight_decay=exclude,
        )
    elif name == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate, momentum=config.momentum, nesterov=config.nesterov
        )
    elif name in ("lamb", "adamw"):
        adaptive = {"lamb": keras.optimizers.Lamb, "adamw": keras.optimizers.AdamW}
        optimizer = adaptive[name](
            learning_rate,
            beta_1=config.momentum,
            epsilon=config.epsilon or 1e-6,
            weight_decay=config.weight_decay,
        )
        if exclude:
            optimizer.exclude_from_weight_decay(
                var_list=[v for v in variables if exclude(v)]
            )
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}. Received: {name!r}")
    if config.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(variables)
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
