"""lars_tf: LARS (You, Gitman & Ginsburg, 2017) for Keras 3 on TensorFlow."""

__version__ = "0.1.0"
