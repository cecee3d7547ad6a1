"""How long does a resumed run take to reach its first training batch:
skipping undecoded examples (`InputFn(..., skip_batches=N)`, what
`train.trainer` does) against `Dataset.skip(N)` on the finished batches
(decoding every skipped image)?

    python -m benchmarks.resume_skip [--skip_batches=100] [--rounds=2]
        [--cache_dir=/tmp/lars_tf_imagenette]

On the Imagenette shards (`imagenette.converted_imagenette`): training split,
`minimal` augmentation, batch 64, 224x224, deterministic. Figures: wall and
CPU seconds (this process, all threads) from building the dataset to the
first batch, both ways in interleaved rounds.
"""

from absl import flags

from benchmarks import harness, imagenette
from train import data

FLAGS = flags.FLAGS
flags.DEFINE_integer("skip_batches", 100, "Batches a resumed run skips.", lower_bound=1)
flags.DEFINE_string(
    "cache_dir", "/tmp/lars_tf_imagenette", "Where the converted shards are kept."
)
harness.set_defaults(rounds=2)
BATCH_SIZE = 64


def main() -> None:
    data_dir = imagenette.converted_imagenette(FLAGS.cache_dir)
    input_fn = data.make_input_fn(
        source="imagenet",
        split="train",
        data_dir=data_dir,
        global_batch_size=BATCH_SIZE,
        image_size=224,
        augmentation="minimal",
        seed=0,
        deterministic=True,
    )
    skip = FLAGS.skip_batches
    ways = {
        "skip_batches (undecoded examples)": lambda: input_fn(skip_batches=skip),
        "Dataset.skip (decoded batches)": lambda: input_fn().skip(skip),
    }
    print(harness.machine_line(), flush=True)
    print(
        f"first batch after {skip} batches of {BATCH_SIZE} ({skip * BATCH_SIZE} images)"
    )
    runs = harness.interleave(
        {
            name: (lambda make=make: harness.timed(lambda: next(iter(make()))))
            for name, make in ways.items()
        },
        FLAGS.rounds,
    )
    figures = {
        name: {
            "wall_s": harness.summary([w for w, _ in r]),
            "cpu_s": harness.summary([c for _, c in r]),
        }
        for name, r in runs.items()
    }
    rows = [
        [name, harness.show(f["wall_s"], ".2f"), harness.show(f["cpu_s"], ".2f")]
        for name, f in figures.items()
    ]
    print(harness.markdown_table(["way", "wall s", "CPU s"], rows))
    harness.write_results("resume_skip", figures)


if __name__ == "__main__":
    harness.run(main)
