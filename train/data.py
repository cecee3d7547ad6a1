"""Input pipelines: a data source's files to batches of (image, label).

`make_input_fn` returns an `InputFn`, the callable that
`strategy.distribute_datasets_from_function` takes. Each call builds one input
pipeline: its share of the files (of the examples, when there are fewer files
than pipelines), a seeded shuffle and repeat for training, preprocessing that
decodes only the crop window of a JPEG (`train.preprocessing`), and batches of
the per-replica size: uint8 pixels (``dtype="uint8"``, what the app uses; its
steps call `normalize` on the device), or normalized per channel and cast to a
float dtype. With ``data_service`` the training batches are made by the
workers of a tf.data service (`train.data_service`).
The facts of each source (classes, sizes, normalization) come from
`train.sources`.

Integrity: before a pipeline reads TFRecord files it checks their framing
(`sources.count_records`), so a truncated, garbage or foreign file stops the
run with a `train.UserError` naming it before its first use. A record whose
image does not decode is skipped, named on stderr and counted
(`InputFn.skipped_records`); more than ``max_skipped_records`` distinct ones
stop the pipeline. Errors raised inside a running pipeline reach the caller as
`tf.errors.OpError`; `user_error` turns those about the data into a
`train.UserError`.

Order: with a fixed seed and ``deterministic=True`` two runs give the same
examples in the same order with the same augmentation (random ops are
stateless and seeded per example), and batches do not depend on the number of
input pipelines: every pipeline reads the same record stream (shuffled for
training) and keeps every n-th batch of it, undecoded; so each replica gets the
same batches under one input pipeline for all (MirroredStrategy) as under one
per worker (MultiWorkerMirroredStrategy), evaluation's included.

Held-out split (`Holdout`): split "holdout" is a fixed random part of the
training set, read and preprocessed as the validation split is, and a
training pipeline given the same `Holdout` never reads it. An example's part
depends only on its position in the split's record order (TFRecord files
sorted by name, records in file order; IDX images in order) and the holdout's
seed, so it is the same for every pipeline, replica count and run.
"""

import dataclasses
import functools
import os
import re
import sys
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.python.ops import resource_variable_ops

from train import (
    UserError,
    data_service,
    preprocessing,
    sources,
)

# Image dtypes a pipeline delivers: normalized floats, or "uint8": the
# preprocessed pixels, 4x fewer bytes to the device than float32, for
# `normalize` inside the model's step.
DTYPES = ("float32", "bfloat16", "float16", "uint8")
RECORD_BUFFER_BYTES = 8 << 20
# Starts the message of every error a pipeline raises about its data, so that
# `user_error` can tell them from our own bugs. A marker in the message, not a
# type: an error raised inside a tf.data pipeline reaches Python as an OpError
# that holds only its code and message (its op, node_def and payloads are
# empty), a status being what TensorFlow passes between its threads and from
# tf.data service workers. The code does not tell either: `tf.debugging.Assert`
# raises InvalidArgumentError, as many bugs do.
_DATA_ERROR = "[input data] "
# How many records before each one a pipeline remembers, to name those that
# fail to decode.
_NAMES_KEPT = 8
# Record keys are file number * _FILE_KEY + record number in the file.
_FILE_KEY = 1 << 40
# "a data file is gone: PATH (it held N records when ...": the message of the
# pipeline's check and of `InputFn.check_files`.
_GONE = (
    "a data file is gone:",
    "records when the run started; put it back and resume, or train on the "
    "files left in a new --model_dir)",
)
# The same for a file that is there but does not open (permissions, ...).
_SHUT = (
    "a data file cannot be opened:",
    "records when the run started; make it readable and resume, or train on "
    "the files left in a new --model_dir)",
)


def user_error(error: tf.errors.OpError) -> UserError | None:
    """The `train.UserError` of an error a pipeline raised about its data (a
    corrupted file, too many undecodable images, a label out of range); None
    for any other error, which is a bug to show with its traceback."""
    message = error.message
    if _DATA_ERROR in message:
        text = message[message.index(_DATA_ERROR) + len(_DATA_ERROR) :]
        text = text.split("\n")[0].split(" [[")[0]
        return UserError(re.sub(r"\] \[", " ", text).rstrip("]"))
    if isinstance(error, tf.errors.DataLossError):  # Read outside our checks.
        return UserError(f"input data: a file is corrupted ({message.splitlines()[0]})")
    return None


def normalize(
    images: tf.Tensor, source: sources.Source, dtype: str = "float32"
) -> tf.Tensor:
    """Images of a ``dtype="uint8"`` pipeline, normalized with the source's
    per-channel mean and standard deviation and cast to ``dtype``: the step a
    float pipeline does on the host, for the accelerator to do instead."""
    return preprocessing.normalize(images, source.mean, source.std, dtype)


# ----------------------------------------------------------------------------
# Settings and the input function


