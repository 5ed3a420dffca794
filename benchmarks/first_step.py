"""Time of the first training step of a model, keras_bn against core Keras.

The first `train_on_batch` of a model traces its training function and
compiles what must be compiled (the XLA kernel's shapes, when keras_bn
takes it), then runs one step. This is what a new user waits for before
the first epoch moves. The model is a small convolutional network with 10
batch-normalization layers of different shapes (the worst case for
per-shape compilation), built with `keras.layers.BatchNormalization` or
`keras_bn.BatchNormalization`; everything else is equal.

Each measurement runs in a fresh Python process (compilation caches live
as long as the process), the core and keras_bn processes alternating;
the table gives the median of `--repeats` first steps of each and their
ratio, and, for reference, the median time of the next steps.

    python benchmarks/first_step.py
    python benchmarks/first_step.py --repeats 5 --batch-size 128
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import _cli

# Channels of the 10 batch-normalized layers: 8 convolutions, in pairs
# between poolings, then 2 dense layers.
CONV_CHANNELS = (8, 12, 16, 20, 24, 28, 32, 36)
DENSE_UNITS = (40, 44)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Time the first training step (trace, compile and run) "
        "of a model with 10 batch-normalization layers of different "
        "shapes, keras_bn against core Keras, in fresh processes."
    )
    parser.add_argument(
        "--repeats", type=_cli.positive_int, default=3,
        help="fresh processes per implementation (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=_cli.positive_int, default=128,
        help="examples per step (default: %(default)s)",
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


def build_model(implementation, image_size):
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
    )
    return model


def worker(args):
    """Runs in a fresh process: prints the first and later step times."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    x = rng.normal(size=shape).astype("float32")
    y = rng.integers(0, 10, args.batch_size)
    model = build_model(args.worker, args.image_size)
    start = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - start
    later = []
    for _ in range(5):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        later.append(time.perf_counter() - start)
    print(json.dumps({"first": first, "step": statistics.median(later)}))


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
            done = subprocess.run(
                [sys.executable, __file__, "--worker", implementation,
                 "--batch-size", str(args.batch_size),
                 "--image-size", str(args.image_size)],
                capture_output=True, text=True,
            )
            if done.returncode:
                sys.exit(f"The {implementation} worker failed:\n"
                         f"{done.stderr[-3000:]}")
            results[implementation].append(
                json.loads(done.stdout.splitlines()[-1])
            )
    medians = {
        name: {
            key: statistics.median(r[key] for r in runs)
            for key in ("first", "step")
        }
        for name, runs in results.items()
    }
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset")
    print(
        f"First training step, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size} images, 10 batch-normalization "
        f"layers; TF_ENABLE_ONEDNN_OPTS={onednn}; medians of "
        f"{args.repeats} fresh processes each.\n"
    )
    print("| | core s | keras_bn s | keras_bn / core |")
    print("| --- | ---: | ---: | ---: |")
    for key, label in (("first", "first step"), ("step", "later step")):
        core, ours = medians["core"][key], medians["keras_bn"][key]
        print(f"| {label} | {core:.3g} | {ours:.3g} | {ours / core:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"runs": results, "medians": medians}, indent=1)
    )


if __name__ == "__main__":
    main()
