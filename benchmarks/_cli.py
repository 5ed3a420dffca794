"""The command-line pieces shared by the benchmark scripts."""

import argparse


def parse_shape_and_repeats(doc, argv):
    """`--shape` (a tuple of positive ints) and `--repeats` (>= 1)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--shape", default="64,32,32,64",
        help="comma-separated input shape, channels last (default: "
        "64,32,32,64)",
    )
    parser.add_argument(
        "--repeats", type=int, default=20,
        help="timed calls of each piece (default: 20)",
    )
    args = parser.parse_args(argv)
    try:
        args.shape = tuple(int(s) for s in args.shape.split(","))
    except ValueError:
        parser.error(
            "--shape must be comma-separated integers. Received: "
            f"{args.shape}"
        )
    if len(args.shape) < 2 or min(args.shape) < 1:
        parser.error(
            "--shape needs at least two positive sizes. Received: "
            f"{args.shape}"
        )
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1. Received: {args.repeats}")
    return args


def positive_int(text):
    """An argparse type: a positive integer, or a one-line error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer. Received: {text!r}"
        )
    return value
