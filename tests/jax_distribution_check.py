"""LARS under Keras's distribution API on JAX, in one of three layouts.

Run by tests/test_jax_distribution.py, one process per layout (JAX's device
count and multi-process setup are fixed when JAX starts):

- ``single``: one CPU device, no distribution (the reference);
- ``data_parallel``: ``keras.distribution.DataParallel`` over 2 host devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set here before
  JAX is imported);
- ``multi_process``: one of 2 processes joined by
  ``keras.distribution.initialize`` (JAX's multi-process path, CPU collectives
  over gloo), each with one device, under ``DataParallel``.

Every layout trains the same small model with ``model.fit`` for a few steps on
the project's input pipeline (``train.data.make_input_fn``, MNIST format, fixed
seed, deterministic). One process feeds the global batch and Keras splits it
between its devices. Each of several processes feeds its own share, built by
``InputFn`` from a ``tf.distribute.InputContext`` (the way ``train`` shards
under tf.distribute), with Keras's own sharding of the dataset turned off
(``DataParallel(auto_shard_dataset=False)``). ``--sharding=keras`` leaves
Keras's sharding on and feeds every process the global batch instead: with
Keras 3.15.1 and JAX 0.10.2 on CPU those runs mostly end with other weights
than one process's, different from run to run (docs/jax.md).

The ``data_parallel`` process, which has 2 devices, then also trains a small
dense model under ``keras.distribution.ModelParallel`` with its kernels split
over the 2 devices by a ``LayoutMap``, and the same model on one device
(no distribution), each in both forms of LARS's trust ratio, and reports how
the variables were sharded and how far the sharded weights are from one
device's.

Writes the initial and final weights to ``--output`` (``.npz``) and prints one
JSON line saying what the run saw (devices, processes, the batch this process
fed, and the model-parallel figures).
"""

import argparse
import contextlib
import json
import os

GLOBAL_BATCH = 8
STEPS = 6
IMAGE_SIZE = 8
NUM_CLASSES = 10
LAYOUTS = ("single", "data_parallel", "multi_process")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=LAYOUTS, required=True)
    parser.add_argument("--data_dir", required=True, help="MNIST-format IDX files")
    parser.add_argument("--output", required=True, help=".npz for the weights")
    parser.add_argument("--optimizer", choices=("lars", "sgd"), default="lars")
    parser.add_argument("--coordinator", help="host:port of process 0")
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument(
        "--sharding",
        choices=("input_fn", "keras"),
        default="input_fn",
        help="who shards the data between processes (see the module docstring)",
    )
    return parser.parse_args()


def make_optimizer(name: str):
    import keras

    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    import lars_tf

    return lars_tf.LARS(
        learning_rate=2.0,
        momentum=0.9,
        weight_decay=1e-3,
        nesterov=True,
        exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
        exclude_from_weight_decay=lars_tf.exclude_bias_and_norm,
    )


# Layer names and layouts of the model-parallel check. `LayoutMap` keys are
# regular expressions matched from the start of the variable's path
# ("sequential/dense_in/kernel"), hence the leading ".*".
MODEL_PARALLEL_LAYOUTS = {
    ".*dense_in/kernel": (None, "model"),  # columns split
    ".*dense_in/bias": ("model",),
    ".*dense_out/kernel": ("model", None),  # rows split
}
MODEL_PARALLEL_STEPS = 6


