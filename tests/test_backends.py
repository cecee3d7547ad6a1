"""lars_tf on the TensorFlow, JAX and PyTorch backends, one process each.

Keras picks its backend when it is imported, so each backend runs
tests/backend_check.py in its own process with KERAS_BACKEND set; the check
compares LARS with a float64 NumPy version of the paper's Algorithm 1 and
prints what it measured. TensorFlow's check also saves a `.keras` model that
the JAX and PyTorch checks load and train one step further. JAX is part of
the `test` extra; PyTorch is checked where it is installed (its CPU wheel is
large, see docs/optimizer.md).
"""

import importlib.util

import pytest


def _installed(package):
    return importlib.util.find_spec(package) is not None


BACKENDS = [
    "tensorflow",
    pytest.param(
        "jax",
        marks=pytest.mark.skipif(not _installed("jax"), reason="jax is not installed"),
    ),
    pytest.param(
        "torch",
        marks=pytest.mark.skipif(
            not _installed("torch"),
            reason="torch is not installed (not in the `test` extra: see "
            "docs/optimizer.md)",
        ),
    ),
]


def run_check(check_scripts, backend, *arguments):
    """The check's report; JAX and PyTorch run as if TensorFlow were absent."""
    if backend != "tensorflow":
        arguments = ("--without-tensorflow", *arguments)
    return check_scripts.run(
        "backend_check.py", *arguments, env={"KERAS_BACKEND": backend}, timeout=600
    )


@pytest.fixture(scope="module")
def reports(tmp_path_factory, check_scripts):
    """`report(backend)`: the check's report, one process per backend.

    TensorFlow's check runs first and saves a `.keras` model that the other
    backends' checks load.
    """
    saved = str(tmp_path_factory.mktemp("saved_on_tensorflow"))
    done = {}

    def report(backend):
        if backend not in done:
            if backend == "tensorflow":
                done[backend] = run_check(check_scripts, backend, "--save-to", saved)
            else:
                report("tensorflow")
                done[backend] = run_check(check_scripts, backend, "--load-from", saved)
        return done[backend]

    return report


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend(backend, reports):
    report = reports(backend)
    assert report["backend"] == backend
    # The optimizer, schedules and callbacks need no TensorFlow on JAX/PyTorch.
    assert report["tensorflow_imported"] == (backend == "tensorflow")
    # Float32 against float64 over 3 steps: a few float32 roundings.
    for case, error in report["reference"].items():
        assert error < 1e-6, (case, report["reference"])
    assert report["zero_norms"] < 1e-6, report
    skip = report["skip_nonfinite"]
    assert skip["changed_by_nan_step"] == 0.0, skip
    assert skip["weights_vs_reference"] < 1e-6, skip
    assert skip["slots_vs_reference"] < 1e-6, skip
    assert skip["iterations"] == 3, skip  # 4 steps given, 1 skipped
    assert report["config_round_trip"], report
    fit = report["fit_save_load"]
    assert fit["last_loss"] < 0.9 * fit["first_loss"], fit
    assert fit["restored_class"] == "LARS" and fit["restored_config_equal"], fit
    assert fit["slots_after_load_max_diff"] == 0.0, fit
    assert fit["resumed_vs_straight"] < 1e-6, fit
    for policy, run in report["mixed_precision"].items():
        assert run["finite"] and run["last_loss"] < 0.9 * run["first_loss"], policy
        assert run["slot_dtypes"] == ["float32"], policy
    warmup = report["warmup"]
    assert warmup["schedule_max_abs_diff"] < 1e-6, warmup
    assert warmup["constant_max_abs_diff"] < 1e-6, warmup
    assert warmup["throughput_timed_steps"] == 8 - 2, warmup
    for monitor in report["monitor"].values():  # both forms of the ratio
        assert monitor["names"] == ["fc.w", "fc.b"], monitor
        for key in ("weight_norms", "gradient_norms", "rates"):
            assert monitor[key] < 1e-5, monitor


@pytest.mark.skipif(not _installed("jax"), reason="jax is not installed")
@pytest.mark.skipif(
    not _installed("optax"), reason="optax is not installed (in the `test` extra)"
)
def test_decayed_gradient_norm_matches_optax_lars(reports):
    """`decayed_gradient_norm=True` is `optax.lars`, at every gradient scale.

    20 steps on JAX at gradient scales 1, 1e-3 and 1e-5 (where `d * ||w||`
    outgrows `||g||`); figures relative to how far optax moved the weights.
    The paper's form parts from optax once the gradient gets small, which
    shows the comparison can tell the forms apart.
    """
    optax_run = reports("jax")["optax"]
    for scale in ("1", "0.001", "1e-05"):
        assert optax_run[f"{scale}/decayed_norm"] < 1e-5, optax_run
    for scale in ("0.001", "1e-05"):
        assert optax_run[f"{scale}/paper"] > 1e-2, optax_run


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_steps_per_execution(backend, reports):
    """`model.fit` with steps_per_execution=2 gives the weights of 1 step per call."""
    run = reports(backend)["steps_per_execution"]
    assert run["iterations"] == 8, run
    assert run["moved"] > 1e-3, run
    assert run["two_vs_one"] < 1e-6, run


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_keras_file_from_tensorflow(backend, reports):
    """A model saved on TensorFlow after 2 steps loads and steps on `backend`."""
    assert reports("tensorflow")["saved"]["smallest_slot_max"] > 0
    loaded = reports(backend)["loaded"]
    assert loaded["class"] == "LARS", loaded
    assert loaded["variables"] == [2, 2, 2 + 2 + 1 + 2], loaded  # + step, x, y
    assert loaded["weights_max_diff"] == 0.0, loaded
    assert loaded["slots_max_diff"] == 0.0, loaded
    assert loaded["iterations"] == [2, 2], loaded
    assert loaded["step_vs_reference"] < 1e-6, loaded
    assert loaded["slots_vs_reference"] < 1e-6, loaded
