"""How long does one optimizer step on ResNet-50's parameters take on the JAX
backend, LARS against Keras SGD-momentum, `optax.lars` and `optax.sgd`?

    python -m benchmarks.jax_optimizer_step [--rounds=15] [--steps=5]
        [--candidates=lars,sgd,optax_lars,optax_sgd,jnp_lars] [--scale=1]

Parameters have the shapes of `train.models.resnet50`'s 161 trainable
variables (`harness.resnet50_shapes`), random weights and gradients. Every
candidate runs at its fastest, under `jax.jit` with weights and slots donated:

- `lars`: `lars_tf.LARS` (`harness.lars_settings`) through
  `optimizer.stateless_apply`, the call `model.fit`'s compiled step makes;
- `sgd`: Keras `SGD(momentum=0.9)` through the same call;
- `optax_lars`: `optax.lars` with LARS's settings and masks;
- `optax_sgd`: `optax.sgd(momentum=0.9)`;
- `jnp_lars`: LARS's update written directly in `jax.numpy`, what a
  hand-written JAX LARS costs.

Ratios are candidate time / the first candidate's (LARS's by default) per
round. The same script runs on a GPU (`benchmarks/gpu_check.sh`); it needs no
TensorFlow.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import harness  # noqa: E402

CANDIDATES = ("lars", "sgd", "optax_lars", "optax_sgd", "jnp_lars")

FLAGS = flags.FLAGS
harness.define_subset("candidates", CANDIDATES, "Candidates to time")
flags.DEFINE_integer("steps", 5, "Steps per candidate per round.", lower_bound=1)
flags.DEFINE_float("scale", 1.0, "Fraction of every channel count.", lower_bound=0)
harness.set_defaults(rounds=15)


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
    state = ([v.value for v in optimizer.variables], [v.value for v in variables])

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

    lr, momentum, decay = harness.LEARNING_RATE, harness.MOMENTUM, harness.WEIGHT_DECAY

    def update(w, v, g):
        if w.ndim <= 1:  # exclude_bias_and_norm: global rate, no decay
            v = momentum * v - lr * g
            return w + v, v
        w_norm, g_norm = jnp.linalg.norm(w), jnp.linalg.norm(g)
        ratio = harness.TRUST_COEFFICIENT * w_norm / (g_norm + decay * w_norm)
        ratio = jnp.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
        v = momentum * v - lr * ratio * (g + decay * w)
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

    if name == "lars":
        import lars_tf

        optimizer = lars_tf.LARS(**harness.lars_settings())
        return keras_step(optimizer, weights, gradients)
    if name == "sgd":
        optimizer = keras.optimizers.SGD(harness.LEARNING_RATE, momentum=0.9)
        return keras_step(optimizer, weights, gradients)
    if name == "optax_lars":
        matrices = [w.ndim > 1 for w in weights]  # exclude_bias_and_norm's complement
        optimizer = optax.lars(
            learning_rate=harness.LEARNING_RATE,
            weight_decay=harness.WEIGHT_DECAY,
            weight_decay_mask=matrices,
            trust_coefficient=harness.TRUST_COEFFICIENT,
            trust_ratio_mask=matrices,
            momentum=harness.MOMENTUM,
        )
        return optax_step(optimizer, weights, gradients)
    if name == "optax_sgd":
        optimizer = optax.sgd(harness.LEARNING_RATE, momentum=harness.MOMENTUM)
        return optax_step(optimizer, weights, gradients)
    return jnp_lars_step(weights, gradients)


def main() -> None:
    import jax

    print(harness.machine_line(), flush=True)
    shapes = harness.resnet50_shapes(FLAGS.scale)
    weights = harness.random_arrays(shapes, 0.05, seed=0)
    gradients = [jax.numpy.asarray(g) for g in harness.random_arrays(shapes, 0.01, 1)]
    candidates = {}
    compile_time = harness.timed(
        lambda: candidates.update(
            (name, make_candidate(name, weights, gradients))
            for name in FLAGS.candidates
        )
    )
    wall, cpu = harness.step_times(candidates, FLAGS.rounds, FLAGS.steps)
    device = jax.devices()[0]
    reference = FLAGS.candidates[0]
    figures = {
        "note": f"{len(shapes)} variables, {sum(w.size for w in weights) / 1e6:.1f}M "
        f"float32 parameters on {device.platform} ({device.device_kind}); "
        f"{FLAGS.rounds} rounds x {FLAGS.steps} steps; building and compiling "
        f"took {compile_time[0]:.1f} s",
        "candidates": {
            name: {
                "wall_ms": float(np.median(wall[name])) * 1e3,
                "cpu_ms": float(np.median(cpu[name])) * 1e3,
                f"wall_x_{reference}": harness.ratio(wall[name], wall[reference]),
                f"cpu_x_{reference}": harness.ratio(cpu[name], cpu[reference]),
            }
            for name in candidates
        },
    }
    print(figures["note"])
    rows = [
        [name, f"{f['wall_ms']:.1f}", harness.show(f[f"wall_x_{reference}"])]
        + [f"{f['cpu_ms']:.1f}", harness.show(f[f"cpu_x_{reference}"])]
        for name, f in figures["candidates"].items()
    ]
    header = ["candidate", "wall ms", f"wall x {reference}", "CPU ms"]
    print(harness.markdown_table([*header, f"CPU x {reference}"], rows))
    harness.write_results("jax_optimizer_step", figures)


if __name__ == "__main__":
    harness.run(main)
