"""Fine-tuning a model with batch normalization on a shifted domain.

A small tabular fraud classifier with `keras_bn.BatchNormalization` is
pretrained on synthetic card transactions from one market, where fraud
means large purchases far from home. It is then adapted to a second market
whose transactions are distributed differently (other amounts, hours and
distances) and whose fraud is of a new kind (bursts of small night-time
purchases), with only a few labelled examples. Five ways are compared by
ROC AUC on held-out transactions of the new market:

- no adaptation: the pretrained model as it is;
- statistics only: `keras_bn.recompute_statistics` on unlabelled
  new-market transactions, no fine-tuning (no labels used at all);
- BN trainable: fine-tune everything; BN normalizes with the statistics of
  each small fine-tuning batch and its moving statistics drift towards them;
- BN frozen: `layer.trainable = False` on every BN layer, which also runs it
  in inference mode: the pretraining statistics are kept, although they
  describe the old market;
- statistics re-estimated: `keras_bn.recompute_statistics` first replaces
  the moving statistics with those of unlabelled new-market transactions
  (no labels needed), then fine-tune with BN frozen.

Everything is synthetic and generated here; nothing is downloaded.

Usage:
    python examples/fine_tuning.py            # default settings, ~2 min
    python examples/fine_tuning.py --quick    # a smoke run, < 1 min
"""

import json
import os
import sys
import time

import _cli

_cli.quiet_tensorflow()

# A fifth of the labelled examples are fraud: fewer than this leave too few
# frauds to fine-tune on.
MIN_LABELLED = 20

FEATURES = (
    "log_amount", "hour_sin", "hour_cos", "log_distance", "velocity",
    "merchant_risk", "card_age", "foreign", "online", "weekend",
)


def make_transactions(rng, n, market, fraud_rate):
    """Synthetic transactions of one market, with that market's fraud.

    Returns:
        `(x, y)`: float32 features of shape `(n, 10)` and 0/1 labels.
    """
    import numpy as np

    old = market == "old"
    y = (rng.random(n) < fraud_rate).astype("float32")
    # The markets differ in their typical amounts, hours and distances.
    log_amount = rng.normal(3.5 if old else 5.0, 0.8 if old else 1.2, n)
    hour = rng.normal(14 if old else 18, 4, n) % 24
    log_distance = rng.normal(1.5 if old else 3.0, 1.0, n)
    velocity = rng.poisson(2 if old else 4, n).astype(float)
    merchant_risk = rng.beta(2, 5, n)
    card_age = rng.gamma(2.0, 2.0 if old else 0.8, n)
    foreign = (rng.random(n) < (0.05 if old else 0.3)).astype(float)
    online = (rng.random(n) < (0.3 if old else 0.6)).astype(float)
    weekend = (rng.random(n) < 2 / 7).astype(float)
    fraud = y == 1
    if old:
        # Old fraud: large purchases far from home.
        log_amount[fraud] += rng.normal(1.5, 0.5, fraud.sum())
        log_distance[fraud] += rng.normal(1.5, 0.5, fraud.sum())
    else:
        # New fraud: bursts of small night-time purchases on new cards.
        count = fraud.sum()
        log_amount[fraud] -= rng.normal(0.6, 0.5, count)
        velocity[fraud] += rng.poisson(1.5, count)
        night = fraud & (rng.random(n) < 0.5)
        hour[night] = rng.normal(3, 1.5, night.sum()) % 24
        card_age[fraud] *= rng.uniform(0.3, 1.0, count)
    angle = 2 * np.pi * hour / 24
    x = np.stack(
        [
            log_amount, np.sin(angle), np.cos(angle), log_distance, velocity,
            merchant_risk, card_age, foreign, online, weekend,
        ],
        axis=1,
    )
    return x.astype("float32"), y


def build_model(keras, keras_bn):
    inputs = keras.Input((len(FEATURES),))
    h = inputs
    for units in (64, 32):
        h = keras.layers.Dense(units, use_bias=False)(h)
        h = keras_bn.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
    outputs = keras.layers.Dense(1, activation="sigmoid")(h)
    return keras.Model(inputs, outputs)


def set_bn_trainable(model, keras_bn, trainable):
    for layer in model.layers:
        if isinstance(layer, keras_bn.BatchNormalization):
            layer.trainable = trainable


def fine_tune(keras, model, x, y, args, seed):
    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(args.fine_tune_learning_rate),
        loss="binary_crossentropy",
    )
    model.fit(
        x, y, batch_size=args.fine_tune_batch_size,
        epochs=args.fine_tune_epochs, verbose=0,
    )


