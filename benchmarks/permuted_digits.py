"""Test accuracy of LSTM and BNLSTM on permuted 8x8 digits.

scikit-learn's 8x8 digits (`sklearn.datasets.load_digits`, bundled with
scikit-learn, no download), each image read as a sequence of 64 pixels of
one feature, in one fixed random permutation: a small cousin of the
paper's permuted MNIST. Each model is trained with Adam, and its test
accuracy reported with the moving statistics the layer kept in training
and with statistics recomputed after training over the training data
(`keras_bn.recompute_statistics`).

    python benchmarks/permuted_digits.py                 # 25 epochs, 2 seeds
    python benchmarks/permuted_digits.py --quick         # a smoke test
    python benchmarks/permuted_digits.py --models lstm,bnlstm
    python benchmarks/permuted_digits.py --models bnlstm_noise0 --early-rows 3

`--early-rows N` also reports the accuracy with the recomputed statistics
in the rows of the first N steps only, the moving ones in the others: how
much of the gap between the two the first steps account for.

It runs on the backend Keras is set to (`KERAS_BACKEND`).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bn  # noqa: E402
from benchmarks._cli import positive_int  # noqa: E402

# name: (layer class, keyword arguments); "lstm" has no statistics.
MODELS = {
    "lstm": (keras.layers.LSTM, {}),
    "bnlstm": (keras_bn.BNLSTM, {}),
    "bnlstm_noise0": (keras_bn.BNLSTM, {"initial_state_noise": 0.0}),
    "gru": (keras.layers.GRU, {}),
    "bngru": (keras_bn.BNGRU, {}),
    "bngru_noise0": (keras_bn.BNGRU, {"initial_state_noise": 0.0}),
}


def load(permutation_seed=0, test_fraction=0.25):
    """`(x_train, y_train, x_test, y_test)`: pixels scaled to [0, 1], as
    `(examples, 64, 1)` sequences in one fixed random order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    rng = np.random.default_rng(permutation_seed)
    x = x[:, rng.permutation(x.shape[1])][..., None]
    order = rng.permutation(len(x))
    split = int(len(x) * (1.0 - test_fraction))
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


def build(name, units, steps):
    layer_class, kwargs = MODELS[name]
    return keras.Sequential([
        keras.Input((steps, 1)),
        layer_class(units, **kwargs),
        keras.layers.Dense(10, activation="softmax"),
    ])


def accuracy(model, x, y):
    probabilities = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(probabilities, axis=-1) == y))


def run(name, seed, args, data):
    x_train, y_train, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    model = build(name, args.units, x_train.shape[1])
    model.compile(
        keras.optimizers.Adam(args.learning_rate),
        "sparse_categorical_crossentropy",
    )
    start = time.perf_counter()
    model.fit(
        x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
        verbose=0,
    )
    moving = accuracy(model, x_test, y_test)
    recomputed = early = None
    if name not in ("lstm", "gru"):
        cell = model.layers[0].cell
        kept = [
            keras.ops.convert_to_numpy(w) for w in cell.non_trainable_weights
        ]
        keras_bn.recompute_statistics(
            model, x_train, batch_size=args.batch_size
        )
        recomputed = accuracy(model, x_test, y_test)
        if args.early_rows:
            for weight, old in zip(cell.non_trainable_weights, kept):
                if weight.name.startswith("moving_") and old.shape[0] > 1:
                    new = keras.ops.convert_to_numpy(weight).copy()
                    new[args.early_rows:] = old[args.early_rows:]
                    weight.assign(new)
            early = accuracy(model, x_test, y_test)
    return moving, recomputed, early, time.perf_counter() - start


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=positive_int, default=25)
    parser.add_argument(
        "--seeds", type=positive_int, default=2,
        help="how many training seeds, from --first-seed on (default: 2)",
    )
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--units", type=positive_int, default=100)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--early-rows", type=int, default=0,
        help="also report the recomputed statistics of the first N steps "
        "only (default: 0, off)",
    )
    parser.add_argument(
        "--models", default="lstm,bnlstm,bnlstm_noise0",
        help="comma-separated, from: " + ", ".join(MODELS),
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke test: 2 epochs, 1 seed, 16 units",
    )
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    for name in args.models:
        if name not in MODELS:
            parser.error(
                f"--models takes names from {sorted(MODELS)}. "
                f"Received: {name!r}"
            )
    if args.early_rows < 0:
        parser.error(
            "--early-rows must be at least 0. Received: "
            f"{args.early_rows!r}"
        )
    if args.quick:
        args.epochs, args.seeds, args.units = 2, 1, 16
    return args


def main(argv=None):
    args = parse(argv)
    data = load()
    print(
        f"permuted digits: {len(data[0])} training and {len(data[2])} test "
        f"sequences of 64 steps; {args.units} units, Adam "
        f"{args.learning_rate}, batch {args.batch_size}, {args.epochs} "
        f"epochs, seeds {args.first_seed} to "
        f"{args.first_seed + args.seeds - 1}; backend "
        f"{keras.backend.backend()}"
    )
    early = (
        f" recomputed in rows < {args.early_rows} only |"
        if args.early_rows else ""
    )
    print(f"| model | seed | moving statistics | recomputed |{early} seconds |")
    print("| --- | ---: | ---: | ---: |" + " ---: |" * (2 if early else 1))
    for name in args.models:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            *accuracies, seconds = run(name, seed, args, data)
            if not args.early_rows:
                accuracies = accuracies[:2]
            shown = " | ".join(
                "–" if a is None else f"{a:.3f}" for a in accuracies
            )
            print(f"| {name} | {seed} | {shown} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
