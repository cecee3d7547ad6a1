"""The large-batch study: SGD vs LARS as the batch grows, at small scale on real images.

The paper (You, Gitman & Ginsburg 2017) claims that linear learning-rate scaling
with warm-up loses accuracy as the batch grows, while LARS keeps it. This script
checks the claim on MNIST (and on Imagenette downscaled to 64x64) with the small
AlexNet-BN-like net of ``train/models.py``::

    python -m experiments.large_batch_study                    # the MNIST grid
    python -m experiments.large_batch_study --part=imagenette  # the second table
    python -m experiments.large_batch_study --report           # tables and plots
    python -m experiments.large_batch_study --dry_run          # list the runs

Every run trains for the same number of epochs with the same schedule: the peak
rate is ``base_lr * batch / base_batch`` (linear scaling), reached by a linear
warm-up of ``--warmup_epochs`` from 0 and then decayed to 0 by poly(2). SGD is
Keras's momentum SGD with one base rate for every batch (the rate a user tuned at
the base batch); LARS (``lars_tf.LARS``, the paper's Algorithm 1: every variable
adapted) gets the best of a small grid of base rates at each batch. Neither uses
weight decay, so the only difference between the two arms is the trust ratio.
For a given seed both arms start from the same weights and see the same examples
in the same order.

Each finished run writes ``<output_dir>/runs/<run_id>.json`` (config, per-epoch
test top-1, final and best top-1, diverged flag, wall time). Runs whose JSON exists
are skipped, so the grid can be stopped and restarted at any time; ``--report``
rebuilds the markdown tables and PNG plots from the JSONs alone.

Matplotlib is needed for ``--report`` only (``pip install lars-tf[study]``).
"""

import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Sequence

from absl import app, flags, logging

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("mnist", "imagenette", "tfds_mnist", "tfds_fashion_mnist", "tfds_cifar10")
OPTIMIZERS = ("sgd", "lars")
EVAL_BATCH_SIZE = 1000
# Training examples whose statistics --precise_bn averages (whole batches).
PRECISE_BN_EXAMPLES = 4096
# A run whose final test top-1 is at most this multiple of chance learned nothing.
DIVERGED_CHANCE_MULTIPLE = 2.0


@dataclasses.dataclass(frozen=True)
class PartSettings:
    """The defaults of one part of the study (each can be overridden by a flag)."""

    source: str  # train.data source name
    tfds_name: str | None  # For source "tfds".
    image_size: int
    augmentation: str
    base_batch_size: int  # The batch the base rates refer to.
    batch_sizes: tuple[int, ...]
    epochs: int
    warmup_epochs: float
    sgd_base_lr: float
    lars_base_lrs: tuple[float, ...]
    repeat_seeds: tuple[int, ...]


PART_SETTINGS = {
    "mnist": PartSettings(
        source="mnist",
        tfds_name=None,
        image_size=28,
        augmentation="none",
        base_batch_size=128,
        batch_sizes=(128, 512, 2048, 4096, 8192),
        epochs=3,
        warmup_epochs=1.0,
        sgd_base_lr=0.05,
        lars_base_lrs=(0.25, 1.0, 4.0),
        repeat_seeds=(1, 2),
    ),
    # 9,469 training images: batch 2048 is 4 steps an epoch, 32x the base.
    "imagenette": PartSettings(
        source="imagenet",
        tfds_name=None,
        image_size=64,
        augmentation="minimal",
        base_batch_size=64,
        batch_sizes=(64, 2048),
        epochs=10,
        warmup_epochs=2.0,
        sgd_base_lr=0.025,
        lars_base_lrs=(0.125, 0.5, 2.0),
        repeat_seeds=(),
    ),
}
# For machines where TFDS can download: the MNIST grid on TFDS's copy of MNIST,
# Fashion-MNIST or CIFAR-10 (prepared beforehand; the input pipeline never
# downloads). CIFAR-10 gets 32x32 images and the minimal augmentation.
for _name in ("mnist", "fashion_mnist", "cifar10"):
    PART_SETTINGS[f"tfds_{_name}"] = dataclasses.replace(
        PART_SETTINGS["mnist"],
        source="tfds",
        tfds_name=_name,
        image_size=32 if _name == "cifar10" else 28,
        augmentation="minimal" if _name == "cifar10" else "none",
    )


