"""The app's flags and the run configuration they resolve to; imports no TensorFlow.

Every flag of `python -m train.main` is defined here once (`define_flags`),
with what it allows: absl's bounds for whole numbers, enums for names, and
absl validators for real numbers (the ranges of `lars_tf.validation`, shared
with LARS's own argument checks) and for flags that must agree. absl checks
them as it parses. `from_flag_values` (the command line) and
`make_config(**overrides)` (programs and the tests) turn the parsed flags into
a frozen `Config` through `build_config`, which checks what the flags alone
cannot tell, in order of cost: the cluster of `$TF_CONFIG` and the model folder,
then the data folder's facts (`train.sources`), and last the model name, which
needs the Keras import (the names come from the builders in `train/models.py`).
It decides every derived fact once: the data's facts, augmentation, steps per
epoch, training and warm-up steps, the peak learning rate and the model folder.
Nothing below `train.main` sees absl. Any mistake raises `train.FlagError` (one
line, naming the flag and what is allowed).

The second half of the file keeps the run's configuration in its model folder:
`check_resume` compares a resumed run with the one recorded there.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from typing import Any

from absl import flags

from train import AUGMENTATIONS, FlagError, RunError, UserError, sources
from train import lars_tf_validation as validation
from train.data_service import parse_address

OPTIMIZERS = ("lars", "sgd", "lamb", "adamw")
SCHEDULES = ("poly", "cosine", "step")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
MAX_SEED = 2**31 - 1  # NumPy's and TensorFlow's seeds are 32-bit.
RUN_RECORD = "config.json"  # The run's configuration, in its model folder.

# A range check of `lars_tf.validation`'s form: (value, name) -> value, or a
# ValueError "`name` must be ...".
RangeCheck = Callable[[Any, str], Any]


def _range(
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> RangeCheck:
    """A range check for one of the app's own real-number flags."""
    return lambda value, name: validation.check_number(
        name, value, low, high, low_open=low_open, high_open=high_open
    )


def _define_real(
    name: str, default: float, help_text: str, check: RangeCheck, fv: dict
) -> None:
    """DEFINE_float with an absl validator that runs `check`.

    absl's lower_bound/upper_bound refuse neither NaN nor infinity and cannot
    leave an end open (> 0), which these ranges need.
    """
    flags.DEFINE_float(name, default, help_text, **fv)

    def validator(value: float) -> bool:
        try:
            check(value, name)
        except ValueError as error:  # "`name` must be ...": absl names the flag.
            message = str(error).removeprefix(f"`{name}` ")
            raise flags.ValidationError(message) from None
        return True

    flags.register_validator(name, validator, **fv)


def _check_decay_epochs(epochs: list[str]) -> bool:
    """absl validator of --lr_decay_epochs: finite numbers >= 0, increasing."""
    try:
        values = [float(epoch) for epoch in epochs]
    except ValueError:
        raise flags.ValidationError("must be a list of numbers") from None
    for value in values:
        if not (math.isfinite(value) and value >= 0):
            raise flags.ValidationError(
                f"must be finite numbers >= 0. Received: {value}"
            )
    if values != sorted(values):
        raise flags.ValidationError("must be increasing")
    return True


