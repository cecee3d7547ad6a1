"""What every benchmark shares: its common flags, interleaved rounds, medians,
the machine line, the JSON file of its figures, and the workloads more than
one benchmark times (ResNet-50's variable shapes, LARS's settings).

Run a benchmark from the checkout's root, `python -m benchmarks.<name>
[--flag=value ...]`. Every benchmark takes `--rounds` and `--output`, and
writes `benchmarks/results/<name>.json` (or `--output`):
`{"benchmark", "command", "machine", "figures"}`. A flag error is one line on
stderr and exit status 2, as in the app.

Candidates run interleaved: each round runs every candidate once, starting at
the next candidate each round, so load from other processes hits all alike.
Figures are medians over rounds with their 25th-75th percentiles; ratios are
taken per round (candidate / reference in the same round), then summarized.
CPU time is this process's (all threads), which other processes' load
disturbs far less than wall time.

This module imports neither TensorFlow nor JAX (nor does `train.config`,
whose atomic write it uses): the JAX benchmarks run where
TensorFlow is not installed, which is why ResNet-50's shapes are read from
`resnet50_shapes.json` (written from `train.models` by `write_resnet50_shapes`;
a test checks it against the model).
"""

import contextlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from absl import app, flags

from train import RunError
from train import config as config_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer(
    "rounds", 5, "Interleaved rounds of all candidates.", lower_bound=1
)
flags.DEFINE_string(
    "output", None, "JSON file of the figures; default benchmarks/results/<name>.json."
)

RESULTS_DIR = Path(__file__).parent / "results"
SHAPES_FILE = Path(__file__).parent / "resnet50_shapes.json"
# LARS as the tensorflow/tpu ResNet-50 reference sets it; every LARS candidate
# (and optax.lars) uses these, with `exclude_bias_and_norm` for both exclusions.
LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
TRUST_COEFFICIENT = 0.001


