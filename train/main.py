"""The large-batch training app: `python -m train.main [--flag=value ...]`.

Flat like the tensorflow/tpu ResNet reference: the flags are defined and
validated here, the training loop lives in `train/trainer.py`, the optimizer and
its learning-rate schedule in `train/optimizers.py`, the models in
`train/models.py` and the input pipelines in `train/data.py`.

Flags are checked before TensorFlow is imported, so a bad flag fails in well
under a second with one line naming it. Run `python -m train.main --helpfull`
for every flag; `--flagfile=FILE` reads flags from a file.
"""

import json
import os
import sys
import tempfile
import time

from absl import app, flags, logging

from train import AUGMENTATIONS, MODEL_NAMES, SOURCES, FlagError, shared_data_dir

# Sources read from files under --data_dir (tfds reads TFDS's own directory).
FILE_SOURCES = ("imagenet", "mnist", "fashion_mnist")
OPTIMIZERS = ("lars", "sgd", "lamb", "adamw")
SCHEDULES = ("poly", "cosine", "step")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Defines the app's flags on `flag_values` (tests pass a fresh one).

    Returns their names, in order (summary.json records these).
    """
    names_before = set(flag_values)
    fv = {"flag_values": flag_values}
    # Model and data.
    flags.DEFINE_enum("model", "small_alexnet_bn", MODEL_NAMES, "Model to train.", **fv)
    flags.DEFINE_enum(
        "source",
        "auto",
        ("auto",) + SOURCES,
        "Input data. `auto`: MNIST when its files are under --data_dir, else "
        "synthetic images (never downloads anything).",
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
        "num_classes", None, "Classes of synthetic data; default 10.", **fv
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
        "Checkpoints, TensorBoard logs and summary.json; reuse a folder to "
        "resume. Default: a new folder under /tmp/lars_tf.",
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
    return [name for name in flag_values if name not in names_before]


def cluster_worker_count() -> int:
    """Number of workers in $TF_CONFIG's cluster (chief included); 1 without."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except json.JSONDecodeError as error:
        raise FlagError("strategy", f"TF_CONFIG is not valid JSON: {error}") from None
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def expected_replicas(f: flags.FlagValues) -> int | None:
    """Replicas known before TensorFlow starts; None when only TF can tell (GPUs)."""
    if f.strategy in ("default", "one_device"):
        return 1
    if f.strategy == "mirrored":
        return f.num_cpu_devices or None
    if f.strategy == "multi_worker":  # At least one replica per worker.
        return cluster_worker_count()
    return None


def validate_flags(f: flags.FlagValues) -> None:
    """Raises FlagError for invalid values and combinations; imports no TF."""
    positive = ("global_batch_size", "base_batch_size", "steps_per_loop")
    positive += ("log_every_steps", "keep_checkpoints")
    for name in positive:
        if f[name].value <= 0:
            raise FlagError(name, f"must be positive, got {f[name].value}")
    for name in ("image_size", "num_classes", "train_steps"):
        if f[name].value is not None and f[name].value <= 0:
            raise FlagError(name, f"must be positive, got {f[name].value}")
    if f.train_steps is None and f.train_epochs <= 0:
        raise FlagError("train_epochs", f"must be positive, got {f.train_epochs}")
    nonnegative = ("warmup_epochs", "weight_decay", "momentum", "epsilon")
    nonnegative += ("checkpoint_every_steps", "epochs_between_evals", "num_cpu_devices")
    nonnegative += ("end_learning_rate",)
    for name in nonnegative:
        if f[name].value < 0:
            raise FlagError(name, f"must be >= 0, got {f[name].value}")
    if f.base_learning_rate <= 0:
        raise FlagError("base_learning_rate", "must be positive")
    if f.trust_coefficient <= 0:
        raise FlagError("trust_coefficient", "must be positive")
    if not 0 <= f.label_smoothing < 1:
        raise FlagError("label_smoothing", "must be in [0, 1)")
    try:
        decay_epochs = [float(e) for e in f.lr_decay_epochs]
    except ValueError:
        raise FlagError("lr_decay_epochs", "must be a list of numbers") from None
    if decay_epochs != sorted(decay_epochs):
        raise FlagError("lr_decay_epochs", "must be increasing")
    # Warm-up against training length; in steps it needs the dataset's size,
    # so trainer.py checks that case again once the size is known.
    if f.train_steps is None and f.warmup_epochs >= f.train_epochs:
        raise FlagError(
            "warmup_epochs",
            f"{f.warmup_epochs} is not shorter than --train_epochs={f.train_epochs}",
        )
    replicas = expected_replicas(f)
    if replicas and f.global_batch_size % replicas:
        raise FlagError(
            "global_batch_size",
            f"{f.global_batch_size} is not divisible by the {replicas} replicas",
        )
    if f.strategy == "tpu" and not f.tpu:
        raise FlagError("tpu", "is required with --strategy=tpu")
    if f.strategy == "multi_worker" and "TF_CONFIG" not in os.environ:
        raise FlagError("strategy", "multi_worker needs the TF_CONFIG variable")
    if f.strategy == "multi_worker" and not f.model_dir:
        raise FlagError("model_dir", "is required with --strategy=multi_worker")
    if f.num_cpu_devices and f.strategy not in ("default", "mirrored"):
        raise FlagError("num_cpu_devices", "works with --strategy=mirrored only")
    if f.source == "tfds" and not f.tfds_name:
        raise FlagError("tfds_name", "is required with --source=tfds")
    data_dir = resolve_data_dir(f, resolve_source(f))
    if f.source in FILE_SOURCES and not os.path.isdir(data_dir):
        raise FlagError(
            "data_dir",
            f"{data_dir!r} is not a folder (needed by --source={f.source}; "
            "nothing is downloaded)",
        )


def resolve_source(f: flags.FlagValues) -> str:
    """The concrete source for --source=auto: MNIST if present, else synthetic."""
    if f.source != "auto":
        return f.source
    mnist = os.path.join(resolve_data_dir(f, "mnist"), "train-images-idx3-ubyte.gz")
    return "mnist" if os.path.isfile(mnist) else "synthetic"


def resolve_data_dir(f: flags.FlagValues, source: str) -> str | None:
    """--data_dir, else the source's folder in the shared data dir (None for tfds)."""
    if f.data_dir or source == "tfds":
        return f.data_dir
    return os.path.join(shared_data_dir(), source)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but any error is one line on stderr and exit status 2."""
    try:
        remaining = flags.FLAGS(argv)
        validate_flags(flags.FLAGS)
    except (flags.Error, FlagError) as error:
        print(f"train.main: error: {error}", file=sys.stderr)
        sys.exit(2)
    return remaining


def main(argv: list[str]) -> None:
    """Trains and evaluates as the flags say; prints where the results are."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # TF's INFO lines drown the progress.
        logging.set_verbosity(logging.WARNING)
    from train import trainer  # TensorFlow starts here, after validation.

    f = flags.FLAGS
    if not f.model_dir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        f.model_dir = os.path.join(
            tempfile.gettempdir(), "lars_tf", f"{f.model}-{stamp}"
        )
    source = resolve_source(f)
    f.data_dir = resolve_data_dir(f, source)
    try:
        trainer.run(
            f,
            source=source,
            flag_dict={name: f[name].value for name in APP_FLAGS},
        )
    except FlagError as error:  # Checks that needed TF (replicas, dataset size).
        print(f"train.main: error: {error}", file=sys.stderr)
        sys.exit(2)


APP_FLAGS = define_flags()

if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
