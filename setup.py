"""Packaging for lars-tf.

The library (`lars_tf`) needs only Keras and one Keras backend, chosen by an
extra: `pip install "lars-tf[tensorflow]"` or `"lars-tf[jax]"` (PyTorch: install
a CPU or CUDA build of `torch` yourself, then plain `lars-tf`). The training
app (`train`) needs TensorFlow and its data libraries: `"lars-tf[app]"`. The
`test` extra brings everything the test suite runs on (TensorFlow and JAX).

TensorFlow ships as two distributions, `tensorflow` and `tensorflow-cpu`, and
installing one beside the other is wrong. We require whichever one is already
installed, `tensorflow` otherwise; set LARS_TF_TENSORFLOW=tensorflow-cpu to
choose the CPU build on a fresh machine.
"""

import os
from importlib import metadata

from setuptools import setup


def _tensorflow_distribution() -> str:
    chosen = os.environ.get("LARS_TF_TENSORFLOW")
    if chosen:
        return chosen
    for name in ("tensorflow", "tensorflow-cpu"):
        try:
            metadata.version(name)
            return name
        except metadata.PackageNotFoundError:
            pass
    return "tensorflow"


TENSORFLOW = [f"{_tensorflow_distribution()}>=2.16", "tensorboard"]
JAX = ["jax"]
APP = TENSORFLOW + [
    "tensorflow-datasets",
    # TFDS 4.9.10 imports it to prepare datasets (DatasetBuilder.code_path) but
    # declares it only for Python < 3.9.
    "importlib_resources",
    "absl-py",
]

setup(
    name="lars-tf",
    version="0.1.0",
    description="LARS (Layer-wise Adaptive Rate Scaling) for Keras 3 on TensorFlow, "
    "JAX and PyTorch, and a large-batch ImageNet training app.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["lars_tf", "train"],
    install_requires=["keras>=3", "numpy"],
    extras_require={
        # tf.summary (TrustRatioMonitor's TensorBoard logs) lives in
        # `tensorboard`; TF 2.21's wheels no longer pull it in.
        "tensorflow": TENSORFLOW,
        "jax": JAX,
        "app": APP,
        # ruff pinned: its formatting changes between releases.
        "test": APP + JAX + ["pytest", "ruff==0.17.6"],
        "study": ["matplotlib"],
    },
)
