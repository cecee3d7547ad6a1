"""lars_tf: LARS (You, Gitman & Ginsburg, 2017) for Keras 3.

The optimizer, schedules and callbacks run on the TensorFlow, JAX and PyTorch
backends. `import lars_tf` defines every class of the package and registers
each one that can be saved with Keras, so `keras.saving.load_model` finds
them in a model saved with LARS or one of these schedules.

`lars_tf.validation` (the argument ranges) imports neither Keras nor
TensorFlow; the training app loads it alone to check its flags before
TensorFlow starts (`train.lars_tf_validation`).
"""

from lars_tf import validation
from lars_tf.callbacks import LearningRateWarmup, Throughput
from lars_tf.lars import LARS, exclude_bias_and_norm
from lars_tf.rule import local_learning_rate, trust_ratio
from lars_tf.schedules import (
    ScheduleWithWarmup,
    WarmupCosineDecay,
    WarmupPolynomialDecay,
    WarmupStepDecay,
    linear_warmup,
    scaled_learning_rate,
)
from lars_tf.trust_ratio_monitor import TrustRatioMonitor

__version__ = "0.1.0"

__all__ = [
    "LARS",
    "LearningRateWarmup",
    "ScheduleWithWarmup",
    "Throughput",
    "TrustRatioMonitor",
    "WarmupCosineDecay",
    "WarmupPolynomialDecay",
    "WarmupStepDecay",
    "exclude_bias_and_norm",
    "linear_warmup",
    "local_learning_rate",
    "scaled_learning_rate",
    "trust_ratio",
    "validation",
]
