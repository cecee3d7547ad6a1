"""What does `TrustRatioMonitor` cost in `model.fit`: off, every 10 steps,
every step?

    python -m benchmarks.trust_ratio_monitor_overhead [--rounds=7] [--steps=20]

A small CNN (`train.models.build_model("small_alexnet_bn", 10, 32)`) trains
with LARS on random 32x32 images, batch 128, as three models with the same
seed: without the monitor, with it every 10 steps and with it every step (its
probe batch is one training batch). After a warm-up fit (tracing the train
step and the monitor's function), interleaved rounds run
`model.fit(steps_per_epoch=--steps)` on each. Figures: steps/s and the
per-round throughput ratio to "off", in wall and CPU time; and, in the same
rounds, one measurement (`monitor.measure()`) against one training step
(`train_on_batch`) on the same batch, five of each: the monitor's cost every
N steps is about that ratio divided by N.
"""

import os

import numpy as np
from absl import flags

from benchmarks import harness

BATCH = 128
IMAGE_SIZE = 32
NUM_CLASSES = 10
MONITORS = {"off": None, "every 10": 10, "every 1": 1}

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 20, "Steps per model per round.", lower_bound=1)
harness.set_defaults(rounds=7)


def fitted_models(images, labels, dataset) -> dict:
    """Name -> (model, callbacks), each fitted once (tracing)."""
    import keras

    from lars_tf import LARS, TrustRatioMonitor
    from train.models import build_model

    models = {}
    for name, every in MONITORS.items():
        callbacks = (
            [] if every is None else [TrustRatioMonitor((images, labels), every)]
        )
        keras.utils.set_random_seed(0)
        model = build_model("small_alexnet_bn", NUM_CLASSES, IMAGE_SIZE)
        model.compile(
            optimizer=LARS(1.0, weight_decay=5e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(dataset, steps_per_epoch=10, verbose=0, callbacks=callbacks)
        models[name] = (model, callbacks)
    return models


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    print(harness.machine_line(), flush=True)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(BATCH,)).astype(np.int32)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    models = fitted_models(images, labels, dataset)
    candidates = {
        name: lambda model=model, callbacks=callbacks: harness.timed(
            model.fit,
            dataset,
            steps_per_epoch=FLAGS.steps,
            verbose=0,
            callbacks=callbacks,
        )
        for name, (model, callbacks) in models.items()
    }
    probe_model, (probe_monitor,) = models["every 1"]
    candidates["one train step x5"] = lambda: harness.timed(
        lambda: [probe_model.train_on_batch(images, labels) for _ in range(5)]
    )
    candidates["one measurement x5"] = lambda: harness.timed(
        lambda: [probe_monitor.measure() for _ in range(5)]
    )
    runs = harness.interleave(candidates, FLAGS.rounds)
    figures = {}
    for clock, index in (("wall", 0), ("cpu", 1)):
        times = {name: np.array([r[index] for r in rs]) for name, rs in runs.items()}
        for name in MONITORS:
            figures.setdefault(name, {})[f"{clock}_x_off"] = harness.ratio(
                times["off"], times[name]
            )
        figures.setdefault("measurement / step", {})[clock] = harness.ratio(
            times["one measurement x5"], times["one train step x5"]
        )
    for name in MONITORS:
        wall = np.array([w for w, _ in runs[name]])
        figures[name]["steps_per_s_wall"] = harness.summary(FLAGS.steps / wall)
    rows = [
        [name, f"{f['steps_per_s_wall']['median']:.2f}", harness.show(f["wall_x_off"])]
        + [harness.show(f["cpu_x_off"])]
        for name, f in figures.items()
        if name in MONITORS
    ]
    print(
        harness.markdown_table(["monitor", "steps/s", "wall x off", "CPU x off"], rows)
    )
    for clock, value in figures["measurement / step"].items():
        print(f"one measurement / one train step ({clock}): {harness.show(value)}")
    harness.write_results("trust_ratio_monitor_overhead", figures)


if __name__ == "__main__":
    harness.run(main)
