"""The large-batch study: SGD vs LARS as the batch grows, at small scale on real images.

The paper (You, Gitman & Ginsburg 2017) claims that linear learning-rate scaling
with warm-up loses accuracy as the batch grows, while LARS keeps it. This script
tests the claim on MNIST and on Imagenette at 32x32 with the small nets of
``train/models.py`` (STUDY.md has the protocol, the pre-registered residual-net
test ``--part=imagenette32_resnet8``, and the results)::

    python -m experiments.large_batch_study --batch_sizes=128,8192
    python -m experiments.large_batch_study --dry_run  # pending runs
    python -m experiments.large_batch_study --report          # tables

The fair protocol: a fixed 10% of the part's training set is held out, every
optimizer's rate and warm-up is chosen on it with the same budget (the part's
``PartSettings``; ``select_on_validation``; above the base batch the rates
scale the base batch's choice), the chosen setting is repeated over fresh
seeds, and the test set is read once per run, at its end. The schedule is a
linear warm-up from 0 to the peak rate ``base_lr * batch / base_batch``, then
poly(2) decay to 0. For a given seed every optimizer starts from the same
weights and sees the same examples in the same order.

Every run trains through the app: ``train_one`` builds the ``Config`` that
``python -m train.main`` would (``app_flags``: ``--holdout_fraction=0.1
--holdout_seed=2017``, ``--precise_bn_examples``, ``--cache``,
``--deterministic``) and calls ``train.trainer.run``. Each finished run
writes ``<output_dir>/runs/<run_id>.json`` (config, per-epoch held-out top-1,
final held-out and test top-1, diverged flag, wall time, and ``run_record``:
commit, versions, command, budget). Runs whose JSON exists are skipped, so the
study can be stopped and restarted at any time; ``--report`` rebuilds the
markdown tables from the JSONs alone, with the budget replayed on them
(``replay_budget``).
"""

import contextlib
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
from collections.abc import Callable, Iterable, Sequence

from absl import app, flags, logging

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# "nesterov" (Keras SGD with Nesterov momentum) and "lamb" (Keras Lamb) are the
# peers of the fair protocol's reality check (Nado et al. 2021).
OPTIMIZERS = ("sgd", "lars", "nesterov", "lamb")
# Training examples whose statistics --precise_bn averages (whole batches).
PRECISE_BN_EXAMPLES = 4096
# A run whose final test top-1 is at most this multiple of chance learned nothing.
DIVERGED_CHANCE_MULTIPLE = 2.0
# Base rates tried at the base batch, per optimizer: three, a factor 4 apart,
# around the rate known to train there. Lamb's relative step (rate x ||w||) is
# LARS's (rate x eta x ||w||) with eta = 0.001, hence LARS's grid / 1000.
BASE_RATE_GRIDS = {
    "sgd": (0.0125, 0.05, 0.2),
    "nesterov": (0.0125, 0.05, 0.2),
    "lars": (1.0, 4.0, 16.0),
    "lamb": (0.001, 0.004, 0.016),
}


def _round_rate(rate: float) -> float:
    """Four significant digits: a rate computed twice gives the same run id."""
    return float(f"{rate:.4g}")


@dataclasses.dataclass(frozen=True)
class PartSettings:
    """The defaults of one part of the study (each can be overridden by a
    flag), and its selection budget (``select_on_validation``)."""

    source: str  # train.data source name
    image_size: int
    augmentation: str
    base_batch_size: int  # The batch the base rates refer to.
    batch_sizes: tuple[int, ...]
    epochs: int
    repeat_seeds: tuple[int, ...]
    # The budget: the grid's warm-up first, then the others at the best rate.
    warmups: tuple[float, ...]
    base_rate_grids: dict = dataclasses.field(default_factory=lambda: BASE_RATE_GRIDS)
    # Above the base batch: base rates choice * k**e for k = batch / base.
    scaled_exponents: tuple[float, ...] = (-0.5, -0.25, 0.0)
    max_extensions: int = 1  # Rates added past an edge while the best is on it.
    model: str = "small_alexnet_bn"
    precise_bn: bool = False
    weight_decay: float = 0.0
    exclude_bias_and_norm: bool = False


