"""The app's flags and their Config (train/config.py): in-process, plus one
subprocess showing that a bad flag fails fast with one line, exit status 2 and
without TensorFlow.

A bad value raises FlagError naming the flag and its allowed range before any
file is written; a folder reused with other settings raises UserError with one
line per changed flag.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
from absl import flags

from train import FlagError, UserError, config, sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN, INF = math.nan, math.inf
# Synthetic data: no data folder needed, ImageNet's sizes (1,281,167 images).
SYNTHETIC = {"source": "synthetic", "num_classes": 10}


def _error(**overrides) -> FlagError:
    with pytest.raises(FlagError) as error:
        config.make_config(**overrides)
    message = str(error.value)
    assert message.startswith(f"--{error.value.flag}: ") and "\n" not in message
    return error.value


def test_defaults_resolve_every_derived_fact(tmp_path):
    c = config.make_config(**SYNTHETIC, model_dir=str(tmp_path))
    steps_per_epoch = sources.SOURCES["synthetic"].train_examples // 4096
    assert c.steps_per_epoch == steps_per_epoch == 312
    assert c.train_steps == round(3 * 312) and c.warmup_steps == round(0.5 * 312)
    assert c.peak_learning_rate == pytest.approx(0.4 * 4096 / 256)
    assert (c.data.image_size, c.data.channels, c.data.num_classes) == (224, 3, 10)
    assert c.augmentation == "none" and c.replicas == 1
    assert c.checkpoint_every_steps == 312 and c.eval_every_steps == 0
    assert c.lr_decay_steps == (30 * 312, 60 * 312, 80 * 312)
    assert c.model_dir == str(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train_steps = 1


@pytest.mark.parametrize(
    "overrides, flag, allowed",
    [
        ({"global_batch_size": -8}, "global_batch_size", "not a positive integer"),
        ({"global_batch_size": 0}, "global_batch_size", "not a positive integer"),
        ({"train_steps": -1}, "train_steps", "not a positive integer"),
        ({"train_epochs": 0}, "train_epochs", "> 0"),
        ({"train_epochs": NAN}, "train_epochs", "> 0"),
        ({"train_epochs": INF}, "train_epochs", "> 0"),
        ({"image_size": 0}, "image_size", "not a positive integer"),
        ({"base_learning_rate": 0}, "base_learning_rate", "> 0"),
        ({"base_learning_rate": NAN}, "base_learning_rate", "> 0"),
        ({"base_learning_rate": INF}, "base_learning_rate", "> 0"),
        ({"momentum": 1.0}, "momentum", "in [0, 1)"),
        ({"momentum": 1.5}, "momentum", "in [0, 1)"),
        ({"momentum": NAN}, "momentum", "in [0, 1)"),
        ({"weight_decay": -1e-4}, "weight_decay", ">= 0"),
        ({"weight_decay": NAN}, "weight_decay", ">= 0"),
        ({"trust_coefficient": NAN}, "trust_coefficient", "> 0"),
        ({"trust_coefficient": 0}, "trust_coefficient", "> 0"),
        ({"epsilon": INF}, "epsilon", ">= 0"),
        ({"poly_power": -1}, "poly_power", "> 0"),
        ({"end_learning_rate": NAN}, "end_learning_rate", ">= 0"),
        ({"warmup_epochs": NAN}, "warmup_epochs", ">= 0"),
        ({"label_smoothing": 1.0}, "label_smoothing", "in [0, 1)"),
        ({"lr_decay_factor": 0}, "lr_decay_factor", "in (0, 1]"),
        ({"epochs_between_evals": INF}, "epochs_between_evals", ">= 0"),
        ({"steps_per_loop": 0}, "steps_per_loop", "not a positive integer"),
        ({"max_nonfinite_steps": 0}, "max_nonfinite_steps", "not a positive integer"),
        ({"seed": -1}, "seed", "in the range [0, 2147483647]"),
        ({"seed": 2**31}, "seed", "in the range [0, 2147483647]"),
        ({"global_batch_size": 2.5}, "global_batch_size", "int"),
        ({"lr_decay_epochs": "60,30"}, "lr_decay_epochs", "increasing"),
        ({"lr_decay_epochs": "a"}, "lr_decay_epochs", "numbers"),
        ({"lr_decay_epochs": "30,nan"}, "lr_decay_epochs", ">= 0"),
    ],
)
def test_bad_number_names_the_flag_and_its_range(overrides, flag, allowed):
    error = _error(**SYNTHETIC, **overrides)
    assert error.flag == flag and allowed in str(error)


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"warmup_epochs": 5, "train_epochs": 5}, "warmup_epochs"),
        ({"warmup_epochs": 6, "train_epochs": 5}, "warmup_epochs"),
        # 100 is not divisible by 3 replicas.
        (
            {"strategy": "mirrored", "num_cpu_devices": 3, "global_batch_size": 100},
            "global_batch_size",
        ),
        ({"strategy": "tpu"}, "tpu"),
        ({"strategy": "multi_worker", "model_dir": "/tmp/x"}, "strategy"),
        ({"strategy": "one_device", "num_cpu_devices": 2}, "num_cpu_devices"),
        ({"num_cpu_devices": 2}, "num_cpu_devices"),  # The default strategy.
        ({"source": "tfds"}, "tfds_name"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"model": "vgg16"}, "model"),  # Checked last: needs the Keras import.
        ({"model": "alexnet", "image_size": 32}, "image_size"),
        ({"data_service": "host"}, "data_service"),
        ({"data_service": "grpc://host:0"}, "data_service"),
        ({"data_service": "host:5050", "deterministic": True}, "data_service"),
        ({"jit_compile": True, "deterministic": True}, "jit_compile"),
        ({"nesterov": True, "optimizer": "lamb"}, "nesterov"),
        ({"nesterov": True, "momentum": 0}, "nesterov"),
    ],
)
def test_bad_combination_is_named(overrides, flag, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert _error(**{**SYNTHETIC, **overrides}).flag == flag


@pytest.mark.parametrize(
    "lr_scaling, peak",
    [("linear", 0.4 * 4096 / 256), ("sqrt", 0.4 * 4.0), ("none", 0.4)],
)
def test_peak_rate_is_scaled_from_the_base_batch(lr_scaling, peak, tmp_path):
    c = config.make_config(**SYNTHETIC, lr_scaling=lr_scaling, model_dir=str(tmp_path))
    assert c.peak_learning_rate == pytest.approx(peak, rel=1e-12)


def test_record_keeps_the_data_facts_at_the_top_level(tmp_path):
    c = config.make_config(**SYNTHETIC, image_size=32, model_dir=str(tmp_path))
    record = json.loads(json.dumps(c.to_dict()))
    assert (record["source"], record["image_size"], record["num_classes"]) == (
        "synthetic",
        32,
        10,
    )
    assert record["channels"] == 3 and record["train_examples"] == 1_281_167
    assert record["mean"] == list(sources.IMAGENET_MEAN_RGB)
    assert record["model_dir"] == str(tmp_path) and record["momentum"] == 0.9


def test_data_service_address_is_kept_as_host_port(tmp_path):
    c = config.make_config(
        **SYNTHETIC, data_service="grpc://10.0.0.2:5050", model_dir=str(tmp_path)
    )
    assert c.data_service == "10.0.0.2:5050"
    assert config.make_config(**SYNTHETIC, model_dir=str(tmp_path)).data_service is None


def test_unknown_model_lists_the_builders():
    from train import models

    message = str(_error(**SYNTHETIC, model="vgg16"))
    assert all(name in message for name in models.MODEL_NAMES)
    assert models.MODEL_NAMES == tuple(models._BUILDERS)


def test_warmup_and_batch_are_checked_against_the_dataset_size(tmp_path):
    # ImageNet-sized synthetic data: 1,281,167 training images, 1251 steps
    # per epoch at batch 1024; 0.4 epochs of warm-up = 500 steps.
    base = {**SYNTHETIC, "model_dir": str(tmp_path), "warmup_epochs": 0.4}
    error = _error(**base, global_batch_size=1024, train_steps=500)
    assert error.flag == "warmup_epochs"
    c = config.make_config(**base, global_batch_size=1024, train_steps=501)
    assert (c.train_steps, c.warmup_steps) == (501, 500)
    error = _error(**base, global_batch_size=2_000_000)
    assert error.flag == "global_batch_size" and "exceeds" in str(error)


def test_batch_must_divide_over_the_workers_of_tf_config(monkeypatch):
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster}))
    args = {**SYNTHETIC, "strategy": "multi_worker", "model_dir": "/tmp/x"}
    assert _error(**args, global_batch_size=64).flag == "global_batch_size"
    assert config.make_config(**args, global_batch_size=96).replicas is None


def test_multi_worker_needs_a_model_dir(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}}))
    assert _error(**SYNTHETIC, strategy="multi_worker").flag == "model_dir"


def test_model_dir_that_cannot_be_a_writable_folder_is_named(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for path in (a_file, a_file / "below"):
        error = _error(**SYNTHETIC, model_dir=str(path))
        assert error.flag == "model_dir" and f"{a_file} is a file" in str(error)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # Root writes anywhere: use a read-only mount.
        locked = "/proc/sys"
        if os.access(locked, os.W_OK):
            pytest.skip("no unwritable folder on this machine")
    error = _error(**SYNTHETIC, model_dir=os.path.join(locked, "run"))
    assert f"{locked} is not writable" in str(error)


def test_explicit_data_dir_never_falls_back_to_synthetic_data(tmp_path):
    with pytest.raises(UserError, match=f"--data_dir={tmp_path}: no known data"):
        config.make_config(data_dir=str(tmp_path))
    missing = tmp_path / "missing"
    with pytest.raises(UserError, match=f"--data_dir={missing}: no such folder"):
        config.make_config(source="mnist", data_dir=str(missing))


def test_loop_stops_at_every_event(tmp_path):
    from train import trainer

    c = dataclasses.replace(
        config.make_config(**SYNTHETIC, model_dir=str(tmp_path)),
        steps_per_epoch=12,
        train_steps=30,
        checkpoint_every_steps=9,
        eval_every_steps=0,
        steps_per_loop=7,
        log_every_steps=5,
    )
    stops, step = [], 0
    while step < c.train_steps:
        step = trainer.next_stop(step, c)
        stops.append(step)
    # Multiples of 5 (log), 12 (epoch), 9 (checkpoint), the end, and at most
    # 7 steps apart.
    assert stops == [5, 9, 10, 12, 15, 18, 20, 24, 25, 27, 30]


# ----------------------------------------------------------------------------
# A model folder reused with other settings


def test_resume_with_the_same_or_a_cosmetic_change_passes(tmp_path):
    c = config.make_config(**SYNTHETIC, model_dir=str(tmp_path))
    config.check_resume(c, config.run_record(c))
    cosmetic = config.make_config(
        **SYNTHETIC,
        model_dir=str(tmp_path),
        log_every_steps=7,
        steps_per_loop=3,
        checkpoint_every_steps=5,
        epochs_between_evals=1,
        keep_checkpoints=9,
    )
    config.check_resume(cosmetic, config.run_record(c))


@pytest.mark.parametrize(
    "changed, line",
    [
        ({"global_batch_size": 8192}, "--global_batch_size: 4096 -> 8192"),
        ({"optimizer": "sgd"}, "--optimizer: lars -> sgd"),
        ({"momentum": 0.8}, "--momentum: 0.9 -> 0.8"),
        ({"seed": 1}, "--seed: 0 -> 1"),
        ({"precision": "mixed_bfloat16"}, "--precision: float32 -> mixed_bfloat16"),
        ({"train_steps": 2000}, "--train_steps/--train_epochs: 900 -> 2000"),
        ({"image_size": 32}, "--image_size: 224 -> 32"),
        ({"cache": True}, "--cache: False -> True"),
    ],
)
def test_resume_with_another_meaning_names_each_change(tmp_path, changed, line):
    base = {**SYNTHETIC, "model_dir": str(tmp_path), "train_steps": 900}
    old = config.make_config(**base)
    new = config.make_config(**{**base, **changed})
    with pytest.raises(UserError) as error:
        config.check_resume(new, config.run_record(old))
    lines = str(error.value).splitlines()
    assert lines[0].startswith(f"--model_dir={tmp_path} holds a run with other")
    assert lines[1:] == [line]


def test_step_schedule_run_may_be_extended(tmp_path):
    args = {**SYNTHETIC, "model_dir": str(tmp_path), "lr_schedule": "step"}
    old = config.make_config(**args, train_epochs=3)
    config.check_resume(
        config.make_config(**args, train_epochs=6), config.run_record(old)
    )


def test_default_model_dirs_of_one_second_differ():
    names = {config.default_model_dir("m") for _ in range(50)}
    assert len(names) == 50


# ----------------------------------------------------------------------------
# The command line


def test_bad_flag_fails_fast_with_one_line_and_no_tensorflow(tmp_path):
    (tmp_path / "keep").write_text("x")
    before = sorted(os.listdir(tmp_path))
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['train.main', '--momentum=nan', '--model_dir={tmp_path}']\n"
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
        "train.main: error: flag --momentum=nan: must be a finite number in "
        "[0, 1). Received: nan"
    ]
    assert sorted(os.listdir(tmp_path)) == before


def _command_line_error(monkeypatch, capsys, *argv: str) -> str:
    """What train.main prints when its flag parsing fails (exit status 2)."""
    from train import main

    flag_values = flags.FlagValues()
    config.define_flags(flag_values)
    monkeypatch.setattr(flags, "FLAGS", flag_values)
    with pytest.raises(SystemExit) as exit:
        main.parse_flags(["train.main", *argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("train.main: error: ") and err.count("\n") == 1
    return err


def test_cpu_split_without_mirrored_names_both_flags(monkeypatch, capsys):
    err = _command_line_error(monkeypatch, capsys, "--num_cpu_devices=2")
    assert "--num_cpu_devices" in err and "--strategy=mirrored" in err
    assert "strategy=default" in err


def test_missing_flagfile_is_one_clean_line(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "missing.flags"
    err = _command_line_error(monkeypatch, capsys, f"--flagfile={missing}")
    assert err.startswith("train.main: error: Unable to open flagfile: ")
    assert str(missing) in err and "ERROR" not in err


def test_every_bad_flag_is_named_on_one_line(monkeypatch, capsys):
    args = ("--momentum=nan", "--train_epochs=0")
    err = _command_line_error(monkeypatch, capsys, *args)
    assert "flag --momentum=nan: must be a finite number in [0, 1)" in err
    assert "flag --train_epochs=0.0: must be a finite number > 0" in err