def run(args):
    import keras
    import numpy as np
    from sklearn.metrics import roc_auc_score

    import keras_bn

    results = {name: [] for name in METHODS}
    for seed in range(args.seed, args.seed + args.seeds):
        rng = np.random.default_rng(seed)
        keras.utils.set_random_seed(seed)
        x_old, y_old = make_transactions(rng, args.pretrain_size, "old", 0.1)
        x_few, y_few = make_transactions(rng, args.labelled, "new", 0.2)
        x_pool, _ = make_transactions(rng, args.unlabelled, "new", 0.1)
        x_test, y_test = make_transactions(rng, args.test_size, "new", 0.1)

        pretrained = build_model(keras, keras_bn)
        pretrained.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="binary_crossentropy",
        )
        print(f"seed {seed}: pretraining on the old market")
        pretrained.fit(
            x_old, y_old, batch_size=128, epochs=args.pretrain_epochs,
            verbose=0 if args.quiet else 1,
        )
        weights = pretrained.get_weights()

        def fresh(weights=weights):
            model = build_model(keras, keras_bn)
            model.set_weights(weights)
            return model

        def auc(model, x_test=x_test, y_test=y_test):
            scores = model.predict(x_test, batch_size=1024, verbose=0)
            return float(roc_auc_score(y_test, scores.ravel()))

        results["no adaptation"].append(auc(fresh()))

        model = fresh()
        keras_bn.recompute_statistics(
            model, x_pool, batch_size=256, verbose=0
        )
        results["statistics only"].append(auc(model))

        model = fresh()
        fine_tune(keras, model, x_few, y_few, args, seed)
        results["BN trainable"].append(auc(model))

        model = fresh()
        set_bn_trainable(model, keras_bn, False)
        fine_tune(keras, model, x_few, y_few, args, seed)
        results["BN frozen"].append(auc(model))

        model = fresh()
        keras_bn.recompute_statistics(
            model, x_pool, batch_size=256, verbose=0
        )
        set_bn_trainable(model, keras_bn, False)
        fine_tune(keras, model, x_few, y_few, args, seed)
        results["statistics re-estimated"].append(auc(model))
        print(
            "  "
            + ", ".join(f"{k}: {v[-1]:.3f}" for k, v in results.items())
        )
    return results


METHODS = (
    "no adaptation", "statistics only", "BN trainable", "BN frozen",
    "statistics re-estimated",
)

EXPLANATIONS = {
    "no adaptation": "the pretrained model, old statistics, no new labels",
    "statistics only": "recompute_statistics on unlabelled new data, no "
    "fine-tuning: what re-centring alone gives, without labels",
    "BN trainable": "BN uses each fine-tuning batch's statistics; noisy "
    "with small batches, and the moving statistics drift",
    "BN frozen": "trainable=False: inference mode with the old market's "
    "statistics, which no longer centre the new data",
    "statistics re-estimated": "recompute_statistics on unlabelled new "
    "data, then fine-tune with BN frozen",
}


def report(results, args, elapsed):
    import numpy as np

    lines = [
        f"ROC AUC on {args.test_size} held-out new-market transactions, "
        f"{args.labelled} labelled examples for fine-tuning, "
        f"{args.seeds} seed(s):",
        "",
        f"| {'method':<24} | AUC mean | AUC std | what it does",
        f"| {'-' * 24} | -------- | ------- | ------------",
    ]
    for name in METHODS:
        values = np.array(results[name])
        lines.append(
            f"| {name:<24} | {values.mean():8.3f} | {values.std():7.3f} | "
            f"{EXPLANATIONS[name]}"
        )
    best = max(METHODS, key=lambda m: np.mean(results[m]))
    lines += ["", f"Best on average: {best}. Run time {elapsed:.0f} s."]
    if args.quick:
        lines = [_cli.QUICK_NOTE, ""] + lines
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"auc": results, "args": vars(args)}, f, indent=2,
                  default=str)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    plot(results, os.path.join(args.out, "fine_tuning_auc.png"))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.5))
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
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1,
               label="random ranking (AUC 0.5)")
    ax.set_xticks(positions, METHODS, fontsize=8)
    ax.set_ylabel("ROC AUC, new market")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Adapting a BN model to a new kind of fraud")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


QUICK = {
    "seeds": 1, "pretrain_size": 4000, "pretrain_epochs": 2,
    "unlabelled": 1024, "test_size": 2000, "fine_tune_epochs": 5,
}


def parse_args(argv):
    parser = _cli.parser(__doc__.split("\n\n")[0])
    integers = (
        ("--seeds", 3, "number of seeds to average over"),
        ("--pretrain-size", 40000, "old-market transactions for pretraining"),
        ("--pretrain-epochs", 5, "pretraining epochs"),
        ("--unlabelled", 4096, "unlabelled new-market transactions used to "
         "re-estimate the statistics"),
        ("--test-size", 20000, "held-out new-market transactions"),
        ("--fine-tune-epochs", 30, "fine-tuning epochs"),
        ("--fine-tune-batch-size", 16, "fine-tuning batch size"),
    )
    for option, default, text in integers:
        parser.add_argument(option, type=_cli.positive_int, default=default,
                            help=f"{text}, a positive integer")
    parser.add_argument("--labelled", type=_cli.int_at_least(MIN_LABELLED),
                        default=128,
                        help="labelled new-market transactions, at least "
                        f"{MIN_LABELLED}")
    parser.add_argument("--fine-tune-learning-rate", type=_cli.rate,
                        default=1e-3, help="fine-tuning learning rate (Adam), "
                        "a finite number above 0")
    _cli.add_common(
        parser, quick=QUICK, quick_help="",
        out=os.path.join("out", "fine_tuning"),
        seed_help="first seed: seeds --seed to --seed + --seeds - 1 make the "
        "data and the weights",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _cli.import_keras()
    start = time.time()
    results = run(args)
    report(results, args, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