@dataclasses.dataclass(frozen=True)
class Holdout:
    """A held-out `fraction` of the training set, chosen by `seed`."""

    fraction: float = 0.0
    seed: int = 0

    def size(self, num_examples: int) -> int:
        """How many of `num_examples` are held out: round(fraction * n)."""
        return round(self.fraction * num_examples)

    def mask(self, num_examples: int) -> np.ndarray:
        """[num_examples] bool, True for the held-out positions: the first
        `size` of a seeded permutation (the large-batch study's split)."""
        order = np.random.default_rng(self.seed).permutation(num_examples)
        held_out = np.zeros(num_examples, bool)
        held_out[order[: self.size(num_examples)]] = True
        return held_out


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a pipeline reads and preprocesses; see `make_input_fn`."""

    split: str
    global_batch_size: int
    image_size: int
    augmentation: str
    dtype: str = "float32"
    seed: int | None = None
    cache: bool = False
    deterministic: bool = False
    crop_fraction: float | None = None
    shuffle_buffer_size: int = 10_000
    max_skipped_records: int = 10
    data_service: str | None = None
    holdout: Holdout = Holdout()

    def __post_init__(self):
        if self.split not in (*sources.SPLITS, "holdout"):
            raise ValueError(
                f"split must be one of {sources.SPLITS} or holdout, got {self.split!r}"
            )
        if self.split == "holdout" and not self.holdout.fraction:
            raise ValueError("split holdout needs a holdout fraction > 0")
        if self.augmentation not in preprocessing.AUGMENTATIONS:
            raise ValueError(
                f"augmentation must be one of {preprocessing.AUGMENTATIONS}, "
                f"got {self.augmentation!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_skipped_records < 0:
            raise ValueError(
                f"max_skipped_records must be >= 0: {self.max_skipped_records}"
            )

    @property
    def training(self) -> bool:
        return self.split == "train"

    @property
    def read_split(self) -> str:
        """The source's split whose files this pipeline reads."""
        return "train" if self.split == "holdout" else self.split


def make_input_fn(
    *,
    source: str | sources.Source,
    split: str,
    data_dir: str | None = None,
    global_batch_size: int,
    image_size: int | None = None,
    augmentation: str | None = None,
    dtype: str = "float32",
    seed: int | None = None,
    tfds_name: str | None = None,
    label_offset: int | None = None,
    num_classes: int | None = None,
    cache: bool = False,
    deterministic: bool = False,
    crop_fraction: float | None = None,
    shuffle_buffer_size: int = 10_000,
    max_skipped_records: int = 10,
    data_service: str | None = None,
    holdout: Holdout | None = None,
) -> "InputFn":
    """An `InputFn` for ``strategy.distribute_datasets_from_function``.

    Args:
      source: a name of ``sources.SOURCE_NAMES`` (resolved with
        `sources.describe` from ``data_dir``, ``tfds_name``, ``label_offset``),
        or the `sources.Source` a caller resolved already.
      split: "train" (shuffled, repeated, augmented, full batches only) or
        "validation" (one pass in file order, center crop, last batch partial).
      data_dir, image_size, augmentation: the folder of the source's files,
        output height and width, and "none", "minimal" or "extended"
        (`train.preprocessing`); defaults: the source's.
      global_batch_size: the batch over all replicas.
      dtype: image dtype: "float32", "bfloat16" or "float16" (normalized), or
        "uint8": the pixels, for `normalize` in the model's step.
      seed: shuffle and augmentation seed (offset by the pipeline id).
      tfds_name: the TFDS dataset name for source "tfds".
      label_offset: "imagenet": 1 (default) reads its 1-based labels as
        0..999; 0 keeps them (1001 classes).
      num_classes: labels lie in [0, num_classes) after the offset (default:
        the source's).
      cache: keep the decoded images in memory after the first pass (small
        datasets); later epochs shuffle them in the first epoch's file order.
      deterministic: keep element order fixed through parallel stages, and
        batches independent of the number of input pipelines.
      crop_fraction: evaluation center-crop fraction; default 0.875 for JPEG
        sources, 1.0 (no crop) for decoded ones (MNIST).
      shuffle_buffer_size: examples in the shuffle buffer. max_skipped_records:
        distinct undecodable records that may be skipped (one more stops it).
      data_service: ``grpc://HOST:PORT`` of a tf.data service dispatcher
        (`train.data_service`) whose workers make the training batches (a job
        per pipeline over its files; they count their skipped records, this
        `InputFn` does not); evaluation's one pass stays in this process.
      holdout: the training set's held-out part: split "train" leaves it out,
        split "holdout" is it (one pass, as "validation"). Not for "tfds".
    """
    if isinstance(source, str):
        source = sources.describe(
            source, data_dir, tfds_name, label_offset=label_offset
        )
    if num_classes:
        source = dataclasses.replace(source, num_classes=num_classes)
    return InputFn(
        source,
        Settings(
            split=split,
            global_batch_size=global_batch_size,
            image_size=image_size or source.image_size,
            augmentation=augmentation or source.default_augmentation,
            dtype=dtype,
            seed=seed,
            cache=cache,
            deterministic=deterministic,
            crop_fraction=crop_fraction,
            shuffle_buffer_size=shuffle_buffer_size,
            max_skipped_records=max_skipped_records,
            data_service=data_service,
            holdout=holdout or Holdout(),
        ),
    )


@dataclasses.dataclass(frozen=True)
class _Records:
    """One pipeline's examples before preprocessing, and how to name them.

    An example is (payload, meta): the payload holds what `InputFn._unpack`
    decodes; meta has the record's ``key``, whether it marks the ``end`` of a
    file, and there how many records the file's framing holds (``expected``,
    -1: unknown). ``record_names`` and ``file_names`` turn keys into names.
    """

    examples: tf.data.Dataset
    is_encoded: bool
    record_names: Callable[[tf.Tensor], tf.Tensor]
    file_names: Callable[[tf.Tensor], tf.Tensor]
    no_key: np.generic  # The key dtype's zero.
    counted_files: bool = False  # End markers carry the counts to check.
    # Keys -> positions in the split's record order, and how many there are
    # (for the held-out split; None: not available).
    positions: Callable[[tf.Tensor], tf.Tensor] | None = None
    num_examples: int | None = None


