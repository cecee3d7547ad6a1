"""Tests for train/models.py: parameter counts against published figures or hand
counts from the layer tables, forward shapes, float32 logits under mixed precision,
the LRN layer against a float64 NumPy formula, and save/reload."""

import keras
import numpy as np
import pytest

from train import models


def trainable_count(model: keras.Model) -> int:
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def conv_params(k: int, c_in: int, c_out: int, *, bias=True, bn=False, groups=1):
    """Hand count: kernel k*k*(c_in/groups)*c_out, plus bias or BN gamma/beta."""
    return k * k * (c_in // groups) * c_out + (c_out if bias else 0) + 2 * c_out * bn


def dense_params(n_in: int, n_out: int, *, bias=True, bn=False):
    return n_in * n_out + (n_out if bias else 0) + 2 * n_out * bn


def alexnet_reference_count(num_classes: int, *, bn: bool) -> int:
    """bvlc_alexnet's layer table (groups of 2 in conv2/4/5), 6x6x256 before fc6."""
    convs = [(11, 3, 96, 1), (5, 96, 256, 2), (3, 256, 384, 1)]
    convs += [(3, 384, 384, 2), (3, 384, 256, 2)]
    total = sum(
        conv_params(k, i, o, bias=not bn, bn=bn, groups=g) for k, i, o, g in convs
    )
    total += dense_params(6 * 6 * 256, 4096, bias=not bn, bn=bn)
    total += dense_params(4096, 4096, bias=not bn, bn=bn)
    return total + dense_params(4096, num_classes)


def googlenet_reference_count(num_classes: int, branch5_kernel: int) -> int:
    """Szegedy et al. 2015 table 1 with conv-BN (no conv bias) everywhere."""
    table = [  # in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj
        (192, 64, 96, 128, 16, 32, 32),
        (256, 128, 128, 192, 32, 96, 64),
        (480, 192, 96, 208, 16, 48, 64),
        (512, 160, 112, 224, 24, 64, 64),
        (512, 128, 128, 256, 24, 64, 64),
        (512, 112, 144, 288, 32, 64, 64),
        (528, 256, 160, 320, 32, 128, 128),
        (832, 256, 160, 320, 32, 128, 128),
        (832, 384, 192, 384, 48, 128, 128),
    ]
    cbn = lambda k, i, o: conv_params(k, i, o, bias=False, bn=True)  # noqa: E731
    total = cbn(7, 3, 64) + cbn(1, 64, 64) + cbn(3, 64, 192)
    for c_in, f1, r3, f3, r5, f5, proj in table:
        total += cbn(1, c_in, f1) + cbn(1, c_in, r3) + cbn(3, r3, f3)
        total += cbn(1, c_in, r5) + cbn(branch5_kernel, r5, f5) + cbn(1, c_in, proj)
    return total + dense_params(1024, num_classes)


def test_googlenet_reference_count_matches_torchvision():
    # torchvision's googlenet (3x3 in the "5x5" branch, no aux heads): 6,624,904.
    assert googlenet_reference_count(1000, branch5_kernel=3) == 6_624_904


@pytest.fixture(scope="module")
def imagenet_models():
    """The big models at 1000 classes, 224x224x3, built once for the module."""
    names = ("alexnet", "alexnet_bn", "resnet50", "googlenet")
    return {name: models.build_model(name, 1000, 224) for name in names}


def test_resnet50_has_published_parameter_count(imagenet_models):
    # torchvision resnet50 (v1.5, convs without bias): 25,557,032 trainable.
    assert trainable_count(imagenet_models["resnet50"]) == 25_557_032


def test_alexnet_matches_bvlc_alexnet_count(imagenet_models):
    assert alexnet_reference_count(1000, bn=False) == 60_965_224  # Caffe model zoo
    assert trainable_count(imagenet_models["alexnet"]) == 60_965_224


def test_alexnet_bn_matches_hand_count(imagenet_models):
    expected = alexnet_reference_count(1000, bn=True)
    assert trainable_count(imagenet_models["alexnet_bn"]) == expected


def test_googlenet_matches_hand_count(imagenet_models):
    expected = googlenet_reference_count(1000, branch5_kernel=5)
    assert trainable_count(imagenet_models["googlenet"]) == expected


def test_resnet20_has_paper_count():
    # He et al. 2016 "0.27M"; by hand: 3x3 convs 16/32/64 without bias + BN + fc.
    convs = [(3, 16)] + [(16, 16)] * 6 + [(16, 32)] + [(32, 32)] * 5
    convs += [(32, 64)] + [(64, 64)] * 5
    expected = sum(conv_params(3, i, o, bias=False, bn=True) for i, o in convs)
    expected += dense_params(64, 10)
    assert expected == 269_722
    assert trainable_count(models.build_model("resnet20", 10, 32)) == expected


def test_resnet8_has_hand_count():
    # One basic block per stage: conv1, then 16->16 twice, 16->32 and 32->32,
    # 32->64 and 64->64 (3x3, no bias, BN after each), then fc 64 -> 10.
    convs = [(3, 16), (16, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64)]
    expected = sum(conv_params(3, i, o, bias=False, bn=True) for i, o in convs)
    expected += dense_params(64, 10)
    assert expected == 75_290
    model = models.build_model("resnet8", 10, 32)
    assert trainable_count(model) == expected
    assert model.get_layer("conv4_block1_2_conv").output.shape[1:] == (8, 8, 64)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_small_alexnet_matches_hand_count(batch_norm):
    name = "small_alexnet_bn" if batch_norm else "small_alexnet"
    bias, bn = not batch_norm, batch_norm
    # 28 -> 14 -> 7 -> 4 through three 3x3/2 'same' max-pools.
    expected = conv_params(5, 1, 16, bias=bias, bn=bn)
    expected += conv_params(3, 16, 32, bias=bias, bn=bn)
    expected += conv_params(3, 32, 64, bias=bias, bn=bn)
    expected += dense_params(4 * 4 * 64, 256, bias=bias, bn=bn) + dense_params(256, 10)
    assert trainable_count(models.build_model(name, 10, 28, channels=1)) == expected


def test_resnet50_is_v1_5_with_stride_in_3x3(imagenet_models):
    model = imagenet_models["resnet50"]
    assert model.get_layer("conv3_block1_1_conv").strides == (1, 1)
    assert model.get_layer("conv3_block1_2_conv").strides == (2, 2)
    assert model.get_layer("conv5_block3_out").output.shape[1:] == (7, 7, 2048)


def test_layer_names_give_readable_variable_paths(imagenet_models):
    alexnet_paths = {v.path for v in imagenet_models["alexnet"].weights}
    assert {"conv1/kernel", "conv1/bias", "fc8/kernel"} <= alexnet_paths
    bn_paths = {v.path for v in imagenet_models["alexnet_bn"].weights}
    assert {"conv1/kernel", "bn1/gamma", "bn1/beta", "bn7/gamma"} <= bn_paths
    assert "conv1/bias" not in bn_paths
    resnet_paths = {v.path for v in imagenet_models["resnet50"].weights}
    assert {"conv1/kernel", "bn1/gamma", "fc/kernel", "fc/bias"} <= resnet_paths


@pytest.mark.parametrize(
    "name, num_classes, image_size, channels",
    [
        ("alexnet", 7, 64, 3),
        ("alexnet_bn", 3, 67, 3),
        ("resnet50", 5, 32, 3),
        ("googlenet", 4, 32, 3),
        ("resnet20", 10, 32, 3),
        ("resnet20", 2, 9, 1),
        ("resnet8", 10, 32, 3),
        ("small_alexnet", 10, 28, 1),
        ("small_alexnet_bn", 10, 28, 1),
        ("small_alexnet_bn", 10, 64, 3),
    ],
)
def test_forward_gives_float32_logits_of_right_shape(
    name, num_classes, image_size, channels
):
    model = models.build_model(name, num_classes, image_size, channels=channels)
    images = np.random.default_rng(0).random((2, image_size, image_size, channels))
    logits = model(images.astype("float32"), training=False)
    assert logits.shape == (2, num_classes)
    assert logits.dtype == "float32"
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(logits)))


