"""How many images per second does `model.fit` train at with LARS, against
SGD-momentum, with each `jit_compile` setting?

    python -m benchmarks.training_throughput [--models=resnet20,small_alexnet_bn]
        [--batch_size=256] [--rounds=7] [--steps=3]

For each model, four copies with the same initial weights train on the same
fixed batch of random images (the step's cost does not depend on pixel
values): `lars_tf.LARS` (momentum 0.9, weight decay 5e-4 and
`exclude_bias_and_norm`, as in training) and Keras `SGD(momentum=0.9)`, each
compiled with `jit_compile=False` and with `jit_compile=True` (the whole train
step XLA-compiled, as Keras's "auto" does on a GPU or TPU). Each call runs
`fit(..., steps_per_epoch=--steps)`; the copies alternate in rounds. Figures:
the per-round throughput ratio LARS / SGD in wall and CPU time, per
`jit_compile`, and for each optimizer at its faster setting ("best").

Models: `resnet20` (CIFAR-10 shape, 32x32x3), `small_alexnet_bn` (MNIST
shape, 28x28x1). Whether the input pipeline keeps up with the step:
`benchmarks.end_to_end_throughput`.
"""

import os

import numpy as np
from absl import flags

from benchmarks import harness

JIT_MODES = (False, True)  # model.compile(jit_compile=...)
MODELS = {"resnet20": (10, 32, 3), "small_alexnet_bn": (10, 28, 1)}

FLAGS = flags.FLAGS
harness.define_subset("models", MODELS, "Models to time")
flags.DEFINE_integer("batch_size", 256, "Images per step.", lower_bound=1)
flags.DEFINE_integer("steps", 3, "Steps per copy per round.", lower_bound=1)
harness.set_defaults(rounds=7)


def optimizers() -> dict:
    """The two optimizers compared, built fresh."""
    import keras

    import lars_tf

    return {
        "LARS": lambda: lars_tf.LARS(**harness.lars_settings(weight_decay=5e-4)),
        "SGD-momentum": lambda: keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
    }


def make_train_steps(model_name: str) -> dict:
    """One callable per (optimizer, jit_compile) running `steps` steps of `fit`
    on its own copy of the model (same initial weights, one fixed batch)."""
    import keras
    import tensorflow as tf

    from train import models

    num_classes, image_size, channels = MODELS[model_name]
    rng = np.random.default_rng(0)
    shape = (FLAGS.batch_size, image_size, image_size, channels)
    images = rng.standard_normal(shape, "f4")
    labels = rng.integers(0, num_classes, FLAGS.batch_size)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    initial_weights = None
    runs = {}
    for jit_compile in JIT_MODES:
        for name, build_optimizer in optimizers().items():
            model = models.build_model(model_name, num_classes, image_size, channels)
            initial_weights = initial_weights or model.get_weights()
            model.set_weights(initial_weights)
            model.compile(
                optimizer=build_optimizer(),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=jit_compile,
            )
            model.fit(dataset, steps_per_epoch=1, shuffle=False, verbose=0)  # compiles

            def run(steps, model=model):
                model.fit(dataset, steps_per_epoch=steps, shuffle=False, verbose=0)

            runs[f"{name} jit_compile={jit_compile}"] = run
    return runs


def model_figures(wall: dict, cpu: dict) -> dict:
    """LARS / SGD throughput ratios per jit_compile and best against best."""
    figures = {}
    for jit in JIT_MODES:
        lars, sgd = f"LARS jit_compile={jit}", f"SGD-momentum jit_compile={jit}"
        figures[f"jit_compile={jit}"] = {
            "lars_img_per_s_wall": FLAGS.batch_size / np.median(wall[lars]),
            "sgd_img_per_s_wall": FLAGS.batch_size / np.median(wall[sgd]),
            "wall": harness.ratio(wall[sgd], wall[lars]),  # time ratio inverted
            "cpu": harness.ratio(cpu[sgd], cpu[lars]),
        }
    best = {}
    for clock, times in (("wall", wall), ("cpu", cpu)):
        lars, sgd = (
            min(
                (f"{name} jit_compile={jit}" for jit in JIT_MODES),
                key=lambda key: np.median(times[key]),
            )
            for name in ("LARS", "SGD-momentum")
        )
        best[clock] = harness.ratio(times[sgd], times[lars])
        best[f"{clock}_modes"] = f"{lars} / {sgd}"
    figures["best"] = best
    return figures


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(harness.machine_line(), flush=True)
    figures = {}
    for model_name in FLAGS.models:
        runs = make_train_steps(model_name)
        wall, cpu = harness.step_times(runs, FLAGS.rounds, FLAGS.steps)
        figures[model_name] = model_figures(wall, cpu)
    print("\nThroughput ratio LARS / SGD-momentum, median [25th-75th percentile]")
    rows = [
        [model_name, setting, harness.show(f["cpu"]), harness.show(f["wall"])]
        for model_name, by_setting in figures.items()
        for setting, f in by_setting.items()
    ]
    header = ["model", "setting", "LARS / SGD, CPU time", "LARS / SGD, wall"]
    print(harness.markdown_table(header, rows))
    harness.write_results("training_throughput", figures)


if __name__ == "__main__":
    harness.run(main)
