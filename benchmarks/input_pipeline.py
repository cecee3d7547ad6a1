"""Input pipeline throughput against the reference pipeline and the raw JPEG
decode rate, on the same files.

    python benchmarks/input_pipeline.py [--cache_dir=/tmp/lars_tf_imagenette]
        [--images=2000] [--rounds=3] [--image_size=224] [--jpeg_size=WxH]
        [--variants=NAME,...]

Converts the Imagenette photos (``$LARS_TF_DATA_DIR/imagenette2-224``, 9,469
train and 3,925 val real ImageNet JPEGs) into TFRecord shards once (reused from
``--cache_dir``), then measures in rounds, side by side, the images/sec of:

- ``raw_decode``: read + parse the records and ``tf.io.decode_jpeg`` every image
  (parallel map, no other work): the ceiling an input pipeline is measured against;
- stages, each one image function alone on the parsed records, batched (no
  shuffle, seeds, integrity checks or normalization): ``crop_only``: the
  ``minimal`` crop window + ``decode_and_crop_jpeg`` + flip; ``crop_resize``:
  the ``minimal`` pipeline's whole image work (`preprocessing.preprocess_image`:
  window, decode of the window, flip, bilinear resize to ``--image_size``);
  ``decode_crop_resize``: its window decoded and resized, no flip: the work any
  pipeline giving the ``minimal`` images must do, so its rate bounds theirs;
  ``center_crop_resize``: the evaluation image work (center window decoded and
  resized), which bounds any pipeline giving our evaluation images;
  ``reference_crop_resize``: the reference's training image work (below)
  without its pipeline. ``crop_resize`` and ``decode_crop_resize`` are compared
  with ``reference_train``, ``center_crop_resize`` with ``reference_eval``;
- ``train_minimal`` / ``train_extended``: the full training pipeline of
  ``train.data.make_input_fn`` (crop-before-decode, flip, resize[, colour],
  batch, normalize) at ``--image_size``;
- ``eval``: the evaluation pipeline (center crop, resize) on the val shards;
- ``reference_train`` / ``reference_eval``: the de-facto reference, the
  tensorflow/tpu ResNet input pipeline as its source describes it (written here
  from that description): records read by a parallel interleave, a 1,024-example
  shuffle, parse of the JPEG and label; for training an Inception crop
  (``sample_distorted_bounding_box`` on the whole image, area 0.08-1, aspect
  3/4-4/3, 10 attempts; after 10 failures a center crop, decoded again) decoded
  with ``decode_and_crop_jpeg``, a bicubic resize to ``--image_size`` and a
  random flip; for evaluation a center crop of image_size / (image_size + 32) of
  the shorter side, decoded with ``decode_and_crop_jpeg`` and resized bicubic;
  batches of float32 in 0-255 (the reference normalizes on the accelerator, so
  it does less host work than our pipelines, which normalize on the host);
- ``service_1_worker`` / ``service_2_workers`` / ``service_2_workers_uint8``:
  the ``minimal`` training pipeline (float32 or uint8 output) read through a
  tf.data service (``train.data_service.distribute``) with 1 or 2 workers, all
  servers in this process (its CPU time counts theirs), against the same
  pipeline in-process in the same round;
- ``minimal_no_normalize`` / ``eval_no_normalize`` / ``extended_no_color``:
  ablations, our pipelines with the batch normalization replaced by a cast (the
  host work left if normalization ran on the accelerator) or without the
  colour distortion (the ``extended`` work left if it ran on the accelerator);
- ``minimal_uint8`` / ``eval_uint8``: the pipelines as the app runs them
  (``dtype="uint8"``: each image rounded to uint8 before batching, normalized
  later on the accelerator);
- ``minimal_uint8_no_image`` / ``reference_train_no_image``: the plumbing
  alone: ``minimal_uint8`` with `preprocessing.preprocess_image` replaced by a
  black image of the output size (no decode, window, flip or resize), and
  ``reference_train`` with its crop-decode-resize replaced so (its flip of
  the float result stays); what each pipeline costs per image besides the
  image work.

Imagenette's JPEGs are downscaled to 224x224, so decoding them is cheap next to
the resize every pipeline does. ``--jpeg_size=500x375`` (ImageNet's most common
size) times the same photos re-encoded larger (bicubic upscale, JPEG quality 90,
written once to ``<cache_dir>_<size>``), where decoding weighs as it does on real
ImageNet files; both figures go in BENCHMARKS.md.

Two rates per measurement: images per wall-clock second (divided by the cores for
"per core") and images per CPU-second of this process (user + system time of all
its threads), which other programs' load on a shared machine disturbs much less.
Each pipeline's ratio to the raw decode rate of the same round is computed on the
CPU-second rates, and so is each of our pipelines' ratio to its reference in the
same round (training to ``reference_train``, eval to ``reference_eval``; the
goal is >= 1.2). Rounds alternate the variants so a load change hits all of
them; the spread over rounds is printed.
"""

