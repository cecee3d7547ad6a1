"""`TrustRatioMonitor`: LARS's per-layer norms and local rates during training.

The paper's Table 2 shows, per layer, ``||w||``, ``||g||`` and their ratio;
the monitor records them, and the local learning rate the optimizer applies,
computed by `LARS.local_learning_rate`, as LARS itself computes it.
"""

import importlib.util
import io
import math
from typing import NamedTuple

import keras
import rich.box
import rich.console
import rich.table
from keras import ops

from lars_tf.callbacks import StepCounter, inner_optimizer
from lars_tf.lars import LARS


class VariableStats(NamedTuple):
    """One variable's row of the trust-ratio monitor.

    ``effective_learning_rate`` is the step size LARS applies to the variable's
    (weight-decayed) gradient; for another optimizer, its global rate.
    """

    name: str
    weight_norm: float
    gradient_norm: float
    ratio: float  # ||w|| / ||g||, inf where ||g|| = 0.
    effective_learning_rate: float


def table_name(path: str) -> str:
    """Paper-style short name of a variable: ``conv1/kernel`` -> ``conv1.w``."""
    parts = path.split("/")
    parts[-1] = {"kernel": "w", "bias": "b"}.get(parts[-1], parts[-1])
    return ".".join(parts)


class TrustRatioMonitor(StepCounter):
    """Records per-variable ||w||, ||g||, ||w||/||g|| and LARS's effective rate.

    Every ``every_n_steps`` training steps the monitor takes the gradient of the
    loss on a fixed probe batch, in its own compiled function traced once
    (``tf.GradientTape`` in a ``tf.function`` on TensorFlow, ``jax.grad`` under
    ``jax.jit`` on JAX, ``torch.autograd`` on PyTorch). The training step
    itself is not changed, so a model trained without the monitor (or between
    measurements) pays nothing;
    a measurement costs about one forward and backward pass on the probe batch.
    The forward pass is ``model.stateless_call(..., training=True)``, so batch
    norm uses batch statistics as in training but its moving averages (and any
    other model state) are left untouched. Under a ``tf.distribute`` strategy it
    runs in cross-replica context on the variables' values, which are the same
    on every replica.

    The effective learning rate is what the model's optimizer applies: for
    ``lars_tf.LARS``, ``lr * trust_ratio`` (``min(trust_ratio, lr)`` with
    ``clip=True``, ``lr`` for variables excluded from adaptation), using
    ``LARS.local_learning_rate`` with each variable's settings; for
    any other optimizer, ``lr``. ``lr`` is the optimizer's rate at its current step.

    The ``||g||`` column (``gradient_norm``) and ``ratio`` are of the loss's
    gradient alone, as in the paper's Table 2, in both forms of LARS's ratio.
    With ``LARS(decayed_gradient_norm=True)`` LARS's trust ratio takes
    ``||g + d * w||`` (``d`` the variable's weight decay) instead, and so does
    the effective rate the monitor reports, so that it is the rate applied.

    Args:
        probe_batch: ``(x, y)`` on which gradients are taken; keep it the size
            of a training batch for a faithful ||g||.
        every_n_steps: Measure after every this many training steps.
        loss_fn: ``loss_fn(y_true, y_pred)``, averaged over the batch if it
            returns per-example values; defaults to the loss the model was
            compiled with (one loss, not a dict or list of them). Losses added
            by layers (regularizers) are added to it.
        log_dir: If given (needs the `tensorflow` and `tensorboard` packages,
            on any backend), writes TensorBoard scalars per variable
            (``trust_ratio/weight_norm/<name>``, ``.../gradient_norm/<name>``,
            ``.../ratio/<name>``, ``.../effective_learning_rate/<name>``) and
            histograms of the ratio and the effective rate across variables.
        measure_at_start: Also measure at ``on_train_begin``, on the initial
            weights (the paper's "iteration 1").
        verbose: If > 0, prints the table at every measurement.

    Attributes:
        history: List of ``(step, [VariableStats, ...])``, one per measurement.
    """

    def __init__(
        self,
        probe_batch: tuple,
        every_n_steps: int = 100,
        loss_fn=None,
        log_dir: str | None = None,
        measure_at_start: bool = False,
        verbose: int = 0,
    ):
        super().__init__()
        if every_n_steps <= 0:
            raise ValueError(
                f"Argument `every_n_steps` must be > 0. Received: {every_n_steps}"
            )
        if not (isinstance(probe_batch, tuple | list) and len(probe_batch) == 2):
            raise ValueError(
                "Argument `probe_batch` must be a pair (x, y). "
                f"Received: {type(probe_batch).__name__}"
            )
        if log_dir is not None and not all(
            importlib.util.find_spec(package)
            for package in ("tensorflow", "tensorboard")
        ):
            raise ImportError(
                "TrustRatioMonitor(log_dir=...) writes with tf.summary, which needs "
                "the `tensorflow` and `tensorboard` packages: pip install "
                "tensorflow tensorboard"
            )
        self.probe_x = keras.tree.map_structure(ops.convert_to_tensor, probe_batch[0])
        self.probe_y = keras.tree.map_structure(ops.convert_to_tensor, probe_batch[1])
        self.every_n_steps = int(every_n_steps)
        self.loss_fn = loss_fn
        self.log_dir = log_dir
        self.measure_at_start = measure_at_start
        self.verbose = verbose
        self.history: list[tuple[int, list[VariableStats]]] = []
        self._norms = None  # The tf.function, built on first use.
        self._writer = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.measure_at_start:
            self._record()

    def on_train_batch_end(self, batch, logs=None):
        previous = self.step
        super().on_train_batch_end(batch, logs)
        # Measure when a multiple of every_n_steps was crossed.
        if self.step // self.every_n_steps > previous // self.every_n_steps:
            self._record()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def measure(self) -> list[VariableStats]:
        """Measures the model's current weights on the probe batch, now."""
        model = self.model
        variables = model.trainable_variables
        if not variables:
            raise ValueError("The model has no trainable variables; build it first.")
        rule_decays = self._rule_decay_rates(variables)
        if self._norms is None or self._norms[0] != rule_decays:
            self._norms = (
                rule_decays,
                _probe_norms_function(model, self.loss_fn, rule_decays),
            )
        weight_norms, gradient_norms, rule_gradient_norms = (
            ops.convert_to_numpy(norms).astype(float)
            for norms in self._norms[1](self.probe_x, self.probe_y)
        )
        learning_rates = self._effective_learning_rates(
            variables, weight_norms, rule_gradient_norms
        )
        return [
            VariableStats(
                name=table_name(variable.path.removeprefix(f"{model.name}/")),
                weight_norm=w,
                gradient_norm=g,
                ratio=w / g if g > 0 else math.inf,
                effective_learning_rate=lr,
            )
            for variable, w, g, lr in zip(
                variables, weight_norms, gradient_norms, learning_rates, strict=True
            )
        ]

    def format_table(
        self, stats: list[VariableStats] | None = None, learning_rate: bool = True
    ) -> str:
        """The stats (default: the latest measurement) in the paper's Table 2 layout.

        One row per variable, kernel (``.w``) before bias (``.b``) of each layer,
        in the model's order; columns ``Layer | ||w|| | ||∇w|| | ||w||/||∇w||``,
        plus the effective learning rate if ``learning_rate``.
        """
        if stats is None:
            if not self.history:
                raise ValueError("Nothing measured yet: call measure() or train.")
            stats = self.history[-1][1]
        header = ["Layer", "||w||", "||∇w||", "||w||/||∇w||"]
        if learning_rate:
            header.append("LARS lr")
        # rich (a Keras dependency; it draws `model.summary()`) lays it out.
        table = rich.table.Table(
            *header, box=rich.box.ASCII, show_edge=False, pad_edge=False
        )
        for column in table.columns[1:]:
            column.justify = "right"
        for row in stats:
            numbers = [row.weight_norm, row.gradient_norm, row.ratio]
            if learning_rate:
                numbers.append(row.effective_learning_rate)
            table.add_row(row.name, *(f"{n:.3g}" for n in numbers))
        console = rich.console.Console(
            file=io.StringIO(), width=10_000, color_system=None, markup=False
        )
        console.print(table, highlight=False, emoji=False)
        return console.file.getvalue().rstrip("\n")

    def _rule_decay_rates(self, variables) -> tuple[float, ...] | None:
        """Each variable's `d` where the optimizer's ratio takes `||g + d * w||`.

        None where it takes `||g||` (any optimizer but a
        `LARS(decayed_gradient_norm=True)`).
        """
        if getattr(self.model, "optimizer", None) is None:
            return None
        optimizer = inner_optimizer(self.model)
        if not (isinstance(optimizer, LARS) and optimizer.decayed_gradient_norm):
            return None
        return tuple(_lars_flags(optimizer, self.model)[1])

    def _effective_learning_rates(self, variables, weight_norms, gradient_norms):
        """The optimizer's local rates; `gradient_norms` are those its ratio takes."""
        if getattr(self.model, "optimizer", None) is None:
            return [math.nan] * len(variables)
        optimizer = inner_optimizer(self.model)
        learning_rate = float(ops.convert_to_numpy(optimizer.learning_rate))
        if not isinstance(optimizer, LARS):
            return [learning_rate] * len(variables)
        adapted, decay_rates = _lars_flags(optimizer, self.model)
        return [
            float(
                ops.convert_to_numpy(
                    optimizer.local_learning_rate(
                        w, g, learning_rate, weight_decay=d, adapted=a
                    )
                )
            )
            for w, g, d, a in zip(
                weight_norms, gradient_norms, decay_rates, adapted, strict=True
            )
        ]

    def _record(self) -> None:
        stats = self.measure()
        self.history.append((self.step, stats))
        if self.log_dir is not None:
            self._write_summaries(self.step, stats)
        if self.verbose:
            print(f"TrustRatioMonitor: step {self.step}\n{self.format_table(stats)}")

    def _write_summaries(self, step: int, stats: list[VariableStats]) -> None:
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default(step=step):
            for row in stats:
                for field in (
                    "weight_norm",
                    "gradient_norm",
                    "ratio",
                    "effective_learning_rate",
                ):
                    tf.summary.scalar(
                        f"trust_ratio/{field}/{row.name}", getattr(row, field)
                    )
            finite = [r.ratio for r in stats if math.isfinite(r.ratio)]
            if finite:
                tf.summary.histogram("trust_ratio/ratio_across_variables", finite)
            tf.summary.histogram(
                "trust_ratio/effective_learning_rate_across_variables",
                [r.effective_learning_rate for r in stats],
            )


