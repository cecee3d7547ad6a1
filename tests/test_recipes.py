"""The ImageNet-scale recipes in experiments/recipes/ parse and build their model
and optimizer (no training).

The expected values are the recipes' intent, typed in by hand from their header
comments (batch, model, rate, warm-up, exclusions), not read from the files.
"""

import glob
import os
import pathlib

import keras
import pytest
from absl import flags

import lars_tf
from train import config, models, optimizers, sources

RECIPES_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "experiments",
    "recipes",
)
# name: (model, batch, epochs, peak rate, warm-up epochs, weight decay,
#        bias/BN excluded, label smoothing)
EXPECTED = {
    "alexnet_bn_8k": ("alexnet_bn", 8192, 100, 10.0, 3.85, 5e-4, False, 0.0),
    "alexnet_bn_16k": ("alexnet_bn", 16384, 100, 24.0, 5.13, 5e-4, False, 0.0),
    "alexnet_bn_32k": ("alexnet_bn", 32768, 100, 32.0, 10.26, 5e-4, False, 0.0),
    "resnet50_8k": ("resnet50", 8192, 90, 10.0, 5.0, 1e-4, False, 0.0),
    "resnet50_16k": ("resnet50", 16384, 90, 25.0, 5.0, 1e-4, False, 0.0),
    "resnet50_32k": ("resnet50", 32768, 90, 32.0, 14.0, 1e-4, False, 0.0),
    "googlenet_8k": ("googlenet", 8192, 100, 10.0, 5.0, 1e-4, False, 0.0),
    "mlperf_resnet50_lars": ("resnet50", 4096, 42, 10.0, 5.0, 2e-4, True, 0.1),
}
IMAGENET_TRAIN_EXAMPLES = 1_281_167
_MODELS = {}  # One build per architecture keeps the test at a few seconds each.


def _config(name: str, data_dir: pathlib.Path) -> config.Config:
    """The recipe's Config, on a folder that looks like ImageNet's TFRecords."""
    (data_dir / "train-00000-of-00001").write_bytes(b"")
    flag_values = flags.FlagValues()
    config.define_flags(flag_values)
    path = os.path.join(RECIPES_DIR, f"{name}.flags")
    flag_values(["train.main", f"--flagfile={path}", f"--data_dir={data_dir}"])
    flag_values["model_dir"].value = str(data_dir / "run")
    return config.from_flag_values(flag_values)


def _model(name: str) -> keras.Model:
    if name not in _MODELS:
        _MODELS[name] = models.build_model(name, 1000, 224, 3)
    return _MODELS[name]


def test_every_recipe_file_is_covered():
    found = sorted(
        os.path.basename(path)[: -len(".flags")]
        for path in glob.glob(os.path.join(RECIPES_DIR, "*.flags"))
    )
    assert found == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_parses_and_builds_model_and_optimizer(name, tmp_path):
    model_name, batch, epochs, peak, warmup, decay, excluded, smoothing = EXPECTED[name]
    c = _config(name, tmp_path)
    assert sources.SOURCES["imagenet"].train_examples == IMAGENET_TRAIN_EXAMPLES
    steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // batch
    assert (c.model, c.global_batch_size, c.steps_per_epoch) == (
        model_name,
        batch,
        steps_per_epoch,
    )
    assert c.train_steps == round(epochs * steps_per_epoch)
    assert (c.data.name, c.optimizer, c.lr_schedule, c.poly_power) == (
        "imagenet",
        "lars",
        "poly",
        2.0,
    )
    augmentation = "extended" if name.startswith("mlperf") else "minimal"
    assert (c.data.num_classes, c.data.image_size, c.augmentation) == (
        1000,
        224,
        augmentation,
    )
    assert c.label_smoothing == smoothing
    assert c.exclude_bias_and_norm is excluded
    assert c.warmup_steps == round(warmup * steps_per_epoch)
    assert c.peak_learning_rate == pytest.approx(peak)

    learning_rate = optimizers.learning_rate_schedule(c)
    assert float(learning_rate(0)) == 0.0
    assert float(learning_rate(c.warmup_steps)) == pytest.approx(peak)
    assert float(learning_rate(c.train_steps)) == pytest.approx(c.end_learning_rate)

    model = _model(model_name)
    optimizer = optimizers.build_optimizer(c, model)
    assert isinstance(optimizer, lars_tf.LARS)
    assert optimizer.coupled_weight_decay == pytest.approx(decay)
    assert optimizer.trust_coefficient == pytest.approx(0.001)
    assert optimizer.momentum == pytest.approx(0.9)
    exclusion = optimizer.exclude_from_adaptation
    assert (exclusion is lars_tf.exclude_bias_and_norm) is excluded
    assert len(optimizer.momentums) == len(model.trainable_variables)
