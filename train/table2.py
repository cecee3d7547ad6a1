"""Prints the LARS paper's Table 2 for a fresh model: python -m train.table2

Table 2 of You, Gitman & Ginsburg (2017) lists, for AlexNet-BN at iteration 1,
each layer's ||w||, ||∇w|| and their ratio, which spans orders of magnitude
across layers: the reason one global learning rate is too large for some layers
and too small for others. This measures the same on one batch of the training
app's synthetic data (random images and labels), with `TrustRatioMonitor`, and
adds the learning rate LARS gives each variable.

It lives in the app, not in `lars_tf`, because it uses the app's models and
input pipeline (`train.models`, `train.data`); the library depends on neither.
"""

from absl import app, flags

_MODEL = flags.DEFINE_string("model", "alexnet_bn", "Model name (train.models).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Examples in the probe batch.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image height and width.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Number of classes.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1.0, "Global LARS rate.")
_TRUST_COEFFICIENT = flags.DEFINE_float("trust_coefficient", 0.001, "LARS eta.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.0005, "Coupled weight decay.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and the data.")


def main(argv: list[str]) -> None:
    """Builds the model, measures one batch and prints the table."""
    del argv
    import keras  # After flag parsing, so --help does not start TensorFlow.

    from lars_tf import TrustRatioMonitor
    from lars_tf.lars import LARS
    from train.data import make_input_fn
    from train.models import build_model

    keras.utils.set_random_seed(_SEED.value)
    model = build_model(_MODEL.value, _NUM_CLASSES.value, _IMAGE_SIZE.value)
    model.compile(
        optimizer=LARS(
            _LEARNING_RATE.value,
            trust_coefficient=_TRUST_COEFFICIENT.value,
            weight_decay=_WEIGHT_DECAY.value,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    dataset = make_input_fn(
        source="synthetic",
        split="train",
        data_dir=None,
        global_batch_size=_BATCH_SIZE.value,
        image_size=_IMAGE_SIZE.value,
        num_classes=_NUM_CLASSES.value,
        seed=_SEED.value,
    )()
    images, labels = next(iter(dataset))
    monitor = TrustRatioMonitor((images, labels))
    monitor.set_model(model)
    print(
        f"{_MODEL.value}, iteration 1 (initial weights), batch {_BATCH_SIZE.value} "
        f"of synthetic {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value} images; LARS lr = "
        f"{_LEARNING_RATE.value} * trust ratio (eta={_TRUST_COEFFICIENT.value}, "
        f"weight decay={_WEIGHT_DECAY.value})"
    )
    print(monitor.format_table(monitor.measure()))


if __name__ == "__main__":
    app.run(main)