def parse_image_record(
    record: tf.Tensor, with_boxes: bool
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(encoded image, label, boxes [1, N, 4]) of a serialized record in the
    ImageNet TFRecord format; the boxes are parsed only ``with_boxes`` (else
    none: parsing them costs time the other crops do not need)."""
    features = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string, ""),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64, -1),
    }
    sides = ("ymin", "xmin", "ymax", "xmax")
    if with_boxes:
        for side in sides:
            features[f"image/object/bbox/{side}"] = tf.io.VarLenFeature(tf.float32)
    parsed = tf.io.parse_single_example(record, features)
    boxes = tf.zeros([1, 0, 4])
    if with_boxes:
        box_sides = [
            tf.sparse.to_dense(parsed[f"image/object/bbox/{side}"]) for side in sides
        ]
        boxes = tf.expand_dims(tf.stack(box_sides, axis=-1), 0)
    return parsed["image/encoded"], parsed["image/class/label"], boxes


class InputFn:
    """Builds one input pipeline per call; made by `make_input_fn`.

    Keeps, over all the pipelines it built, the names of the records skipped
    because their image did not decode (`skipped_records`), in host state that
    stays plain even when it is called inside a ``strategy.scope()``.
    """

    def __init__(self, source: sources.Source, settings: Settings):
        if settings.holdout.fraction and source.name == "tfds":
            raise ValueError(
                "a holdout split needs the imagenet, IDX or synthetic source"
            )
        self.source = source
        self.settings = settings
        self._record_counts: dict[str, int] = {}  # Files checked, by path.
        self._skipped = None  # Name -> 1 of each record skipped.
        self._unnamed = None  # Records skipped too close together to name.

    def skipped_records(self) -> int:
        """Distinct records skipped so far because their image did not decode."""
        if self._skipped is None:
            return 0
        return int(self._skipped.size().numpy() + self._unnamed.numpy())

    def skipped_record_names(self) -> list[str]:
        """'file record N' of each record skipped so far (sorted)."""
        if self._skipped is None:
            return []
        names, _ = self._skipped.export()
        return sorted(name.decode() for name in names.numpy())

    def check_files(self) -> None:
        """Raises `train.UserError` naming the first local file this function's
        pipelines read that is gone since, between the training loops: a file
        deleted while open reads on to its end, so the pipeline itself sees it
        only when it opens it again, in the next epoch. (Remote files are left
        to the pipeline: a look costs a round trip each.)"""
        for path, count in self._record_counts.items():
            if "://" in path:
                continue
            if not os.path.exists(path):
                raise UserError(f"{_GONE[0]} {path} (it held {count} {_GONE[1]}")
            try:  # Not blocking: a FIFO put in a file's place would block.
                os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
            except OSError as error:
                raise UserError(
                    f"{_SHUT[0]} {path} ({error.strerror}; it held {count} {_SHUT[1]}"
                ) from None

    # Not converted by AutoGraph: the pipeline's functions branch with tf.cond,
    # never with Python control flow on tensors, so converting them would only
    # lengthen the run's start-up.
    @tf.autograph.experimental.do_not_convert
    def __call__(
        self,
        input_context: tf.distribute.InputContext | None = None,
        skip_batches: int = 0,
    ) -> tf.data.Dataset:
        """This pipeline's dataset, starting after its first ``skip_batches``
        batches (a resumed run). They are skipped as undecoded records, so
        resuming costs reading, not decoding; the batches that follow are those
        an unskipped pipeline gives next, unless records were skipped as
        undecodable before that point (each shifts the stream by one).

        With ``data_service`` set, training batches come from the service's
        workers, which run this same pipeline: a job of its own for each call
        (``job_name`` None), split by files over the workers."""
        batches = self._build(input_context, skip_batches)
        if self.settings.training and self.settings.data_service:
            batches = data_service.distribute(batches, self.settings.data_service)
            batches = batches.prefetch(tf.data.AUTOTUNE)
        if self.settings.training:
            # Endless (shuffled and repeated), and said to be: for a stream of
            # unknown length (after a filter) MultiWorkerMirroredStrategy's
            # iterator makes the batch size unknown to the step, whose traced
            # graph then rounds differently from a mirrored one (grappler
            # folds a known size's reductions), e.g. BatchNormalization's.
            batches = batches.apply(
                tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY)
            )
        return batches

    def _build(
        self, input_context: tf.distribute.InputContext | None, skip_batches: int
    ) -> tf.data.Dataset:
        settings = self.settings
        if input_context is None:
            batch_size = settings.global_batch_size
        else:
            batch_size = input_context.get_per_replica_batch_size(
                settings.global_batch_size
            )
        num_pipelines, pipeline_id = _pipeline(input_context)
        # Deterministic batches do not depend on the number of input pipelines
        # (module docstring): all read one stream, each keeps its share.
        step_aligned = settings.deterministic and num_pipelines > 1
        if step_aligned:
            input_context, seed = None, settings.seed
        else:  # Different pipelines must not draw the same random numbers.
            seed = None if settings.seed is None else settings.seed + pipeline_id
        if self.source.name == "synthetic":  # Its batches are all alike: no skip.
            return self._synthetic(batch_size, seed, num_pipelines, pipeline_id)

        records = self._read(input_context, seed)
        examples = self._select(records)
        # --cache keeps the decoded images: the per-example work of reading
        # (parsing, decoding, naming skipped records) cost more CPU than
        # training a small net on 32x32 images, every epoch.
        decode_once = settings.cache and records.is_encoded
        if decode_once:
            examples = self._decode_once(examples, records)
        examples = self._shuffle(examples, seed)
        keep = (pipeline_id, num_pipelines) if step_aligned else (0, 1)
        examples = self._keep(examples, batch_size, skip_batches, keep)
        if records.is_encoded and not decode_once:
            examples = self._decode_skipping_bad(examples, records)
        else:  # Decoded images in memory: nothing can fail to decode.
            examples = examples.map(
                lambda example, seed_pair: self._checked(
                    *self._decoded(example, seed_pair, False, records.is_encoded),
                    example[1],
                    records,
                ),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=settings.deterministic,
            )
        if decode_once:
            examples = examples.filter(lambda image, label, is_end: ~is_end)
        return self._batch(examples, batch_size)

    # -- Reading ------------------------------------------------------------

    def _read(
        self, input_context: tf.distribute.InputContext | None, seed: int | None
    ) -> _Records:
        if self.source.name == "imagenet":
            return self._read_records(input_context, seed)
        if self.source.name == "tfds":
            return self._read_tfds(input_context, seed)
        return self._read_idx(input_context)

    def _read_records(
        self, input_context: tf.distribute.InputContext | None, seed: int | None
    ) -> _Records:
        """The split's TFRecords of this pipeline, each file followed by an end
        marker: a record, decodable like the others, that carries the count."""
        split = self.settings.read_split
        all_files = list_record_files(self.source.data_dir, split)
        files, by_files = _share_files(all_files, input_context, f"{split} files")
        counts = [self._count_records(path) for path in files]
        positions = num_examples = None
        if self.settings.holdout.fraction:  # Positions over all the files.
            all_counts = [self._count_records(path) for path in all_files]
            starts = dict(zip(all_files, np.cumsum([0] + all_counts[:-1])))
            first = tf.constant([starts[path] for path in files], tf.int64)
            num_examples = sum(all_counts)

            def positions(keys):
                return tf.gather(first, keys // _FILE_KEY) + keys % _FILE_KEY

        file_ids = tf.data.Dataset.from_tensor_slices(
            (tf.range(len(files), dtype=tf.int64), files, counts)
        )
        if self.settings.training:
            file_ids = file_ids.shuffle(len(files), seed=seed)
        end_record = self._end_record()

        def read_file(file_id, path, expected):
            # A file gone since the start, or there but not opening, reads as
            # empty, and its end marker reports it: TFRecordDataset retries a
            # failed open without moving on, and `ignore_errors` after the
            # decode would retry it for ever (the run would hang).
            present = tf.io.matching_files(_glob_escaped(path))
            present = tf.boolean_mask(present, tf.fill(tf.shape(present), _opens(path)))
            records = tf.data.TFRecordDataset(present, buffer_size=RECORD_BUFFER_BYTES)
            records = records.concatenate(tf.data.Dataset.from_tensors(end_record))
            meta = {"end": tf.constant(False), "expected": tf.cast(expected, tf.int64)}
            return records.scan(
                file_id * _FILE_KEY,  # The key of the next record.
                lambda key, record: (
                    key + 1,
                    ({"record": record}, dict(meta, key=key, end=record == end_record)),
                ),
            )

        examples = file_ids.interleave(
            read_file,
            cycle_length=min(len(files), 16),
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            # Pipelines sharing files share their examples by position in one
            # order; in orders of their own they would miss or repeat some.
            deterministic=self.settings.deterministic or not by_files,
        )
        if not by_files:
            examples = _shard_examples(examples, input_context)
        paths = tf.constant(files)
        return _Records(
            examples,
            is_encoded=True,
            record_names=lambda keys: tf.strings.join(
                [
                    tf.gather(paths, keys // _FILE_KEY),
                    " record ",
                    tf.strings.as_string(keys % _FILE_KEY),
                ]
            ),
            file_names=lambda keys: tf.gather(paths, keys // _FILE_KEY),
            no_key=np.int64(0),
            counted_files=True,
            positions=positions,
            num_examples=num_examples,
        )

    def _end_record(self) -> tf.Tensor:
        """A serialized Example of a 1x1 JPEG that marks the end of a file."""
        pixel = tf.zeros([1, 1, self.source.channels], tf.uint8)
        feature = {
            "image/encoded": tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[tf.io.encode_jpeg(pixel).numpy()])
            ),
            "image/class/label": tf.train.Feature(
                int64_list=tf.train.Int64List(value=[self.source.label_offset])
            ),
            "image/class/text": tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[b"end of file"])
            ),
        }
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        return tf.constant(example.SerializeToString())

    def _count_records(self, path: str) -> int:
        if path not in self._record_counts:
            self._record_counts[path] = sources.count_records(path)
        return self._record_counts[path]

    def _read_tfds(
        self, input_context: tf.distribute.InputContext | None, seed: int | None
    ) -> _Records:
        import tensorflow_datasets as tfds  # Slow to import: only when used.

        builder = tfds.builder(self.source.tfds_name, data_dir=self.source.data_dir)
        split = _tfds_split(builder, self.settings.read_split)
        image_feature = builder.info.features["image"]
        is_encoded = getattr(image_feature, "encoding_format", None) == "jpeg"
        own_files, by_files = _share_files(
            [str(path) for path in builder.info.splits[split].filepaths],
            input_context,
            f"{self.source.tfds_name} {split} files",
        )
        if builder.info.file_format.value == "tfrecord":
            for path in own_files:
                if tf.io.gfile.exists(path):  # Else TFDS says what is missing.
                    self._count_records(path)
        read_config = tfds.ReadConfig(
            input_context=input_context if by_files else None,
            shuffle_seed=seed,
            interleave_cycle_length=16,
            skip_prefetch=True,
            add_tfds_id=True,
        )
        read_config.options.deterministic = self.settings.deterministic
        examples = builder.as_dataset(
            split=split,
            shuffle_files=self.settings.training,
            decoders={"image": tfds.decode.SkipDecoding()} if is_encoded else None,
            read_config=read_config,
        )
        if not by_files:
            examples = _shard_examples(examples, input_context)
        name = f"tfds:{self.source.tfds_name}/{split}"

        def example(image, label, key, end=False):
            return {"image": image, "label": tf.cast(label, tf.int64)}, {
                "key": key,
                "end": tf.constant(end),
                "expected": tf.constant(-1, tf.int64),
            }

        examples = examples.map(
            lambda features: example(
                features["image"],
                features["label"],
                features.get("tfds_id", tf.constant(name)),
            )
        )
        if is_encoded:  # An end marker, so that trailing skips are named too.
            pixel = tf.zeros([1, 1, self.source.channels], tf.uint8)
            end = example(tf.io.encode_jpeg(pixel), 0, tf.constant(name), end=True)
            examples = examples.concatenate(tf.data.Dataset.from_tensors(end))
        return _Records(
            examples,
            is_encoded,
            record_names=lambda keys: keys,
            file_names=lambda keys: keys,
            no_key=np.bytes_(b""),
        )

    def _read_idx(self, input_context: tf.distribute.InputContext | None) -> _Records:
        split = self.settings.read_split
        images, labels = load_idx_split(self.source.data_dir, split)
        images_path = os.path.join(self.source.data_dir, sources.IDX_FILES[split][0])
        examples = tf.data.Dataset.from_tensor_slices((images, labels)).enumerate()
        examples = examples.map(
            lambda index, example: (
                {"image": example[0], "label": example[1]},
                {"key": index, "end": False, "expected": tf.constant(-1, tf.int64)},
            )
        )
        num_pipelines, pipeline_id = _pipeline(input_context)

        def record_names(keys):
            indices = tf.strings.as_string(keys)
            return tf.strings.join([images_path, " image ", indices])

        return _Records(
            examples.shard(num_pipelines, pipeline_id),  # In memory: no files.
            is_encoded=False,
            record_names=record_names,
            file_names=lambda keys: tf.fill(tf.shape(keys), images_path),
            no_key=np.int64(0),
            positions=lambda keys: keys,
            num_examples=len(labels),
        )

    # -- Order --------------------------------------------------------------

    def _select(self, records: _Records) -> tf.data.Dataset:
        """The examples of this pipeline's part of a held-out training set:
        training leaves the held-out ones out, "holdout" keeps only them. End
        markers always pass (their checks count what was read, not kept)."""
        holdout = self.settings.holdout
        if not holdout.fraction or self.settings.read_split != "train":
            return records.examples
        held_out = tf.constant(holdout.mask(records.num_examples))
        wanted = self.settings.split == "holdout"
        last = records.num_examples - 1

        def keep(payload, meta):
            position = tf.minimum(records.positions(meta["key"]), last)
            return meta["end"] | (tf.gather(held_out, position) == wanted)

        return records.examples.filter(keep)

    def _shuffle(self, examples: tf.data.Dataset, seed: int | None) -> tf.data.Dataset:
        """Cached, shuffled and repeated as the settings say, each example
        paired with its own [2] seed for the random ops."""
        settings = self.settings
        if settings.cache:
            examples = examples.cache()
        if settings.training:
            examples = examples.shuffle(settings.shuffle_buffer_size, seed=seed)
            examples = examples.repeat()
        example_seeds = tf.data.Dataset.random(seed=seed).batch(2)
        return tf.data.Dataset.zip((examples, example_seeds))

    def _keep(
        self,
        examples: tf.data.Dataset,
        batch_size: int,
        skip_batches: int,
        keep: tuple[int, int],
    ) -> tf.data.Dataset:
        """The examples this pipeline decodes: after the first ``skip_batches``
        of its batches, and of the shared stream only batch k with
        k % num_pipelines == pipeline_id (``keep``). End markers always pass."""
        pipeline_id, num_pipelines = keep
        first = skip_batches * num_pipelines * batch_size
        if not first and num_pipelines == 1:
            return examples

        def number(count, example_and_seed):  # Counts examples, not end markers.
            step = tf.where(example_and_seed[0][1]["end"], tf.constant(0, tf.int64), 1)
            return count + step, (count, example_and_seed)

        def wanted(index, example_and_seed):
            mine = (index // batch_size) % num_pipelines == pipeline_id
            is_end = example_and_seed[0][1]["end"]
            return tf.logical_or(is_end, tf.logical_and(index >= first, mine))

        return (
            examples.scan(tf.constant(0, tf.int64), number)
            .filter(wanted)
            .map(lambda _, example_and_seed: example_and_seed)
        )

    # -- Decoding -----------------------------------------------------------

    def _decode_once(self, examples: tf.data.Dataset, records: _Records):
        """The examples with their images decoded whole (not cropped), in
        order, skipping and naming those that do not decode as
        ``_decode_skipping_bad`` does: the payloads of decoded images. End
        markers stay in the stream (dropped after the shuffle), so that the
        shuffle and the examples' seeds are those of the records."""
        low = self.source.label_offset

        def decode(example, seed_pair):
            del seed_pair  # Cropping and augmentation come after the cache.
            encoded, label, boxes = self._unpack(example[0])
            image = tf.io.decode_image(
                encoded, channels=self.source.channels, expand_animations=False
            )
            return {"image": image, "boxes": boxes}, label

        no_seed = tf.zeros([2], tf.int64)
        examples = examples.map(lambda payload, meta: ((payload, meta), no_seed))
        decoded = self._decode_skipping_bad(examples, records, decode, with_meta=True)
        return decoded.map(
            lambda image, label, meta: (
                {**image, "label": tf.cast(label, tf.int64) + low},
                meta,
            )
        )

    def _decode_skipping_bad(
        self,
        examples: tf.data.Dataset,
        records: _Records,
        decode_fn: Callable | None = None,
        with_meta: bool = False,
    ) -> tf.data.Dataset:
        """Decoded examples, without those whose image fails to decode: they
        are named on stderr and counted, and more than ``max_skipped_records``
        distinct ones stop the pipeline. At each end marker, also checks that
        every record the file's framing holds was read.

        A failed decode can only be dropped (``ignore_errors``), which leaves
        no trace of it; so every example carries its position and the keys of
        the ``_NAMES_KEPT`` before it, the decode keeps the order, and a gap in
        the positions afterwards names what was dropped.

        ``decode_fn(example, seed_pair)``: (image, stored label), by default
        ``_decoded``'s crop; ``with_meta``: metas in place of end flags, ends kept.
        """
        decode_fn = decode_fn or functools.partial(self._decoded, is_encoded=True)
        self._make_skip_state()
        skipped, unnamed = self._skipped, self._unnamed

        def remember(state, example_and_seed):
            position, keys = state
            key = example_and_seed[0][1]["key"]
            state = (position + 1, tf.concat([keys[1:], [key]], 0))
            return state, (example_and_seed, position, keys)

        def decode(example_and_seed, position, keys_before):
            example, seed_pair = example_and_seed
            image, label = decode_fn(example, seed_pair)
            return image, label, example[1], position, keys_before

        def gap(last_position, element):
            """How many examples were dropped just before this one."""
            image, label, meta, position, keys_before = element
            return position, (
                image,
                label,
                meta,
                position - last_position - 1,
                keys_before,
            )

        def account(image, label, meta, dropped, keys_before):
            """Records what was dropped before this example; checks end markers
            and labels. Only an example after a gap or with a problem takes the
            slow branch. A map after `gap`'s scan, not in it: a failing check
            would leave the scan's state behind, and a pull after the error (a
            prefetch thread's) would see a gap and name a good record."""
            low = self.source.label_offset
            label_ok = (label >= low) & (label < low + self.source.num_classes)
            fine = (dropped == 0) & label_ok
            if records.counted_files:
                fine &= ~meta["end"] | (meta["key"] % _FILE_KEY == meta["expected"])

            def check():
                named = records.record_names(
                    keys_before[_NAMES_KEPT - tf.minimum(dropped, _NAMES_KEPT) :]
                )
                return self._check_example(
                    named, dropped, label, meta, records, skipped, unnamed
                )

            with tf.control_dependencies([tf.cond(fine, tf.no_op, check)]):
                image = tf.nest.map_structure(tf.identity, image)
                label = tf.cast(label - low, tf.int32)
                return image, label, meta if with_meta else meta["end"]

        start = (tf.constant(0, tf.int64), tf.fill([_NAMES_KEPT], records.no_key))
        examples = examples.scan(start, remember)
        examples = examples.map(
            decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        ).ignore_errors()
        examples = examples.scan(tf.constant(-1, tf.int64), gap).map(account)
        if with_meta:
            return examples
        return examples.filter(lambda image, label, is_end: tf.logical_not(is_end))

    def _decoded(self, example, seed_pair, is_encoded: bool, photo: bool | None = None):
        """(image, stored label) of one example; ``photo`` (default:
        ``is_encoded``) says whether it is a photograph (center-cropped for
        evaluation) or a small decoded image (not)."""
        image, label, boxes = self._unpack(example[0])
        settings = self.settings
        crop_fraction = settings.crop_fraction
        if crop_fraction is None:  # Small decoded images are not center-cropped.
            crop_fraction = 0.875 if (is_encoded if photo is None else photo) else 1.0
        image = preprocessing.preprocess_image(
            image,
            is_encoded=is_encoded,
            image_size=settings.image_size,
            training=settings.training,
            augmentation=settings.augmentation,
            bbox=boxes,
            seed=seed_pair,
            channels=self.source.channels,
            crop_fraction=crop_fraction,
        )
        if settings.dtype == "uint8":  # Rounded once, at the end.
            # No clip needed: a bilinear resize of uint8 pixels stays within
            # [0, 255] up to float error far below 0.5, and the colour
            # distortion clips its result to that range itself.
            image = tf.cast(tf.round(image), tf.uint8)
        return image, label

    def _checked(self, image, label, meta, records: _Records):
        """(image, 0-based int32 label, whether it is an end marker)."""
        low = self.source.label_offset
        label_ok = (label >= low) & (label < low + self.source.num_classes)
        checked = tf.cond(
            label_ok,
            tf.no_op,
            lambda: self._check_example(tf.fill([0], ""), 0, label, meta, records),
        )
        with tf.control_dependencies([checked]):
            return tf.identity(image), tf.cast(label - low, tf.int32), meta["end"]

    def _check_example(
        self,
        named,
        dropped,
        label,
        meta,
        records: _Records,
        skipped=None,
        unnamed=None,
    ):
        """Counts and names the records dropped before an example (``named``,
        ``dropped``), then stops the pipeline if more than
        ``max_skipped_records`` were, if the example is an end marker of a file
        not read to its end, or if its label is out of range."""
        limit = self.settings.max_skipped_records
        said = tf.no_op()
        if skipped is not None:
            record = tf.group(
                skipped.insert(named, tf.ones_like(named, tf.int64)),
                unnamed.assign_add(tf.maximum(dropped - _NAMES_KEPT, 0)),
            )
            with tf.control_dependencies([record]):
                total = skipped.size() + unnamed.read_value()
            said = tf.cond(
                dropped > 0,
                lambda: tf.print(
                    "Skipped records whose image does not decode:",
                    tf.strings.reduce_join(named, separator=", "),
                    "(skipped so far:",
                    total,
                    f"of at most {limit}, --max_skipped_records)",
                    output_stream=sys.stderr,
                ),
                tf.no_op,
            )
        low = self.source.label_offset
        high = low + self.source.num_classes
        checks = [
            (
                (label >= low) & (label < high),
                [
                    _DATA_ERROR + "label out of range:",
                    records.record_names(meta["key"]),
                    "has label",
                    label,
                    f"(allowed: {low}..{high - 1}, from label_offset={low} and "
                    f"num_classes={self.source.num_classes})",
                ],
            )
        ]
        if skipped is not None:
            checks.append(
                (
                    total <= limit,
                    [
                        f"{_DATA_ERROR}more than --max_skipped_records={limit} "
                        "records do not decode; the last:",
                        tf.strings.reduce_join(named[-1:]),
                    ],
                )
            )
        if records.counted_files:
            checks += _file_checks(meta, records)
        with tf.control_dependencies([said]):  # Named first, then stopped.
            return tf.group(
                [tf.debugging.Assert(ok, message) for ok, message in checks]
            )

    def _unpack(self, payload: dict) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(image, label, boxes [1, N, 4]) of a record's payload."""
        if "record" not in payload:
            boxes = payload.get("boxes", tf.zeros([1, 0, 4]))
            return payload["image"], payload["label"], boxes
        # Only the "extended" training crop reads the boxes.
        with_boxes = self.settings.training and self.settings.augmentation == "extended"
        return parse_image_record(payload["record"], with_boxes)

    # -- Batches --------------------------------------------------------------

    def _batch(self, examples: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
        settings = self.settings
        batches = examples.batch(batch_size, drop_remainder=settings.training)
        if settings.dtype == "uint8":  # Normalized in the model's step.
            return self._finish(batches.map(lambda images, labels, _: (images, labels)))
        batches = batches.map(
            lambda images, labels, _: (
                preprocessing.normalize(
                    images, self.source.mean, self.source.std, settings.dtype
                ),
                labels,
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=settings.deterministic,
        )
        return self._finish(batches)

    def _finish(self, batches: tf.data.Dataset) -> tf.data.Dataset:
        settings = self.settings
        batches = batches.prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.deterministic = settings.deterministic
        options.experimental_optimization.map_parallelization = True
        # Parallelism comes from the parallel map; ops inside one example's
        # function run inline rather than handing tiny ops to the shared pool.
        options.threading.max_intra_op_parallelism = 1
        return batches.with_options(options)

    def _make_skip_state(self) -> None:
        # Plain host state even under a strategy's scope: constructing
        # ResourceVariable directly skips the variable creators through which
        # a strategy would make mirrored copies (whose counts would be wrong).
        if self._skipped is None:
            with tf.init_scope(), tf.device("/cpu:0"):
                self._skipped = tf.lookup.experimental.MutableHashTable(
                    tf.string, tf.int64, default_value=0
                )
                self._unnamed = resource_variable_ops.ResourceVariable(
                    0, dtype=tf.int64, trainable=False
                )

    def _synthetic(
        self, batch_size: int, seed: int | None, num_pipelines: int, pipeline_id: int
    ) -> tf.data.Dataset:
        """One random batch, made once and repeated: it costs nothing per step.
        Evaluation gives this pipeline's share of the source's examples."""
        settings, source = self.settings, self.source
        shape = [batch_size, settings.image_size, settings.image_size, source.channels]
        seed_pair = [0 if seed is None else seed, 0]

        def random_batch(_):
            image_seed, label_seed = tf.unstack(
                tf.random.experimental.stateless_split(seed_pair, 2)
            )
            if settings.dtype == "uint8":
                images = tf.random.stateless_uniform(
                    shape, image_seed, 0, 256, dtype=tf.int32
                )
            else:
                images = tf.random.stateless_truncated_normal(shape, image_seed)
            labels = tf.random.stateless_uniform(
                [batch_size], label_seed, 0, source.num_classes, dtype=tf.int32
            )
            return tf.cast(images, settings.dtype), labels

        batch = tf.data.Dataset.range(1).map(random_batch).cache()
        if settings.training:
            return batch.repeat().prefetch(tf.data.AUTOTUNE)
        # Batch k of the whole evaluation stream is pipeline k % n's, as the
        # files' batches are under --deterministic.
        count = source.eval_examples
        if settings.split == "holdout":  # Its examples are all alike too.
            count = settings.holdout.size(source.train_examples)
        full_batches, rest = divmod(count, batch_size)
        if full_batches % num_pipelines != pipeline_id:
            rest = 0
        batches = batch.repeat(len(range(pipeline_id, full_batches, num_pipelines)))
        if rest:
            last = batch.map(lambda images, labels: (images[:rest], labels[:rest]))
            batches = batches.concatenate(last)
        return batches


# ----------------------------------------------------------------------------
# Files and sharding


def list_record_files(data_dir: str | None, split: str) -> list[str]:
    """The split's TFRecord files, sorted; a UserError naming the folder."""
    pattern = sources.RECORD_PATTERNS[split]
    if not data_dir or not tf.io.gfile.isdir(data_dir):
        raise UserError(
            f"--data_dir={data_dir}: no such folder (ImageNet TFRecords "
            f"{' and '.join(sources.RECORD_PATTERNS.values())} expected there)"
        )
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, pattern)))
    if not files:
        raise UserError(
            f"--data_dir={data_dir}: no {split} files matching {pattern} (the "
            f"standard layout: {' and '.join(sources.RECORD_PATTERNS.values())})"
        )
    return files


