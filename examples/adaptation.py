"""Adapting a batch-normalized classifier to corrupted test images.

A small convolutional network with `keras_bn.BatchNormalization` is trained
on clean images of scikit-learn's bundled 8x8 digits (no download) and
tested on the other digits under a corruption it never saw: lower
contrast, a brighter background and Gaussian pixel noise, the kind of
shift of the CIFAR-10-C benchmark. Nine ways to meet the shift are
compared by accuracy on the corrupted test digits:

- source: the trained model as it is;
- AdaBN: `keras_bn.recompute_statistics` on the unlabelled corrupted test
  images (Li et al., 2016), no other change;
- TENT online: `keras_bn.TENT`, one entropy-minimization step per test
  batch on `gamma` and `beta`, carried over from batch to batch (Wang et
  al., 2021);
- TENT episodic: the same, restarted from the source weights on every
  batch;
- TENT online and episodic, long: many steps per batch at a larger
  learning rate, where entropy minimization is known to collapse (online)
  and where the episodic reset limits the damage;
- fine-tune, BN trainable: every weight trained on a few labelled
  corrupted digits, BN normalizing with the statistics of each small batch
  (its moving statistics follow them);
- fine-tune, BN frozen: `convert_batch_normalization(model,
  keras_bn.FrozenBatchNormalization)` first, then the same fine-tuning:
  BN keeps the clean-data statistics, `gamma` and `beta`;
- AdaBN, then BN frozen: the statistics recomputed on the unlabelled
  corrupted images, then frozen and fine-tuned as above.

Every method is run for several seeds (the split, the corruption's noise,
the weights); the table gives the mean and standard deviation of the
accuracy and the share of the commonest predicted class (a collapse onto
one class shows there), and the plot every seed.

    python examples/adaptation.py
    python examples/adaptation.py --quick
"""

import json
import pathlib
import sys
import time

import _cli

_cli.quiet_tensorflow()

METHODS = (
    "source",
    "AdaBN",
    "TENT online",
    "TENT episodic",
    "TENT online, long",
    "TENT episodic, long",
    "fine-tune, BN trainable",
    "fine-tune, BN frozen",
    "AdaBN, then BN frozen",
)

EXPLANATIONS = {
    "source": "the clean-data model as it is, no adaptation",
    "AdaBN": "recompute_statistics on the unlabelled test images",
    "TENT online": "entropy steps on gamma and beta, batch after batch",
    "TENT episodic": "TENT restarted from the source on every batch",
    "TENT online, long": "TENT online with {steps} steps per batch at "
    "learning rate {rate}",
    "TENT episodic, long": "the same, episodic: reset before every batch",
    "fine-tune, BN trainable": "all weights on the few labels; BN uses "
    "each small batch's statistics",
    "fine-tune, BN frozen": "FrozenBatchNormalization, then the same "
    "fine-tuning",
    "AdaBN, then BN frozen": "statistics recomputed on the unlabelled "
    "images, frozen, then fine-tuned",
}

QUICK = {
    "seeds": 1, "epochs": 4, "fine_tune_epochs": 5,
}
# The digits scikit-learn ships.
DIGITS = 1797


def load_digits(seed, train_size):
    """Clean training digits and the other digits, shuffled by `seed`.

    Returns:
        `(x_train, y_train, x_target, y_target)`: float32 images of shape
        `(n, 8, 8, 1)` in [0, 1] and integer labels.
    """
    import numpy as np
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    train, target = order[:train_size], order[train_size:]
    return x[train], y[train], x[target], y[target]


def corrupt(x, rng, contrast, brightness, noise):
    """Lower contrast, a brighter background and Gaussian noise."""
    shifted = contrast * x + brightness + rng.normal(0.0, noise, x.shape)
    return shifted.astype("float32")


def build_model(keras, keras_bn):
    def block(h, filters):
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = keras_bn.BatchNormalization()(h)
        return keras.layers.ReLU()(h)

    inputs = keras.Input((8, 8, 1))
    h = block(block(inputs, 32), 32)
    h = block(keras.layers.MaxPooling2D()(h), 64)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10, activation="softmax")(h)
    return keras.Model(inputs, outputs)


def fine_tune(keras, model, x, y, args, seed):
    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(args.fine_tune_learning_rate),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(
        x, y, batch_size=args.fine_tune_batch_size,
        epochs=args.fine_tune_epochs, verbose=0,
    )


