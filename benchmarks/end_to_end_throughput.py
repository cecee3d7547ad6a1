"""Does the input pipeline or the model bound the training step?

For each image size, one model trains with `model.fit` in three settings,
measured in the same process:

1. ``fed``: fed by the training input pipeline as the app builds it
   (`train.data.make_input_fn`, training split, the source's training
   augmentation, uint8 batches), the batches normalized inside the step
   (`train.data.normalize`, as the app's train step does);
2. ``cached``: the same model and step fed by the first ``--steps`` batches of
   that same pipeline, cached in memory and repeated
   (``.take(k).cache().repeat()``): the step's compute alone;
3. ``pipeline``: the pipeline alone, iterated as fast as it goes.

The verdict, from the wall rates (medians over rounds): compute-bound when
``fed`` >= 0.9 x ``cached``; else input-bound when ``fed`` >= 0.8 x
``pipeline``; else neither alone. On a CPU-only machine the pipeline and the
step share the cores, so ``fed`` pays for both: the table gives each
setting's CPU milliseconds per image (user + system time of all this
process's threads) beside its wall rate, with ``fed``'s against the sum of
``cached``'s and ``pipeline``'s, and the shared-cores estimate
1 / (1 / cached + 1 / pipeline), the wall rate expected if the two only add
their costs.

The model is the app's (`train.models`, default ``resnet20``) behind a layer
that normalizes the uint8 batch; `lars_tf.LARS` with the training settings of
`benchmarks/training_throughput.py`; Keras's default ``jit_compile`` ("auto":
off on a CPU-only machine). Each `fit` call keeps one iterator: its first
epoch (compilation, the shuffle buffer's fill, the cache's fill) is not
timed; then ``--epochs`` timed epochs of ``--steps`` steps. The pipeline
alone is timed over as many images (at least ``--pipeline_images``) after
three batches of warm-up
(`benchmarks/input_pipeline.images_per_second`). Rounds rotate the order of
the three settings.

The data: Imagenette (or ImageNet) TFRecords as `train.convert_images` writes
them, from ``--data_dir``:

    python -m train.convert_images --labels=dense --train_shards=8 \
        --validation_shards=2 --train_dir=$DATA/imagenette2-224/train \
        --validation_dir=$DATA/imagenette2-224/val --output_dir=/tmp/imagenette
    python benchmarks/end_to_end_throughput.py --data_dir=/tmp/imagenette

ResNet-20 keeps full resolution through its first stage, so a step at 224 px
costs about 49x one at 32 px: the defaults use batch 16 and 3 steps per epoch
there (batch 64 and 6 steps at 64 px).
"""

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.input_pipeline import images_per_second  # noqa: E402
from benchmarks.training_throughput import machine_line, optimizers  # noqa: E402
from train import UserError, data, models, preprocessing, sources  # noqa: E402

SETTINGS = ("fed", "cached", "pipeline")
# fed / cached at or above this: the pipeline costs the step little.
COMPUTE_BOUND = 0.9
# fed / pipeline at or above this (and not compute-bound): the pipeline's rate
# is what the step gets.
INPUT_BOUND = 0.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data_dir",
        help="folder of TFRecords written by train.convert_images (Imagenette)",
    )
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--image_sizes", default="64,224")
    parser.add_argument("--batch_sizes", default="64,16", help="one per image size")
    parser.add_argument(
        "--steps", default="6,3", help="timed steps per epoch, one per image size"
    )
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per fit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--pipeline_images",
        type=int,
        default=1000,
        help="at least this many images per timing of the pipeline alone",
    )
    parser.add_argument(
        "--augmentation",
        default=None,
        help="training augmentation; default: the source's (the app's default)",
    )
    args = parser.parse_args(argv)
    for name in ("image_sizes", "batch_sizes", "steps"):
        try:
            values = [int(v) for v in getattr(args, name).split(",")]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            _fail(f"--{name}={getattr(args, name)}: positive integers, comma-separated")
        setattr(args, name, values)
    if not len(args.image_sizes) == len(args.batch_sizes) == len(args.steps):
        _fail("--image_sizes, --batch_sizes and --steps: give one value per image size")
    if args.model not in models.MODEL_NAMES:
        _fail(f"--model={args.model}: must be one of {', '.join(models.MODEL_NAMES)}")
    augmentations = preprocessing.AUGMENTATIONS
    if args.augmentation is not None and args.augmentation not in augmentations:
        _fail(
            f"--augmentation={args.augmentation}: must be one of "
            f"{', '.join(augmentations)}"
        )
    if args.epochs < 1 or args.rounds < 1:
        _fail(f"--epochs={args.epochs}, --rounds={args.rounds}: must be >= 1")
    if not args.data_dir or not os.path.isdir(args.data_dir):
        _fail(
            f"--data_dir={args.data_dir}: no such folder (TFRecords written by "
            "python -m train.convert_images expected there)"
        )
    return args


