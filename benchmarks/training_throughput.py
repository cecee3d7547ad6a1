"""Training images/sec in `model.fit` with LARS against SGD-momentum.

For each model, four copies with the same initial weights train on the same
fixed batch of random images (the step's cost does not depend on pixel
values): `lars_tf.LARS` (momentum 0.9, weight decay 5e-4 and
`exclude_bias_and_norm`, as in training) and Keras `SGD(momentum=0.9)`, each
compiled with `jit_compile=False` and with `jit_compile=True` (the whole train
step XLA-compiled, as Keras's "auto" does on a GPU or TPU). Each call runs
`fit(..., steps_per_epoch=steps)`. The copies alternate in rounds so that load
from other processes hits all alike; the table gives images/sec (median over
rounds) and the median per-round throughput ratio LARS / SGD, with its
25th-75th percentiles, from wall time and from this process's CPU time (which
other processes' load disturbs less), for each `jit_compile` and for each
optimizer at its faster setting.

Models (`--models`): `resnet20` (CIFAR-10 shape, 32x32x3) and
`small_alexnet_bn` (MNIST shape, 28x28x1) at `--batch_size`; optionally a short
`resnet50` (224x224x3, 1000 classes) at `--resnet50_batch_size`.

Then, unless `--pipeline_images=0`, the input pipeline
(`train.data.make_input_fn`, training split, minimal augmentation) against what
the step consumes: MNIST for `small_alexnet_bn`, Imagenette records (converted
once by `benchmarks/input_pipeline.py`'s `converted_imagenette`) for
`resnet50`, timed alone on all cores right after the model's steps; the
smaller rate bounds training (when both run, they share the cores). The
pipeline feeding the step as in training, against the step on cached batches:
`benchmarks/end_to_end_throughput.py`.

Run (`--rounds=4 --steps=2 --pipeline_images=0` took 20 minutes at load
average 13-37 on a 2-core CPU, mostly XLA compilation):

    python benchmarks/training_throughput.py
"""

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import lars_tf  # noqa: E402
from benchmarks.input_pipeline import (  # noqa: E402
    converted_imagenette,
    images_per_second,
)
from benchmarks.optimizer_step import interleave, ratio_summary  # noqa: E402
from train import data, models, shared_data_dir  # noqa: E402

# name: (num_classes, image_size, channels, input source or None)
JIT_MODES = (False, True)  # model.compile(jit_compile=...)
MODELS = {
    "resnet20": (10, 32, 3, None),
    "small_alexnet_bn": (10, 28, 1, "mnist"),
    "resnet50": (1000, 224, 3, "imagenet"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20,small_alexnet_bn")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--resnet50_batch_size", type=int, default=8)
    parser.add_argument("--resnet50_rounds", type=int, default=3)
    parser.add_argument("--resnet50_steps", type=int, default=1)
    parser.add_argument(
        "--pipeline_images", type=int, default=1000, help="images per pipeline rate"
    )
    parser.add_argument(
        "--cache_dir",
        default="/tmp/lars_tf_imagenette",
        help="Imagenette records, as benchmarks/input_pipeline.py converts them",
    )
    return parser.parse_args(argv)


def optimizers() -> dict:
    """The two optimizers compared, built fresh."""
    return {
        "LARS": lambda: lars_tf.LARS(
            learning_rate=0.1,
            momentum=0.9,
            weight_decay=5e-4,
            exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
            exclude_from_weight_decay=lars_tf.exclude_bias_and_norm,
        ),
        "SGD-momentum": lambda: keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
    }


def make_train_steps(model_name: str, batch_size: int) -> dict:
    """One callable per (optimizer, jit_compile) running `steps` steps of `fit`.

    Each is its own copy of the model with the same initial weights, compiled
    with that `jit_compile` (what a user sets in `model.compile`), training on
    one fixed batch repeated; `fit(..., steps_per_epoch=steps)` per call.
    """
    num_classes, image_size, channels, _ = MODELS[model_name]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, image_size, image_size, channels), "f4")
    labels = rng.integers(0, num_classes, batch_size)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    initial_weights = None
    runs = {}
    for jit_compile in JIT_MODES:
        for name, build_optimizer in optimizers().items():
            model = models.build_model(model_name, num_classes, image_size, channels)
            if initial_weights is None:
                initial_weights = model.get_weights()
            model.set_weights(initial_weights)
            model.compile(
                optimizer=build_optimizer(),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=jit_compile,
            )
            model.fit(dataset, steps_per_epoch=1, shuffle=False, verbose=0)  # compiles

            def run(steps, model=model):
                model.fit(dataset, steps_per_epoch=steps, shuffle=False, verbose=0)

            runs[(name, jit_compile)] = run
    return runs


