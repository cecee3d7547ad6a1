"""What does each step of the per-image preprocessing cost in CPU time?

    python -m benchmarks.preprocessing_ops [--data_dir=/tmp/lars_tf_imagenette]
        [--records=512] [--images=2000] [--rounds=3] [--image_size=224]

Reads `--records` serialized records of the train shards of `--data_dir`
(as `benchmarks.input_pipeline` converts them; its re-encoded folders work
too) into memory, then times, in interleaved rounds, a parallel map of each
variant's per-image function over them, batched as the pipelines batch
(`max_intra_op_parallelism` 1), in images per CPU-second of this process.
Every variant starts from the serialized record and a per-image seed (so
windows and flips vary as in training), so the difference of two rows is the
cost of the steps in which they differ:

- `parse` / `parse_boxes`: the record parsed without / with the four
  bounding-box features (densified);
- `decode`: + the `minimal` crop window and `decode_and_crop_jpeg`;
- `flip_tf` / `flip`: + `tf.image.stateless_random_flip_left_right` /
  `train.preprocessing.random_flip_left_right` (same draws) on the crop;
- `resize` / `resize_uint8_input`: `decode` + the bilinear resize of the
  crop cast to float32 (`train.preprocessing.resize`) / of the uint8 crop;
- `round_saturate` / `round_cast`: `resize` + rounding to uint8 with
  `tf.saturate_cast` (clip, cast) / a plain cast;
- `reference_image`: the reference pipeline's per-image work
  (`benchmarks/imagenette.py`: Inception window, decode of it, bicubic
  resize, flip of the float result).
"""

import time

import tensorflow as tf
from absl import flags

from benchmarks import harness, imagenette
from train import UserError, data, preprocessing

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "data_dir", "/tmp/lars_tf_imagenette", "Converted shards (input_pipeline)."
)
flags.DEFINE_integer(
    "records", 512, "Records held in memory and cycled.", lower_bound=1
)
flags.DEFINE_integer("images", 2000, "Images timed per measurement.", lower_bound=1)
flags.DEFINE_integer("image_size", 224, "Output image size.", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
harness.set_defaults(rounds=3)


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
        imagenette.reference_random_crop(
            data.parse_image_record(r, with_boxes=False)[0], FLAGS.image_size
        )
    ),
}


def images_per_cpu_second(records: tf.Tensor, function) -> float:
    """Images per CPU-second of `function` mapped over `records`, batched."""
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


def main() -> None:
    try:
        files = data.list_record_files(FLAGS.data_dir, "train")
    except UserError as error:
        harness.fail(str(error))
    records = tf.data.TFRecordDataset(files).take(FLAGS.records)
    records = tf.constant([record.numpy() for record in records])
    print(harness.machine_line(), flush=True)
    print(f"{len(records)} records of {FLAGS.data_dir}")
    rates = harness.interleave(
        {
            name: (lambda function=function: images_per_cpu_second(records, function))
            for name, function in VARIANTS.items()
        },
        FLAGS.rounds,
    )
    figures = {}
    for name, values in rates.items():
        figures[name] = {"img_per_cpu_s": harness.summary(values)}
        figures[name]["cpu_ms_per_image"] = (
            1000 / figures[name]["img_per_cpu_s"]["median"]
        )
    rows = [
        [name, harness.show(f["img_per_cpu_s"], ".0f"), f"{f['cpu_ms_per_image']:.3f}"]
        for name, f in figures.items()
    ]
    print(
        harness.markdown_table(["variant", "img per CPU-s", "CPU ms per image"], rows)
    )
    harness.write_results("preprocessing_ops", figures)


if __name__ == "__main__":
    harness.run(main)