def _glob_escaped(path: tf.Tensor) -> tf.Tensor:
    """``path`` as a `tf.io.matching_files` pattern that matches only itself."""
    return tf.strings.regex_replace(path, r"([*?\[\\])", r"\\\1")


def _opens(path: tf.Tensor) -> tf.Tensor:
    """Whether the file `path` opens and reads (its first byte), as a bool,
    never an error: the failed read of a one-element dataset is dropped by its
    `ignore_errors`, which then finds the dataset at its end."""

    def first_byte(path):
        read = tf.data.FixedLengthRecordDataset(path, 1, buffer_size=1).take(1)
        with tf.control_dependencies([read.reduce(np.int64(0), lambda n, _: n)]):
            return tf.constant(True)

    opened = tf.data.Dataset.from_tensors(path).map(first_byte).ignore_errors()
    return opened.reduce(tf.constant(False), lambda _, opens: opens)


def _file_checks(meta: dict, records: _Records) -> list:
    """(ok, message) checks of an end marker: its file was read whole, or it
    is gone since the run checked it, or it does not open, or a record failed
    its checksum."""
    complete = ~meta["end"] | (meta["key"] % _FILE_KEY == meta["expected"])
    path = records.file_names(meta["key"])
    gone = tf.cond(
        complete,
        lambda: tf.constant(False),
        lambda: tf.size(tf.io.matching_files(_glob_escaped(path))) == 0,
    )
    shut = tf.cond(complete | gone, lambda: tf.constant(False), lambda: ~_opens(path))
    return [
        (
            complete | gone | shut,
            [
                _DATA_ERROR + "corrupted TFRecord file:",
                path,
                "(a record fails its checksum: not all of its",
                meta["expected"],
                "records could be read)",
            ],
        ),
        (~gone, [_DATA_ERROR + _GONE[0], path, "(it held", meta["expected"], _GONE[1]]),
        (~shut, [_DATA_ERROR + _SHUT[0], path, "(it held", meta["expected"], _SHUT[1]]),
    ]


