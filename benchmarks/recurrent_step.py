"""A recurrent layer's training step, keras_bn against core, in one process.

Two models of `Input((steps, features))`, a recurrent layer and `Dense(1)`,
compiled with Adam and a mean squared error: one with `keras_bn.BNLSTM`
(or `BNGRU`), one with `keras.layers.LSTM` (or `GRU`), of the same units.
After warm-up calls, their `train_on_batch` calls alternate on the same
batch, and the table gives the median of each and keras_bn / core. The
backend is `KERAS_BACKEND`'s; the models compile with Keras's default,
`jit_compile="auto"` (XLA on JAX), or with `jit_compile=True` for
`--jit-compile`. `benchmarks/run.py` times the layers alone on TensorFlow;
this times what a user's `fit` runs, on any backend.

    KERAS_BACKEND=torch python benchmarks/recurrent_step.py
    KERAS_BACKEND=torch python benchmarks/recurrent_step.py --model gru \\
        --units 16 --batch-size 32 --steps 20 --features 3
"""

import argparse
import json
import pathlib
import statistics
import time

import _cli

PAIRS = {"lstm": ("LSTM", "BNLSTM"), "gru": ("GRU", "BNGRU")}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Time a recurrent layer's training step, keras_bn "
        "against core Keras, calls alternating in one process."
    )
    parser.add_argument("--model", choices=tuple(PAIRS), default="lstm",
                        help="the pair of layers (default: %(default)s)")
    sizes = {"units": 128, "batch-size": 64, "steps": 100, "features": 32}
    for name, default in sizes.items():
        parser.add_argument(
            f"--{name}", type=_cli.positive_int, default=default,
            help=f"a positive integer (default: {default})",
        )
    parser.add_argument("--repeats", type=_cli.positive_int, default=10,
                        help="timed calls of each model (default: "
                        "%(default)s)")
    parser.add_argument("--warmup", type=_cli.positive_int, default=3,
                        help="untimed calls of each model first (default: "
                        "%(default)s)")
    parser.add_argument("--jit-compile", action="store_true",
                        help="compile the models with jit_compile=True "
                        "(default: Keras's 'auto')")
    parser.add_argument(
        "--out", type=pathlib.Path,
        default=pathlib.Path("out", "recurrent_step"),
        help="folder for results.json (default: %(default)s)",
    )
    return parser.parse_args(argv)


def build(layer, args):
    import keras

    model = keras.Sequential([
        keras.Input((args.steps, args.features)), layer,
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse",
                  jit_compile=True if args.jit_compile else "auto")
    return model


def step_times(args):
    """The `train_on_batch` times of each model, in seconds, by name."""
    import keras
    import numpy as np

    import keras_bn

    core_name, ours_name = PAIRS[args.model]
    keras.utils.set_random_seed(0)
    models = {
        "core": build(getattr(keras.layers, core_name)(args.units), args),
        "keras_bn": build(getattr(keras_bn, ours_name)(args.units), args),
    }
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, args.steps, args.features))
    x = x.astype("float32")
    y = x[:, -5:, :1].mean(axis=1)
    for model in models.values():
        for _ in range(args.warmup):
            model.train_on_batch(x, y)
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None):
    args = parse_args(argv)
    import keras

    times = step_times(args)
    medians = {name: statistics.median(t) for name, t in times.items()}
    core_name, ours_name = PAIRS[args.model]
    print(
        f"{ours_name} against {core_name}, {args.units} units, batch "
        f"{args.batch_size}, {args.steps} steps, {args.features} features; "
        f"backend {keras.backend.backend()}, jit_compile="
        f"{True if args.jit_compile else 'auto'!r}; medians of "
        f"{args.repeats} training steps each, calls alternating.\n"
    )
    print("| core ms | keras_bn ms | keras_bn / core |")
    print("| ---: | ---: | ---: |")
    core, ours = medians["core"], medians["keras_bn"]
    print(f"| {core * 1e3:.3g} | {ours * 1e3:.3g} | {ours / core:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"arguments": {k: str(v) for k, v in vars(args).items()},
         "times_s": times, "medians_s": medians}, indent=1,
    ))


if __name__ == "__main__":
    main()
