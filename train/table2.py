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


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defines this command's flags on `flag_values` (`flags.FLAGS` when run)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("model", "alexnet_bn", "Model name (train.models).", **fv)
    flags.DEFINE_integer("batch_size", 64, "Examples in the probe batch.", **fv)
    flags.DEFINE_integer("image_size", 224, "Image height and width.", **fv)
    flags.DEFINE_integer("num_classes", 1000, "Number of classes.", **fv)
    flags.DEFINE_float("learning_rate", 1.0, "Global LARS rate.", **fv)
    flags.DEFINE_float("trust_coefficient", 0.001, "LARS eta.", **fv)
    flags.DEFINE_float("weight_decay", 0.0005, "Coupled weight decay.", **fv)
    flags.DEFINE_integer("seed", 0, "Seed of the weights and the data.", **fv)


def main(argv: list[str]) -> None:
    """Builds the model, measures one batch and prints the table."""
    del argv
    f = flags.FLAGS
    import keras  # After flag parsing, so --help does not start TensorFlow.

    from lars_tf import TrustRatioMonitor
    from lars_tf.lars import LARS
    from train.data import make_input_fn
    from train.models import build_model

    keras.utils.set_random_seed(f.seed)
    model = build_model(f.model, f.num_classes, f.image_size)
    model.compile(
        optimizer=LARS(
            f.learning_rate,
            trust_coefficient=f.trust_coefficient,
            weight_decay=f.weight_decay,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    dataset = make_input_fn(
        source="synthetic",
        split="train",
        data_dir=None,
        global_batch_size=f.batch_size,
        image_size=f.image_size,
        num_classes=f.num_classes,
        seed=f.seed,
    )()
    images, labels = next(iter(dataset))
    monitor = TrustRatioMonitor((images, labels))
    monitor.set_model(model)
    print(
        f"{f.model}, iteration 1 (initial weights), batch {f.batch_size} "
        f"of synthetic {f.image_size}x{f.image_size} images; LARS lr = "
        f"{f.learning_rate} * trust ratio (eta={f.trust_coefficient}, "
        f"weight decay={f.weight_decay})"
    )
    print(monitor.format_table(monitor.measure()))


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
