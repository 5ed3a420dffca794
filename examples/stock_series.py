"""Daily S&P 500 series with keras_bn.BNLSTM: returns, then volatility.

The data are real daily prices: the S&P 500 or the NASDAQ Composite,
1999-2018, as bundled with the `arch` package (`pip install arch`, in the
`examples` extra), or any CSV with Date, Open, High, Low, Close and Volume
columns (`--csv`). A `keras_bn.BNLSTM` and a `keras.layers.LSTM` of the same
size read windows of past days and forecast two things:

- returns: the next day's log return, against two naive baselines (a zero
  return and yesterday's return). Daily returns are close to
  unpredictable, and the output says so plainly when no model beats the
  naive baseline.
- volatility: the next day's variance, measured by the Parkinson (1980)
  high-low estimator `ln(High / Low)^2 / (4 ln 2)`, against the standard
  GARCH(1,1) model (Bollerslev 1986, fitted with `arch` on the training
  years only) and a 20-day average. The networks minimise QLIKE (Patton
  2011), the loss that ranks variance forecasts correctly with a noisy
  proxy. Each network is trained from several seeds at several learning
  rates: the spread of the test error over seeds, and how it grows with
  the learning rate, is where "batch normalization keeps training stable"
  can be seen or refuted. The output states what this run showed.

The split is walk-forward by date: the models train on the earliest 70 %,
are early-stopped on the next 15 %, and are tested on the last 15 %;
nothing is shuffled across the split, and the feature scaling (and GARCH)
is fitted on the training period only.

Usage:
    python examples/stock_series.py                # both tasks, ~10 min
    python examples/stock_series.py --quick        # a smoke run, < 1 min
    python examples/stock_series.py --task volatility --seeds 10
    python examples/stock_series.py --csv prices.csv
"""

import json
import math
import os
import sys
import time

import _cli

_cli.quiet_tensorflow()

REQUIRED_COLUMNS = ("Date", "Open", "High", "Low", "Close", "Volume")
SPLIT = (0.7, 0.15)  # train, validate; the rest is the test period
QUICK_DAYS = 1500
QUICK_LEARNING_RATE = 1e-2
# A gain or loss within 0.5 % of the baseline's error is below what one
# test period can tell apart.
TIE = 0.005


class InputError(Exception):
    """Bad user input; reported on one line with exit status 2."""


def load_prices(args):
    """Daily prices and volumes with their dates, oldest first."""
    import pandas as pd

    if args.csv is None:
        from arch.data import nasdaq
        from arch.data import sp500

        frame = (sp500 if args.dataset == "sp500" else nasdaq).load()
        frame = frame.reset_index().rename(columns={frame.index.name: "Date"})
        source = f"arch.data.{args.dataset}"
    else:
        try:
            frame = pd.read_csv(args.csv)
        except (ValueError, pd.errors.ParserError) as error:
            raise InputError(
                "argument --csv: must be a readable CSV file. Received: "
                f"{args.csv!r} ({error})"
            ) from None
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise InputError(
                "argument --csv: must be a CSV with the columns "
                f"{', '.join(REQUIRED_COLUMNS)}. Received: {args.csv!r} "
                f"(missing column(s) {', '.join(missing)})"
            )
        source = args.csv
    frame = frame[list(REQUIRED_COLUMNS)].dropna()
    frame["Date"] = pd.to_datetime(frame["Date"])
    frame = frame.sort_values("Date").reset_index(drop=True)
    positive = (frame["Close"] > 0) & (frame["Volume"] > 0)
    positive &= (frame["Low"] > 0) & (frame["High"] >= frame["Low"])
    frame = frame[positive].reset_index(drop=True)
    return frame, source


def daily_series(frame):
    """Per day from the second on: log return, range variance, log volume.

    The return and the Parkinson variance are in percent and percent
    squared, so that daily values are of order one.
    """
    import numpy as np

    close = frame["Close"].to_numpy(np.float64)
    log_range = np.log(
        frame["High"].to_numpy(np.float64) / frame["Low"].to_numpy(np.float64)
    )
    return {
        "date": frame["Date"].to_numpy()[1:],
        "return": 100 * np.diff(np.log(close)),
        "range_variance": (100 * log_range[1:]) ** 2 / (4 * np.log(2)),
        "log_volume": np.log(frame["Volume"].to_numpy(np.float64)[1:]),
    }