import contextlib
import os
import statistics
import sys
import time
from unittest import mock

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

from train import (  # noqa: E402
    convert_images,
    data,
    data_service,
    preprocessing,
    shared_data_dir,
)

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "cache_dir", "/tmp/lars_tf_imagenette", "Where the converted shards are kept."
)
flags.DEFINE_integer("images", 2000, "Images timed per measurement.")
flags.DEFINE_integer("rounds", 3, "Rounds of all variants.")
flags.DEFINE_integer("image_size", 224, "Output image size of the pipelines.")
flags.DEFINE_integer("batch_size", 64, "Batch size of every variant.")
flags.DEFINE_string(
    "jpeg_size", None, "WIDTHxHEIGHT: time the photos re-encoded at this size."
)
VARIANTS = (
    "raw_decode",
    "crop_only",
    "crop_resize",
    "decode_crop_resize",
    "center_crop_resize",
    "reference_crop_resize",
    "train_minimal",
    "train_extended",
    "eval",
    "reference_train",
    "reference_eval",
    "minimal_no_normalize",
    "eval_no_normalize",
    "extended_no_color",
    "minimal_uint8",
    "eval_uint8",
    "minimal_uint8_no_image",
    "reference_train_no_image",
    "service_1_worker",
    "service_2_workers",
    "service_2_workers_uint8",
)
# Which reference each of our pipelines is compared with.
REFERENCE_OF = {
    "train_minimal": "reference_train",
    "train_extended": "reference_train",
    "eval": "reference_eval",
    "minimal_no_normalize": "reference_train",
    "extended_no_color": "reference_train",
    "eval_no_normalize": "reference_eval",
    "minimal_uint8": "reference_train",
    "eval_uint8": "reference_eval",
    "minimal_uint8_no_image": "reference_train_no_image",
    "crop_resize": "reference_train",
    "decode_crop_resize": "reference_train",
    "center_crop_resize": "reference_eval",
    "reference_crop_resize": "reference_train",
    "service_1_worker": "train_minimal",
    "service_2_workers": "train_minimal",
    "service_2_workers_uint8": "minimal_uint8",
}
_clusters = {}  # Workers -> (dispatcher, workers), started once per process.


@tf.autograph.experimental.do_not_convert
def _cast_only(images, mean, std, dtype):
    """Normalization left to the accelerator: the host only casts."""
    del mean, std
    return tf.cast(images, dtype)


@tf.autograph.experimental.do_not_convert
def _blank_image(image, *, image_size, channels, **unused):
    """No image work: a black image of the output size."""
    del image, unused
    return tf.zeros([image_size, image_size, channels])


@tf.autograph.experimental.do_not_convert
def _blank_reference_image(jpeg, image_size):
    del jpeg
    return tf.zeros([image_size, image_size, 3])


@tf.autograph.experimental.do_not_convert
def _no_color(image, seed):
    del seed
    return image


# Ablations: (our pipeline, the preprocessing function replaced while it is
# built, the replacement).
ABLATIONS = {
    "minimal_no_normalize": ("train_minimal", "normalize", _cast_only),
    "eval_no_normalize": ("eval", "normalize", _cast_only),
    "extended_no_color": ("train_extended", "distort_color", _no_color),
    "minimal_uint8_no_image": ("minimal_uint8", "preprocess_image", _blank_image),
}
# tf.data service variants: (workers, the pipeline they run).
SERVICE = {
    "service_1_worker": (1, "train_minimal"),
    "service_2_workers": (2, "train_minimal"),
    "service_2_workers_uint8": (2, "minimal_uint8"),
}
STAGES = (
    "crop_only",
    "crop_resize",
    "decode_crop_resize",
    "center_crop_resize",
    "reference_crop_resize",
)
REFERENCE_CROP_PADDING = 32  # Evaluation crop: image_size / (image_size + 32).
flags.DEFINE_list(
    "variants",
    list(VARIANTS),
    f"Variants to time, of {VARIANTS}; raw_decode must be among them for the ratios.",
)


