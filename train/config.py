"""The app's flags and the run configuration they resolve to; imports no TensorFlow.

Every flag of `python -m train.main` is defined here once (`define_flags`), and
turned into a frozen `Config` by `from_flag_values` (the command line) or
`make_config(**overrides)` (the study and the tests). Both go through one
function, `build_config`, which checks every value and decides every derived
fact once: the data source and its folder, image size, channels, classes,
augmentation, steps per epoch, training and warm-up steps, the peak learning
rate and the model folder. Nothing below `train.main` sees absl.

Checks run in order of cost: numbers and names first (no imports), then paths,
then the data folder's facts (`train.sources`), and last the model name, which
needs the Keras import (the names come from the builders in `train/models.py`).
Any mistake raises `train.FlagError` (one line, naming the flag and what is
allowed).

The second half of the file keeps the run's configuration in its model folder:
`check_resume` compares a resumed run with the one recorded there.
"""

import dataclasses
import json
import math
import os
import secrets
import tempfile
import time
from typing import Any

from absl import flags

from train import AUGMENTATIONS, FlagError, UserError, sources
from train import lars_tf_validation as validation
from train.data_service import parse_address

OPTIMIZERS = ("lars", "sgd", "lamb", "adamw")
SCHEDULES = ("poly", "cosine", "step")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
RUN_RECORD = "config.json"  # The run's configuration, in its model folder.


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defines the app's flags on `flag_values` (`flags.FLAGS` for the CLI)."""
    fv = {"flag_values": flag_values}
    # Model and data.
    flags.DEFINE_string(
        "model",
        "small_alexnet_bn",
        "Model to train: a builder of train/models.py (small_alexnet_bn, "
        "small_alexnet, alexnet, alexnet_bn, resnet50, googlenet, resnet20).",
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
        "image_size", None, "Square input size; default: the dataset's own.", **fv
    )
    flags.DEFINE_integer(
        "num_classes", None, "Number of classes; default: the dataset's own.", **fv
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
    flags.DEFINE_bool("cache", False, "Cache decoded examples in memory.", **fv)
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
        **fv,
    )
    # Length of training and batch size.
    flags.DEFINE_integer("global_batch_size", 4096, "Batch over all replicas.", **fv)
    flags.DEFINE_float("train_epochs", 3.0, "Training length in epochs.", **fv)
    flags.DEFINE_integer(
        "train_steps", None, "Training length in steps; overrides --train_epochs.", **fv
    )
    # Optimizer and learning rate.
    flags.DEFINE_enum("optimizer", "lars", OPTIMIZERS, "Optimizer.", **fv)
    flags.DEFINE_float(
        "base_learning_rate",
        0.4,
        "Learning rate at --base_batch_size, scaled to --global_batch_size by "
        "--lr_scaling.",
        **fv,
    )
    flags.DEFINE_integer("base_batch_size", 256, "Batch of --base_learning_rate.", **fv)
    flags.DEFINE_enum(
        "lr_scaling",
        "linear",
        ("linear", "sqrt", "none"),
        "How the learning rate grows with the batch (none: use it as given).",
        **fv,
    )
    flags.DEFINE_float("warmup_epochs", 0.5, "Linear warm-up from 0, in epochs.", **fv)
    flags.DEFINE_enum("lr_schedule", "poly", SCHEDULES, "Decay after warm-up.", **fv)
    flags.DEFINE_float("poly_power", 2.0, "Power of the poly schedule.", **fv)
    flags.DEFINE_float(
        "end_learning_rate", 0.0, "Final learning rate (poly and cosine).", **fv
    )
    flags.DEFINE_list(
        "lr_decay_epochs",
        ["30", "60", "80"],
        "Epochs where the step schedule multiplies the rate by --lr_decay_factor.",
        **fv,
    )
    flags.DEFINE_float("lr_decay_factor", 0.1, "Factor of the step schedule.", **fv)
    flags.DEFINE_float(
        "momentum", 0.9, "Momentum (LARS, SGD); beta_1 of Lamb/AdamW.", **fv
    )
    flags.DEFINE_float(
        "weight_decay",
        5e-4,
        "Weight decay: coupled inside LARS, an L2 loss term for SGD, decoupled "
        "for Lamb and AdamW.",
        **fv,
    )
    flags.DEFINE_float(
        "trust_coefficient", 0.001, "LARS trust coefficient (eta).", **fv
    )
    flags.DEFINE_float(
        "epsilon", 0.0, "LARS epsilon; Lamb/AdamW epsilon when > 0.", **fv
    )
    flags.DEFINE_bool(
        "clip", False, "LARC: clip the LARS local rate at the global one.", **fv
    )
    flags.DEFINE_bool(
        "exclude_bias_and_norm",
        True,
        "Exclude biases and BN parameters from weight decay and trust-ratio "
        "adaptation (the MLPerf setting).",
        **fv,
    )
    flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing of the loss.", **fv)
    # Distribution and numerics.
    flags.DEFINE_enum(
        "strategy", "default", STRATEGIES, "tf.distribute strategy.", **fv
    )
    flags.DEFINE_string(
        "tpu", None, "TPU name or grpc:// address (--strategy=tpu).", **fv
    )
    flags.DEFINE_integer(
        "num_cpu_devices",
        0,
        "Split the CPU into this many logical devices (to try mirrored and "
        "multi_worker on a CPU machine); 0 leaves it whole.",
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
        "seed", 0, "Seed of weights, data order and augmentation.", **fv
    )
    # Bookkeeping.
    flags.DEFINE_string(
        "model_dir",
        None,
        "Checkpoints, TensorBoard logs, summary.json and the trained model.keras; "
        "reuse a folder to resume the run it holds. Default: a new folder under "
        "<tmp>/lars_tf.",
        **fv,
    )
    flags.DEFINE_integer(
        "checkpoint_every_steps", 0, "Checkpoint interval; 0: once per epoch.", **fv
    )
    flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.", **fv)
    flags.DEFINE_float(
        "epochs_between_evals", 0.0, "Evaluation interval; 0: only at the end.", **fv
    )
    flags.DEFINE_bool("skip_eval", False, "Do not evaluate.", **fv)
    flags.DEFINE_integer(
        "steps_per_loop",
        10,
        "Steps run inside one tf.function call (the host only sees their end).",
        **fv,
    )
    flags.DEFINE_integer("log_every_steps", 10, "Interval of progress lines.", **fv)
    flags.DEFINE_integer(
        "trust_ratio_every_steps",
        0,
        "Every this many steps, record each layer's ||w||, ||g||, ratio and LARS "
        "rate on a probe batch (lars_tf.TrustRatioMonitor) to <model_dir>/"
        "trust_ratio, and print the paper's Table 2 at the end; 0: off, no cost.",
        **fv,
    )
    flags.DEFINE_integer(
        "max_nonfinite_steps",
        3,
        "A step whose loss or gradients are not finite is skipped (weights, "
        "optimizer state and its iteration count unchanged) and counted; this "
        "many in a row stop the run.",
        **fv,
    )


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

    Field names equal the flag names where a field is a flag's value (resolved
    where the flag has a default that depends on others: `source`, `data_dir`,
    `image_size`, `num_classes`, `augmentation`, `train_steps`, `model_dir`).
    The other fields are derived once here, so no later code recomputes them.
    """

    # Model and data.
    model: str
    source: str  # Never "auto".
    data_dir: str | None
    tfds_name: str | None
    image_size: int
    channels: int
    mean: tuple[float, ...]  # Per channel, 0-255 units: the input normalization.
    std: tuple[float, ...]
    num_classes: int
    label_offset: int
    train_examples: int
    eval_examples: int
    augmentation: str
    cache: bool
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
    steps_per_loop: int
    log_every_steps: int
    trust_ratio_every_steps: int
    max_nonfinite_steps: int
    # The flag values as given, for the record in the model folder.
    flags: dict = dataclasses.field(compare=False, repr=False)

    def data_source(self) -> sources.Source:
        """The resolved data facts, as `train.data.make_input_fn` takes them."""
        return sources.Source(
            name=self.source,
            num_classes=self.num_classes,
            image_size=self.image_size,
            channels=self.channels,
            train_examples=self.train_examples,
            eval_examples=self.eval_examples,
            default_augmentation=self.augmentation,
            mean=self.mean,
            std=self.std,
            label_offset=self.label_offset,
            data_dir=self.data_dir,
            tfds_name=self.tfds_name,
        )

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def from_flag_values(flag_values: flags.FlagValues) -> Config:
    """The Config of parsed flags (the command line)."""
    return build_config({name: flag_values[name].value for name in flag_names()})


def make_config(**overrides: Any) -> Config:
    """The Config of the default flags with `overrides` (flag name=value).

    For the study and the tests: `make_config(source="synthetic",
    train_steps=10, model_dir=path)`. Values are parsed as on the command
    line (an enum must be one of its values; a string is parsed like argv).
    """
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    flag_values(["make_config"])
    for name, value in overrides.items():
        if name not in flag_values:
            raise TypeError(f"make_config() got an unknown flag {name!r}")
        try:
            flag_values[name].parse(value)
        except flags.Error as error:  # "flag --name=value: why": keep why.
            raise FlagError(name, str(error).split(": ", 1)[-1]) from None
    return from_flag_values(flag_values)


# The ranges LARS and the schedules check: the library's checks, one source of
# truth (`lars_tf.validation` imports no TensorFlow).
_LIBRARY_CHECKS = {
    "base_learning_rate": lambda value, name: validation.check_learning_rate(
        value, name, allow_zero=False
    ),
    "end_learning_rate": validation.check_learning_rate,
    "poly_power": validation.check_power,
    "momentum": validation.check_momentum,
    "weight_decay": validation.check_weight_decay,
    "trust_coefficient": validation.check_trust_coefficient,
    "epsilon": validation.check_epsilon,
}
# The lowest value of the app's whole-number flags.
_MINIMUM = {
    "image_size": 1,
    "num_classes": 2,
    "global_batch_size": 1,
    "train_steps": 1,
    "base_batch_size": 1,
    "num_cpu_devices": 0,
    "max_skipped_records": 0,
    "seed": 0,
    "checkpoint_every_steps": 0,
    "keep_checkpoints": 1,
    "steps_per_loop": 1,
    "log_every_steps": 1,
    "trust_ratio_every_steps": 0,
    "max_nonfinite_steps": 1,
}
MAX_SEED = 2**31 - 1  # NumPy's and TensorFlow's seeds are 32-bit.
# (low, high, low_open, high_open) of the app's other real-number flags.
_RANGES = {
    "train_epochs": (0, math.inf, True, False),
    "warmup_epochs": (0, math.inf, False, False),
    "lr_decay_factor": (0, 1, True, False),
    "label_smoothing": (0, 1, False, True),
    "epochs_between_evals": (0, math.inf, False, False),
}


def _check_numbers(v: dict) -> None:
    """Raises FlagError for the first numeric flag that is not finite or is out
    of its range (three may be None: the dataset's own, or --train_epochs)."""
    try:
        for name, low in _MINIMUM.items():
            if v[name] is not None or name not in ("image_size", "num_classes"):
                if name != "train_steps" or v[name] is not None:
                    validation.check_integer(name, v[name], low)
        if v["seed"] > MAX_SEED:
            raise ValueError(f"`seed` must be a whole number <= {MAX_SEED}.")
        for name, (low, high, low_open, high_open) in _RANGES.items():
            validation.check_number(
                name, v[name], low, high, low_open=low_open, high_open=high_open
            )
        for name, check in _LIBRARY_CHECKS.items():
            check(v[name], name)
    except ValueError as error:  # "`name` must be ...": keep "must be ...".
        flag, message = str(error)[1:].split("` ", 1)
        raise FlagError(flag, message) from None
    try:
        decay_epochs = [float(e) for e in v["lr_decay_epochs"]]
    except ValueError:
        raise FlagError("lr_decay_epochs", "must be a list of numbers") from None
    for epoch in decay_epochs:
        if not (math.isfinite(epoch) and epoch >= 0):
            raise FlagError(
                "lr_decay_epochs", f"must be finite numbers >= 0. Received: {epoch}"
            )
    if decay_epochs != sorted(decay_epochs):
        raise FlagError("lr_decay_epochs", "must be increasing")


def cluster_worker_count() -> int:
    """Number of workers in $TF_CONFIG's cluster (chief included); 1 without."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except (json.JSONDecodeError, AttributeError) as error:
        raise FlagError(
            "strategy", f"TF_CONFIG is not a JSON object: {error}"
        ) from None
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def _replicas(values: dict) -> int | None:
    """Replicas known before TensorFlow starts; None when only TF can tell."""
    if values["strategy"] in ("default", "one_device"):
        return 1
    if values["strategy"] == "mirrored" and values["num_cpu_devices"]:
        return values["num_cpu_devices"]
    return None


def build_config(values: dict) -> Config:
    """Checks flag values (name -> value, as parsed) and resolves them.

    Raises:
      FlagError: naming the first bad flag and what it allows.
      UserError: naming a data folder or file that is missing or unreadable.
    """
    v = dict(values)
    # 1. Numbers and names.
    _check_numbers(v)
    decay_epochs = [float(e) for e in v["lr_decay_epochs"]]
    for name, choices in (
        ("optimizer", OPTIMIZERS),
        ("lr_schedule", SCHEDULES),
        ("strategy", STRATEGIES),
        ("precision", PRECISIONS),
    ):
        if v[name] not in choices:
            raise FlagError(name, f"must be one of {', '.join(choices)}")

    # 2. Combinations.
    if v["train_steps"] is None and v["warmup_epochs"] >= v["train_epochs"]:
        raise FlagError(
            "warmup_epochs",
            f"{v['warmup_epochs']} is not shorter than "
            f"--train_epochs={v['train_epochs']}",
        )
    replicas = _replicas(v)
    divisor = replicas
    if v["strategy"] == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise FlagError("strategy", "multi_worker needs the TF_CONFIG variable")
        if not v["model_dir"]:
            raise FlagError("model_dir", "is required with --strategy=multi_worker")
        divisor = cluster_worker_count()  # At least one replica per worker.
    if divisor and v["global_batch_size"] % divisor:
        raise FlagError(
            "global_batch_size",
            f"{v['global_batch_size']} is not divisible by the {divisor} replicas",
        )
    if v["strategy"] == "tpu" and not v["tpu"]:
        raise FlagError("tpu", "is required with --strategy=tpu")
    if v["num_cpu_devices"] and v["strategy"] not in ("default", "mirrored"):
        raise FlagError("num_cpu_devices", "works with --strategy=mirrored only")
    if v["source"] == "tfds" and not v["tfds_name"]:
        raise FlagError("tfds_name", "is required with --source=tfds")
    data_service = None
    if v["data_service"] is not None:
        data_service = parse_address("data_service", v["data_service"])
        if v["deterministic"]:
            raise FlagError(
                "data_service",
                "cannot be used with --deterministic (the service's workers "
                "deliver batches in no fixed order)",
            )

    # 3. Paths.
    model_dir = v["model_dir"] or default_model_dir(v["model"])
    if "://" not in model_dir:
        model_dir = os.path.abspath(model_dir)
    check_writable_folder("model_dir", model_dir)

    # 4. The data's facts.
    facts = sources.describe(
        v["source"],
        v["data_dir"],
        tfds_name=v["tfds_name"],
        image_size=v["image_size"],
        num_classes=v["num_classes"],
    )
    batch = v["global_batch_size"]
    steps_per_epoch = facts.train_examples // batch
    if steps_per_epoch < 1:
        raise FlagError(
            "global_batch_size",
            f"{batch} exceeds the {facts.train_examples} training examples",
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
    peak = _peak_learning_rate(v)

    # 5. The model name, last: the names come from the Keras builders.
    from train import models

    if v["model"] not in models.MODEL_NAMES:
        raise FlagError(
            "model",
            f"must be one of {', '.join(models.MODEL_NAMES)}, got {v['model']!r}",
        )
    min_size = models.MIN_IMAGE_SIZE.get(v["model"], 1)
    if facts.image_size < min_size:
        raise FlagError(
            "image_size",
            f"{v['model']} needs images of at least {min_size}x{min_size}, got "
            f"{facts.image_size}",
        )

    return Config(
        model=v["model"],
        source=facts.name,
        data_dir=facts.data_dir,
        tfds_name=facts.tfds_name,
        image_size=facts.image_size,
        channels=facts.channels,
        mean=facts.mean,
        std=facts.std,
        num_classes=facts.num_classes,
        label_offset=facts.label_offset,
        train_examples=facts.train_examples,
        eval_examples=facts.eval_examples,
        augmentation=v["augmentation"] or facts.default_augmentation,
        cache=v["cache"],
        max_skipped_records=v["max_skipped_records"],
        data_service=data_service,
        synthetic_fallback=v["source"] == "auto" and facts.name == "synthetic",
        global_batch_size=batch,
        steps_per_epoch=steps_per_epoch,
        train_steps=train_steps,
        warmup_steps=warmup_steps,
        optimizer=v["optimizer"],
        peak_learning_rate=peak,
        lr_schedule=v["lr_schedule"],
        poly_power=v["poly_power"],
        end_learning_rate=v["end_learning_rate"],
        lr_decay_steps=tuple(round(e * steps_per_epoch) for e in decay_epochs),
        lr_decay_factor=v["lr_decay_factor"],
        momentum=v["momentum"],
        weight_decay=v["weight_decay"],
        trust_coefficient=v["trust_coefficient"],
        epsilon=v["epsilon"],
        clip=v["clip"],
        exclude_bias_and_norm=v["exclude_bias_and_norm"],
        label_smoothing=v["label_smoothing"],
        strategy=v["strategy"],
        tpu=v["tpu"],
        num_cpu_devices=v["num_cpu_devices"],
        replicas=replicas,
        precision=v["precision"],
        jit_compile=v["jit_compile"],
        deterministic=v["deterministic"],
        seed=v["seed"],
        model_dir=model_dir,
        checkpoint_every_steps=v["checkpoint_every_steps"] or steps_per_epoch,
        keep_checkpoints=v["keep_checkpoints"],
        eval_every_steps=round(v["epochs_between_evals"] * steps_per_epoch),
        skip_eval=v["skip_eval"],
        steps_per_loop=v["steps_per_loop"],
        log_every_steps=v["log_every_steps"],
        trust_ratio_every_steps=v["trust_ratio_every_steps"],
        max_nonfinite_steps=v["max_nonfinite_steps"],
        flags=dict(values),
    )


def _peak_learning_rate(v: dict) -> float:
    """--base_learning_rate scaled from --base_batch_size to the global batch."""
    ratio = v["global_batch_size"] / v["base_batch_size"]
    scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[v["lr_scaling"]]
    return float(v["base_learning_rate"] * scale)


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
    "cache",
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


def write_json(path: str, content: dict) -> None:
    """Writes `content` to `path` atomically (a temporary file, then a rename),
    so a crash leaves the previous file or the new one, never half of one."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=2, default=str)
    os.replace(temporary, path)