def _define_data_flags(fv: dict) -> None:
    """The model and its data."""
    flags.DEFINE_string(
        "model",
        "small_alexnet_bn",
        "Model to train: a builder of train/models.py (small_alexnet_bn, "
        "small_alexnet, alexnet, alexnet_bn, resnet50, googlenet, resnet20, "
        "resnet8).",
        **fv,
    )
    flags.DEFINE_enum(
        "source",
        "auto",
        ("auto", *sources.SOURCE_NAMES),
        "Input data. `auto`: the data set found in --data_dir; without "
        "--data_dir, MNIST in the shared data folder, else synthetic images of "
        "MNIST's shape (with a warning). Nothing is ever downloaded.",
        **fv,
    )
    flags.DEFINE_string(
        "data_dir",
        None,
        "Folder of the dataset's files: the IDX files for mnist/fashion_mnist, "
        "TFRecords (train.convert_images) for imagenet, TFDS's data dir for "
        "tfds. Default: <data root>/<source> (data root: $LARS_TF_DATA_DIR, else "
        "../shared/data next to the repository); TFDS's default for tfds.",
        **fv,
    )
    flags.DEFINE_string("tfds_name", None, "TFDS dataset name for --source=tfds.", **fv)
    flags.DEFINE_integer(
        "image_size",
        None,
        "Square input size; default: the dataset's own.",
        lower_bound=1,
        **fv,
    )
    flags.DEFINE_integer(
        "num_classes",
        None,
        "Number of classes; default: the dataset's own.",
        lower_bound=2,
        **fv,
    )
    flags.DEFINE_enum(
        "augmentation",
        None,
        AUGMENTATIONS,
        "Training augmentation level (see train/preprocessing.py). Default: "
        "minimal for photos (imagenet, tfds), none for digits (a flipped digit "
        "is another digit) and synthetic data.",
        **fv,
    )
    flags.DEFINE_bool(
        "cache",
        False,
        "Keep each split's decoded images in memory after its first pass "
        "(small datasets); later epochs shuffle them in the first epoch's "
        "file order.",
        **fv,
    )
    flags.DEFINE_string(
        "data_service",
        None,
        "grpc://HOST:PORT of a tf.data service dispatcher (python -m "
        "train.data_service); its workers make the training batches and must see "
        "--data_dir at the same path. Evaluation stays in this process.",
        **fv,
    )
    flags.DEFINE_integer(
        "max_skipped_records",
        10,
        "Records whose image does not decode are skipped, named on stderr and "
        "counted in summary.json; one more than this many stops the run.",
        lower_bound=0,
        **fv,
    )


def _define_holdout_flags(fv: dict) -> None:
    """The held-out part of the training set."""
    _define_real(
        "holdout_fraction",
        0.0,
        "Hold out this fraction of the training set (round(F*N) examples, by "
        "--holdout_seed and the record order; never trained on) as the split "
        "evaluated during training; the validation (test) split is then "
        "evaluated once, at the end. 0: off.",
        _range(0, 0.5, high_open=True),
        fv,
    )
    flags.DEFINE_integer(
        "holdout_seed",
        0,
        "Seed of the --holdout_fraction split (fixed: independent of --seed).",
        lower_bound=0,
        upper_bound=MAX_SEED,
        **fv,
    )


def _define_length_and_rate_flags(fv: dict) -> None:
    """Length of training, batch size and the learning-rate schedule."""
    flags.DEFINE_integer(
        "global_batch_size", 4096, "Batch over all replicas.", lower_bound=1, **fv
    )
    _define_real(
        "train_epochs", 3.0, "Training length in epochs.", _range(0, low_open=True), fv
    )
    flags.DEFINE_integer(
        "train_steps",
        None,
        "Training length in steps; overrides --train_epochs.",
        lower_bound=1,
        **fv,
    )
    flags.DEFINE_enum("optimizer", "lars", OPTIMIZERS, "Optimizer.", **fv)
    _define_real(
        "base_learning_rate",
        0.4,
        "Learning rate at --base_batch_size, scaled to --global_batch_size by "
        "--lr_scaling.",
        functools.partial(validation.check_learning_rate, allow_zero=False),
        fv,
    )
    flags.DEFINE_integer(
        "base_batch_size", 256, "Batch of --base_learning_rate.", lower_bound=1, **fv
    )
    flags.DEFINE_enum(
        "lr_scaling",
        "linear",
        ("linear", "sqrt", "none"),
        "How the learning rate grows with the batch (none: use it as given).",
        **fv,
    )
    _define_real(
        "warmup_epochs", 0.5, "Linear warm-up from 0, in epochs.", _range(0), fv
    )
    flags.DEFINE_enum("lr_schedule", "poly", SCHEDULES, "Decay after warm-up.", **fv)
    _define_real(
        "poly_power", 2.0, "Power of the poly schedule.", validation.check_power, fv
    )
    _define_real(
        "end_learning_rate",
        0.0,
        "Final learning rate (poly and cosine).",
        validation.check_learning_rate,
        fv,
    )
    flags.DEFINE_list(
        "lr_decay_epochs",
        ["30", "60", "80"],
        "Epochs where the step schedule multiplies the rate by --lr_decay_factor.",
        **fv,
    )
    flags.register_validator("lr_decay_epochs", _check_decay_epochs, **fv)
    _define_real(
        "lr_decay_factor",
        0.1,
        "Factor of the step schedule.",
        _range(0, 1, low_open=True),
        fv,
    )


