"""Argument types shared by the examples' command lines.

Each type turns one command-line string into a checked value or raises
`argparse.ArgumentTypeError`, which argparse reports as a one-line error
naming the option, with exit status 2, before TensorFlow is imported:

    parser.add_argument("--epochs", type=_cli.positive_int, default=15)

The message shows what the user typed with `repr`, as keras_bn's own errors
do: "argument --epochs: must be a positive integer. Received: '0'".
"""

import argparse
import math


def _integer(text, minimum, what):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(
            f"must be {what}. Received: {text!r}"
        )
    return value


def positive_int(text):
    """An integer of at least 1: epochs, steps, units, sizes, counts."""
    return _integer(text, 1, "a positive integer")


def non_negative_int(text):
    """An integer of at least 0: random seeds."""
    return _integer(text, 0, "a non-negative integer")


def int_at_least(minimum):
    """A type for integers of at least `minimum`, named in its message."""

    def at_least(text):
        return _integer(text, minimum, f"an integer of at least {minimum}")

    at_least.__name__ = f"int_at_least_{minimum}"
    return at_least


def rate(text):
    """A finite number above 0: learning rates, temperatures.

    `nan`, `inf` and `0` are refused: none of them trains anything.
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"must be a finite number above 0. Received: {text!r}"
        )
    return value
