"""What the app knows about each data source, in one table, without TensorFlow.

`train.config` checks the data a run will use before TensorFlow starts, and
`train.data` builds its pipelines from the same facts: classes, image size,
channels, example counts, normalization, default augmentation and label offset.
`describe` resolves them for one run (reading the folder's own counts where it
has them) and raises `train.UserError` naming the folder or file when the data
is missing or unreadable. Nothing is ever downloaded.

Sources and their files (``data_dir`` is the folder holding them):

- ``synthetic``: random images generated in memory; ImageNet's shape and sizes,
  or MNIST's when it stands in for MNIST (``describe("auto", None)`` without
  the default MNIST folder).
- ``mnist`` / ``fashion_mnist``: the four standard IDX files (``IDX_FILES``).
- ``imagenet``: TFRecords ``train-NNNNN-of-NNNNN`` / ``validation-NNNNN-of-NNNNN``
  with 1-based labels, as `python -m train.convert_images` writes them, with
  the example counts in ``dataset_info.json`` beside them.
- ``tfds``: a TFDS dataset already prepared in ``data_dir`` (TFDS's default
  folder when None).
"""

import dataclasses
import glob
import gzip
import json
import math
import os
import struct
import zlib

from train import UserError, shared_data_dir

SPLITS = ("train", "validation")
# The standard IDX file names, per split: (images, labels).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "validation": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
RECORD_PATTERNS = {"train": "train-*-of-*", "validation": "validation-*-of-*"}
INFO_FILENAME = "dataset_info.json"  # Written by train.convert_images.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclasses.dataclass(frozen=True)
class Source:
    """The facts of one data source, as resolved for a run by `describe`.

    ``mean`` and ``std`` are per channel, in 0-255 units. Stored labels lie in
    [label_offset, label_offset + num_classes); pipelines subtract the offset.
    """

    name: str
    num_classes: int
    image_size: int
    channels: int
    train_examples: int
    eval_examples: int
    default_augmentation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_offset: int = 0
    data_dir: str | None = None
    tfds_name: str | None = None
    # TFRecord files of the train split (imagenet): a resumed run must find
    # the same number, or its data and position in them are not the run's.
    train_files: int | None = None


_IMAGENET = Source(
    "imagenet",
    num_classes=1000,
    image_size=224,
    channels=3,
    train_examples=1_281_167,
    eval_examples=50_000,
    default_augmentation="minimal",
    mean=IMAGENET_MEAN_RGB,
    std=IMAGENET_STDDEV_RGB,
    label_offset=1,
)
_MNIST = Source(
    "mnist",
    num_classes=10,
    image_size=28,
    channels=1,
    train_examples=60_000,
    eval_examples=10_000,
    default_augmentation="none",  # A flipped digit is another digit.
    mean=(0.1307 * 255,),
    std=(0.3081 * 255,),
)
# Defaults of each source; `describe` fills in what the files say.
SOURCES = {
    "synthetic": dataclasses.replace(
        _IMAGENET, name="synthetic", default_augmentation="none", label_offset=0
    ),
    "imagenet": _IMAGENET,
    "mnist": _MNIST,
    "fashion_mnist": dataclasses.replace(
        _MNIST, name="fashion_mnist", mean=(0.2860 * 255,), std=(0.3530 * 255,)
    ),
    "tfds": dataclasses.replace(_IMAGENET, name="tfds", label_offset=0),
}
SOURCE_NAMES = tuple(SOURCES)
FILE_SOURCES = ("imagenet", "mnist", "fashion_mnist")
# Synthetic data standing in for MNIST has MNIST's shape and split sizes.
MNIST_STAND_IN = dataclasses.replace(_MNIST, name="synthetic")


def default_data_dir(source: str) -> str | None:
    """``<data root>/<source>`` for file sources; None (no folder) otherwise."""
    if source not in FILE_SOURCES:
        return None
    return os.path.join(shared_data_dir(), source)


def find_source(data_dir: str) -> str | None:
    """The file source whose files are in ``data_dir``: "mnist" for IDX files
    (Fashion-MNIST uses the same names: ask for it by name), "imagenet" for
    TFRecords; None when there are neither or the folder does not exist."""
    has_idx = _exists(os.path.join(data_dir, IDX_FILES["train"][0]))
    has_records = any(
        _glob(os.path.join(data_dir, pattern)) for pattern in RECORD_PATTERNS.values()
    )
    if has_idx and has_records:
        raise UserError(
            f"--data_dir={data_dir}: holds both MNIST IDX files and ImageNet "
            "TFRecords; choose one with --source=mnist or --source=imagenet"
        )
    if has_idx:
        return "mnist"
    if has_records:
        return "imagenet"
    return None