PART_SETTINGS = {
    "mnist": PartSettings(
        source="mnist",
        image_size=28,
        augmentation="none",
        base_batch_size=128,
        batch_sizes=(128, 512, 2048, 4096, 8192),
        epochs=3,
        repeat_seeds=(1, 2),
        warmups=(1.0, 2.0),
    ),
    # 9,469 training images: batch 2048 is 4 steps an epoch, 32x the base.
    "imagenette": PartSettings(
        source="imagenet",
        image_size=64,
        augmentation="minimal",
        base_batch_size=64,
        batch_sizes=(64, 2048),
        epochs=10,
        repeat_seeds=(),
        warmups=(2.0, 5.0),
    ),
}
# Imagenette at 32x32: a quarter of the 64x64 part's compute per image, so the
# fair protocol's selection and seeds fit a few hours of a 2-core machine.
PART_SETTINGS["imagenette32"] = dataclasses.replace(
    PART_SETTINGS["imagenette"], image_size=32, repeat_seeds=(1, 2)
)
# The pre-registered residual-net test (STUDY.md): rates r0 * 32**e at the
# base batch, r64 * 32**e (no scaling to linear) at 2048, grid step 32**0.25.
PART_SETTINGS["imagenette32_resnet8"] = dataclasses.replace(
    PART_SETTINGS["imagenette32"],
    epochs=40,
    repeat_seeds=(1, 2, 3),
    warmups=(5.0, 2.0, 10.0),
    base_rate_grids={
        optimizer: tuple(_round_rate(r0 * 32**e) for e in (-0.5, -0.25, 0, 0.25, 0.5))
        for optimizer, r0 in (("sgd", 0.1), ("lars", 4.0))
    },
    scaled_exponents=(-1.0, -0.75, -0.5, -0.25, 0.0),
    max_extensions=3,
    model="resnet8",
    precise_bn=True,
    weight_decay=1e-4,
    exclude_bias_and_norm=True,
)
PARTS = tuple(PART_SETTINGS)


def default_part_data_dir(part: str, shared_data_dir: str) -> str:
    """MNIST's IDX files in the shared data folder; for Imagenette, the TFRecords
    of images resized to ``stored_image_size`` that ``train.convert_images``
    writes into the git-ignored ``runs/`` (STUDY.md has the command)."""
    settings = PART_SETTINGS[part]
    if settings.source == "mnist":
        return os.path.join(shared_data_dir, "mnist")
    side = stored_image_size(settings.image_size)
    return os.path.join(REPO_ROOT, "runs", f"imagenette{side}")


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
        "The part's own data folder; default <data_dir>/mnist, and for "
        "Imagenette runs/imagenetteN (the images resized to N pixels: "
        "train.convert_images --shorter_side=N; STUDY.md has the command).",
    )