def _pipeline(input_context: tf.distribute.InputContext | None) -> tuple[int, int]:
    """(number of input pipelines, this one's id)."""
    if input_context is None:
        return 1, 0
    return input_context.num_input_pipelines, input_context.input_pipeline_id


def _share_files(
    files: list[str], input_context: tf.distribute.InputContext | None, what: str
) -> tuple[list[str], bool]:
    """(this pipeline's files, whether pipelines read separate files).

    Every n-th file when there are at least as many files as pipelines; else
    all of them, with a warning, and `_shard_examples` shares the examples.
    """
    num_pipelines, pipeline_id = _pipeline(input_context)
    if len(files) >= num_pipelines:
        return files[pipeline_id::num_pipelines], True
    logging.warning(
        "%d %s for %d input pipelines: sharding by example, so every pipeline "
        "reads every file; write at least as many files as pipelines.",
        len(files),
        what,
        num_pipelines,
    )
    return files, False


def _shard_examples(
    examples: tf.data.Dataset, input_context: tf.distribute.InputContext | None
) -> tf.data.Dataset:
    """Every n-th example, for pipelines that read the same files."""
    num_pipelines, pipeline_id = _pipeline(input_context)
    return examples.shard(num_pipelines, pipeline_id)


# ----------------------------------------------------------------------------
# IDX (MNIST format)


def load_idx_split(data_dir: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28, 1] uint8, labels [N] int64) of an MNIST-format split."""
    paths = [os.path.join(data_dir or "", name) for name in sources.IDX_FILES[split]]
    for path in paths:
        if not tf.io.gfile.exists(path):
            raise UserError(
                f"--data_dir={data_dir}: no {os.path.basename(path)} (the {split} "
                f"split needs {' and '.join(sources.IDX_FILES[split])})"
            )
    images, labels = (sources.read_idx(path) for path in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(
            f"{paths[0]}: shape {images.shape} does not match the labels' "
            f"{labels.shape} in {paths[1]}"
        )
    return images[..., np.newaxis], labels.astype(np.int64)


# ----------------------------------------------------------------------------
# TFDS


def _tfds_split(builder, split: str) -> str:
    """TFDS's name for our split: 'validation', else 'test' (MNIST, CIFAR)."""
    if split == "validation" and "validation" not in builder.info.splits:
        return "test"
    return split
