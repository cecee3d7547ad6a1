"""What a run leaves behind: its progress counters, the segment they make in
summary.json (each start of the run is one), and the trained model.keras."""

import dataclasses
import os
import time

import keras
import numpy as np

from train import config as config_lib
from train import model_folder
from train.config import Config

SUMMARY_FILE = model_folder.SUMMARY_FILE
MODEL_FILE = "model.keras"


@dataclasses.dataclass
class Progress:
    """What the host keeps between loops, from this start of the run."""

    start_step: int
    last_saved: int | None  # The same on every worker.
    wall_start: float  # When `trainer.run` was called.
    step: int = dataclasses.field(init=False)
    train_logs: dict = dataclasses.field(default_factory=dict)
    eval_logs: dict = dataclasses.field(default_factory=dict)  # Tuning split's.
    eval_step: int | None = None  # Of `eval_logs`, when evaluated in this start.
    # This start's evaluations during training: {"step", "train", <split>}.
    history: list = dataclasses.field(default_factory=list)
    # The end's other figures: "eval" (the validation split) when a held-out
    # split is the tuning one, "<split>_moving_bn" before precise BN.
    final_logs: dict = dataclasses.field(default_factory=dict)
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    # Throughput leaves out the first loop, which includes tracing.
    images_trained: int = 0
    train_seconds: float = 0.0
    steady_images: int = 0
    steady_seconds: float = 0.0

    def __post_init__(self):
        self.step = self.start_step

    def add_loop(self, steps_run: int, images: int, seconds: float) -> None:
        """Counts a loop of `steps_run` steps that took `seconds`."""
        if self.images_trained:
            self.steady_images += images
            self.steady_seconds += seconds
        self.images_trained += images
        self.train_seconds += seconds
        self.step += steps_run

    def seconds_left(self, config: Config) -> float | None:
        """The time the remaining steps take at the steady rate; None until a
        loop after the first (which includes tracing) has been timed."""
        if not self.steady_images:
            return None
        rate = self.steady_seconds / self.steady_images
        return (config.train_steps - self.step) * config.global_batch_size * rate

    def images_per_sec(self) -> float | None:
        """Training throughput, without the first loop if there were more."""
        if self.steady_seconds:
            return self.steady_images / self.steady_seconds
        return self.images_trained / self.train_seconds if self.train_seconds else None


def evaluations(config: Config, progress: Progress, previous: dict) -> dict:
    """summary.json's evaluation figures: "eval" (the validation split), and
    with --holdout_fraction "holdout"; with --precise_bn_examples also
    "<split>_moving_bn" (with the moving averages as trained). A start that
    evaluated nothing keeps the previous ones."""
    tuning = "holdout" if config.holdout_fraction else "eval"
    latest = {tuning: progress.eval_logs, **progress.final_logs}
    names = ["eval"] + (["holdout"] if config.holdout_fraction else [])
    if config.precise_bn_examples:
        names += [f"{name}_moving_bn" for name in names]
    return {name: latest.get(name) or previous.get(name, {}) for name in names}


def segment(
    config: Config, progress: Progress, train_input_fn, *eval_input_fns
) -> dict:
    """This start of the run, as summary.json's `segments` list it."""
    skipped = {"train": train_input_fn.skipped_records()}
    names = train_input_fn.skipped_record_names()
    for split, input_fn in zip(("validation", "holdout"), eval_input_fns):
        skipped[split] = input_fn.skipped_records()
        names += input_fn.skipped_record_names()
    return {
        "start_step": progress.start_step,
        "end_step": progress.step,
        "train": progress.train_logs,
        **evaluations(config, progress, {}),
        "nonfinite_steps": progress.nonfinite_steps,
        "skipped_records": skipped,
        "skipped_record_names": names,
        "wall_time_sec": time.time() - progress.wall_start,
        "train_time_sec": progress.train_seconds,
        "images_per_sec": progress.images_per_sec(),
    }


def summary(
    config: Config,
    num_replicas: int,
    progress: Progress,
    this_segment: dict,
    previous: dict | None,
) -> dict:
    """summary.json's contents: the run so far, `this_segment` its last."""
    previous = previous or {}
    segments = previous.get("segments", []) + [this_segment]
    return {
        "model_dir": os.path.abspath(config.model_dir),
        "flags": config.flags,
        "config": config.to_dict(),
        "source": config.data.name,
        "image_size": config.data.image_size,
        "augmentation": config.augmentation,
        "num_classes": config.data.num_classes,
        "num_replicas": num_replicas,
        "steps": progress.step,
        "steps_per_epoch": config.steps_per_epoch,
        "epochs": progress.step / config.steps_per_epoch,
        "resumed_from_step": progress.start_step,
        # The latest figures; a segment that trained no step keeps the last.
        "train": progress.train_logs or previous.get("train", {}),
        **evaluations(config, progress, previous),
        # Every evaluation during training, with the training figures of the
        # loop before it; those a resumed start redid are the new start's.
        "history": [
            entry
            for entry in previous.get("history", [])
            if entry["step"] <= progress.start_step
        ]
        + progress.history,
        "nonfinite_steps": sum(s["nonfinite_steps"] for s in segments),
        "skipped_records": {
            split: sum(s.get("skipped_records", {}).get(split, 0) for s in segments)
            for split in ("train", "validation", "holdout")
            if split != "holdout" or config.holdout_fraction
        },
        "wall_time_sec": this_segment["wall_time_sec"],
        "train_time_sec": progress.train_seconds,
        "images_per_sec": this_segment["images_per_sec"]
        or previous.get("images_per_sec"),
        "segments": segments,
    }


def record_stop(config: Config, contents: dict, signal_name: str, chief: bool) -> None:
    """Writes summary.json for a run stopped by a signal: the segment and the
    summary say so (`stopped_by`), and the run is not finished."""
    contents["segments"][-1]["stopped_by"] = signal_name
    contents["stopped_by"] = signal_name
    if chief:
        write(config, contents)


def write(config: Config, contents: dict) -> None:
    """Writes summary.json (atomically)."""
    config_lib.write_json(os.path.join(config.model_dir, SUMMARY_FILE), contents)


def is_finished(config: Config, previous: dict | None) -> bool:
    """Whether the folder's summary is that of a run that trained to the end."""
    return (
        previous is not None
        and previous.get("steps", 0) >= config.train_steps
        and "stopped_by" not in previous
    )


def export_model(model: keras.Model, config: Config) -> None:
    """Saves the trained model with its input normalization in front, so it
    takes images of pixel values 0-255 (as `keras.saving.load_model(path)`);
    written to a temporary file first, then renamed."""
    path = os.path.join(config.model_dir, MODEL_FILE)
    mean = np.array(config.data.mean, np.float32)
    std = np.array(config.data.std, np.float32)
    inputs = keras.Input(
        (config.data.image_size, config.data.image_size, config.data.channels),
        name="pixels",
    )
    normalized = keras.layers.Normalization(
        mean=mean, variance=std**2, name="normalization"
    )(inputs)
    exported = keras.Model(inputs, model(normalized), name=f"{config.model}_export")
    with config_lib.written_atomically(
        path, "; the checkpoints are intact, and a rerun with space exports the model"
    ) as temporary:
        exported.save(temporary)
