"""train.data under MirroredStrategy on 2 logical CPUs.

Run by tests/test_data.py in its own process (the logical devices must be set
before TensorFlow starts). Writes a few TFRecords (one corrupt), builds the
input function inside ``strategy.scope()`` as a training app would, and prints
one JSON line of what the distributed datasets delivered.
"""

import json
import os
import tempfile

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

from helpers import imagenet_example, smooth_image, write_records  # noqa: E402

from train import data  # noqa: E402

root = tempfile.mkdtemp()
rng = np.random.default_rng(0)
for split in ("train", "validation"):
    for k in range(2):
        records = [
            imagenet_example(tf.io.encode_jpeg(smooth_image(rng)).numpy(), k + 1)
        ] * 5
        if split == "validation" and k == 1:
            records[2] = imagenet_example(b"\xff\xd8\xff\xe0 not a JPEG", k + 1)
        write_records(os.path.join(root, f"{split}-{k:05d}-of-00002"), records)

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
report = {}
with strategy.scope():
    common = dict(source="imagenet", data_dir=root, image_size=16, num_classes=2)
    train_fn = data.make_input_fn(
        split="train", global_batch_size=8, augmentation="extended", seed=0, **common
    )
    eval_fn = data.make_input_fn(
        split="validation", global_batch_size=4, augmentation="none", **common
    )
    train = strategy.distribute_datasets_from_function(train_fn)
    evaluation = strategy.distribute_datasets_from_function(eval_fn)

images, labels = next(iter(train))
report["train_image_shapes"] = [
    list(t.shape) for t in strategy.experimental_local_results(images)
]
report["train_dtype"] = images.values[0].dtype.name
eval_labels = []
for _, labels in evaluation:
    for local in strategy.experimental_local_results(labels):
        eval_labels += local.numpy().tolist()
report["eval_labels"] = sorted(eval_labels)
report["eval_skipped"] = eval_fn.skipped_records()
print(json.dumps(report))