def fail(message: str) -> None:
    """A user error: one line on stderr, exit status 2."""
    print(f"benchmarks: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as error:
        fail("; ".join(str(error).splitlines()))


def run(main: Callable[[], None]) -> None:
    """Parses the flags (errors as `fail`), then calls `main()`."""

    def main_with_argv(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments: {' '.join(argv[1:])}")
        main()

    app.run(main_with_argv, flags_parser=_parse_flags)


def define_subset(name: str, choices, help_text: str) -> None:
    """A comma-separated list flag `--name` of some of `choices` (default:
    all), whose other values are one line naming the flag and the choices."""
    flags.DEFINE_list(name, list(choices), f"{help_text} (of {', '.join(choices)}).")
    flags.register_validator(
        name,
        lambda names: bool(names) and set(names) <= set(choices),
        f"--{name}: a comma-separated subset of {', '.join(choices)}",
    )


def set_defaults(**defaults) -> None:
    """A benchmark's own defaults for the common flags (e.g. `rounds=7`)."""
    for name, value in defaults.items():
        FLAGS.set_default(name, value)


def interleave(candidates: dict[str, Callable], rounds: int) -> dict[str, list]:
    """Each candidate's results, one per round, calling all once per round.

    Round `r` starts at candidate `r % len(candidates)`, so that no candidate
    always runs right after the same neighbour.
    """
    names = list(candidates)
    results = {name: [] for name in names}
    for index in range(rounds):
        start = index % len(names)
        for name in names[start:] + names[:start]:
            results[name].append(candidates[name]())
    return results


def timed(function: Callable, *args, **kwargs) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of `function(...)`."""
    wall, cpu = time.perf_counter(), time.process_time()
    function(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu


def step_times(
    candidates: dict[str, Callable[[int], None]], rounds: int, steps: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Wall and CPU seconds per step of each candidate, one value per round.

    A candidate is called with `steps` and returns when they are done.
    """
    results = interleave(
        {name: (lambda f=f: timed(f, steps)) for name, f in candidates.items()},
        rounds,
    )
    wall = {name: np.array([w for w, _ in r]) / steps for name, r in results.items()}
    cpu = {name: np.array([c for _, c in r]) / steps for name, r in results.items()}
    return wall, cpu


def summary(values) -> dict:
    """Median, 25th and 75th percentiles, min, max and the values themselves."""
    values = np.asarray(values, dtype=float)
    p25, median, p75 = np.percentile(values, [25, 50, 75])
    return {
        "median": float(median),
        "p25": float(p25),
        "p75": float(p75),
        "min": float(values.min()),
        "max": float(values.max()),
        "rounds": [float(v) for v in values],
    }


def ratio(values, reference) -> dict:
    """`summary` of the per-round ratios `values / reference`."""
    return summary(np.asarray(values, float) / np.asarray(reference, float))


def show(stats: dict, spec: str = ".3f") -> str:
    """`median [p25-p75]` of a `summary`."""
    return f"{stats['median']:{spec}} [{stats['p25']:{spec}}-{stats['p75']:{spec}}]"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table, as BENCHMARKS.md shows them."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join(
        "| " + " | ".join(str(cell) for cell in line) + " |" for line in lines
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    """Installed versions of the frameworks a benchmark may use (not imported)."""
    versions = {}
    for name in ("tensorflow", "tensorflow-cpu", "keras", "jax", "optax"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def machine() -> dict:
    """Where and when a run is made: CPU model, cores, load, versions."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "load_average": round(os.getloadavg()[0], 1),
        "python": platform.python_version(),
        **_versions(),
    }


def machine_line() -> str:
    """`machine()` as one line."""
    return ", ".join(f"{key} {value}" for key, value in machine().items())


def write_results(name: str, figures: dict) -> Path:
    """Writes `figures` with the command and machine line; returns the path."""
    path = Path(FLAGS.output) if FLAGS.output else RESULTS_DIR / f"{name}.json"
    record = {
        "benchmark": name,
        "command": " ".join(["python -m", f"benchmarks.{name}", *sys.argv[1:]]),
        "machine": machine(),
        "figures": figures,
    }
    # No `default=`: a figure JSON cannot hold (a NumPy scalar) is our bug.
    text = json.dumps(record, indent=1) + "\n"
    try:  # A kill or a full disk leaves the previous file whole.
        path.parent.mkdir(parents=True, exist_ok=True)
        with config_lib.written_atomically(str(path)) as temporary:
            Path(temporary).write_text(text)
    except OSError as error:
        fail(f"--output: could not write {path}: {error.strerror or error}")
    except RunError as error:  # "could not write <path>: <cause>"
        fail(f"--output: {error}")
    print(f"figures written to {path}", flush=True)
    return path


def resnet50_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """The shapes of `train.models.resnet50`'s 161 trainable variables, in order.

    25.6M values, 107 of them in biases and batch-norm vectors, at 1000
    classes and 224x224x3. `scale` < 1 shrinks every channel count (each
    dimension of 64 or more except the 1000 classes), for quick checks.
    """
    shapes = [tuple(entry["shape"]) for entry in json.loads(SHAPES_FILE.read_text())]
    if scale == 1.0:
        return shapes

    def scaled(size: int) -> int:
        return max(1, round(size * scale)) if size >= 64 and size != 1000 else size

    return [tuple(scaled(size) for size in shape) for shape in shapes]


def write_resnet50_shapes() -> None:
    """Writes `resnet50_shapes.json` from the app's model (imports TensorFlow)."""
    from train import models

    model = models.build_model("resnet50", 1000, 224)
    entries = [
        {"path": v.path, "shape": list(v.shape)} for v in model.trainable_variables
    ]
    text = ",\n".join(json.dumps(entry) for entry in entries)
    SHAPES_FILE.write_text(f"[\n{text}\n]\n")


def random_arrays(shapes, scale: float, seed: int) -> list[np.ndarray]:
    """One float32 array of standard normals times `scale` per shape."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s, dtype=np.float32) * scale for s in shapes]


def lars_settings(weight_decay: float = WEIGHT_DECAY) -> dict:
    """The arguments of every LARS candidate (imports lars_tf, so Keras)."""
    import lars_tf

    return dict(
        learning_rate=LEARNING_RATE,
        momentum=MOMENTUM,
        weight_decay=weight_decay,
        trust_coefficient=TRUST_COEFFICIENT,
        exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
        exclude_from_weight_decay=lars_tf.exclude_bias_and_norm,
    )


def tf_step(
    build_optimizer: Callable, weights, gradients, xla: bool = False, strategy=None
) -> Callable[[int], None]:
    """A callable running `steps` `apply_gradients` calls of a new optimizer.

    The step is a `tf.function`, XLA-compiled as a whole when `xla` (what
    `model.compile(jit_compile=True)` does). Under `strategy` the variables
    and slots are mirrored and `gradients` hold per-replica values. The first
    call (tracing, compiling, creating the slots) runs here.
    """
    import keras
    import tensorflow as tf

    scope = strategy.scope() if strategy else contextlib.nullcontext()
    with scope:
        optimizer = build_optimizer()
        variables = [keras.Variable(w) for w in weights]
        optimizer.build(variables)

    def apply(*replica_gradients):
        optimizer.apply_gradients(zip(replica_gradients, variables))

    @tf.function(jit_compile=xla)
    def step():
        if strategy:
            strategy.run(apply, args=gradients)
        else:
            apply(*gradients)

    step()

    def run(steps: int) -> None:
        for _ in range(steps):
            step()

    return run