def converted_imagenette(cache_dir: str) -> str:
    """The shard folder, converting Imagenette's train split on first use."""
    if os.path.exists(os.path.join(cache_dir, data.INFO_FILENAME)):
        return cache_dir
    source = os.path.join(shared_data_dir(), "imagenette2-224", "train")
    if not os.path.isdir(source):
        print(
            f"Imagenette not found at {source}; set LARS_TF_DATA_DIR", file=sys.stderr
        )
        sys.exit(2)
    print(f"converting {source} -> {cache_dir} (once)", flush=True)
    start = time.perf_counter()
    convert_images.convert(
        cache_dir,
        train_dir=source,
        validation_dir=source.replace("train", "val"),
        train_shards=16,
        validation_shards=8,
    )
    print(f"converted in {time.perf_counter() - start:.0f} s", flush=True)
    return cache_dir


def reencoded(data_dir: str, width: int, height: int) -> str:
    """The shards with every photo upscaled to width x height (written once)."""
    out_dir = f"{data_dir.rstrip('/')}_{width}x{height}"
    if os.path.exists(os.path.join(out_dir, data.INFO_FILENAME)):
        return out_dir
    print(f"re-encoding {data_dir} at {width}x{height} -> {out_dir} (once)")
    os.makedirs(out_dir, exist_ok=True)
    features = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/class/synset": tf.io.FixedLenFeature([], tf.string),
        "image/filename": tf.io.FixedLenFeature([], tf.string),
    }
    for split in ("train", "validation"):
        for path in data.list_record_files(data_dir, split):
            out_path = os.path.join(out_dir, os.path.basename(path))
            with tf.io.TFRecordWriter(out_path) as writer:
                for record in tf.data.TFRecordDataset(path):
                    example = tf.io.parse_single_example(record, features)
                    image = tf.io.decode_jpeg(example["image/encoded"], channels=3)
                    image = tf.image.resize(image, (height, width), "bicubic")
                    image = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
                    jpeg = tf.io.encode_jpeg(image, quality=90).numpy()
                    writer.write(
                        convert_images.make_example(
                            jpeg,
                            int(example["image/class/label"]),
                            example["image/class/synset"].numpy().decode(),
                            example["image/filename"].numpy().decode(),
                            height,
                            width,
                        ).SerializeToString()
                    )
    with open(os.path.join(data_dir, data.INFO_FILENAME)) as source:
        info = source.read()
    with open(os.path.join(out_dir, data.INFO_FILENAME), "w") as target:
        target.write(info)
    return out_dir


def _encoded_images(data_dir: str) -> tf.data.Dataset:
    """The JPEG bytes of the train shards, read in parallel, repeated."""
    files = data.list_record_files(data_dir, "train")
    features = {"image/encoded": tf.io.FixedLenFeature([], tf.string)}
    return (
        tf.data.Dataset.from_tensor_slices(files)
        .interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=data.RECORD_BUFFER_BYTES),
            cycle_length=len(files),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=False,
        )
        .repeat()
        .map(
            lambda record: tf.io.parse_single_example(record, features)["image/encoded"]
        )
    )


