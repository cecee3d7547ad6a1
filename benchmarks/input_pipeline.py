"""How many images per CPU-second does the input pipeline make, against the
tensorflow/tpu reference pipeline on the same files, and where does the time go?

    python -m benchmarks.input_pipeline [--cache_dir=/tmp/lars_tf_imagenette]
        [--images=2000] [--rounds=3] [--image_size=224] [--jpeg_size=WxH]
        [--variants=NAME,...]

On the Imagenette shards (`imagenette.converted_imagenette`; with
`--jpeg_size=500x375`, ImageNet's most common size, the same photos
re-encoded), each round times every variant's images per wall second and per
CPU-second of this process (all threads; other processes' load disturbs it
far less). Variants:

- `raw_decode`: read, parse and `tf.io.decode_jpeg` every image, no other work;
- stages, one image function alone on the parsed records, batched (no
  shuffle, seeds, checks or normalization): `crop_only` (the `minimal` window,
  `decode_and_crop_jpeg`, flip), `crop_resize` (the `minimal` pipeline's whole
  image work, `preprocessing.preprocess_image`), `decode_crop_resize` (its
  window decoded and resized, no flip: the least any pipeline giving those
  images does), `center_crop_resize` (the evaluation image work),
  `reference_crop_resize` (the reference's training image work);
- `train_minimal` / `train_extended` / `eval`: `train.data.make_input_fn`'s
  pipelines with float32 output, normalized on the host, like the reference's;
- `minimal_uint8` / `eval_uint8`: the pipelines as the app runs them (uint8
  batches, normalized in the train step);
- `reference_train` / `reference_eval`: the reference (`benchmarks/imagenette.py`);
- ablations, a function of `train.preprocessing` replaced while the pipeline
  is built: `minimal_no_normalize` / `eval_no_normalize` (normalization
  replaced by a cast), `extended_no_color` (no colour distortion),
  `minimal_uint8_no_image` and `reference_train_no_image` (the image work
  replaced by a black image: the plumbing alone);
- `service_1_worker` / `service_2_workers` / `service_2_workers_uint8`: the
  `minimal` pipeline through a tf.data service (`train.data_service`), all
  servers in this process (its CPU time counts theirs).

Each of ours is compared per round with its reference (`REFERENCE_OF`).
"""

import contextlib
from unittest import mock

import tensorflow as tf
from absl import flags

