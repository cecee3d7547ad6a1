"""Packaging for lars-tf: the wheel ships the `lars_tf` library only.

The library needs Keras and one Keras backend. As with Keras and TFDS, no
backend is a hard dependency: an extra names the distribution to install
(`tensorflow`, `tensorflow-cpu` or `jax`), or the user installs one (PyTorch).
The training app (`train/`) and the study (`experiments/`) run from a
checkout; `app` brings their libraries except TensorFlow, which comes by the
`tensorflow` or `tensorflow-cpu` extra, so neither is installed beside the
other.
"""

from setuptools import setup

TENSORBOARD = ["tensorboard"]  # tf.summary's writers; not in TF 2.21's wheels
APP = TENSORBOARD + [
    "tensorflow-datasets",
    # TFDS 4.9.10 imports it to prepare datasets (DatasetBuilder.code_path)
    # but declares it only for Python < 3.9.
    "importlib_resources",
    "absl-py",
]

setup(
    name="lars-tf",
    version="0.1.0",
    description="LARS (Layer-wise Adaptive Rate Scaling) for Keras 3 on TensorFlow, "
    "JAX and PyTorch.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["lars_tf"],
    # rich lays out TrustRatioMonitor's table (Keras requires it too).
    install_requires=["keras>=3", "numpy", "rich"],
    extras_require={
        "tensorflow": ["tensorflow>=2.16"] + TENSORBOARD,
        "tensorflow-cpu": ["tensorflow-cpu>=2.16"] + TENSORBOARD,
        "jax": ["jax"],
        "app": APP,
        # ruff pinned: its formatting changes between releases.
        "test": APP + ["jax", "optax", "pytest", "ruff==0.17.6", "scipy"],
        # Welch's t intervals in the study's report.
        "study": ["scipy"],
    },
)
