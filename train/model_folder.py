"""The model folder of a run: its run record, summary and checkpoints.

`trainer.run` calls these in order: `check` (the folder's run must be the one
asked for), `prepare` (the folder and its run record), `make_manager` and
`restore_latest` (the checkpoints), `save` between loops.
"""

import json
import os
import shutil

import tensorflow as tf

from train import config as config_lib
from train.config import Config

SUMMARY_FILE = "summary.json"


def read_summary(model_dir: str) -> dict | None:
    """The summary.json of the folder's run, if it has one."""
    path = os.path.join(model_dir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def check(config: Config) -> tuple[dict | None, dict | None]:
    """The folder's run record and summary (None where absent).

    Raises:
      train.UserError: the folder holds another run.
    """
    record = config_lib.read_run_record(config.model_dir)
    if record is not None:
        config_lib.check_resume(config, record)
    return record, read_summary(config.model_dir)


def prepare(config: Config, record: dict | None, chief: bool) -> None:
    """Creates the folder and writes its run record (on the chief only)."""
    if not chief:
        return
    model_dir = config.model_dir
    if config.flags.get("model_dir"):
        os.makedirs(model_dir, exist_ok=True)
    elif not os.path.isdir(model_dir):  # A fresh default name: never shared.
        os.makedirs(os.path.dirname(model_dir), exist_ok=True)
        os.mkdir(model_dir)
    if record is None:
        config_lib.write_json(
            os.path.join(model_dir, config_lib.RUN_RECORD),
            config_lib.run_record(config),
        )


def make_manager(
    checkpoint: tf.train.Checkpoint,
    step_counter: tf.Variable,
    config: Config,
    strategy: tf.distribute.Strategy,
    chief: bool,
) -> tuple[tf.train.CheckpointManager, str]:
    """The checkpoint manager and the folder it writes to (a temporary one on
    a non-chief worker)."""
    model_dir = config.model_dir
    write_dir = model_dir if chief else worker_temp_dir(strategy, model_dir)
    manager = tf.train.CheckpointManager(
        checkpoint,
        write_dir,
        max_to_keep=config.keep_checkpoints,
        step_counter=step_counter,
    )
    return manager, write_dir


def restore_latest(checkpoint: tf.train.Checkpoint, model_dir: str) -> str | None:
    """Restores the folder's latest checkpoint, if any; returns its path."""
    latest = tf.train.latest_checkpoint(model_dir)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
    return latest


def worker_temp_dir(strategy: tf.distribute.Strategy, model_dir: str) -> str:
    """Where a non-chief worker writes its (discarded) copy of a checkpoint.

    Every worker must take part in saving (variables may be collective), but
    only the chief's copy is kept.
    """
    resolver = strategy.cluster_resolver
    return os.path.join(
        model_dir, f"workertemp_{resolver.task_type}_{resolver.task_id}"
    )


def save(
    manager: tf.train.CheckpointManager,
    chief: bool,
    write_dir: str,
    step: int,
    last_saved: int | None,
) -> int:
    """Saves a checkpoint numbered `step` unless it was the last saved; returns
    `step`. Every worker decides alike, since saving can be collective."""
    if step != last_saved:
        manager.save(checkpoint_number=step)
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    return step
