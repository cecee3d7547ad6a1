"""Cost of `TrustRatioMonitor` in `model.fit`: off, every 10 steps, every step.

A small CNN (`train.models.build_model("small_alexnet_bn", 10, 32)`) trains
with LARS on random 32x32 images, batch 128, as three models with the same
seed: without the monitor, with it every 10 steps and with it every step (its
probe batch is one training batch). After a warm-up fit (tracing the train step
and the monitor's function), rounds of `model.fit(steps_per_epoch=STEPS)` run
interleaved (off, 10, 1, off, 10, 1, ... each round starting at a different
one) so load from other processes hits all alike. Printed: median steps/s of
each and its median per-round ratio to "off", with the 25th-75th percentile,
both in wall time and in this process's CPU time (`time.process_time`, all
threads), which other processes' load on a shared machine disturbs far less.
Then, in the same rounds, one measurement (`monitor.measure()`) against one
training step (`model.train_on_batch`) on the same batch: the monitor's cost
every N steps is about that ratio divided by N.

Run (about a minute on a 2-core CPU):

    python benchmarks/trust_ratio_monitor_overhead.py
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from lars_tf import LARS, TrustRatioMonitor  # noqa: E402
from train.models import build_model  # noqa: E402

BATCH = 128
IMAGE_SIZE = 32
NUM_CLASSES = 10


def make_model():
    keras.utils.set_random_seed(0)
    model = build_model("small_alexnet_bn", NUM_CLASSES, IMAGE_SIZE)
    model.compile(
        optimizer=LARS(1.0, weight_decay=5e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="Steps per round.")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = rng.normal(size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(BATCH,)).astype(np.int32)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()

    candidates = {}
    for name, every in (("off", None), ("every 10", 10), ("every 1", 1)):
        callbacks = (
            [] if every is None else [TrustRatioMonitor((images, labels), every)]
        )
        model = make_model()
        model.fit(dataset, steps_per_epoch=10, epochs=1, verbose=0, callbacks=callbacks)
        candidates[name] = (model, callbacks)

    names = list(candidates)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    probe_model, (probe_monitor,) = candidates["every 1"]
    measure_per_step = {"wall": [], "cpu": []}
    for round_index in range(args.rounds):
        step_time = _timed(lambda: probe_model.train_on_batch(images, labels))
        measure_time = _timed(probe_monitor.measure)
        for clock, step_seconds, measure_seconds in zip(
            ("wall", "cpu"), step_time, measure_time, strict=True
        ):
            measure_per_step[clock].append(measure_seconds / step_seconds)
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            model, callbacks = candidates[name]
            seconds = _timed(
                lambda model=model, callbacks=callbacks: model.fit(
                    dataset,
                    steps_per_epoch=args.steps,
                    epochs=1,
                    verbose=0,
                    callbacks=callbacks,
                ),
                repeats=1,
            )
            wall[name].append(seconds[0])
            cpu[name].append(seconds[1])

    print(
        f"small_alexnet_bn, batch {BATCH}, {IMAGE_SIZE}x{IMAGE_SIZE}, LARS; "
        f"{args.rounds} rounds of {args.steps} steps"
    )
    print(
        f"{'monitor':<10} {'steps/s':>8} {'wall ratio':>11} {'p25-p75':>13} "
        f"{'CPU ratio':>10} {'p25-p75':>13}"
    )
    for name in names:
        cells = [f"{name:<10}", f"{np.median(args.steps / np.array(wall[name])):>8.2f}"]
        for times in (wall, cpu):
            # Throughput relative to "off", per round.
            ratios = np.array(times["off"]) / np.array(times[name])
            p25, p75 = np.percentile(ratios, [25, 75])
            cells.append(f"{np.median(ratios):>10.3f} {p25:>6.3f}-{p75:.3f}")
        print(" ".join(cells))
    for clock, ratios in measure_per_step.items():
        p25, p75 = np.percentile(ratios, [25, 75])
        print(
            f"one measurement / one train step ({clock}): "
            f"{np.median(ratios):.3f} (p25-p75 {p25:.3f}-{p75:.3f})"
        )


def _timed(function, repeats: int = 5) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `repeats` calls of `function`."""
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        function()
    return time.perf_counter() - wall_start, time.process_time() - cpu_start


if __name__ == "__main__":
    main()
