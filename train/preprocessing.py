"""Image preprocessing for training and evaluation, as in the tensorflow/tpu ResNet
reference, on either JPEG bytes or already-decoded images.

Every function works on one example. Randomness is stateless: each example carries
its own seed (a [2] int tensor), so a fixed pipeline seed gives the same crops and
flips however many parallel calls the map uses.

Augmentation levels (the paper's two accuracy columns):

- ``"none"``: the evaluation transform (center crop, resize), no randomness.
- ``"minimal"``: a random crop of fixed size (``MINIMAL_CROP_FRACTION`` of each side,
  as Caffe's 224-of-256 crop) at a random position, resize, random left-right flip.
- ``"extended"``: Inception-style crop (area 0.08-1.0 of the image, aspect ratio
  3/4-4/3, covering at least 10% of a bounding box when the record has boxes; a
  center crop when no window is found), resize, random flip, then colour distortion
  (brightness, saturation, hue, contrast, in that fixed order).

Evaluation: a square center crop of ``crop_fraction`` of the shorter side, resized to
``image_size`` (0.875 at 224 is the usual "resize to 256, crop 224").

JPEG input is decoded with ``tf.image.decode_and_crop_jpeg`` so only the crop window
is decoded. ``preprocess_image`` returns float32 in 0-255 units; ``normalize`` then
subtracts a per-channel mean, divides by a standard deviation (0-255 units,
``IMAGENET_MEAN_RGB`` / ``IMAGENET_STDDEV_RGB`` by default) and casts to the
requested dtype (the mixed-precision compute dtype); the input pipeline applies
it to whole batches.
"""

import tensorflow as tf

from train import AUGMENTATIONS
from train.sources import IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB

MINIMAL_CROP_FRACTION = 0.875
INCEPTION_AREA_RANGE = (0.08, 1.0)
INCEPTION_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
INCEPTION_MIN_OBJECT_COVERED = 0.1
# Colour distortion strengths of the Inception / ResNet references.
BRIGHTNESS_MAX_DELTA = 32.0 / 255.0
SATURATION_RANGE = (0.5, 1.5)
HUE_MAX_DELTA = 0.2
CONTRAST_RANGE = (0.5, 1.5)

Window = tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]  # offset_y, _x, h, w


def image_shape(image: tf.Tensor, is_encoded: bool) -> tf.Tensor:
    """[height, width, channels] of JPEG bytes (header only) or a decoded image."""
    if is_encoded:
        return tf.image.extract_jpeg_shape(image)
    return tf.shape(image)


def center_crop_window(shape: tf.Tensor, crop_fraction: float) -> Window:
    """A square window of ``crop_fraction`` of the shorter side, centered."""
    height, width = shape[0], shape[1]
    side = tf.cast(
        crop_fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32
    )
    side = tf.maximum(side, 1)
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def minimal_crop_window(shape: tf.Tensor, seed: tf.Tensor) -> Window:
    """A window of ``MINIMAL_CROP_FRACTION`` of each side at a random position."""
    height, width = shape[0], shape[1]
    crop_h = tf.maximum(
        tf.cast(MINIMAL_CROP_FRACTION * tf.cast(height, tf.float32), tf.int32), 1
    )
    crop_w = tf.maximum(
        tf.cast(MINIMAL_CROP_FRACTION * tf.cast(width, tf.float32), tf.int32), 1
    )
    seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    offset_y = tf.random.stateless_uniform(
        [], seed_y, 0, height - crop_h + 1, dtype=tf.int32
    )
    offset_x = tf.random.stateless_uniform(
        [], seed_x, 0, width - crop_w + 1, dtype=tf.int32
    )
    return offset_y, offset_x, crop_h, crop_w


def inception_crop_window(
    shape: tf.Tensor, bbox: tf.Tensor, seed: tf.Tensor, fallback_fraction: float
) -> Window:
    """Inception-style random window; a center crop when sampling gives up.

    Args:
      shape: [height, width, channels] of the image.
      bbox: [1, N, 4] float boxes (ymin, xmin, ymax, xmax) in [0, 1]; N may be 0.
      seed: [2] int seed.
      fallback_fraction: crop fraction of the center crop used as the fallback.
    """
    whole_image = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
    bbox = tf.cond(tf.shape(bbox)[1] > 0, lambda: bbox, lambda: whole_image)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=bbox,
        seed=seed,
        min_object_covered=INCEPTION_MIN_OBJECT_COVERED,
        aspect_ratio_range=INCEPTION_ASPECT_RATIO_RANGE,
        area_range=INCEPTION_AREA_RANGE,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    # sample_distorted_bounding_box returns the whole image when every attempt
    # failed; the reference uses a center crop then.
    gave_up = tf.reduce_all(tf.equal(size[:2], shape[:2]))
    center = center_crop_window(shape, fallback_fraction)
    return tuple(
        tf.where(gave_up, fallback, sampled)
        for fallback, sampled in zip(
            center, (begin[0], begin[1], size[0], size[1]), strict=True
        )
    )