def run_seed(seed, args):
    """Accuracy of every method for one seed, as a dict."""
    import keras
    import numpy as np

    import keras_bn

    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    x_train, y_train, x_target, y_target = load_digits(seed, args.train_size)
    x_target = corrupt(
        x_target, rng, args.contrast, args.brightness, args.noise
    )
    # A few labelled corrupted digits for fine-tuning; the rest is the test
    # set, whose labels no method sees.
    x_few, y_few = x_target[: args.labelled], y_target[: args.labelled]
    x_test, y_test = x_target[args.labelled :], y_target[args.labelled :]

    source = build_model(keras, keras_bn)
    source.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
    )
    source.fit(
        x_train, y_train, batch_size=32, epochs=args.epochs,
        verbose=0 if args.quiet else 2,
    )
    weights = source.get_weights()

    def fresh():
        model = build_model(keras, keras_bn)
        model.set_weights(weights)
        return model

    def accuracy(predictions):
        """`(accuracy, share of the commonest predicted class)`; the share
        shows a collapse onto one class (the true classes are about 0.1
        each)."""
        classes = np.argmax(predictions, axis=-1)
        share = np.bincount(classes, minlength=10).max() / len(classes)
        return float(np.mean(classes == y_test)), float(share)

    def evaluate(model):
        # One eager call: `predict` would trace a function for every model.
        return accuracy(keras.ops.convert_to_numpy(model(x_test)))

    results = {"source": evaluate(fresh())}

    model = fresh()
    keras_bn.recompute_statistics(
        model, x_test, batch_size=args.batch_size, verbose=0
    )
    results["AdaBN"] = evaluate(model)

    tent_settings = (
        ("", args.tent_steps, args.tent_learning_rate),
        (", long", args.long_tent_steps, args.long_tent_learning_rate),
    )
    for suffix, steps, rate in tent_settings:
        for kind in ("online", "episodic"):
            tent = keras_bn.TENT(
                fresh(), keras.optimizers.Adam(rate), steps=steps,
                episodic=kind == "episodic",
            )
            results[f"TENT {kind}{suffix}"] = accuracy(
                tent.predict(x_test, batch_size=args.batch_size)
            )

    model = fresh()
    fine_tune(keras, model, x_few, y_few, args, seed)
    results["fine-tune, BN trainable"] = evaluate(model)

    model = keras_bn.convert_batch_normalization(
        fresh(), keras_bn.FrozenBatchNormalization
    )
    fine_tune(keras, model, x_few, y_few, args, seed)
    results["fine-tune, BN frozen"] = evaluate(model)

    model = fresh()
    keras_bn.recompute_statistics(
        model, x_test, batch_size=args.batch_size, verbose=0
    )
    model = keras_bn.convert_batch_normalization(
        model, keras_bn.FrozenBatchNormalization
    )
    fine_tune(keras, model, x_few, y_few, args, seed)
    results["AdaBN, then BN frozen"] = evaluate(model)
    return results


def run(args):
    """Accuracies and commonest-class shares, by method, seed by seed."""
    results = {name: [] for name in METHODS}
    shares = {name: [] for name in METHODS}
    for seed in range(args.seed, args.seed + args.seeds):
        print(f"seed {seed}: training on clean digits, adapting")
        for name, (value, share) in run_seed(seed, args).items():
            results[name].append(value)
            shares[name].append(share)
        print("  " + ", ".join(f"{k}: {v[-1]:.3f}" for k, v in results.items()))
    return results, shares


