"""Writes class-named image folders as ImageNet-layout TFRecords.

    python -m train.convert_images --train_dir=DIR/train --validation_dir=DIR/val \\
        --output_dir=OUT [--labels=dense|imagenet] [--synsets_file=FILE] \\
        [--train_shards=16] [--validation_shards=4] [--bbox_csv=FILE]

Each input folder holds one sub-folder per class (``DIR/train/n01440764/*.JPEG``).
The output is the layout the ImageNet input pipeline reads
(``train-00000-of-00016``, ``validation-00000-of-00004``), one ``tf.train.Example``
per image with the features of the common ImageNet conversion scripts:

- ``image/encoded``: the JPEG bytes (other formats, greyscale and CMYK JPEGs are
  re-encoded as RGB JPEG, quality 95);
- ``image/class/label``: int64, 1-based: with ``--labels=dense`` the 1-based index
  of the class folder in the sorted folder names (1..K); with ``--labels=imagenet``
  the standard ImageNet label, the 1-based index of the folder's synset in the
  sorted list of the 1000 ILSVRC-2012 synsets (``--synsets_file``, one per line;
  by default the list shipped with tensorflow-datasets);
- ``image/class/synset``, ``image/class/text`` (the folder name), ``image/filename``,
  ``image/format``, ``image/height``, ``image/width``, ``image/channels``;
- ``image/object/bbox/{xmin,ymin,xmax,ymax}``: boxes from ``--bbox_csv`` when given
  (rows ``filename,xmin,ymin,xmax,ymax`` in [0, 1], the reference's
  ``imagenet_2012_bounding_boxes.csv`` format), else absent.

Images are shuffled with a fixed seed before sharding so every shard mixes classes.
``dataset_info.json`` (example counts, number of classes, label mode, class
folders) goes beside the shards for ``train.sources.describe``.
"""

import collections
import csv
import json
import os
import random
import sys

import tensorflow as tf
from absl import app, flags, logging

from train import sources

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
LABEL_MODES = ("dense", "imagenet")
SPLIT_NAMES = ("train", "validation")
JPEG_QUALITY = 95


def default_synsets_file() -> str:
    """The sorted 1000 ILSVRC-2012 synsets that tensorflow-datasets ships."""
    import tensorflow_datasets

    package_dir = os.path.dirname(tensorflow_datasets.__file__)
    return os.path.join(package_dir, "datasets", "imagenet2012", "labels.txt")


def read_synsets(path: str) -> list[str]:
    """Synset ids, one per line, in file order (the standard list is sorted)."""
    with tf.io.gfile.GFile(path) as f:
        return [line.strip() for line in f if line.strip()]


