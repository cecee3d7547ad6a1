"""Time to a resumed run's first training batch: skipping undecoded examples
(``InputFn(..., skip_batches=N)``, what ``train.trainer`` does) against
``Dataset.skip(N)`` on the finished batches (what it did before, decoding every
skipped image).

    python benchmarks/resume_skip.py [--skip_batches=100] [--rounds=2]

Uses the Imagenette shards that ``benchmarks/input_pipeline.py`` converts (and
converts them on first use); training split, ``minimal`` augmentation, batch 64,
224x224, deterministic. Prints wall and CPU seconds (this process, all threads)
from building the dataset to the first batch, per round, both ways in turn.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import input_pipeline  # noqa: E402  (its flags: --cache_dir, --batch_size, ...)

from train import data  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("skip_batches", 100, "Batches a resumed run skips.")


def main(argv):
    del argv
    data_dir = input_pipeline.converted_imagenette(FLAGS.cache_dir)
    input_fn = data.make_input_fn(
        source="imagenet",
        split="train",
        data_dir=data_dir,
        global_batch_size=FLAGS.batch_size,
        image_size=FLAGS.image_size,
        augmentation="minimal",
        seed=0,
        deterministic=True,
    )
    ways = {
        "skip_batches (undecoded examples)": lambda: input_fn(
            skip_batches=FLAGS.skip_batches
        ),
        "Dataset.skip (decoded batches)": lambda: input_fn().skip(FLAGS.skip_batches),
    }
    print(
        f"first batch after {FLAGS.skip_batches} skipped batches of "
        f"{FLAGS.batch_size} ({FLAGS.skip_batches * FLAGS.batch_size} images)"
    )
    for round_index in range(FLAGS.rounds):
        for name, make in ways.items():
            wall, cpu = time.perf_counter(), time.process_time()
            next(iter(make()))
            print(
                f"round {round_index}: {name:34s} "
                f"{time.perf_counter() - wall:6.2f} s wall "
                f"{time.process_time() - cpu:6.2f} s CPU",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