def _define_run_flags() -> None:
    """The runs' model, batches, length and optimizer settings."""
    flags.DEFINE_string("model", None, "train.models model name; default per part.")
    flags.DEFINE_list("batch_sizes", None, "Batch sizes; default per part.")
    flags.DEFINE_integer(
        "base_batch_size", None, "Batch the base rates refer to; default per part."
    )
    flags.DEFINE_integer("epochs", None, "Epochs of every run; default per part.")
    flags.DEFINE_float(
        "warmup_epochs",
        None,
        "The only warm-up tried (epochs); default the part's warm-ups.",
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
    flags.DEFINE_bool(
        "precise_bn",
        None,
        "Test with BN statistics recomputed on training batches after training "
        "(the moving averages' result is kept as final_val_top1_moving_bn); "
        "default per part.",
    )


def _define_protocol_flags() -> None:
    """The fair protocol's choices, and the dry-run and report modes."""
    flags.DEFINE_list(
        "optimizers",
        ["sgd", "lars"],
        f"Any of {', '.join(OPTIMIZERS)}; each chooses its rate and warm-up on "
        "the held-out split with the same budget, then repeats the choice over "
        "--repeat_seeds.",
    )
    flags.DEFINE_float(
        "fixed_base_lr",
        None,
        "No selection; this base rate with --warmup_epochs, over "
        "--seed and --repeat_seeds (a check outside the equal budget).",
    )
    flags.DEFINE_integer(
        "base_epochs",
        None,
        "The base batch trains this many epochs (its rate chosen "
        "at that length) while the other batches train --epochs (default: the "
        "same), as in the paper's Table 5.",
        lower_bound=1,
    )
    flags.DEFINE_bool("dry_run", False, "Print the pending runs and exit.")
    flags.DEFINE_bool("report", False, "Rebuild the tables from the JSONs only.")
    flags.DEFINE_string(
        "report_dir",
        os.path.join(REPO_ROOT, "experiments", "results"),
        "Where --report writes <part>.md.",
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
    # test set once, at the end (the app's --holdout_fraction).
    validation: bool = False
    # The app's meaning: inside the trust ratio for LARS, an L2 term for SGD.
    weight_decay: float = 0.0
    # Biases and BN parameters neither decayed nor adapted (the app's default;
    # the study's first parts adapted them).
    exclude_bias_and_norm: bool = False

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
        if self.weight_decay:
            run_id += f"_wd{self.weight_decay:g}"
        if self.exclude_bias_and_norm:
            run_id += "_xbn"
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
    """Trains one configuration through the app (``train.trainer.run``, the
    ``Config`` that ``python -m train.main`` builds from ``app_flags``) in a
    temporary model folder, and returns the run's summary (see the module doc)."""
    import tempfile

    import train
    from train import config as app_config
    from train import trainer

    with tempfile.TemporaryDirectory(prefix="lars_tf_study_") as model_dir:
        app = app_config.make_config(**app_flags(config, data_dir, model_dir))
        params = count_trainable_params(config.model, config.part, data_dir)
        if config.model_params and params != config.model_params:
            raise RuntimeError(
                f"{config.model} has {params} trainable parameters, the study was "
                f"set up for {config.model_params}: train/models.py changed; restart"
            )
        start = time.perf_counter()
        try:
            result = trainer.run(app)
        except train.RunError as error:  # --max_nonfinite_steps in a row.
            logging.warning("%s: %s", config.run_id, error)
            result = None
        wall_time = time.perf_counter() - start
    return _study_summary(config, app, result, wall_time)


def app_flags(config: RunConfig, data_dir: str | None, model_dir: str) -> dict:
    """The app's flags of a run: the part's data less its held-out split, the
    paper's schedule (linear warm-up from 0, poly(2) decay to 0), one
    evaluation of the held-out split per epoch and of the test set (the app's
    validation split) at the end, deterministic data order and ops."""
    if not config.validation or config.eval_examples:
        raise ValueError(
            f"{config.run_id}: the study trains with its held-out split and the "
            "whole test set only (validation=True, eval_examples=None)"
        )
    settings = PART_SETTINGS[config.part]
    optimizer = {"nesterov": "sgd"}.get(config.optimizer, config.optimizer)
    examples = _train_examples(config.part, data_dir)
    trained_on = examples - round(VALIDATION_FRACTION * examples)
    # A smoke run's epoch (train_examples) in the app's epochs of trained_on.
    steps_per_epoch = (config.train_examples or trained_on) // config.batch_size
    epoch = steps_per_epoch / max(1, trained_on // config.batch_size)
    return dict(
        source=settings.source,
        data_dir=data_dir,
        image_size=settings.image_size,
        augmentation=settings.augmentation,
        cache=True,
        holdout_fraction=VALIDATION_FRACTION,
        holdout_seed=VALIDATION_SPLIT_SEED,
        model=config.model,
        global_batch_size=config.batch_size,
        train_steps=config.epochs * steps_per_epoch,
        optimizer=optimizer,
        nesterov=config.optimizer == "nesterov",
        base_learning_rate=config.base_lr,
        base_batch_size=config.base_batch_size,
        lr_scaling="linear",
        warmup_epochs=config.warmup_epochs * epoch,
        lr_schedule="poly",
        poly_power=2.0,
        end_learning_rate=0.0,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        trust_coefficient=config.trust_coefficient,
        # Keras Lamb's default, which the recorded Lamb runs used.
        epsilon=1e-7 if optimizer == "lamb" else 0.0,
        exclude_bias_and_norm=config.exclude_bias_and_norm,
        deterministic=True,  # Same data order for every optimizer.
        seed=config.seed,
        model_dir=model_dir,
        epochs_between_evals=epoch,
        checkpoint_every_steps=config.epochs * steps_per_epoch,
        keep_checkpoints=1,
        steps_per_loop=steps_per_epoch,
        log_every_steps=steps_per_epoch,
        precise_bn_examples=PRECISE_BN_EXAMPLES if config.precise_bn else 0,
    )


@functools.cache
def _train_examples(part: str, data_dir: str | None) -> int:
    """The number of examples of ``part``'s training set (held-out split included)."""
    from train import sources

    settings = PART_SETTINGS[part]
    return sources.describe(settings.source, data_dir).train_examples


def _study_summary(
    config: RunConfig, app, result: dict | None, wall_time: float
) -> dict:
    """The study's summary of a run from the app's summary.json contents
    (``result``; None for a run stopped by non-finite steps, which counts as
    chance)."""
    chance = 1.0 / app.data.num_classes
    steps_per_epoch = app.train_steps // config.epochs
    history = (result or {}).get("history", [])
    val_curve = [entry["holdout"]["top1"] for entry in history]
    train_loss = [entry["train"]["loss"] for entry in history]
    if result is None:
        final_val = final_test = chance
        moving_bn = None
    else:
        final_val = result["holdout"]["top1"]
        final_test = result["eval"]["top1"]
        moving_bn = result.get("holdout_moving_bn", {}).get("top1")
    loss_not_finite = result is None or any(not math.isfinite(x) for x in train_loss)
    return {
        "run_id": config.run_id,
        "config": dataclasses.asdict(config),
        "peak_lr": config.peak_lr,
        "steps_per_epoch": steps_per_epoch,
        "train_steps": app.train_steps,
        "val_top1_per_epoch": val_curve,
        "train_loss_per_epoch": train_loss,
        "final_val_top1": final_val,
        "final_val_top1_moving_bn": moving_bn,  # With precise_bn only.
        "best_val_top1": max(val_curve + [final_val]),
        "final_test_top1": final_test,
        "val_examples": None if result is None else result["holdout"]["examples"],
        "test_examples": None if result is None else result["eval"]["examples"],
        "diverged": loss_not_finite or final_val <= DIVERGED_CHANCE_MULTIPLE * chance,
        "loss_not_finite": loss_not_finite,
        "nonfinite_steps": None if result is None else result["nonfinite_steps"],
        "wall_time_s": wall_time,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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
    """Trains ``config`` unless its JSON exists or another process is
    training it (the run's lock file beside the JSON); True when it trained.
    The JSON holds the run's summary and ``record`` (``run_record``).

    A JSON that cannot be written (a full disk, a read-only folder) exits 2
    with one line naming the file, the summary printed on stderr."""
    import train
    from train import model_folder

    path = run_path(output_dir, config)
    if os.path.exists(path):
        logging.info("skip %s (done)", config.run_id)
        return False
    runs_dir = os.path.dirname(path)
    try:
        run_lock = model_folder.lock(
            runs_dir, f"{config.run_id}.lock", flag="--output_dir"
        )
    except train.UserError as error:
        logging.info("skip %s (another process trains it: %s)", config.run_id, error)
        return False
    try:
        if os.path.exists(path):  # Finished between the check and the lock.
            logging.info("skip %s (done)", config.run_id)
            return False
        logging.info("run %s (peak lr %g)", config.run_id, config.peak_lr)
        summary = train_one(config, data_dir)
        summary.update(record or {})
        _write_json(path, summary)
    finally:
        if run_lock is not None:  # None for a folder behind a URL.
            run_lock.release()
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
# Above the base batch, an optimizer's rate grid scales the base-batch choice
# of the optimizer named here (itself when absent): heavy-ball and Nesterov
# momentum share one rate scale, so Nesterov needs no base-batch selection of
# its own (it would cost as many runs as the large batch's).
RATE_ANCHOR = {"nesterov": "sgd"}


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


def scaled_rate_grid(
    base_choice: float,
    batch: int,
    base_batch: int,
    exponents: Sequence[float] = (-0.5, -0.25, 0.0),
) -> list[float]:
    """Base rates (the run's base_lr, which the schedule scales linearly)
    ``base_choice * k**e`` for ``k = batch / base_batch``: with the default
    exponents the peak rate spans square-root (``base_choice * sqrt(k)``) to
    linear scaling (``base_choice * k``) of the base batch's choice."""
    k = batch / base_batch
    return [_round_rate(base_choice * k**exponent) for exponent in exponents]


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
    max_extensions: int = 1,
) -> RunConfig | None:
    """Chooses ``template``'s base rate and warm-up on the held-out split.

    The same budget for every optimizer and batch: ``rates`` at the first
    warm-up, one rate past the edge while the best lies on it (at most
    ``max_extensions``), then each other warm-up at the best rate; the best
    of all these runs is the choice.
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
    for _ in range(max_extensions):
        extension = edge_extension(grid, best)
        if extension is None:
            break
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
    at the base batch over the part's ``base_rate_grids``, elsewhere over
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
    settings = PART_SETTINGS[template.part]
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
            rates = settings.base_rate_grids[optimizer]
        else:
            anchor = RATE_ANCHOR.get(optimizer, optimizer)
            if (base_batch, anchor) not in chosen:
                chosen[(base_batch, anchor)] = choose(base_batch, anchor)
            base_choice = chosen[(base_batch, anchor)]
            if base_choice is None:
                return None
            rates = scaled_rate_grid(
                base_choice.base_lr, batch, base_batch, settings.scaled_exponents
            )
        return select_on_validation(
            arm, rates, warmups, run, load, settings.max_extensions
        )

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
    (every rate of the part's ``base_rate_grids`` at ``warmup``, seed 0) for some
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
        for optimizer, rates in PART_SETTINGS[
            group[0]["config"]["part"]
        ].base_rate_grids.items()
    )


def _base_epochs_of(group: list[dict], part_groups: dict) -> int | None:
    """The epochs of the base batch whose choices ``group``'s larger batches
    scale: None when ``group`` selected its own base batch, else those of the
    group with the most shorter epochs (``--base_epochs``)."""
    if _has_base_selection(group, PART_SETTINGS[group[0]["config"]["part"]].warmups[0]):
        return None
    base = group[0]["config"]["base_batch_size"]
    larger = [s for s in group if s["config"]["batch_size"] != base]
    elsewhere = _base_elsewhere(larger or group, part_groups)
    return elsewhere[0]["config"]["epochs"] if elsewhere else None


def replay_budget(
    summaries: Sequence[dict],
) -> tuple[set[str], set[str], set[str]]:
    """The ids of the recorded fair-protocol runs that the equal budget asks
    for, of those that a selection still waiting for runs asked for
    (pending: in or out once it is decided), and of the seed-0 runs the
    selections chose (the run path's choice, first of equals in grid order).

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
    asked, pending, choices = set(), set(), set()
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
                    PART_SETTINGS[part].warmups,
                    PART_SETTINGS[part].repeat_seeds,
                    lambda config, cell=cell: cell.add(config.run_id),
                    lambda: list(summaries),
                    base_epochs=_base_epochs_of(group, groups),
                )
                if chosen[(batch, optimizer)] is not None:
                    asked |= cell
                    choices.add(chosen[(batch, optimizer)].run_id)
                else:
                    pending |= cell
    recorded = {s["run_id"] for s in summaries}
    # A larger batch's replay asks for its base's runs too.
    return asked & recorded, (pending - asked) & recorded, choices


def fair_setting_label(config: RunConfig) -> str:
    """What fair-protocol runs must share to be compared: ``setting_label``
    without the warm-up, which is chosen per run."""
    return setting_label(dataclasses.replace(config, warmup_epochs=0.0)).replace(
        "_w0", ""
    )


def fair_summary_rows(
    summaries: Sequence[dict],
    seed: int = 0,
    in_budget: set[str] | None = None,
    choices: set[str] = frozenset(),
) -> list[dict]:
    """Per (batch, optimizer) of one setting: the seed-``seed`` run chosen on
    the held-out split (among every rate and warm-up tried; only runs in
    ``in_budget`` when given; of equals, the one in ``choices``, the
    selection's own, else the first), its validation top-1, and the test
    top-1 of that setting over every seed that ran it and over the fresh
    seeds (all but ``seed``, the selection's) alone."""
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
        pick = max(tried, key=lambda s: (val_top1(s), s["run_id"] in choices))
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
                "fresh": fresh,
                "diverged": any(s["diverged"] for s in repeats),
            }
        )
    return rows


def fair_summary_table(
    summaries: Sequence[dict],
    seed: int = 0,
    base_summaries: Sequence[dict] | None = None,
    in_budget: set[str] | None = None,
    choices: set[str] = frozenset(),
) -> str:
    """Markdown of ``fair_summary_rows``, with the gap of the mean test top-1 to
    the base batch's (smallest batch's) best mean test top-1 over optimizers:
    of ``base_summaries`` when given (a base batch trained for another number
    of epochs, ``--base_epochs``), else of ``summaries``."""
    rows = fair_summary_rows(summaries, seed, in_budget, choices)
    base_rows = fair_summary_rows(base_summaries or summaries, seed, None, choices)
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
    summaries: Sequence[dict],
    in_budget: set[str] | None = None,
    pending: frozenset[str] = frozenset(),
) -> str:
    """Markdown, one row per run: the held-out split's top-1 only (the test
    set is shown for the chosen settings only, in ``fair_summary_table``),
    and with ``in_budget`` whether the equal budget asked for the run ("in",
    "pending" for a run in ``pending``, "**outside**")."""
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
            + ("" if in_budget is None else f" {_budget_word(s, in_budget, pending)} |")
        )
    return "\n".join(lines)