def _define_optimizer_flags(fv: dict) -> None:
    """The optimizer's settings and the loss."""
    _define_real(
        "momentum",
        0.9,
        "Momentum (LARS, SGD); beta_1 of Lamb/AdamW.",
        validation.check_momentum,
        fv,
    )
    _define_real(
        "weight_decay",
        5e-4,
        "Weight decay: coupled inside LARS, an L2 loss term for SGD, decoupled "
        "for Lamb and AdamW.",
        validation.check_weight_decay,
        fv,
    )
    _define_real(
        "trust_coefficient",
        0.001,
        "LARS trust coefficient (eta).",
        validation.check_trust_coefficient,
        fv,
    )
    _define_real(
        "epsilon",
        0.0,
        "LARS epsilon; Lamb/AdamW epsilon when > 0.",
        validation.check_epsilon,
        fv,
    )
    flags.DEFINE_bool(
        "clip", False, "LARC: clip the LARS local rate at the global one.", **fv
    )
    flags.DEFINE_bool("nesterov", False, "Nesterov momentum (LARS, SGD).", **fv)
    flags.DEFINE_bool(
        "exclude_bias_and_norm",
        True,
        "Exclude biases and BN parameters from weight decay and trust-ratio "
        "adaptation (the MLPerf setting).",
        **fv,
    )
    _define_real(
        "label_smoothing",
        0.0,
        "Label smoothing of the loss.",
        _range(0, 1, high_open=True),
        fv,
    )


def _define_system_flags(fv: dict) -> None:
    """Distribution and numerics."""
    flags.DEFINE_enum(
        "strategy", "default", STRATEGIES, "tf.distribute strategy.", **fv
    )
    flags.DEFINE_string(
        "tpu", None, "TPU name or grpc:// address (--strategy=tpu).", **fv
    )
    flags.DEFINE_integer(
        "num_cpu_devices",
        0,
        "With --strategy=mirrored, split the CPU into this many logical devices "
        "(to try mirrored training on a CPU machine); 0 leaves it whole.",
        lower_bound=0,
        **fv,
    )
    flags.DEFINE_enum("precision", "float32", PRECISIONS, "Keras dtype policy.", **fv)
    flags.DEFINE_bool("jit_compile", False, "XLA-compile the training step.", **fv)
    flags.DEFINE_bool(
        "deterministic",
        False,
        "Deterministic ops and input order (exact resume, slower).",
        **fv,
    )
    flags.DEFINE_integer(
        "seed",
        0,
        "Seed of weights, data order and augmentation.",
        lower_bound=0,
        upper_bound=MAX_SEED,
        **fv,
    )


def _define_bookkeeping_flags(fv: dict) -> None:
    """The model folder, checkpoints, evaluation, logs and the run's limits."""
    flags.DEFINE_string(
        "model_dir",
        None,
        "Checkpoints, TensorBoard logs, summary.json and the trained model.keras; "
        "reuse a folder to resume the run it holds. Default: a new folder under "
        "<tmp>/lars_tf.",
        **fv,
    )
    flags.DEFINE_integer(
        "checkpoint_every_steps",
        0,
        "Checkpoint interval; 0: once per epoch.",
        lower_bound=0,
        **fv,
    )
    flags.DEFINE_integer(
        "keep_checkpoints", 3, "Checkpoints kept.", lower_bound=1, **fv
    )
    _define_real(
        "epochs_between_evals",
        0.0,
        "Evaluation interval; 0: only at the end.",
        _range(0),
        fv,
    )
    flags.DEFINE_bool("skip_eval", False, "Do not evaluate.", **fv)
    flags.DEFINE_integer(
        "precise_bn_examples",
        0,
        "After training, set every BatchNormalization layer's moving mean and "
        "variance to the average of the global-batch statistics over this many "
        "training examples (rounded up to whole batches), with the final "
        "weights; 0: keep the moving averages.",
        lower_bound=0,
        **fv,
    )
    flags.DEFINE_integer(
        "steps_per_loop",
        10,
        "Steps run inside one tf.function call (the host only sees their end).",
        lower_bound=1,
        **fv,
    )
    flags.DEFINE_integer(
        "log_every_steps", 10, "Interval of progress lines.", lower_bound=1, **fv
    )
    flags.DEFINE_integer(
        "trust_ratio_every_steps",
        0,
        "Every this many steps, record each layer's ||w||, ||g||, ratio and LARS "
        "rate on a probe batch (lars_tf.TrustRatioMonitor) to <model_dir>/"
        "trust_ratio, and print the paper's Table 2 at the end; 0: off, no cost.",
        lower_bound=0,
        **fv,
    )
    flags.DEFINE_integer(
        "max_nonfinite_steps",
        3,
        "A step whose loss or gradients are not finite is skipped (weights, "
        "optimizer state and its iteration count unchanged) and counted; this "
        "many in a row stop the run.",
        lower_bound=1,
        **fv,
    )