@pytest.fixture
def mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize(
    "name, image_size, channels",
    [("alexnet", 64, 3), ("resnet20", 16, 3), ("small_alexnet_bn", 28, 1)],
)
def test_mixed_bfloat16_still_gives_float32_logits(
    mixed_bfloat16, name, image_size, channels
):
    model = models.build_model(name, 6, image_size, channels=channels)
    assert model.get_layer("conv1").compute_dtype == "bfloat16"
    images = np.ones((1, image_size, image_size, channels), "float32")
    logits = model(images, training=True)
    assert logits.dtype == "float32"
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(logits)))


def test_local_response_normalization_matches_paper_formula():
    # b = a / (k + alpha * sum of a^2 over the n=5 neighbouring channels) ** beta
    a = np.random.default_rng(1).normal(size=(2, 3, 3, 8)) * 10
    k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
    expected = np.empty_like(a)
    for c in range(a.shape[-1]):
        window = a[..., max(0, c - n // 2) : c + n // 2 + 1]
        expected[..., c] = a[..., c] / (k + alpha * (window**2).sum(-1)) ** beta
    layer = models.LocalResponseNormalization()
    got = keras.ops.convert_to_numpy(layer(a.astype("float32")))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = np.arange(2 * 5 * 5 * 3, dtype="float32").reshape(2, 5, 5, 3)
    got = keras.ops.convert_to_numpy(models.SubsampleZeroPadShortcut(8)(x))
    expected = np.zeros((2, 3, 3, 8), "float32")
    expected[..., :3] = x[:, ::2, ::2, :]
    np.testing.assert_array_equal(got, expected)


def test_custom_layers_survive_save_and_reload(tmp_path):
    # resnet20 holds the option-A shortcut; a tiny head adds the LRN layer.
    body = models.build_model("resnet20", 3, 12)
    inputs = keras.Input((12, 12, 3))
    lrn = models.LocalResponseNormalization(bias=1.0, alpha=2e-5, name="lrn")
    model = keras.Model(inputs, lrn(keras.layers.Reshape((1, 1, 3))(body(inputs))))
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert reloaded.get_layer("lrn").get_config()["alpha"] == 2e-5
    images = np.random.default_rng(2).random((1, 12, 12, 3)) * 100
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(reloaded(images, training=False)),
        keras.ops.convert_to_numpy(model(images, training=False)),
        rtol=1e-6,
    )


@pytest.mark.parametrize("name", ["alexnet", "alexnet_bn"])
def test_alexnet_rejects_too_small_images(name):
    # 62: conv1 (pad 2, 11x11/4) -> 14, pools -> 6 -> 2: too small for pool5.
    models.build_model(name, 2, 63)
    with pytest.raises(ValueError, match="image_size >= 63"):
        models.build_model(name, 2, 62)


def test_unknown_name_raises_value_error_listing_names():
    with pytest.raises(ValueError, match="vgg16") as error:
        models.build_model("vgg16", 10, 32)
    assert all(name in str(error.value) for name in models.MODEL_NAMES)