def windows(features, window):
    """Windows of `window` days; window i covers days i .. i + window - 1.

    Its target is day i + window, so targets are `days[window:]`.
    """
    import numpy as np

    n = len(features) - window
    index = np.arange(window)[None, :] + np.arange(n)[:, None]
    return features[index]


def split(n):
    train = int(n * SPLIT[0])
    val = train + int(n * SPLIT[1])
    return slice(0, train), slice(train, val), slice(val, n)


def standardize(x, train):
    """Scales the features with the training period's statistics only."""
    features = x.shape[-1]
    mean = x[train].reshape(-1, features).mean(axis=0)
    std = x[train].reshape(-1, features).std(axis=0)
    return ((x - mean) / std).astype("float32")


def build(keras, keras_bn, kind, window, features, units):
    inputs = keras.Input((window, features))
    if kind == "BNLSTM":
        h = keras_bn.BNLSTM(units, max_timesteps=window)(inputs)
    else:
        h = keras.layers.LSTM(units)(inputs)
    outputs = keras.layers.Dense(1)(h)
    return keras.Model(inputs, outputs)


def fit(keras, model, data, args, learning_rate, loss, verbose):
    (x_train, y_train), validation = data
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
    history = model.fit(
        x_train, y_train, validation_data=validation,
        batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
        verbose=verbose,
        callbacks=[
            keras.callbacks.EarlyStopping(
                patience=3, restore_best_weights=True
            ),
            keras.callbacks.TerminateOnNaN(),
        ],
    )
    return history.history


# -- Task 1: the next day's return -----------------------------------------

def return_metrics(pred, actual):
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


def returns_task(days, args, period):
    """Trains both networks on returns; the test metrics and predictions."""
    import keras
    import numpy as np

    import keras_bn

    features = np.stack([days["return"], days["log_volume"]], axis=1)
    x = windows(features, args.window)
    y = days["return"][args.window:]
    train, val, test = split(len(y))
    xs = standardize(x, train)
    y_scale = y[train].std()
    ys = (y / y_scale).astype("float32")
    print(f"Returns: train {period(train)}, validate {period(val)}, "
          f"test {period(test)}.")
    predictions = {
        "zero return": np.zeros_like(y[test]),
        "yesterday's return": x[test][:, -1, 0],
    }
    for kind in ("BNLSTM", "LSTM"):
        keras.utils.set_random_seed(args.seed)
        model = build(keras, keras_bn, kind, args.window, 2, args.units)
        print(f"Training {kind} on returns", flush=True)
        fit(keras, model, ((xs[train], ys[train]), (xs[val], ys[val])), args,
            args.learning_rate, "mse", 0 if args.quiet else 2)
        scaled = model.predict(xs[test], batch_size=1024, verbose=0)
        predictions[kind] = scaled.ravel().astype(np.float64) * y_scale
        model.save(os.path.join(args.out, f"{kind.lower()}.keras"))
    metrics = {
        name: return_metrics(pred, y[test])
        for name, pred in predictions.items()
    }
    return metrics, predictions, y[test], days["date"][args.window:][test]


def compared(error, baseline):
    """'0.18 % better' or '0.56 % worse' (lower error is better)."""
    gain = 1.0 - error / baseline
    return f"{abs(100 * gain):.2f} % {'better' if gain >= 0 else 'worse'}"