# Flags that must agree: (flags, holds(values) -> bool, message). The message
# starts with the first flag, which `from_flag_values` names.
_AGREEMENTS = (
    (
        ("warmup_epochs", "train_epochs", "train_steps"),
        lambda f: (
            f["train_steps"] is not None or f["warmup_epochs"] < f["train_epochs"]
        ),
        "--warmup_epochs must be shorter than --train_epochs",
    ),
    (
        ("num_cpu_devices", "strategy"),
        lambda f: not f["num_cpu_devices"] or f["strategy"] == "mirrored",
        "--num_cpu_devices needs --strategy=mirrored (which runs a replica on "
        "each CPU device)",
    ),
    (
        ("tpu", "strategy"),
        lambda f: f["strategy"] != "tpu" or bool(f["tpu"]),
        "--tpu is required with --strategy=tpu",
    ),
    (
        ("model_dir", "strategy"),
        lambda f: f["strategy"] != "multi_worker" or bool(f["model_dir"]),
        "--model_dir is required with --strategy=multi_worker",
    ),
    (
        ("tfds_name", "source"),
        lambda f: f["source"] != "tfds" or bool(f["tfds_name"]),
        "--tfds_name is required with --source=tfds",
    ),
    (
        ("data_service", "deterministic"),
        lambda f: f["data_service"] is None or not f["deterministic"],
        "--data_service cannot be used with --deterministic (the service's "
        "workers deliver batches in no fixed order)",
    ),
    (
        ("jit_compile", "deterministic"),
        lambda f: not (f["jit_compile"] and f["deterministic"]),
        "--jit_compile cannot be used with --deterministic (TensorFlow's XLA has "
        "no deterministic gradient of max pooling)",
    ),
    (
        ("nesterov", "optimizer", "momentum"),
        lambda f: (
            not f["nesterov"]
            or (f["optimizer"] in ("lars", "sgd") and f["momentum"] > 0)
        ),
        "--nesterov needs --optimizer=lars or sgd and --momentum > 0",
    ),
    (
        ("holdout_fraction", "source"),
        lambda f: not f["holdout_fraction"] or f["source"] != "tfds",
        "--holdout_fraction is not available with --source=tfds",
    ),
)


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defines the app's flags on `flag_values` (`flags.FLAGS` for the CLI),
    with absl's bounds, enums and validators of what each allows."""
    fv = {"flag_values": flag_values}
    _define_data_flags(fv)
    _define_holdout_flags(fv)
    _define_length_and_rate_flags(fv)
    _define_optimizer_flags(fv)
    _define_system_flags(fv)
    _define_bookkeeping_flags(fv)
    for names, holds, message in _AGREEMENTS:
        flags.register_multi_flags_validator(list(names), holds, message, **fv)