from benchmarks import harness, imagenette
from train import data, data_service, preprocessing

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
STAGES = (
    "crop_only",
    "crop_resize",
    "decode_crop_resize",
    "center_crop_resize",
    "reference_crop_resize",
)
# tf.data service variants: (workers, the pipeline they run).
SERVICE = {
    "service_1_worker": (1, "train_minimal"),
    "service_2_workers": (2, "train_minimal"),
    "service_2_workers_uint8": (2, "minimal_uint8"),
}
OURS = ("train_minimal", "train_extended", "eval", "minimal_uint8", "eval_uint8")
REFERENCES = ("reference_train", "reference_eval", "reference_train_no_image")
VARIANTS = ("raw_decode", *STAGES, *OURS, *REFERENCES, "minimal_no_normalize")
VARIANTS += ("eval_no_normalize", "extended_no_color", "minimal_uint8_no_image")
VARIANTS += tuple(SERVICE)

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "cache_dir", "/tmp/lars_tf_imagenette", "Where the converted shards are kept."
)
flags.DEFINE_integer("images", 2000, "Images timed per measurement.", lower_bound=1)
flags.DEFINE_integer("image_size", 224, "Output image size.", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Batch size of every variant.", lower_bound=1)
flags.DEFINE_string("jpeg_size", None, "WIDTHxHEIGHT: the photos re-encoded so.")
flags.register_validator(
    "jpeg_size",
    lambda value: value is None or _size(value) is not None,
    "--jpeg_size: WIDTHxHEIGHT, two positive integers such as 500x375",
)
harness.define_subset("variants", VARIANTS, "Variants to time")
harness.set_defaults(rounds=3)
_clusters = {}  # workers -> (dispatcher, workers), started once per process.


def _size(value: str) -> tuple[int, int] | None:
    try:
        width, height = (int(side) for side in value.split("x"))
    except ValueError:
        return None
    return (width, height) if width > 0 and height > 0 else None


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


# Ablations: (our pipeline, the function of train.preprocessing replaced while
# it is built, the replacement).
ABLATIONS = {
    "minimal_no_normalize": ("train_minimal", "normalize", _cast_only),
    "eval_no_normalize": ("eval", "normalize", _cast_only),
    "extended_no_color": ("train_extended", "distort_color", _no_color),
    "minimal_uint8_no_image": ("minimal_uint8", "preprocess_image", _blank_image),
}


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


def _batched(images: tf.data.Dataset) -> tf.data.Dataset:
    # All images have one size (224x224, or --jpeg_size), so the crops of the
    # "minimal" window have one size too; greyscale JPEGs become RGB.
    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = 1  # As the pipeline does.
    batches = images.batch(FLAGS.batch_size).prefetch(tf.data.AUTOTUNE)
    return batches.with_options(options)


def raw_decode_dataset(data_dir: str) -> tf.data.Dataset:
    """Records -> decode_jpeg (whole image, RGB) -> batches."""
    images = _encoded_images(data_dir).map(
        lambda jpeg: tf.io.decode_jpeg(jpeg, channels=3),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    return _batched(images)


def _stage_image(stage: str, index: tf.Tensor, jpeg: tf.Tensor) -> tf.Tensor:
    """One stage's image function (module docstring) on one image."""
    seed = tf.stack([index, 0])  # Random windows and flips, as in training.
    size = FLAGS.image_size
    if stage == "crop_resize":
        return preprocessing.preprocess_image(
            jpeg, is_encoded=True, image_size=size, training=True, seed=seed
        )
    if stage == "center_crop_resize":
        return preprocessing.preprocess_image(
            jpeg, is_encoded=True, image_size=size, training=False
        )
    if stage == "reference_crop_resize":
        image = imagenette.reference_random_crop(jpeg, size)
        return tf.image.random_flip_left_right(image)
    shape = preprocessing.image_shape(jpeg, is_encoded=True)
    window = preprocessing.minimal_crop_window(shape, seed)
    image = preprocessing.crop(jpeg, window, True, 3)
    if stage == "crop_only":
        return preprocessing.random_flip_left_right(image, seed)
    return preprocessing.resize(image, size)  # decode_crop_resize


def stage_dataset(data_dir: str, stage: str) -> tf.data.Dataset:
    """One stage's image function on every image, batched; nothing else the
    pipelines do (seeds, shuffling, checks, normalization) runs here."""
    images = (
        _encoded_images(data_dir)
        .enumerate()
        .map(
            lambda index, jpeg: _stage_image(stage, index, jpeg),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=False,
        )
    )
    return _batched(images)


def pipeline_dataset(data_dir: str, variant: str) -> tf.data.Dataset:
    """Our pipeline `variant`, repeated; an ablation's function is replaced
    while the pipeline is traced."""
    replaced = contextlib.nullcontext()
    if variant in ABLATIONS:
        variant, name, replacement = ABLATIONS[variant]
        replaced = mock.patch.object(preprocessing, name, replacement)
    augmentation = {"train_extended": "extended", "eval": "none", "eval_uint8": "none"}
    with replaced:
        input_fn = data.make_input_fn(
            source="imagenet",
            split="validation" if variant.startswith("eval") else "train",
            data_dir=data_dir,
            global_batch_size=FLAGS.batch_size,
            image_size=FLAGS.image_size,
            augmentation=augmentation.get(variant, "minimal"),
            dtype="uint8" if variant.endswith("uint8") else "float32",
            seed=0,
            shuffle_buffer_size=1000,
        )
        return input_fn().repeat()


def service_dataset(data_dir: str, num_workers: int, variant: str) -> tf.data.Dataset:
    """Our pipeline `variant` through a tf.data service of `num_workers`
    workers in this process (started on first use, kept for later rounds)."""
    if num_workers not in _clusters:
        dispatcher, _ = data_service.start_server(0)
        address = dispatcher.target.removeprefix("grpc://")
        workers = [data_service.start_server(0, address)[0] for _ in range(num_workers)]
        _clusters[num_workers] = (dispatcher, workers)
    dispatcher, _ = _clusters[num_workers]
    dataset = pipeline_dataset(data_dir, variant)
    return data_service.distribute(dataset, dispatcher.target).prefetch(
        tf.data.AUTOTUNE
    )


def make_dataset(data_dir: str, variant: str) -> tf.data.Dataset:
    """The dataset a variant times."""
    size, batch = FLAGS.image_size, FLAGS.batch_size
    if variant == "raw_decode":
        return raw_decode_dataset(data_dir)
    if variant in STAGES:
        return stage_dataset(data_dir, variant)
    if variant in SERVICE:
        return service_dataset(data_dir, *SERVICE[variant])
    if variant == "reference_train_no_image":
        crop = _blank_reference_image
        return imagenette.reference_dataset(data_dir, True, batch, size, crop)
    if variant.startswith("reference_"):
        training = variant == "reference_train"
        return imagenette.reference_dataset(data_dir, training, batch, size)
    return pipeline_dataset(data_dir, variant)


def measure(data_dir: str, variant: str) -> tuple[float, float]:
    """(images per wall second, per CPU-second) of one variant, printed."""
    dataset = make_dataset(data_dir, variant)
    rate, cpu_rate = imagenette.images_per_second(dataset, FLAGS.images)
    print(f"{variant:24s} {rate:8.1f} img/s wall, {cpu_rate:8.1f} img per CPU-s")
    return rate, cpu_rate


def main() -> None:
    data_dir = imagenette.converted_imagenette(FLAGS.cache_dir)
    if FLAGS.jpeg_size:
        data_dir = imagenette.reencoded(data_dir, *_size(FLAGS.jpeg_size))
    print(harness.machine_line(), flush=True)
    runs = harness.interleave(
        {v: (lambda v=v: measure(data_dir, v)) for v in FLAGS.variants}, FLAGS.rounds
    )
    wall = {v: [w for w, _ in r] for v, r in runs.items()}
    cpu = {v: [c for _, c in r] for v, r in runs.items()}
    figures = {}
    for variant in FLAGS.variants:
        figures[variant] = {
            "img_per_s_wall": harness.summary(wall[variant]),
            "img_per_cpu_s": harness.summary(cpu[variant]),
        }
        if (reference := REFERENCE_OF.get(variant)) in cpu:
            figures[variant]["reference"] = reference
            figures[variant]["cpu_x_reference"] = harness.ratio(
                cpu[variant], cpu[reference]
            )
    rows = [
        [v, harness.show(f["img_per_cpu_s"], ".0f")]
        + [f.get("reference", ""), harness.show(f["cpu_x_reference"], ".2f")]
        if "reference" in f
        else [v, harness.show(f["img_per_cpu_s"], ".0f"), "", ""]
        for v, f in figures.items()
    ]
    header = ["variant", "img per CPU-s", "reference", "/ reference (CPU-s)"]
    print(harness.markdown_table(header, rows))
    harness.write_results("input_pipeline", figures)


if __name__ == "__main__":
    harness.run(main)
