"""Cost of one optimizer step on ResNet-50's parameters, LARS against its peers.

Parameters have the shapes of `keras.applications.ResNet50`'s 214 trainable
variables (25.6M float32 values, 160 of them biases and batch-norm vectors),
with random weights and random gradients. Each candidate times
`apply_gradients` in each mode a user runs it in (`MODES`):

- "graph": inside a `tf.function` (Keras's `jit_compile="auto"` on a CPU);
- "xla": inside a `tf.function(jit_compile=True)`, the whole step compiled,
  as `model.compile(jit_compile=True)` (and "auto" on a GPU or TPU) does;
- "own_jit": `LARS(jit_compile=True)` inside a `tf.function` (one XLA
  computation per variable); LARS and its designs only.

Candidates:

- `LARS`, weight decay 1e-4 and `exclude_bias_and_norm` for adaptation and
  decay (the tensorflow/tpu ResNet-50 setting);
- Keras `SGD(momentum=0.9)`, the floor LARS adds two norms to;
- Keras `Lamb`, another trust-ratio optimizer;
- with `--variants`, other designs of LARS's update
  (`benchmarks/lars_update_designs.py`);
- `optax.lars` with the same settings under `jax.jit` (donated buffers), in a
  separate process since JAX lives only in the benchmark environment;
- the memory-bandwidth floor: LARS must read w, g, v and write w, v, 20 bytes
  per float32 parameter, over the best copy bandwidth measured in the same run
  (a NumPy copy of one 25.6M-value array, 8 bytes per value moved, and a
  multi-threaded TensorFlow `w += g` on it, 12 bytes per value moved). Also
  timed: one fused momentum kernel over one flat 25.6M-value variable, the
  same 20 bytes per value in a single TensorFlow kernel.

Candidates run interleaved (A B C ... A B C ...) in repeated rounds, each
round starting at a different candidate, so that load from other processes
hits all of them alike. For each mode a table gives each candidate's median
wall time and CPU time (of the process that ran it, all threads) per step
over rounds, and its median per-round ratio to Keras SGD in the same mode,
with the 25th-75th percentile of those ratios. A last table puts each
candidate at its best mode against SGD and LARS at theirs (chosen separately
for wall and CPU time), so no figure compares one at its best with another at
its worst. CPU time is disturbed far less than wall time by other processes'
load; the bandwidth floor is a wall-time figure only.

Scenarios, each in its own process: `float32` (the one above), `mixed_bfloat16`
(Keras's mixed-precision policy: float32 variables and slots, gradients in the
dtype Keras gives them, found from a small model under the policy), and
`mirrored` (`tf.distribute.MirroredStrategy` over 2 logical CPU devices, each
replica holding its own random gradients, so each step also all-reduces;
graph and own_jit only, since XLA-compiling the whole step fails there).

Setup for the optax column (JAX only in a separate environment, never a
dependency of lars_tf):

    python -m venv /tmp/bench-venv
    /tmp/bench-venv/bin/pip install jax optax numpy

Run (on a 2-core CPU at load average 20-35: `--scenarios=float32 --rounds=6
--steps=2 --variants` took 21 minutes, mostly XLA compilation;
`--scenarios=mixed_bfloat16,mirrored --rounds=5 --steps=2` 14):

    python benchmarks/optimizer_step.py --jax_python=/tmp/bench-venv/bin/python

Without `--jax_python` (and no /tmp/bench-venv) the optax column is skipped.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SCENARIOS = ("float32", "mixed_bfloat16", "mirrored")
DEFAULT_JAX_PYTHON = "/tmp/bench-venv/bin/python"
WEIGHT_DECAY = 1e-4
MOMENTUM = 0.9
TRUST_COEFFICIENT = 0.001
SGD = "Keras SGD(momentum=0.9)"
BYTES_PER_PARAMETER = 20  # read w, g, v and write w, v, 4 bytes each


def lars_settings() -> dict:
    """LARS's arguments in every LARS candidate (optax's match them)."""
    import lars_tf

    return dict(
        learning_rate=0.1,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        trust_coefficient=TRUST_COEFFICIENT,
        exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
        exclude_from_weight_decay=lars_tf.exclude_bias_and_norm,
    )


def interleaved_parser(
    description: str,
    steps: int,
    subset_flag: str,
    choices: tuple[str, ...],
    subset_note: str = "",
) -> argparse.ArgumentParser:
    """The flags of a benchmark that times its candidates with `interleave`.

    `--rounds` and `--steps` (per round, default `steps`), and `subset_flag`:
    a comma-separated subset of `choices` (default: all), parsed to a list of
    names; a name not in `choices` is a usage error naming the flag.
    """

    def subset(value: str) -> list[str]:
        names = value.split(",")
        unknown = sorted(set(names) - set(choices))
        if unknown:
            raise argparse.ArgumentTypeError(f"{unknown} not in {choices}")
        return names

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=steps, help="steps per round")
    parser.add_argument(
        subset_flag,
        type=subset,
        default=",".join(choices),
        help=f"comma-separated subset of {choices}{subset_note}",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = interleaved_parser(
        __doc__.split("\n\n")[0],
        steps=3,
        subset_flag="--scenarios",
        choices=SCENARIOS,
        subset_note=", each run in its own process",
    )
    parser.add_argument(
        "--jax_python",
        default=DEFAULT_JAX_PYTHON if os.path.exists(DEFAULT_JAX_PYTHON) else "",
        help="Python with jax and optax installed, for the optax column",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also time other designs of LARS's update (lars_update_designs.py)",
    )
    parser.add_argument("--scenario", help=argparse.SUPPRESS)  # one, in-process
    parser.add_argument("--optax_worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The shapes of ResNet-50's trainable variables, in model order.

    From `keras.applications.ResNet50` (no weights downloaded): 214 variables,
    25.6M values, 160 of them biases and batch-norm vectors.
    """
    import keras

    model = keras.applications.ResNet50(weights=None)
    return [tuple(v.shape) for v in model.trainable_variables]


