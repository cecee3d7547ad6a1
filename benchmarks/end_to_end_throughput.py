"""Does the input pipeline or the model bound the training step?

    python -m benchmarks.end_to_end_throughput --data_dir=/tmp/imagenette
        [--model=resnet20] [--image_sizes=64,224] [--batch_sizes=64,16]
        [--steps=6,3] [--epochs=2] [--rounds=3]

For each image size, one model trains with `model.fit` in three settings,
measured in the same process:

1. `fed`: fed by the training input pipeline as the app builds it
   (`train.data.make_input_fn`, training split, the source's training
   augmentation, uint8 batches), the batches normalized inside the step
   (`train.data.normalize`, as the app's train step does);
2. `cached`: the same model and step fed by the first `--steps` batches of
   that same pipeline, cached in memory and repeated
   (`.take(k).cache().repeat()`): the step's compute alone;
3. `pipeline`: the pipeline alone, iterated as fast as it goes.

The verdict, from the wall rates (medians over rounds): compute-bound when
`fed` >= 0.9 x `cached`; else input-bound when `fed` >= 0.8 x `pipeline`;
else neither alone. On a CPU-only machine the pipeline and the step share the
cores, so `fed` pays for both: the figures give each setting's CPU
milliseconds per image (all this process's threads) beside its wall rate,
and the shared-cores estimate 1 / (1 / cached + 1 / pipeline).

The model is the app's (`train.models`) behind a layer that normalizes the
uint8 batch, compiled with `lars_tf.LARS` (`harness.lars_settings`, weight
decay 5e-4) and Keras's default `jit_compile`. Each `fit` call keeps one
iterator: its first epoch (compilation, the shuffle buffer's fill, the
cache's fill) is not timed; then `--epochs` timed epochs of `--steps` steps.
The pipeline alone is timed over at least `--pipeline_images` images. Rounds
rotate the order of the three settings.

The data: TFRecords as `train.convert_images` writes them, e.g.

    python -m train.convert_images --labels=dense --train_shards=8 \\
        --validation_shards=2 --train_dir=$DATA/imagenette2-224/train \\
        --validation_dir=$DATA/imagenette2-224/val --output_dir=/tmp/imagenette
"""

import os
import time

from absl import flags

from benchmarks import harness
from train import AUGMENTATIONS, models

SETTINGS = ("fed", "cached", "pipeline")
# fed / cached at or above this: the pipeline costs the step little.
COMPUTE_BOUND = 0.9
# fed / pipeline at or above this (and not compute-bound): the pipeline's rate
# is what the step gets.
INPUT_BOUND = 0.8

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "TFRecords written by train.convert_images.")
flags.DEFINE_enum("model", "resnet20", models.MODEL_NAMES, "The model.")
flags.DEFINE_list("image_sizes", ["64", "224"], "Image sizes, comma-separated.")
flags.DEFINE_list("batch_sizes", ["64", "16"], "One batch size per image size.")
flags.DEFINE_list("steps", ["6", "3"], "Timed steps per epoch, one per image size.")
flags.DEFINE_integer("epochs", 2, "Timed epochs per fit.", lower_bound=1)
flags.DEFINE_integer(
    "pipeline_images", 1000, "Images per timing of the pipeline alone, at least."
)
flags.DEFINE_enum(
    "augmentation", None, AUGMENTATIONS, "Training augmentation; default the source's."
)
flags.mark_flag_as_required("data_dir")
harness.set_defaults(rounds=3)


def _positive_ints(values: list[str]) -> bool:
    return bool(values) and all(v.isdigit() and int(v) > 0 for v in values)


for _name in ("image_sizes", "batch_sizes", "steps"):
    flags.register_validator(
        _name, _positive_ints, f"--{_name}: positive integers, comma-separated"
    )
flags.register_multi_flags_validator(
    ["image_sizes", "batch_sizes", "steps"],
    lambda f: len(f["image_sizes"]) == len(f["batch_sizes"]) == len(f["steps"]),
    "--image_sizes, --batch_sizes and --steps: give one value per image size",
)
flags.register_validator(
    "data_dir",
    lambda path: path is None or os.path.isdir(path),
    "--data_dir: no such folder (TFRecords written by train.convert_images)",
)