def report(results, shares, args, elapsed):
    import numpy as np

    lines = [
        f"Accuracy on the corrupted test digits (contrast {args.contrast}, "
        f"brightness +{args.brightness}, noise {args.noise}), "
        f"{args.labelled} labelled corrupted digits for fine-tuning, test "
        f"batches of {args.batch_size}, {args.seeds} seed(s):",
        "",
        f"| {'method':<23} | {'accuracy':<14} | top class | what it does |",
        f"| {'-' * 23} | {'-' * 14} | --------- | ------------ |",
    ]
    for name in METHODS:
        values = np.array(results[name])
        lines.append(
            f"| {name:<23} | {values.mean():.3f} +- {values.std():.3f} | "
            f"{np.mean(shares[name]):9.2f} | "
            + EXPLANATIONS[name].format(
                steps=args.long_tent_steps, rate=args.long_tent_learning_rate
            )
            + " |"
        )
    tent, adabn = (np.mean(results[m]) for m in ("TENT online", "AdaBN"))
    verdict = "beats" if tent > adabn else "does not beat"
    lines += [
        "",
        "Accuracy: mean +- standard deviation over seeds. Top class: the "
        "share of the test digits predicted as the commonest class (about "
        "0.1 for the true labels), averaged over seeds.",
        f"TENT online {verdict} AdaBN here ({tent:.3f} against "
        f"{adabn:.3f}). Run time {elapsed:.0f} s.",
    ]
    if args.quick:
        lines = [_cli.QUICK_NOTE, ""] + lines
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    arguments = {k: str(v) if k == "out" else v for k, v in vars(args).items()}
    with open(args.out / "results.json", "w") as f:
        json.dump(
            {
                "accuracy": results, "top_class_share": shares,
                "args": arguments,
            },
            f, indent=2,
        )
    with open(args.out / "results.md", "w") as f:
        f.write(text + "\n")
    plot(results, args.out / "adaptation_accuracy.png")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(10, 4))
    positions = np.arange(len(METHODS))
    means = [np.mean(results[m]) for m in METHODS]
    stds = [np.std(results[m]) for m in METHODS]
    # The axis starts at 0 so bar heights compare honestly; each seed is a
    # dot, so the spread is visible with any number of seeds.
    bars = ax.bar(positions, means, yerr=stds, capsize=3, color="#4c72b0",
                  label="mean +- std over seeds")
    ax.bar_label(bars, fmt="%.3f", label_type="center", fontsize=8,
                 color="white")
    for position, method in zip(positions, METHODS):
        values = results[method]
        ax.scatter(np.full(len(values), position + 0.25), values, s=10,
                   color="black", zorder=3,
                   label="one seed" if position == 0 else None)
    ax.axhline(0.1, color="gray", linestyle="--", linewidth=1,
               label="chance (0.1)")
    labels = [m.replace(", ", ",\n", 1) for m in METHODS]
    ax.set_xticks(positions, labels, fontsize=8)
    ax.set_ylabel("accuracy, corrupted digits")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Meeting a test-time shift: statistics, TENT, fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    parser = _cli.parser(__doc__.split("\n\n")[0])
    integers = (
        ("--seeds", 5, "number of seeds to average over"),
        ("--train-size", 1000, f"clean training digits (of {DIGITS})"),
        ("--epochs", 15, "training epochs on clean digits"),
        ("--labelled", 100, "labelled corrupted digits for fine-tuning"),
        ("--batch-size", 64, "test batch size for TENT and AdaBN"),
        ("--tent-steps", 1, "TENT steps per test batch"),
        ("--long-tent-steps", 20, "TENT steps per test batch, long runs"),
        ("--fine-tune-epochs", 20, "fine-tuning epochs"),
        ("--fine-tune-batch-size", 16, "fine-tuning batch size"),
    )
    for option, default, text in integers:
        parser.add_argument(option, type=_cli.positive_int, default=default,
                            help=f"{text}, a positive integer")
    rates = (
        ("--tent-learning-rate", 1e-3, "TENT learning rate (Adam)"),
        ("--long-tent-learning-rate", 1e-2, "TENT learning rate (Adam), "
         "long runs"),
        ("--fine-tune-learning-rate", 1e-3, "fine-tuning learning rate "
         "(Adam)"),
        ("--contrast", 0.6, "factor on the clean pixels"),
        ("--brightness", 0.05, "added to every pixel"),
        ("--noise", 0.25, "standard deviation of the pixel noise"),
    )
    for option, default, text in rates:
        parser.add_argument(option, type=_cli.rate, default=default,
                            help=f"{text}, a finite number above 0")
    _cli.add_common(
        parser, quick=QUICK, quick_help="",
        out=pathlib.Path("out", "adaptation"),
        seed_help="first seed: seeds --seed to --seed + --seeds - 1 make the "
        "split, the noise and the weights",
    )
    args = parser.parse_args(argv)
    if args.train_size + args.labelled >= DIGITS:
        parser.fail(
            "--train-size", args.train_size,
            f"below {DIGITS} minus --labelled ({args.labelled}), so that "
            f"test digits are left of the {DIGITS}",
        )
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _cli.import_keras()
    start = time.time()
    results, shares = run(args)
    report(results, shares, args, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
