"""The large-batch study: SGD vs LARS as the batch grows, at small scale on real images.

The paper (You, Gitman & Ginsburg 2017) claims that linear learning-rate scaling
with warm-up loses accuracy as the batch grows, while LARS keeps it. This script
tests the claim on MNIST and on Imagenette at 32x32 with the small nets of
``train/models.py`` (STUDY.md has the protocol and the results)::

    python -m experiments.large_batch_study --fair --precise_bn --batch_sizes=128,8192
    python -m experiments.large_batch_study --fair --precise_bn --dry_run  # pending
    python -m experiments.large_batch_study --report                      # tables

``--fair``: a fixed 10% of the training set (MNIST's, or Imagenette's with
``--part=imagenette32`` or ``imagenette``) is held out, every optimizer's rate
and warm-up is chosen on it with the same budget (``select_on_validation``;
above the base batch the rates span square-root to linear scaling of the base
batch's choice), the chosen setting is repeated over seeds, and the test set is
read once per run, at its end. The schedule is a linear warm-up from 0 to the
peak rate ``base_lr * batch / base_batch``, then poly(2) decay to 0; no weight
decay. For a given seed every optimizer starts from the same weights and sees
the same examples in the same order.

Each finished run writes ``<output_dir>/runs/<run_id>.json`` (config, per-epoch
held-out top-1, final held-out and test top-1, diverged flag, wall time, and
``run_record``: commit, versions, command, budget). Runs whose JSON exists are
skipped, so the study can be stopped and restarted at any time; ``--report``
rebuilds the markdown tables from the JSONs alone, with the budget replayed on
them (``budget_run_ids``). The JSONs of the study's first protocol (LARS's rate
chosen on the test set, ids without ``_val``) are tabled and plotted by
``--report`` too; their runner is gone (git history has it).

Matplotlib is needed for ``--report`` only (``pip install lars-tf[study]``).
"""

import dataclasses
import functools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from absl import app, flags, logging

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = (
    "mnist",
    "imagenette",
    "imagenette32",
    "tfds_mnist",
    "tfds_fashion_mnist",
    "tfds_cifar10",
)
# "nesterov" (Keras SGD with Nesterov momentum) and "lamb" (Keras Lamb) are the
# peers of the fair protocol's reality check (Nado et al. 2021).
OPTIMIZERS = ("sgd", "lars", "nesterov", "lamb")
EVAL_BATCH_SIZE = 1000
# Training examples whose statistics --precise_bn averages (whole batches).
PRECISE_BN_EXAMPLES = 4096
# A run whose final test top-1 is at most this multiple of chance learned nothing.
DIVERGED_CHANCE_MULTIPLE = 2.0


@dataclasses.dataclass(frozen=True)
class PartSettings:
    """The defaults of one part of the study (each can be overridden by a flag)."""

    source: str  # train.data source name
    tfds_name: str | None  # For source "tfds".
    image_size: int
    augmentation: str
    base_batch_size: int  # The batch the base rates refer to.
    batch_sizes: tuple[int, ...]
    epochs: int
    repeat_seeds: tuple[int, ...]


PART_SETTINGS = {
    "mnist": PartSettings(
        source="mnist",
        tfds_name=None,
        image_size=28,
        augmentation="none",
        base_batch_size=128,
        batch_sizes=(128, 512, 2048, 4096, 8192),
        epochs=3,
        repeat_seeds=(1, 2),
    ),
    # 9,469 training images: batch 2048 is 4 steps an epoch, 32x the base.
    "imagenette": PartSettings(
        source="imagenet",
        tfds_name=None,
        image_size=64,
        augmentation="minimal",
        base_batch_size=64,
        batch_sizes=(64, 2048),
        epochs=10,
        repeat_seeds=(),
    ),
}
# Imagenette at 32x32: a quarter of the 64x64 part's compute per image, so the
# fair protocol's selection and seeds fit a few hours of a 2-core machine.
PART_SETTINGS["imagenette32"] = dataclasses.replace(
    PART_SETTINGS["imagenette"], image_size=32, repeat_seeds=(1, 2)
)
# For machines where TFDS can download: the MNIST grid on TFDS's copy of MNIST,
# Fashion-MNIST or CIFAR-10 (prepared beforehand; the input pipeline never
# downloads). CIFAR-10 gets 32x32 images and the minimal augmentation.
for _name in ("mnist", "fashion_mnist", "cifar10"):
    PART_SETTINGS[f"tfds_{_name}"] = dataclasses.replace(
        PART_SETTINGS["mnist"],
        source="tfds",
        tfds_name=_name,
        image_size=32 if _name == "cifar10" else 28,
        augmentation="minimal" if _name == "cifar10" else "none",
    )


def default_part_data_dir(part: str, shared_data_dir: str) -> str | None:
    """MNIST's IDX files in the shared data folder; for Imagenette, the TFRecords
    that ``train.convert_images`` writes into the git-ignored ``runs/`` (STUDY.md
    has the command); None (TFDS's default folder) for the TFDS parts."""
    if part == "mnist":
        return os.path.join(shared_data_dir, "mnist")
    if part.startswith("imagenette"):
        return os.path.join(REPO_ROOT, "runs", "imagenette_records")
    return None  # TFDS's own default data dir.


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the script's flags on absl's global FLAGS; called only when it runs
    as a script, so importing the module (tests) leaves FLAGS to train.main."""
    _define_data_flags()
    _define_run_flags()
    _define_protocol_flags()


def _define_data_flags() -> None:
    """Which part, its data, and where results go."""
    flags.DEFINE_enum("part", "mnist", PARTS, "Which part of the study to run.")
    flags.DEFINE_string(
        "output_dir",
        os.path.join(REPO_ROOT, "experiments", "results"),
        "Folder of the per-run JSON summaries (runs/<run_id>.json), committed so "
        "the tables can be rebuilt and the study resumed in another session.",
    )
    flags.DEFINE_string(
        "data_dir",
        None,
        "Folder holding mnist/; default $LARS_TF_DATA_DIR, else ../shared/data.",
    )
    flags.DEFINE_string(
        "part_data_dir",
        None,
        "The part's own data folder; default <data_dir>/mnist, "
        "runs/imagenette_records for Imagenette, TFDS's data dir for tfds_*.",
    )


def _define_run_flags() -> None:
    """The runs' model, batches, length and optimizer settings."""
    flags.DEFINE_string("model", "small_alexnet_bn", "train.models model name.")
    flags.DEFINE_list("batch_sizes", None, "Batch sizes; default per part.")
    flags.DEFINE_integer(
        "base_batch_size", None, "Batch the base rates refer to; default per part."
    )
    flags.DEFINE_integer("epochs", None, "Epochs of every run; default per part.")
    flags.DEFINE_float(
        "warmup_epochs",
        None,
        "The only warm-up tried (epochs); default the part's WARMUP_CHOICES.",
    )
    flags.DEFINE_float("momentum", 0.9, "Momentum of both optimizers.")
    flags.DEFINE_float("trust_coefficient", 0.001, "LARS trust coefficient (eta).")
    flags.DEFINE_integer("seed", 0, "Seed of the selection runs.")
    flags.DEFINE_list(
        "repeat_seeds",
        None,
        "Seeds the chosen setting runs again with; default per part.",
    )
    flags.DEFINE_integer(
        "train_examples", None, "Train on this many examples per epoch (smoke runs)."
    )
    flags.DEFINE_integer(
        "eval_examples", None, "Evaluate on this many test examples (smoke runs)."
    )
    flags.DEFINE_bool(
        "precise_bn",
        False,
        "Test with BN statistics recomputed on training batches after training "
        "(the moving averages' result is kept as final_top1_moving_bn).",
    )