def _lars_flags(optimizer: LARS, model: keras.Model) -> tuple[list[bool], list[float]]:
    """Per-variable (adapted, weight decay) as the LARS optimizer decided them.

    An optimizer not built yet is built here, in the model's distribution
    strategy, exactly as its first step would build it.
    """
    variables = model.trainable_variables
    if not optimizer.built:
        if keras.backend.backend() == "tensorflow":
            with model.distribute_strategy.scope():
                optimizer.build(variables)
        else:
            optimizer.build(variables)
    settings = [optimizer.variable_settings(v) for v in variables]
    return [adapted for adapted, _ in settings], [decay for _, decay in settings]


def _probe_norms_function(
    model: keras.Model, loss_fn, rule_decays: tuple[float, ...] | None
):
    """A compiled `(x, y) -> (||w||, ||g||, the ratio's gradient norm)`, per variable.

    The gradient is of the loss on `(x, y)` through
    ``model.stateless_call(..., training=True)``: batch statistics as in
    training, and no model state changed. The third is `||g + d * w||` with
    each variable's `d` from `rule_decays`, or `||g||` where that is None.
    """
    loss_fn = loss_fn or keras.losses.get(model.loss)

    def loss_of(weights, state, x, y):
        y_pred, _, layer_losses = model.stateless_call(
            weights, state, x, training=True, return_losses=True
        )
        # A loss given by name (e.g. "mse") returns per-example values;
        # training minimizes their mean.
        loss = ops.mean(loss_fn(y, y_pred))
        for layer_loss in layer_losses:
            loss = loss + layer_loss
        return loss

    def norm(x):
        return ops.sqrt(ops.sum(ops.square(x)))

    def norms(weights, gradients):
        gradients = [
            ops.zeros_like(w) if g is None else g
            for w, g in zip(weights, gradients, strict=True)
        ]
        gradient_norms = ops.stack([norm(g) for g in gradients])
        rule_norms = gradient_norms
        if rule_decays is not None:
            rule_norms = ops.stack(
                [
                    norm(g + d * w) if d else norm(g)
                    for w, g, d in zip(weights, gradients, rule_decays, strict=True)
                ]
            )
        return ops.stack([norm(w) for w in weights]), gradient_norms, rule_norms

    return _compiled_probe(model, loss_of, norms)