def describe(
    source: str,
    data_dir: str | None,
    tfds_name: str | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
    label_offset: int | None = None,
) -> Source:
    """The facts of ``source`` for one run, checked against its files.

    Args:
      source: one of ``SOURCE_NAMES``, or "auto": the file source found in
        ``data_dir``; without ``data_dir``, MNIST in its default folder, or,
        when that folder is absent, synthetic data of MNIST's shape and sizes.
      data_dir: the folder of the source's files; None: ``default_data_dir``.
      tfds_name: the TFDS dataset name, for source "tfds".
      image_size: the run's image size; default: the source's own.
      num_classes: the run's number of classes; default: the source's own.
      label_offset: "imagenet" only: 1 (default) for labels 1..1000 read as
        0..999; 0 keeps them, with 1001 classes (class 0 unused).

    Raises:
      UserError: naming the folder or file, when the data is missing, of
        another kind than asked, or unreadable.
    """
    stand_in = False
    if source == "auto":
        source, data_dir = _resolve_auto(data_dir)
        stand_in = source == "synthetic"
    if source not in SOURCES:
        raise UserError(f"--source={source}: must be one of {SOURCE_NAMES}")
    if source == "tfds" and not tfds_name:
        raise UserError("--tfds_name: is required with --source=tfds")
    if data_dir is None:
        data_dir = default_data_dir(source)
    if source == "synthetic":
        facts = MNIST_STAND_IN if stand_in else SOURCES["synthetic"]
        data_dir = None
    elif source == "imagenet":
        facts = _describe_imagenet(data_dir, label_offset)
    elif source == "tfds":
        facts = _describe_tfds(tfds_name, data_dir)
    else:
        facts = _describe_idx(source, data_dir)
    if label_offset is not None and source != "imagenet" and label_offset != 0:
        raise UserError(f"label_offset={label_offset}: only imagenet has an offset")
    return dataclasses.replace(
        facts,
        image_size=image_size or facts.image_size,
        num_classes=num_classes or facts.num_classes,
        data_dir=data_dir,
        tfds_name=tfds_name if source == "tfds" else None,
    )


def _resolve_auto(data_dir: str | None) -> tuple[str, str | None]:
    """(source, data_dir) that "auto" means (see `describe`)."""
    if data_dir is not None:
        if not _isdir(data_dir):
            raise UserError(f"--data_dir={data_dir}: no such folder")
        found = find_source(data_dir)
        if found is None:
            raise UserError(
                f"--data_dir={data_dir}: no known data set found: looked for "
                f"MNIST IDX files ({', '.join(_idx_names())}) and ImageNet "
                f"TFRecords ({', '.join(RECORD_PATTERNS.values())})"
            )
        return found, data_dir
    mnist_dir = default_data_dir("mnist")
    if _isdir(mnist_dir):
        return "mnist", mnist_dir
    return "synthetic", None


def _idx_names() -> list[str]:
    return [name for names in IDX_FILES.values() for name in names]


def _describe_idx(source: str, data_dir: str) -> Source:
    """MNIST-format facts, with the example counts read from the file headers."""
    _require_dir(data_dir, source)
    missing = [
        name for name in _idx_names() if not _exists(os.path.join(data_dir, name))
    ]
    if missing:
        what = "no IDX files" if len(missing) == len(_idx_names()) else "missing"
        raise UserError(
            f"--data_dir={data_dir}: {what} {', '.join(missing)} (--source={source} "
            f"reads the standard files {', '.join(_idx_names())}; nothing is "
            "downloaded)"
        )
    counts = {}
    for split, names in IDX_FILES.items():
        shapes = [idx_shape(os.path.join(data_dir, name)) for name in names]
        images, labels = shapes
        if len(images) != 3 or len(labels) != 1 or images[0] != labels[0]:
            raise UserError(
                f"{os.path.join(data_dir, names[0])}: shape {images} does not "
                f"match {names[1]}'s {labels} (expected [N, rows, cols] and [N])"
            )
        counts[split] = images[0]
    return dataclasses.replace(
        SOURCES[source],
        train_examples=counts["train"],
        eval_examples=counts["validation"],
    )


