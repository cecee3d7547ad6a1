"""Flag validation of `python -m train.main`: in-process, plus one subprocess
showing that a bad flag fails fast with one line and without TensorFlow."""

import json
import os
import subprocess
import sys

import pytest
from absl import flags

from train import FlagError, main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(*args: str) -> flags.FlagValues:
    """Fresh flags, parsed from `args` (the global FLAGS stay untouched)."""
    flag_values = flags.FlagValues()
    main.define_flags(flag_values)
    flag_values(["train.main", *args])
    return flag_values


def _error_flag(*args: str) -> str:
    with pytest.raises(FlagError) as error:
        main.validate_flags(_parse(*args))
    assert str(error.value).startswith(f"--{error.value.flag}: ")
    assert "\n" not in str(error.value)
    return error.value.flag


def test_defaults_are_valid():
    main.validate_flags(_parse())


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--global_batch_size=-8"], "global_batch_size"),
        (["--global_batch_size=0"], "global_batch_size"),
        (["--train_steps=-1"], "train_steps"),
        (["--train_epochs=0"], "train_epochs"),
        (["--image_size=0"], "image_size"),
        (["--weight_decay=-1e-4"], "weight_decay"),
        (["--base_learning_rate=0"], "base_learning_rate"),
        (["--label_smoothing=1.0"], "label_smoothing"),
        (["--steps_per_loop=0"], "steps_per_loop"),
        (["--lr_decay_epochs=60,30"], "lr_decay_epochs"),
        (["--lr_decay_epochs=a"], "lr_decay_epochs"),
        (["--warmup_epochs=5", "--train_epochs=5"], "warmup_epochs"),
        (["--warmup_epochs=6", "--train_epochs=5"], "warmup_epochs"),
        # 100 is not divisible by 3 replicas.
        (
            ["--strategy=mirrored", "--num_cpu_devices=3", "--global_batch_size=100"],
            "global_batch_size",
        ),
        (["--strategy=tpu"], "tpu"),
        (["--strategy=multi_worker", "--model_dir=/tmp/x"], "strategy"),
        (["--strategy=one_device", "--num_cpu_devices=2"], "num_cpu_devices"),
        (["--source=tfds"], "tfds_name"),
        (["--source=mnist", "--data_dir=/nonexistent/mnist"], "data_dir"),
        (["--source=imagenet", "--data_dir=/nonexistent/imagenet"], "data_dir"),
    ],
)
def test_bad_flag_is_named(args, flag, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert _error_flag(*args) == flag


def test_batch_must_divide_over_the_workers_of_tf_config(monkeypatch):
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster}))
    args = ["--strategy=multi_worker", "--model_dir=/tmp/x"]
    assert _error_flag(*args, "--global_batch_size=64") == "global_batch_size"
    main.validate_flags(_parse(*args, "--global_batch_size=96"))


def test_multi_worker_needs_a_model_dir(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}}))
    assert _error_flag("--strategy=multi_worker") == "model_dir"


def test_unknown_model_is_an_absl_error_naming_the_flag():
    with pytest.raises(flags.IllegalFlagValueError, match="--model=vgg16"):
        _parse("--model=vgg16")


def test_auto_source_falls_back_to_synthetic_without_mnist(tmp_path):
    assert main.resolve_source(_parse(f"--data_dir={tmp_path}")) == "synthetic"
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert main.resolve_source(_parse(f"--data_dir={tmp_path}")) == "mnist"


def test_warmup_longer_than_training_in_steps_needs_the_dataset_size():
    from train import data, trainer

    info = data.DatasetInfo(10, 6400, 1000, 1)  # 100 steps per epoch at 64.
    f = _parse("--global_batch_size=64", "--train_steps=50", "--warmup_epochs=0.5")
    main.validate_flags(f)  # Cannot tell before the dataset size is known.
    with pytest.raises(FlagError, match="^--warmup_epochs: "):
        trainer.make_schedule(f, info)
    f = _parse("--global_batch_size=64", "--train_steps=51", "--warmup_epochs=0.5")
    schedule = trainer.make_schedule(f, info)
    assert (schedule.train_steps, schedule.warmup_steps) == (51, 50)
    assert schedule.checkpoint_every == schedule.steps_per_epoch == 100
    f = _parse("--global_batch_size=8192")
    with pytest.raises(FlagError, match="^--global_batch_size: 8192 exceeds"):
        trainer.make_schedule(f, info)


def test_loop_stops_at_every_event():
    from train import trainer

    f = _parse("--steps_per_loop=7", "--log_every_steps=5")
    schedule = trainer.Schedule(
        steps_per_epoch=12,
        train_steps=30,
        warmup_steps=0,
        checkpoint_every=9,
        eval_every=0,
    )
    stops, step = [], 0
    while step < schedule.train_steps:
        step = schedule.next_stop(step, f)
        stops.append(step)
    # Multiples of 5 (log), 12 (epoch), 9 (checkpoint), the end, and at most
    # 7 steps apart.
    assert stops == [5, 9, 10, 12, 15, 18, 20, 24, 25, 27, 30]


def test_bad_flag_fails_fast_with_one_line_and_no_tensorflow():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['train.main', '--global_batch_size=-1']\n"
        "try:\n"
        "    runpy.run_module('train.main', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print(exit.code, 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.split() == ["2", "False"]
    assert result.stderr.splitlines() == [
        "train.main: error: --global_batch_size: must be positive, got -1"
    ]
