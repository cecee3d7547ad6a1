"""lars_tf: LARS (You, Gitman & Ginsburg, 2017) for Keras 3 on TensorFlow."""

from lars_tf.callbacks import (
    LearningRateWarmup,
    ScheduleWithWarmup,
    Throughput,
    TrustRatioMonitor,
)
from lars_tf.lars import LARS, exclude_bias_and_norm, trust_ratio
from lars_tf.schedules import (
    WarmupCosineDecay,
    WarmupPolynomialDecay,
    scaled_learning_rate,
)

__version__ = "0.1.0"

__all__ = [
    "LARS",
    "exclude_bias_and_norm",
    "trust_ratio",
    "WarmupCosineDecay",
    "WarmupPolynomialDecay",
    "scaled_learning_rate",
    "LearningRateWarmup",
    "ScheduleWithWarmup",
    "Throughput",
    "TrustRatioMonitor",
]