def idx_shape(path: str) -> tuple[int, ...]:
    """The shape in an IDX file's header (gzipped or not), reading only the
    header; raises UserError naming the file when it is not an IDX file of
    unsigned bytes (the type MNIST and Fashion-MNIST use)."""
    return _read_idx(path, header_only=True)[0]


def read_idx(path: str) -> "numpy.ndarray":  # noqa: F821  (imported inside)
    """An IDX file (gzipped or not) as a NumPy array of its stored shape.

    Supports the unsigned-byte type (0x08) that MNIST and Fashion-MNIST use;
    raises UserError naming the file when it is unreadable or inconsistent.
    """
    import numpy as np  # Here, not at the top: the flag checks read headers only.

    shape, data = _read_idx(path, header_only=False)
    expected = math.prod(shape)
    if len(data) != expected:
        raise UserError(
            f"{path}: header says shape {shape} ({expected} bytes), the file "
            f"has {len(data)} bytes of data"
        )
    return np.frombuffer(data, np.uint8).reshape(shape)


def _read_idx(path: str, header_only: bool) -> tuple[tuple[int, ...], bytes]:
    """(shape, data bytes) of an IDX file; no data bytes ``header_only``."""
    try:
        with open_binary(path) as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
            magic = stream.read(4)
            if len(magic) < 4 or magic[:2] != b"\0\0":
                raise UserError(f"{path}: not an IDX file (bad magic number)")
            if magic[2] != 0x08:
                raise UserError(
                    f"{path}: IDX type {magic[2]:#x} is not unsigned bytes (0x08)"
                )
            header = stream.read(4 * magic[3])
            if len(header) < 4 * magic[3]:
                raise UserError(f"{path}: truncated IDX header")
            data = b"" if header_only else stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{path}: unreadable ({_reason(error)})") from None
    except Exception as error:  # TensorFlow's file system errors (URLs).
        if type(error).__module__.startswith("tensorflow"):
            raise UserError(f"{path}: unreadable ({_reason(error)})") from None
        raise
    shape = tuple(
        int.from_bytes(header[i : i + 4], "big") for i in range(0, len(header), 4)
    )
    return shape, data


