"""The paper's Table 2, like for like: plain AlexNet at iteration 1, per layer.

The paper (You, Gitman & Ginsburg 2017, Table 2) lists, for AlexNet without BN
at its first iteration, each layer's weight norm ||w||, gradient norm ||g|| and
their ratio, to show that the ratio differs by orders of magnitude between
layers (the motivation for a per-layer rate). This script computes the same
numbers for the app's ``alexnet`` (Caffe's bvlc_alexnet: two-group conv2/4/5,
LRN after conv1 and conv2, dropout in fc6/fc7, 1000 classes) initialised as
the paper's norms imply, on one batch of real ImageNet photographs from
Imagenette, and prints them beside the paper's (read from ``--paper_tables``,
default ``../shared/paper/TABLES.md``)::

    python -m experiments.table2_alexnet --batch_size=128

Initialisation. Caffe's Gaussian fillers: std 0.01 for every conv and for fc8,
0.005 for fc6 and fc7. The paper's norms fix these (conv1: sqrt(11*11*3*96) x
0.01 = 1.87; fc6: sqrt(9216*4096) x 0.005 = 30.7) and also the biases: 0.01
everywhere except 0.1 in fc6 and fc7 (conv1's 96 biases of 0.01 have norm
0.098, fc6's 4096 of 0.1 have 6.4). The LRN layers get Caffe's constants
(k = 1, alpha = 1e-4 / 5 per channel, n = 5) in place of the app's paper
constants (k = 2).

Input. Caffe's: BGR pixels in 0-255 minus the ImageNet mean pixel (104, 117,
123), no division by a standard deviation. Imagenette's images are 224x224
(the model pads conv1's input by 2, so conv1 gives 55x55 as Caffe's 227x227
crop does); labels are the classes' ImageNet-1k indices. The gradient is that
of the mean softmax cross-entropy over the batch (Caffe's SoftmaxWithLoss),
without weight decay, with dropout on (a training step).

The paper's table labels its columns ``.w`` and ``.b`` the wrong way round:
the columns it calls ``.b`` have exactly the norms of the Gaussian weight
matrices, those it calls ``.w`` those of constant biases (TABLES.md). They are
read here with the labels swapped.
"""

import os
import sys

import numpy as np
from absl import app, flags

