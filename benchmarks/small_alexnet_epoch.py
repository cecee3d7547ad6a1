"""How long does one MNIST-sized epoch take for `small_alexnet_bn` against
`small_alexnet`, i.e. what does batch normalization cost?

    python -m benchmarks.small_alexnet_epoch [--rounds=3]

Each model (10 classes, 28x28x1) trains with `model.fit` (Keras's default
`jit_compile`), SGD with momentum 0.9, sparse cross-entropy on logits, batch
4096, over 60,000 random images of MNIST's shape (the time does not depend on
pixel values; 15 steps, the last one partial). After one warm-up fit
(tracing), the two models alternate, one epoch each per round. Figures: wall
and process CPU seconds per epoch, and the per-round wall ratio BN / no BN.
"""

import os

import numpy as np
from absl import flags

from benchmarks import harness

BATCH_SIZE = 4096
NAMES = ("small_alexnet_bn", "small_alexnet")
harness.set_defaults(rounds=3)


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from train import models

    print(harness.machine_line(), flush=True)
    rng = np.random.default_rng(0)
    images = rng.random((60_000, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, 60_000)
    compiled = {}
    for name in NAMES:
        model = models.build_model(name, 10, 28, channels=1)
        model.compile(
            keras.optimizers.SGD(0.1, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(images[:8192], labels[:8192], batch_size=BATCH_SIZE, verbose=0)
        compiled[name] = model
    runs = harness.interleave(
        {
            name: lambda model=model: harness.timed(
                model.fit, images, labels, batch_size=BATCH_SIZE, verbose=0
            )
            for name, model in compiled.items()
        },
        flags.FLAGS.rounds,
    )
    wall = {name: [w for w, _ in r] for name, r in runs.items()}
    figures = {
        name: {
            "params": compiled[name].count_params(),
            "wall_s_per_epoch": harness.summary(wall[name]),
            "cpu_s_per_epoch": harness.summary([c for _, c in runs[name]]),
        }
        for name in NAMES
    }
    figures["wall_bn_x_no_bn"] = harness.ratio(wall[NAMES[0]], wall[NAMES[1]])
    rows = [
        [name, f"{figures[name]['params']:,}"]
        + [harness.show(figures[name]["wall_s_per_epoch"], ".1f")]
        + [harness.show(figures[name]["cpu_s_per_epoch"], ".1f")]
        for name in NAMES
    ]
    print(harness.markdown_table(["model", "params", "wall s", "CPU s"], rows))
    print(f"wall ratio BN / no BN: {harness.show(figures['wall_bn_x_no_bn'], '.2f')}")
    harness.write_results("small_alexnet_epoch", figures)


if __name__ == "__main__":
    harness.run(main)
