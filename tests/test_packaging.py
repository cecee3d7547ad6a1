"""What `pip install` and `import lars_tf` give a user.

The wheel holds `lars_tf` only; only an extra that names a TensorFlow
distribution installs one; and `import lars_tf` alone lets Keras load a model
saved with the package's optimizer and schedules.
"""

import os
import subprocess
import sys
from distutils.core import run_setup

import keras
import numpy as np

import lars_tf

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TENSORFLOW_DISTRIBUTIONS = {"tensorflow", "tensorflow-cpu"}


def _distribution():
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # setup.py reads README.md by a relative path
    try:
        return run_setup("setup.py", stop_after="init")
    finally:
        os.chdir(cwd)


def _names(requirements: list[str]) -> set[str]:
    return {r.split(">")[0].split("=")[0].split("[")[0] for r in requirements}


def test_the_wheel_ships_the_library_only():
    assert _distribution().packages == ["lars_tf"]


def test_only_an_extra_named_after_a_tensorflow_distribution_installs_it():
    distribution = _distribution()
    assert not _names(distribution.install_requires) & TENSORFLOW_DISTRIBUTIONS
    for extra, requirements in distribution.extras_require.items():
        chosen = _names(requirements) & TENSORFLOW_DISTRIBUTIONS
        assert chosen == ({extra} & TENSORFLOW_DISTRIBUTIONS), extra


def test_import_lars_tf_alone_loads_a_saved_model(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    schedule = lars_tf.WarmupPolynomialDecay(
        peak_learning_rate=0.5, warmup_steps=2, decay_steps=10, power=2.0
    )
    model.compile(optimizer=lars_tf.LARS(schedule, momentum=0.9), loss="mse")
    model.fit(np.ones((4, 3)), np.zeros((4, 2)), epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    code = (
        "import keras, lars_tf\n"
        f"model = keras.saving.load_model({path!r})\n"
        "print(type(model.optimizer).__name__, "
        "float(model.optimizer.learning_rate))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    name, rate = result.stdout.split()
    # One step taken: warm-up's rate at step 1 of 2 is half the peak.
    assert (name, float(rate)) == ("LARS", 0.25)
