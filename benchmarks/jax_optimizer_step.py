"""Cost of one optimizer step on ResNet-50's parameters on the JAX backend.

Parameters have the shapes of ResNet-50's 161 trainable variables (25.6M
float32 values, the list `resnet50_shapes` builds from the architecture, the
same as `train.models.build_model("resnet50", 1000, 224)` gives), with random
weights and random gradients. Every candidate runs at its fastest, under
`jax.jit` with the weights and slots donated:

- `LARS` (`lars_tf.LARS`, Keras 3 on JAX): `optimizer.stateless_apply`, the
  call `model.fit`'s compiled train step makes; weight decay 1e-4 and
  `exclude_bias_and_norm` for adaptation and decay (the tensorflow/tpu
  ResNet-50 setting);
- Keras `SGD(momentum=0.9)` through the same `stateless_apply`: the floor LARS
  adds two norms per variable to;
- `optax.lars` with LARS's settings: `update` + `apply_updates`;
- `optax.sgd(momentum=0.9)`: optax's floor;
- `jnp_lars`: LARS's update written directly in `jax.numpy` (norms, then one
  elementwise update per variable), what a hand-written JAX LARS costs: the
  floor for LARS's own two passes over each variable.

Candidates run interleaved (A B C D, B C D A, ...) in repeated rounds, so that
load from other processes hits all of them alike. The table gives each
candidate's median wall time and CPU time (this process, all threads) per
step, and its median per-round ratio to LARS with the 25th-75th percentile of
those ratios (`interleave` and `print_table` of benchmarks/optimizer_step.py).

Run (JAX, optax and Keras installed; about 3 minutes on a loaded 2-core CPU):

    python benchmarks/jax_optimizer_step.py

`--candidates=sgd,optax_lars,optax_sgd` leaves LARS out (its column then
falls back to the first candidate as the ratios' reference). The same script
runs on a GPU (`benchmarks/gpu_check.sh`).
"""

import argparse
import os
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"
# The repository root, for lars_tf and benchmarks.optimizer_step.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.optimizer_step import (  # noqa: E402
    MOMENTUM,
    TRUST_COEFFICIENT,
    WEIGHT_DECAY,
    interleave,
    interleaved_parser,
    print_table,
    random_arrays,
)

LEARNING_RATE = 0.1
CANDIDATES = ("lars", "sgd", "optax_lars", "optax_sgd", "jnp_lars")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = interleaved_parser(
        __doc__.split("\n\n")[0],
        steps=5,
        subset_flag="--candidates",
        choices=CANDIDATES,
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="fraction of each shape's channels (a quick check at e.g. 0.05)",
    )
    return parser.parse_args(argv)


def resnet50_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """ResNet-50's trainable variable shapes (v1.5, no conv biases, 1000 classes).

    Stem conv 7x7 + BN, then 3, 4, 6, 3 bottleneck blocks (1x1, 3x3, 1x1 convs,
    each with BN; a 1x1 projection + BN in each stage's first block), then a
    2048x1000 dense layer with bias. `scale` shrinks every channel count.
    """

    def width(channels: int) -> int:
        return max(1, round(channels * scale))

    shapes = []

    def conv_bn(size: int, channels_in: int, channels_out: int) -> None:
        shapes.append((size, size, channels_in, channels_out))
        shapes.extend([(channels_out,)] * 2)  # gamma, beta

    conv_bn(7, 3, width(64))
    channels_in = width(64)
    for blocks, bottleneck in zip((3, 4, 6, 3), (64, 128, 256, 512)):
        inner, outer = width(bottleneck), width(4 * bottleneck)
        for block in range(blocks):
            if block == 0:
                conv_bn(1, channels_in, outer)
            conv_bn(1, channels_in, inner)
            conv_bn(3, inner, inner)
            conv_bn(1, inner, outer)
            channels_in = outer
    shapes.extend([(width(2048), 1000), (1000,)])
    return shapes


def donated_loop(step, state, gradients):
    """A callable running `steps` calls of `step` under `jax.jit`, then waiting.

    `step(*state, gradients)` returns the next state, a pair whose buffers are
    donated to it (updated in place, as a compiled train step does). The
    first call, which compiles, runs here, so the callable times steps only.
    """
    import jax

    step = jax.jit(step, donate_argnums=(0, 1))
    state = jax.block_until_ready(step(*state, gradients))

    def run(steps):
        nonlocal state
        for _ in range(steps):
            state = step(*state, gradients)
        jax.block_until_ready(state)

    return run


