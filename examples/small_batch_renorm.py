"""Batch renormalization versus batch normalization where BN struggles.

The two failure cases of batch normalization from Ioffe (2017), on
scikit-learn's handwritten digits (8x8 images, 10 classes, shipped with
scikit-learn, so nothing is downloaded):

- `iid_4`: minibatches of 4 examples;
- `noniid_32`: minibatches of 32 examples drawn from only 2 classes;
- `iid_32`: ordinary minibatches of 32, the baseline.

For each case a small MLP (Dense -> norm -> ReLU, twice, then softmax) is
trained with `keras_bn.BatchNormalization` and with
`keras_bn.BatchRenormalization` (the paper's warm-up schedule, scaled to the
run's length) from several seeds, and evaluated on held-out digits in
inference mode, i.e. with the population (moving) statistics. The script
prints a table, and writes `results.json`, `results.csv`, `results.png` and
`renorm_diagnostics.csv` (the clipping limits and clipped fractions of the
first seed's BRN runs, every 50 steps) to `--out`.

    python examples/small_batch_renorm.py --quick   # a smoke run
    python examples/small_batch_renorm.py           # a few minutes
"""

import csv
import json
import os
import sys
import time

import _cli

_cli.quiet_tensorflow()

CASES = {
    # name: (batch size, classes per batch or None for i.i.d.)
    "iid_32": (32, None),
    "iid_4": (4, None),
    "noniid_32": (32, 2),
}
LAYERS = ("BN", "BRN")
QUICK = {"steps": 300, "seeds": 2}


def parse_args(argv=None):
    parser = _cli.parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--steps", type=_cli.positive_int, default=1500,
        help="training steps per run",
    )
    parser.add_argument(
        "--seeds", type=_cli.positive_int, default=5,
        help="number of seeds per case and layer",
    )
    _cli.add_common(
        parser, quick=QUICK, quick_help="",
        out=os.path.join("out", "small_batch_renorm"),
        seed_help="first seed: runs use --seed to --seed + --seeds - 1 for "
        "the split, the batches and the weights",
    )
    return parser.parse_args(argv)