def random_arrays(shapes, scale: float, seed: int) -> list[np.ndarray]:
    """One float32 array of standard normals times `scale` per shape."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s, dtype=np.float32) * scale) for s in shapes]


def interleave(
    candidates: dict, rounds: int, steps: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Wall and CPU seconds per step of each candidate, one entry per round.

    `candidates` maps a name to a callable that runs `steps` steps and returns
    when they are done; one that runs them in another process returns the CPU
    seconds they took there, otherwise this process's CPU time counts. Each
    round starts at the next candidate, so no one always runs right after the
    same neighbour.
    """
    names = list(candidates)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for round_index in range(rounds):
        start = round_index % len(names)
        for name in names[start:] + names[:start]:
            began, began_cpu = time.perf_counter(), time.process_time()
            other_process_cpu = candidates[name](steps)
            wall[name].append((time.perf_counter() - began) / steps)
            used_cpu = other_process_cpu or time.process_time() - began_cpu
            cpu[name].append(used_cpu / steps)
    return (
        {name: np.array(t) for name, t in wall.items()},
        {name: np.array(t) for name, t in cpu.items()},
    )


def ratio_summary(times: np.ndarray, reference: np.ndarray) -> str:
    """Median of the per-round ratios, with their 25th and 75th percentiles."""
    q25, q50, q75 = np.percentile(times / reference, [25, 50, 75])
    return f"{q50:6.3f} [{q25:.3f}-{q75:.3f}]"


def print_table(title: str, wall: dict, cpu: dict, reference: str, notes=()) -> None:
    """Median wall and CPU ms per step, and per-round ratios to `reference`."""
    print(f"\n{title} (ratios: x {reference}, median [25th-75th percentile])")
    print(
        f"{'candidate':<40} {'wall ms':>8} {'wall ratio':>21} "
        f"{'CPU ms':>8} {'CPU ratio':>21}"
    )
    for name in wall:
        row = f"{name:<40} {np.median(wall[name]) * 1e3:8.1f} "
        row += ratio_summary(wall[name], wall[reference])
        if name in cpu:
            row += f" {np.median(cpu[name]) * 1e3:8.1f} "
            row += ratio_summary(cpu[name], cpu[reference])
        print(row)
    for note in notes:
        print(note)


# --- TensorFlow candidates ---------------------------------------------------


