"""How many images per second does ResNet-50 train at in `model.fit` on the
JAX backend with LARS, against SGD-momentum?

    python -m benchmarks.jax_training_throughput [--batch_size=256] [--steps=20]
        [--rounds=4] [--image_size=224] [--dtype_policy=mixed_bfloat16]

Two copies of `keras.applications.ResNet50(weights=None)` (1000 classes, the
same initial weights) train with `model.fit` on the same in-memory batch of
random images, repeated (a step's cost does not depend on pixel values, and
NumPy arrays need no TensorFlow): one with `lars_tf.LARS` (momentum 0.9,
weight decay 5e-5, `exclude_bias_and_norm`), one with Keras
`SGD(momentum=0.9)`. Each `fit` call is one epoch of `--steps` steps; the
first epoch of each compiles and is not timed; then the two alternate for
`--rounds` epochs each. Made for a GPU (`benchmarks/gpu_check.sh`); on a CPU
only tiny sizes are practical (`--image_size=32 --batch_size=4 --steps=2`).
"""

import os

os.environ["KERAS_BACKEND"] = "jax"

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import harness  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 256, "Images per step.", lower_bound=1)
flags.DEFINE_integer("image_size", 224, "Image height and width.", lower_bound=32)
flags.DEFINE_integer("steps", 20, "Steps per epoch.", lower_bound=1)
flags.DEFINE_enum(
    "dtype_policy", "mixed_bfloat16", ["mixed_bfloat16", "float32"], "Keras policy."
)
harness.set_defaults(rounds=4)


def compiled_models(images, labels) -> dict:
    """The two ResNet-50s, compiled and run for one (untimed) epoch each."""
    import keras

    import lars_tf

    optimizers = {
        "LARS": lambda: lars_tf.LARS(**harness.lars_settings(weight_decay=5e-5)),
        "SGD-momentum": lambda: keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
    }
    models = {}
    for name, make_optimizer in optimizers.items():
        keras.utils.set_random_seed(0)
        model = keras.applications.ResNet50(
            weights=None,
            input_shape=images.shape[1:],
            classes=1000,
            classifier_activation=None,
        )
        model.compile(
            optimizer=make_optimizer(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        seconds, _ = harness.timed(
            model.fit, images, labels, batch_size=FLAGS.batch_size, verbose=0
        )
        print(f"{name}: first epoch (compiles) {seconds:.1f} s", flush=True)
        models[name] = model
    return models


def epoch_rate(model, images, labels) -> float:
    """Images per wall second of one `fit` epoch."""

    def epoch():
        history = model.fit(images, labels, batch_size=FLAGS.batch_size, verbose=0)
        float(history.history["loss"][-1])  # on the host: the steps are done

    seconds, _ = harness.timed(epoch)
    return len(images) / seconds


def main() -> None:
    import jax
    import keras

    print(harness.machine_line(), flush=True)
    keras.config.set_dtype_policy(FLAGS.dtype_policy)
    rng = np.random.default_rng(0)
    shape = (FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3)
    images = np.concatenate([rng.standard_normal(shape, np.float32)] * FLAGS.steps)
    labels = np.tile(rng.integers(0, 1000, FLAGS.batch_size, np.int32), FLAGS.steps)
    models = compiled_models(images, labels)
    rates = harness.interleave(
        {
            name: (lambda model=model: epoch_rate(model, images, labels))
            for name, model in models.items()
        },
        FLAGS.rounds,
    )
    device = jax.devices()[0]
    figures = {
        "note": f"ResNet-50 model.fit on {device.platform} ({device.device_kind}), "
        f"batch {FLAGS.batch_size}, {FLAGS.image_size}x{FLAGS.image_size}, "
        f"{FLAGS.dtype_policy}, {FLAGS.rounds} epochs x {FLAGS.steps} steps each",
        "images_per_s": {name: harness.summary(r) for name, r in rates.items()},
        "lars_x_sgd": harness.ratio(rates["LARS"], rates["SGD-momentum"]),
    }
    print(figures["note"])
    for name, rate in figures["images_per_s"].items():
        print(f"{name:<14} {rate['median']:10.1f} images/s")
    print(f"LARS / SGD-momentum throughput: {harness.show(figures['lars_x_sgd'])}")
    harness.write_results("jax_training_throughput", figures)


if __name__ == "__main__":
    harness.run(main)
