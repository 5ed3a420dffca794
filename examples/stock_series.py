"""Forecasting the next day's log return with keras_bn.BNLSTM.

The data are real daily prices: the S&P 500 or the NASDAQ Composite,
1999-2018, as bundled with the `arch` package (`pip install arch`, in the
`examples` extra), or any CSV with Date, Open, High, Low, Close and Volume
columns (`--csv`). From a window of past daily log returns and log volumes,
a `keras_bn.BNLSTM` and a `keras.layers.LSTM` of the same size predict the
next day's log return (not the price). Both are compared with two naive
baselines, a zero return and yesterday's return, on the last years of the
series.

The split is walk-forward by date: the models train on the earliest part,
are early-stopped on the next, and are tested on the last; nothing is
shuffled across the split, and the feature scaling is fitted on the
training period only. Daily returns are close to unpredictable, and the
output says so plainly when no model beats the naive baseline.

Usage:
    python examples/stock_series.py                # S&P 500, ~2 min
    python examples/stock_series.py --quick        # a smoke run, < 1 min
    python examples/stock_series.py --csv prices.csv
"""

import argparse
import json
import os
import sys
import time

REQUIRED_COLUMNS = ("Date", "Open", "High", "Low", "Close", "Volume")


class InputError(Exception):
    """Bad user input; reported on one line with exit status 2."""


def load_prices(args):
    """Daily closes and volumes with their dates, oldest first."""
    import pandas as pd

    if args.csv is None:
        from arch.data import nasdaq
        from arch.data import sp500

        frame = (sp500 if args.dataset == "sp500" else nasdaq).load()
        frame = frame.reset_index().rename(columns={frame.index.name: "Date"})
        source = f"arch.data.{args.dataset}"
    else:
        if not os.path.isfile(args.csv):
            raise InputError(f"--csv {args.csv}: no such file")
        try:
            frame = pd.read_csv(args.csv)
        except (ValueError, pd.errors.ParserError) as error:
            raise InputError(
                f"--csv {args.csv}: not a readable CSV ({error})"
            ) from None
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise InputError(
                f"--csv {args.csv}: missing column(s) {', '.join(missing)}; "
                f"needs {', '.join(REQUIRED_COLUMNS)}"
            )
        source = args.csv
    frame = frame[list(REQUIRED_COLUMNS)].dropna()
    frame["Date"] = pd.to_datetime(frame["Date"])
    frame = frame.sort_values("Date").reset_index(drop=True)
    frame = frame[(frame["Close"] > 0) & (frame["Volume"] > 0)]
    return frame, source


def make_windows(frame, window):
    """Inputs of `window` days of (log return, log volume); next return."""
    import numpy as np

    close = frame["Close"].to_numpy(np.float64)
    volume = frame["Volume"].to_numpy(np.float64)
    returns = np.diff(np.log(close))
    log_volume = np.log(volume[1:])
    features = np.stack([returns, log_volume], axis=1)
    dates = frame["Date"].to_numpy()[1:]
    n = len(returns) - window
    # Window i covers days i .. i + window - 1 and predicts day i + window.
    index = np.arange(window)[None, :] + np.arange(n)[:, None]
    return features[index], returns[window:], dates[window:]


def split(n, fractions):
    train = int(n * fractions[0])
    val = train + int(n * fractions[1])
    return slice(0, train), slice(train, val), slice(val, n)


def build(keras, keras_bn, kind, window, units):
    inputs = keras.Input((window, 2))
    if kind == "BNLSTM":
        h = keras_bn.BNLSTM(units, max_timesteps=window)(inputs)
    else:
        h = keras.layers.LSTM(units)(inputs)
    outputs = keras.layers.Dense(1)(h)
    return keras.Model(inputs, outputs)


def metrics(pred, actual):
    import numpy as np

    error = pred - actual
    direction = None
    if np.any(pred != 0):
        direction = float(np.mean(np.sign(pred) == np.sign(actual)))
    return {
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mae": float(np.mean(np.abs(error))),
        "directional_accuracy": direction,
    }