MODES = {
    "graph": "tf.function",
    "xla": "tf.function(jit_compile=True), as model.compile(jit_compile=True)",
    "own_jit": "LARS(jit_compile=True) inside tf.function",
}


def make_step(build_optimizer, weights, gradients, mode, strategy=None):
    """A callable running `steps` `apply_gradients` calls of a new optimizer.

    `mode` is a key of `MODES`: the step is a `tf.function`, XLA-compiled as a
    whole for "xla"; for "own_jit" `build_optimizer` gets `jit_compile=True`.
    """
    import keras
    import tensorflow as tf

    def build():
        if mode == "own_jit":
            return build_optimizer(jit_compile=True)
        return build_optimizer()

    if strategy is None:
        optimizer = build()
        variables = [keras.Variable(w) for w in weights]
        optimizer.build(variables)

        @tf.function(jit_compile=mode == "xla")
        def step():
            optimizer.apply_gradients(zip(gradients, variables))

    else:
        with strategy.scope():
            optimizer = build()
            variables = [keras.Variable(w) for w in weights]
            optimizer.build(variables)

        @tf.function(jit_compile=mode == "xla")
        def step():
            def replica_step(*replica_gradients):
                optimizer.apply_gradients(zip(replica_gradients, variables))

            strategy.run(replica_step, args=gradients)

    step()  # traces, compiles and creates slots

    def run(steps):
        for _ in range(steps):
            step()

    return run


def tf_optimizers(variants: bool) -> dict:
    """The TensorFlow candidates: name -> (builder, the modes it runs in).

    A builder takes `jit_compile` when "own_jit" is among its modes.
    """
    import keras

    import lars_tf

    all_modes = tuple(MODES)
    candidates = {
        SGD: (
            lambda: keras.optimizers.SGD(learning_rate=0.1, momentum=MOMENTUM),
            ("graph", "xla"),
        ),
        "LARS": (
            lambda jit_compile=False: lars_tf.LARS(
                **lars_settings(), jit_compile=jit_compile
            ),
            all_modes,
        ),
        # The opt-in guard against non-finite gradients: its cost on top of LARS.
        "LARS skip_nonfinite": (
            lambda: lars_tf.LARS(**lars_settings(), skip_nonfinite=True),
            ("graph", "xla"),
        ),
        "Keras Lamb": (lambda: keras.optimizers.Lamb(1e-3), ("graph", "xla")),
    }
    if variants:
        from benchmarks.lars_update_designs import DESIGNS

        for name, cls in DESIGNS.items():
            candidates[f"design: {name}"] = (
                lambda jit_compile=False, cls=cls: cls(
                    **lars_settings(), jit_compile=jit_compile
                ),
                all_modes,
            )
    return candidates


def bandwidth_candidates(num_parameters: int) -> tuple[dict, dict]:
    """Streaming kernels over one flat array of `num_parameters` float32s.

    Returns the callables to time and, for each, the bytes it moves per step
    (None for the fused momentum kernel, which is a floor time by itself).
    """
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
            momentum=tf.constant(MOMENTUM),
        )

    add_in_place()
    fused_momentum()

    def repeat(fn):
        def run(steps):
            for _ in range(steps):
                fn()

        return run

    candidates = {
        "copy (NumPy, 1 flat array)": repeat(lambda: np.copyto(target, source)),
        "w += g (TensorFlow, 1 flat array)": repeat(add_in_place),
        "fused momentum kernel (1 flat array)": repeat(fused_momentum),
    }
    bytes_moved = {
        "copy (NumPy, 1 flat array)": 8 * num_parameters,
        "w += g (TensorFlow, 1 flat array)": 12 * num_parameters,
        "fused momentum kernel (1 flat array)": None,
    }
    return candidates, bytes_moved


# --- optax, in the benchmark environment's process ---------------------------