def _describe_imagenet(data_dir: str, label_offset: int | None) -> Source:
    """ImageNet facts; counts and classes from ``dataset_info.json`` if present."""
    _require_dir(data_dir, "imagenet")
    if not any(
        _glob(os.path.join(data_dir, pattern)) for pattern in RECORD_PATTERNS.values()
    ):
        raise UserError(
            f"--data_dir={data_dir}: no ImageNet TFRecords "
            f"({' or '.join(RECORD_PATTERNS.values())}; write them with "
            "`python -m train.convert_images`)"
        )
    facts = SOURCES["imagenet"]
    info_path = os.path.join(data_dir, INFO_FILENAME)
    if _exists(info_path):
        try:
            with open_binary(info_path) as file:
                stored = json.load(file)
            facts = dataclasses.replace(
                facts,
                num_classes=int(stored["num_classes"]),
                train_examples=int(stored["num_examples"].get("train", 0)),
                eval_examples=int(stored["num_examples"].get("validation", 0)),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(
                f"{info_path}: unreadable ({_reason(error)}); rewrite it with "
                "`python -m train.convert_images` or remove it"
            ) from None
    if label_offset is None:
        label_offset = facts.label_offset
    if label_offset not in (0, 1):
        raise UserError(f"label_offset={label_offset}: must be 0 or 1 for imagenet")
    # Offset 0 keeps the stored 1-based labels: one more class (0, unused).
    return dataclasses.replace(
        facts,
        num_classes=facts.num_classes + 1 - label_offset,
        label_offset=label_offset,
        train_files=len(_glob(os.path.join(data_dir, RECORD_PATTERNS["train"]))),
    )


def _describe_tfds(name: str, data_dir: str | None) -> Source:
    """Facts of a prepared TFDS dataset, from its builder (imports TFDS)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # TFDS raises many kinds for unknown names.
        raise UserError(f"--tfds_name={name}: {_reason(error)}") from None
    if not builder.is_prepared():
        raise UserError(
            f"--tfds_name={name}: not prepared in {builder.data_dir} "
            f"(--data_dir={data_dir}); prepare it first (docs/data.md): this app "
            "never downloads"
        )
    info = builder.info
    eval_split = "validation" if "validation" in info.splits else "test"
    channels = info.features["image"].shape[-1]
    facts = dataclasses.replace(
        SOURCES["tfds"],
        num_classes=info.features["label"].num_classes,
        channels=channels,
        train_examples=info.splits["train"].num_examples,
        eval_examples=info.splits[eval_split].num_examples,
    )
    if channels == 1 and name in ("mnist", "fashion_mnist"):  # Their own stats.
        facts = dataclasses.replace(
            facts, mean=SOURCES[name].mean, std=SOURCES[name].std
        )
    elif channels == 1:  # Other grey data: ImageNet's, averaged over channels.
        facts = dataclasses.replace(
            facts, mean=(sum(facts.mean) / 3,), std=(sum(facts.std) / 3,)
        )
    return facts


def count_records(path: str) -> int:
    """The number of records in a TFRecord file, checking its framing.

    A record is a little-endian uint64 data length, the masked CRC32C of those
    8 bytes, the data, and the data's masked CRC32C. This walks the lengths and
    checks their checksums without reading the data (one small read per
    record), so it finds truncated files, garbage and files of another format;
    a damaged byte inside a record's data is found only when it is read.

    TensorFlow's own readers (`tf.data.TFRecordDataset`,
    `tf.compat.v1.io.tf_record_iterator`) raise `DataLossError` on the same
    faults, but only by reading all of the data, and their messages do not
    name the file; this walk reads 12 bytes per record (docs/data.md has the
    cost of both), so a pipeline can check its files before its first step,
    ImageNet's included. Its count is also what names a file whose data fails
    its checksum later ("not all of its N records could be read"), which a
    reader that stops at the bad record cannot give. The checksum is
    TensorBoard's, the one its event-file writer frames records with.

    Raises:
      UserError: naming the file and what is wrong with it.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    offset = count = 0
    try:
        with open_binary(path, buffered=False) as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            while offset < size:
                file.seek(offset)
                header = file.read(12)
                if len(header) < 12:
                    raise UserError(
                        f"{path}: truncated TFRecord file: {size} bytes end inside "
                        f"the header of record {count} (at byte {offset})"
                    )
                length, length_crc = struct.unpack("<QI", header)
                if masked_crc32c(header[:8]) != length_crc:
                    if count == 0:
                        raise UserError(
                            f"{path}: not a TFRecord file (no valid record header "
                            "at its start)"
                        )
                    raise UserError(
                        f"{path}: corrupted TFRecord file: the header of record "
                        f"{count} (at byte {offset}) fails its checksum"
                    )
                offset += 12 + length + 4
                count += 1
    except OSError as error:
        raise UserError(f"{path}: unreadable ({_reason(error)})") from None
    except Exception as error:  # TensorFlow's file system errors (URLs).
        if type(error).__module__.startswith("tensorflow"):
            raise UserError(f"{path}: unreadable ({_reason(error)})") from None
        raise
    if offset > size:
        raise UserError(
            f"{path}: truncated TFRecord file: record {count - 1} ends at byte "
            f"{offset}, the file has {size} bytes"
        )
    return count


def _require_dir(data_dir: str | None, source: str) -> None:
    if not data_dir or not _isdir(data_dir):
        raise UserError(
            f"--data_dir={data_dir}: no such folder (needed by --source={source}; "
            "nothing is downloaded)"
        )


def _reason(error: Exception) -> str:
    """An exception as a short phrase (its type when it has no message)."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# Local paths use the standard library; URLs (gs://, s3://, ...) TensorFlow's
# file system, imported only for them.
def _is_url(path: str) -> bool:
    return "://" in path


def _isdir(path: str) -> bool:
    if _is_url(path):
        import tensorflow as tf

        return tf.io.gfile.isdir(path)
    return os.path.isdir(path)


def _exists(path: str) -> bool:
    if _is_url(path):
        import tensorflow as tf

        return tf.io.gfile.exists(path)
    return os.path.isfile(path)


def _glob(pattern: str) -> list[str]:
    if _is_url(pattern):
        import tensorflow as tf

        return sorted(tf.io.gfile.glob(pattern))
    return sorted(glob.glob(pattern))


def open_binary(path: str, buffered: bool = True):
    """A binary file object of a local path or URL; unbuffered local files suit
    many small reads at scattered offsets."""
    if _is_url(path):
        import tensorflow as tf

        return tf.io.gfile.GFile(path, "rb")
    return open(path, "rb", buffering=-1 if buffered else 0)