def _batched(images: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    # All images have one size (224x224, or --jpeg_size), so the crops of the
    # "minimal" window have one size too; greyscale JPEGs become RGB.
    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = 1  # As the pipeline does.
    return images.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(options)


def raw_decode_dataset(data_dir: str, batch_size: int) -> tf.data.Dataset:
    """Records -> decode_jpeg (whole image, RGB) -> batches."""
    images = _encoded_images(data_dir).map(
        lambda jpeg: tf.io.decode_jpeg(jpeg, channels=3),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    return _batched(images, batch_size)


def _minimal_window(jpeg: tf.Tensor, seed: tf.Tensor) -> preprocessing.Window:
    return preprocessing.minimal_crop_window(
        preprocessing.image_shape(jpeg, is_encoded=True), seed
    )


def stage_dataset(
    data_dir: str, batch_size: int, image_size: int, stage: str
) -> tf.data.Dataset:
    """One stage's image function (module docstring) on every image, batched.
    Nothing else the pipelines do (per-example seeds, shuffling, label checks,
    corrupt-record counting, normalization) runs here."""

    def image_work(index, jpeg):
        seed = tf.stack([index, 0])  # Random windows and flips, as in training.
        if stage == "crop_only":
            image = preprocessing.crop(jpeg, _minimal_window(jpeg, seed), True, 3)
            return preprocessing.random_flip_left_right(image, seed)
        if stage == "crop_resize":
            return preprocessing.preprocess_image(
                jpeg, is_encoded=True, image_size=image_size, training=True, seed=seed
            )
        if stage == "decode_crop_resize":
            image = preprocessing.crop(jpeg, _minimal_window(jpeg, seed), True, 3)
            return preprocessing.resize(image, image_size)
        if stage == "center_crop_resize":
            return preprocessing.preprocess_image(
                jpeg, is_encoded=True, image_size=image_size, training=False
            )
        image = reference_random_crop(jpeg, image_size)
        return tf.image.random_flip_left_right(image)

    images = (
        _encoded_images(data_dir)
        .enumerate()
        .map(image_work, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    )
    return _batched(images, batch_size)


def pipeline_dataset(data_dir: str, variant: str) -> tf.data.Dataset:
    """The project's pipeline: training (repeated) or evaluation (repeated here);
    an ablation's function is replaced while the pipeline is traced."""
    replaced = contextlib.nullcontext()
    if variant in ABLATIONS:
        variant, name, replacement = ABLATIONS[variant]
        replaced = mock.patch.object(preprocessing, name, replacement)
    with replaced:
        return _our_pipeline(data_dir, variant)


def service_dataset(data_dir: str, num_workers: int, variant: str) -> tf.data.Dataset:
    """Our pipeline `variant` through a tf.data service of num_workers workers
    in this process (started on first use, kept for later rounds)."""
    if num_workers not in _clusters:
        dispatcher, _ = data_service.start_server(0)
        address = dispatcher.target.removeprefix("grpc://")
        workers = [data_service.start_server(0, address)[0] for _ in range(num_workers)]
        _clusters[num_workers] = (dispatcher, workers)
    dispatcher, _ = _clusters[num_workers]
    return data_service.distribute(
        pipeline_dataset(data_dir, variant), dispatcher.target
    ).prefetch(tf.data.AUTOTUNE)


def _our_pipeline(data_dir: str, variant: str) -> tf.data.Dataset:
    augmentation = {
        "train_minimal": "minimal",
        "minimal_uint8": "minimal",
        "train_extended": "extended",
    }
    input_fn = data.make_input_fn(
        source="imagenet",
        split="validation" if variant.startswith("eval") else "train",
        data_dir=data_dir,
        global_batch_size=FLAGS.batch_size,
        image_size=FLAGS.image_size,
        augmentation=augmentation.get(variant, "none"),
        dtype="uint8" if variant.endswith("uint8") else "float32",
        seed=0,
        shuffle_buffer_size=1000,
    )
    return input_fn().repeat()


def reference_center_crop(jpeg: tf.Tensor, image_size: int) -> tf.Tensor:
    """The reference's evaluation image: a centered square of image_size /
    (image_size + 32) of the shorter side, decoded alone, resized bicubic."""
    shape = tf.image.extract_jpeg_shape(jpeg)
    shorter = tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
    side = tf.cast(
        image_size / (image_size + REFERENCE_CROP_PADDING) * shorter, tf.int32
    )
    window = tf.stack(
        [(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side]
    )
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    # TF 2's bicubic resize runs the reference's ResizeBicubic kernel (with
    # half-pixel centers); uint8 in, float32 in 0-255 out.
    return tf.image.resize(image, [image_size, image_size], "bicubic")


def reference_random_crop(jpeg: tf.Tensor, image_size: int) -> tf.Tensor:
    """The reference's training crop: an Inception window of the whole image,
    decoded alone and resized bicubic; the evaluation crop (decoding again)
    when all 10 attempts fail, which the whole image as the window signals."""
    shape = tf.image.extract_jpeg_shape(jpeg)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    gave_up = tf.reduce_sum(tf.cast(tf.equal(shape, tf.shape(image)), tf.int32)) >= 3
    return tf.cond(
        gave_up,
        lambda: reference_center_crop(jpeg, image_size),
        lambda: tf.image.resize(image, [image_size, image_size], "bicubic"),
    )


def reference_dataset(
    data_dir: str, training: bool, batch_size: int, image_size: int
) -> tf.data.Dataset:
    """The reference input pipeline (module docstring), repeated."""
    files = data.list_record_files(data_dir, "train" if training else "validation")
    features = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string, ""),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64, -1),
    }

    def parse_and_preprocess(record):
        parsed = tf.io.parse_single_example(record, features)
        jpeg = parsed["image/encoded"]
        if training:
            image = reference_random_crop(jpeg, image_size)
            image = tf.image.random_flip_left_right(image)
        else:
            image = reference_center_crop(jpeg, image_size)
        image = tf.reshape(image, [image_size, image_size, 3])
        return image, tf.cast(parsed["image/class/label"], tf.int32) - 1

    records = (
        tf.data.Dataset.from_tensor_slices(files)
        .repeat()
        .interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=data.RECORD_BUFFER_BYTES),
            cycle_length=len(files),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    )
    if training:
        records = records.shuffle(1024)
    batches = (
        records.map(parse_and_preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = 1  # As the reference sets.
    return batches.with_options(options)


def images_per_second(dataset: tf.data.Dataset, num_images: int) -> tuple:
    """(images per wall second, images per CPU second of this process), timed
    over num_images after a warm-up of a few batches."""
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    seen, wall, cpu = 0, time.perf_counter(), time.process_time()
    while seen < num_images:
        batch = next(iterator)
        # The pipelines give (images, labels); the raw and stage variants give
        # images alone, which unpacking would split along the batch axis.
        images = batch[0] if isinstance(batch, tuple) else batch
        seen += int(images.shape[0])
    return (
        seen / (time.perf_counter() - wall),
        seen / (time.process_time() - cpu),
    )


def main(argv):
    del argv
    data_dir = converted_imagenette(FLAGS.cache_dir)
    if FLAGS.jpeg_size:
        width, height = (int(side) for side in FLAGS.jpeg_size.split("x"))
        data_dir = reencoded(data_dir, width, height)
    cores = len(os.sched_getaffinity(0))
    print(
        f"{cores} cores, batch {FLAGS.batch_size}, {FLAGS.images} images per "
        f"measurement, {FLAGS.rounds} rounds, TF {tf.__version__}",
        flush=True,
    )
    rates = {variant: [] for variant in FLAGS.variants}
    cpu_rates = {variant: [] for variant in FLAGS.variants}
    for round_index in range(FLAGS.rounds):
        for variant in FLAGS.variants:
            if variant == "raw_decode":
                dataset = raw_decode_dataset(data_dir, FLAGS.batch_size)
            elif variant == "reference_train_no_image":
                with mock.patch(
                    f"{__name__}.reference_random_crop", _blank_reference_image
                ):
                    dataset = reference_dataset(
                        data_dir, True, FLAGS.batch_size, FLAGS.image_size
                    )
            elif variant.startswith("reference_"):
                dataset = reference_dataset(
                    data_dir,
                    variant == "reference_train",
                    FLAGS.batch_size,
                    FLAGS.image_size,
                )
            elif variant in SERVICE:
                dataset = service_dataset(data_dir, *SERVICE[variant])
            elif variant in STAGES:
                dataset = stage_dataset(
                    data_dir, FLAGS.batch_size, FLAGS.image_size, variant
                )
            else:
                dataset = pipeline_dataset(data_dir, variant)
            rate, cpu_rate = images_per_second(dataset, FLAGS.images)
            rates[variant].append(rate)
            cpu_rates[variant].append(cpu_rate)
            print(
                f"round {round_index}: {variant:15s} {rate:8.1f} img/s wall, "
                f"{cpu_rate:8.1f} img per CPU-s",
                flush=True,
            )

    print(
        "\n| variant | img/s wall, median (min-max) | wall / core | "
        "img per CPU-second, median (min-max) | / raw decode (CPU-s), median "
        "(min-max) | / reference (CPU-s), median (min-max) | / reference (wall), "
        "median (min-max) |"
    )
    print("|---|---|---|---|---|---|---|")
    for variant in FLAGS.variants:
        wall, cpu = rates[variant], cpu_rates[variant]
        reference = REFERENCE_OF.get(variant)
        print(
            f"| {variant} | {statistics.median(wall):.0f} "
            f"({min(wall):.0f}-{max(wall):.0f}) | "
            f"{statistics.median(wall) / cores:.0f} | "
            f"{statistics.median(cpu):.0f} ({min(cpu):.0f}-{max(cpu):.0f}) | "
            f"{_ratios(cpu, cpu_rates.get('raw_decode'))} | "
            f"{_ratios(cpu, cpu_rates.get(reference))} | "
            f"{_ratios(wall, rates.get(reference))} |"
        )


def _ratios(rates: list[float], baseline: list[float] | None) -> str:
    """Median (min-max) of the per-round ratios; empty without a baseline."""
    if not baseline:
        return ""
    per_round = [r / b for r, b in zip(rates, baseline, strict=True)]
    return (
        f"{statistics.median(per_round):.2f} "
        f"({min(per_round):.2f}-{max(per_round):.2f})"
    )


if __name__ == "__main__":
    app.run(main)