def _fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def training_model(
    model_name: str, source: sources.Source, image_size: int
) -> keras.Model:
    """The app's model taking uint8 batches, normalized in the step as the
    app's train step does, compiled with LARS at its training settings."""
    network = models.build_model(
        model_name, source.num_classes, image_size, source.channels
    )
    images = keras.Input((image_size, image_size, source.channels), dtype="uint8")
    normalized = keras.layers.Lambda(lambda pixels: data.normalize(pixels, source))(
        images
    )
    model = keras.Model(images, network(normalized))
    model.compile(
        optimizer=optimizers()["LARS"](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class EpochTimes(keras.callbacks.Callback):
    """Wall and process CPU seconds of each epoch."""

    def __init__(self):
        super().__init__()
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._began = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, epoch, logs=None):
        self.wall.append(time.perf_counter() - self._began[0])
        self.cpu.append(time.process_time() - self._began[1])


def fit_rates(
    model: keras.Model, dataset: tf.data.Dataset, steps: int, epochs: int
) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of `model.fit` over
    ``epochs`` epochs of ``steps`` steps, after one untimed epoch on the same
    iterator."""
    times = EpochTimes()
    model.fit(
        dataset,
        epochs=epochs + 1,
        steps_per_epoch=steps,
        callbacks=[times],
        shuffle=False,
        verbose=0,
    )
    images = steps * epochs * int(dataset.element_spec[0].shape[0])
    return images / sum(times.wall[1:]), images / sum(times.cpu[1:])


def measure_size(
    args: argparse.Namespace,
    source: sources.Source,
    image_size: int,
    batch_size: int,
    steps: int,
) -> dict[str, tuple[list[float], list[float]]]:
    """Per setting, the wall and CPU images/s of each round."""
    input_fn = data.make_input_fn(
        source=source,
        split="train",
        global_batch_size=batch_size,
        image_size=image_size,
        augmentation=args.augmentation,
        dtype="uint8",
        seed=0,
    )
    model = training_model(args.model, source, image_size)
    # The pipeline alone is fast: at least --pipeline_images for its rate.
    pipeline_images = max(batch_size * steps * args.epochs, args.pipeline_images)
    measure = {
        "fed": lambda: fit_rates(model, input_fn(), steps, args.epochs),
        "cached": lambda: fit_rates(
            model, input_fn().take(steps).cache().repeat(), steps, args.epochs
        ),
        "pipeline": lambda: images_per_second(input_fn(), pipeline_images),
    }
    rates = {name: ([], []) for name in SETTINGS}
    for round_index in range(args.rounds):
        start = round_index % len(SETTINGS)
        for name in SETTINGS[start:] + SETTINGS[:start]:
            wall_rate, cpu_rate = measure[name]()
            rates[name][0].append(wall_rate)
            rates[name][1].append(cpu_rate)
            # Cores busy = wall rate x CPU per image: below the machine's
            # cores when another process took some.
            print(
                f"  {image_size} px round {round_index + 1} {name}: "
                f"{wall_rate:.1f} img/s, {1e3 / cpu_rate:.2f} CPU ms/img, "
                f"{wall_rate / cpu_rate:.2f} cores busy, load average "
                f"{os.getloadavg()[0]:.1f}",
                flush=True,
            )
    return rates


def verdict(fed: float, cached: float, pipeline: float) -> str:
    """Which side bounds the step, from the three wall rates."""
    if fed >= COMPUTE_BOUND * cached:
        return f"compute-bound (fed >= {COMPUTE_BOUND} x cached)"
    if fed >= INPUT_BOUND * pipeline:
        return (
            f"input-bound (fed < {COMPUTE_BOUND} x cached, >= {INPUT_BOUND} x pipeline)"
        )
    return (
        f"neither alone (fed < {COMPUTE_BOUND} x cached and < {INPUT_BOUND} x "
        "pipeline): the two share the cores"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(machine_line(), flush=True)
    try:
        source = sources.describe("imagenet", args.data_dir)
        results = []
        for image_size, batch_size, steps in zip(
            args.image_sizes, args.batch_sizes, args.steps, strict=True
        ):
            began = time.perf_counter()
            rates = measure_size(args, source, image_size, batch_size, steps)
            results.append((image_size, batch_size, steps, rates))
            print(
                f"{image_size} px measured in {time.perf_counter() - began:.0f} s "
                f"(load average {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    except UserError as error:
        _fail(str(error))
    except tf.errors.OpError as error:
        if (problem := data.user_error(error)) is None:
            raise
        _fail(str(problem))

    print(
        f"\n{args.model} on {source.num_classes}-class ImageNet-format records "
        f"({args.data_dir}), augmentation "
        f"{args.augmentation or source.default_augmentation}, uint8 batches; "
        f"{args.rounds} rounds x {args.epochs} timed epochs; medians over rounds "
        "(min-max)"
    )
    print(
        f"{'size':>4} {'batch':>5} {'steps':>5} {'setting':<8} "
        f"{'img/s wall':>20} {'CPU ms/img':>20}"
    )
    for image_size, batch_size, steps, rates in results:
        medians = {name: np.median(rates[name][0]) for name in SETTINGS}
        for name in SETTINGS:
            wall, cpu = np.array(rates[name][0]), 1e3 / np.array(rates[name][1])
            print(
                f"{image_size:>4} {batch_size:>5} {steps:>5} {name:<8} "
                f"{_spread(wall, '.1f'):>20} {_spread(cpu, '.2f'):>20}"
            )
        cpu_ms = {name: 1e3 / np.median(rates[name][1]) for name in SETTINGS}
        shared = 1 / (1 / medians["cached"] + 1 / medians["pipeline"])
        print(
            f"{image_size:>4} px: wall: fed / cached "
            f"{medians['fed'] / medians['cached']:.2f}, fed / pipeline "
            f"{medians['fed'] / medians['pipeline']:.2f}, shared-cores estimate "
            f"{shared:.1f} img/s; CPU ms/img: fed {cpu_ms['fed']:.2f} against "
            f"cached + pipeline {cpu_ms['cached'] + cpu_ms['pipeline']:.2f}\n"
            f"{image_size:>4} px: "
            + verdict(medians["fed"], medians["cached"], medians["pipeline"]),
            flush=True,
        )


def _spread(values: np.ndarray, spec: str) -> str:
    return f"{np.median(values):{spec}} ({values.min():{spec}}-{values.max():{spec}})"


if __name__ == "__main__":
    main()
