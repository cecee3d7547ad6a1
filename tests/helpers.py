"""Helpers shared by the tests and the check scripts they run in subprocesses.

Importable as `helpers`: pytest puts tests/ on the path (`pythonpath` in
pyproject.toml), and a check script run as `python tests/<name>_check.py` has
its own folder on the path (by hand, from the repository root:
`PYTHONPATH=. python tests/<name>_check.py`). Keras and NumPy only at import, because
backend_check.py imports this module on JAX and PyTorch with TensorFlow made
unimportable; the TFRecord helpers import TensorFlow when called.
"""

import gzip
import json
import os
import re
import socket
import subprocess
import sys

import keras
import numpy as np

import lars_tf

# --- The reference: the paper's Algorithm 1 with momentum, in float64, ------
# --- and with decayed_gradient_norm the form of optax's `lars`. -------------


def reference_step(w, v, g, lr, *, momentum, weight_decay, eta, epsilon, nesterov,
                   clip, adapted, decayed_gradient_norm=False):  # fmt: skip
    """One float64 LARS step of weight `w` with velocity `v`: (new w, new v)."""
    g = g.astype(np.float64)
    decayed = g + weight_decay * w
    local_lr = lr
    if adapted:
        w_norm = np.linalg.norm(w)
        if decayed_gradient_norm:
            g_norm = np.linalg.norm(decayed)
            denominator = g_norm + epsilon
        else:
            g_norm = np.linalg.norm(g)
            denominator = g_norm + weight_decay * w_norm + epsilon
        ratio = 1.0
        if w_norm > 0 and g_norm > 0:
            ratio = eta * w_norm / denominator
        local_lr = min(ratio, lr) if clip else lr * ratio
    update = local_lr * decayed
    if momentum == 0:
        return w - update, v
    v = momentum * v + update
    if nesterov:
        return w - (momentum * v + update), v
    return w - v, v


def hyper_of(kwargs: dict) -> dict:
    """`reference_step`'s keyword arguments for `LARS(**kwargs)` (its defaults)."""
    return dict(
        momentum=kwargs.get("momentum", 0.9),
        eta=kwargs.get("trust_coefficient", 0.001),
        epsilon=kwargs.get("epsilon", 0.0),
        nesterov=kwargs.get("nesterov", False),
        clip=kwargs.get("clip", False),
        decayed_gradient_norm=kwargs.get("decayed_gradient_norm", False),
    )


def expected_flags(variables, kwargs: dict) -> tuple[list[bool], list[float]]:
    """Per variable, whether `LARS(**kwargs)` adapts it and its weight decay."""

    def excluded(rule, v):
        if rule is None:
            return False
        if callable(rule):
            return len(v.shape) <= 1
        return any(re.search(p, v.path) for p in rule)

    adapted = [
        not excluded(kwargs.get("exclude_from_adaptation"), v) for v in variables
    ]
    decays = [
        0.0
        if excluded(kwargs.get("exclude_from_weight_decay"), v)
        else kwargs.get("weight_decay", 0.0)
        for v in variables
    ]
    return adapted, decays


CASES = {
    "plain": dict(momentum=0.9),
    "no_momentum_decay": dict(momentum=0.0, weight_decay=1e-2),
    "tiny_momentum_decay": dict(momentum=1e-40, weight_decay=1e-2),
    "numpy_scalars": dict(momentum=np.float32(0.9), weight_decay=np.float64(1e-3)),
    "nesterov": dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    "clip": dict(momentum=0.9, clip=True, weight_decay=1e-3),
    "weight_decay_epsilon": dict(momentum=0.9, weight_decay=5e-3, epsilon=1e-5),
    "big_eta": dict(momentum=0.8, trust_coefficient=0.02, weight_decay=1e-4),
    "regex_exclusion": dict(
        momentum=0.9,
        weight_decay=1e-2,
        exclude_from_adaptation=["bias$", r"bn\d/"],
        exclude_from_weight_decay=["bn1/beta"],
    ),
    "predicate_exclusion": dict(
        momentum=0.9,
        weight_decay=1e-2,
        nesterov=True,
        exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
        exclude_from_weight_decay=lars_tf.exclude_bias_and_norm,
    ),
}


# The two forms of the trust ratio's denominator, each checked on every case.
FORMS = {"paper": {}, "decayed_norm": dict(decayed_gradient_norm=True)}


# --- Small models and data. -------------------------------------------------


