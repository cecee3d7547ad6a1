"""How long does one TensorFlow optimizer step on ResNet-50's parameters take,
LARS against Keras SGD-momentum and Lamb, in each mode a user runs it in?

    python -m benchmarks.optimizer_step [--scenarios=float32,mixed_bfloat16,mirrored]
        [--rounds=15] [--steps=3] [--variants] [--scale=1]

Parameters have the shapes of `train.models.resnet50`'s 161 trainable
variables (`harness.resnet50_shapes`), random weights and gradients. Each
candidate times `apply_gradients` in each of its modes (`MODES`):

- "graph": inside a `tf.function` (Keras's `jit_compile="auto"` on a CPU);
- "xla": inside a `tf.function(jit_compile=True)`, the whole step compiled,
  as `model.compile(jit_compile=True)` (and "auto" on a GPU or TPU) does;
- "own_jit": `LARS(jit_compile=True)` inside a `tf.function` (one XLA
  computation per variable), compared with SGD in graph mode.

Candidates: LARS (`harness.lars_settings`); LARS with `skip_nonfinite=True`;
Keras `SGD(momentum=0.9)`, the floor LARS adds two norms to; Keras `Lamb`;
with `--variants`, the designs of `benchmarks/lars_update_designs.py`. In the
float32 scenario also the memory-bandwidth floor: LARS reads w, g, v and
writes w, v, 20 bytes per parameter, over the best streaming rate of each
round (a NumPy copy of one flat array, 8 B per value, or TensorFlow `w += g`,
12 B), and one fused momentum kernel over one flat array.

Scenarios, each in a fresh process when more than one is asked for:
`float32`; `mixed_bfloat16` (float32 variables and slots, gradients in the
dtype Keras gives float32 variables under the policy, found from a small
model); `mirrored` (`tf.distribute.MirroredStrategy` over 2 logical CPU
devices, each replica with its own gradients, so each step all-reduces; graph
and own_jit only, since XLA-compiling the whole step fails there).

Figures: per mode, each candidate's median wall and CPU ms per step and its
per-round ratio to SGD in that mode; then each candidate at its best mode
(chosen separately for wall and CPU time) against SGD and LARS at theirs.
`optax.lars` is timed by `benchmarks/jax_optimizer_step.py`.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from absl import flags

from benchmarks import harness

SCENARIOS = ("float32", "mixed_bfloat16", "mirrored")
MODES = {
    "graph": "tf.function",
    "xla": "tf.function(jit_compile=True), as model.compile(jit_compile=True)",
    "own_jit": "LARS(jit_compile=True) inside tf.function",
}
SGD = "Keras SGD(momentum=0.9)"
BYTES_PER_PARAMETER = 20  # read w, g, v and write w, v, 4 bytes each
FUSED_MOMENTUM = "fused momentum kernel (1 flat array)"

FLAGS = flags.FLAGS
harness.define_subset("scenarios", SCENARIOS, "Scenarios to time")
flags.DEFINE_integer("steps", 3, "Steps per candidate per round.", lower_bound=1)
flags.DEFINE_bool("variants", False, "Also time lars_update_designs.py's designs.")
flags.DEFINE_float("scale", 1.0, "Fraction of every channel count.", lower_bound=0)
harness.set_defaults(rounds=15)


def tf_optimizers(variants: bool, distributed: bool) -> dict:
    """The candidates: name -> (builder taking `jit_compile`, its modes);
    `distributed` leaves out the designs made for one device."""
    import keras

    import lars_tf

    def lars(cls=lars_tf.LARS, **extra):
        return lambda jit_compile=False: cls(
            **harness.lars_settings(), jit_compile=jit_compile, **extra
        )

    sgd = lambda jit_compile=False: keras.optimizers.SGD(  # noqa: E731
        learning_rate=harness.LEARNING_RATE, momentum=harness.MOMENTUM
    )
    lamb = lambda jit_compile=False: keras.optimizers.Lamb(1e-3)  # noqa: E731
    candidates = {
        SGD: (sgd, ("graph", "xla")),
        "LARS": (lars(), tuple(MODES)),
        "LARS skip_nonfinite": (lars(skip_nonfinite=True), ("graph", "xla")),
        "Keras Lamb": (lamb, ("graph", "xla")),
    }
    if variants:
        from benchmarks.lars_update_designs import DESIGNS

        for name, cls in DESIGNS.items():
            if not (distributed and getattr(cls, "single_device", False)):
                candidates[f"design: {name}"] = (lars(cls), tuple(MODES))
    return candidates


def bandwidth_candidates(num_parameters: int) -> tuple[dict, dict]:
    """Streaming kernels over one flat array of `num_parameters` float32s,
    and the bytes each moves per step (None: the fused momentum kernel, a
    floor time by itself)."""
    import tensorflow as tf

    source = np.random.default_rng(2).standard_normal(num_parameters, np.float32)
    target = np.empty_like(source)
    weight = tf.Variable(source)
    velocity = tf.Variable(tf.zeros_like(source))
    gradient = tf.constant(source)

    @tf.function
    def add_in_place():
        weight.assign_add(gradient)

    @tf.function
    def fused_momentum():
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=weight.handle,
            accum=velocity.handle,
            lr=tf.constant(1e-3),
            grad=gradient,
            momentum=tf.constant(harness.MOMENTUM),
        )

    def repeat(function):
        function()
        return lambda steps: [function() for _ in range(steps)]

    candidates = {
        "copy (NumPy, 1 flat array)": repeat(lambda: np.copyto(target, source)),
        "w += g (TensorFlow, 1 flat array)": repeat(add_in_place),
        FUSED_MOMENTUM: repeat(fused_momentum),
    }
    bytes_moved = dict(zip(candidates, (8 * num_parameters, 12 * num_parameters)))
    return candidates, bytes_moved


def gradient_dtype_under_mixed_bfloat16():
    """The dtype of the gradients Keras gives float32 variables under the policy."""
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)]
        )
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(model(tf.ones((2, 4))), "float32"))
        gradients = tape.gradient(loss, model.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {g.dtype for g in gradients}.pop()


def scenario_gradients(scenario: str, shapes) -> tuple[list, object, str]:
    """The gradients a step applies in `scenario`, its strategy, and a note."""
    import tensorflow as tf

    gradients = harness.random_arrays(shapes, 0.01, seed=1)
    if scenario == "mirrored":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        second = harness.random_arrays(shapes, 0.01, seed=3)
        per_replica = [
            strategy.experimental_distribute_values_from_function(
                lambda context, a=a, b=b: tf.constant(
                    (a, b)[context.replica_id_in_sync_group]
                )
            )
            for a, b in zip(gradients, second)
        ]
        return per_replica, strategy, "MirroredStrategy over 2 logical CPU devices"
    if scenario == "mixed_bfloat16":
        dtype = gradient_dtype_under_mixed_bfloat16()
        note = f"mixed_bfloat16: float32 variables and slots, {dtype.name} gradients"
        return [tf.constant(g, dtype=dtype) for g in gradients], None, note
    return [tf.constant(g) for g in gradients], None, "float32"


def scenario_candidates(scenario: str, shapes) -> tuple[dict, dict, dict, str]:
    """(step callables by key, {candidate: {mode: key}}, bytes moved, note)."""
    if scenario == "mirrored":  # Before TensorFlow makes its devices.
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    weights = harness.random_arrays(shapes, 0.05, seed=0)
    gradients, strategy, note = scenario_gradients(scenario, shapes)
    usable_modes = ("graph", "own_jit") if strategy else tuple(MODES)
    steps, modes_of = {}, {}
    for name, (build, modes) in tf_optimizers(
        FLAGS.variants, strategy is not None
    ).items():
        for mode in (m for m in modes if m in usable_modes):
            key = modes_of.setdefault(name, {})[mode] = f"{name} [{mode}]"
            builder = lambda build=build, mode=mode: build(  # noqa: E731
                jit_compile=mode == "own_jit"
            )
            steps[key] = harness.tf_step(
                builder, weights, gradients, xla=mode == "xla", strategy=strategy
            )
    bytes_moved = {}
    if scenario == "float32":
        floors, bytes_moved = bandwidth_candidates(sum(w.size for w in weights))
        steps.update(floors)
    return steps, modes_of, bytes_moved, note


def same_mode_figures(wall: dict, cpu: dict, modes_of: dict) -> dict:
    """Per mode, each candidate's medians and ratios to SGD in that mode
    (SGD in graph mode for "own_jit", where that option is used)."""
    figures = {}
    for mode in MODES:
        reference = modes_of[SGD].get(mode, modes_of[SGD]["graph"])
        for keys in modes_of.values():
            if mode in keys:
                key = keys[mode]
                figures[key] = {
                    "wall_ms": np.median(wall[key]) * 1e3,
                    "cpu_ms": np.median(cpu[key]) * 1e3,
                    "wall_x_sgd": harness.ratio(wall[key], wall[reference]),
                    "cpu_x_sgd": harness.ratio(cpu[key], cpu[reference]),
                }
    return figures


def best_mode_figures(wall: dict, cpu: dict, modes_of: dict) -> dict:
    """Each candidate at its best mode against SGD and LARS at theirs.

    The best mode is chosen by median, separately for wall and CPU time; the
    ratios are per round between those modes' times.
    """
    figures = {}
    for clock, times in (("wall", wall), ("cpu", cpu)):
        best = {
            name: min(keys.values(), key=lambda key: np.median(times[key]))
            for name, keys in modes_of.items()
        }
        for name, key in best.items():
            figures.setdefault(name, {})[clock] = {
                "mode": key[len(name) + 2 : -1],
                "ms": np.median(times[key]) * 1e3,
                "x_sgd_best": harness.ratio(times[key], times[best[SGD]]),
                "x_lars_best": harness.ratio(times[key], times[best["LARS"]]),
            }
    return figures


def floor_figures(wall: dict, modes_of: dict, bytes_moved: dict, size: int) -> dict:
    """The bandwidth floor and each LARS design's best wall mode over it."""
    bandwidth = np.max([n / wall[name] for name, n in bytes_moved.items()], axis=0)
    floor = BYTES_PER_PARAMETER * size / bandwidth
    figures = {
        "bandwidth_gb_per_s": harness.summary(bandwidth / 1e9),
        "floor_ms": harness.summary(floor * 1e3),
        "fused_momentum_ms": harness.summary(wall[FUSED_MOMENTUM] * 1e3),
    }
    for name, keys in modes_of.items():
        if name == "LARS" or name.startswith("design:"):
            key = min(keys.values(), key=lambda key: np.median(wall[key]))
            figures[f"{key} / floor"] = harness.ratio(wall[key], floor)
    return figures