def _budget_word(summary: dict, in_budget: set[str], pending: frozenset[str]) -> str:
    if summary["run_id"] in pending:
        return "pending"
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


def drop_difference(
    sgd_base: Sequence[float],
    sgd_large: Sequence[float],
    lars_base: Sequence[float],
    lars_large: Sequence[float],
) -> dict:
    """The pre-registered statistic (STUDY.md): ``D = drop_SGD - drop_LARS``
    with ``drop = mean(base) - mean(large)``, in points, from four independent
    groups of per-seed test top-1 (fractions, at least 2 each); its standard
    error ``sqrt(sum s_i**2 / n_i)``, Welch-Satterthwaite degrees of freedom,
    the two-sided 95% t interval and the p value of ``D = 0``, and the
    verdict: "supported" (D > 1 and the interval above 0), "contradicted"
    (the interval below 1) or "not shown"."""
    from scipy import stats

    groups = [
        [100 * x for x in g] for g in (sgd_base, sgd_large, lars_base, lars_large)
    ]
    means = [statistics.mean(g) for g in groups]
    variances = [statistics.variance(g) / len(g) for g in groups]
    d = (means[0] - means[1]) - (means[2] - means[3])
    se = math.sqrt(sum(variances))
    df = se**4 / sum(v**2 / (len(g) - 1) for v, g in zip(variances, groups))
    half = stats.t.ppf(0.975, df) * se
    low, high = d - half, d + half
    if d > 1 and low > 0:
        verdict = "supported"
    elif high < 1:
        verdict = "contradicted"
    else:
        verdict = "not shown"
    p = 2 * stats.t.sf(abs(d) / se, df) if se else 0.0
    return {
        "D": d,
        "se": se,
        "df": df,
        "low": low,
        "high": high,
        "p": p,
        "verdict": verdict,
    }