def run(args):
    import numpy as np

    frame, source = load_prices(args)
    if len(frame) < args.window + 50:
        raise InputError(
            f"{source}: {len(frame)} usable rows, too few for a window of "
            f"{args.window} days (needs at least {args.window + 50})"
        )
    # Imported once the input is known to be good: bad input fails fast.
    import keras

    import keras_bn

    x, y, dates = make_windows(frame, args.window)
    if args.quick:
        x, y, dates = x[-1500:], y[-1500:], dates[-1500:]
    train, val, test = split(len(y), (0.7, 0.15))
    # Scaling fitted on the training period only.
    mean = x[train].reshape(-1, 2).mean(axis=0)
    std = x[train].reshape(-1, 2).std(axis=0)
    xs = ((x - mean) / std).astype("float32")
    y_scale = y[train].std()
    ys = (y / y_scale).astype("float32")

    def period(s):
        return f"{str(dates[s][0])[:10]} to {str(dates[s][-1])[:10]}"

    print(
        f"{source}: {len(frame)} days. Train {period(train)}, validate "
        f"{period(val)}, test {period(test)}."
    )
    predictions = {
        "zero return": np.zeros_like(y[test]),
        "yesterday's return": x[test][:, -1, 0],
    }
    histories = {}
    for kind in ("BNLSTM", "LSTM"):
        keras.utils.set_random_seed(args.seed)
        model = build(keras, keras_bn, kind, args.window, args.units)
        model.compile(
            optimizer=keras.optimizers.Adam(args.learning_rate), loss="mse"
        )
        print(f"Training {kind}:")
        history = model.fit(
            xs[train], ys[train], validation_data=(xs[val], ys[val]),
            batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
            verbose=0 if args.quiet else 1,
            callbacks=[
                keras.callbacks.EarlyStopping(
                    patience=3, restore_best_weights=True
                )
            ],
        )
        histories[kind] = history.history["val_loss"]
        scaled = model.predict(xs[test], batch_size=1024, verbose=0)
        predictions[kind] = scaled.ravel().astype(np.float64) * y_scale
        model.save(os.path.join(args.out, f"{kind.lower()}.keras"))
    results = {
        name: metrics(pred, y[test]) for name, pred in predictions.items()
    }
    return results, predictions, y[test], dates[test], histories


def report(results, args, elapsed):
    lines = [
        "| model | RMSE | MAE | directional accuracy |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, m in results.items():
        direction = m["directional_accuracy"]
        direction = "n/a" if direction is None else f"{direction:.3f}"
        lines.append(
            f"| {name} | {m['rmse']:.5f} | {m['mae']:.5f} | {direction} |"
        )
    naive = min(
        results["zero return"]["rmse"], results["yesterday's return"]["rmse"]
    )
    # An RMSE within 0.5 % of the baseline's is not a win worth the name:
    # it is below what one test period can tell apart.
    gains = {
        name: 1.0 - results[name]["rmse"] / naive for name in ("BNLSTM", "LSTM")
    }
    winners = [name for name, gain in gains.items() if gain > 0.005]
    detail = ", ".join(f"{n} {100 * g:+.2f} %" for n, g in gains.items())
    if winners:
        verdict = (
            f"{' and '.join(winners)} beat(s) the best naive baseline's test "
            f"RMSE ({naive:.5f}) by more than 0.5 % ({detail})."
        )
    else:
        verdict = (
            "No model beats the naive baseline: on the test years the LSTMs' "
            f"RMSE is within 0.5 % of the best naive baseline's ({naive:.5f}"
            f"; {detail} better). Daily returns are close to unpredictable "
            "from past returns and volume; this is the common, honest outcome."
        )
    text = "\n".join(lines + ["", verdict, f"Run time {elapsed:.0f} s."])
    print(text)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"test": results, "args": vars(args)}, f, indent=2)


def plot(predictions, actual, dates, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    last = slice(-120, None)
    ax1.plot(dates[last], actual[last], color="black", lw=1, label="actual")
    for name in ("BNLSTM", "LSTM"):
        ax1.plot(dates[last], predictions[name][last], lw=1, label=name)
    ax1.set_title("Next-day log return, last 120 test days")
    ax1.legend(fontsize=8)
    ax1.tick_params(axis="x", labelrotation=30, labelsize=7)
    for name in ("BNLSTM", "LSTM"):
        ax2.scatter(actual, predictions[name], s=3, alpha=0.4, label=name)
    ax2.set_xlabel("actual log return")
    ax2.set_ylabel("predicted log return")
    ax2.set_title("Predicted against actual, test years")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="the last 1,500 days and 2 epochs, a smoke run")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress output from Keras")
    parser.add_argument("--dataset", choices=("sp500", "nasdaq"),
                        default="sp500",
                        help="bundled series to use when --csv is not given")
    parser.add_argument("--csv", default=None,
                        help="CSV with Date, Open, High, Low, Close, Volume")
    parser.add_argument("--out", default=os.path.join("out", "stock_series"),
                        help="folder for results, plot and models")
    parser.add_argument("--window", type=int, default=20,
                        help="days of history in each input")
    parser.add_argument("--units", type=int, default=32,
                        help="units of each LSTM")
    parser.add_argument("--epochs", type=int, default=20,
                        help="maximum epochs (early stopping on validation)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="training batch size")
    parser.add_argument("--learning-rate", type=float, default=1e-3,
                        help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 2
    for name in ("window", "units", "epochs", "batch_size"):
        if getattr(args, name) <= 0:
            parser.error(
                f"--{name.replace('_', '-')} must be a positive integer, "
                f"got {getattr(args, name)}"
            )
    if args.learning_rate <= 0:
        parser.error(
            f"--learning-rate must be positive, got {args.learning_rate}"
        )
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.time()
    try:
        os.makedirs(args.out, exist_ok=True)
        results, predictions, actual, dates, _ = run(args)
    except InputError as error:
        print(f"stock_series.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    report(results, args, time.time() - start)
    plot(predictions, actual, dates,
         os.path.join(args.out, "predictions.png"))


if __name__ == "__main__":
    main()