def read_bboxes(path: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """filename -> [(xmin, ymin, xmax, ymax), ...] from a box CSV."""
    boxes = collections.defaultdict(list)
    with tf.io.gfile.GFile(path) as f:
        for row in csv.reader(f):
            if not row or row[0].startswith("#"):
                continue
            filename, *coords = row
            boxes[filename].append(tuple(float(value) for value in coords))
    return dict(boxes)


def find_images(
    input_dir: str, max_per_class: int | None = None, classes: list[str] | None = None
) -> tuple[list[str], list[tuple[str, str]]]:
    """(sorted class names, [(path, class name), ...]) of a class-folder tree."""
    if not tf.io.gfile.isdir(input_dir):
        raise FileNotFoundError(
            f"image folder {input_dir!r} does not exist; expected one sub-folder "
            "of images per class"
        )
    class_names = sorted(
        name
        for name in tf.io.gfile.listdir(input_dir)
        if tf.io.gfile.isdir(os.path.join(input_dir, name))
    )
    class_names = [name.rstrip("/") for name in class_names]
    if classes is not None:
        missing = sorted(set(classes) - set(class_names))
        if missing:
            raise FileNotFoundError(f"class folders {missing} not in {input_dir!r}")
        class_names = sorted(classes)
    if not class_names:
        raise FileNotFoundError(f"no class sub-folders in {input_dir!r}")
    images = []
    for name in class_names:
        files = sorted(
            filename
            for filename in tf.io.gfile.listdir(os.path.join(input_dir, name))
            if filename.lower().endswith(IMAGE_EXTENSIONS)
        )
        images += [(os.path.join(input_dir, name, f), name) for f in files][
            :max_per_class
        ]
    return class_names, images


def class_labels(
    class_names: list[str], label_mode: str, synsets: list[str] | None = None
) -> dict[str, int]:
    """Class folder name -> the 1-based label to store."""
    if label_mode == "dense":
        return {name: index + 1 for index, name in enumerate(class_names)}
    if label_mode != "imagenet":
        raise ValueError(f"label mode must be one of {LABEL_MODES}: {label_mode!r}")
    index = {synset: position + 1 for position, synset in enumerate(synsets)}
    unknown = [name for name in class_names if name not in index]
    if unknown:
        raise ValueError(
            f"class folders {unknown} are not synsets of the list "
            f"({len(synsets)} entries); use --labels=dense"
        )
    return {name: index[name] for name in class_names}


def _as_rgb_jpeg(
    contents: bytes, shorter_side: int | None = None
) -> tuple[bytes, int, int]:
    """(RGB JPEG bytes, height, width). JPEG RGB files are kept byte for byte
    unless ``shorter_side`` is given: then every image is resized (bilinear,
    antialiased) so its shorter side has that many pixels, and re-encoded."""
    if tf.io.is_jpeg(contents) and shorter_side is None:
        height, width, channels = tf.image.extract_jpeg_shape(contents).numpy()
        if channels == 3:
            return contents, int(height), int(width)
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    if shorter_side is not None:
        height, width = image.shape[0], image.shape[1]
        scale = shorter_side / min(height, width)
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        resized = tf.image.resize(image, size, antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    encoded = tf.io.encode_jpeg(image, quality=JPEG_QUALITY).numpy()
    return encoded, int(image.shape[0]), int(image.shape[1])


def _feature(values) -> tf.train.Feature:
    if not isinstance(values, list):
        values = [values]
    if all(isinstance(v, bytes) for v in values) and values:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    if all(isinstance(v, int) for v in values) and values:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def make_example(
    jpeg: bytes,
    label: int,
    class_name: str,
    filename: str,
    height: int,
    width: int,
    boxes: list[tuple[float, float, float, float]] = (),
) -> tf.train.Example:
    """An ImageNet-layout ``tf.train.Example`` (boxes: (xmin, ymin, xmax, ymax))."""
    features = {
        "image/encoded": _feature(jpeg),
        "image/format": _feature(b"JPEG"),
        "image/class/label": _feature(label),
        "image/class/synset": _feature(class_name.encode()),
        "image/class/text": _feature(class_name.encode()),
        "image/filename": _feature(filename.encode()),
        "image/height": _feature(height),
        "image/width": _feature(width),
        "image/channels": _feature(3),
        "image/colorspace": _feature(b"RGB"),
    }
    if boxes:
        for position, side in enumerate(("xmin", "ymin", "xmax", "ymax")):
            features[f"image/object/bbox/{side}"] = tf.train.Feature(
                float_list=tf.train.FloatList(value=[box[position] for box in boxes])
            )
    return tf.train.Example(features=tf.train.Features(feature=features))


def convert_split(
    images: list[tuple[str, str]],
    labels: dict[str, int],
    output_dir: str,
    split: str,
    num_shards: int,
    bboxes: dict | None = None,
    seed: int = 0,
    shorter_side: int | None = None,
) -> int:
    """Writes ``{split}-NNNNN-of-MMMMM`` shards; returns the number of examples.
    With ``shorter_side``, images are resized first (``_as_rgb_jpeg``)."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}: {split!r}")
    order = list(images)
    random.Random(seed).shuffle(order)
    tf.io.gfile.makedirs(output_dir)
    num_shards = max(1, min(num_shards, len(order)))
    converted = 0
    for shard in range(num_shards):
        path = os.path.join(output_dir, f"{split}-{shard:05d}-of-{num_shards:05d}")
        with tf.io.TFRecordWriter(path) as writer:
            for image_path, class_name in order[shard::num_shards]:
                with tf.io.gfile.GFile(image_path, "rb") as f:
                    jpeg, height, width = _as_rgb_jpeg(f.read(), shorter_side)
                filename = os.path.basename(image_path)
                example = make_example(
                    jpeg,
                    labels[class_name],
                    class_name,
                    filename,
                    height,
                    width,
                    (bboxes or {}).get(filename, ()),
                )
                writer.write(example.SerializeToString())
                converted += 1
                if converted % 500 == 0 or converted == len(order):
                    logging.info("%s: %d / %d images", split, converted, len(order))
    return converted


def convert(
    output_dir: str,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    label_mode: str = "dense",
    synsets_file: str | None = None,
    train_shards: int = 16,
    validation_shards: int = 4,
    bbox_csv: str | None = None,
    max_per_class: int | None = None,
    classes: list[str] | None = None,
    seed: int = 0,
    shorter_side: int | None = None,
) -> dict:
    """Converts the given splits and writes ``dataset_info.json``; returns it.
    ``shorter_side``: resize every image so its shorter side is this long."""
    if train_dir is None and validation_dir is None:
        raise ValueError("give train_dir, validation_dir or both")
    synsets = None
    if label_mode == "imagenet":
        synsets = read_synsets(synsets_file or default_synsets_file())
    bboxes = read_bboxes(bbox_csv) if bbox_csv else None
    info = {"label_mode": label_mode, "num_examples": {}, "label_offset": 1}
    all_classes = None
    for split, input_dir, num_shards in (
        ("train", train_dir, train_shards),
        ("validation", validation_dir, validation_shards),
    ):
        if input_dir is None:
            continue
        class_names, images = find_images(input_dir, max_per_class, classes)
        if all_classes is None:
            all_classes = class_names
        elif class_names != all_classes:
            raise ValueError(
                f"{input_dir} has classes {class_names}, the train split {all_classes}"
            )
        labels = class_labels(all_classes, label_mode, synsets)
        info["num_examples"][split] = convert_split(
            images, labels, output_dir, split, num_shards, bboxes, seed, shorter_side
        )
    info["num_classes"] = len(synsets) if synsets else len(all_classes)
    info["classes"] = {name: labels[name] for name in all_classes}
    with tf.io.gfile.GFile(os.path.join(output_dir, sources.INFO_FILENAME), "w") as f:
        json.dump(info, f, indent=2)
    return info


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defines this command's flags on `flag_values` (`flags.FLAGS` when run)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string(
        "train_dir", None, "Class folders of the training images.", **fv
    )
    flags.DEFINE_string(
        "validation_dir", None, "Class folders of the validation images.", **fv
    )
    flags.DEFINE_string("output_dir", None, "Where the TFRecord shards go.", **fv)
    flags.DEFINE_enum(
        "labels", "dense", LABEL_MODES, "dense 1..K or ImageNet 1..1000.", **fv
    )
    flags.DEFINE_string(
        "synsets_file",
        None,
        "Sorted ImageNet synsets (default: tensorflow-datasets').",
        **fv,
    )
    flags.DEFINE_integer("train_shards", 16, "Number of training files.", **fv)
    flags.DEFINE_integer("validation_shards", 4, "Number of validation files.", **fv)
    flags.DEFINE_string(
        "bbox_csv", None, "Boxes: filename,xmin,ymin,xmax,ymax in [0,1].", **fv
    )
    flags.DEFINE_integer(
        "max_per_class", None, "Keep at most this many per class.", **fv
    )
    flags.DEFINE_list("classes", None, "Convert only these class folders.", **fv)
    flags.DEFINE_integer("seed", 0, "Seed of the shuffle before sharding.", **fv)
    flags.DEFINE_integer(
        "shorter_side",
        None,
        "Resize every image (bilinear, antialiased) so its shorter side has this "
        "many pixels, and re-encode it as JPEG; default: keep the images as they "
        "are. For small-image training (37 gives 32x32 crops of 7/8 of the side).",
        lower_bound=1,
        **fv,
    )


def main(argv: list[str]) -> None:
    """Converts as the flags say and prints the example counts."""
    del argv
    f = flags.FLAGS
    if not f.output_dir:
        print("convert_images: error: --output_dir is required", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.INFO)
    info = convert(
        f.output_dir,
        f.train_dir,
        f.validation_dir,
        f.labels,
        f.synsets_file,
        f.train_shards,
        f.validation_shards,
        f.bbox_csv,
        f.max_per_class,
        f.classes,
        f.seed,
        f.shorter_side,
    )
    print(json.dumps(info["num_examples"]), "examples written to", f.output_dir)


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
