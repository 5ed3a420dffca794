"""The command line every example shares.

Each example builds its parser with `parser()`, adds `--quick`, `--quiet`,
`--seed` and `--out` with `add_common`, and reads its arguments with
`parse`. Every option is checked by its type as argparse reads it, so a
bad value is a one-line usage error with exit status 2, before TensorFlow
is imported, worded one way:

    argument --epochs: must be a positive integer. Received: '0'

`--quick` changes only the defaults of the options it names: an option
given explicitly keeps its value (`--quick --epochs 3` trains 3 epochs).

TensorFlow's C++ log (start-up messages such as "oneDNN custom operations
are on", "Could not find cuda drivers", "failed call to cuInit") is kept
out of the output: every example calls `quiet_tensorflow()` when it is
imported, and `import_keras()` once its arguments are checked, before
anything else imports Keras or TensorFlow.
"""

import argparse
import math
import os
import pathlib
import sys

# Printed above the results of a `--quick` run.
QUICK_NOTE = (
    "--quick: a smoke run that checks the example runs end to end; its "
    "numbers mean nothing (the README's come from the default settings)."
)

# The largest seed NumPy and Keras accept, with room for consecutive seeds.
MAX_SEED = 2**31 - 1


def quiet_tensorflow():
    """Silences TensorFlow's C++ log unless the user chose a level."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def import_keras():
    """Imports Keras, and with it the backend's framework, quietly.

    TensorFlow 2.19 and later writes its start-up messages through absl
    before `TF_CPP_MIN_LOG_LEVEL` applies, so the level alone does not hide
    them: standard error (file descriptor 2, which C++ writes to) points
    at the null device while Keras is imported. A failed import still
    raises, and its traceback shows. Returns the `keras` module.
    """
    quiet_tensorflow()
    if "keras" in sys.modules:
        return sys.modules["keras"]
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        import keras
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    return keras


def _refuse(what, text):
    raise argparse.ArgumentTypeError(f"must be {what}. Received: {text!r}")


def _integer(text, minimum, what, maximum=None):
    try:
        value = int(text)
    except ValueError:
        value = None
    if (
        value is None
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        _refuse(what, text)
    return value


def positive_int(text):
    """An integer of at least 1: epochs, steps, units, sizes, counts."""
    return _integer(text, 1, "a positive integer")


def non_negative_int(text):
    """An integer of at least 0."""
    return _integer(text, 0, "a non-negative integer")


def seed(text):
    """A random seed: an integer from 0 to `MAX_SEED`."""
    return _integer(text, 0, f"an integer from 0 to {MAX_SEED}", MAX_SEED)


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
        _refuse("a finite number above 0", text)
    return value


def one_of(*names):
    """A type for one of `names`, which its message lists."""

    def choice(text):
        if text not in names:
            _refuse(f"one of {', '.join(map(repr, names))}", text)
        return text

    choice.__name__ = "one_of"
    return choice


def folder(text):
    """A folder for outputs: a path that is not an existing file."""
    path = pathlib.Path(text)
    if not text or (path.exists() and not path.is_dir()):
        _refuse("a folder (an existing file is not one)", text)
    return path


def existing_file(text):
    """The path of a file that exists."""
    if not os.path.isfile(text):
        _refuse("an existing file", text)
    return text


def non_empty(text):
    """Any text but the empty string."""
    if not text:
        _refuse("a non-empty text", text)
    return text


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not `None` or `False`)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "%(default)" in text
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` that knows `--quick`'s defaults."""

    def __init__(self, description, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(description=description, **kwargs)
        self.quick_defaults = {}

    def fail(self, option, value, allowed):
        """A usage error for `option`, worded as the argument types' are."""
        self.error(f"argument {option}: must be {allowed}. Received: {value!r}")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if getattr(parsed, "quick", False) and self.quick_defaults:
            # Parsed again with `--quick`'s defaults: what the user gave
            # explicitly still wins over them.
            ordinary = {a.dest: a.default for a in self._actions}
            self.set_defaults(**self.quick_defaults)
            try:
                parsed = super().parse_args(args, namespace)
            finally:
                self.set_defaults(**{
                    dest: ordinary[dest] for dest in self.quick_defaults
                })
        return parsed


def parser(description):
    """The example's parser, which shows each option's default."""
    return ArgumentParser(description)


def add_common(parser, *, quick, quick_help, out, seed_help="random seed"):
    """`--quick`, `--quiet`, `--seed` and `--out`.

    Args:
        parser: The example's `ArgumentParser`.
        quick: `{dest: value}`, the defaults `--quick` gives; an option's
            help then shows both defaults.
        quick_help: What else `--quick` does (less data, say), or `""`.
        out: The default output folder.
        seed_help: What the seed seeds.
    """
    parser.quick_defaults = dict(quick)
    for action in parser._actions:
        if action.dest in quick:
            action.help = (
                f"{action.help} (default: %(default)s; "
                f"{_shown(quick[action.dest])} with --quick)"
            )
    changes = ", ".join(
        f"--{dest.replace('_', '-')} {_shown(value)}"
        for dest, value in quick.items()
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke run that checks everything runs, whose numbers mean "
        f"nothing: {'; '.join(t for t in (quick_help, changes) if t)} "
        "unless given explicitly",
    )
    parser.add_argument(
        "--quiet", action="store_true",
        help="no progress output from Keras; the results are still printed",
    )
    parser.add_argument(
        "--seed", type=seed, default=0,
        help=f"{seed_help}, an integer from 0 to {MAX_SEED}",
    )
    parser.add_argument(
        "--out", type=folder, default=pathlib.Path(out),
        help="folder for the results, created if missing",
    )


def _shown(value):
    if isinstance(value, (list, tuple)):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v)
                        for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
