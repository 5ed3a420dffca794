"""Time of a model's first training step or epoch, keras_bn against core.

The first call of a model traces its training function and compiles what
must be compiled, then runs. This is what a new user waits for before the
first epoch moves. Two kinds of model:

- `--model conv` (the default): a small convolutional network with 10
  batch-normalization layers of different shapes (the worst case for
  per-shape compilation), built with `keras.layers.BatchNormalization` or
  `keras_bn.BatchNormalization`; it times the first `train_on_batch` and
  the later steps.
- `--model lstm`, `gru` or `stock`: `Input((20, 3))`, one recurrent layer
  of 16 units and `Dense(1)`, fit with Adam on 256 sequences in batches of
  32 (`lstm`, `gru`: `keras_bn.BNLSTM` against `keras.layers.LSTM`,
  `keras_bn.BNGRU` against `keras.layers.GRU`), or the model of
  `examples/stock_series.py --quick` (`stock`: `BNLSTM(16,
  max_timesteps=20)` against `LSTM(16)`, 1,024 sequences in batches of
  64, with validation data). It times the first `fit` epoch (tracing and
  compilation included) and the median of the four epochs after it.

Each measurement runs in a fresh Python process (compilation caches live
as long as the process), the core and keras_bn processes alternating;
the table gives the medians of `--repeats` processes of each and their
ratios. The backend is `KERAS_BACKEND`'s; the models compile with Keras's
default, `jit_compile="auto"` (XLA on JAX), or with `jit_compile=True`
for `--jit-compile`.

    python benchmarks/first_step.py
    python benchmarks/first_step.py --repeats 5 --batch-size 128
    python benchmarks/first_step.py --model lstm --jit-compile
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

import _cli


class Recurrent(NamedTuple):
    """A recurrent model: the core and keras_bn layers of 16 units, the
    training and validation sequences, and keras_bn's extra arguments."""

    core: str
    ours: str
    sequences: int
    batch_size: int
    validation: int = 0
    arguments: dict = {}


MODELS = ("conv", "lstm", "gru", "stock")
RECURRENT = {
    "lstm": Recurrent("LSTM", "BNLSTM", 256, 32),
    "gru": Recurrent("GRU", "BNGRU", 256, 32),
    "stock": Recurrent("LSTM", "BNLSTM", 1024, 64, validation=256,
                       arguments={"max_timesteps": 20}),
}
EPOCHS = 5

