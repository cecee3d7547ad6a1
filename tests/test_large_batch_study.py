"""Tests of experiments/large_batch_study.py: one tiny real run, resumption, report."""

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys

import pytest

import train
from experiments import large_batch_study as study

MNIST_DIR = os.path.join(train.shared_data_dir(), "mnist")


def _run_config(**fields) -> study.RunConfig:
    """A RunConfig of small_alexnet_bn on MNIST, base batch 128, with `fields`."""
    defaults = dict(
        part="mnist",
        model="small_alexnet_bn",
        optimizer="sgd",
        batch_size=128,
        base_lr=0.0,
        base_batch_size=128,
        epochs=2,
        warmup_epochs=1.0,
        seed=0,
    )
    return study.RunConfig(**{**defaults, **fields})


def _fake_summary(config: study.RunConfig, data_dir) -> dict:
    """In place of ``train_one``: a finished run's summary, without training."""
    return {
        "run_id": config.run_id,
        "final_val_top1": 0.5,
        "diverged": False,
        "wall_time_s": 1.0,
    }


def _run_study(*flags: str) -> subprocess.CompletedProcess:
    """``python -m experiments.large_batch_study`` with ``flags``, from the
    repository root; its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "experiments.large_batch_study", *flags],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "flags, line",
    [
        (
            ["--optimizers=adam"],
            "--optimizers: unknown ['adam']; allowed: sgd, lars, nesterov, lamb",
        ),
        (["--fixed_base_lr=0.1"], "--fixed_base_lr: needs --warmup_epochs"),
    ],
)
def test_bad_study_flags_are_a_one_line_usage_error(flags, line):
    result = _run_study(*flags, "--dry_run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line]


def test_missing_imagenette_records_are_a_one_line_usage_error(tmp_path):
    result = _run_study(
        "--part=imagenette32", f"--part_data_dir={tmp_path}", "--dry_run"
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"--data_dir={tmp_path}: no ImageNet TFRecords")
    assert "Traceback" not in result.stderr


def test_fair_report_measures_longer_runs_against_the_shorter_base():
    """Larger batches trained 10 epochs (--base_epochs=3): their gap is to the
    3-epoch base batch, not to the best of their own rows."""
    template = _fair_template()
    summaries = []
    for batch, epochs, seed, test in [
        (128, 3, 0, 0.990),
        (128, 3, 1, 0.992),
        (8192, 10, 0, 0.985),
        (8192, 10, 1, 0.983),
    ]:
        config = dataclasses.replace(
            template, batch_size=batch, epochs=epochs, base_lr=0.05, seed=seed
        )
        summaries.append(
            {
                "run_id": config.run_id,
                "config": dataclasses.asdict(config),
                "peak_lr": config.peak_lr,
                "final_val_top1": 0.99,
                "final_test_top1": test,
                "diverged": False,
                "wall_time_s": 1.0,
            }
        )
    report = study.write_fair_report(summaries)
    # 8192 at 10 epochs: mean 98.40, 0.70 below the 3-epoch base's 99.10.
    assert "| 8192 | sgd | 1 | 0.05 | 3.2 | 0 | 99.00 | 98.40 ± 0.14 | 2 | -0.70 |" in (
        report
    )
    assert "gap to base (points; base: 3 epochs)" in report


@pytest.mark.skipif(
    not os.path.exists(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason=f"MNIST IDX files not found in {MNIST_DIR} (set LARS_TF_DATA_DIR)",
)
def test_tiny_run_writes_its_summary_and_a_rerun_skips_it(tmp_path, monkeypatch):
    config = _run_config(
        optimizer="lars",
        batch_size=64,
        base_lr=1.0,
        epochs=2,
        warmup_epochs=0.5,
        train_examples=128,
        precise_bn=True,
        validation=True,
    )
    assert study.run_if_missing(config, str(tmp_path), MNIST_DIR)

    path = tmp_path / "runs" / f"{config.run_id}.json"
    summary = json.loads(path.read_text())
    assert summary["config"] == dataclasses.asdict(config)
    assert summary["steps_per_epoch"] == 2  # 128 examples // batch 64
    assert summary["train_steps"] == 4
    assert summary["peak_lr"] == pytest.approx(0.5)  # 1.0 * 64 / 128
    # MNIST's 60,000 training images less 10% held out; its 10,000 test images.
    assert (summary["val_examples"], summary["test_examples"]) == (6000, 10000)
    assert len(summary["val_top1_per_epoch"]) == 2
    assert len(summary["train_loss_per_epoch"]) == 2
    # The last epoch's evaluation used the moving averages; the final figures
    # the recomputed BN statistics.
    assert summary["final_val_top1_moving_bn"] == summary["val_top1_per_epoch"][-1]
    assert config.run_id.endswith("_pbn_val")
    assert 0.0 <= summary["final_val_top1"] <= summary["best_val_top1"] <= 1.0
    assert 0.0 <= summary["final_test_top1"] <= 1.0
    assert "final_top1" not in summary and "test_top1_per_epoch" not in summary
    assert isinstance(summary["diverged"], bool) and summary["nonfinite_steps"] == 0
    assert summary["wall_time_s"] > 0

    def must_not_train(*args):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study, "train_one", must_not_train)
    assert not study.run_if_missing(config, str(tmp_path), MNIST_DIR)
    assert [s["run_id"] for s in study.load_summaries(str(tmp_path))] == [config.run_id]


# ----------------------------------------------------------------------------
# The fair protocol


def _fair_template():
    return _run_config(
        epochs=3,
        warmup_epochs=0.0,
        model_params=10,
        precise_bn=True,
        validation=True,
    )


def _fake_fair_runner(val_top1_of):
    """(run, load, ran): ``run`` records a config and a summary whose held-out
    top-1 is ``val_top1_of(config)`` and whose test top-1 is its opposite, so a
    selection that read the test set would pick the worst setting."""
    finished, ran = {}, []

    def run(config):
        ran.append(config)
        value = val_top1_of(config)
        finished[config.run_id] = {
            "run_id": config.run_id,
            "config": dataclasses.asdict(config),
            "peak_lr": config.peak_lr,
            "final_val_top1": value,
            "final_test_top1": 1.0 - value,
            "diverged": False,
            "wall_time_s": 1.0,
        }

    return run, lambda: list(finished.values()), ran


def test_fair_protocol_chooses_on_the_held_out_split_with_equal_budgets():
    def val_top1_of(config):
        # Best at 0.05 for the base batch; at 8192 best below square-root
        # scaling (0.05 / 8), so the grid extends past its low edge; the longer
        # warm-up helps at 8192 only.
        best = 0.05 if config.batch_size == 128 else 0.003
        score = 0.9 - 0.01 * abs(math.log(config.base_lr / best))
        if config.batch_size == 8192 and config.warmup_epochs == 2.0:
            score += 0.005
        return score + 0.001 * config.seed

    run, load, ran = _fake_fair_runner(val_top1_of)
    chosen = study.run_fair_protocol(
        _fair_template(), [128, 8192], ["sgd"], (1.0, 2.0), (1, 2), run, load
    )
    got = [(c.batch_size, c.base_lr, c.warmup_epochs, c.seed) for c in ran]
    assert got == [
        (128, 0.0125, 1.0, 0),
        (128, 0.05, 1.0, 0),
        (128, 0.2, 1.0, 0),
        (128, 0.05, 2.0, 0),  # The best rate with the longer warm-up.
        (128, 0.05, 1.0, 1),
        (128, 0.05, 1.0, 2),
        # 0.05 * 64**-0.5, 0.05 * 64**-0.25 (4 digits), 0.05: sqrt to linear.
        (8192, 0.00625, 1.0, 0),
        (8192, 0.01768, 1.0, 0),
        (8192, 0.05, 1.0, 0),
        (8192, 0.002209, 1.0, 0),  # One step (x 0.00625 / 0.01768) past the edge.
        (8192, 0.002209, 2.0, 0),
        (8192, 0.002209, 2.0, 1),
        (8192, 0.002209, 2.0, 2),
    ]
    assert chosen[(128, "sgd")].base_lr == 0.05
    assert chosen[(128, "sgd")].warmup_epochs == 1.0
    assert (chosen[(8192, "sgd")].base_lr, chosen[(8192, "sgd")].warmup_epochs) == (
        0.002209,
        2.0,
    )


def _val_top1_with_low_edge(config):
    """Best at 0.05 for the base batch; at 8192 below square-root scaling, so
    the grid extends past its low edge; the longer warm-up helps at 8192."""
    best = 0.05 if config.batch_size == 128 else 0.003
    score = 0.9 - 0.01 * abs(math.log(config.base_lr / best))
    if config.batch_size == 8192 and config.warmup_epochs == 2.0:
        score += 0.005
    return score + 0.001 * config.seed


def test_report_replays_the_budget_and_marks_the_runs_outside_it():
    run, load, _ = _fake_fair_runner(_val_top1_with_low_edge)
    template = _fair_template()
    study.run_fair_protocol(
        template, [128, 8192], ["sgd"], (1.0, 2.0), (1, 2), run, load
    )
    # Outside: a rate past the extended edge, and the base retrained 10 epochs.
    study.run_fair_protocol(
        template, [8192], ["sgd"], (), (1, 2), run, load, (0.0008, 2.0)
    )
    longer = dataclasses.replace(template, epochs=10)
    study.run_fair_protocol(longer, [128], ["sgd"], (), (), run, load, (0.05, 1.0))
    summaries = load()
    in_budget, _, _ = study.replay_budget(summaries)
    key = lambda s: tuple(  # noqa: E731
        s["config"][k] for k in ("batch_size", "base_lr", "warmup_epochs", "seed")
    )
    # The 13 runs the rule asks for, listed by hand (as in the test above).
    assert sorted(key(s) for s in summaries if s["run_id"] in in_budget) == sorted(
        [(128, rate, 1.0, 0) for rate in (0.0125, 0.05, 0.2)]
        + [(128, 0.05, 2.0, 0), (128, 0.05, 1.0, 1), (128, 0.05, 1.0, 2)]
        + [(8192, rate, 1.0, 0) for rate in (0.00625, 0.01768, 0.05, 0.002209)]
        + [(8192, 0.002209, 2.0, seed) for seed in (0, 1, 2)]
    )
    assert len(summaries) - len(in_budget) == 4
    report = study.write_fair_report(summaries, 0, in_budget)
    # Test top-1 is 1 - held-out: 8192 (0.002209, 2 warm-up epochs) gives
    # 9.81, 9.71, 9.61 over seeds 0-2 (seeds 1-2: 9.66), the base (0.05, 1)
    # 10.0, 9.9, 9.8 (seeds 1-2: 9.85): drops of 0.19 either way.
    assert "| 8192 | sgd | 9.71 ± 0.10 | 9.66 | sgd | 9.90 | -0.19 | -0.19 |" in report
    # 0.0008: held-out 0.9 - 0.01 * ln(0.003 / 0.0008) + 0.005 = 89.18 (seed 0).
    outside = report.split("e3_pbn: settings run outside the budget")[1]
    assert "| 8192 | sgd | 3 | 0.0008 | 0.0512 | 2 | 89.18 | 10.72 ± 0.10 | 3 |" in (
        outside
    )
    outside = report.split("e10_pbn: settings run outside the budget")[1]
    assert "| 128 | sgd | 10 | 0.05 | 0.05 | 1 | 90.00 | 10.00 | 1 |" in outside
    assert report.count("| **outside** |") == 4


def test_report_shows_the_selections_own_choice_when_warm_ups_tie():
    # Both warm-ups score the same at every rate: the selection keeps the
    # first in grid order (1 epoch) and repeats it with seeds 1-2.
    run, load, _ = _fake_fair_runner(
        lambda c: 0.9 - 0.01 * abs(math.log(c.base_lr / 0.05)) + 0.001 * c.seed
    )
    study.run_fair_protocol(
        _fair_template(), [128], ["sgd"], (1.0, 2.0), (1, 2), run, load
    )
    # Listed with the 2-epoch run first, as file names can sort.
    summaries = sorted(load(), key=lambda s: -s["config"]["warmup_epochs"])
    budget = study.replay_budget(summaries)
    report = study.write_fair_report(summaries, 0, *budget)
    # Warm-up 1, seeds 0-2: test 1 - held-out = 10.00, 9.90, 9.80.
    assert "| 128 | sgd | 4 | 0.05 | 0.05 | 1 | 90.00 | 9.90 ± 0.10 | 3 | +0.00 |" in (
        report
    )


def test_report_marks_the_runs_of_a_selection_still_waiting_as_pending():
    run, load, _ = _fake_fair_runner(_val_top1_with_low_edge)
    study.run_fair_protocol(
        _fair_template(), [128, 8192], ["sgd"], (1.0, 2.0), (1, 2), run, load
    )
    # 8192 waits for its runs at 2 warm-up epochs and seeds 1-2.
    summaries = [
        s
        for s in load()
        if s["config"]["batch_size"] == 128 or s["config"]["warmup_epochs"] == 1.0
    ]
    in_budget, pending, _ = study.replay_budget(summaries)
    by_batch = lambda ids: sorted(  # noqa: E731
        s["config"]["batch_size"] for s in summaries if s["run_id"] in ids
    )
    # The base's 3 rates, its second warm-up and seeds 1-2; 8192's 4 rates.
    assert by_batch(in_budget) == [128] * 6
    assert by_batch(pending) == [8192] * 4
    report = study.write_fair_report(summaries, 0, in_budget, pending)
    assert report.count("| pending |") == 4
    assert "**outside**" not in report and "outside the budget (in no" not in report


def test_report_writes_the_parts_markdown_from_its_jsons_only(tmp_path):
    run, load, _ = _fake_fair_runner(_val_top1_with_low_edge)
    study.run_fair_protocol(_fair_template(), [128], ["sgd"], (1.0,), (), run, load)
    other_part = dataclasses.replace(_fair_template(), part="imagenette32")
    study.run_fair_protocol(other_part, [64], ["lars"], (2.0,), (), run, load)
    runs = tmp_path / "study" / "runs"
    runs.mkdir(parents=True)
    for summary in load():
        (runs / f"{summary['run_id']}.json").write_text(json.dumps(summary))
    markdown = study.write_report(
        str(tmp_path / "study"), str(tmp_path / "results"), "mnist", seed=0
    )
    assert (tmp_path / "results" / "mnist.md").read_text() == markdown + "\n"
    assert "| 128 | sgd |" in markdown and "| 64 | lars |" not in markdown
    with pytest.raises(FileNotFoundError, match="no imagenette runs"):
        study.write_report(str(tmp_path / "study"), str(tmp_path), "imagenette", 0)


def test_nesterov_scales_the_base_batch_choice_of_sgd():
    run, load, ran = _fake_fair_runner(lambda c: 0.9 if c.base_lr == 0.2 else 0.8)
    chosen = study.run_fair_protocol(
        _fair_template(), [128, 8192], ["sgd"], (1.0,), (), run, load
    )
    assert chosen[(128, "sgd")].base_lr == 0.2
    del ran[:]
    study.run_fair_protocol(
        _fair_template(), [8192], ["nesterov"], (1.0,), (), run, load
    )
    # 0.2 * 64**-0.5, 0.2 * 64**-0.25, 0.2, then past the top edge; SGD's base
    # runs are reused (skipped by a real run), no Nesterov run at 128.
    nesterov = [(c.batch_size, c.base_lr) for c in ran if c.optimizer == "nesterov"]
    assert nesterov == [(8192, 0.025), (8192, 0.07071), (8192, 0.2), (8192, 0.5657)]


def test_fixed_setting_runs_every_seed_without_selection():
    run, load, ran = _fake_fair_runner(lambda c: 0.9)
    chosen = study.run_fair_protocol(
        _fair_template(), [8192], ["nesterov"], (1.0,), (1, 2), run, load, (0.01, 2.0)
    )
    assert [(c.base_lr, c.warmup_epochs, c.seed) for c in ran] == [
        (0.01, 2.0, 0),
        (0.01, 2.0, 1),
        (0.01, 2.0, 2),
    ]
    assert chosen[(8192, "nesterov")].base_lr == 0.01


def test_base_epochs_trains_the_base_batch_shorter_than_the_others():
    run, load, ran = _fake_fair_runner(lambda c: 0.9 if c.base_lr == 0.2 else 0.8)
    template = dataclasses.replace(_fair_template(), epochs=10)
    study.run_fair_protocol(
        template, [8192], ["sgd"], (1.0,), (), run, load, base_epochs=3
    )
    assert {(c.batch_size, c.epochs) for c in ran} == {(128, 3), (8192, 10)}
    # The larger batch's grid still scales the (3-epoch) base batch's choice.
    assert [c.base_lr for c in ran if c.batch_size == 8192][:3] == [
        0.025,
        0.07071,
        0.2,
    ]


def test_fair_protocol_dry_run_stops_where_results_are_missing():
    ran = []
    chosen = study.run_fair_protocol(
        _fair_template(), [128, 8192], ["lars"], (1.0, 2.0), (1,), ran.append, list
    )
    assert [c.base_lr for c in ran] == [1.0, 4.0, 16.0]  # Only the first stage.
    assert chosen == {(128, "lars"): None, (8192, "lars"): None}


def test_fair_summary_reports_test_only_for_the_setting_chosen_on_validation():
    template = _fair_template()
    summaries = []
    for optimizer, batch, rate, seed, val, test in [
        ("sgd", 128, 0.05, 0, 0.990, 0.9900),
        ("sgd", 128, 0.05, 1, 0.991, 0.9920),
        ("sgd", 128, 0.2, 0, 0.980, 0.9990),  # Best on test: must not count.
        ("lars", 8192, 0.5, 0, 0.985, 0.9800),
        ("lars", 8192, 0.5, 1, 0.984, 0.9700),
        ("lars", 8192, 0.5, 2, 0.983, 0.9600),
        ("lars", 8192, 2.0, 0, 0.600, 0.6000),
    ]:
        config = dataclasses.replace(
            template,
            optimizer=optimizer,
            batch_size=batch,
            base_lr=rate,
            warmup_epochs=1.0,
            seed=seed,
        )
        summaries.append(
            {
                "run_id": config.run_id,
                "config": dataclasses.asdict(config),
                "peak_lr": config.peak_lr,
                "final_val_top1": val,
                "final_test_top1": test,
                "diverged": False,
                "wall_time_s": 1.0,
            }
        )
    rows = study.fair_summary_table(summaries).splitlines()
    # SGD at 128: tests 99.00 and 99.20 -> mean 99.10, sample std 0.14.
    assert (
        rows[2]
        == "| 128 | sgd | 2 | 0.05 | 0.05 | 1 | 99.00 | 99.10 ± 0.14 | 2 | +0.00 |"
    )
    # LARS at 8192: tests 98, 97, 96 -> 97.00 ± 1.00, 2.10 points below 99.10.
    assert (
        rows[3]
        == "| 8192 | lars | 2 | 0.5 | 32 | 1 | 98.50 | 97.00 ± 1.00 | 3 | -2.10 |"
    )
    assert "99.90" not in study.fair_runs_table(summaries)  # No test column.


@pytest.mark.skipif(
    not os.path.exists(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason=f"MNIST IDX files not found in {MNIST_DIR} (set LARS_TF_DATA_DIR)",
)
def test_tiny_nesterov_and_lamb_runs_train_through_the_app(tmp_path):
    for optimizer, base_lr in (("nesterov", 0.05), ("lamb", 0.004)):
        config = dataclasses.replace(
            _fair_template(),
            optimizer=optimizer,
            batch_size=64,
            base_lr=base_lr,
            epochs=1,
            warmup_epochs=0.5,
            model_params=0,
            train_examples=128,
        )
        assert study.run_if_missing(config, str(tmp_path), MNIST_DIR)
    for summary in study.load_summaries(str(tmp_path)):
        assert len(summary["val_top1_per_epoch"]) == 1
        # Precise BN changed the figures the moving averages gave.
        assert summary["final_val_top1"] != summary["final_val_top1_moving_bn"]
        assert 0.0 <= summary["final_test_top1"] <= 1.0


@pytest.mark.skipif(
    not os.path.exists(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason=f"MNIST IDX files not found in {MNIST_DIR} (set LARS_TF_DATA_DIR)",
)
def test_a_run_the_app_stops_for_non_finite_steps_counts_as_chance(tmp_path):
    config = dataclasses.replace(
        _fair_template(),
        batch_size=64,
        base_lr=1e9,  # Non-finite within a few steps: the app stops after 3.
        epochs=2,
        model_params=0,
        train_examples=256,
    )
    assert study.run_if_missing(config, str(tmp_path), MNIST_DIR)
    (summary,) = study.load_summaries(str(tmp_path))
    assert summary["loss_not_finite"] and summary["diverged"]
    assert summary["final_val_top1"] == summary["final_test_top1"] == 0.1


def _git_here(*args: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        ["git", "-C", root, *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(
    not os.path.exists(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason=f"MNIST IDX files not found in {MNIST_DIR} (set LARS_TF_DATA_DIR)",
)
def test_a_fixed_setting_run_records_its_software_command_and_budget(tmp_path):
    """A --fixed_base_lr check, through the command line: its JSON names the
    commit, the versions, the command, and that it is outside the budget."""
    flags = [
        "--precise_bn",
        "--optimizers=lamb",
        "--batch_sizes=64",
        "--fixed_base_lr=0.004",
        "--warmup_epochs=0.5",
        "--epochs=1",
        "--repeat_seeds=",
        "--train_examples=128",
        f"--output_dir={tmp_path}",
        f"--data_dir={train.shared_data_dir()}",
    ]
    status_before = _git_here("status", "--porcelain", "--untracked-files=no")
    result = _run_study(*flags)
    assert result.returncode == 0, result.stderr[-2000:]
    (summary,) = study.load_summaries(str(tmp_path))
    assert summary["git_commit"] == _git_here("rev-parse", "HEAD")
    if status_before == _git_here("status", "--porcelain", "--untracked-files=no"):
        assert summary["git_clean"] is (status_before == "")
    assert summary["python"] == platform.python_version()
    import keras
    import tensorflow as tf

    assert (summary["tensorflow"], summary["keras"]) == (
        tf.__version__,
        keras.__version__,
    )
    command = "python -m experiments.large_batch_study " + " ".join(flags)
    assert summary["command"] == command
    assert summary["in_budget"] is False


def test_a_run_of_the_budget_rule_records_that_it_is_inside(tmp_path, monkeypatch):
    config = dataclasses.replace(_fair_template(), base_lr=0.05, warmup_epochs=1.0)
    monkeypatch.setattr(study, "train_one", _fake_summary)
    record = study.run_record(["python", "-m", "experiments.large_batch_study"], True)
    assert study.run_if_missing(config, str(tmp_path), None, record)
    (summary,) = study.load_summaries(str(tmp_path))
    assert summary["in_budget"] is True
    assert summary["command"] == "python -m experiments.large_batch_study"
    assert summary["git_commit"] == _git_here("rev-parse", "HEAD")


@pytest.mark.parametrize("image_size, side", [(32, 37), (64, 74), (224, 256)])
def test_stored_side_is_the_smallest_whose_seven_eighths_crop_is_the_size(
    image_size, side
):
    # By hand: int(0.875 * 37) = 32 while int(0.875 * 36) = 31; 74 -> 64 and
    # 73 -> 63; 256 -> 224 and 255 -> 223.
    assert study.stored_image_size(image_size) == side


def test_drop_difference_by_hand():
    # Means 72, 62 (SGD) and 72, 70 (LARS): D = 10 - 2 = 8 points. Sample
    # variances 4, 4, 1, 1 over 3 seeds: SE = sqrt(10/3); Welch-Satterthwaite
    # df = (10/3)**2 / ((16/9 + 16/9 + 1/9 + 1/9) / 2) = 200/34.
    result = study.drop_difference(
        [0.70, 0.72, 0.74], [0.60, 0.62, 0.64], [0.71, 0.72, 0.73], [0.69, 0.70, 0.71]
    )
    assert result["D"] == pytest.approx(8.0)
    assert result["se"] == pytest.approx(math.sqrt(10 / 3))
    assert result["df"] == pytest.approx(200 / 34)
    # The t quantile at 5.88 df lies between the tables' 2.4469 (6) and 2.5706 (5).
    assert 2.4469 < (result["high"] - 8.0) / result["se"] < 2.5706
    assert result["low"] == pytest.approx(16.0 - result["high"])
    assert result["verdict"] == "supported" and result["p"] < 0.01
    same = [0.700, 0.702, 0.704]
    assert study.drop_difference(same, same, same, same)["verdict"] == "contradicted"
    wide = [0.60, 0.70, 0.80]
    assert study.drop_difference(wide, same, same, same)["verdict"] == "not shown"


def test_a_run_another_process_trains_is_skipped_then_trained_once_free(
    tmp_path, monkeypatch, caplog
):
    from train import model_folder

    config = dataclasses.replace(_fair_template(), base_lr=0.05, warmup_epochs=1.0)
    runs_dir = tmp_path / "runs"
    # flock conflicts between two opens of the file, in one process too.
    held = model_folder.lock(str(runs_dir), f"{config.run_id}.lock")

    def must_not_train(*args):
        raise AssertionError("a run another process holds was trained")

    monkeypatch.setattr(study, "train_one", must_not_train)
    with caplog.at_level("INFO"):
        assert not study.run_if_missing(config, str(tmp_path), None)
    assert f"--output_dir={runs_dir} is in use by another run (pid" in caplog.text
    assert study.load_summaries(str(tmp_path)) == []
    held.release()

    monkeypatch.setattr(study, "train_one", _fake_summary)
    assert study.run_if_missing(config, str(tmp_path), None)
    assert [s["run_id"] for s in study.load_summaries(str(tmp_path))] == [config.run_id]
    assert sorted(os.listdir(runs_dir)) == [f"{config.run_id}.json"]  # No lock left.


def test_a_json_that_cannot_be_written_exits_2_with_the_summary_on_stderr(
    tmp_path, monkeypatch, capsys
):
    import errno

    config = dataclasses.replace(_fair_template(), base_lr=0.05, warmup_epochs=1.0)
    monkeypatch.setattr(study, "train_one", _fake_summary)

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(study.os, "replace", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        study.run_if_missing(config, str(tmp_path), None)
    assert exit_info.value.code == 2
    summary_line, message = capsys.readouterr().err.strip().split("\n")
    assert json.loads(summary_line)["run_id"] == config.run_id
    path = tmp_path / "runs" / f"{config.run_id}.json"
    assert message.startswith(f"{path}: cannot write the run's JSON (No space left")
    assert os.listdir(tmp_path / "runs") == []  # No partial file, no lock.
