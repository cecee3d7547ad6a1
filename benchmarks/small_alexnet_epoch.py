"""Time of one MNIST-sized epoch for `small_alexnet_bn` against `small_alexnet`.

Each model (10 classes, 28x28x1) trains with `model.fit` (Keras's default
`jit_compile="auto"`), SGD with momentum 0.9, sparse cross-entropy on logits,
batch 4096, over 60,000 random images of MNIST's shape (the time does not
depend on pixel values; 15 steps, the last one partial). After one warm-up fit
(tracing), the two models alternate for `ROUNDS` rounds of one epoch each, so
load from other processes hits both alike. Prints per model the median wall
time and process CPU time per epoch, and the median per-round ratio of BN to
no-BN wall time.

Run: python benchmarks/small_alexnet_epoch.py
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from train import models  # noqa: E402

ROUNDS = 3
BATCH_SIZE = 4096
NAMES = ("small_alexnet_bn", "small_alexnet")


def main() -> None:
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
    wall = {name: [] for name in NAMES}
    cpu = {name: [] for name in NAMES}
    for _ in range(ROUNDS):
        for name in NAMES:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            compiled[name].fit(images, labels, batch_size=BATCH_SIZE, verbose=0)
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    print(f"load average at end: {os.getloadavg()[0]:.1f}, {ROUNDS} rounds")
    for name in NAMES:
        print(
            f"{name:18s} params {compiled[name].count_params():>8,d}  "
            f"wall/epoch {statistics.median(wall[name]):6.1f} s  "
            f"cpu/epoch {statistics.median(cpu[name]):6.1f} s"
        )
    ratios = [bn / plain for bn, plain in zip(wall[NAMES[0]], wall[NAMES[1]])]
    print(
        f"wall ratio small_alexnet_bn / small_alexnet: {statistics.median(ratios):.2f}"
    )


if __name__ == "__main__":
    main()