def _define_protocol_flags() -> None:
    """The fair protocol's choices, and the dry-run and report modes."""
    flags.DEFINE_bool(
        "fair",
        False,
        "The fair protocol: hold out a split of the training set, choose every "
        "optimizer's rate and warm-up on it with the same budget, then repeat "
        "the choice over --repeat_seeds; --batch_sizes run in the order given "
        "(the base batch first: the others' rate grids scale its choice).",
    )
    flags.DEFINE_list(
        "optimizers", ["sgd", "lars"], f"With --fair: any of {', '.join(OPTIMIZERS)}."
    )
    flags.DEFINE_float(
        "fixed_base_lr",
        None,
        "With --fair: no selection; this base rate with --warmup_epochs, over "
        "--seed and --repeat_seeds (a check outside the equal budget).",
    )
    flags.DEFINE_integer(
        "base_epochs",
        None,
        "With --fair: the base batch trains this many epochs (its rate chosen "
        "at that length) while the other batches train --epochs (default: the "
        "same), as in the paper's Table 5.",
        lower_bound=1,
    )
    flags.DEFINE_bool("dry_run", False, "Print the pending runs and exit.")
    flags.DEFINE_bool("report", False, "Rebuild tables and plots from the JSONs only.")
    flags.DEFINE_string(
        "report_dir",
        os.path.join(REPO_ROOT, "experiments", "results"),
        "Where --report writes <part>.md and the PNG plots.",
    )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run of the study; its fields identify it."""

    part: str
    model: str
    optimizer: str
    batch_size: int
    base_lr: float
    base_batch_size: int
    epochs: int
    warmup_epochs: float
    seed: int
    # Trainable parameters of the model when the study started: a changed model in
    # train/models.py gives new run ids instead of silently mixing two nets.
    model_params: int = 0
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    train_examples: int | None = None
    eval_examples: int | None = None
    # Test with BN statistics recomputed on training data after training
    # ("precise BN"), instead of the moving averages, which lag behind when a
    # large batch gives only a few dozen steps.
    precise_bn: bool = False
    # Train on the part's training set less a fixed held-out split, test per
    # epoch on that split (what the fair protocol selects on), and test on the
    # test set once, at the end (``held_out_split``).
    validation: bool = False

    @property
    def run_id(self) -> str:
        run_id = (
            f"{self.part}_{self.model}_{self.optimizer}_b{self.batch_size}"
            f"_lr{self.base_lr:g}_e{self.epochs}_w{self.warmup_epochs:g}"
            f"_s{self.seed}_p{self.model_params}"
        )
        if self.optimizer == "lars" and self.trust_coefficient != 0.001:
            run_id += f"_eta{self.trust_coefficient:g}"
        if self.train_examples or self.eval_examples:
            run_id += f"_n{self.train_examples}-{self.eval_examples}"
        if self.precise_bn:
            run_id += "_pbn"
        if self.validation:
            run_id += "_val"
        return run_id

    @property
    def peak_lr(self) -> float:
        import lars_tf

        return lars_tf.scaled_learning_rate(
            self.base_lr, self.batch_size, self.base_batch_size
        )


def run_path(output_dir: str, config: RunConfig) -> str:
    return os.path.join(output_dir, "runs", f"{config.run_id}.json")


def config_of(summary: dict) -> RunConfig:
    """The RunConfig of a summary; fields added since it was written get their
    defaults, so old JSONs stay comparable."""
    return RunConfig(**summary["config"])


def _without_seed(summary: dict) -> RunConfig:
    return dataclasses.replace(config_of(summary), seed=0)


def load_summaries(output_dir: str) -> list[dict]:
    """Every finished run's summary under ``output_dir/runs``, sorted by run id."""
    runs_dir = os.path.join(output_dir, "runs")
    if not os.path.isdir(runs_dir):
        return []
    summaries = []
    for name in sorted(os.listdir(runs_dir)):
        if name.endswith(".json"):
            with open(os.path.join(runs_dir, name)) as f:
                summaries.append(json.load(f))
    return summaries


# ----------------------------------------------------------------------------
# Training one run


