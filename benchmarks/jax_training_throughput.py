"""ResNet-50 `model.fit` images/sec on the JAX backend, LARS against SGD-momentum.

Two copies of `keras.applications.ResNet50(weights=None)` (1000 classes, the
same initial weights) train with `model.fit` on the same in-memory batches of
random images (a step's cost does not depend on pixel values, and NumPy
arrays need no TensorFlow), one with `lars_tf.LARS` (momentum 0.9, weight
decay 5e-5 and `exclude_bias_and_norm`) and one with Keras `SGD(momentum=0.9)`.
Each `fit` call is one epoch of `--steps` steps; the first epoch of each
compiles and is not counted. The two alternate epoch by epoch, so load hits
both alike; the table gives images/sec (median over epochs) and the median
per-epoch ratio LARS / SGD with its 25th-75th percentiles.

Run on a GPU (`benchmarks/gpu_check.sh` does), or tiny on a CPU to check it:

    python benchmarks/jax_training_throughput.py --batch_size=256 --steps=20
    python benchmarks/jax_training_throughput.py --image_size=32 --batch_size=4 \
        --steps=2 --epochs=2
"""

import argparse
import os
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch")
    parser.add_argument(
        "--epochs", type=int, default=4, help="timed epochs per optimizer"
    )
    parser.add_argument(
        "--dtype_policy",
        default="mixed_bfloat16",
        help="Keras dtype policy: mixed_bfloat16 (GPU default) or float32",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import jax
    import keras

    import lars_tf

    keras.config.set_dtype_policy(args.dtype_policy)
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    images = rng.standard_normal(shape, dtype=np.float32)
    labels = rng.integers(0, 1000, args.batch_size).astype(np.int32)
    # One batch repeated: the data adapter slices it like a full dataset.
    images = np.concatenate([images] * args.steps)
    labels = np.concatenate([labels] * args.steps)

    optimizers = {
        "LARS": lambda: lars_tf.LARS(
            learning_rate=0.1,
            momentum=0.9,
            weight_decay=5e-5,
            exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
            exclude_from_weight_decay=lars_tf.exclude_bias_and_norm,
        ),
        "SGD-momentum": lambda: keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
    }
    models = {}
    for name, make_optimizer in optimizers.items():
        keras.utils.set_random_seed(0)
        model = keras.applications.ResNet50(
            weights=None,
            input_shape=shape[1:],
            classes=1000,
            classifier_activation=None,
        )
        model.compile(
            optimizer=make_optimizer(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        began = time.perf_counter()
        model.fit(images, labels, batch_size=args.batch_size, epochs=1, verbose=0)
        print(f"{name}: first epoch (compiles) {time.perf_counter() - began:.1f} s")
        models[name] = model

    rates = {name: [] for name in models}
    for _ in range(args.epochs):
        for name, model in models.items():
            began = time.perf_counter()
            history = model.fit(
                images, labels, batch_size=args.batch_size, epochs=1, verbose=0
            )
            # The loss comes back to the host: the epoch's steps are done.
            float(history.history["loss"][-1])
            seconds = time.perf_counter() - began
            rates[name].append(args.steps * args.batch_size / seconds)

    device = jax.devices()[0]
    print(
        f"\nResNet-50 model.fit on {device.platform} ({device.device_kind}), "
        f"batch {args.batch_size}, {args.image_size}x{args.image_size}, "
        f"{args.dtype_policy}, {args.epochs} epochs x {args.steps} steps each "
        f"(jax {jax.__version__}, keras {keras.__version__})"
    )
    for name, values in rates.items():
        print(f"{name:<14} {np.median(values):10.1f} images/sec")
    ratio = np.array(rates["LARS"]) / np.array(rates["SGD-momentum"])
    q25, q50, q75 = np.percentile(ratio, [25, 50, 75])
    print(f"LARS / SGD-momentum throughput: {q50:.3f} [{q25:.3f}-{q75:.3f}]")


if __name__ == "__main__":
    main()
