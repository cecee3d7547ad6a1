"""Shared pytest setup: quiet TensorFlow's C++ logging before it is imported;
fixtures more than one test file uses. Helpers the tests and the check scripts
share are in tests/helpers.py."""

import json
import os
import subprocess
import sys
import time

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def _label(script, name):
    return script if name == script else f"{script} {name}"


def _run_checks(script, commands, env=None, timeout=300):
    """Runs tests/`script` once per `{name: arguments}` entry, all at once.

    Each run is a fresh process (a check needs one: logical devices, a Keras
    backend or a JAX distributed setup are fixed when the process starts), with
    the repository root on PYTHONPATH (for `train` and this checkout's
    `lars_tf`) and `env` over os.environ (a None value removes the variable).
    Returns `{name: the JSON object of the run's last stdout line}`; a run that
    fails or outlives `timeout` seconds (for all together) fails the test with
    its output.
    """
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    full_env["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    path = os.path.join(TESTS_DIR, script)
    processes = {}
    outputs = {}
    try:
        for name, arguments in commands.items():
            processes[name] = subprocess.Popen(
                [sys.executable, path, *arguments],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=full_env,
                cwd=REPO_ROOT,
            )
        deadline = time.monotonic() + timeout
        for name, process in processes.items():
            try:
                outputs[name] = process.communicate(
                    timeout=max(1, deadline - time.monotonic())
                )
            except subprocess.TimeoutExpired:
                pytest.fail(f"{_label(script, name)}: still running after {timeout} s")
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    reports = {}
    for name, process in processes.items():
        stdout, stderr = outputs[name]
        assert process.returncode == 0, (
            f"{_label(script, name)} exited {process.returncode}:\n"
            f"{stdout[-1500:]}\n{stderr[-3000:]}"
        )
        reports[name] = json.loads(stdout.strip().splitlines()[-1])
    return reports


class CheckScripts:
    """Runs the tests/*_check.py scripts in subprocesses; see `_run_checks`."""

    def run(self, script, *arguments, env=None, timeout=300):
        """The report of one run of tests/`script` with `arguments`."""
        return _run_checks(script, {script: arguments}, env, timeout)[script]

    def run_all(self, script, commands, env=None, timeout=300):
        """`{name: report}` of runs of tests/`script`, one per
        `{name: arguments}` entry, run at the same time."""
        return _run_checks(script, commands, env, timeout)


@pytest.fixture(scope="session")
def check_scripts():
    """`check_scripts.run("x_check.py", *arguments)`: the script's JSON report."""
    return CheckScripts()


@pytest.fixture
def tfds_metadata_dir(tmp_path):
    """TFDS metadata of a prepared 'mnist' (train 2 files, test 1), no data."""
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder("mnist", data_dir=str(tmp_path))
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(name="train", shard_lengths=[6, 6], num_bytes=0),
                tfds.core.SplitInfo(name="test", shard_lengths=[5], num_bytes=0),
            ]
        )
    )
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    return str(tmp_path)


@pytest.fixture(autouse=True)
def _op_determinism_off_after_each_test():
    """A run with `deterministic=True` turns TensorFlow's op determinism on for
    the whole process, and TensorFlow has no public call to turn it off; left
    on, a later test's XLA step fails (no deterministic XLA MaxPool gradient)."""
    yield
    if "tensorflow" in sys.modules:
        from tensorflow.python.framework import config

        config.disable_op_determinism()
