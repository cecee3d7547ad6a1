"""The optimizer, its learning-rate schedule and the weight-decay term of a run.

`make_schedule` and `make_optimizer` take plain arguments, so any program that
trains (the app, a study) builds its optimizer the same way; `build_optimizer`
and `learning_rate_schedule` call them with a Config's fields.

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

from collections.abc import Callable, Sequence

import keras
from keras import ops

import lars_tf
from lars_tf.schedules import WarmupCosineDecay, WarmupPolynomialDecay, WarmupStepDecay
from train.config import OPTIMIZERS, SCHEDULES, Config


def make_schedule(
    kind: str,
    peak_learning_rate: float,
    train_steps: int,
    warmup_steps: int,
    *,
    end_learning_rate: float = 0.0,
    power: float = 2.0,
    boundaries: Sequence[int] = (),
    decay_factor: float = 0.1,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Warm-up from 0 to `peak_learning_rate`, then the decay `kind`.

    `"poly"` (of `power`) and `"cosine"` reach `end_learning_rate` at
    `train_steps`; `"step"` multiplies the rate by `decay_factor` at each of
    `boundaries` (absolute steps) and does not depend on `train_steps`.
    """
    if kind == "step":
        return WarmupStepDecay(
            peak_learning_rate, list(boundaries), decay_factor, warmup_steps
        )
    decay = {"poly": WarmupPolynomialDecay, "cosine": WarmupCosineDecay}
    if kind not in decay:
        raise ValueError(f"`kind` must be one of {SCHEDULES}. Received: {kind!r}")
    extra = {"power": power} if kind == "poly" else {}
    return decay[kind](
        peak_learning_rate,
        decay_steps=train_steps,
        warmup_steps=warmup_steps,
        end_learning_rate=end_learning_rate,
        **extra,
    )


def learning_rate_schedule(
    config: Config,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """`make_schedule` of `config.lr_schedule`, over the run's training steps."""
    return make_schedule(
        config.lr_schedule,
        config.peak_learning_rate,
        config.train_steps,
        config.warmup_steps,
        end_learning_rate=config.end_learning_rate,
        power=config.poly_power,
        boundaries=config.lr_decay_steps,
        decay_factor=config.lr_decay_factor,
    )


def make_optimizer(
    name: str,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    variables: Sequence[keras.Variable],
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    epsilon: float = 0.0,
    clip: bool = False,
    nesterov: bool = False,
    exclude: Callable[[keras.Variable], bool] | None = None,
    loss_scale: bool = False,
) -> keras.optimizers.Optimizer:
    """The optimizer `name` (one of `OPTIMIZERS`), built on `variables`.

    `momentum` is Lamb's and AdamW's `beta_1`; their `epsilon` is 1e-6 when
    `epsilon` is 0. `weight_decay` is coupled for LARS, decoupled for Lamb and
    AdamW, and not applied for SGD (see `l2_loss_fn`). `exclude` picks the
    variables neither decayed nor adapted; `nesterov` applies to LARS and SGD.
    With `loss_scale` the optimizer is wrapped in Keras's `LossScaleOptimizer`
    (dynamic loss scale): the training step differentiates
    `optimizer.scale_loss(loss)`, and `apply_gradients` unscales. Call inside
    `strategy.scope()`; built eagerly so that a checkpoint restores its slots
    at once.
    """
    if name == "lars":
        optimizer = lars_tf.LARS(
            learning_rate,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            epsilon=epsilon,
            nesterov=nesterov,
            clip=clip,
            exclude_from_adaptation=exclude,
            exclude_from_weight_decay=exclude,
        )
    elif name == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate, momentum=momentum, nesterov=nesterov
        )
    elif name in ("lamb", "adamw"):
        adaptive = {"lamb": keras.optimizers.Lamb, "adamw": keras.optimizers.AdamW}
        optimizer = adaptive[name](
            learning_rate,
            beta_1=momentum,
            epsilon=epsilon or 1e-6,
            weight_decay=weight_decay,
        )
        if exclude:
            optimizer.exclude_from_weight_decay(
                var_list=[v for v in variables if exclude(v)]
            )
    else:
        raise ValueError(f"`name` must be one of {OPTIMIZERS}. Received: {name!r}")
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(variables)
    return optimizer


def build_optimizer(config: Config, model: keras.Model) -> keras.optimizers.Optimizer:
    """`make_optimizer` of `config.optimizer` with its schedule, on `model`.

    Call inside `strategy.scope()`; `--precision=mixed_float16` scales the loss.
    """
    return make_optimizer(
        config.optimizer,
        learning_rate_schedule(config),
        model.trainable_variables,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        trust_coefficient=config.trust_coefficient,
        epsilon=config.epsilon,
        clip=config.clip,
        nesterov=config.nesterov,
        exclude=lars_tf.exclude_bias_and_norm if config.exclude_bias_and_norm else None,
        loss_scale=config.precision == "mixed_float16",
    )


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