def _compiled_probe(model: keras.Model, loss_of, norms):
    """`(x, y) -> norms(weights, d loss_of(weights, state, x, y) / d weights)`.

    Compiled where the backend compiles (a ``tf.function``, ``jax.jit``), on
    the model's current weights and state.
    """
    # keras.ops has no gradient op (Keras's trainers differentiate per backend
    # too), so each backend's own autodiff takes the gradient.
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def probe(x, y):
            weights = [tf.convert_to_tensor(v.value) for v in model.trainable_variables]
            state = [
                tf.convert_to_tensor(v.value) for v in model.non_trainable_variables
            ]
            with tf.GradientTape() as tape:
                tape.watch(weights)
                loss = loss_of(weights, state, x, y)
            gradients = tape.gradient(loss, weights)
            gradients = [g if g is None else tf.convert_to_tensor(g) for g in gradients]
            return norms(weights, gradients)

        return probe
    if backend == "jax":
        import jax

        @jax.jit
        def jax_probe(weights, state, x, y):
            return norms(weights, jax.grad(loss_of)(weights, state, x, y))

        def probe(x, y):
            return jax_probe(
                [v.value for v in model.trainable_variables],
                [v.value for v in model.non_trainable_variables],
                x,
                y,
            )

        return probe
    if backend == "torch":
        import torch

        def probe(x, y):
            weights = [
                v.value.detach().requires_grad_(True) for v in model.trainable_variables
            ]
            state = [v.value.detach() for v in model.non_trainable_variables]
            loss = loss_of(weights, state, x, y)
            gradients = torch.autograd.grad(loss, weights, allow_unused=True)
            with torch.no_grad():
                return norms(weights, gradients)

        return probe
    raise NotImplementedError(
        f"TrustRatioMonitor computes gradients on the tensorflow, jax and torch "
        f"backends; this is {backend!r}."
    )
