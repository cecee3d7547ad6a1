"""Peak resident memory of an optimizer step, LARS against SGD-momentum.

Each measurement is its own process, so that one optimizer's freed memory
never serves the other: it creates ResNet-50's 161 variables (25.6M float32
values) with random gradients, builds the optimizer and runs one step (which
traces the `tf.function` and creates the slots). Then it reads the resident
set (VmRSS), resets the kernel's high-water mark (`echo 5 >
/proc/self/clear_refs`, Linux >= 4.0) and runs `--steps` more steps. The
step's peak is the new high-water mark (VmHWM) minus that resident set: what
the step's temporaries add on top of variables, gradients and slots. The
resident set after warm-up shows the slots (one per variable for both).

The processes alternate (LARS, SGD, LARS, SGD, ...) for `--repeats` rounds.
For scale: ResNet-50's largest variable holds 2.36M values (9.4 MB).

Run (about 2 minutes on a 2-core CPU):

    python benchmarks/optimizer_memory.py
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

CANDIDATES = ("LARS (jit_compile=False, default)", "Keras SGD(momentum=0.9)")
MB = 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="processes each")
    parser.add_argument("--steps", type=int, default=3, help="steps measured")
    parser.add_argument("--candidate", help=argparse.SUPPRESS)  # one, in-process
    return parser.parse_args(argv)


def memory_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process, in bytes."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {k: float(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def measure(candidate: str, steps: int) -> dict[str, float]:
    """Resident set after warm-up and the extra peak of `steps` steps, in bytes."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tensorflow as tf

    from benchmarks.optimizer_step import (
        make_step,
        random_arrays,
        resnet50_shapes,
        tf_optimizers,
    )

    shapes = resnet50_shapes()
    weights = random_arrays(shapes, 0.05, seed=0)
    gradients = [tf.constant(g) for g in random_arrays(shapes, 0.01, seed=1)]
    run = make_step(tf_optimizers()[candidate], weights, gradients)
    del weights  # the variables hold their own copies
    resident = memory_status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    run(steps)
    return {"resident": resident, "step_peak": memory_status()["VmHWM"] - resident}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.candidate:
        print(json.dumps(measure(args.candidate, args.steps)))
        return
    results = {c: [] for c in CANDIDATES}
    for _ in range(args.repeats):
        for candidate in CANDIDATES:
            output = subprocess.run(
                [sys.executable, os.path.abspath(__file__), f"--candidate={candidate}"]
                + [f"--steps={args.steps}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[candidate].append(json.loads(output.splitlines()[-1]))
    print(f"{args.repeats} processes each, {args.steps} steps measured")
    print(f"{'candidate':<36} {'resident after warm-up MB':>26} {'step peak MB':>22}")
    for candidate, runs in results.items():
        resident = [r["resident"] / MB for r in runs]
        peak = [r["step_peak"] / MB for r in runs]
        print(
            f"{candidate:<36} {np.median(resident):>8.0f} "
            f"[{min(resident):.0f}-{max(resident):.0f}]{'':>6} "
            f"{np.median(peak):>8.1f} [{min(peak):.1f}-{max(peak):.1f}]"
        )


if __name__ == "__main__":
    main()
