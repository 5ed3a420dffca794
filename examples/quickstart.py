"""Quickstart: the same classifier with and without batch normalization.

Trains a small convolutional network on scikit-learn's bundled 8x8 digits
(no download) twice from the same initial seed, once with a
`keras_bn.BatchNormalization` layer after every convolution and once
without, using plain SGD at a learning rate that is large for this network.
Batch normalization keeps the activations' scale fixed however the weights
grow, which is what lets a network train at such a rate (Ioffe & Szegedy,
2015, https://arxiv.org/abs/1502.03167); without it, this network stops
learning within the first epoch and its loss stays at chance level.

It prints the validation accuracy after every epoch for both models, the
first epoch at which each reaches 95 % validation accuracy and each final
training loss, and writes a plot of both curves to `--out`.

    python examples/quickstart.py
    python examples/quickstart.py --learning-rate 0.1 --epochs 10 --quiet
"""

import pathlib
import sys

import _cli

_cli.quiet_tensorflow()

TARGET_ACCURACY = 0.95
QUICK = {"epochs": 2}


def parse_args(argv):
    parser = _cli.parser(
        "Train the same small convolutional classifier on scikit-learn's "
        "8x8 digits with and without keras_bn.BatchNormalization, print "
        "both validation-accuracy curves and plot them."
    )
    parser.add_argument(
        "--epochs", type=_cli.positive_int, default=15,
        help="training epochs for each model, a positive integer",
    )
    parser.add_argument(
        "--learning-rate", type=_cli.rate, default=0.5,
        help="plain SGD learning rate, a finite number above 0",
    )
    parser.add_argument(
        "--batch-size", type=_cli.positive_int, default=32,
        help="training batch size, a positive integer",
    )
    _cli.add_common(
        parser, quick=QUICK, quick_help="",
        out=pathlib.Path("out", "quickstart"),
        seed_help="seed for the data split, the weights and the shuffling; "
        "both models start from it",
    )
    return parser.parse_args(argv)


def load_data(seed):
    """Digits scaled to [0, 1], split 75 / 25 with every class in both."""
    import numpy as np
    from sklearn import datasets
    from sklearn import model_selection

    digits = datasets.load_digits()
    images = (digits.images / 16.0).astype("float32")[..., np.newaxis]
    return model_selection.train_test_split(
        images,
        digits.target,
        test_size=0.25,
        random_state=seed,
        stratify=digits.target,
    )


def build_model(batch_norm):
    import keras

    import keras_bn

    model = keras.Sequential(
        [keras.Input((8, 8, 1))],
        name="with_bn" if batch_norm else "without_bn",
    )
    for filters in (32, 32, 64, 64):
        # BN's `beta` takes the place of the convolution's bias.
        model.add(
            keras.layers.Conv2D(
                filters, 3, padding="same", use_bias=not batch_norm
            )
        )
        if batch_norm:
            # About 40 steps per epoch: with the default momentum of 0.99
            # the moving statistics that validation uses would still be
            # mostly their initial values after the first epochs.
            model.add(keras_bn.BatchNormalization(momentum=0.9))
        model.add(keras.layers.ReLU())
    model.add(keras.layers.MaxPooling2D())
    model.add(keras.layers.Flatten())
    model.add(keras.layers.Dense(10, activation="softmax"))
    return model


def train(batch_norm, data, args):
    """Validation accuracy after each epoch, and the final training loss."""
    import keras

    x_train, x_val, y_train, y_val = data
    keras.utils.set_random_seed(args.seed)
    model = build_model(batch_norm)
    model.compile(
        optimizer=keras.optimizers.SGD(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    print(f"Training {model.name} for {args.epochs} epochs")
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_val, y_val),
        verbose=0 if args.quiet else 1,
    )
    accuracies = [float(a) for a in history.history["val_accuracy"]]
    return accuracies, float(history.history["loss"][-1])


def first_epoch_reaching(accuracies, target):
    """The 1-based epoch of the first accuracy >= `target`, or `None`."""
    for epoch, accuracy in enumerate(accuracies, start=1):
        if accuracy >= target:
            return epoch
    return None


def plot(curves, path, learning_rate):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib import ticker

    figure, axes = pyplot.subplots(figsize=(6, 4))
    for label, accuracies in curves.items():
        epochs = range(1, len(accuracies) + 1)
        axes.plot(epochs, accuracies, marker="o", label=label)
    axes.axhline(
        TARGET_ACCURACY,
        color="gray",
        linestyle="--",
        linewidth=1,
        label=f"{TARGET_ACCURACY:.0%} target",
    )
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes.set_ylabel("validation accuracy")
    axes.set_ylim(0.0, 1.0)
    axes.set_title(f"8x8 digits, plain SGD, learning rate {learning_rate}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def main(argv=None):
    # The libraries are imported in the functions that use them, after the
    # arguments are checked, so that `--help` and argument errors answer at
    # once instead of after TensorFlow's start-up.
    args = parse_args(argv)
    _cli.import_keras()
    data = load_data(args.seed)
    runs = {
        "with BN": train(True, data, args),
        "without BN": train(False, data, args),
    }
    curves = {label: accuracies for label, (accuracies, _) in runs.items()}

    print()
    if args.quick:
        print(_cli.QUICK_NOTE)
    print("Validation accuracy")
    print(f"{'epoch':>5}  {'with BN':>10}  {'without BN':>10}")
    for epoch, (bn, plain) in enumerate(zip(*curves.values()), start=1):
        print(f"{epoch:>5}  {bn:>10.4f}  {plain:>10.4f}")
    print()
    for label, (accuracies, _) in runs.items():
        epoch = first_epoch_reaching(accuracies, TARGET_ACCURACY)
        print(
            f"First epoch at {TARGET_ACCURACY:.0%} validation accuracy, "
            f"{label}: {'never' if epoch is None else epoch}"
        )
    # ln(10), about 2.30, is the loss of a uniform guess over 10 classes.
    for label, (_, loss) in runs.items():
        print(f"Final training loss, {label}: {loss:.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "quickstart.png"
    plot(curves, path, args.learning_rate)
    print(f"Plot written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