def pipeline_rate(source: str, args: argparse.Namespace, batch_size: int) -> float:
    """Images/sec of the training input pipeline of `source`."""
    num_classes, image_size, channels, _ = next(
        m for m in MODELS.values() if m[3] == source
    )
    if source == "mnist":
        data_dir = os.path.join(shared_data_dir(), "mnist")
    else:
        data_dir = converted_imagenette(args.cache_dir)
    input_fn = data.make_input_fn(
        source=source,
        split="train",
        data_dir=data_dir,
        global_batch_size=batch_size,
        image_size=image_size,
        augmentation="minimal",
        seed=0,
        shuffle_buffer_size=1000,
    )
    wall_rate, _ = images_per_second(input_fn().repeat(), args.pipeline_images)
    return wall_rate


def machine_line() -> str:
    """When and where a run is made: date, CPUs, versions, load average."""
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} "
        f"CPUs, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(machine_line(), flush=True)
    print(
        "\nThroughput ratio LARS / SGD-momentum (images/s), median over rounds "
        "[25th-75th percentile]; 'best' rows: each optimizer at its faster "
        "jit_compile (by median)"
    )
    print(
        f"{'model':<17} {'batch':>5} {'jit_compile':>11} {'LARS img/s':>10} "
        f"{'SGD img/s':>10} {'LARS/SGD wall':>21} {'LARS/SGD CPU':>21}"
    )
    for model_name in args.models.split(","):
        is_resnet50 = model_name == "resnet50"
        batch_size = args.resnet50_batch_size if is_resnet50 else args.batch_size
        rounds = args.resnet50_rounds if is_resnet50 else args.rounds
        steps = args.resnet50_steps if is_resnet50 else args.steps
        runs = make_train_steps(model_name, batch_size)
        wall, cpu = interleave(runs, rounds, steps)
        rows = [(str(jit), ("LARS", jit), ("SGD-momentum", jit)) for jit in JIT_MODES]
        best = {
            times_name: {
                name: min(
                    ((name, jit) for jit in JIT_MODES),
                    key=lambda key, t=times: np.median(t[key]),
                )
                for name in optimizers()
            }
            for times_name, times in (("wall", wall), ("cpu", cpu))
        }
        rows.append(("best", best["wall"]["LARS"], best["wall"]["SGD-momentum"]))
        for label, lars_key, sgd_key in rows:
            # Images per second: the inverse of the time ratio.
            cpu_lars, cpu_sgd = lars_key, sgd_key
            if label == "best":
                cpu_lars, cpu_sgd = best["cpu"]["LARS"], best["cpu"]["SGD-momentum"]
                label = f"best ({lars_key[1]}/{sgd_key[1]})"
            print(
                f"{model_name:<17} {batch_size:>5} {label:>11} "
                f"{batch_size / np.median(wall[lars_key]):>10.1f} "
                f"{batch_size / np.median(wall[sgd_key]):>10.1f} "
                f"{ratio_summary(wall[sgd_key], wall[lars_key])} "
                f"{ratio_summary(cpu[cpu_sgd], cpu[cpu_lars])}",
                flush=True,
            )
        source = MODELS[model_name][3]
        if source is not None and args.pipeline_images:
            rate = pipeline_rate(source, args, batch_size)
            lars = batch_size / np.median(wall[best["wall"]["LARS"]])
            print(f"  input pipeline alone: {rate:.0f} img/s ({rate / lars:.1f}x LARS)")
    print(
        f"({args.rounds} rounds x {args.steps} steps; resnet50 {args.resnet50_rounds}"
        f" rounds x {args.resnet50_steps} steps; load average "
        f"{os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
