"""lars_tf: LARS (You, Gitman & Ginsburg, 2017) for Keras 3.

The optimizer, schedules and callbacks run on the TensorFlow, JAX and PyTorch
backends. Names are imported on first use (PEP 562), so `lars_tf.validation`,
which holds the argument ranges, can be imported without Keras or TensorFlow:
the training app checks its flags with it before TensorFlow starts.

Loading a saved model that uses a class of this package needs that class
defined first, as for any custom Keras object: `from lars_tf import LARS`
(or `import lars_tf.lars`, which also defines the schedules) before
`keras.saving.load_model`.
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_MODULES = {
    "LARS": "lars_tf.lars",
    "exclude_bias_and_norm": "lars_tf.lars",
    "local_learning_rate": "lars_tf.rule",
    "trust_ratio": "lars_tf.rule",
    "WarmupCosineDecay": "lars_tf.schedules",
    "WarmupPolynomialDecay": "lars_tf.schedules",
    "ScheduleWithWarmup": "lars_tf.schedules",
    "linear_warmup": "lars_tf.schedules",
    "scaled_learning_rate": "lars_tf.schedules",
    "LearningRateWarmup": "lars_tf.callbacks",
    "Throughput": "lars_tf.callbacks",
    "TrustRatioMonitor": "lars_tf.trust_ratio_monitor",
}

__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'lars_tf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES[name]), name)
    globals()[name] = value  # Later look-ups skip this function.
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