def run_scenario(scenario: str) -> dict:
    """Times every candidate of one scenario, interleaved; returns its figures."""
    shapes = harness.resnet50_shapes(FLAGS.scale)
    steps, modes_of, bytes_moved, note = scenario_candidates(scenario, shapes)
    wall, cpu = harness.step_times(steps, FLAGS.rounds, FLAGS.steps)
    size = sum(int(np.prod(s)) for s in shapes)
    figures = {
        "note": f"{note}; {len(shapes)} variables, {size / 1e6:.1f}M parameters; "
        f"{FLAGS.rounds} rounds x {FLAGS.steps} steps",
        "same_mode": same_mode_figures(wall, cpu, modes_of),
        "best_mode": best_mode_figures(wall, cpu, modes_of),
    }
    if bytes_moved:
        figures["floor"] = floor_figures(wall, modes_of, bytes_moved, size)
    print_scenario(scenario, figures)
    return figures


def print_scenario(scenario: str, figures: dict) -> None:
    """The scenario's figures as Markdown tables."""
    print(f"\n## {scenario}: {figures['note']}\n")
    rows = [
        [key, f"{f['wall_ms']:.1f}", harness.show(f["wall_x_sgd"])]
        + [f"{f['cpu_ms']:.1f}", harness.show(f["cpu_x_sgd"])]
        for key, f in figures["same_mode"].items()
    ]
    header = ["candidate [mode]", "wall ms", "wall x SGD", "CPU ms", "CPU x SGD"]
    print(harness.markdown_table(header, rows) + "\n")
    rows = [
        [name, clock, f"{f[clock]['mode']} {f[clock]['ms']:.1f} ms"]
        + [harness.show(f[clock]["x_sgd_best"]), harness.show(f[clock]["x_lars_best"])]
        for name, f in figures["best_mode"].items()
        for clock in ("wall", "cpu")
    ]
    header = ["candidate", "time", "best mode", "x SGD best", "x LARS best"]
    print(harness.markdown_table(header, rows))
    for name, value in figures.get("floor", {}).items():
        print(f"{name}: {harness.show(value)}")


def run_scenarios_in_processes() -> dict:
    """Each scenario in a fresh `python -m benchmarks.optimizer_step` process."""
    figures = {}
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as folder:
        for scenario in FLAGS.scenarios:
            output = os.path.join(folder, f"{scenario}.json")
            command = [sys.executable, "-m", "benchmarks.optimizer_step"]
            command += [f"--scenarios={scenario}", f"--output={output}"]
            command += [f"--rounds={FLAGS.rounds}", f"--steps={FLAGS.steps}"]
            command += [f"--scale={FLAGS.scale}", f"--variants={FLAGS.variants}"]
            subprocess.run(command, check=True, cwd=root)
            with open(output) as record:
                figures.update(json.load(record)["figures"])
    return figures


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(harness.machine_line(), flush=True)
    if len(FLAGS.scenarios) == 1:
        figures = {FLAGS.scenarios[0]: run_scenario(FLAGS.scenarios[0])}
    else:
        figures = run_scenarios_in_processes()
    harness.write_results("optimizer_step", figures)


if __name__ == "__main__":
    harness.run(main)