def small_model() -> keras.Model:
    """Conv + batch norm + dense on 6x6x3 images, 5 logits, uncompiled."""
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(5, name="fc")(x)
    return keras.Model(inputs, outputs, name="model")


def random_problem(seed: int, num_steps: int):
    """`small_model`'s variables set to random values, their values as NumPy,
    and `num_steps` lists of random gradients."""
    rng = np.random.default_rng(seed)
    variables = small_model().trainable_variables
    for v in variables:
        v.assign(rng.normal(size=v.shape).astype(np.float32))
    grad_steps = [
        [(rng.normal(size=v.shape) * rng.uniform(0.01, 2)).astype(np.float32)
         for v in variables]
        for _ in range(num_steps)
    ]  # fmt: skip
    return variables, [keras.ops.convert_to_numpy(v) for v in variables], grad_steps


def fit_data(n: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` random 6x6x3 images and labels a linear map of them gives (5 classes)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 3)).astype(np.float32)
    y = np.argmax(x.reshape(n, -1) @ rng.normal(size=(108, 5)), axis=1)
    return x, y


def compiled_model(seed: int = 0, **lars_kwargs) -> keras.Model:
    """`small_model`, seeded, compiled with LARS(1.0, eta 0.01, decay 1e-4)."""
    keras.utils.set_random_seed(seed)
    model = small_model()
    model.compile(
        optimizer=lars_tf.LARS(
            learning_rate=1.0, trust_coefficient=0.01, weight_decay=1e-4, **lars_kwargs
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def conv_bn_model(optimizer) -> keras.Model:
    """A conv + batch norm + dense classifier of 6x6x2 images, compiled, seeded."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            # No bias before batch norm: its gradient would be roundoff noise.
            keras.layers.Conv2D(4, 3, use_bias=False, name="conv1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="fc"),
        ]
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


# --- ImageNet-format TFRecords. ---------------------------------------------

HEIGHT, WIDTH = 40, 56  # Not square, so crops and aspect ratios matter.


def smooth_image(rng: np.random.Generator) -> np.ndarray:
    """A smooth random HEIGHT x WIDTH picture (JPEG keeps it close to the original)."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack(
        [
            128 + 100 * np.sin(xs / rng.uniform(3, 9) + rng.uniform(0, 6)),
            128 + 100 * np.cos(ys / rng.uniform(3, 9)),
            np.full_like(xs, rng.integers(0, 256)),
        ],
        axis=-1,
    )
    return image.astype(np.uint8)


def imagenet_example(jpeg: bytes, label: int, boxes=()) -> bytes:
    """A record with the standard ImageNet features (boxes: ymin, xmin, ymax, xmax)."""
    import tensorflow as tf

    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg])),
        "image/class/label": tf.train.Feature(
            int64_list=tf.train.Int64List(value=[label])
        ),
        "image/class/text": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[f"class {label}".encode()])
        ),
    }
    for position, side in enumerate(("ymin", "xmin", "ymax", "xmax")):
        if boxes:
            feature[f"image/object/bbox/{side}"] = tf.train.Feature(
                float_list=tf.train.FloatList(value=[b[position] for b in boxes])
            )
    return tf.train.Example(
        features=tf.train.Features(feature=feature)
    ).SerializeToString()


def write_records(path: str, records: list[bytes]) -> None:
    """A TFRecord file at `path` holding `records`."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)


def local_worker_addresses(count: int) -> list[str]:
    """`count` free "127.0.0.1:PORT" addresses for a cluster of local workers
    (ports held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    return addresses


def start_workers(model_dir, workers: list[str], args: list[str]) -> list:
    """One `python -m train.main --strategy=multi_worker` process per address
    of `workers` (a cluster on this host, TF_CONFIG in each one's environment),
    training into `model_dir` with `args`; stdout and stderr are pipes (text)."""
    processes = []
    for index in range(len(workers)):
        tf_config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": index},
        }
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        env["TF_CONFIG"] = json.dumps(tf_config)
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "train.main", *args]
                + ["--strategy=multi_worker", f"--model_dir={model_dir}"],
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def read_until(process, pattern: str) -> list[str]:
    """The lines of `process`'s stdout up to the first matching `pattern`."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(lines)[-3000:]}")


def write_idx(path, array: np.ndarray) -> None:
    """`array` as a gzipped IDX file of unsigned bytes (MNIST's format: magic
    0, 0, 0x08, rank; the sizes big-endian; the data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())