def train_one(config: RunConfig, data_dir: str | None) -> dict:
    """Trains one configuration and returns its summary (see the module doc)."""
    import keras

    from train import sources

    settings = PART_SETTINGS[config.part]
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)
    info = sources.describe(settings.source, data_dir, settings.tfds_name)
    train_data, eval_data, test_data, steps_per_epoch = _run_data(
        config, settings, info, data_dir
    )
    model = _compiled_model(
        config, settings, info, config.epochs * steps_per_epoch, steps_per_epoch
    )
    start = time.perf_counter()
    history = model.fit(
        train_data,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=eval_data,
        callbacks=[keras.callbacks.TerminateOnNaN()],
        verbose=2,
    ).history
    wall_time = time.perf_counter() - start
    test_top1 = [float(x) for x in history.get("val_top1", [])]
    train_loss = [float(x) for x in history.get("loss", [])]
    loss_not_finite = any(not math.isfinite(x) for x in train_loss)

    def top1(dataset) -> float:
        return float(model.evaluate(dataset, verbose=0, return_dict=True)["top1"])

    if loss_not_finite or len(test_top1) < config.epochs:
        # TerminateOnNaN stopped the run inside an epoch: test the final weights.
        final_top1 = top1(eval_data)
    else:
        final_top1 = test_top1[-1]
    moving_bn_top1 = None
    if config.precise_bn and not loss_not_finite:
        moving_bn_top1 = final_top1
        batches = -(-PRECISE_BN_EXAMPLES // config.batch_size)
        recompute_bn_statistics(model, train_data, batches)
        final_top1 = top1(eval_data)
    chance = 1.0 / info.num_classes
    summary = {
        "run_id": config.run_id,
        "config": dataclasses.asdict(config),
        "peak_lr": config.peak_lr,
        "steps_per_epoch": steps_per_epoch,
        "train_steps": config.epochs * steps_per_epoch,
        "test_top1_per_epoch": test_top1,
        "train_loss_per_epoch": train_loss,
        "final_top1": final_top1,
        "final_top1_moving_bn": moving_bn_top1,  # With --precise_bn only.
        "best_top1": max(test_top1 + [final_top1]),
        "diverged": loss_not_finite or final_top1 <= DIVERGED_CHANCE_MULTIPLE * chance,
        "loss_not_finite": loss_not_finite,
        "wall_time_s": wall_time,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if test_data is not None:
        # What was tested per epoch is the held-out split: name it so, and
        # test on the test set once, with the final (BN-recomputed) weights.
        for old, new in VALIDATION_KEYS.items():
            summary[new] = summary.pop(old)
        summary["final_test_top1"] = top1(test_data)
    return summary


def _run_data(config: RunConfig, settings: PartSettings, info, data_dir: str | None):
    """The run's (train, eval, test or None) datasets and its steps per epoch."""
    from train import data

    split = held_out_split(config.part, data_dir) if config.validation else None
    num_train = len(split.train_labels) if split else info.train_examples
    train_examples = config.train_examples or num_train
    steps_per_epoch = train_examples // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch {config.batch_size} is larger than the {train_examples} "
            "training examples"
        )
    common = dict(
        source=settings.source,
        tfds_name=settings.tfds_name,
        data_dir=data_dir,
        image_size=settings.image_size,
        augmentation=settings.augmentation,
        seed=config.seed,
        deterministic=True,  # Same data order for SGD and LARS.
    )
    eval_batch = min(EVAL_BATCH_SIZE, config.eval_examples or EVAL_BATCH_SIZE)
    if split is None:
        train_data = data.make_input_fn(
            split="train",
            global_batch_size=config.batch_size,
            # The whole training set, so an epoch is a true random permutation.
            shuffle_buffer_size=info.train_examples,
            **common,
        )()
        eval_data = data.make_input_fn(
            split="validation", global_batch_size=eval_batch, **common
        )()
        test_data = None
    else:  # Fit on split.train, select on split.val, test on the test set once.
        train_data = split.batches("train", config.batch_size, config.seed)
        eval_data = split.batches("val", eval_batch)
        test_data = split.batches("test", eval_batch)
    if config.eval_examples:
        eval_data = eval_data.take(config.eval_examples // eval_batch)
        if test_data is not None:
            test_data = test_data.take(config.eval_examples // eval_batch)
    return train_data, eval_data, test_data, steps_per_epoch


def _compiled_model(
    config: RunConfig,
    settings: PartSettings,
    info,
    train_steps: int,
    steps_per_epoch: int,
):
    """The run's model, compiled with the app's schedule and optimizer: the
    paper's poly-2 decay after a linear warm-up; no weight decay."""
    import keras

    from train import models, optimizers

    model = models.build_model(
        config.model, info.num_classes, settings.image_size, info.channels
    )
    params = sum(math.prod(v.shape) for v in model.trainable_variables)
    if config.model_params and params != config.model_params:
        raise RuntimeError(
            f"{config.model} has {params} trainable parameters, the study was set "
            f"up for {config.model_params}: train/models.py changed; restart"
        )
    schedule = optimizers.make_schedule(
        "poly",
        config.peak_lr,
        train_steps,
        round(config.warmup_epochs * steps_per_epoch),
        power=2.0,
    )
    optimizer = optimizers.make_optimizer(
        "sgd" if config.optimizer == "nesterov" else config.optimizer,
        schedule,
        model.trainable_variables,
        momentum=config.momentum,  # Lamb's beta_1.
        trust_coefficient=config.trust_coefficient,
        # Keras Lamb's default, which the recorded Lamb runs used.
        epsilon=1e-7 if config.optimizer == "lamb" else 0.0,
        nesterov=config.optimizer == "nesterov",
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1")],
    )
    return model


def recompute_bn_statistics(model, train_data, batches: int) -> None:
    """Sets every BatchNormalization layer's moving mean and variance to the
    average over ``batches`` training batches of the batch statistics, computed
    with the final weights (a training-mode forward pass with momentum 0 per
    batch; the weights do not change)."""
    import keras

    layers = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    sums = [[0.0, 0.0] for _ in layers]
    for images, _ in train_data.take(batches):
        for layer in layers:
            layer.momentum = 0.0
        model(images, training=True)
        for total, layer in zip(sums, layers, strict=True):
            total[0] += layer.moving_mean.numpy()
            total[1] += layer.moving_variance.numpy()
    for total, layer, momentum in zip(sums, layers, momenta, strict=True):
        layer.moving_mean.assign(total[0] / batches)
        layer.moving_variance.assign(total[1] / batches)
        layer.momentum = momentum


def _git(*args: str) -> str | None:
    """Output of ``git args`` in the checkout, or None without git or a repository."""
    try:
        result = subprocess.run(
            ["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def run_record(command: Sequence[str], in_budget: bool | None) -> dict:
    """What made a run, for its JSON: the checkout's commit and whether its
    tracked files were unchanged, the Python, TensorFlow and Keras versions,
    the command, and whether the command ran the equal budget's rule (True)
    or a fixed setting outside it (False; None outside the fair protocol).
    ``--report`` decides the budget by replaying the rule on every JSON."""
    import keras
    import tensorflow as tf

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_clean": None if status is None else status == "",
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "command": shlex.join(command),
        "in_budget": in_budget,
    }


def run_if_missing(
    config: RunConfig,
    output_dir: str,
    data_dir: str | None,
    record: dict | None = None,
) -> bool:
    """Trains ``config`` unless its JSON exists; True when it trained. The
    JSON holds the run's summary and ``record`` (``run_record``)."""
    path = run_path(output_dir, config)
    if os.path.exists(path):
        logging.info("skip %s (done)", config.run_id)
        return False
    logging.info("run %s (peak lr %g)", config.run_id, config.peak_lr)
    summary = train_one(config, data_dir)
    summary.update(record or {})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(partial, path)  # A killed run never leaves a half-written JSON.
    tested = "val" if config.validation else "test"
    logging.info(
        "done %s: final %s top-1 %.4f, diverged %s, %.0f s",
        config.run_id,
        tested,
        summary["final_val_top1" if config.validation else "final_top1"],
        summary["diverged"],
        summary["wall_time_s"],
    )
    return True


# ----------------------------------------------------------------------------
# The fair protocol: every setting chosen on a held-out split of the training
# set, the same selection budget for every optimizer, the test set read once

# A fixed 10% of the training set, never trained on in the fair protocol.
VALIDATION_FRACTION = 0.1
VALIDATION_SPLIT_SEED = 2017
# The summary keys of a run with a held-out split: what train_one tested per
# epoch is that split, not the test set.
VALIDATION_KEYS = {
    "test_top1_per_epoch": "val_top1_per_epoch",
    "final_top1": "final_val_top1",
    "final_top1_moving_bn": "final_val_top1_moving_bn",
    "best_top1": "best_val_top1",
}
# Base rates tried at the base batch, per optimizer: three, a factor 4 apart,
# around the rate known to train there. Lamb's relative step (rate x ||w||) is
# LARS's (rate x eta x ||w||) with eta = 0.001, hence LARS's grid / 1000.
BASE_RATE_GRIDS = {
    "sgd": (0.0125, 0.05, 0.2),
    "nesterov": (0.0125, 0.05, 0.2),
    "lars": (1.0, 4.0, 16.0),
    "lamb": (0.001, 0.004, 0.016),
}
# Above the base batch, an optimizer's rate grid scales the base-batch choice
# of the optimizer named here (itself when absent): heavy-ball and Nesterov
# momentum share one rate scale, so Nesterov needs no base-batch selection of
# its own (it would cost as many runs as the large batch's).
RATE_ANCHOR = {"nesterov": "sgd"}
# Warm-up lengths tried (epochs), per part the fair protocol runs on (those
# whose training set ``held_out_split`` can cut): the study's first one, then
# a longer one.
WARMUP_CHOICES = {
    "mnist": (1.0, 2.0),
    "imagenette": (2.0, 5.0),
    "imagenette32": (2.0, 5.0),
}
FAIR_PARTS = tuple(WARMUP_CHOICES)


@dataclasses.dataclass(frozen=True)
class HeldOutSplit:
    """A part's training set cut into ``train`` and ``val`` (``VALIDATION_FRACTION``,
    fixed by ``VALIDATION_SPLIT_SEED``), and its test set, as uint8 arrays.

    With ``image_size`` set, the stored images are larger and every batch crops
    them with ``train.preprocessing``: at random with ``augmentation`` for
    "train", in the center for "val" and "test".
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: tuple[float, ...]
    stddev: tuple[float, ...]
    image_size: int | None = None  # None: the stored images as they are.
    augmentation: str = "none"

    def batches(self, subset: str, batch_size: int, seed: int | None = None):
        """Normalized (images, labels) batches of ``subset`` ("train", "val" or
        "test"); for "train" an endless stream, reshuffled every epoch from
        ``seed`` (so every optimizer sees the same examples in the same order,
        cropped and flipped the same way) and without a partial last batch, as
        ``train.data``'s pipeline does."""
        import tensorflow as tf

        from train import preprocessing

        images = getattr(self, f"{subset}_images")
        labels = getattr(self, f"{subset}_labels").astype("int32")
        examples = tf.data.Dataset.from_tensor_slices((images, labels))
        training = subset == "train"
        if training:
            examples = examples.shuffle(len(labels), seed=seed).repeat()
        if self.image_size is not None:
            randomize = training and self.augmentation != "none"
            example_seeds = tf.data.Dataset.random(seed=seed).batch(2)

            def crop(example, example_seed):
                image = preprocessing.preprocess_image(
                    example[0],
                    is_encoded=False,
                    image_size=self.image_size,
                    training=training,
                    augmentation=self.augmentation,
                    seed=example_seed if randomize else None,
                    channels=images.shape[-1],
                    crop_fraction=preprocessing.MINIMAL_CROP_FRACTION,
                )
                return image, example[1]

            examples = tf.data.Dataset.zip((examples, example_seeds)).map(
                crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
            )
        return (
            examples.batch(batch_size, drop_remainder=training)
            .map(
                lambda x, y: (preprocessing.normalize(x, self.mean, self.stddev), y),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
            .prefetch(tf.data.AUTOTUNE)
        )


def validation_split_indices(
    num_examples: int, fraction: float = VALIDATION_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): a fixed random ``fraction`` of
    ``range(num_examples)`` is held out; both sorted, disjoint, covering all."""
    order = np.random.default_rng(VALIDATION_SPLIT_SEED).permutation(num_examples)
    held_out = round(fraction * num_examples)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def stored_image_size(image_size: int) -> int:
    """The side at which ImageNet-format images are kept for the fair protocol:
    the smallest whose ``MINIMAL_CROP_FRACTION`` crop (the "minimal" training
    crop and the evaluation center crop) is ``image_size`` pixels."""
    from train import preprocessing

    fraction = preprocessing.MINIMAL_CROP_FRACTION
    side = math.ceil(image_size / fraction)
    while int(fraction * side) < image_size:
        side += 1
    return side


def read_image_records(
    data_dir: str, split: str, side: int
) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, side, side, 3] uint8, 0-based labels [N]) of a split of
    ImageNet-format TFRecords (``train.convert_images``), in file order: every
    image decoded once and resized whole, with antialiasing, to side x side."""
    import tensorflow as tf

    from train import data, sources

    label_offset = sources.describe("imagenet", data_dir).label_offset

    def decode(record):
        encoded, label, _ = data.parse_image_record(record, with_boxes=False)
        image = tf.image.resize(
            tf.io.decode_jpeg(encoded, channels=3), [side, side], antialias=True
        )
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return image, label - label_offset

    records = tf.data.TFRecordDataset(data.list_record_files(data_dir, split))
    images, labels = [], []
    decoded = records.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    for image_batch, label_batch in decoded.batch(1024):
        images.append(image_batch.numpy())
        labels.append(label_batch.numpy())
    return np.concatenate(images), np.concatenate(labels)


@functools.cache
def held_out_split(part: str, data_dir: str | None) -> HeldOutSplit:
    """The fair protocol's data for ``part``: MNIST's IDX files, or Imagenette's
    TFRecords decoded once (``read_image_records``), read whole and kept for
    the process's later runs."""
    from train import data, sources

    settings = PART_SETTINGS[part]
    if settings.source == "mnist":
        images, labels = data.load_idx_split(data_dir, "train")
        test_images, test_labels = data.load_idx_split(data_dir, "validation")
        mnist = sources.SOURCES["mnist"]
        mean, stddev, image_size = mnist.mean, mnist.std, None
    elif settings.source == "imagenet":
        side = stored_image_size(settings.image_size)
        images, labels = read_image_records(data_dir, "train", side)
        test_images, test_labels = read_image_records(data_dir, "validation", side)
        mean, stddev = sources.IMAGENET_MEAN_RGB, sources.IMAGENET_STDDEV_RGB
        image_size = settings.image_size
    else:
        raise NotImplementedError(
            f"--fair needs the training set as arrays; parts "
            f"{', '.join(FAIR_PARTS)} have them, not {part}"
        )
    train, val = validation_split_indices(len(labels))
    return HeldOutSplit(
        images[train],
        labels[train],
        images[val],
        labels[val],
        test_images,
        test_labels,
        mean,
        stddev,
        image_size,
        settings.augmentation,
    )


def _round_rate(rate: float) -> float:
    """Four significant digits: a rate computed twice gives the same run id."""
    return float(f"{rate:.4g}")


def scaled_rate_grid(base_choice: float, batch: int, base_batch: int) -> list[float]:
    """Base rates (the run's base_lr, which the schedule scales linearly) from
    square-root to linear scaling of the base batch's chosen rate: the peak
    rate ``base_choice * sqrt(k)``, ``base_choice * k**0.75`` and
    ``base_choice * k`` for ``k = batch / base_batch``."""
    k = batch / base_batch
    return [_round_rate(base_choice * k**-exponent) for exponent in (0.5, 0.25, 0.0)]


def val_top1(summary: dict) -> float:
    """What the fair protocol selects on: the final top-1 on the held-out split."""
    return summary["final_val_top1"]


def best_on_validation(
    summaries: Iterable[dict], configs: Iterable[RunConfig]
) -> RunConfig | None:
    """The config of ``configs`` whose finished run has the best final top-1 on
    the held-out split (first of equals); None unless all have finished."""
    by_id = {s["run_id"]: s for s in summaries}
    configs = list(configs)
    if not configs or any(c.run_id not in by_id for c in configs):
        return None
    return max(configs, key=lambda c: val_top1(by_id[c.run_id]))


def edge_extension(configs: Sequence[RunConfig], best: RunConfig) -> RunConfig | None:
    """One rate a grid step past the edge of ``configs`` (one warm-up, several
    rates) when ``best`` is on that edge; None when it is inside."""
    rates = sorted(c.base_lr for c in configs)
    if len(rates) < 2:
        return None
    if best.base_lr == rates[0]:
        return dataclasses.replace(best, base_lr=_round_rate(rates[0] ** 2 / rates[1]))
    if best.base_lr == rates[-1]:
        return dataclasses.replace(
            best, base_lr=_round_rate(rates[-1] ** 2 / rates[-2])
        )
    return None


def select_on_validation(
    template: RunConfig,
    rates: Sequence[float],
    warmups: Sequence[float],
    run: Callable[[RunConfig], object],
    load: Callable[[], list[dict]],
) -> RunConfig | None:
    """Chooses ``template``'s base rate and warm-up on the held-out split.

    The same budget for every optimizer and batch: ``rates`` at the first
    warm-up, one rate past the edge when the best lies on it, then each longer
    warm-up at the best rate; the best of all these runs is the choice.
    ``run`` trains a config (or skips a finished one), ``load`` reads the
    finished summaries; None when results are missing (a dry run).
    """
    grid = [
        dataclasses.replace(template, base_lr=rate, warmup_epochs=warmups[0])
        for rate in rates
    ]
    for config in grid:
        run(config)
    best = best_on_validation(load(), grid)
    if best is None:
        return None
    extension = edge_extension(grid, best)
    if extension is not None:
        run(extension)
        grid.append(extension)
        best = best_on_validation(load(), grid)
        if best is None:
            return None
    tried = grid + [dataclasses.replace(best, warmup_epochs=w) for w in warmups[1:]]
    for config in tried[len(grid) :]:
        run(config)
    return best_on_validation(load(), tried)


def run_fair_protocol(
    template: RunConfig,
    batch_sizes: Sequence[int],
    optimizers: Sequence[str],
    warmups: Sequence[float],
    repeat_seeds: Sequence[int],
    run: Callable[[RunConfig], object],
    load: Callable[[], list[dict]],
    fixed: tuple[float, float] | None = None,
    base_epochs: int | None = None,
) -> dict:
    """The fair protocol for each batch in the order given, each optimizer:
    select the rate and warm-up on the held-out split (``select_on_validation``;
    at the base batch over ``BASE_RATE_GRIDS``, elsewhere over
    ``scaled_rate_grid`` of the base batch's choice for the optimizer or its
    ``RATE_ANCHOR``, selected first if needed), then the chosen setting
    again with each of ``repeat_seeds``. Returns {(batch, optimizer): chosen
    seed-``template.seed`` config, or None when still undecided (a dry run)}.
    ``fixed`` = (base rate, warm-up epochs) skips the selection: that setting
    runs with every seed (a check outside the equal budget). ``base_epochs``
    trains the base batch for that many epochs instead of ``template.epochs``
    (the paper's Table 5: larger batches trained longer than the base).
    """
    base_batch = template.base_batch_size
    chosen = {}

    def choose(batch: int, optimizer: str) -> RunConfig | None:
        arm = dataclasses.replace(template, optimizer=optimizer, batch_size=batch)
        if batch == base_batch and base_epochs is not None:
            arm = dataclasses.replace(arm, epochs=base_epochs)
        if fixed is not None:
            setting = dataclasses.replace(arm, base_lr=fixed[0], warmup_epochs=fixed[1])
            run(setting)
            return setting
        if batch == base_batch:
            rates = BASE_RATE_GRIDS[optimizer]
        else:
            anchor = RATE_ANCHOR.get(optimizer, optimizer)
            if (base_batch, anchor) not in chosen:
                chosen[(base_batch, anchor)] = choose(base_batch, anchor)
            base_choice = chosen[(base_batch, anchor)]
            if base_choice is None:
                return None
            rates = scaled_rate_grid(base_choice.base_lr, batch, base_batch)
        return select_on_validation(arm, rates, warmups, run, load)

    for batch in batch_sizes:
        for optimizer in optimizers:
            chosen[(batch, optimizer)] = choose(batch, optimizer)
        for seed in repeat_seeds:
            for optimizer in optimizers:
                if chosen[(batch, optimizer)] is not None:
                    run(dataclasses.replace(chosen[(batch, optimizer)], seed=seed))
    return chosen


def _has_base_selection(group: Sequence[dict], warmup: float) -> bool:
    """Whether ``group`` holds a complete base-batch selection's first stage
    (every rate of ``BASE_RATE_GRIDS`` at ``warmup``, seed 0) for some
    optimizer: then its base batch was selected at the group's own epochs."""
    base = config_of(group[0]).base_batch_size
    done = {
        (s["config"]["optimizer"], s["config"]["base_lr"])
        for s in group
        if s["config"]["batch_size"] == base
        and s["config"]["seed"] == 0
        and s["config"]["warmup_epochs"] == warmup
    }
    return any(
        all((optimizer, rate) in done for rate in rates)
        for optimizer, rates in BASE_RATE_GRIDS.items()
    )


def _base_epochs_of(group: list[dict], part_groups: dict) -> int | None:
    """The epochs of the base batch whose choices ``group``'s larger batches
    scale: None when ``group`` selected its own base batch, else those of the
    group with the most shorter epochs (``--base_epochs``)."""
    if _has_base_selection(group, WARMUP_CHOICES[group[0]["config"]["part"]][0]):
        return None
    base = group[0]["config"]["base_batch_size"]
    larger = [s for s in group if s["config"]["batch_size"] != base]
    elsewhere = _base_elsewhere(larger or group, part_groups)
    return elsewhere[0]["config"]["epochs"] if elsewhere else None


def budget_run_ids(summaries: Sequence[dict]) -> set[str]:
    """The ids of the fair-protocol runs that the equal budget asks for.

    Replays ``run_fair_protocol`` on the recorded runs, per part, setting and
    (batch, optimizer) found there, with the part's warm-ups and repeat seeds;
    a selection counts only when every run it needs was recorded. Any other
    recorded run (a base batch retrained at another length, a rate past an
    edge, one optimizer at another's setting) is outside the budget.
    """
    by_part = {}
    for summary in summaries:
        config = config_of(summary)
        groups = by_part.setdefault(config.part, {})
        groups.setdefault(fair_setting_label(config), []).append(summary)
    asked = set()
    for part, groups in by_part.items():
        for group in groups.values():
            template = dataclasses.replace(config_of(group[0]), seed=0)
            cells = {
                (s["config"]["batch_size"], s["config"]["optimizer"]) for s in group
            }
            for batch, optimizer in sorted(cells):
                cell = set()
                chosen = run_fair_protocol(
                    template,
                    [batch],
                    [optimizer],
                    WARMUP_CHOICES[part],
                    PART_SETTINGS[part].repeat_seeds,
                    lambda config, cell=cell: cell.add(config.run_id),
                    lambda: list(summaries),
                    base_epochs=_base_epochs_of(group, groups),
                )
                if chosen[(batch, optimizer)] is not None:
                    asked |= cell
    return asked & {s["run_id"] for s in summaries}


def fair_setting_label(config: RunConfig) -> str:
    """What fair-protocol runs must share to be compared: ``setting_label``
    without the warm-up, which is chosen per run."""
    return setting_label(dataclasses.replace(config, warmup_epochs=0.0)).replace(
        "_w0", ""
    )


def fair_summary_rows(
    summaries: Sequence[dict], seed: int = 0, in_budget: set[str] | None = None
) -> list[dict]:
    """Per (batch, optimizer) of one setting: the seed-``seed`` run chosen on
    the held-out split (among every rate and warm-up tried; only runs in
    ``in_budget`` when given), its validation top-1, and the test top-1 of
    that setting over every seed that ran it and over the fresh seeds (all
    but ``seed``, the selection's) alone."""
    if in_budget is not None:
        summaries = [s for s in summaries if s["run_id"] in in_budget]
    rows = []
    keys = sorted(
        {(s["config"]["batch_size"], s["config"]["optimizer"]) for s in summaries},
        key=lambda k: (k[0], OPTIMIZERS.index(k[1])),
    )
    for batch, optimizer in keys:
        tried = [
            s
            for s in summaries
            if s["config"]["batch_size"] == batch
            and s["config"]["optimizer"] == optimizer
            and s["config"]["seed"] == seed
        ]
        if not tried:
            continue
        pick = max(tried, key=val_top1)
        same = _without_seed(pick)
        repeats = [s for s in summaries if _without_seed(s) == same]
        tests = [s["final_test_top1"] for s in repeats]
        fresh = [s["final_test_top1"] for s in repeats if s["config"]["seed"] != seed]
        mean, spread = mean_and_spread(tests)
        rows.append(
            {
                "batch": batch,
                "optimizer": optimizer,
                "base_lr": pick["config"]["base_lr"],
                "peak_lr": pick["peak_lr"],
                "warmup_epochs": pick["config"]["warmup_epochs"],
                "tried": len(tried),
                "val_top1": val_top1(pick),
                "test_mean": mean,
                "test_spread": spread,
                "test_min": min(tests),
                "seeds": len(tests),
                "fresh_mean": statistics.mean(fresh) if fresh else None,
                "diverged": any(s["diverged"] for s in repeats),
            }
        )
    return rows


def fair_summary_table(
    summaries: Sequence[dict],
    seed: int = 0,
    base_summaries: Sequence[dict] | None = None,
    in_budget: set[str] | None = None,
) -> str:
    """Markdown of ``fair_summary_rows``, with the gap of the mean test top-1 to
    the base batch's (smallest batch's) best mean test top-1 over optimizers:
    of ``base_summaries`` when given (a base batch trained for another number
    of epochs, ``--base_epochs``), else of ``summaries``."""
    rows = fair_summary_rows(summaries, seed, in_budget)
    base_rows = fair_summary_rows(base_summaries or summaries, seed)
    base = min(r["batch"] for r in base_rows)
    base_best = max(r["test_mean"] for r in base_rows if r["batch"] == base)
    base_epochs = ""
    if base_summaries:
        base_epochs = f"; base: {base_summaries[0]['config']['epochs']} epochs"
    lines = [
        "| batch | optimizer | runs tried (seed 0) | chosen base LR | peak LR "
        "| warm-up (epochs) | val top-1 (%) | test top-1 (%) | seeds "
        f"| gap to base (points{base_epochs}) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        test = _percent(r["test_mean"])
        if r["seeds"] > 1:
            test += f" ± {_percent(r['test_spread'])}"
        if r["diverged"]:
            test += " (a seed diverged)"
        lines.append(
            f"| {r['batch']} | {r['optimizer']} | {r['tried']} | {r['base_lr']:g} "
            f"| {r['peak_lr']:.4g} | {r['warmup_epochs']:g} "
            f"| {_percent(r['val_top1'])} | {test} | {r['seeds']} "
            f"| {100 * (r['test_mean'] - base_best):+.2f} |"
        )
    return "\n".join(lines)


def fair_runs_table(
    summaries: Sequence[dict], in_budget: set[str] | None = None
) -> str:
    """Markdown, one row per run: the held-out split's top-1 only (the test
    set is shown for the chosen settings only, in ``fair_summary_table``),
    and with ``in_budget`` whether the equal budget asked for the run."""
    budget = "" if in_budget is None else " budget |"
    lines = [
        "| batch | optimizer | base LR | peak LR | warm-up (epochs) | seed "
        f"| val top-1 (%) | diverged? | wall (s) |{budget}",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|" + ("---|" if budget else ""),
    ]
    key = lambda s: (  # noqa: E731
        s["config"]["batch_size"],
        OPTIMIZERS.index(s["config"]["optimizer"]),
        s["config"]["base_lr"],
        s["config"]["warmup_epochs"],
        s["config"]["seed"],
    )
    for s in sorted(summaries, key=key):
        c = s["config"]
        lines.append(
            f"| {c['batch_size']} | {c['optimizer']} | {c['base_lr']:g} "
            f"| {s['peak_lr']:.4g} | {c['warmup_epochs']:g} | {c['seed']} "
            f"| {_percent(val_top1(s))} | {'yes' if s['diverged'] else 'no'} "
            f"| {s['wall_time_s']:.0f} |"
            + ("" if in_budget is None else f" {_budget_word(s, in_budget)} |")
        )
    return "\n".join(lines)


def _budget_word(summary: dict, in_budget: set[str]) -> str:
    return "in" if summary["run_id"] in in_budget else "**outside**"


def drop_table(rows: Sequence[dict], base_rows: Sequence[dict], base_note: str) -> str:
    """Markdown: each larger batch's mean test top-1 against its own
    optimizer's base-batch row (``RATE_ANCHOR``'s for an optimizer without
    one), over every seed and over the fresh seeds alone."""
    base_batch = min(r["batch"] for r in base_rows)
    base = {r["optimizer"]: r for r in base_rows if r["batch"] == base_batch}
    lines = [
        "| batch | optimizer | test top-1 (%) | fresh seeds | base (optimizer) "
        f"| base test top-1 (%){base_note} | drop | drop, fresh seeds |",
        "|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        own = base.get(r["optimizer"]) or base.get(RATE_ANCHOR.get(r["optimizer"]))
        if r["batch"] == base_batch or own is None:
            continue
        fresh_drop = "-"
        if r["fresh_mean"] is not None and own["fresh_mean"] is not None:
            fresh_drop = f"{100 * (r['fresh_mean'] - own['fresh_mean']):+.2f}"
        lines.append(
            f"| {r['batch']} | {r['optimizer']} "
            f"| {_percent(r['test_mean'])} ± {_percent(r['test_spread'])} "
            f"| {_percent(r['fresh_mean']) if r['fresh_mean'] is not None else '-'} "
            f"| {own['optimizer']} | {_percent(own['test_mean'])} "
            f"| {100 * (r['test_mean'] - own['test_mean']):+.2f} "
            f"| {fresh_drop} |"
        )
    return "\n".join(lines)


def outside_budget_table(summaries: Sequence[dict], in_budget: set[str]) -> str:
    """Markdown, one row per setting run outside the budget: its seed-0
    held-out top-1 and its test top-1 over the seeds that ran it."""
    settings = {}
    for s in summaries:
        if s["run_id"] not in in_budget:
            settings.setdefault(_without_seed(s), []).append(s)
    lines = [
        "| batch | optimizer | epochs | base LR | peak LR | warm-up (epochs) "
        "| val top-1, seed 0 (%) | test top-1 (%) | seeds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config, runs in sorted(settings.items(), key=lambda item: item[0].run_id):
        seed0 = [s for s in runs if s["config"]["seed"] == 0]
        mean, spread = mean_and_spread([s["final_test_top1"] for s in runs])
        test = _percent(mean) + (f" ± {_percent(spread)}" if len(runs) > 1 else "")
        lines.append(
            f"| {config.batch_size} | {config.optimizer} | {config.epochs} "
            f"| {config.base_lr:g} | {runs[0]['peak_lr']:.4g} "
            f"| {config.warmup_epochs:g} "
            f"| {_percent(val_top1(seed0[0])) if seed0 else '-'} "
            f"| {test} | {len(runs)} |"
        )
    return "\n".join(lines)


def _base_elsewhere(group: list[dict], groups: dict) -> list[dict] | None:
    """For a group without runs at its base batch (larger batches trained
    longer, ``--base_epochs``): the base batch's runs of the group that differs
    only in having fewer epochs (the most such epochs); None otherwise."""
    config = config_of(group[0])

    def base_runs(summaries: list[dict]) -> list[dict]:
        return [
            s for s in summaries if s["config"]["batch_size"] == config.base_batch_size
        ]

    def label_at_epochs(summaries: list[dict]) -> str:
        other = dataclasses.replace(config_of(summaries[0]), epochs=config.epochs)
        return fair_setting_label(other)

    if base_runs(group):
        return None
    shorter = [
        other
        for other in groups.values()
        if other[0]["config"]["epochs"] < config.epochs
        and label_at_epochs(other) == fair_setting_label(config)
        and base_runs(other)
    ]
    if not shorter:
        return None
    return base_runs(max(shorter, key=lambda other: other[0]["config"]["epochs"]))


def write_fair_report(
    summaries: Sequence[dict], seed: int = 0, in_budget: set[str] | None = None
) -> str:
    """Markdown sections of the fair protocol's runs, per setting. With
    ``in_budget`` (``budget_run_ids``) the choices are made among those runs
    only, each larger batch's drop against its own optimizer's base follows,
    and the runs outside the budget get a table of their own."""
    groups = {}
    for summary in summaries:
        groups.setdefault(fair_setting_label(config_of(summary)), []).append(summary)
    sections = []
    for label, group in sorted(groups.items()):
        elsewhere = _base_elsewhere(group, groups)
        sections += [
            f"## Fair protocol, {label}: chosen on the held-out split (seed "
            f"{seed}); test top-1 mean ± sample std over seeds",
            fair_summary_table(group, seed, elsewhere, in_budget),
        ]
        if in_budget is not None:
            sections += _budget_sections(label, group, elsewhere, seed, in_budget)
        sections += [
            f"## Fair protocol, {label}: every run ({len(group)} finished; "
            "held-out split only)",
            fair_runs_table(group, in_budget),
        ]
    return "\n\n".join(sections)


def _budget_sections(
    label: str,
    group: list[dict],
    elsewhere: list[dict] | None,
    seed: int,
    in_budget: set[str],
) -> list[str]:
    """The drop table against each optimizer's own base and the table of the
    runs outside the budget, for one setting's ``group``."""
    base_batch = config_of(group[0]).base_batch_size
    base_runs = elsewhere or [
        s for s in group if s["config"]["batch_size"] == base_batch
    ]
    if not base_runs:
        return []
    outside = any(s["run_id"] not in in_budget for s in base_runs)
    epochs = base_runs[0]["config"]["epochs"]
    note = f"; {epochs} epochs" + ("; outside the budget" if outside else "")
    sections = [
        f"## Fair protocol, {label}: drop against each optimizer's own base "
        f"(in-budget choices; fresh seeds: all but seed {seed})",
        drop_table(
            fair_summary_rows(group, seed, in_budget),
            fair_summary_rows(base_runs, seed),
            note,
        ),
    ]
    if any(s["run_id"] not in in_budget for s in group):
        sections += [
            f"## Fair protocol, {label}: settings run outside the budget "
            "(in no choice above)",
            outside_budget_table(group, in_budget),
        ]
    return sections


# ----------------------------------------------------------------------------
# Report: tables and plots from the JSONs


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if len(values) == 1:
        return values[0], 0.0
    return statistics.mean(values), statistics.stdev(values)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def runs_table(summaries: Sequence[dict]) -> str:
    """Markdown: one row per run, sorted by batch, optimizer, rate, seed. Runs
    with --precise_bn get a column for the moving averages' top-1."""
    precise = any(s.get("final_top1_moving_bn") is not None for s in summaries)
    moving_header = " top-1 with moving BN (%) |" if precise else ""
    rows = [
        "| batch | optimizer | base LR | peak LR | warm-up (epochs) | seed "
        f"| final top-1 (%) |{moving_header} best top-1 (%) | diverged? | wall (s) |",
        "|---:|---|---:|---:|---:|---:|---:|"
        + ("---:|" if precise else "")
        + "---:|---|---:|",
    ]
    key = lambda s: (  # noqa: E731
        s["config"]["batch_size"],
        s["config"]["optimizer"] != "sgd",
        s["config"]["base_lr"],
        s["config"]["seed"],
    )
    for s in sorted(summaries, key=key):
        c = s["config"]
        moving = ""
        if precise:
            value = s.get("final_top1_moving_bn")
            moving = f" {'—' if value is None else _percent(value)} |"
        rows.append(
            f"| {c['batch_size']} | {c['optimizer'].upper()} | {c['base_lr']:g} "
            f"| {s['peak_lr']:g} | {c['warmup_epochs']:g} | {c['seed']} "
            f"| {_percent(s['final_top1'])} |{moving} {_percent(s['best_top1'])} "
            f"| {'yes' if s['diverged'] else 'no'} | {s['wall_time_s']:.0f} |"
        )
    return "\n".join(rows)


def best_per_batch(summaries: Sequence[dict], seed: int) -> dict:
    """{(batch, optimizer): the seed-``seed`` summary with the best final top-1}."""
    best = {}
    for s in summaries:
        c = s["config"]
        if c["seed"] != seed:
            continue
        key = (c["batch_size"], c["optimizer"])
        if key not in best or s["final_top1"] > best[key]["final_top1"]:
            best[key] = s
    return best


def seed_statistics(summaries: Sequence[dict], chosen: dict) -> dict:
    """{(batch, optimizer): (mean, spread, n)} of the final top-1 over the seeds
    of every run that differs from ``chosen[key]`` only in its seed."""
    stats = {}
    for key, pick in chosen.items():
        same = _without_seed(pick)
        finals = [s["final_top1"] for s in summaries if _without_seed(s) == same]
        mean, spread = mean_and_spread(finals)
        stats[key] = (mean, spread, len(finals))
    return stats


def summary_table(summaries: Sequence[dict], seed: int) -> str:
    """Markdown: per batch, SGD and the best LARS rate, mean +- std over seeds."""
    chosen = best_per_batch(summaries, seed)
    stats = seed_statistics(summaries, chosen)
    rows = [
        "| batch | SGD base LR | SGD final top-1 (%) | LARS best base LR "
        "| LARS final top-1 (%) | seeds (SGD/LARS) |",
        "|---:|---:|---:|---:|---:|---|",
    ]

    def cell(key):
        if key not in stats:
            return "—"
        mean, spread, n = stats[key]
        text = _percent(mean) + (f" ± {_percent(spread)}" if n > 1 else "")
        return text + (" (diverged)" if chosen[key]["diverged"] else "")

    for batch in sorted({b for b, _ in chosen}):
        sgd, lars = (batch, "sgd"), (batch, "lars")
        sgd_lr = f"{chosen[sgd]['config']['base_lr']:g}" if sgd in chosen else "—"
        lars_lr = f"{chosen[lars]['config']['base_lr']:g}" if lars in chosen else "—"
        counts = f"{stats.get(sgd, (0, 0, 0))[2]}/{stats.get(lars, (0, 0, 0))[2]}"
        rows.append(
            f"| {batch} | {sgd_lr} | {cell(sgd)} | {lars_lr} | {cell(lars)} "
            f"| {counts} |"
        )
    return "\n".join(rows)


def plot_accuracy_vs_batch(summaries: Sequence[dict], seed: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = best_per_batch(summaries, seed)
    stats = seed_statistics(summaries, chosen)
    all_batches = sorted({b for b, _ in stats})
    base_sgd = (min(all_batches), "sgd")
    # Left: the whole range (divergence); right: zoomed on the base accuracy.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax in axes:
        for optimizer, label in (
            ("sgd", "SGD + warm-up (linear scaling)"),
            ("lars", "LARS (best base LR)"),
        ):
            batches = sorted(b for b, o in stats if o == optimizer)
            means = [100 * stats[(b, optimizer)][0] for b in batches]
            spreads = [100 * stats[(b, optimizer)][1] for b in batches]
            ax.errorbar(
                batches, means, yerr=spreads, marker="o", capsize=3, label=label
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_batches, [str(b) for b in all_batches])
        ax.minorticks_off()
        if base_sgd in stats:  # The claim: within 1 point of the base batch.
            ax.axhline(
                100 * stats[base_sgd][0] - 1.0,
                color="gray",
                linestyle="--",
                label="base-batch SGD - 1 point",
            )
        ax.set_xlabel("batch size")
        ax.set_ylabel("final test top-1 (%)")
        ax.grid(True, alpha=0.3)
    if base_sgd in stats:
        base = 100 * stats[base_sgd][0]
        axes[1].set_ylim(base - 4.0, min(100.0, base + 1.0))
        axes[1].set_title("zoom: base accuracy - 4 points and up", fontsize=10)
    part = summaries[0]["config"]["part"] if summaries else ""
    label = setting_label(config_of(summaries[0])) if summaries else ""
    axes[0].set_title(f"{part} {label}: accuracy vs batch size", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_epoch(summaries: Sequence[dict], seed: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = best_per_batch(summaries, seed)
    largest = max(b for b, _ in chosen)
    fig, ax = plt.subplots(figsize=(6, 4))
    for optimizer in OPTIMIZERS:
        if (largest, optimizer) not in chosen:
            continue
        pick = chosen[(largest, optimizer)]["config"]
        for s in summaries:
            if _without_seed(s) != _without_seed(chosen[(largest, optimizer)]):
                continue
            curve = [100 * x for x in s["test_top1_per_epoch"]]
            ax.plot(
                range(1, len(curve) + 1),
                curve,
                marker="o",
                color="C0" if optimizer == "sgd" else "C1",
                alpha=1.0 if s["config"]["seed"] == seed else 0.4,
                label=f"{optimizer.upper()} base LR {pick['base_lr']:g}"
                if s["config"]["seed"] == seed
                else None,
            )
    epochs = chosen[(largest, "sgd" if (largest, "sgd") in chosen else "lars")]
    ax.set_xticks(range(1, epochs["config"]["epochs"] + 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"batch {largest}: test accuracy per epoch (faint: other seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setting_label(config: RunConfig) -> str:
    """What runs must share to be compared in one table: everything but the
    optimizer, batch, rate and seed (e.g. ``small_alexnet_bn_e3_w1``)."""
    label = f"{config.model}_e{config.epochs}_w{config.warmup_epochs:g}"
    if config.trust_coefficient != 0.001:
        label += f"_eta{config.trust_coefficient:g}"
    if config.momentum != 0.9:
        label += f"_m{config.momentum:g}"
    if config.base_batch_size != PART_SETTINGS[config.part].base_batch_size:
        label += f"_base{config.base_batch_size}"
    if config.train_examples or config.eval_examples:
        label += f"_n{config.train_examples}-{config.eval_examples}"
    if config.precise_bn:
        label += "_pbn"
    return label


def write_report(output_dir: str, report_dir: str, part: str, seed: int) -> str:
    """Writes ``<part>.md`` and, per setting (``setting_label``), two PNGs
    ``<part>_<setting>_*.png`` into ``report_dir``; returns the markdown."""
    every_run = [s for s in load_summaries(output_dir) if s["config"]["part"] == part]
    if not every_run:
        raise FileNotFoundError(f"no {part} runs in {output_dir}/runs")
    fair = [s for s in every_run if s["config"].get("validation")]
    summaries = [s for s in every_run if not s["config"].get("validation")]
    os.makedirs(report_dir, exist_ok=True)
    groups = {}
    for summary in summaries:
        groups.setdefault(setting_label(config_of(summary)), []).append(summary)
    sections = []
    for label, group in sorted(groups.items()):
        name = f"{part}_{label}"
        plot_accuracy_vs_batch(
            group, seed, os.path.join(report_dir, f"{name}_accuracy_vs_batch.png")
        )
        plot_accuracy_vs_epoch(
            group, seed, os.path.join(report_dir, f"{name}_largest_batch_curves.png")
        )
        sections += [
            f"## {name}: summary (seed {seed} picks the LARS rate; ± is the "
            "sample std over seeds)",
            summary_table(group, seed),
            f"Plots: `{name}_accuracy_vs_batch.png`, "
            f"`{name}_largest_batch_curves.png`.",
            f"## {name}: every run ({len(group)} finished)",
            runs_table(group),
        ]
    if fair:
        sections.insert(0, write_fair_report(fair, seed, budget_run_ids(fair)))
    markdown = "\n\n".join(sections)
    with open(os.path.join(report_dir, f"{part}.md"), "w") as f:
        f.write(markdown + "\n")
    return markdown


# ----------------------------------------------------------------------------


def _part_value(name: str, settings: PartSettings, convert=None):
    value = getattr(FLAGS, name)
    if value is None:
        return getattr(settings, name)
    if convert is not None:
        return tuple(convert(v) for v in value)
    return value


def count_trainable_params(model_name: str, part: str, data_dir: str | None) -> int:
    """Trainable parameters of ``model_name`` built for ``part``'s images."""
    import keras

    from train import models, sources

    settings = PART_SETTINGS[part]
    info = sources.describe(settings.source, data_dir, settings.tfds_name)
    model = models.build_model(
        model_name, info.num_classes, settings.image_size, info.channels
    )
    count = sum(math.prod(v.shape) for v in model.trainable_variables)
    keras.backend.clear_session()
    return int(count)


def _command() -> list[str]:
    """This process's command line, as typed from the repository root."""
    return ["python", "-m", "experiments.large_batch_study", *sys.argv[1:]]


def main(argv: list[str]) -> None:
    del argv
    # Keras says this when the test set (of unknown length) ends, every time.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
    settings = PART_SETTINGS[FLAGS.part]
    if FLAGS.report:
        print(write_report(FLAGS.output_dir, FLAGS.report_dir, FLAGS.part, FLAGS.seed))
        return
    fair_only = [
        name
        for name in ("optimizers", "fixed_base_lr", "base_epochs")
        if FLAGS[name].present
    ]
    if fair_only and not FLAGS.fair:
        print(f"--{fair_only[0]}: works with --fair only", file=sys.stderr)
        sys.exit(2)
    if not FLAGS.fair:
        print(
            "--fair: needed to run (the first protocol's runs are recorded; "
            "--report tables them)",
            file=sys.stderr,
        )
        sys.exit(2)
    import train

    try:
        run_study(settings)
    except train.UserError as error:  # A missing or wrong data folder.
        print(
            f"{error} (the study's --part_data_dir, else from --data_dir)",
            file=sys.stderr,
        )
        sys.exit(2)


def run_study(settings: PartSettings) -> None:
    """Runs (or with --dry_run lists) the fair protocol; finished runs are
    skipped."""
    import train

    data_dir = FLAGS.part_data_dir or default_part_data_dir(
        FLAGS.part, FLAGS.data_dir or train.shared_data_dir()
    )
    main_fair(settings, data_dir)


def main_fair(settings: PartSettings, data_dir: str | None) -> None:
    """``--fair``: runs (or with --dry_run lists) the fair protocol."""
    unknown = sorted(set(FLAGS.optimizers) - set(OPTIMIZERS))
    if unknown or FLAGS.part not in FAIR_PARTS:
        reason = (
            f"--optimizers: unknown {unknown}; allowed: {', '.join(OPTIMIZERS)}"
            if unknown
            else f"--fair: --part must be one of {', '.join(FAIR_PARTS)} (a "
            f"held-out split of its training set); got {FLAGS.part}"
        )
        print(reason, file=sys.stderr)
        sys.exit(2)
    base_batch = _part_value("base_batch_size", settings)
    template = RunConfig(
        part=FLAGS.part,
        model=FLAGS.model,
        optimizer="sgd",
        batch_size=base_batch,
        base_lr=0.0,
        base_batch_size=base_batch,
        epochs=_part_value("epochs", settings),
        warmup_epochs=0.0,
        seed=FLAGS.seed,
        model_params=count_trainable_params(FLAGS.model, FLAGS.part, data_dir),
        momentum=FLAGS.momentum,
        trust_coefficient=FLAGS.trust_coefficient,
        train_examples=FLAGS.train_examples,
        eval_examples=FLAGS.eval_examples,
        precise_bn=FLAGS.precise_bn,
        validation=True,
    )
    warmups = (
        tuple(float(w) for w in [FLAGS.warmup_epochs])
        if FLAGS.warmup_epochs is not None
        else WARMUP_CHOICES[FLAGS.part]
    )
    batch_sizes = [int(b) for b in FLAGS.batch_sizes or settings.batch_sizes]
    load = lambda: load_summaries(FLAGS.output_dir)  # noqa: E731
    if FLAGS.dry_run:

        def run(config: RunConfig) -> None:
            done = os.path.exists(run_path(FLAGS.output_dir, config))
            print(f"  {'done' if done else '    '} {config.run_id}")

    fixed = None
    if FLAGS.fixed_base_lr is not None:
        if FLAGS.warmup_epochs is None:
            print("--fixed_base_lr: needs --warmup_epochs", file=sys.stderr)
            sys.exit(2)
        fixed = (FLAGS.fixed_base_lr, FLAGS.warmup_epochs)
    if not FLAGS.dry_run:
        record = run_record(_command(), in_budget=fixed is None)

        def run(config: RunConfig) -> None:
            run_if_missing(config, FLAGS.output_dir, data_dir, record)

    chosen = run_fair_protocol(
        template,
        batch_sizes,
        FLAGS.optimizers,
        warmups,
        _part_value("repeat_seeds", settings, int),
        run,
        load,
        fixed,
        FLAGS.base_epochs,
    )
    for (batch, optimizer), config in sorted(chosen.items()):
        choice = (
            "undecided: later runs depend on pending ones"
            if config is None
            else f"base LR {config.base_lr:g}, warm-up {config.warmup_epochs:g}"
        )
        print(f"batch {batch} {optimizer}: {choice}")


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