def default_part_data_dir(part: str, shared_data_dir: str) -> str | None:
    """MNIST's IDX files in the shared data folder; for Imagenette, the TFRecords
    that ``train.convert_images`` writes into the git-ignored ``runs/`` (STUDY.md
    has the command); None (TFDS's default folder) for the TFDS parts."""
    if part == "mnist":
        return os.path.join(shared_data_dir, "mnist")
    if part == "imagenette":
        return os.path.join(REPO_ROOT, "runs", "imagenette_records")
    return None  # TFDS's own default data dir.


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the script's flags on absl's global FLAGS; called only when it runs
    as a script, so importing the module (tests) leaves FLAGS to train.main."""
    flags.DEFINE_enum("part", "mnist", PARTS, "Which part of the study to run.")
    flags.DEFINE_string(
        "output_dir",
        os.path.join(REPO_ROOT, "experiments", "results"),
        "Folder of the per-run JSON summaries (runs/<run_id>.json), committed so "
        "the tables can be rebuilt and the study resumed in another session.",
    )
    flags.DEFINE_string(
        "data_dir",
        None,
        "Folder holding mnist/; default $LARS_TF_DATA_DIR, else ../shared/data.",
    )
    flags.DEFINE_string(
        "part_data_dir",
        None,
        "The part's own data folder; default <data_dir>/mnist, "
        "runs/imagenette_records for Imagenette, TFDS's data dir for tfds_*.",
    )
    flags.DEFINE_string("model", "small_alexnet_bn", "train.models model name.")
    flags.DEFINE_list("batch_sizes", None, "Batch sizes; default per part.")
    flags.DEFINE_integer(
        "base_batch_size", None, "Batch the base rates refer to; default per part."
    )
    flags.DEFINE_integer("epochs", None, "Epochs of every run; default per part.")
    flags.DEFINE_float("warmup_epochs", None, "Linear warm-up; default per part.")
    flags.DEFINE_float("sgd_base_lr", None, "SGD rate at the base batch.")
    flags.DEFINE_list("lars_base_lrs", None, "LARS base rates tried at every batch.")
    flags.DEFINE_float("momentum", 0.9, "Momentum of both optimizers.")
    flags.DEFINE_float("trust_coefficient", 0.001, "LARS trust coefficient (eta).")
    flags.DEFINE_integer("seed", 0, "Seed of the grid.")
    flags.DEFINE_list(
        "repeat_seeds",
        None,
        "Extra seeds for the base, 32x-base and largest batch (LARS at its best "
        "rate); default per part.",
    )
    flags.DEFINE_integer(
        "train_examples", None, "Train on this many examples per epoch (smoke runs)."
    )
    flags.DEFINE_integer(
        "eval_examples", None, "Evaluate on this many test examples (smoke runs)."
    )
    flags.DEFINE_bool(
        "precise_bn",
        False,
        "Test with BN statistics recomputed on training batches after training "
        "(the moving averages' result is kept as final_top1_moving_bn).",
    )
    flags.DEFINE_bool(
        "extend_grid",
        True,
        "Try one more LARS rate past the grid's edge when a batch's best rate "
        "lies on it (--noextend_grid: exactly the rates given).",
    )
    flags.DEFINE_bool("dry_run", False, "Print the pending runs and exit.")
    flags.DEFINE_bool("report", False, "Rebuild tables and plots from the JSONs only.")
    flags.DEFINE_string(
        "report_dir",
        os.path.join(REPO_ROOT, "experiments", "results"),
        "Where --report writes <part>.md and the PNG plots.",
    )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run of the grid; its fields identify it."""

    part: str
    model: str
    optimizer: str
    batch_size: int
    base_lr: float
    base_batch_size: int
    epochs: int
    warmup_epochs: float
    seed: int
    # Trainable parameters of the model when the grid started: a changed model in
    # train/models.py gives new run ids instead of silently mixing two nets.
    model_params: int = 0
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    train_examples: int | None = None
    eval_examples: int | None = None
    # Test with BN statistics recomputed on training data after training
    # ("precise BN"), instead of the moving averages, which lag behind when a
    # large batch gives only a few dozen steps.
    precise_bn: bool = False

    @property
    def run_id(self) -> str:
        run_id = (
            f"{self.part}_{self.model}_{self.optimizer}_b{self.batch_size}"
            f"_lr{self.base_lr:g}_e{self.epochs}_w{self.warmup_epochs:g}"
            f"_s{self.seed}_p{self.model_params}"
        )
        if self.optimizer == "lars" and self.trust_coefficient != 0.001:
            run_id += f"_eta{self.trust_coefficient:g}"
        if self.train_examples or self.eval_examples:
            run_id += f"_n{self.train_examples}-{self.eval_examples}"
        if self.precise_bn:
            run_id += "_pbn"
        return run_id

    @property
    def peak_lr(self) -> float:
        import lars_tf

        return lars_tf.scaled_learning_rate(
            self.base_lr, self.batch_size, self.base_batch_size
        )