def crop(image: tf.Tensor, window: Window, is_encoded: bool, channels: int):
    """The window of the image, decoding only that window when it is JPEG bytes."""
    offset_y, offset_x, height, width = window
    if is_encoded:
        crop_window = tf.stack([offset_y, offset_x, height, width])
        return tf.image.decode_and_crop_jpeg(image, crop_window, channels=channels)
    return tf.image.crop_to_bounding_box(image, offset_y, offset_x, height, width)


def random_flip_left_right(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """The image mirrored left-right with probability 1/2.

    The same draw and result as ``tf.image.stateless_random_flip_left_right``
    (mirrored when a stateless uniform number from ``seed`` is below 0.5),
    without its run-time checks of the image's shape, about 30 graph
    operations per image: a crop here always has three dimensions and a
    positive size.
    """
    mirrored = tf.random.stateless_uniform([], seed, 0, 1.0) < 0.5
    return tf.cond(mirrored, lambda: tf.reverse(image, [1]), lambda: image)


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Bilinear resize (half-pixel centers) to image_size x image_size, float32
    in the input's units."""
    # Cast first: TF's bilinear resize is faster on a float image than on the
    # uint8 one, same result (BENCHMARKS.md, "Preprocessing steps").
    image = tf.cast(image, tf.float32)
    return tf.image.resize(image, [image_size, image_size], method="bilinear")


def distort_color(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Colour distortion of a float image in [0, 1]; the result stays in [0, 1]."""
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    image = tf.image.stateless_random_brightness(image, BRIGHTNESS_MAX_DELTA, seeds[0])
    if image.shape[-1] == 3:  # Saturation and hue need colour.
        image = tf.image.stateless_random_saturation(image, *SATURATION_RANGE, seeds[1])
        image = tf.image.stateless_random_hue(image, HUE_MAX_DELTA, seeds[2])
    image = tf.image.stateless_random_contrast(image, *CONTRAST_RANGE, seeds[3])
    return tf.clip_by_value(image, 0.0, 1.0)


def normalize(
    images: tf.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN_RGB,
    stddev: tuple[float, ...] = IMAGENET_STDDEV_RGB,
    dtype: tf.DType | str = tf.float32,
) -> tf.Tensor:
    """(images - mean) / stddev per channel, cast to dtype.

    For one image [H, W, C] or a batch [N, H, W, C], float in 0-255 units. The
    per-channel affine map is a 1x1 convolution with a diagonal kernel plus a
    bias: on CPU that runs several times faster than a broadcast multiply and
    add, which cost more than JPEG decoding in the input pipeline.
    """
    scale = [1.0 / s for s in stddev]
    offset = [-m / s for m, s in zip(mean, stddev, strict=True)]
    kernel = tf.linalg.diag(tf.constant(scale))[tf.newaxis, tf.newaxis]  # 1x1xCxC
    batch = images if images.shape.rank == 4 else images[tf.newaxis]
    normalized = tf.nn.bias_add(
        tf.nn.conv2d(tf.cast(batch, tf.float32), kernel, strides=1, padding="VALID"),
        tf.constant(offset),
    )
    if images.shape.rank != 4:
        normalized = normalized[0]
    return tf.cast(normalized, dtype)


def preprocess_image(
    image: tf.Tensor,
    *,
    is_encoded: bool,
    image_size: int,
    training: bool,
    augmentation: str = "minimal",
    bbox: tf.Tensor | None = None,
    seed: tf.Tensor | None = None,
    channels: int = 3,
    crop_fraction: float = 0.875,
) -> tf.Tensor:
    """One example's image: crop, resize, augment; ``normalize`` comes after.

    Args:
      image: JPEG bytes (scalar string) when ``is_encoded``, else a decoded
        [height, width, channels] uint8 image.
      image_size: output height and width.
      training: apply ``augmentation``; evaluation always uses the center crop.
      augmentation: one of ``AUGMENTATIONS`` (module docstring).
      bbox: [1, N, 4] boxes (ymin, xmin, ymax, xmax) in [0, 1], for "extended".
      seed: [2] int seed for the random ops; required for "minimal"/"extended".
      channels: channels of the output (JPEGs are decoded to this many).
      crop_fraction: the evaluation center crop (and Inception fallback) fraction.

    Returns:
      A [image_size, image_size, channels] float32 tensor in 0-255 units.
    """
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}: {augmentation}")
    randomize = training and augmentation != "none"
    if randomize and seed is None:
        raise ValueError(f"augmentation {augmentation!r} needs a per-example seed")
    shape = image_shape(image, is_encoded)
    if randomize:
        crop_seed, flip_seed, color_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 3)
        )
    if not randomize:
        window = center_crop_window(shape, crop_fraction)
    elif augmentation == "minimal":
        window = minimal_crop_window(shape, crop_seed)
    else:
        if bbox is None:
            bbox = tf.zeros([1, 0, 4])
        window = inception_crop_window(shape, bbox, crop_seed, crop_fraction)
    image = crop(image, window, is_encoded, channels)
    image.set_shape([None, None, channels])
    if randomize:  # On the uint8 crop: fewer bytes than the float output.
        image = random_flip_left_right(image, flip_seed)
    image = resize(image, image_size)
    if randomize and augmentation == "extended":
        image = distort_color(image / 255.0, color_seed) * 255.0
    return image