class OptaxWorker:
    """`optax.lars` under `jax.jit`, driven round by round in a child process."""

    def __init__(self, python: str, shapes):
        self.process = subprocess.Popen(
            [python, os.path.abspath(__file__), "--optax_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._send(json.dumps([list(s) for s in shapes]))
        self.version = self._receive()  # after warm-up

    def _send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def _receive(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the optax worker exited; see its error above")
        return line.strip()

    def __call__(self, steps: int) -> float:
        """Runs `steps` steps; returns the CPU seconds they took."""
        self._send(str(steps))
        return float(self._receive())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def optax_worker() -> None:
    """Serves `optax_worker` requests on stdin/stdout (no TensorFlow here)."""
    import jax
    import optax

    shapes = [tuple(s) for s in json.loads(sys.stdin.readline())]
    params = [jax.numpy.asarray(w) for w in random_arrays(shapes, 0.05, seed=0)]
    grads = [jax.numpy.asarray(g) for g in random_arrays(shapes, 0.01, seed=1)]
    matrices = [len(s) > 1 for s in shapes]  # exclude_bias_and_norm's complement
    optimizer = optax.lars(
        learning_rate=0.1,
        weight_decay=WEIGHT_DECAY,
        weight_decay_mask=matrices,
        trust_coefficient=TRUST_COEFFICIENT,
        trust_ratio_mask=matrices,
        momentum=MOMENTUM,
    )
    state = optimizer.init(params)

    def step(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    params, state = jax.block_until_ready(step(params, state, grads))
    print(f"jax {jax.__version__}, optax {optax.__version__}", flush=True)
    for line in sys.stdin:
        began_cpu = time.process_time()
        for _ in range(int(line)):
            params, state = step(params, state, grads)
        jax.block_until_ready(params)
        print(time.process_time() - began_cpu, flush=True)


# --- scenarios ---------------------------------------------------------------


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


def run_scenario(scenario: str, args: argparse.Namespace) -> None:
    """Times every candidate of one scenario, interleaved, and prints the table."""
    if scenario == "mirrored":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    import tensorflow as tf

    shapes = resnet50_shapes()
    num_parameters = sum(int(np.prod(s)) for s in shapes)
    weights = random_arrays(shapes, 0.05, seed=0)
    gradients = random_arrays(shapes, 0.01, seed=1)
    strategy = None
    notes = [
        f"{len(shapes)} variables, {num_parameters / 1e6:.1f}M parameters; "
        f"{args.rounds} rounds x {args.steps} steps; TensorFlow {tf.__version__}"
    ]
    if scenario == "mirrored":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        second = random_arrays(shapes, 0.01, seed=3)
        per_replica = [
            strategy.experimental_distribute_values_from_function(
                lambda context, a=a, b=b: tf.constant(
                    (a, b)[context.replica_id_in_sync_group]
                )
            )
            for a, b in zip(gradients, second)
        ]
        gradients = per_replica
        notes.append("MirroredStrategy over 2 logical CPU devices (one 2-core CPU)")
    elif scenario == "mixed_bfloat16":
        dtype = gradient_dtype_under_mixed_bfloat16()
        notes.append(
            f"mixed_bfloat16: float32 variables and slots, {dtype.name} gradients "
            "(the dtype Keras gives float32 variables under the policy)"
        )
        gradients = [tf.constant(g, dtype=dtype) for g in gradients]
    else:
        gradients = [tf.constant(g) for g in gradients]

    # Under MirroredStrategy on CPU, XLA-compiling the whole step fails (as
    # compile(jit_compile=True) does), so that scenario has no "xla" mode.
    usable_modes = ("graph", "own_jit") if scenario == "mirrored" else tuple(MODES)
    modes_of = {}  # candidate -> {mode: key in `candidates`}
    candidates = {}
    for name, (build, modes) in tf_optimizers(args.variants).items():
        for mode in modes:
            if mode in usable_modes:
                key = f"{name} [{mode}]"
                modes_of.setdefault(name, {})[mode] = key
                candidates[key] = make_step(build, weights, gradients, mode, strategy)
    worker = None
    bytes_moved = {}
    if scenario == "float32":
        if args.jax_python:
            worker = OptaxWorker(args.jax_python, shapes)
            candidates["optax.lars [jax.jit]"] = worker
            modes_of["optax.lars"] = {"jax.jit": "optax.lars [jax.jit]"}
            notes.append(f"optax: {worker.version}")
        else:
            notes.append("optax: skipped (no --jax_python)")
        floors, bytes_moved = bandwidth_candidates(num_parameters)
        candidates.update(floors)

    wall, cpu = interleave(candidates, args.rounds, args.steps)
    if worker is not None:
        worker.close()
    floor = None
    if bytes_moved:
        bandwidth = np.max(
            [n / wall[name] for name, n in bytes_moved.items() if n], axis=0
        )
        floor = BYTES_PER_PARAMETER * num_parameters / bandwidth
        notes.append(
            f"bandwidth: median {np.median(bandwidth) / 1e9:.1f} GB/s (the best "
            "copy kernel of each round); floor = 20 B/param at that rate; "
            f"fused momentum kernel over one flat array: "
            f"{np.median(wall['fused momentum kernel (1 flat array)']) * 1e3:.1f} ms"
        )
    print(f"\n== scenario: {scenario}")
    for note in notes:
        print(note)
    print_same_mode_tables(wall, cpu, modes_of)
    print_best_mode_table(wall, cpu, modes_of, floor)


def print_same_mode_tables(wall: dict, cpu: dict, modes_of: dict) -> None:
    """One table per mode: each candidate against Keras SGD in that mode.

    SGD has no `jit_compile` of its own, so "own_jit" rows compare with SGD in
    graph mode, where that option is used.
    """
    sgd = modes_of[SGD]
    for mode, description in MODES.items():
        reference = sgd.get(mode, sgd["graph"])
        rows = [keys[mode] for keys in modes_of.values() if mode in keys]
        if not rows:
            continue
        print(f"\n-- mode {mode}: {description}; ratios x {reference}")
        print(
            f"{'candidate':<58} {'wall ms':>7} {'wall ratio':>21} "
            f"{'CPU ms':>7} {'CPU ratio':>21}"
        )
        for key in rows:
            print(
                f"{key:<58} {np.median(wall[key]) * 1e3:7.1f} "
                f"{ratio_summary(wall[key], wall[reference])} "
                f"{np.median(cpu[key]) * 1e3:7.1f} "
                f"{ratio_summary(cpu[key], cpu[reference])}"
            )


def best_mode(times: dict, keys: dict) -> str:
    """The key of the mode with the least median time among `keys`."""
    return min(keys.values(), key=lambda key: np.median(times[key]))


def print_best_mode_table(wall: dict, cpu: dict, modes_of: dict, floor) -> None:
    """Each candidate at its best mode against SGD and LARS at theirs.

    The best mode is chosen separately for wall and CPU time (by median); the
    ratios are per round between those modes' times, so no row compares one
    candidate at its best with another at its worst.
    """
    print("\n-- best mode against best mode (ratios per round, time / time)")
    print(
        f"{'candidate':<40} {'best wall':>34} {'x SGD best':>21} "
        f"{'x LARS best':>21} | {'best CPU':>34} {'x SGD best':>21} "
        f"{'x LARS best':>21}"
    )
    best_wall = {name: best_mode(wall, keys) for name, keys in modes_of.items()}
    best_cpu = {name: best_mode(cpu, keys) for name, keys in modes_of.items()}
    for name in modes_of:
        row = f"{name:<40}"
        for times, best in ((wall, best_wall), (cpu, best_cpu)):
            key = best[name]
            mode = key[len(name) + 2 : -1]
            row += f" {mode:>9} {np.median(times[key]) * 1e3:6.1f} ms "
            row += f"{ratio_summary(times[key], times[best[SGD]])} "
            row += f"{ratio_summary(times[key], times[best['LARS']])} |"
        print(row[:-2])
    if floor is not None:
        print("\n-- LARS designs at their best wall mode over the bandwidth floor")
        for name in modes_of:
            if name == "LARS" or name.startswith("design:"):
                key = best_wall[name]
                print(f"{key:<58} {ratio_summary(wall[key], floor)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.optax_worker:
        optax_worker()
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.scenario:
        run_scenario(args.scenario, args)
        return
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs",
        flush=True,
    )
    for scenario in args.scenarios:
        command = [sys.executable, os.path.abspath(__file__), f"--scenario={scenario}"]
        command += [f"--rounds={args.rounds}", f"--steps={args.steps}"]
        command += [f"--jax_python={args.jax_python}"]
        command += ["--variants"] * args.variants
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
