"""LARS under Keras's distribution API on JAX gives one device's weights.

Each layout of tests/jax_distribution_check.py runs in its own process (JAX
fixes its devices and its multi-process setup when it starts); all four run at
once and train the same model on the same tiny MNIST-format data through
`train.data`'s pipeline. The one-device run is the reference.
"""

import importlib.util
import socket

import helpers
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="JAX is not installed"
)

TIMEOUT_SECONDS = 600  # all four together; 2-3 minutes on a loaded 2-core CPU
TOLERANCE = 1e-5  # float32 sums in another order
IDX_FILES = (  # train.data.IDX_FILES, without importing TensorFlow here
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 64),
    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 8),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, check_scripts):
    """The four layouts' JSON reports and weights, keyed by run name."""
    folder = tmp_path_factory.mktemp("jax_distribution")
    data_dir = folder / "mnist"
    data_dir.mkdir()
    rng = np.random.default_rng(5)
    for images_name, labels_name, count in IDX_FILES:
        helpers.write_idx(data_dir / images_name, rng.integers(0, 256, (count, 28, 28)))
        helpers.write_idx(data_dir / labels_name, rng.integers(0, 10, count))

    coordinator = f"127.0.0.1:{_free_port()}"
    commands = {
        "single": ["--layout=single"],
        "data_parallel": ["--layout=data_parallel"],
        "process_0": ["--layout=multi_process", "--process_id=0"],
        "process_1": ["--layout=multi_process", "--process_id=1"],
    }
    common = [f"--data_dir={data_dir}", f"--coordinator={coordinator}"]
    reports = check_scripts.run_all(
        "jax_distribution_check.py",
        {
            name: [*flags, *common, f"--output={folder / name}.npz"]
            for name, flags in commands.items()
        },
        env={"XLA_FLAGS": None},  # the script sets its own
        timeout=TIMEOUT_SECONDS,
    )
    results = {}
    for name, report in reports.items():
        with np.load(folder / f"{name}.npz") as weights:
            report["weights"] = dict(weights)
        results[name] = report
    return results


def _assert_same_weights(reference: dict, other: dict) -> None:
    assert reference.keys() == other.keys()
    for name, value in reference.items():
        np.testing.assert_allclose(
            other[name], value, rtol=TOLERANCE, atol=TOLERANCE, err_msg=name
        )


def test_runs_trained_and_started_from_the_same_weights(runs):
    # The comparisons below mean something only if training moved the weights
    # far more than the tolerance, from one starting point.
    for run in runs.values():
        assert run["largest_weight_change"] > 1000 * TOLERANCE
    initial = {k: v for k, v in runs["single"]["weights"].items() if "initial" in k}
    for run in runs.values():
        for name, value in initial.items():
            np.testing.assert_array_equal(run["weights"][name], value)


def test_data_parallel_on_two_devices_matches_one_device(runs):
    run = runs["data_parallel"]
    assert (run["devices"], run["processes"], run["batch_fed"]) == (2, 1, 8)
    _assert_same_weights(runs["single"]["weights"], run["weights"])


def test_two_processes_match_one_process(runs):
    for process_id in (0, 1):
        run = runs[f"process_{process_id}"]
        assert run["process_id"] == process_id
        # Two processes of one device each; Keras feeds each half the batch.
        assert (run["devices"], run["processes"], run["batch_fed"]) == (2, 2, 4)
        _assert_same_weights(runs["single"]["weights"], run["weights"])


def test_model_parallel_sharded_kernels_match_one_device(runs):
    """Kernels split over 2 devices by a LayoutMap: LARS takes whole-variable norms.

    Run in the data-parallel process (2 host devices), in both forms of the
    trust ratio. A norm of one device's shard instead of the whole variable
    puts the weights about 0.1 (relative) off.
    """
    for form, run in runs["data_parallel"]["model_parallel"].items():
        # The variables really are split: each device holds half a kernel.
        assert run["shards"] == {
            "dense_in/kernel": [[6, 8], [6, 4]],
            "dense_in/bias": [[8], [4]],
            "dense_out/kernel": [[8, 4], [4, 4]],
            "dense_out/bias": [[4], [4]],
        }, form
        assert run["slots_sharded_as_weights"], form
        assert run["same_start"], form
        assert run["moved"] > 0.1, (form, run)  # kernels moved by > 10%
        assert run["sharded_vs_one_device"] < TOLERANCE, (form, run)