import train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_TABLES = os.path.join(train.SHARED_DIR, "paper", "TABLES.md")
# Caffe's Gaussian std for the weights and constant for the biases, per layer.
CAFFE_INIT = {
    "conv1": (0.01, 0.01),
    "conv2": (0.01, 0.01),
    "conv3": (0.01, 0.01),
    "conv4": (0.01, 0.01),
    "conv5": (0.01, 0.01),
    "fc6": (0.005, 0.1),
    "fc7": (0.005, 0.1),
    "fc8": (0.01, 0.01),
}
CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)
# Imagenette's classes (its folder names) and their ImageNet-1k class indices.
IMAGENET_INDEX = {
    "n01440764": 0,  # tench
    "n02102040": 217,  # English springer
    "n02979186": 482,  # cassette player
    "n03000684": 491,  # chain saw
    "n03028079": 497,  # church
    "n03394916": 566,  # French horn
    "n03417042": 569,  # garbage truck
    "n03425413": 571,  # gas pump
    "n03445777": 574,  # golf ball
    "n03888257": 701,  # parachute
}

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (defined only when it runs as a script)."""
    flags.DEFINE_integer("batch_size", 128, "Images in the one batch.")
    flags.DEFINE_integer("seed", 0, "Seed of the weights, the batch and dropout.")
    flags.DEFINE_bool(
        "uniform_labels",
        False,
        "Label the images with classes drawn uniformly from ImageNet's 1000, as "
        "a batch of ImageNet has (nearly all distinct), instead of their own 10: "
        "at initialisation the output hardly depends on the image, so the labels' "
        "spread sets the size of the averaged gradient.",
    )
    flags.DEFINE_string(
        "image_dir",
        None,
        "Imagenette's train/ folder of class folders; default "
        "<shared data>/imagenette2-224/train.",
    )
    flags.DEFINE_string(
        "paper_tables",
        PAPER_TABLES,
        "The paper's tables in markdown (shared/paper/TABLES.md); its Table 2 "
        "is printed beside ours.",
    )
    flags.DEFINE_string(
        "output",
        os.path.join(REPO_ROOT, "experiments", "results", "table2_alexnet.md"),
        "Where the markdown table is written.",
    )


def read_paper_table2(path: str) -> dict:
    """The paper's Table 2 from ``path`` (TABLES.md), read with the labels
    swapped: {layer: ((||w||, ||g||, ratio) of the weights, (||w||, ||g||,
    ratio) of the biases)}. Raises ``ValueError`` naming the file if it has
    no "## Table 2" section, a row that is not numbers under its header, or
    no columns for a layer."""
    with open(path) as f:
        text = f.read()
    if "## Table 2" not in text:
        raise ValueError(f"{path}: no '## Table 2' section")
    section = text.split("## Table 2", 1)[1].split("\n## ", 1)[0]
    columns, table = [], {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == "layer":
            columns = cells[1:]
        elif cells[0] in ("norm w", "norm grad", "ratio"):
            try:
                values = [float(value) for value in cells[1:]]
            except ValueError:
                values = []
            if not values or len(values) != len(columns):
                raise ValueError(
                    f"{path}: Table 2 row {line.strip()!r} is not "
                    f"{len(columns)} numbers under its header"
                )
            for column, value in zip(columns, values):
                table.setdefault(column, []).append(value)
    try:
        return {
            name: (tuple(table[f"{name}.b"]), tuple(table[f"{name}.w"]))
            for name in CAFFE_INIT
        }
    except KeyError as missing:
        raise ValueError(f"{path}: Table 2 has no column {missing}") from None


def caffe_batch(image_dir: str, batch_size: int, seed: int):
    """(images [N, 224, 224, 3] float32 BGR minus the mean pixel, ImageNet
    labels [N]): ``batch_size`` training images drawn at random (``seed``)."""
    import tensorflow as tf

    files = [
        (os.path.join(image_dir, wnid, name), index)
        for wnid, index in sorted(IMAGENET_INDEX.items())
        for name in sorted(os.listdir(os.path.join(image_dir, wnid)))
    ]
    picks = np.random.default_rng(seed).choice(len(files), batch_size, replace=False)
    images, labels = [], []
    for pick in picks:
        path, label = files[pick]
        with open(path, "rb") as f:
            image = tf.io.decode_jpeg(f.read(), channels=3)  # Grey ones too.
        image = tf.image.resize(tf.cast(image, tf.float32), [224, 224])
        images.append(image.numpy()[..., ::-1] - np.array(CAFFE_MEAN_BGR))
        labels.append(label)
    return np.stack(images).astype(np.float32), np.array(labels, np.int32)


def caffe_alexnet(seed: int):
    """The app's AlexNet (1000 classes) with Caffe's initialisation and LRN."""
    from train import models

    model = models.build_model("alexnet", 1000, 224, 3)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.name in CAFFE_INIT:
            std, bias = CAFFE_INIT[layer.name]
            layer.kernel.assign(rng.normal(0.0, std, layer.kernel.shape))
            layer.bias.assign(np.full(layer.bias.shape, bias))
        if isinstance(layer, models.LocalResponseNormalization):
            layer.bias, layer.alpha = 1.0, 1e-4 / 5
    return model


def layer_norms(model, images, labels, seed: int) -> dict:
    """{layer: ((||w||, ||g||) of the kernel, (||w||, ||g||) of the bias)}."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)  # Dropout's mask.
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(images, training=True))
    layers = [model.get_layer(name) for name in CAFFE_INIT]
    variables = [v for layer in layers for v in (layer.kernel, layer.bias)]
    grads = tape.gradient(loss, variables)
    norm = lambda x: float(np.linalg.norm(np.asarray(x, np.float64)))  # noqa: E731
    norms = {}
    for i, layer in enumerate(layers):
        kernel, bias = variables[2 * i : 2 * i + 2]
        norms[layer.name] = (
            (norm(kernel), norm(grads[2 * i])),
            (norm(bias), norm(grads[2 * i + 1])),
        )
    return norms


def comparison_table(norms: dict, paper: dict) -> str:
    """Markdown: ours beside the paper's (``read_paper_table2``), per variable."""
    lines = [
        "| variable | ||w|| ours | ||w|| paper | ||g|| ours | ||g|| paper "
        "| ratio ours | ratio paper |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ours in norms.items():
        for kind, (w, g), theirs in zip(("w", "b"), ours, paper[name], strict=True):
            lines.append(
                f"| {name}.{kind} | {w:.4g} | {theirs[0]:g} | {g:.3g} | {theirs[1]:g} "
                f"| {w / g:.3g} | {theirs[2]:g} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv

    image_dir = FLAGS.image_dir or os.path.join(
        train.shared_data_dir(), "imagenette2-224", "train"
    )
    if not os.path.isdir(image_dir):
        print(f"--image_dir: {image_dir} is not a folder", file=sys.stderr)
        sys.exit(2)
    try:
        paper = read_paper_table2(FLAGS.paper_tables)
    except OSError as error:
        print(
            f"--paper_tables: {FLAGS.paper_tables}: {error.strerror}", file=sys.stderr
        )
        sys.exit(2)
    except ValueError as error:
        print(f"--paper_tables: {error}", file=sys.stderr)
        sys.exit(2)
    images, labels = caffe_batch(image_dir, FLAGS.batch_size, FLAGS.seed)
    if FLAGS.uniform_labels:
        labels = np.random.default_rng(FLAGS.seed).integers(0, 1000, len(labels))
    norms = layer_norms(caffe_alexnet(FLAGS.seed), images, labels, FLAGS.seed)
    header = (
        f"AlexNet (no BN), Caffe initialisation, iteration 1: one batch of "
        f"{FLAGS.batch_size} Imagenette training images at 224x224 (seed "
        f"{FLAGS.seed}), "
        + (
            "labels drawn uniformly from 1000 classes"
            if FLAGS.uniform_labels
            else "their own (10) ImageNet labels"
        )
        + "; paper: Table 2 with its .w/.b labels swapped."
    )
    markdown = header + "\n\n" + comparison_table(norms, paper) + "\n"
    print(markdown)
    with open(FLAGS.output, "w") as f:
        f.write(markdown)


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