def training_model(source, image_size: int):
    """The app's model taking uint8 batches, normalized in the step as the
    app's train step does, compiled with LARS at its training settings."""
    import keras

    import lars_tf
    from train import data

    network = models.build_model(
        FLAGS.model, source.num_classes, image_size, source.channels
    )
    images = keras.Input((image_size, image_size, source.channels), dtype="uint8")
    normalized = keras.layers.Lambda(lambda pixels: data.normalize(pixels, source))(
        images
    )
    model = keras.Model(images, network(normalized))
    model.compile(
        optimizer=lars_tf.LARS(**harness.lars_settings(weight_decay=5e-4)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def fit_rates(model, dataset, steps: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of `model.fit` over
    `--epochs` epochs of `steps` steps, after one untimed epoch on the same
    iterator."""
    import keras

    times = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda *_: times.append(
            (time.perf_counter(), time.process_time())
        ),
        on_epoch_end=lambda *_: times.append(
            (time.perf_counter(), time.process_time())
        ),
    )
    model.fit(
        dataset,
        epochs=FLAGS.epochs + 1,
        steps_per_epoch=steps,
        callbacks=[timer],
        shuffle=False,
        verbose=0,
    )
    epochs = list(zip(times[2::2], times[3::2]))  # the first epoch is not timed
    images = steps * FLAGS.epochs * int(dataset.element_spec[0].shape[0])
    wall = sum(end[0] - begin[0] for begin, end in epochs)
    cpu = sum(end[1] - begin[1] for begin, end in epochs)
    return images / wall, images / cpu


def measure_size(source, image_size: int, batch_size: int, steps: int) -> dict:
    """Per setting, the (wall, CPU) images/s of each round."""
    from benchmarks import imagenette
    from train import data

    input_fn = data.make_input_fn(
        source=source,
        split="train",
        global_batch_size=batch_size,
        image_size=image_size,
        augmentation=FLAGS.augmentation,
        dtype="uint8",
        seed=0,
    )
    model = training_model(source, image_size)
    pipeline_images = max(batch_size * steps * FLAGS.epochs, FLAGS.pipeline_images)
    measure = {
        "fed": lambda: fit_rates(model, input_fn(), steps),
        "cached": lambda: fit_rates(
            model, input_fn().take(steps).cache().repeat(), steps
        ),
        "pipeline": lambda: imagenette.images_per_second(input_fn(), pipeline_images),
    }

    def measured(name: str) -> tuple[float, float]:
        wall_rate, cpu_rate = measure[name]()
        # Cores busy = wall rate x CPU per image: below the machine's cores
        # when another process took some.
        print(
            f"  {image_size} px {name}: {wall_rate:.1f} img/s, "
            f"{1e3 / cpu_rate:.2f} CPU ms/img, {wall_rate / cpu_rate:.2f} cores "
            f"busy, load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        return wall_rate, cpu_rate

    return harness.interleave(
        {name: (lambda name=name: measured(name)) for name in SETTINGS}, FLAGS.rounds
    )


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


def size_figures(rates: dict) -> dict:
    """Medians, CPU ms per image, the shared-cores estimate and the verdict."""
    figures = {}
    for name in SETTINGS:
        wall = [w for w, _ in rates[name]]
        cpu_ms = [1e3 / c for _, c in rates[name]]
        figures[name] = {
            "img_per_s_wall": harness.summary(wall),
            "cpu_ms_per_image": harness.summary(cpu_ms),
        }
    median = {name: figures[name]["img_per_s_wall"]["median"] for name in SETTINGS}
    figures["fed_x_cached"] = median["fed"] / median["cached"]
    figures["fed_x_pipeline"] = median["fed"] / median["pipeline"]
    figures["shared_cores_estimate"] = 1 / (
        1 / median["cached"] + 1 / median["pipeline"]
    )
    figures["verdict"] = verdict(median["fed"], median["cached"], median["pipeline"])
    return figures


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from train import UserError, data, sources

    print(harness.machine_line(), flush=True)
    figures = {}
    sizes = zip(FLAGS.image_sizes, FLAGS.batch_sizes, FLAGS.steps, strict=True)
    try:
        source = sources.describe("imagenet", FLAGS.data_dir)
        for image_size, batch_size, steps in (map(int, s) for s in sizes):
            rates = measure_size(source, image_size, batch_size, steps)
            figures[f"{image_size} px, batch {batch_size}"] = size_figures(rates)
    except UserError as error:
        harness.fail(str(error))
    except tf.errors.OpError as error:
        if (problem := data.user_error(error)) is None:
            raise
        harness.fail(str(problem))
    rows = [
        [size, name, harness.show(f[name]["img_per_s_wall"], ".1f")]
        + [harness.show(f[name]["cpu_ms_per_image"], ".2f")]
        for size, f in figures.items()
        for name in SETTINGS
    ]
    print(harness.markdown_table(["size", "setting", "img/s wall", "CPU ms/img"], rows))
    for size, f in figures.items():
        print(f"{size}: {f['verdict']}")
    harness.write_results("end_to_end_throughput", figures)


if __name__ == "__main__":
    harness.run(main)