# Channels of the 10 batch-normalized layers: 8 convolutions, in pairs
# between poolings, then 2 dense layers.
CONV_CHANNELS = (8, 12, 16, 20, 24, 28, 32, 36)
DENSE_UNITS = (40, 44)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Time a model's first training step or epoch (trace, "
        "compile and run), keras_bn against core Keras, in fresh processes."
    )
    parser.add_argument(
        "--model", choices=MODELS, default="conv",
        help="conv (10 batch-normalization layers, first train_on_batch), "
        "or lstm, gru or stock (one recurrent layer, first fit epoch) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--jit-compile", action="store_true",
        help="compile the model with jit_compile=True (default: Keras's "
        "'auto': XLA on JAX, not on a CPU with TensorFlow or PyTorch)",
    )
    parser.add_argument(
        "--repeats", type=_cli.positive_int, default=3,
        help="fresh processes per implementation (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=_cli.positive_int, default=128,
        help="examples per step of the conv model (default: %(default)s)",
    )
    parser.add_argument(
        "--image-size", type=_cli.positive_int, default=32,
        help="height and width of the input images, at least 16 for the "
        "four poolings (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("out", "first_step"),
        help="folder for results.json (default: %(default)s)",
    )
    parser.add_argument("--worker", choices=("core", "keras_bn"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.image_size < 16:
        parser.error(
            "argument --image-size: must be at least 16 (four poolings "
            f"halve it). Received: {args.image_size}"
        )
    return args


def build_model(implementation, image_size, jit):
    import keras

    if implementation == "core":
        norm = keras.layers.BatchNormalization
    else:
        import keras_bn

        norm = keras_bn.BatchNormalization
    layers = [keras.Input((image_size, image_size, 3))]
    for i, channels in enumerate(CONV_CHANNELS):
        layers += [
            keras.layers.Conv2D(channels, 3, padding="same", use_bias=False),
            norm(),
            keras.layers.ReLU(),
        ]
        if i % 2:
            layers.append(keras.layers.MaxPooling2D())
    layers.append(keras.layers.GlobalAveragePooling2D())
    for units in DENSE_UNITS:
        layers += [keras.layers.Dense(units), norm(), keras.layers.ReLU()]
    layers.append(keras.layers.Dense(10))
    model = keras.Sequential(layers)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    return model


def jit_compile(args):
    """`True` for `--jit-compile`, else Keras's default, `"auto"`."""
    return True if args.jit_compile else "auto"


def conv_times(args):
    """The first `train_on_batch` and the median of the next five."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    x = rng.normal(size=shape).astype("float32")
    y = rng.integers(0, 10, args.batch_size)
    model = build_model(args.worker, args.image_size, jit_compile(args))
    start = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - start
    later = []
    for _ in range(5):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        later.append(time.perf_counter() - start)
    return {"first": first, "later": statistics.median(later)}


def recurrent_times(args):
    """The first of `EPOCHS` `fit` epochs and the median of the others,
    in seconds."""
    import keras
    import numpy as np

    spec = RECURRENT[args.model]
    n, n_val = spec.sequences, spec.validation
    if args.worker == "core":
        layer = getattr(keras.layers, spec.core)(16)
    else:
        import keras_bn

        layer = getattr(keras_bn, spec.ours)(16, **spec.arguments)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((20, 3)), layer, keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse",
                  jit_compile=jit_compile(args))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n + n_val, 20, 3)).astype("float32")
    y = x[:, -5:, 0].mean(axis=1, keepdims=True)
    ends = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ends.append(time.perf_counter())

    validation = (x[n:], y[n:]) if n_val else None
    start = time.perf_counter()
    model.fit(x[:n], y[:n], batch_size=spec.batch_size, epochs=EPOCHS,
              validation_data=validation, verbose=0, callbacks=[Clock()])
    later = [end - begin for begin, end in zip(ends, ends[1:])]
    return {"first": ends[0] - start, "later": statistics.median(later)}


def worker(args):
    """Runs in a fresh process: prints the first and later times."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    times = conv_times(args) if args.model == "conv" else recurrent_times(args)
    print(json.dumps(times))


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    results = {"core": [], "keras_bn": []}
    for i in range(args.repeats):
        order = ("core", "keras_bn") if i % 2 == 0 else ("keras_bn", "core")
        for implementation in order:
            print(f"[{i + 1}/{args.repeats}] {implementation}", file=sys.stderr)
            command = [
                sys.executable, __file__, "--worker", implementation,
                "--model", args.model, "--batch-size", str(args.batch_size),
                "--image-size", str(args.image_size),
            ]
            if args.jit_compile:
                command.append("--jit-compile")
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"The {implementation} worker failed:\n"
                         f"{done.stderr[-3000:]}")
            results[implementation].append(
                json.loads(done.stdout.splitlines()[-1])
            )
    medians = {
        name: {
            key: statistics.median(r[key] for r in runs)
            for key in ("first", "later")
        }
        for name, runs in results.items()
    }
    print(describe(args) + f"; medians of {args.repeats} fresh processes "
          "each.\n")
    print("| | core s | keras_bn s | keras_bn / core |")
    print("| --- | ---: | ---: | ---: |")
    unit = "step" if args.model == "conv" else "epoch"
    labels = (f"first {unit}", f"later {unit}")
    for key, label in zip(("first", "later"), labels):
        core, ours = medians["core"][key], medians["keras_bn"][key]
        print(f"| {label} | {core:.3g} | {ours:.3g} | {ours / core:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"runs": results, "medians": medians}, indent=1)
    )


def describe(args):
    """The model, backend and settings a table was measured with."""
    import keras

    if args.model == "conv":
        text = (f"First training step, batch {args.batch_size}, "
                f"{args.image_size}x{args.image_size} images, 10 "
                "batch-normalization layers")
    else:
        spec = RECURRENT[args.model]
        text = (f"First fit epoch and the median of the {EPOCHS - 1} after "
                f"it, {spec.ours} against {spec.core}, 16 units, "
                f"{spec.sequences} sequences of 20 steps, batch "
                f"{spec.batch_size}")
        if spec.validation:
            text += f", {spec.validation} validation sequences"
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset")
    return (f"{text}; backend {keras.backend.backend()}, jit_compile="
            f"{jit_compile(args)!r}, TF_ENABLE_ONEDNN_OPTS={onednn}")


if __name__ == "__main__":
    main()