def keras_step(optimizer, weights, gradients):
    """A callable running `steps` jitted `stateless_apply` calls of `optimizer`."""
    import keras

    variables = [keras.Variable(w) for w in weights]
    optimizer.build(variables)
    state = (
        [v.value for v in optimizer.variables],
        [v.value for v in variables],
    )

    def step(optimizer_values, weight_values, grads):
        weight_values, optimizer_values = optimizer.stateless_apply(
            optimizer_values, grads, weight_values
        )
        return optimizer_values, weight_values

    return donated_loop(step, state, gradients)


def optax_step(optimizer, weights, gradients):
    """A callable running `steps` jitted optax `update` + `apply_updates` calls."""
    import jax
    import optax

    params = [jax.numpy.asarray(w) for w in weights]
    state = (params, optimizer.init(params))

    def step(params, optimizer_state, grads):
        updates, optimizer_state = optimizer.update(grads, optimizer_state, params)
        return optax.apply_updates(params, updates), optimizer_state

    return donated_loop(step, state, gradients)


def jnp_lars_step(weights, gradients):
    """A callable running `steps` jitted LARS steps written in `jax.numpy`."""
    import jax.numpy as jnp

    def update(w, v, g):
        if w.ndim <= 1:  # exclude_bias_and_norm: global rate, no decay
            v = MOMENTUM * v - LEARNING_RATE * g
            return w + v, v
        w_norm, g_norm = jnp.linalg.norm(w), jnp.linalg.norm(g)
        ratio = TRUST_COEFFICIENT * w_norm / (g_norm + WEIGHT_DECAY * w_norm)
        ratio = jnp.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
        v = MOMENTUM * v - LEARNING_RATE * ratio * (g + WEIGHT_DECAY * w)
        return w + v, v

    def step(params, velocities, grads):
        updated = [update(w, v, g) for w, v, g in zip(params, velocities, grads)]
        return [w for w, _ in updated], [v for _, v in updated]

    state = ([jnp.asarray(w) for w in weights], [jnp.zeros_like(g) for g in gradients])
    return donated_loop(step, state, gradients)


def make_candidate(name: str, weights, gradients):
    """The step callable of candidate `name` on fresh copies of the weights."""
    import keras
    import optax

    matrices = [w.ndim > 1 for w in weights]  # exclude_bias_and_norm's complement
    if name == "lars":
        import lars_tf

        return keras_step(
            lars_tf.LARS(
                learning_rate=LEARNING_RATE,
                momentum=MOMENTUM,
                weight_decay=WEIGHT_DECAY,
                trust_coefficient=TRUST_COEFFICIENT,
                exclude_from_adaptation=lars_tf.exclude_bias_and_norm,
                exclude_from_weight_decay=lars_tf.exclude_bias_and_norm,
            ),
            weights,
            gradients,
        )
    if name == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=LEARNING_RATE, momentum=MOMENTUM)
        return keras_step(optimizer, weights, gradients)
    if name == "optax_lars":
        optimizer = optax.lars(
            learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            weight_decay_mask=matrices,
            trust_coefficient=TRUST_COEFFICIENT,
            trust_ratio_mask=matrices,
            momentum=MOMENTUM,
        )
        return optax_step(optimizer, weights, gradients)
    if name == "optax_sgd":
        optimizer = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
        return optax_step(optimizer, weights, gradients)
    return jnp_lars_step(weights, gradients)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import jax
    import keras
    import optax

    shapes = resnet50_shapes(args.scale)
    weights = random_arrays(shapes, 0.05, seed=0)
    gradients = [jax.numpy.asarray(g) for g in random_arrays(shapes, 0.01, seed=1)]
    num_parameters = sum(w.size for w in weights)
    began = time.perf_counter()
    candidates = {
        name: make_candidate(name, weights, gradients) for name in args.candidates
    }
    compile_seconds = time.perf_counter() - began
    wall, cpu = interleave(candidates, args.rounds, args.steps)
    device = jax.devices()[0]
    print_table(
        f"{len(shapes)} variables, {num_parameters / 1e6:.1f}M float32 parameters, "
        f"{args.rounds} rounds x {args.steps} steps on {device.platform} "
        f"({device.device_kind})",
        wall,
        cpu,
        reference=args.candidates[0],
        notes=(
            f"jax {jax.__version__}, keras {keras.__version__}, "
            f"optax {optax.__version__}; building and compiling all candidates "
            f"took {compile_seconds:.1f} s",
        ),
    )
    print(f"bytes moved per step at 20 B/parameter: {num_parameters * 20 / 1e6:.0f} MB")
    median_ms = {name: float(np.median(t)) * 1e3 for name, t in wall.items()}
    print("median wall ms:", {k: round(v, 3) for k, v in median_ms.items()})


if __name__ == "__main__":
    main()
