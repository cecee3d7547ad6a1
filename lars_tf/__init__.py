"""lars_tf: LARS (You, Gitman & Ginsburg, 2017) for Keras 3.

The optimizer, schedules and callbacks run on the TensorFlow, JAX and PyTorch
backends; `lars_tf.validation` holds the argument ranges and imports neither
Keras nor TensorFlow.
"""

from lars_tf.callbacks import LearningRateWarmup, Throughput
from lars_tf.lars import LARS, exclude_bias_and_norm
from lars_tf.rule import local_learning_rate, trust_ratio
from lars_tf.schedules import (
    ScheduleWithWarmup,
    WarmupCosineDecay,
    WarmupPolynomialDecay,
    linear_warmup,
    scaled_learning_rate,
)
from lars_tf.trust_ratio_monitor import TrustRatioMonitor

__version__ = "0.1.0"

__all__ = [
    "LARS",
    "exclude_bias_and_norm",
    "local_learning_rate",
    "trust_ratio",
    "WarmupCosineDecay",
    "WarmupPolynomialDecay",
    "ScheduleWithWarmup",
    "linear_warmup",
    "scaled_learning_rate",
    "LearningRateWarmup",
    "Throughput",
    "TrustRatioMonitor",
]