def load_data(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    return train_test_split(
        x, y.astype("int32"), test_size=0.25, stratify=y, random_state=seed
    )


def batch_order(y, batch_size, steps, classes_per_batch, rng):
    """Indices of `steps` consecutive minibatches of `batch_size`.

    I.i.d. minibatches walk through reshuffled epochs; non-i.i.d. ones take
    `batch_size / classes_per_batch` random examples from each of
    `classes_per_batch` random classes.
    """
    import numpy as np

    if classes_per_batch is None:
        epochs = -(-steps * batch_size // len(y))
        order = np.concatenate([rng.permutation(len(y)) for _ in range(epochs)])
        return order[: steps * batch_size]
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    per_class = batch_size // classes_per_batch
    batches = []
    for _ in range(steps):
        classes = rng.choice(len(by_class), classes_per_batch, replace=False)
        batches.extend(
            rng.choice(by_class[c], per_class, replace=False) for c in classes
        )
    return np.concatenate(batches)


def norm_layer(kind, steps):
    import keras_bn

    if kind == "BN":
        return keras_bn.BatchNormalization()
    # The paper's schedule (plain BN for 5k steps, rmax 3 at 40k, dmax 5 at
    # 25k) shrunk to this run: warm-up 5 %, dmax at 25 %, rmax at 40 %.
    clipping = keras_bn.schedules.paper_renorm_clipping(
        warmup_steps=steps // 20,
        rmax_steps=steps * 2 // 5,
        dmax_steps=steps // 4,
    )
    return keras_bn.BatchRenormalization(renorm_clipping=clipping)


def build_model(kind, steps):
    import keras

    model = keras.Sequential([keras.Input((64,))])
    for _ in range(2):
        model.add(keras.layers.Dense(64, use_bias=False))
        model.add(norm_layer(kind, steps))
        model.add(keras.layers.ReLU())
    model.add(keras.layers.Dense(10, activation="softmax"))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=50,
    )
    return model


def renorm_logger(model, rows):
    """A callback that appends every BatchRenormalization layer's diagnostics.

    `renorm_diagnostics()` returns scalar tensors: the step, the clipping
    limits in force and the fractions of r and d clipped in the last batch.
    `docs/batch_renormalization.md` shows the same loop with
    `tf.summary.scalar` for TensorBoard.
    """
    import keras

    import keras_bn

    layers = [
        layer for layer in model.layers
        if isinstance(layer, keras_bn.BatchRenormalization)
    ]

    def record(batch, logs=None):
        for number, layer in enumerate(layers, 1):
            diagnostics = layer.renorm_diagnostics()
            row = {k: float(v) for k, v in diagnostics.items()}
            row.update(layer=f"brn_{number}", step=int(diagnostics["step"]))
            rows.append(row)

    return keras.callbacks.LambdaCallback(on_train_batch_end=record)


def run(case, kind, seed, args):
    import keras
    import numpy as np

    batch_size, classes_per_batch = CASES[case]
    x_train, x_test, y_train, y_test = load_data(seed)
    keras.utils.set_random_seed(seed)
    order = batch_order(
        y_train, batch_size, args.steps, classes_per_batch,
        np.random.default_rng(seed),
    )
    model = build_model(kind, args.steps)
    diagnostics = []
    model.fit(
        x_train[order], y_train[order], batch_size=batch_size, epochs=1,
        shuffle=False, verbose=0, callbacks=[renorm_logger(model, diagnostics)],
    )
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    return float(accuracy), diagnostics


def summarize(results):
    import numpy as np

    rows = []
    for case in CASES:
        row = {"case": case}
        for kind in LAYERS:
            values = [r["accuracy"] for r in results
                      if r["case"] == case and r["layer"] == kind]
            row[kind] = (float(np.mean(values)), float(np.std(values)))
        rows.append(row)
    return rows


def print_table(rows, seeds):
    print(f"\nTest accuracy with population statistics, mean +- std over "
          f"{seeds} seeds")
    print(f"{'case':<12}" + "".join(f"{kind:>18}" for kind in LAYERS))
    for row in rows:
        cells = "".join(
            f"{100 * row[k][0]:>11.2f} +- {100 * row[k][1]:4.2f}"
            for k in LAYERS
        )
        print(f"{row['case']:<12}{cells}")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    positions = np.arange(len(rows))
    for i, kind in enumerate(LAYERS):
        bars = ax.bar(
            positions + (i - 0.5) * 0.38,
            [100 * row[kind][0] for row in rows],
            0.38,
            yerr=[100 * row[kind][1] for row in rows],
            label=kind,
            capsize=3,
        )
        # The means differ by a few points on a 0-100 scale: print them.
        ax.bar_label(bars, fmt="%.1f", label_type="center", fontsize=8,
                     color="white")
    ax.set_xticks(positions, [row["case"] for row in rows])
    ax.set_ylabel("test accuracy (%), mean +- std")
    ax.set_ylim(0, 100)
    # Outside the axes: inside, any corner covers a bar.
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("digits: BN vs batch renormalization")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    _cli.import_keras()
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    results = []
    traces = {}
    for case in CASES:
        for kind in LAYERS:
            for seed in range(args.seed, args.seed + args.seeds):
                accuracy, diagnostics = run(case, kind, seed, args)
                if diagnostics and seed == args.seed:
                    traces[case] = diagnostics
                results.append(
                    {"case": case, "layer": kind, "seed": seed,
                     "accuracy": accuracy}
                )
                if not args.quiet:
                    print(f"{case:<10} {kind:<4} seed {seed}: "
                          f"{accuracy:.4f}", flush=True)
    rows = summarize(results)
    if args.quick:
        print("\n" + _cli.QUICK_NOTE)
    print_table(rows, args.seeds)
    elapsed = time.time() - start
    print(f"\n{args.steps} steps per run; {elapsed:.0f} s in all")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            {"steps": args.steps, "seeds": args.seeds, "seconds": elapsed,
             "runs": results, "summary": rows},
            f, indent=2,
        )
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, ["case", "layer", "seed", "accuracy"])
        writer.writeheader()
        writer.writerows(results)
    with open(os.path.join(args.out, "renorm_diagnostics.csv"), "w",
              newline="") as f:
        fields = ["case", "layer", "step", "rmax", "rmin", "dmax",
                  "r_clipped", "d_clipped"]
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for case, trace in traces.items():
            writer.writerows(dict(row, case=case) for row in trace)
    plot(rows, os.path.join(args.out, "results.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
