"""The allowed range of every numeric argument of LARS and the schedules.

Each range is written here once. `lars_tf.LARS` and the schedules call these
checks, and so can a program that validates its command line before it starts
TensorFlow: this module imports neither TensorFlow nor Keras. Every check
accepts Python numbers and NumPy scalars (`np.float32(0.9)`), returns a plain
Python `float` (or `int`), and otherwise raises `ValueError` with one line that
names the argument and its allowed range. `name` is the name to show, e.g.
`"--momentum"` for a command-line flag.
"""

import math
import numbers


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == math.inf:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_number(
    name: str,
    value,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Returns `value` as a float if it is a finite real number in the range.

    The range is `[low, high]`, with `low_open`/`high_open` excluding an end.
    Booleans are refused: `True` as a rate is a mistake, not the number 1.
    """
    in_range = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not in_range:
        raise ValueError(
            f"`{name}` must be a finite number "
            f"{_interval(low, high, low_open, high_open)}. Received: {value!r}"
        )
    return float(value)


def check_integer(name: str, value, low: int = 0) -> int:
    """Returns `value` as an int if it is a whole number >= `low`.

    A float with no fractional part (`5.0`) is accepted, since step counts are
    often computed as `epochs * steps_per_epoch`.
    """
    whole = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and float(value).is_integer()
        and value >= low
    )
    if not whole:
        raise ValueError(
            f"`{name}` must be a whole number >= {low}. Received: {value!r}"
        )
    return int(value)


def check_learning_rate(
    value, name: str = "learning_rate", allow_zero: bool = True
) -> float:
    """A learning rate: finite, >= 0 (or > 0 with `allow_zero=False`)."""
    return check_number(name, value, 0.0, low_open=not allow_zero)


def check_momentum(value, name: str = "momentum") -> float:
    """LARS momentum: in [0, 1); 1 or more never forgets and diverges."""
    return check_number(name, value, 0.0, 1.0, high_open=True)


def check_weight_decay(value, name: str = "weight_decay") -> float:
    """Coupled L2 weight decay: finite, >= 0."""
    return check_number(name, value, 0.0)


def check_trust_coefficient(value, name: str = "trust_coefficient") -> float:
    """The paper's eta: finite, > 0 (0 would make every update zero)."""
    return check_number(name, value, 0.0, low_open=True)


def check_epsilon(value, name: str = "epsilon") -> float:
    """The trust ratio's denominator offset: finite, >= 0."""
    return check_number(name, value, 0.0)


def check_nesterov(nesterov: bool, momentum: float) -> bool:
    """Nesterov momentum needs a momentum above 0."""
    if nesterov and momentum == 0:
        raise ValueError(
            "`nesterov` needs `momentum` in (0, 1). Received: nesterov=True, momentum=0"
        )
    return bool(nesterov)


def check_power(value, name: str = "power") -> float:
    """Exponent of the polynomial decay: finite, > 0."""
    return check_number(name, value, 0.0, low_open=True)


def check_warmup_steps(value, name: str = "warmup_steps") -> int:
    """Number of linear warm-up steps: a whole number >= 0."""
    return check_integer(name, value, 0)


def check_decay_steps(value, name: str = "decay_steps") -> int:
    """Total steps of a decay schedule: a whole number >= 1."""
    return check_integer(name, value, 1)