def run_path(output_dir: str, config: RunConfig) -> str:
    return os.path.join(output_dir, "runs", f"{config.run_id}.json")


def config_of(summary: dict) -> RunConfig:
    """The RunConfig of a summary; fields added since it was written get their
    defaults, so old JSONs stay comparable."""
    return RunConfig(**summary["config"])


def _without_seed(summary: dict) -> RunConfig:
    return dataclasses.replace(config_of(summary), seed=0)


def load_summaries(output_dir: str) -> list[dict]:
    """Every finished run's summary under ``output_dir/runs``, sorted by run id."""
    runs_dir = os.path.join(output_dir, "runs")
    if not os.path.isdir(runs_dir):
        return []
    summaries = []
    for name in sorted(os.listdir(runs_dir)):
        if name.endswith(".json"):
            with open(os.path.join(runs_dir, name)) as f:
                summaries.append(json.load(f))
    return summaries


# ----------------------------------------------------------------------------
# Training one run


def train_one(config: RunConfig, data_dir: str | None) -> dict:
    """Trains one configuration and returns its summary (see the module doc)."""
    import keras

    import lars_tf
    from train import data, models

    settings = PART_SETTINGS[config.part]
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)
    info = data.dataset_info(settings.source, data_dir, settings.tfds_name)
    train_examples = config.train_examples or info.num_train_examples
    steps_per_epoch = train_examples // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch {config.batch_size} is larger than the {train_examples} "
            "training examples"
        )
    common = dict(
        source=settings.source,
        tfds_name=settings.tfds_name,
        data_dir=data_dir,
        image_size=settings.image_size,
        augmentation=settings.augmentation,
        seed=config.seed,
        deterministic=True,  # Same data order for SGD and LARS.
    )
    train_data = data.make_input_fn(
        split="train",
        global_batch_size=config.batch_size,
        # The whole training set, so an epoch is a true random permutation.
        shuffle_buffer_size=info.num_train_examples,
        **common,
    )()
    eval_batch = min(EVAL_BATCH_SIZE, config.eval_examples or EVAL_BATCH_SIZE)
    eval_data = data.make_input_fn(
        split="validation", global_batch_size=eval_batch, **common
    )()
    if config.eval_examples:
        eval_data = eval_data.take(config.eval_examples // eval_batch)

    model = models.build_model(
        config.model, info.num_classes, settings.image_size, info.channels
    )
    params = sum(math.prod(v.shape) for v in model.trainable_variables)
    if config.model_params and params != config.model_params:
        raise RuntimeError(
            f"{config.model} has {params} trainable parameters, the grid was set "
            f"up for {config.model_params}: train/models.py changed; restart"
        )
    train_steps = config.epochs * steps_per_epoch
    schedule = lars_tf.WarmupPolynomialDecay(
        config.peak_lr,
        decay_steps=train_steps,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        power=2.0,
    )
    if config.optimizer == "lars":
        optimizer = lars_tf.LARS(
            schedule,
            momentum=config.momentum,
            trust_coefficient=config.trust_coefficient,
        )
    else:
        optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1")],
    )

    start = time.perf_counter()
    history = model.fit(
        train_data,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=eval_data,
        callbacks=[keras.callbacks.TerminateOnNaN()],
        verbose=2,
    ).history
    wall_time = time.perf_counter() - start
    test_top1 = [float(x) for x in history.get("val_top1", [])]
    train_loss = [float(x) for x in history.get("loss", [])]
    loss_not_finite = any(not math.isfinite(x) for x in train_loss)
    if loss_not_finite or len(test_top1) < config.epochs:
        # TerminateOnNaN stopped the run inside an epoch: test the final weights.
        final_top1 = float(
            model.evaluate(eval_data, verbose=0, return_dict=True)["top1"]
        )
    else:
        final_top1 = test_top1[-1]
    moving_bn_top1 = None
    if config.precise_bn and not loss_not_finite:
        moving_bn_top1 = final_top1
        batches = -(-PRECISE_BN_EXAMPLES // config.batch_size)
        recompute_bn_statistics(model, train_data, batches)
        final_top1 = float(
            model.evaluate(eval_data, verbose=0, return_dict=True)["top1"]
        )
    chance = 1.0 / info.num_classes
    return {
        "run_id": config.run_id,
        "config": dataclasses.asdict(config),
        "peak_lr": config.peak_lr,
        "steps_per_epoch": steps_per_epoch,
        "train_steps": train_steps,
        "test_top1_per_epoch": test_top1,
        "train_loss_per_epoch": train_loss,
        "final_top1": final_top1,
        "final_top1_moving_bn": moving_bn_top1,  # With --precise_bn only.
        "best_top1": max(test_top1 + [final_top1]),
        "diverged": loss_not_finite or final_top1 <= DIVERGED_CHANCE_MULTIPLE * chance,
        "loss_not_finite": loss_not_finite,
        "wall_time_s": wall_time,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def recompute_bn_statistics(model, train_data, batches: int) -> None:
    """Sets every BatchNormalization layer's moving mean and variance to the
    average over ``batches`` training batches of the batch statistics, computed
    with the final weights (a training-mode forward pass with momentum 0 per
    batch; the weights do not change)."""
    import keras

    layers = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    sums = [[0.0, 0.0] for _ in layers]
    for images, _ in train_data.take(batches):
        for layer in layers:
            layer.momentum = 0.0
        model(images, training=True)
        for total, layer in zip(sums, layers, strict=True):
            total[0] += layer.moving_mean.numpy()
            total[1] += layer.moving_variance.numpy()
    for total, layer, momentum in zip(sums, layers, momenta, strict=True):
        layer.moving_mean.assign(total[0] / batches)
        layer.moving_variance.assign(total[1] / batches)
        layer.momentum = momentum


def run_if_missing(config: RunConfig, output_dir: str, data_dir: str | None) -> bool:
    """Trains ``config`` unless its JSON exists; True when it trained."""
    path = run_path(output_dir, config)
    if os.path.exists(path):
        logging.info("skip %s (done)", config.run_id)
        return False
    logging.info("run %s (peak lr %g)", config.run_id, config.peak_lr)
    summary = train_one(config, data_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(partial, path)  # A killed run never leaves a half-written JSON.
    logging.info(
        "done %s: final top-1 %.4f, best %.4f, diverged %s, %.0f s",
        config.run_id,
        summary["final_top1"],
        summary["best_top1"],
        summary["diverged"],
        summary["wall_time_s"],
    )
    return True


# ----------------------------------------------------------------------------
# The grid


def grid_configs(
    part: str,
    model: str,
    batch_sizes: Sequence[int],
    base_batch_size: int,
    epochs: int,
    warmup_epochs: float,
    sgd_base_lr: float,
    lars_base_lrs: Sequence[float],
    seed: int,
    **run_fields,
) -> list[RunConfig]:
    """The seed-``seed`` grid: for each batch (increasing), SGD at
    ``sgd_base_lr`` then LARS at each of ``lars_base_lrs``."""
    ordered = sorted(set(batch_sizes))
    shared = dict(
        part=part,
        model=model,
        base_batch_size=base_batch_size,
        epochs=epochs,
        warmup_epochs=warmup_epochs,
        seed=seed,
        **run_fields,
    )
    configs = []
    for batch in ordered:
        configs.append(
            RunConfig(optimizer="sgd", batch_size=batch, base_lr=sgd_base_lr, **shared)
        )
        for lr in lars_base_lrs:
            configs.append(
                RunConfig(optimizer="lars", batch_size=batch, base_lr=lr, **shared)
            )
    return configs


def best_lars_lr(summaries: Iterable[dict], config: RunConfig) -> float | None:
    """The LARS base rate with the best final top-1 among finished runs that
    differ from ``config`` only in their base rate; None when there are none."""
    candidates = [
        s
        for s in summaries
        if s["config"]["optimizer"] == "lars"
        and dataclasses.replace(config_of(s), base_lr=config.base_lr) == config
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda s: s["final_top1"])["config"]["base_lr"]


def lars_grid_extension(
    batch_configs: Sequence[RunConfig], summaries: list[dict]
) -> RunConfig | None:
    """One more LARS rate for a batch whose best grid rate lies on the grid's
    edge: one grid step (the ratio of the two lowest rates, else 4) beyond it.

    ``batch_configs`` are one batch's grid runs (all finished); None when the
    best rate is inside the grid or there is no LARS run.
    """
    lars = sorted(
        (c for c in batch_configs if c.optimizer == "lars"), key=lambda c: c.base_lr
    )
    if not lars:
        return None
    best = best_lars_lr(summaries, lars[0])
    step = lars[1].base_lr / lars[0].base_lr if len(lars) > 1 else 4.0
    if best == lars[0].base_lr:
        return dataclasses.replace(lars[0], base_lr=best / step)
    if best == lars[-1].base_lr:
        return dataclasses.replace(lars[0], base_lr=best * step)
    return None


def claim_batches(batch_sizes: Iterable[int]) -> set[int]:
    """The batches the paper's claim is about: the base, 32x the base (when in
    the grid) and the largest. They run first and are repeated over seeds."""
    batch_sizes = set(batch_sizes)
    base = min(batch_sizes)
    return {base, max(batch_sizes)} | ({32 * base} & batch_sizes)


def repeat_configs(
    grid: Sequence[RunConfig], summaries: list[dict], repeat_seeds: Sequence[int]
) -> list[RunConfig]:
    """The claim's batches (``claim_batches``) again over ``repeat_seeds``: SGD
    at its rate, LARS at the best rate of the grid's seed (needs those runs)."""
    repeated = claim_batches(c.batch_size for c in grid)
    configs = []
    for seed in repeat_seeds:
        for batch in sorted(repeated):
            at_batch = [c for c in grid if c.batch_size == batch]
            for config in at_batch:
                if config.optimizer == "sgd":
                    configs.append(dataclasses.replace(config, seed=seed))
            lars = [c for c in at_batch if c.optimizer == "lars"]
            # The best rate may be a grid extension (lars_grid_extension).
            best = best_lars_lr(summaries, lars[0]) if lars else None
            if best is not None:
                configs.append(dataclasses.replace(lars[0], base_lr=best, seed=seed))
    return configs


# ----------------------------------------------------------------------------
# Report: tables and plots from the JSONs


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if len(values) == 1:
        return values[0], 0.0
    return statistics.mean(values), statistics.stdev(values)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def runs_table(summaries: Sequence[dict]) -> str:
    """Markdown: one row per run, sorted by batch, optimizer, rate, seed. Runs
    with --precise_bn get a column for the moving averages' top-1."""
    precise = any(s.get("final_top1_moving_bn") is not None for s in summaries)
    moving_header = " top-1 with moving BN (%) |" if precise else ""
    rows = [
        "| batch | optimizer | base LR | peak LR | warm-up (epochs) | seed "
        f"| final top-1 (%) |{moving_header} best top-1 (%) | diverged? | wall (s) |",
        "|---:|---|---:|---:|---:|---:|---:|"
        + ("---:|" if precise else "")
        + "---:|---|---:|",
    ]
    key = lambda s: (  # noqa: E731
        s["config"]["batch_size"],
        s["config"]["optimizer"] != "sgd",
        s["config"]["base_lr"],
        s["config"]["seed"],
    )
    for s in sorted(summaries, key=key):
        c = s["config"]
        moving = ""
        if precise:
            value = s.get("final_top1_moving_bn")
            moving = f" {'—' if value is None else _percent(value)} |"
        rows.append(
            f"| {c['batch_size']} | {c['optimizer'].upper()} | {c['base_lr']:g} "
            f"| {s['peak_lr']:g} | {c['warmup_epochs']:g} | {c['seed']} "
            f"| {_percent(s['final_top1'])} |{moving} {_percent(s['best_top1'])} "
            f"| {'yes' if s['diverged'] else 'no'} | {s['wall_time_s']:.0f} |"
        )
    return "\n".join(rows)


def best_per_batch(summaries: Sequence[dict], seed: int) -> dict:
    """{(batch, optimizer): the seed-``seed`` summary with the best final top-1}."""
    best = {}
    for s in summaries:
        c = s["config"]
        if c["seed"] != seed:
            continue
        key = (c["batch_size"], c["optimizer"])
        if key not in best or s["final_top1"] > best[key]["final_top1"]:
            best[key] = s
    return best


def seed_statistics(summaries: Sequence[dict], chosen: dict) -> dict:
    """{(batch, optimizer): (mean, spread, n)} of the final top-1 over the seeds
    of every run that differs from ``chosen[key]`` only in its seed."""
    stats = {}
    for key, pick in chosen.items():
        same = _without_seed(pick)
        finals = [s["final_top1"] for s in summaries if _without_seed(s) == same]
        mean, spread = mean_and_spread(finals)
        stats[key] = (mean, spread, len(finals))
    return stats


def summary_table(summaries: Sequence[dict], seed: int) -> str:
    """Markdown: per batch, SGD and the best LARS rate, mean +- std over seeds."""
    chosen = best_per_batch(summaries, seed)
    stats = seed_statistics(summaries, chosen)
    rows = [
        "| batch | SGD base LR | SGD final top-1 (%) | LARS best base LR "
        "| LARS final top-1 (%) | seeds (SGD/LARS) |",
        "|---:|---:|---:|---:|---:|---|",
    ]

    def cell(key):
        if key not in stats:
            return "—"
        mean, spread, n = stats[key]
        text = _percent(mean) + (f" ± {_percent(spread)}" if n > 1 else "")
        return text + (" (diverged)" if chosen[key]["diverged"] else "")

    for batch in sorted({b for b, _ in chosen}):
        sgd, lars = (batch, "sgd"), (batch, "lars")
        sgd_lr = f"{chosen[sgd]['config']['base_lr']:g}" if sgd in chosen else "—"
        lars_lr = f"{chosen[lars]['config']['base_lr']:g}" if lars in chosen else "—"
        counts = f"{stats.get(sgd, (0, 0, 0))[2]}/{stats.get(lars, (0, 0, 0))[2]}"
        rows.append(
            f"| {batch} | {sgd_lr} | {cell(sgd)} | {lars_lr} | {cell(lars)} "
            f"| {counts} |"
        )
    return "\n".join(rows)


def plot_accuracy_vs_batch(summaries: Sequence[dict], seed: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = best_per_batch(summaries, seed)
    stats = seed_statistics(summaries, chosen)
    all_batches = sorted({b for b, _ in stats})
    base_sgd = (min(all_batches), "sgd")
    # Left: the whole range (divergence); right: zoomed on the base accuracy.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax in axes:
        for optimizer, label in (
            ("sgd", "SGD + warm-up (linear scaling)"),
            ("lars", "LARS (best base LR)"),
        ):
            batches = sorted(b for b, o in stats if o == optimizer)
            means = [100 * stats[(b, optimizer)][0] for b in batches]
            spreads = [100 * stats[(b, optimizer)][1] for b in batches]
            ax.errorbar(
                batches, means, yerr=spreads, marker="o", capsize=3, label=label
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_batches, [str(b) for b in all_batches])
        ax.minorticks_off()
        if base_sgd in stats:  # The claim: within 1 point of the base batch.
            ax.axhline(
                100 * stats[base_sgd][0] - 1.0,
                color="gray",
                linestyle="--",
                label="base-batch SGD - 1 point",
            )
        ax.set_xlabel("batch size")
        ax.set_ylabel("final test top-1 (%)")
        ax.grid(True, alpha=0.3)
    if base_sgd in stats:
        base = 100 * stats[base_sgd][0]
        axes[1].set_ylim(base - 4.0, min(100.0, base + 1.0))
        axes[1].set_title("zoom: base accuracy - 4 points and up", fontsize=10)
    part = summaries[0]["config"]["part"] if summaries else ""
    label = setting_label(config_of(summaries[0])) if summaries else ""
    axes[0].set_title(f"{part} {label}: accuracy vs batch size", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_epoch(summaries: Sequence[dict], seed: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = best_per_batch(summaries, seed)
    largest = max(b for b, _ in chosen)
    fig, ax = plt.subplots(figsize=(6, 4))
    for optimizer in OPTIMIZERS:
        if (largest, optimizer) not in chosen:
            continue
        pick = chosen[(largest, optimizer)]["config"]
        for s in summaries:
            if _without_seed(s) != _without_seed(chosen[(largest, optimizer)]):
                continue
            curve = [100 * x for x in s["test_top1_per_epoch"]]
            ax.plot(
                range(1, len(curve) + 1),
                curve,
                marker="o",
                color="C0" if optimizer == "sgd" else "C1",
                alpha=1.0 if s["config"]["seed"] == seed else 0.4,
                label=f"{optimizer.upper()} base LR {pick['base_lr']:g}"
                if s["config"]["seed"] == seed
                else None,
            )
    epochs = chosen[(largest, "sgd" if (largest, "sgd") in chosen else "lars")]
    ax.set_xticks(range(1, epochs["config"]["epochs"] + 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"batch {largest}: test accuracy per epoch (faint: other seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setting_label(config: RunConfig) -> str:
    """What runs must share to be compared in one table: everything but the
    optimizer, batch, rate and seed (e.g. ``small_alexnet_bn_e3_w1``)."""
    label = f"{config.model}_e{config.epochs}_w{config.warmup_epochs:g}"
    if config.trust_coefficient != 0.001:
        label += f"_eta{config.trust_coefficient:g}"
    if config.momentum != 0.9:
        label += f"_m{config.momentum:g}"
    if config.base_batch_size != PART_SETTINGS[config.part].base_batch_size:
        label += f"_base{config.base_batch_size}"
    if config.train_examples or config.eval_examples:
        label += f"_n{config.train_examples}-{config.eval_examples}"
    if config.precise_bn:
        label += "_pbn"
    return label


def write_report(output_dir: str, report_dir: str, part: str, seed: int) -> str:
    """Writes ``<part>.md`` and, per setting (``setting_label``), two PNGs
    ``<part>_<setting>_*.png`` into ``report_dir``; returns the markdown."""
    summaries = [s for s in load_summaries(output_dir) if s["config"]["part"] == part]
    if not summaries:
        raise FileNotFoundError(f"no {part} runs in {output_dir}/runs")
    os.makedirs(report_dir, exist_ok=True)
    groups = {}
    for summary in summaries:
        groups.setdefault(setting_label(config_of(summary)), []).append(summary)
    sections = []
    for label, group in sorted(groups.items()):
        name = f"{part}_{label}"
        plot_accuracy_vs_batch(
            group, seed, os.path.join(report_dir, f"{name}_accuracy_vs_batch.png")
        )
        plot_accuracy_vs_epoch(
            group, seed, os.path.join(report_dir, f"{name}_largest_batch_curves.png")
        )
        sections += [
            f"## {name}: summary (seed {seed} picks the LARS rate; ± is the "
            "sample std over seeds)",
            summary_table(group, seed),
            f"Plots: `{name}_accuracy_vs_batch.png`, "
            f"`{name}_largest_batch_curves.png`.",
            f"## {name}: every run ({len(group)} finished)",
            runs_table(group),
        ]
    markdown = "\n\n".join(sections)
    with open(os.path.join(report_dir, f"{part}.md"), "w") as f:
        f.write(markdown + "\n")
    return markdown


# ----------------------------------------------------------------------------


def _part_value(name: str, settings: PartSettings, convert=None):
    value = getattr(FLAGS, name)
    if value is None:
        return getattr(settings, name)
    if convert is not None:
        return tuple(convert(v) for v in value)
    return value


def count_trainable_params(model_name: str, part: str, data_dir: str | None) -> int:
    """Trainable parameters of ``model_name`` built for ``part``'s images."""
    import keras

    from train import data, models

    settings = PART_SETTINGS[part]
    info = data.dataset_info(settings.source, data_dir, settings.tfds_name)
    model = models.build_model(
        model_name, info.num_classes, settings.image_size, info.channels
    )
    count = sum(math.prod(v.shape) for v in model.trainable_variables)
    keras.backend.clear_session()
    return int(count)


def main(argv: list[str]) -> None:
    del argv
    # Keras says this when the test set (of unknown length) ends, every time.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
    settings = PART_SETTINGS[FLAGS.part]
    if FLAGS.report:
        print(write_report(FLAGS.output_dir, FLAGS.report_dir, FLAGS.part, FLAGS.seed))
        return
    from train import data

    data_dir = FLAGS.part_data_dir or default_part_data_dir(
        FLAGS.part, FLAGS.data_dir or data.shared_data_dir()
    )
    grid = grid_configs(
        part=FLAGS.part,
        model=FLAGS.model,
        batch_sizes=_part_value("batch_sizes", settings, int),
        base_batch_size=_part_value("base_batch_size", settings),
        epochs=_part_value("epochs", settings),
        warmup_epochs=_part_value("warmup_epochs", settings),
        sgd_base_lr=_part_value("sgd_base_lr", settings),
        lars_base_lrs=_part_value("lars_base_lrs", settings, float),
        seed=FLAGS.seed,
        model_params=count_trainable_params(FLAGS.model, FLAGS.part, data_dir),
        momentum=FLAGS.momentum,
        trust_coefficient=FLAGS.trust_coefficient,
        train_examples=FLAGS.train_examples,
        eval_examples=FLAGS.eval_examples,
        precise_bn=FLAGS.precise_bn,
    )
    repeat_seeds = _part_value("repeat_seeds", settings, int)
    # The claim's batches first, with their repeats, so that a grid cut short
    # still answers the question; then the batches in between.
    first = claim_batches(c.batch_size for c in grid)
    claim_runs = [c for c in grid if c.batch_size in first]
    other_runs = [c for c in grid if c.batch_size not in first]
    if FLAGS.dry_run:
        done = lambda c: os.path.exists(run_path(FLAGS.output_dir, c))  # noqa: E731
        print(f"{sum(map(done, grid))} of {len(grid)} grid runs done. In order:")
        for config in claim_runs:
            print(f"  {'done' if done(config) else '    '} {config.run_id}")
        extension = (
            "each batch: + one LARS rate past the grid's edge when the best is on it; "
            if FLAGS.extend_grid
            else ""
        )
        print(
            f"  ({extension}then seeds {list(repeat_seeds)} of batches "
            f"{sorted(first)} (LARS at its best rate), then:"
        )
        for config in other_runs:
            print(f"  {'done' if done(config) else '    '} {config.run_id}")
        return

    def run_batches(configs: list[RunConfig]) -> None:
        """Each batch's grid, then its LARS grid extension if the best is on
        an edge."""
        for batch in sorted({c.batch_size for c in configs}):
            batch_configs = [c for c in configs if c.batch_size == batch]
            for config in batch_configs:
                run_if_missing(config, FLAGS.output_dir, data_dir)
            if not FLAGS.extend_grid:
                continue
            summaries = load_summaries(FLAGS.output_dir)
            extension = lars_grid_extension(batch_configs, summaries)
            if extension is not None:
                run_if_missing(extension, FLAGS.output_dir, data_dir)

    run_batches(claim_runs)
    repeats = repeat_configs(grid, load_summaries(FLAGS.output_dir), repeat_seeds)
    for config in repeats:
        run_if_missing(config, FLAGS.output_dir, data_dir)
    run_batches(other_runs)
    logging.info("all %d runs done", len(grid) + len(repeats))


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