def train_dense_model(decayed_gradient_norm: bool, distribution) -> list:
    """`MODEL_PARALLEL_STEPS` LARS steps of a two-layer dense model.

    Under `distribution` if given (else on one device); returns the model,
    the optimizer's momentum slots and the weights before training. The
    first half of the hidden kernel's columns (the first device's shard)
    starts 4 times larger than the rest, so that a norm of one shard would
    give another trust ratio than the whole variable's.
    """
    import keras
    import numpy as np

    import lars_tf

    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8 * MODEL_PARALLEL_STEPS, 6)).astype(np.float32)
    y = rng.normal(size=(8 * MODEL_PARALLEL_STEPS, 4)).astype(np.float32)
    with distribution.scope() if distribution else contextlib.nullcontext():
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, activation="tanh", name="dense_in"),
                keras.layers.Dense(4, name="dense_out"),
            ]
        )
        kernel = model.layers[0].kernel
        scale = np.ones(kernel.shape, np.float32)
        scale[:, : kernel.shape[1] // 2] = 4.0
        kernel.assign(keras.ops.convert_to_numpy(kernel) * scale)
        initial = [keras.ops.convert_to_numpy(w) for w in model.weights]
        model.compile(
            optimizer=lars_tf.LARS(
                learning_rate=1.0,
                trust_coefficient=0.02,
                momentum=0.9,
                weight_decay=1e-2,
                decayed_gradient_norm=decayed_gradient_norm,
                exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
            ),
            loss="mean_squared_error",
        )
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model, list(model.optimizer.momentums), initial


def check_model_parallel() -> dict:
    """Sharded against one device, in both forms of the trust ratio.

    Returns, per form, the shard shape of every variable and momentum slot
    under `ModelParallel`, the largest weight difference to the one-device
    run relative to the largest weight, and how far training moved the
    weights, relative likewise.
    """
    import keras
    import numpy as np

    mesh = keras.distribution.DeviceMesh(
        shape=(1, 2),
        axis_names=("batch", "model"),
        devices=keras.distribution.list_devices(),
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    for key, axes in MODEL_PARALLEL_LAYOUTS.items():
        layout_map[key] = axes
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    keras.distribution.set_distribution(None)
    report = {}
    for form in ("paper", "decayed_norm"):
        decayed = form == "decayed_norm"
        one_device, _, initial = train_dense_model(decayed, None)
        sharded, slots, sharded_initial = train_dense_model(decayed, distribution)
        reference = [np.asarray(w.value, np.float64) for w in one_device.weights]
        largest = max(float(np.abs(w).max()) for w in reference)
        report[form] = {
            "same_start": all(
                np.array_equal(a, b)
                for a, b in zip(initial, sharded_initial, strict=True)
            ),
            # Path below the model: shape, and the shape of each device's shard.
            "shards": {
                w.path.split("/", 1)[1]: [
                    list(w.shape),
                    list(w.value.sharding.shard_shape(w.value.shape)),
                ]
                for w in sharded.weights
            },
            "slots_sharded_as_weights": all(
                m.value.sharding.shard_shape(m.shape)
                == w.value.sharding.shard_shape(w.shape)
                for m, w in zip(slots, sharded.weights, strict=True)
            ),
            "moved": max(
                float(np.abs(w - w0).max() / np.abs(w0).max())
                for w, w0 in zip(reference, initial, strict=True)
                if np.abs(w0).max() > 0  # the kernels
            ),
            "sharded_vs_one_device": max(
                float(np.abs(np.asarray(s.value) - w).max())
                for s, w in zip(sharded.weights, reference, strict=True)
            )
            / largest,
        }
    return report


def main() -> None:
    args = parse_args()
    os.environ["KERAS_BACKEND"] = "jax"
    if args.layout == "data_parallel":
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

    import jax
    import keras
    import numpy as np

    if args.layout == "multi_process":
        keras.distribution.initialize(
            job_addresses=args.coordinator,
            num_processes=2,
            process_id=args.process_id,
        )
    import tensorflow as tf  # Only for tf.data.

    from train import data

    multi_process = args.layout == "multi_process"
    keras_shards = not multi_process or args.sharding == "keras"
    distribution = None
    if args.layout != "single":
        distribution = keras.distribution.DataParallel(auto_shard_dataset=keras_shards)
        keras.distribution.set_distribution(distribution)

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1)),
            keras.layers.Conv2D(4, 3, name="conv1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(NUM_CLASSES, name="fc"),
        ]
    )
    model.compile(
        optimizer=make_optimizer(args.optimizer),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    initial = [w.numpy() for w in model.weights]
    input_fn = data.make_input_fn(
        source="mnist",
        split="train",
        data_dir=args.data_dir,
        global_batch_size=GLOBAL_BATCH,
        image_size=IMAGE_SIZE,
        augmentation="minimal",
        seed=3,
        deterministic=True,
        # No shuffle: each new iterator of a shuffled pipeline starts with
        # another order, and model.fit makes a different number of iterators
        # per layout (seen: DataParallel on 2 devices differing from 1 device
        # in one CI run). Order is not what this check is about.
        shuffle_buffer_size=1,
    )
    if keras_shards:
        dataset = input_fn()
    else:  # This process's share of each global batch, in step order.
        dataset = input_fn(
            tf.distribute.InputContext(
                num_input_pipelines=jax.process_count(),
                input_pipeline_id=jax.process_index(),
                num_replicas_in_sync=jax.process_count(),
            )
        )
    model.fit(dataset, epochs=1, steps_per_epoch=STEPS, verbose=0)

    # The batch this process feeds per step, after any sharding by Keras.
    fed = dataset
    if distribution is not None:
        fed = distribution.distribute_dataset(dataset)
    images, _ = next(iter(fed))
    weights = {w.path: w.numpy() for w in model.weights}
    moved = max(float(abs(w - w0).max()) for w, w0 in zip(weights.values(), initial))
    arrays = {k.replace("/", "|"): v for k, v in weights.items()}
    arrays.update({f"initial|{i}": w for i, w in enumerate(initial)})
    np.savez(args.output, **arrays)
    model_parallel = None
    if args.layout == "data_parallel":
        model_parallel = check_model_parallel()
    print(
        json.dumps(
            {
                "model_parallel": model_parallel,
                "layout": args.layout,
                "devices": jax.device_count(),
                "local_devices": jax.local_device_count(),
                "processes": jax.process_count(),
                "process_id": jax.process_index(),
                "batch_fed": int(images.shape[0]),
                "largest_weight_change": moved,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