@functools.cache
def flag_names() -> tuple[str, ...]:
    """The app's flag names, in definition order."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    return tuple(flag_values)


# ----------------------------------------------------------------------------
# The configuration


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one training run needs, checked and resolved.

    A field named as a flag holds that flag's value (`build_config` copies
    them by name), resolved where the flag's default depends on others
    (`augmentation`, `train_steps`, `model_dir`, `checkpoint_every_steps`) and
    `data_service` as HOST:PORT. The other fields are derived once there, so no
    later code recomputes them. `data` holds the data's facts once; the ones the
    trainer reads most are properties too (`source`, `image_size`, ...).
    """

    model: str
    data: sources.Source  # Never "auto"; --image_size and --num_classes applied.
    augmentation: str
    cache: bool
    holdout_fraction: float  # 0: no held-out split.
    holdout_seed: int
    max_skipped_records: int
    data_service: str | None  # HOST:PORT of the dispatcher; None: in-process.
    synthetic_fallback: bool  # Synthetic data because the default folder is absent.
    # Length and batch.
    global_batch_size: int
    steps_per_epoch: int
    train_steps: int
    warmup_steps: int
    # Optimizer and learning rate.
    optimizer: str
    peak_learning_rate: float
    lr_schedule: str
    poly_power: float
    end_learning_rate: float
    lr_decay_steps: tuple[int, ...]
    lr_decay_factor: float
    momentum: float
    weight_decay: float
    trust_coefficient: float
    epsilon: float
    clip: bool
    nesterov: bool
    exclude_bias_and_norm: bool
    label_smoothing: float
    # Distribution and numerics.
    strategy: str
    tpu: str | None
    num_cpu_devices: int
    replicas: int | None  # None: only TensorFlow can tell (GPUs, TPUs, workers).
    precision: str
    jit_compile: bool
    deterministic: bool
    seed: int
    # Bookkeeping.
    model_dir: str
    checkpoint_every_steps: int
    keep_checkpoints: int
    eval_every_steps: int  # 0: only at the end.
    skip_eval: bool
    precise_bn_examples: int  # 0: the moving averages as trained.
    steps_per_loop: int
    log_every_steps: int
    trust_ratio_every_steps: int
    max_nonfinite_steps: int
    # The flag values as given, for the record in the model folder.
    flags: dict = dataclasses.field(compare=False, repr=False)

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (tuples as lists), the data's facts
        among them (`source`: its name), as config.json and summary.json keep
        them."""
        fields = json.loads(json.dumps(dataclasses.asdict(self)))
        facts = fields.pop("data")
        return {"source": facts.pop("name"), **facts, **fields}


def _validate(flag_values: flags.FlagValues) -> None:
    """Runs absl's validators of the app's flags in definition order, as its
    parser does; the first that fails raises FlagError naming its flag (the
    first flag of a check of several, which its message starts with)."""
    for name in flag_names():
        for validator in flag_values[name].validators:
            if validator.get_flags_names()[0] != name:
                continue  # A check of several flags runs under its first.
            try:
                validator.verify(flag_values)
            except flags.ValidationError as error:
                message = str(error).removeprefix(f"--{name} ")
                raise FlagError(name, message) from None


def from_flag_values(flag_values: flags.FlagValues) -> Config:
    """The Config of parsed flags (the command line, or `make_config`'s).

    The validators run again here: absl ran them as it parsed the command
    line, but not for a value parsed or set afterwards.
    """
    _validate(flag_values)
    return build_config({name: flag_values[name].value for name in flag_names()})


def make_config(**overrides: Any) -> Config:
    """The Config of the default flags with `overrides` (flag name=value).

    For programs that train through the app, and for the tests:
    `make_config(source="synthetic", train_steps=10, model_dir=path)`. Values
    are parsed as on the command line (an enum must be one of its values; a
    string is parsed like argv).
    """
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    flag_values(["make_config"])
    for name, value in overrides.items():
        if name not in flag_values:
            raise TypeError(f"make_config() got an unknown flag {name!r}")
        try:
            flag_values[name].parse(value)
        except flags.Error as error:
            # absl raises this while handling the parser's ValueError, whose
            # text says what is allowed; its own text adds "flag --name=value: ".
            raise FlagError(name, str(error.__context__ or error)) from None
    return from_flag_values(flag_values)


def cluster_worker_count() -> int:
    """Number of workers in $TF_CONFIG's cluster (chief included); 1 without."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except (json.JSONDecodeError, AttributeError) as error:
        raise FlagError(
            "strategy", f"TF_CONFIG is not a JSON object: {error}"
        ) from None
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def _replicas(v: dict) -> int | None:
    """Replicas known before TensorFlow starts (None: only TF can tell), after
    checking that the global batch divides among them (for multi_worker: among
    the workers of $TF_CONFIG, each with at least one replica)."""
    replicas = {"default": 1, "one_device": 1}.get(v["strategy"])
    if v["strategy"] == "mirrored" and v["num_cpu_devices"]:
        replicas = v["num_cpu_devices"]
    divisor = replicas
    if v["strategy"] == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise FlagError("strategy", "multi_worker needs the TF_CONFIG variable")
        divisor = cluster_worker_count()
    if divisor and v["global_batch_size"] % divisor:
        raise FlagError(
            "global_batch_size",
            f"{v['global_batch_size']} is not divisible by the {divisor} replicas",
        )
    return replicas


def _check_model(model: str, image_size: int) -> None:
    """Raises FlagError unless `model` names a builder that takes images of
    `image_size`. Imports Keras: the names come from the builders."""
    from train import models

    if model not in models.MODEL_NAMES:
        raise FlagError(
            "model", f"must be one of {', '.join(models.MODEL_NAMES)}, got {model!r}"
        )
    min_size = models.MIN_IMAGE_SIZE.get(model, 1)
    if image_size < min_size:
        raise FlagError(
            "image_size",
            f"{model} needs images of at least {min_size}x{min_size}, got {image_size}",
        )


def _peak_learning_rate(v: dict) -> float:
    """--base_learning_rate scaled from --base_batch_size to the global batch
    by --lr_scaling (`none`: as given), with `lars_tf.scaled_learning_rate`.

    Imports lars_tf, and with it Keras: runs after `_check_model` has.
    """
    if v["lr_scaling"] == "none":
        return float(v["base_learning_rate"])
    import lars_tf

    return lars_tf.scaled_learning_rate(
        v["base_learning_rate"],
        v["global_batch_size"],
        v["base_batch_size"],
        rule=v["lr_scaling"],
    )


def build_config(values: dict) -> Config:
    """Resolves flag values (name -> value, as absl parsed and validated them).

    Raises:
      FlagError: naming the first bad flag and what it allows.
      UserError: naming a data folder or file that is missing or unreadable.
    """
    v = dict(values)
    replicas = _replicas(v)
    data_service = v["data_service"]
    if data_service is not None:
        data_service = parse_address("data_service", data_service)
    model_dir = v["model_dir"] or default_model_dir(v["model"])
    if "://" not in model_dir:
        model_dir = os.path.abspath(model_dir)
    check_writable_folder("model_dir", model_dir)

    facts = sources.describe(
        v["source"],
        v["data_dir"],
        tfds_name=v["tfds_name"],
        image_size=v["image_size"],
        num_classes=v["num_classes"],
    )
    batch = v["global_batch_size"]
    trained_on = facts.train_examples - round(
        v["holdout_fraction"] * facts.train_examples
    )
    steps_per_epoch = trained_on // batch
    if steps_per_epoch < 1:
        raise FlagError(
            "global_batch_size",
            f"{batch} exceeds the {trained_on} training examples",
        )
    train_steps = v["train_steps"] or round(v["train_epochs"] * steps_per_epoch)
    if train_steps < 1:
        raise FlagError(
            "train_epochs", f"{v['train_epochs']} epochs is less than one step"
        )
    warmup_steps = round(v["warmup_epochs"] * steps_per_epoch)
    if warmup_steps >= train_steps:
        raise FlagError(
            "warmup_epochs",
            f"{v['warmup_epochs']} epochs = {warmup_steps} steps is not shorter "
            f"than training ({train_steps} steps)",
        )
    _check_model(v["model"], facts.image_size)

    resolved = dict(
        data=facts,
        augmentation=v["augmentation"] or facts.default_augmentation,
        data_service=data_service,
        synthetic_fallback=v["source"] == "auto" and facts.name == "synthetic",
        steps_per_epoch=steps_per_epoch,
        train_steps=train_steps,
        warmup_steps=warmup_steps,
        peak_learning_rate=_peak_learning_rate(v),
        lr_decay_steps=tuple(
            round(float(epoch) * steps_per_epoch) for epoch in v["lr_decay_epochs"]
        ),
        replicas=replicas,
        model_dir=model_dir,
        checkpoint_every_steps=v["checkpoint_every_steps"] or steps_per_epoch,
        eval_every_steps=round(v["epochs_between_evals"] * steps_per_epoch),
        flags=dict(values),
    )
    given = {f.name: v[f.name] for f in dataclasses.fields(Config) if f.name in v}
    return Config(**{**given, **resolved})


def default_model_dir(model: str) -> str:
    """A fresh folder name under <tmp>/lars_tf: time, process id and a random
    part, so jobs started at the same second cannot share it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{model}-{stamp}-{os.getpid()}-{secrets.token_hex(3)}"
    return os.path.join(tempfile.gettempdir(), "lars_tf", name)


def check_writable_folder(flag: str, path: str) -> None:
    """Raises FlagError unless `path` is (or can be made) a writable folder.

    Remote paths (`gs://...`) are left to TensorFlow's file system.
    """
    if "://" in path:
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise FlagError(flag, f"{existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FlagError(flag, f"{existing} is not writable")
    if existing != os.path.abspath(path):
        return
    if not os.access(existing, os.R_OK):
        raise FlagError(flag, f"{existing} is not readable")


# ----------------------------------------------------------------------------
# The run's record in its model folder

# Flags that may differ when a run resumes: they change how the run is carried
# out or reported, not what it computes (docs/training.md says why for each).
RESUMABLE_FLAGS = (
    "model_dir",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "epochs_between_evals",
    "skip_eval",
    "steps_per_loop",
    "log_every_steps",
    "trust_ratio_every_steps",
    "max_nonfinite_steps",
    "max_skipped_records",
    "data_service",
    "strategy",
    "tpu",
    "num_cpu_devices",
    "jit_compile",
)


def _meaning(record: dict) -> dict:
    """What a run computes: each flag's resolved value (the Config's field of
    that name where it has one), and the training length in steps."""
    flags_given, resolved = record.get("flags", {}), record.get("config", {})
    meaning = {
        name: resolved.get(name, flags_given[name])
        for name in flags_given
        if name not in RESUMABLE_FLAGS + ("train_epochs", "train_steps")
    }
    meaning["train_steps/--train_epochs"] = resolved.get("train_steps")
    if resolved.get("train_files") is not None:  # Recorded for TFRecord sources.
        meaning["data_dir (train files)"] = resolved["train_files"]
    return meaning


def read_run_record(model_dir: str) -> dict | None:
    """The recorded configuration of the run in `model_dir`, if any."""
    path = os.path.join(model_dir, RUN_RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable run record ({error})") from None


def run_record(config: Config) -> dict:
    """What `check_resume` needs of a run: its flags and resolved fields."""
    return {"flags": config.flags, "config": config.to_dict()}


def check_resume(config: Config, record: dict) -> None:
    """Raises UserError, one line per difference, unless the folder's recorded
    run means the same as `config`.

    The training length may grow with --lr_schedule=step, whose rates do not
    depend on it; the poly and cosine decays do, so there it must match.
    """
    old, new = _meaning(record), _meaning(run_record(config))
    if config.lr_schedule == "step":
        del old["train_steps/--train_epochs"], new["train_steps/--train_epochs"]
    changes = [
        f"--{name}: {old[name]} -> {value}"
        for name, value in new.items()
        if name in old and old[name] != value
    ]
    if changes:
        raise UserError(
            f"--model_dir={config.model_dir} holds a run with other settings "
            "(use a new --model_dir, or the recorded flags in "
            f"{os.path.join(config.model_dir, RUN_RECORD)}):\n" + "\n".join(changes)
        )


@contextlib.contextmanager
def written_atomically(path: str, on_failure: str = ""):
    """Yields a temporary path beside `path` (with its name's ending) for the
    caller to write, then renames it to `path`, so a crash leaves the previous
    file or the new one, never half of one.

    Raises:
      train.RunError: the write failed (no space, an I/O error, a read-only
        folder): one line naming `path` and the cause, then `on_failure`; the
        previous file, if any, is unchanged and the temporary one removed.
    """
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f"tmp-{os.getpid()}-{name}")
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise RunError(
            f"could not write {path}: {error.strerror or error}{on_failure}"
        ) from None


def write_json(path: str, content: dict) -> None:
    """Writes `content` to `path` as JSON, atomically (`written_atomically`)."""
    with written_atomically(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(content, file, indent=2, default=str)
