"""The data side the input benchmarks share: Imagenette as TFRecords, the
reference input pipeline, and the rate of a pipeline.

- `converted_imagenette`: the Imagenette photos (`$LARS_TF_DATA_DIR/
  imagenette2-224`, 9,469 train and 3,925 val real ImageNet JPEGs, 224x224)
  converted once into TFRecord shards by `train.convert_images`;
  `reencoded`: the same photos re-encoded at another size (bicubic upscale,
  JPEG quality 90), where decoding weighs as it does on ImageNet's files.
- The reference: the tensorflow/tpu ResNet input pipeline as its source
  describes it, written here from that description: records read by a
  parallel interleave, a 1,024-example shuffle, parse of the JPEG and label;
  for training an Inception crop (`sample_distorted_bounding_box` on the
  whole image, area 0.08-1, aspect 3/4-4/3, 10 attempts; after 10 failures
  the evaluation crop) decoded with `decode_and_crop_jpeg`, a bicubic resize
  and a random flip; for evaluation a center crop of image_size /
  (image_size + 32) of the shorter side, decoded alone and resized bicubic;
  batches of float32 in 0-255 (it normalizes on the accelerator).
- `images_per_second`: wall and CPU-second rates of a dataset.
"""

import os
import time

import tensorflow as tf

from benchmarks import harness
from train import convert_images, data, shared_data_dir, sources

REFERENCE_CROP_PADDING = 32  # Evaluation crop: image_size / (image_size + 32).


def converted_imagenette(cache_dir: str) -> str:
    """The shard folder, converting Imagenette's photos on first use."""
    if os.path.exists(os.path.join(cache_dir, sources.INFO_FILENAME)):
        return cache_dir
    source = os.path.join(shared_data_dir(), "imagenette2-224", "train")
    if not os.path.isdir(source):
        harness.fail(f"Imagenette not found at {source}; set LARS_TF_DATA_DIR")
    print(f"converting {source} -> {cache_dir} (once)", flush=True)
    convert_images.convert(
        cache_dir,
        train_dir=source,
        validation_dir=source.replace("train", "val"),
        train_shards=16,
        validation_shards=8,
    )
    return cache_dir


def _reencode_file(path: str, out_path: str, width: int, height: int) -> None:
    features = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/class/synset": tf.io.FixedLenFeature([], tf.string),
        "image/filename": tf.io.FixedLenFeature([], tf.string),
    }
    with tf.io.TFRecordWriter(out_path) as writer:
        for record in tf.data.TFRecordDataset(path):
            example = tf.io.parse_single_example(record, features)
            image = tf.io.decode_jpeg(example["image/encoded"], channels=3)
            image = tf.image.resize(image, (height, width), "bicubic")
            image = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
            jpeg = tf.io.encode_jpeg(image, quality=90).numpy()
            example = convert_images.make_example(
                jpeg,
                int(example["image/class/label"]),
                example["image/class/synset"].numpy().decode(),
                example["image/filename"].numpy().decode(),
                height,
                width,
            )
            writer.write(example.SerializeToString())


def reencoded(data_dir: str, width: int, height: int) -> str:
    """The shards with every photo upscaled to width x height (written once
    to `<data_dir>_<width>x<height>`)."""
    out_dir = f"{data_dir.rstrip('/')}_{width}x{height}"
    if os.path.exists(os.path.join(out_dir, sources.INFO_FILENAME)):
        return out_dir
    print(f"re-encoding {data_dir} at {width}x{height} -> {out_dir} (once)")
    os.makedirs(out_dir, exist_ok=True)
    for split in ("train", "validation"):
        for path in data.list_record_files(data_dir, split):
            out_path = os.path.join(out_dir, os.path.basename(path))
            _reencode_file(path, out_path, width, height)
    with open(os.path.join(data_dir, sources.INFO_FILENAME)) as source:
        info = source.read()
    with open(os.path.join(out_dir, sources.INFO_FILENAME), "w") as target:
        target.write(info)
    return out_dir


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
    data_dir: str,
    training: bool,
    batch_size: int,
    image_size: int,
    crop=reference_random_crop,
) -> tf.data.Dataset:
    """The reference input pipeline (module docstring), repeated; `crop`
    replaces its training crop-decode-resize (its flip stays)."""
    files = data.list_record_files(data_dir, "train" if training else "validation")
    features = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string, ""),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64, -1),
    }

    def parse_and_preprocess(record):
        parsed = tf.io.parse_single_example(record, features)
        jpeg = parsed["image/encoded"]
        if training:
            image = tf.image.random_flip_left_right(crop(jpeg, image_size))
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
    over num_images after a warm-up of three batches."""
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    seen, wall, cpu = 0, time.perf_counter(), time.process_time()
    while seen < num_images:
        batch = next(iterator)
        # Pipelines give (images, labels); the image-only variants give images,
        # which unpacking would split along the batch axis.
        images = batch[0] if isinstance(batch, tuple) else batch
        seen += int(images.shape[0])
    return (
        seen / (time.perf_counter() - wall),
        seen / (time.process_time() - cpu),
    )