def drop_difference_line(rows: Sequence[dict], base_rows: Sequence[dict]) -> str:
    """One markdown line per larger batch: ``drop_difference`` over the fresh
    seeds of SGD and LARS there and at their own base; empty without two
    fresh seeds in each of the four cells."""
    base_batch = min(r["batch"] for r in base_rows)
    base = {r["optimizer"]: r for r in base_rows if r["batch"] == base_batch}
    large = {}
    for r in rows:
        if r["batch"] != base_batch:
            large.setdefault(r["batch"], {})[r["optimizer"]] = r
    lines = []
    for batch, cells in sorted(large.items()):
        groups = [
            cell.get(optimizer, {}).get("fresh", [])
            for optimizer in ("sgd", "lars")
            for cell in (base, cells)
        ]
        if min(len(g) for g in groups) < 2:
            continue
        r = drop_difference(*groups)
        lines.append(
            f"- batch {batch}: D = drop_SGD - drop_LARS = {r['D']:+.2f} points "
            f"(95% CI {r['low']:+.2f}, {r['high']:+.2f}; Welch-Satterthwaite "
            f"df {r['df']:.1f}), p = {r['p']:.3f}, over the fresh seeds: "
            f"{r['verdict']} by the pre-registered test's rule (STUDY.md)"
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
    summaries: Sequence[dict],
    seed: int = 0,
    in_budget: set[str] | None = None,
    pending: frozenset[str] = frozenset(),
    choices: set[str] = frozenset(),
) -> str:
    """Markdown sections of the fair protocol's runs, per setting. With
    ``in_budget``, ``pending`` and ``choices`` (``replay_budget``) the choices
    are the selections' own, made among the runs in the budget only; each
    larger batch's drop against its own optimizer's base follows, and the runs
    outside the budget (neither in nor pending) get a table of their own."""
    groups = {}
    for summary in summaries:
        groups.setdefault(fair_setting_label(config_of(summary)), []).append(summary)
    sections = []
    for label, group in sorted(groups.items()):
        elsewhere = _base_elsewhere(group, groups)
        sections += [
            f"## Fair protocol, {label}: chosen on the held-out split (seed "
            f"{seed}); test top-1 mean ± sample std over seeds",
            fair_summary_table(group, seed, elsewhere, in_budget, choices),
        ]
        if in_budget is not None:
            sections += _budget_sections(
                label, group, elsewhere, seed, in_budget, pending, choices
            )
        sections += [
            f"## Fair protocol, {label}: every run ({len(group)} finished; "
            "held-out split only)",
            fair_runs_table(group, in_budget, pending),
        ]
    return "\n\n".join(sections)


