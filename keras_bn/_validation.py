"""Argument checks shared by every keras_bn layer, schedule and tool.

Each check returns the value in its canonical Python type, or raises a
`ValueError` that names the argument as the caller wrote it, shows the value
received with `repr` (and its type when the type is wrong), and says what is
allowed. No other module repeats these checks.
"""

import math
import numbers

from keras import initializers


def fail(name, value, allowed, detail=""):
    """Raises the package's error for argument `name`.

    Args:
        name: The argument's name, as the caller wrote it.
        value: The value received.
        allowed: What is allowed, completing "Argument `name` must be ...".
        detail: Optional sentence added after the rule.
    """
    detail = f" {detail}" if detail else ""
    raise ValueError(
        f"Argument `{name}` must be {allowed}.{detail} Received: "
        f"{name}={value!r}{_type_note(value)}"
    )


def _type_note(value):
    """`" (a str)"` for values whose type is not a number, bool or None."""
    if value is None or isinstance(value, (bool, numbers.Number)):
        return ""
    return f" (a {type(value).__name__})"


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def boolean(name, value, allow_none=False):
    """`value` if it is a bool (or `None` when allowed)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        fail(name, value, "True, False or None" if allow_none else
             "True or False")
    return value


def integer(name, value, minimum=None, allow_none=False):
    """`value` as an int, checked against `minimum`.

    Args:
        name: The argument's name.
        value: The value received.
        minimum: Smallest allowed value, or `None` for no bound.
        allow_none: Whether `None` is allowed (and returned).
    """
    if value is None and allow_none:
        return None
    if minimum == 1:
        allowed = "a positive integer"
    elif minimum == 0:
        allowed = "a non-negative integer"
    elif minimum is None:
        allowed = "an integer"
    else:
        allowed = f"an integer of at least {minimum}"
    if allow_none:
        allowed += " or None"
    if not _is_integer(value) or (minimum is not None and value < minimum):
        fail(name, value, allowed)
    return int(value)


def real(name, value, low=-math.inf, high=math.inf, *, low_open=False,
         high_open=False, allowed=None, allow_none=False):
    """`value` as a float in the interval from `low` to `high`.

    Args:
        name: The argument's name.
        value: The value received.
        low, high: The interval's bounds; infinite bounds are open.
        low_open, high_open: Whether the bound itself is excluded.
        allowed: What is allowed, in words; by default the interval.
        allow_none: Whether `None` is allowed (and returned).
    """
    if value is None and allow_none:
        return None
    if allowed is None:
        allowed = "a float" + _interval(low, high, low_open, high_open)
        if allow_none:
            allowed += " or None"
    ok = _is_real(value) and not math.isnan(value)
    if ok:
        above = value > low if low_open or low == -math.inf else value >= low
        below = (
            value < high if high_open or high == math.inf else value <= high
        )
        ok = above and below
    if not ok:
        fail(name, value, allowed)
    return float(value)


def _interval(low, high, low_open, high_open):
    if low == -math.inf and high == math.inf:
        return ""
    if high == math.inf:
        return f" {'>' if low_open else '>='} {low:g}"
    if low == -math.inf:
        return f" {'<' if high_open else '<='} {high:g}"
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    return f" in {left}{low:g}, {high:g}{right}"


def momentum(name, value, allow_none=False):
    """A moving-average decay in `[0, 1)`."""
    allowed = "a float in [0, 1)"
    if allow_none:
        allowed += ", or None for a cumulative average"
    return real(name, value, 0.0, 1.0, high_open=True, allowed=allowed,
                allow_none=allow_none)


def epsilon(name, value):
    """A positive float added to a variance."""
    return real(name, value, 0.0, low_open=True, allowed="a positive float")


def rate(name, value):
    """A dropout rate in `[0, 1)`."""
    return real(name, value, 0.0, 1.0, high_open=True)


def finite(name, value):
    """Any finite float."""
    return real(name, value, allowed="a finite float")


def non_negative(name, value):
    """A non-negative, finite or infinite float."""
    return real(name, value, 0.0, allowed="a non-negative float")


def choice(name, value, options):
    """`value` if it is one of `options` (compared with `==`)."""
    if isinstance(value, bool) or value not in options:
        fail(name, value, "one of " + ", ".join(repr(o) for o in options))
    return value


def axis(name, value):
    """An integer or a non-empty list of distinct integers.

    Returns an int, or a list of ints when `value` is a list or tuple.
    """
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(_is_integer(a) for a in values):
        fail(name, value, "an integer or a non-empty list of integers")
    values = [int(a) for a in values]
    if len(set(values)) != len(values):
        fail(name, value, "an integer or a list of distinct integers")
    return values if isinstance(value, (list, tuple)) else values[0]


def initializer(value):
    """`keras.initializers.get`, also accepting a float for a constant."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return initializers.Constant(float(value))
    return initializers.get(value)
