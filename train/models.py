"""The paper's models: Keras 3 functional, channels-last, no pretrained weights.

Every model outputs logits (no softmax) through a final float32 cast layer named
``logits``, so a ``mixed_bfloat16`` or ``mixed_float16`` policy still yields float32
logits for the loss. Layers have stable names (``conv1``, ``bn1``, ``fc8``, ...) so
variable paths read like ``conv1/kernel`` and ``bn1/gamma``: the trust-ratio table
prints them and the LARS exclusion regexes match them. There are no weight-decay
regularizers here: weight decay lives in the optimizer.

Parameter counts below are for 1000 classes at 224x224x3 and count *trainable*
parameters (what PyTorch's ``numel`` sum and the papers report); Keras's
``count_params()`` also counts BatchNormalization's moving mean and variance.
"""

import keras
import tensorflow as tf

# The smallest input of the models that have one: AlexNet's conv1 and three
# 3x3/2 max-pools need 63 (-> 15 -> 7 -> 3 -> 1).
MIN_IMAGE_SIZE = {"alexnet": 63, "alexnet_bn": 63}
# BatchNormalization settings of the tensorflow/tpu ResNet reference (and MLPerf).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package="lars_tf")
class LocalResponseNormalization(keras.layers.Layer):
    """Cross-channel local response normalization (Krizhevsky et al. 2012, sec. 3.3).

    ``b = a / (bias + alpha * sum(a**2 over 2 * depth_radius + 1 channels)) ** beta``,
    which is exactly ``tf.nn.local_response_normalization``. The defaults are the
    paper's k=2, n=5, alpha=1e-4, beta=0.75. (Caffe's bvlc_alexnet uses k=1 and
    divides alpha by n.) Computed in float32 because TensorFlow has no bfloat16 LRN
    kernel on CPU, then cast back to the input's dtype.
    """

    def __init__(
        self,
        depth_radius: int = 2,
        bias: float = 2.0,
        alpha: float = 1e-4,
        beta: float = 0.75,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.depth_radius = depth_radius
        self.bias = bias
        self.alpha = alpha
        self.beta = beta

    def call(self, inputs):
        normalized = tf.nn.local_response_normalization(
            tf.cast(inputs, tf.float32),
            depth_radius=self.depth_radius,
            bias=self.bias,
            alpha=self.alpha,
            beta=self.beta,
        )
        return tf.cast(normalized, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            depth_radius=self.depth_radius,
            bias=self.bias,
            alpha=self.alpha,
            beta=self.beta,
        )
        return config


@keras.saving.register_keras_serializable(package="lars_tf")
class SubsampleZeroPadShortcut(keras.layers.Layer):
    """ResNet "option A" shortcut (He et al. 2016, CIFAR): stride-2 subsampling, then
    zero-padding the channels up to ``filters``. It has no parameters."""

    def __init__(self, filters: int, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters

    def call(self, inputs):
        subsampled = inputs[:, ::2, ::2, :]
        missing = self.filters - subsampled.shape[-1]
        return tf.pad(subsampled, [[0, 0], [0, 0], [0, 0], [0, missing]])

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        half = lambda size: None if size is None else (size + 1) // 2  # noqa: E731
        return (batch, half(height), half(width), self.filters)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(filters=self.filters)
        return config


def _conv(x, filters: int, kernel_size: int, strides: int = 1, *, name: str, **kw):
    """Conv2D with He-normal init; strided convs pad explicitly and symmetrically
    (the tf/tpu reference's ``fixed_padding``) so the result does not depend on
    whether the input size is even."""
    if strides > 1 and kernel_size > 1:
        x = keras.layers.ZeroPadding2D((kernel_size - 1) // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        kernel_initializer="he_normal",
        name=name,
        **kw,
    )(x)


def _bn(x, *, name: str, zero_init: bool = False):
    return keras.layers.BatchNormalization(
        momentum=_BN_MOMENTUM,
        epsilon=_BN_EPSILON,
        gamma_initializer="zeros" if zero_init else "ones",
        name=name,
    )(x)


def _logits(x, num_classes: int, *, name: str, kernel_initializer="glorot_uniform"):
    """Final dense layer plus the explicit float32 cast named ``logits``."""
    x = keras.layers.Dense(
        num_classes, kernel_initializer=kernel_initializer, name=name
    )(x)
    return keras.layers.Activation("linear", dtype="float32", name="logits")(x)


def _conv_block(
    x, index: int, filters: int, kernel_size: int, batch_norm: bool, strides=1, groups=1
):
    """The AlexNet family's ``conv{index}`` (+ ``bn{index}``) + ``relu{index}``.

    With BN the conv has no bias (BN's beta makes it redundant). Strided convs
    pad "valid", as Caffe's AlexNet.
    """
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="valid" if strides > 1 else "same",
        groups=groups,
        use_bias=not batch_norm,
        kernel_initializer="he_normal",
        name=f"conv{index}",
    )(x)
    if batch_norm:
        x = _bn(x, name=f"bn{index}")
    return keras.layers.ReLU(name=f"relu{index}")(x)


def _alexnet(num_classes, image_size, channels, *, batch_norm: bool, name: str):
    """Shared AlexNet body; ``batch_norm`` swaps LRN for BN after every conv/fc."""
    if image_size < MIN_IMAGE_SIZE[name]:
        raise ValueError(
            f"{name} needs image_size >= {MIN_IMAGE_SIZE[name]}, got {image_size}"
        )
    inputs = keras.Input((image_size, image_size, channels), name="images")

    def conv_block(x, index, filters, kernel_size, strides=1, groups=1):
        x = _conv_block(x, index, filters, kernel_size, batch_norm, strides, groups)
        if not batch_norm and index in (1, 2):
            x = LocalResponseNormalization(name=f"lrn{index}")(x)
        return x

    def pool(x, index):
        return keras.layers.MaxPooling2D(3, strides=2, name=f"pool{index}")(x)

    def fc_block(x, index, units):
        x = keras.layers.Dense(units, use_bias=not batch_norm, name=f"fc{index}")(x)
        if batch_norm:
            x = _bn(x, name=f"bn{index}")
        x = keras.layers.ReLU(name=f"relu{index}")(x)
        return keras.layers.Dropout(0.5, name=f"drop{index}")(x)

    # torchvision's padding of 2 makes 224 -> 55 (what Caffe gets from 227).
    x = keras.layers.ZeroPadding2D(2, name="conv1_pad")(inputs)
    x = pool(conv_block(x, 1, 96, 11, strides=4), 1)
    x = pool(conv_block(x, 2, 256, 5, groups=2), 2)
    x = conv_block(x, 3, 384, 3)
    x = conv_block(x, 4, 384, 3, groups=2)
    x = pool(conv_block(x, 5, 256, 3, groups=2), 5)
    x = keras.layers.Flatten(name="flatten")(x)
    x = fc_block(x, 6, 4096)
    x = fc_block(x, 7, 4096)
    return keras.Model(inputs, _logits(x, num_classes, name="fc8"), name=name)


def alexnet(num_classes: int, image_size: int = 224, channels: int = 3) -> keras.Model:
    """AlexNet as Caffe's bvlc_alexnet (Krizhevsky et al. 2012 on one GPU): the
    paper's layers, including the two-group convolutions conv2/conv4/conv5, ReLU,
    then LRN after conv1 and conv2 (before pooling), dropout 0.5 in fc6/fc7.

    60,965,224 parameters at 1000 classes (224x224, padded like torchvision so conv1
    gives 55x55) — the same count as bvlc_alexnet at 227x227 (Caffe model zoo).
    torchvision's single-group variant with 64/192 channels has 61,100,840; the
    ungrouped one-tower net ("one weird trick", Krizhevsky 2014) has 62,378,344.
    Needs ``image_size >= 63`` (the three max-pools need a 3x3 input).
    """
    return _alexnet(num_classes, image_size, channels, batch_norm=False, name="alexnet")


def alexnet_bn(
    num_classes: int, image_size: int = 224, channels: int = 3
) -> keras.Model:
    """AlexNet-BN of the LARS paper: :func:`alexnet` with LRN removed and
    BatchNormalization after each conv and hidden fc layer (conv1-5, fc6, fc7; not
    after the fc8 logits). Biases before BN are dropped as redundant.

    60,974,792 trainable parameters at 1000 classes (224x224): AlexNet's 60,965,224
    minus the 9,568 conv1-fc7 biases plus 2 x 9,568 BN gamma/beta (hand count in
    tests/test_models.py; no published figure for this exact variant). Needs
    ``image_size >= 63``.
    """
    return _alexnet(
        num_classes, image_size, channels, batch_norm=True, name="alexnet_bn"
    )


def _bottleneck(x, filters: int, strides: int, *, name: str):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (carries the stride) -> 1x1 (x4 filters),
    BN after each conv, the last BN's gamma zero-initialized (tf/tpu reference)."""
    shortcut = x
    if strides != 1 or x.shape[-1] != 4 * filters:
        shortcut = _conv(
            x, 4 * filters, 1, strides, name=f"{name}_0_conv", use_bias=False
        )
        shortcut = _bn(shortcut, name=f"{name}_0_bn")
    x = _conv(x, filters, 1, name=f"{name}_1_conv", use_bias=False)
    x = keras.layers.ReLU(name=f"{name}_1_relu")(_bn(x, name=f"{name}_1_bn"))
    x = _conv(x, filters, 3, strides, name=f"{name}_2_conv", use_bias=False)
    x = keras.layers.ReLU(name=f"{name}_2_relu")(_bn(x, name=f"{name}_2_bn"))
    x = _conv(x, 4 * filters, 1, name=f"{name}_3_conv", use_bias=False)
    x = _bn(x, name=f"{name}_3_bn", zero_init=True)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def resnet50(num_classes: int, image_size: int = 224, channels: int = 3) -> keras.Model:
    """ResNet-50 v1.5 (He et al. 2016 with the stride in the 3x3 conv, as in
    torchvision, NVIDIA's and the tf/tpu reference): convs without bias, each
    followed by BN; Keras Applications' layer naming (``conv2_block1_1_conv``).

    25,557,032 trainable parameters at 1000 classes (torchvision's resnet50; Keras
    Applications' ResNet50, which is v1 with conv biases, has 25,636,712).
    Any ``image_size >= 1`` works (global average pooling before the classifier).
    """
    inputs = keras.Input((image_size, image_size, channels), name="images")
    x = _conv(inputs, 64, 7, 2, name="conv1", use_bias=False)
    x = keras.layers.ReLU(name="relu1")(_bn(x, name="bn1"))
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    for stage, (filters, blocks) in enumerate(
        [(64, 3), (128, 4), (256, 6), (512, 3)], start=2
    ):
        for block in range(1, blocks + 1):
            strides = 2 if block == 1 and stage > 2 else 1
            x = _bottleneck(x, filters, strides, name=f"conv{stage}_block{block}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    # The reference initializes the classifier with N(0, 0.01).
    init = keras.initializers.RandomNormal(stddev=0.01)
    outputs = _logits(x, num_classes, name="fc", kernel_initializer=init)
    return keras.Model(inputs, outputs, name="resnet50")


# GoogLeNet's inception modules (Szegedy et al. 2015, table 1): 1x1, 3x3 reduce,
# 3x3, 5x5 reduce, 5x5, pool projection.
_INCEPTION_FILTERS = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


def _conv_bn_relu(x, filters: int, kernel_size: int, strides: int = 1, *, name: str):
    x = _conv(x, filters, kernel_size, strides, name=name, use_bias=False)
    x = _bn(x, name=f"{name}_bn")
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _inception(x, name: str):
    f1, f3_reduce, f3, f5_reduce, f5, pool_proj = _INCEPTION_FILTERS[name]
    prefix = f"inception{name}"
    branch1 = _conv_bn_relu(x, f1, 1, name=f"{prefix}_1x1")
    branch3 = _conv_bn_relu(x, f3_reduce, 1, name=f"{prefix}_3x3_reduce")
    branch3 = _conv_bn_relu(branch3, f3, 3, name=f"{prefix}_3x3")
    branch5 = _conv_bn_relu(x, f5_reduce, 1, name=f"{prefix}_5x5_reduce")
    branch5 = _conv_bn_relu(branch5, f5, 5, name=f"{prefix}_5x5")
    pooled = keras.layers.MaxPooling2D(
        3, strides=1, padding="same", name=f"{prefix}_pool"
    )(x)
    pooled = _conv_bn_relu(pooled, pool_proj, 1, name=f"{prefix}_pool_proj")
    return keras.layers.Concatenate(name=f"{prefix}_concat")(
        [branch1, branch3, branch5, pooled]
    )


def googlenet(
    num_classes: int, image_size: int = 224, channels: int = 3
) -> keras.Model:
    """GoogLeNet / Inception-v1 (Szegedy et al. 2015) with BN after every conv
    (convs without bias, LRN removed) and without the auxiliary heads, as the LARS
    paper trains it. The 5x5 branches are real 5x5 convs as in the paper (torchvision
    uses 3x3 there); dropout 0.4 before the classifier as in the paper.

    7,005,832 trainable parameters at 1000 classes (hand count in
    tests/test_models.py; the paper's table 1 gives ~6.8M without BN; torchvision's
    googlenet, with 3x3 in the 5x5 branch, has 6,624,904). Any ``image_size >= 1``.
    """
    inputs = keras.Input((image_size, image_size, channels), name="images")
    x = _conv_bn_relu(inputs, 64, 7, 2, name="conv1")
    x = keras.layers.MaxPooling2D(3, 2, padding="same", name="pool1")(x)
    x = _conv_bn_relu(x, 64, 1, name="conv2_reduce")
    x = _conv_bn_relu(x, 192, 3, name="conv2")
    x = keras.layers.MaxPooling2D(3, 2, padding="same", name="pool2")(x)
    x = _inception(_inception(x, "3a"), "3b")
    x = keras.layers.MaxPooling2D(3, 2, padding="same", name="pool3")(x)
    for name in ("4a", "4b", "4c", "4d", "4e"):
        x = _inception(x, name)
    x = keras.layers.MaxPooling2D(3, 2, padding="same", name="pool4")(x)
    x = _inception(_inception(x, "5a"), "5b")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(0.4, name="dropout")(x)
    return keras.Model(inputs, _logits(x, num_classes, name="fc"), name="googlenet")


def _basic_block(x, filters: int, strides: int, *, name: str):
    """ResNet basic block: two 3x3 conv-BN, option-A (parameter-free) shortcut."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = SubsampleZeroPadShortcut(filters, name=f"{name}_shortcut")(x)
    x = _conv(x, filters, 3, strides, name=f"{name}_1_conv", use_bias=False)
    x = keras.layers.ReLU(name=f"{name}_1_relu")(_bn(x, name=f"{name}_1_bn"))
    x = _conv(x, filters, 3, name=f"{name}_2_conv", use_bias=False)
    x = _bn(x, name=f"{name}_2_bn")
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def _cifar_resnet(
    num_classes: int, image_size: int, channels: int, blocks: int, *, name: str
) -> keras.Model:
    """He et al. 2016, sec. 4.2's CIFAR ResNet of depth ``6 * blocks + 2``: a 3x3
    conv, then three stages of ``blocks`` basic blocks with 16/32/64 filters,
    option-A shortcuts, global average pooling and a fc layer."""
    inputs = keras.Input((image_size, image_size, channels), name="images")
    x = _conv(inputs, 16, 3, name="conv1", use_bias=False)
    x = keras.layers.ReLU(name="relu1")(_bn(x, name="bn1"))
    for stage, filters in enumerate((16, 32, 64), start=2):
        for block in range(1, blocks + 1):
            strides = 2 if block == 1 and stage > 2 else 1
            x = _basic_block(x, filters, strides, name=f"conv{stage}_block{block}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, _logits(x, num_classes, name="fc"), name=name)


def resnet20(num_classes: int, image_size: int = 32, channels: int = 3) -> keras.Model:
    """ResNet-20 for CIFAR (He et al. 2016, sec. 4.2): three stages of three basic
    blocks (see :func:`_cifar_resnet`).

    269,722 trainable parameters at 10 classes (the paper's "0.27M"); 334,072 at
    1000 classes. Any ``image_size >= 1``.
    """
    return _cifar_resnet(num_classes, image_size, channels, 3, name="resnet20")


def resnet8(num_classes: int, image_size: int = 32, channels: int = 3) -> keras.Model:
    """ResNet-8: the ResNet-20 family with one basic block per stage, a BN
    residual net with about a third of ResNet-20's compute, small enough for the
    large-batch study on a CPU.

    75,290 trainable parameters at 10 classes on 32x32x3 (hand count in
    tests/test_models.py). Any ``image_size >= 1``.
    """
    return _cifar_resnet(num_classes, image_size, channels, 1, name="resnet8")


# (filters, kernel size) of the small AlexNet's convs: small enough to train on a CPU.
_SMALL_ALEXNET_CONVS = ((16, 5), (32, 3), (64, 3))


def _small_alexnet(num_classes, image_size, channels, *, batch_norm: bool, name: str):
    """Three conv (+BN) + ReLU + max-pool stages, one hidden fc (+BN), the logits."""
    inputs = keras.Input((image_size, image_size, channels), name="images")
    x = inputs
    for index, (filters, kernel_size) in enumerate(_SMALL_ALEXNET_CONVS, start=1):
        x = _conv_block(x, index, filters, kernel_size, batch_norm)
        x = keras.layers.MaxPooling2D(
            3, strides=2, padding="same", name=f"pool{index}"
        )(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(
        256, use_bias=not batch_norm, kernel_initializer="he_normal", name="fc4"
    )(x)
    if batch_norm:
        x = _bn(x, name="bn4")
    x = keras.layers.ReLU(name="relu4")(x)
    return keras.Model(inputs, _logits(x, num_classes, name="fc5"), name=name)


def small_alexnet_bn(
    num_classes: int, image_size: int = 28, channels: int = 1
) -> keras.Model:
    """A small AlexNet-BN-like convnet for the large-batch study on MNIST (28x28x1)
    and downscaled Imagenette (64x64x3): conv1 5x5x16, conv2 3x3x32, conv3 3x3x64,
    each conv -> BN -> ReLU -> 3x3/2 max-pool, then fc4 (256) -> BN -> ReLU, fc5.

    288,890 trainable parameters at 10 classes on 28x28x1 (288,522 without BN).
    """
    return _small_alexnet(
        num_classes, image_size, channels, batch_norm=True, name="small_alexnet_bn"
    )


def small_alexnet(
    num_classes: int, image_size: int = 28, channels: int = 1
) -> keras.Model:
    """:func:`small_alexnet_bn` without BatchNormalization (convs, fc4 get biases)."""
    return _small_alexnet(
        num_classes, image_size, channels, batch_norm=False, name="small_alexnet"
    )


_BUILDERS = {
    "alexnet": alexnet,
    "alexnet_bn": alexnet_bn,
    "resnet50": resnet50,
    "googlenet": googlenet,
    "resnet20": resnet20,
    "resnet8": resnet8,
    "small_alexnet": small_alexnet,
    "small_alexnet_bn": small_alexnet_bn,
}


MODEL_NAMES = tuple(_BUILDERS)


def build_model(
    name: str, num_classes: int, image_size: int, channels: int = 3
) -> keras.Model:
    """Builds the model ``name`` (one of :data:`MODEL_NAMES`) with randomly
    initialized weights, returning float32 logits of shape (batch, num_classes)."""
    if name not in _BUILDERS:
        raise ValueError(
            f"Unknown model {name!r}; expected one of: {', '.join(MODEL_NAMES)}"
        )
    return _BUILDERS[name](num_classes, image_size=image_size, channels=channels)