def _budget_sections(
    label: str,
    group: list[dict],
    elsewhere: list[dict] | None,
    seed: int,
    in_budget: set[str],
    pending: frozenset[str],
    choices: set[str],
) -> list[str]:
    """The drop table against each optimizer's own base and the table of the
    runs outside the budget (neither in it nor ``pending``), for one
    setting's ``group``."""
    asked = in_budget | pending
    base_batch = config_of(group[0]).base_batch_size
    base_runs = elsewhere or [
        s for s in group if s["config"]["batch_size"] == base_batch
    ]
    if not base_runs:
        return []
    outside = any(s["run_id"] not in asked for s in base_runs)
    epochs = base_runs[0]["config"]["epochs"]
    note = f"; {epochs} epochs" + ("; outside the budget" if outside else "")
    rows = fair_summary_rows(group, seed, in_budget, choices)
    base_rows = fair_summary_rows(base_runs, seed, None, choices)
    sections = [
        f"## Fair protocol, {label}: drop against each optimizer's own base "
        f"(in-budget choices; fresh seeds: all but seed {seed})",
        drop_table(rows, base_rows, note),
    ]
    differences = drop_difference_line(rows, base_rows)
    if differences:
        sections.append(differences)
    if any(s["run_id"] not in asked for s in group):
        sections += [
            f"## Fair protocol, {label}: settings run outside the budget "
            "(in no choice above)",
            outside_budget_table(group, asked),
        ]
    return sections


