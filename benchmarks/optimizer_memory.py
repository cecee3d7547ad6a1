"""How much memory does an optimizer step add, LARS against SGD-momentum?

    python -m benchmarks.optimizer_memory [--rounds=3] [--steps=3] [--scale=1]

Each measurement is its own process, so that one optimizer's freed memory
never serves the other: it creates variables with the shapes of ResNet-50's
161 (`harness.resnet50_shapes`, 25.6M float32 values) and random gradients,
builds the optimizer and runs one step (which traces the `tf.function` and
creates the slots). Then it reads the resident set (VmRSS), resets the
kernel's high-water mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0)
and runs `--steps` more steps. The step's peak is the new high-water mark
(VmHWM) minus that resident set: what the step's temporaries add on top of
variables, gradients and slots. `ru_maxrss` cannot be reset, so it would
report the tracing peak.

The processes alternate (LARS, SGD, SGD, LARS, ...) for `--rounds` rounds;
with one candidate and one round the measurement runs in this process.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import flags

from benchmarks import harness

CANDIDATES = ("lars", "sgd")
MB = 1e6

FLAGS = flags.FLAGS
harness.define_subset("candidates", CANDIDATES, "Candidates to measure")
flags.DEFINE_integer("steps", 3, "Steps measured after the warm-up.", lower_bound=1)
flags.DEFINE_float("scale", 1.0, "Fraction of every channel count.", lower_bound=0)
harness.set_defaults(rounds=3)


def memory_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process, in bytes."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {k: float(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def build_optimizer(candidate: str):
    """LARS at `harness.lars_settings` (`jit_compile=False`), or Keras SGD."""
    import keras

    import lars_tf

    if candidate == "lars":
        return lars_tf.LARS(**harness.lars_settings())
    return keras.optimizers.SGD(harness.LEARNING_RATE, momentum=harness.MOMENTUM)


def measure(candidate: str) -> dict[str, float]:
    """Resident MB after warm-up and the extra peak MB of `--steps` steps."""
    import tensorflow as tf

    shapes = harness.resnet50_shapes(FLAGS.scale)
    weights = harness.random_arrays(shapes, 0.05, seed=0)
    gradients = [tf.constant(g) for g in harness.random_arrays(shapes, 0.01, seed=1)]
    run = harness.tf_step(lambda: build_optimizer(candidate), weights, gradients)
    del weights  # the variables hold their own copies
    resident = memory_status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    run(FLAGS.steps)
    peak = memory_status()["VmHWM"] - resident
    return {"resident_mb": resident / MB, "step_peak_mb": peak / MB}


def measure_in_process(candidate: str, folder: str, index: int) -> dict:
    """`measure(candidate)` in a fresh `python -m` process."""
    output = os.path.join(folder, f"{index}.json")
    command = [sys.executable, "-m", "benchmarks.optimizer_memory"]
    command += [f"--candidates={candidate}", "--rounds=1", f"--output={output}"]
    command += [f"--steps={FLAGS.steps}", f"--scale={FLAGS.scale}"]
    root = Path(__file__).resolve().parents[1]
    subprocess.run(command, check=True, cwd=root, stdout=subprocess.DEVNULL)
    with open(output) as record:
        return json.load(record)["figures"][candidate]


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if FLAGS.rounds == 1 and len(FLAGS.candidates) == 1:
        candidate = FLAGS.candidates[0]
        harness.write_results("optimizer_memory", {candidate: measure(candidate)})
        return
    print(harness.machine_line(), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        count = iter(range(FLAGS.rounds * len(FLAGS.candidates)))
        runs = harness.interleave(
            {
                c: (lambda c=c: measure_in_process(c, folder, next(count)))
                for c in FLAGS.candidates
            },
            FLAGS.rounds,
        )
    figures = {
        candidate: {key: harness.summary([r[key] for r in rs]) for key in rs[0]}
        for candidate, rs in runs.items()
    }
    print(f"{FLAGS.rounds} processes each, {FLAGS.steps} steps measured")
    rows = [
        [
            c,
            harness.show(f["resident_mb"], ".0f"),
            harness.show(f["step_peak_mb"], ".1f"),
        ]
        for c, f in figures.items()
    ]
    print(harness.markdown_table(["optimizer", "resident MB", "step peak MB"], rows))
    harness.write_results("optimizer_memory", figures)


if __name__ == "__main__":
    harness.run(main)
