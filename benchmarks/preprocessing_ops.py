"""CPU cost of single steps of the per-image preprocessing, side by side.

    python benchmarks/preprocessing_ops.py [--data_dir=/tmp/lars_tf_imagenette]
        [--records=512] [--images=2000] [--rounds=3] [--image_size=224]

Reads ``--records`` serialized records of the train shards that
``benchmarks/input_pipeline.py`` writes (``--data_dir``; its ``--jpeg_size``
folders work too) into memory, then times, in rounds, a parallel map of each
variant's per-image function over them, batched as the pipelines batch
(``max_intra_op_parallelism`` 1), in images per CPU-second of this process.
Every variant starts from the serialized record and a per-image seed (so
windows and flips vary as in training), so the differences between rows are
the cost of the steps that differ:

- ``parse`` / ``parse_boxes``: the record parsed without / with the four
  bounding-box features (densified), as `train.data` did for every augmentation;
- ``decode``: + the ``minimal`` crop window and ``decode_and_crop_jpeg``;
- ``flip_tf`` / ``flip``: + ``tf.image.stateless_random_flip_left_right`` /
  `train.preprocessing.random_flip_left_right` (same draws) on the crop;
- ``resize`` / ``resize_uint8_input``: ``decode`` + the bilinear resize of the
  crop cast to float32 (`train.preprocessing.resize`) / of the uint8 crop;
- ``round_saturate`` / ``round_cast``: ``resize`` + rounding to uint8 with
  ``tf.saturate_cast`` (clip, cast) / a plain cast;
- ``reference_image``: the reference pipeline's per-image work
  (``benchmarks/input_pipeline.py``: Inception window, decode of it, bicubic
  resize, flip of the float result), from the record.

Each row: median (min-max) over rounds of images per CPU-second and the
per-image CPU milliseconds; the cost of a step is the difference of two rows.
"""

import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import input_pipeline  # noqa: E402
import tensorflow as tf  # noqa: E402

from train import UserError, data, preprocessing  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "data_dir", "/tmp/lars_tf_imagenette", "Converted shards (input_pipeline.py)."
)
flags.DEFINE_integer("records", 512, "Records held in memory and cycled.")
# --images, --rounds, --image_size and --batch_size are input_pipeline.py's.


def _decode(record, seed):
    jpeg, _, _ = data.parse_image_record(record, with_boxes=False)
    window = preprocessing.minimal_crop_window(
        preprocessing.image_shape(jpeg, is_encoded=True), seed
    )
    return preprocessing.crop(jpeg, window, is_encoded=True, channels=3)


def _resized(record, seed):
    return preprocessing.resize(_decode(record, seed), FLAGS.image_size)


def _parsed_size(record, with_boxes):
    jpeg, _, boxes = data.parse_image_record(record, with_boxes)
    return tf.strings.length(jpeg) + tf.size(boxes)


# Each function gets the serialized record and a per-image [2] seed.
VARIANTS = {
    "parse": lambda r, seed: _parsed_size(r, with_boxes=False),
    "parse_boxes": lambda r, seed: _parsed_size(r, with_boxes=True),
    "decode": _decode,
    "flip_tf": lambda r, seed: tf.image.stateless_random_flip_left_right(
        _decode(r, seed), seed
    ),
    "flip": lambda r, seed: preprocessing.random_flip_left_right(
        _decode(r, seed), seed
    ),
    "resize": _resized,
    "resize_uint8_input": lambda r, seed: tf.image.resize(
        _decode(r, seed), [FLAGS.image_size] * 2, "bilinear"
    ),
    "round_saturate": lambda r, seed: tf.saturate_cast(
        tf.round(_resized(r, seed)), tf.uint8
    ),
    "round_cast": lambda r, seed: tf.cast(tf.round(_resized(r, seed)), tf.uint8),
    "reference_image": lambda r, seed: tf.image.random_flip_left_right(
        input_pipeline.reference_random_crop(
            data.parse_image_record(r, with_boxes=False)[0], FLAGS.image_size
        )
    ),
}


def images_per_cpu_second(records: tf.Tensor, function) -> float:
    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = 1
    dataset = (
        tf.data.Dataset.from_tensor_slices(records)
        .repeat()
        .enumerate()
        .map(
            lambda index, record: function(record, tf.stack([index, 0])),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=False,
        )
        .batch(FLAGS.batch_size)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    seen, cpu = 0, time.process_time()
    while seen < FLAGS.images:
        seen += int(next(iterator).shape[0])
    return seen / (time.process_time() - cpu)


def main(argv):
    del argv
    try:
        files = data.list_record_files(FLAGS.data_dir, "train")
    except UserError as error:  # A bad --data_dir: one line, exit 2.
        print(error, file=sys.stderr)
        sys.exit(2)
    records = [
        record.numpy() for record in tf.data.TFRecordDataset(files).take(FLAGS.records)
    ]
    records = tf.constant(records)
    print(f"{len(records)} records of {FLAGS.data_dir}, TF {tf.__version__}")
    rates = {name: [] for name in VARIANTS}
    for round_index in range(FLAGS.rounds):
        for name, function in VARIANTS.items():
            rate = images_per_cpu_second(records, function)
            rates[name].append(rate)
            print(f"round {round_index}: {name:20s} {rate:8.1f} img per CPU-s")
    print("\n| variant | img per CPU-s, median (min-max) | CPU ms per image |")
    print("|---|---|---|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(
            f"| {name} | {median:.0f} ({min(values):.0f}-{max(values):.0f}) | "
            f"{1000 / median:.3f} |"
        )


if __name__ == "__main__":
    app.run(main)