# ----------------------------------------------------------------------------
# Report: tables from the JSONs


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if len(values) == 1:
        return values[0], 0.0
    return statistics.mean(values), statistics.stdev(values)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


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
    if config.weight_decay:
        label += f"_wd{config.weight_decay:g}"
    if config.exclude_bias_and_norm:
        label += "_xbn"
    return label


def write_report(output_dir: str, report_dir: str, part: str, seed: int) -> str:
    """Writes ``<part>.md`` (``write_fair_report`` of the part's runs, the
    budget replayed on them) into ``report_dir``; returns the markdown."""
    summaries = [s for s in load_summaries(output_dir) if s["config"]["part"] == part]
    if not summaries:
        raise FileNotFoundError(f"no {part} runs in {output_dir}/runs")
    markdown = write_fair_report(summaries, seed, *replay_budget(summaries))
    os.makedirs(report_dir, exist_ok=True)
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


def _write_json(path: str, summary: dict) -> None:
    """Writes ``summary`` to ``path`` whole or not at all (a killed run never
    leaves a half-written JSON); on an OSError, exits 2 with one line naming
    the file, the summary on stderr so the run's result is not lost."""
    partial = path + ".partial"
    try:
        with open(partial, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(partial, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(partial)
        print(json.dumps(summary), file=sys.stderr)
        print(
            f"{path}: cannot write the run's JSON ({error.strerror}); its summary "
            "is the line above. Free space or give a writable --output_dir.",
            file=sys.stderr,
        )
        sys.exit(2)


def count_trainable_params(model_name: str, part: str, data_dir: str | None) -> int:
    """Trainable parameters of ``model_name`` built for ``part``'s images."""
    import keras

    from train import models, sources

    settings = PART_SETTINGS[part]
    info = sources.describe(settings.source, data_dir)
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
    # Unlike train.main with --deterministic, oneDNN's CPU kernels stay on:
    # they train resnet8 markedly faster on CPU, and they change a rerun's
    # results in the last bits only (data order, weights and augmentation are
    # fixed by the seed).
    if FLAGS.report:
        print(write_report(FLAGS.output_dir, FLAGS.report_dir, FLAGS.part, FLAGS.seed))
        return
    import train

    data_dir = FLAGS.part_data_dir or default_part_data_dir(
        FLAGS.part, FLAGS.data_dir or train.shared_data_dir()
    )
    try:
        run_study(PART_SETTINGS[FLAGS.part], data_dir)
    except train.UserError as error:  # A missing or wrong data folder.
        print(
            f"{error} (the study's --part_data_dir, else from --data_dir; "
            "STUDY.md's 'How to reproduce' makes the Imagenette records)",
            file=sys.stderr,
        )
        sys.exit(2)


def run_study(settings: PartSettings, data_dir: str) -> None:
    """Runs (or with --dry_run lists) the fair protocol; finished runs are
    skipped."""
    unknown = sorted(set(FLAGS.optimizers) - set(OPTIMIZERS))
    if unknown:
        print(
            f"--optimizers: unknown {unknown}; allowed: {', '.join(OPTIMIZERS)}",
            file=sys.stderr,
        )
        sys.exit(2)
    fixed = None
    if FLAGS.fixed_base_lr is not None:
        if FLAGS.warmup_epochs is None:
            print("--fixed_base_lr: needs --warmup_epochs", file=sys.stderr)
            sys.exit(2)
        fixed = (FLAGS.fixed_base_lr, FLAGS.warmup_epochs)
    base_batch = _part_value("base_batch_size", settings)
    model = _part_value("model", settings)
    template = RunConfig(
        part=FLAGS.part,
        model=model,
        optimizer="sgd",
        batch_size=base_batch,
        base_lr=0.0,
        base_batch_size=base_batch,
        epochs=_part_value("epochs", settings),
        warmup_epochs=0.0,
        seed=FLAGS.seed,
        model_params=count_trainable_params(model, FLAGS.part, data_dir),
        momentum=FLAGS.momentum,
        trust_coefficient=FLAGS.trust_coefficient,
        train_examples=FLAGS.train_examples,
        precise_bn=_part_value("precise_bn", settings),
        validation=True,
        weight_decay=settings.weight_decay,
        exclude_bias_and_norm=settings.exclude_bias_and_norm,
    )
    warmups = (
        (FLAGS.warmup_epochs,) if FLAGS.warmup_epochs is not None else settings.warmups
    )
    batch_sizes = [int(b) for b in FLAGS.batch_sizes or settings.batch_sizes]
    load = lambda: load_summaries(FLAGS.output_dir)  # noqa: E731
    if FLAGS.dry_run:

        def run(config: RunConfig) -> None:
            done = os.path.exists(run_path(FLAGS.output_dir, config))
            print(f"  {'done' if done else '    '} {config.run_id}")

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