def returns_report(metrics):
    lines = [
        "Next-day log return, test period:",
        "",
        "| model | RMSE | MAE | directional accuracy |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, m in metrics.items():
        direction = m["directional_accuracy"]
        direction = "n/a" if direction is None else f"{direction:.3f}"
        lines.append(
            f"| {name} | {m['rmse']:.5f} | {m['mae']:.5f} | {direction} |"
        )
    naive = min(
        metrics["zero return"]["rmse"], metrics["yesterday's return"]["rmse"]
    )
    networks = ("BNLSTM", "LSTM")
    detail = ", ".join(
        f"{name} {compared(metrics[name]['rmse'], naive)}"
        for name in networks
    )
    winners = [
        name for name in networks
        if metrics[name]["rmse"] < (1 - TIE) * naive
    ]
    if winners:
        verdict = (
            f"{' and '.join(winners)} beat the best naive baseline's test "
            f"RMSE ({naive:.5f}) by more than {100 * TIE:.1f} % ({detail})."
        )
    else:
        verdict = (
            "No model beats the naive baseline by more than "
            f"{100 * TIE:.1f} % in test RMSE ({naive:.5f}; {detail} than "
            "it). Daily returns are close to unpredictable from past "
            "returns and volume; this is the common, honest outcome."
        )
    return lines + ["", verdict]


def returns_plot(predictions, actual, dates, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    last = slice(-120, None)
    ax1.plot(dates[last], actual[last], color="black", lw=1, label="actual")
    for name, style in (("BNLSTM", "-"), ("LSTM", "--")):
        ax1.plot(dates[last], predictions[name][last], lw=1.5, ls=style,
                 label=name)
    ax1.set_title("Next-day log return, last 120 test days")
    ax1.set_ylabel("log return (%)")
    ax1.legend(fontsize=8)
    ax1.tick_params(axis="x", labelrotation=30, labelsize=7)
    for name in ("BNLSTM", "LSTM"):
        ax2.scatter(actual, predictions[name], s=3, alpha=0.4, label=name)
    # Both axes on the actual returns' scale, with the line a perfect
    # forecast would follow: forecasts near zero then look like it.
    limit = 1.05 * float(np.max(np.abs(actual)))
    ax2.plot([-limit, limit], [-limit, limit], color="gray", lw=1, ls=":",
             label="perfect forecast")
    ax2.set_xlim(-limit, limit)
    ax2.set_ylim(-limit, limit)
    ax2.set_aspect("equal")
    ax2.set_xlabel("actual log return (%)")
    ax2.set_ylabel("predicted log return (%)")
    ax2.set_title("Predicted against actual, test period")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- Task 2: the next day's volatility -------------------------------------

def qlike(realised, forecast):
    """Patton's (2011) QLIKE: 0 for a perfect forecast, robust to noise."""
    import numpy as np

    ratio = realised / forecast
    return float(np.mean(ratio - np.log(ratio) - 1))


def rmse_log_volatility(realised, forecast):
    import numpy as np

    error = 0.5 * (np.log(realised) - np.log(forecast))
    return float(np.sqrt(np.mean(error**2)))


def qlike_loss(keras):
    """QLIKE up to constants, for a network that outputs log variance."""

    def loss(y_true, y_pred):
        return keras.ops.mean(
            y_true * keras.ops.exp(-y_pred) + y_pred, axis=-1
        )

    return loss


def garch_forecasts(returns, train_end):
    """One-day-ahead GARCH(1,1) variances, parameters from training days.

    `forecast[t]` is made at the close of day t for day t + 1. The model is
    fitted on `returns[:train_end]` only; later days are filtered with
    those fixed parameters, as a forecaster would have done.
    """
    from arch import arch_model

    model = arch_model(returns, mean="Constant", vol="GARCH", p=1, q=1)
    result = model.fit(last_obs=train_end, disp="off")
    variance = result.forecast(horizon=1, start=0, reindex=False).variance
    return variance.to_numpy()[:, 0], dict(result.params)


def volatility_task(days, args, period):
    """Networks over seeds and learning rates, GARCH and a naive baseline."""
    import keras
    import numpy as np

    import keras_bn

    variance = days["range_variance"].copy()
    window = args.window
    n = len(variance) - window
    train, val, test = split(n)
    train_days = slice(0, window + train.stop)
    # A day whose High equals its Low has no range; it counts as 1 % of
    # the typical variance, so that its logarithm stays finite.
    floor = 0.01 * float(np.median(variance[train_days]))
    variance = np.maximum(variance, floor)
    target = variance[window:]
    features = np.stack(
        [days["return"], np.log(variance), days["log_volume"]], axis=1
    )
    xs = standardize(windows(features, window), train)
    # Targets in units of the training mean, so the networks' log-variance
    # outputs start near their optimum, 0.
    scale = float(target[train].mean())
    ys = (target / scale).astype("float32")
    print(f"Volatility: train {period(train)}, validate {period(val)}, "
          f"test {period(test)}.")

    garch, params = garch_forecasts(days["return"], window + train.stop)
    # Window i's target is day i + window, forecast at day i + window - 1.
    garch = garch[window - 1:-1]
    # The high-low range misses the overnight move, so it is smaller than
    # the close-to-close variance GARCH models: a constant, estimated on
    # the training days, puts GARCH on the proxy's scale.
    ratio = float(np.mean(target[train] / garch[train]))
    average = np.convolve(variance, np.ones(20) / 20, mode="full")
    average = average[: len(variance)][window - 1:-1]
    baselines = {
        "20-day average": average[test],
        "GARCH(1,1)": garch[test],
        "GARCH(1,1), range-scaled": ratio * garch[test],
    }
    baseline_errors = {
        name: {
            "qlike": qlike(target[test], forecast),
            "rmse_log_volatility": rmse_log_volatility(
                target[test], forecast
            ),
        }
        for name, forecast in baselines.items()
    }
    runs = []
    shown = {}
    data = ((xs[train], ys[train]), (xs[val], ys[val]))
    for kind in ("BNLSTM", "LSTM"):
        for learning_rate in args.learning_rates:
            for seed in range(args.seed, args.seed + args.seeds):
                keras.utils.set_random_seed(seed)
                model = build(keras, keras_bn, kind, window, 3, args.units)
                # One line per run below, instead of one per epoch.
                history = fit(keras, model, data, args, learning_rate,
                              qlike_loss(keras), verbose=0)
                # A direct call: `predict` would trace a new function for
                # every one of these models.
                log_scaled = keras.ops.convert_to_numpy(
                    model(xs[test], training=False)
                )
                forecast = scale * np.exp(log_scaled.ravel().astype(float))
                # A NaN loss ends training (TerminateOnNaN); the restored
                # weights may still forecast, but the run diverged.
                finite = bool(
                    np.all(np.isfinite(forecast))
                    and np.all(np.isfinite(history["loss"]))
                )
                run = {
                    "model": kind, "learning_rate": learning_rate,
                    "seed": seed, "epochs": len(history["loss"]),
                    "diverged": not finite,
                    "qlike": qlike(target[test], forecast) if finite
                    else None,
                    "rmse_log_volatility": rmse_log_volatility(
                        target[test], forecast
                    ) if finite else None,
                }
                runs.append(run)
                print(
                    f"{kind:<6} learning rate {learning_rate:g} seed {seed}: "
                    + ("diverged" if not finite else
                       f"test QLIKE {run['qlike']:.4f}, RMSE of log "
                       f"volatility {run['rmse_log_volatility']:.4f}"),
                    flush=True,
                )
                if seed == args.seed and finite:
                    shown[(kind, learning_rate)] = forecast
    return {
        "garch_params": params,
        "garch_range_ratio": ratio,
        "baselines": baseline_errors,
        "runs": runs,
        "summary": summarize(runs, args, baseline_errors),
    }, {
        "dates": days["date"][window:][test],
        "realised": target[test],
        "baselines": baselines,
        "networks": shown,
    }


def summarize(runs, args, baselines):
    """Per network and learning rate: the seeds' test errors."""
    import numpy as np

    garch = baselines["GARCH(1,1), range-scaled"]["qlike"]
    summary = []
    for kind in ("BNLSTM", "LSTM"):
        for learning_rate in args.learning_rates:
            group = [
                r for r in runs
                if r["model"] == kind and r["learning_rate"] == learning_rate
            ]
            good = [r for r in group if not r["diverged"]]
            row = {
                "model": kind, "learning_rate": learning_rate,
                "seeds": len(group), "diverged": len(group) - len(good),
            }
            for metric in ("qlike", "rmse_log_volatility"):
                values = np.array([r[metric] for r in good])
                row[metric] = (
                    {"mean": float(values.mean()), "std": float(values.std()),
                     "min": float(values.min()), "max": float(values.max())}
                    if len(values) else None
                )
            row["better_than_garch"] = sum(r["qlike"] < garch for r in good)
            summary.append(row)
    return summary


def volatility_report(results, args):
    base = results["baselines"]
    lines = [
        "Next-day volatility (Parkinson range variance), test period; "
        f"networks over {args.seeds} seed(s):",
        "",
        "| model | learning rate | test QLIKE, mean +- std (min to max) "
        "| test RMSE of log volatility, mean +- std | seeds better than "
        "GARCH | diverged |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in base.items():
        lines.append(
            f"| {name} | | {m['qlike']:.4f} | "
            f"{m['rmse_log_volatility']:.4f} | | |"
        )
    for row in results["summary"]:
        q, r = row["qlike"], row["rmse_log_volatility"]
        cells = (
            f"{q['mean']:.4f} +- {q['std']:.4f} ({q['min']:.4f} to "
            f"{q['max']:.4f}) | {r['mean']:.4f} +- {r['std']:.4f}"
            if q else "n/a | n/a"
        )
        lines.append(
            f"| {row['model']} | {row['learning_rate']:g} | {cells} | "
            f"{row['better_than_garch']} of {row['seeds']} | "
            f"{row['diverged']} |"
        )
    return lines + [""] + volatility_verdict(results, args)


def volatility_verdict(results, args):
    """Plain sentences on accuracy against GARCH and on stability."""
    garch = results["baselines"]["GARCH(1,1), range-scaled"]["qlike"]
    rows = {(r["model"], r["learning_rate"]): r for r in results["summary"]}
    sentences = []
    for kind in ("BNLSTM", "LSTM"):
        trained = [
            r for r in results["summary"]
            if r["model"] == kind and r["qlike"] is not None
        ]
        if not trained:
            sentences.append(f"Every {kind} run diverged.")
            continue
        best = min(trained, key=lambda r: r["qlike"]["mean"])
        sentences.append(
            f"{kind} at its best learning rate "
            f"({best['learning_rate']:g}): mean test QLIKE "
            f"{best['qlike']['mean']:.4f}, "
            f"{compared(best['qlike']['mean'], garch)} than the "
            f"range-scaled GARCH(1,1) ({garch:.4f}); "
            f"{best['better_than_garch']} of {best['seeds']} seeds beat it."
        )
    pairs = [
        (rate, rows[("BNLSTM", rate)]["qlike"], rows[("LSTM", rate)]["qlike"])
        for rate in args.learning_rates
    ]
    pairs = [(rate, bn, plain) for rate, bn, plain in pairs if bn and plain]
    if pairs:
        lower = sum(bn["mean"] < plain["mean"] for _, bn, plain in pairs)
        sentences.append(
            f"BNLSTM against LSTM: lower mean test QLIKE at {lower} of "
            f"{len(pairs)} learning rates ("
            + "; ".join(
                f"{rate:g}: {compared(bn['mean'], plain['mean'])}"
                for rate, bn, plain in pairs
            )
            + ")."
        )
    sentences.append(rmse_sentence(results))
    capped = epoch_limit_sentence(results, args)
    if capped:
        sentences.append(capped)
    spreads = []
    for learning_rate in args.learning_rates:
        bn, plain = rows[("BNLSTM", learning_rate)], rows[("LSTM",
                                                           learning_rate)]
        spreads.append((learning_rate, spread(bn), spread(plain)))
    detail = "; ".join(
        f"{lr:g}: BNLSTM {describe(bn)}, LSTM {describe(plain)}"
        for lr, bn, plain in spreads
    )
    steadier = sum(bn < plain for _, bn, plain in spreads)
    diverged = sum(row["diverged"] for row in results["summary"])
    sentences.append(
        f"Diverged runs: {diverged}"
        + (f", none even at {max(args.learning_rates):g}." if not diverged
           else " (see the table).")
    )
    if args.seeds < 2:
        stability = "One seed per setting: nothing can be said on stability."
    elif steadier == len(spreads):
        stability = (
            "The BNLSTM's test QLIKE varied less over seeds at every "
            "learning rate: here batch normalization kept training more "
            "stable."
        )
    elif steadier == 0:
        stability = (
            "The BNLSTM's test QLIKE varied as much as the LSTM's or more at "
            "every learning rate: here batch normalization did not keep "
            "training more stable."
        )
    else:
        stability = (
            f"The BNLSTM's test QLIKE varied less over seeds at {steadier} "
            f"of {len(spreads)} learning rates: mixed evidence that batch "
            "normalization keeps training more stable."
        )
    return sentences + [
        "Spread over seeds (standard deviation of test QLIKE"
        + ("; a diverged run counts as infinite" if any(
            math.isinf(bn) or math.isinf(plain) for _, bn, plain in spreads
        ) else "")
        + f") by learning rate: {detail}.",
        stability,
    ]


def rmse_sentence(results):
    """Which forecast has the lowest RMSE of log volatility, and why."""
    scores = {
        name: m["rmse_log_volatility"]
        for name, m in results["baselines"].items()
    }
    for row in results["summary"]:
        if row["rmse_log_volatility"] is not None:
            name = f"{row['model']} at {row['learning_rate']:g}"
            scores[name] = row["rmse_log_volatility"]["mean"]
    best = min(scores, key=scores.get)
    return (
        f"Lowest RMSE of log volatility: {best}, {scores[best]:.4f}. The "
        "networks minimise QLIKE, whose best forecast is the mean variance; "
        "the RMSE of log volatility is smallest for the geometric mean, "
        "which is lower, so it favours forecasts below QLIKE's."
    )


def epoch_limit_sentence(results, args):
    """Says where runs ended at --epochs, still improving, if any did."""
    parts = []
    for rate in args.learning_rates:
        runs = [r for r in results["runs"] if r["learning_rate"] == rate]
        capped = sum(r["epochs"] == args.epochs for r in runs)
        if capped:
            parts.append(f"{capped} of {len(runs)} runs at {rate:g}")
    if not parts:
        return None
    return (
        f"Ran to the {args.epochs}-epoch limit without early stopping, so "
        f"possibly not converged: {', '.join(parts)}."
    )


def spread(row):
    if row["diverged"]:
        return math.inf
    return row["qlike"]["std"]


def describe(value):
    return "diverged" if math.isinf(value) else f"{value:.4f}"


def volatility_plot(results, shown, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    last = slice(-250, None)
    dates = shown["dates"][last]
    ax1.plot(dates, np.sqrt(shown["realised"][last]), color="lightgray",
             lw=1, label="realised (range)")
    ax1.plot(dates, np.sqrt(shown["baselines"]["GARCH(1,1), range-scaled"]
                            [last]),
             color="black", lw=1.2, label="GARCH(1,1), range-scaled")
    for kind, style in (("BNLSTM", "-"), ("LSTM", "--")):
        best = min(
            (r for r in results["summary"]
             if r["model"] == kind and r["qlike"] is not None
             and (kind, r["learning_rate"]) in shown["networks"]),
            key=lambda r: r["qlike"]["mean"], default=None,
        )
        if best is not None:
            forecast = shown["networks"][(kind, best["learning_rate"])]
            ax1.plot(dates, np.sqrt(forecast[last]), lw=1.2, ls=style,
                     label=f"{kind}, rate {best['learning_rate']:g}, "
                     f"seed {args.seed}")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax1.yaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    )
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_ylabel("daily volatility (%), log scale")
    ax1.set_title("Forecasts against realised volatility, last 250 test days")
    # Below the axes: inside, it would hide the series.
    ax1.legend(fontsize=7, ncols=2, loc="upper center",
               bbox_to_anchor=(0.5, -0.18))
    ax1.tick_params(axis="x", labelrotation=30, labelsize=7)

    for offset, kind in ((-0.04, "BNLSTM"), (0.04, "LSTM")):
        runs = [r for r in results["runs"]
                if r["model"] == kind and not r["diverged"]]
        rates = np.array([r["learning_rate"] for r in runs])
        errors = [r["qlike"] for r in runs]
        # Side by side on the log axis, so equal values do not hide.
        points = ax2.scatter(rates * 10**offset, errors, s=14, alpha=0.7,
                             label=f"{kind}, one seed")
        means = [
            row["qlike"]["mean"] for row in results["summary"]
            if row["model"] == kind and row["qlike"] is not None
        ]
        mean_rates = [
            row["learning_rate"] for row in results["summary"]
            if row["model"] == kind and row["qlike"] is not None
        ]
        ax2.plot(mean_rates, means, color=points.get_facecolor()[0],
                 label=f"{kind}, mean")
    for name, style in (("GARCH(1,1), range-scaled", "-"),
                        ("20-day average", ":")):
        ax2.axhline(results["baselines"][name]["qlike"], color="black",
                    lw=1, ls=style, label=name)
    ax2.set_xscale("log")
    rates = args.learning_rates
    ax2.set_xlim(min(rates) / 2, max(rates) * 2)
    ax2.set_xticks(rates, [f"{rate:g}" for rate in rates])
    ax2.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax2.set_xlabel("Adam learning rate (log scale)")
    # From 0, a perfect forecast's QLIKE, so gaps are seen at their size.
    ax2.set_ylim(bottom=0.0)
    ax2.set_ylabel("test QLIKE (0 is perfect)")
    ax2.set_title(f"Test error over {args.seeds} seeds by learning rate")
    ax2.legend(fontsize=7, ncols=2, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run(args):
    """Loads the data, runs the chosen tasks, writes the report and plots."""
    frame, source = load_prices(args)
    if args.quick:
        frame = frame.iloc[-QUICK_DAYS:].reset_index(drop=True)
    # About 50 windows at least, so that each period holds a few.
    needed = args.window + 50
    if len(frame) < needed:
        raise InputError(
            f"argument --window: must leave at least 50 days after it in the "
            f"data ({source}: {len(frame)} usable rows, too few for a window "
            f"of {args.window} days, which needs at least {needed}). "
            f"Received: {args.window!r}"
        )
    days = daily_series(frame)
    targets = days["date"][args.window:]

    def period(s):
        return f"{str(targets[s][0])[:10]} to {str(targets[s][-1])[:10]}"

    print(f"{source}: {len(frame)} days.")
    results, lines = {"args": vars(args)}, []
    if args.task in ("both", "returns"):
        metrics, predictions, actual, dates = returns_task(days, args, period)
        results["returns"] = metrics
        lines += returns_report(metrics) + [""]
        returns_plot(predictions, actual, dates,
                     os.path.join(args.out, "predictions.png"))
    if args.task in ("both", "volatility"):
        volatility, shown = volatility_task(days, args, period)
        results["volatility"] = volatility
        lines += volatility_report(volatility, args) + [""]
        volatility_plot(volatility, shown, args,
                        os.path.join(args.out, "volatility.png"))
    return results, lines


QUICK = {"epochs": 2, "seeds": 2, "learning_rates": [QUICK_LEARNING_RATE]}


def parse_args(argv):
    parser = _cli.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--task",
                        type=_cli.one_of("both", "returns", "volatility"),
                        default="both", help="what to forecast: both, "
                        "returns or volatility")
    parser.add_argument("--dataset", type=_cli.one_of("sp500", "nasdaq"),
                        default="sp500",
                        help="bundled series to use when --csv is not given: "
                        "sp500 or nasdaq")
    parser.add_argument("--csv", type=_cli.existing_file, default=None,
                        help="CSV with Date, Open, High, Low, Close, Volume")
    integers = (
        ("--window", 20, "days of history in each input"),
        ("--units", 16, "units of each LSTM"),
        ("--epochs", 20, "maximum epochs (early stopping on validation)"),
        ("--batch-size", 64, "training batch size"),
        ("--seeds", 5, "seeds per network and learning rate for the "
         "volatility task"),
    )
    for option, default, text in integers:
        parser.add_argument(option, type=_cli.positive_int, default=default,
                            help=f"{text}, a positive integer")
    parser.add_argument("--learning-rate", type=_cli.rate, default=1e-3,
                        help="Adam learning rate for the return task, a "
                        "finite number above 0")
    parser.add_argument("--learning-rates", type=_cli.rate, nargs="+",
                        default=[1e-3, 1e-2, 1e-1],
                        help="Adam learning rates for the volatility task, "
                        "finite numbers above 0")
    _cli.add_common(
        parser, quick=QUICK, quick_help=f"the last {QUICK_DAYS:,} days",
        out=os.path.join("out", "stock_series"),
        seed_help="first random seed",
    )
    args = parser.parse_args(argv)
    args.learning_rates = sorted(set(args.learning_rates))
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _cli.import_keras()
    start = time.time()
    try:
        os.makedirs(args.out, exist_ok=True)
        results, lines = run(args)
    except InputError as error:
        print(f"stock_series.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    if args.quick:
        lines = [_cli.QUICK_NOTE, ""] + lines
    text = "\n".join(lines + [f"Run time {time.time() - start:.0f} s."])
    print()
    print(text)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
