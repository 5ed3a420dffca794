"""A character-level language model with keras_bn.BNLSTM.

Trains a `keras_bn.BNLSTM` and a `keras.layers.LSTM` baseline of the same
size and settings side by side to predict the next character, reports the
held-out bits per character of both after every epoch (the BNLSTM with its
population statistics, as at inference), plots the two curves, saves the
models as `.keras` files and samples text from a prompt.

Sampling runs a stateful copy of the trained model (`stateful=True`, a
batch of one, the same weights): the prompt goes through it once, then
every new character is one step, and the model keeps the whole text so far
as context. Step `t` of the text uses the BNLSTM's population statistics of
step `t` (the last kept step, 100, from then on), as in training.

The default corpus is the Python language reference that ships with
CPython (`pydoc_data.topics`, about 465,000 characters of English prose and
code); `--text-file` takes any other text. The text is split by position:
the first 90 % trains, the last 10 % validates, and no sequence crosses the
boundary.

Usage:
    python examples/text_generation.py                 # ~5 min on 2 cores
    python examples/text_generation.py --quick         # a smoke run
    python examples/text_generation.py --generate \\
        --model out/text_generation/bnlstm.keras --prompt "The import"
"""

import json
import math
import os
import sys
import time

import _cli

_cli.quiet_tensorflow()

SEQUENCE_LENGTH = 100
QUICK = {"epochs": 1, "units": 64, "length": 80}
QUICK_CHARACTERS = 60000


class InputError(Exception):
    """Bad user input; reported on one line with exit status 2."""


def load_text(args):
    if args.text_file is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics)), (
            "pydoc_data.topics"
        )
    with open(args.text_file, encoding="utf-8", errors="replace") as f:
        text = f.read()
    needed = 20 * (SEQUENCE_LENGTH + 1)
    if len(text) < needed:
        raise InputError(
            f"argument --text-file: must hold at least {needed} characters "
            f"to train on. Received: {args.text_file!r} ({len(text)} "
            "characters)"
        )
    return text, args.text_file


def sequences(ids, length):
    """Non-overlapping (input, target) windows; targets shifted by one."""
    import numpy as np

    count = (len(ids) - 1) // length
    usable = ids[: count * length + 1]
    x = usable[:-1].reshape(count, length)
    y = usable[1:].reshape(count, length)
    return x.astype(np.int32), y.astype(np.int32)


def build(keras, keras_bn, kind, vocab_size, units):
    inputs = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(vocab_size, 32)(inputs)
    if kind == "BNLSTM":
        h = keras_bn.BNLSTM(
            units, return_sequences=True, max_timesteps=SEQUENCE_LENGTH
        )(h)
    else:
        h = keras.layers.LSTM(units, return_sequences=True)(h)
    outputs = keras.layers.Dense(vocab_size)(h)
    return keras.Model(inputs, outputs)


def bits_per_character(loss):
    return loss / math.log(2.0)


def stateful_copy(model):
    """`model` for a batch of one, its recurrent layers stateful.

    A config edit: the input's batch size is fixed at 1 and every recurrent
    layer gets `stateful=True`; the weights are `model`'s.
    """
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "InputLayer":
            shape = layer["config"]["batch_shape"]
            layer["config"]["batch_shape"] = [1, *shape[1:]]
        elif "stateful" in layer["config"]:
            layer["config"]["stateful"] = True
            # Built from the new input, whose batch size the states take.
            layer.pop("build_config", None)
    copy = type(model).from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def next_id(logits, temperature, rng):
    """Draws a character id from `logits` at `temperature`."""
    import numpy as np

    logits = np.asarray(logits, np.float64) / max(temperature, 1e-6)
    p = np.exp(logits - logits.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def sample(model, vocab, prompt, length, temperature, seed):
    """The prompt and `length` characters sampled after it.

    One step of a stateful copy of `model` per character.
    """
    import keras
    import numpy as np

    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(prompt) - set(index))
    if unknown:
        raise InputError(
            "argument --prompt: must use only characters the model was "
            f"trained on. Received: {prompt!r} (unknown: {unknown!r})"
        )
    stream = stateful_copy(model)
    if keras.backend.backend() == "tensorflow":
        run = stream.predict_on_batch
    else:
        # JAX's compiled predict does not carry the states of stateful
        # layers (as for keras.layers.LSTM); eager calls do.
        def run(x):
            return keras.ops.convert_to_numpy(stream(x, training=False))

    rng = np.random.default_rng(seed)
    ids = [index[c] for c in prompt]
    logits = run(np.array([ids], np.int32))[0, -1]
    for i in range(length):
        ids.append(next_id(logits, temperature, rng))
        if i < length - 1:
            logits = run(np.array([ids[-1:]], np.int32))[0, -1]
    return "".join(vocab[i] for i in ids)


def train(args):
    import numpy as np

    text, source = load_text(args)
    if args.quick:
        text = text[:QUICK_CHARACTERS]
    import keras

    import keras_bn

    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.array([index[c] for c in text], np.int32)
    boundary = int(len(ids) * 0.9)
    x_train, y_train = sequences(ids[:boundary], SEQUENCE_LENGTH)
    x_val, y_val = sequences(ids[boundary:], SEQUENCE_LENGTH)
    print(
        f"{source}: {len(text)} characters, {len(vocab)} distinct; "
        f"{len(x_train)} training and {len(x_val)} validation sequences of "
        f"{SEQUENCE_LENGTH}."
    )
    with open(os.path.join(args.out, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    curves, models = {}, {}
    for kind in ("BNLSTM", "LSTM"):
        keras.utils.set_random_seed(args.seed)
        model = build(keras, keras_bn, kind, len(vocab), args.units)
        model.compile(
            optimizer=keras.optimizers.Adam(args.learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        print(f"Training {kind} ({args.units} units):")
        history = model.fit(
            x_train, y_train, validation_data=(x_val, y_val),
            batch_size=args.batch_size, epochs=args.epochs,
            verbose=0 if args.quiet else 1,
        )
        curves[kind] = [bits_per_character(v)
                        for v in history.history["val_loss"]]
        model.save(os.path.join(args.out, f"{kind.lower()}.keras"))
        models[kind] = model
    return curves, models, vocab


def report(curves, args, elapsed):
    lines = [
        "| epoch | BNLSTM bits/char | LSTM bits/char |",
        "| ---: | ---: | ---: |",
    ]
    for epoch, (a, b) in enumerate(zip(curves["BNLSTM"], curves["LSTM"]), 1):
        lines.append(f"| {epoch} | {a:.3f} | {b:.3f} |")
    final = {k: v[-1] for k, v in curves.items()}
    better = min(final, key=final.get)
    lines += [
        "",
        f"Held-out bits per character after {args.epochs} epoch(s): BNLSTM "
        f"{final['BNLSTM']:.3f}, LSTM {final['LSTM']:.3f} ({better} lower). "
        f"Run time {elapsed:.0f} s.",
    ]
    if args.quick:
        lines = [_cli.QUICK_NOTE, ""] + lines
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"bits_per_character": curves, "args": vars(args)}, f,
                  indent=2, default=str)


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out bits per character")
    ax.set_title("Character-level language model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def generate(args):
    vocab_path = args.vocab or os.path.join(
        os.path.dirname(args.model), "vocab.json"
    )
    if not os.path.isfile(vocab_path):
        raise InputError(
            "argument --vocab: must be given, or vocab.json must be next to "
            f"--model (a training run writes it there). Received: None, and "
            f"{vocab_path!r} does not exist"
        )
    import keras

    import keras_bn  # noqa: F401  (registers the layers for loading)

    with open(vocab_path) as f:
        vocab = json.load(f)
    model = keras.saving.load_model(args.model)
    print(sample(model, vocab, args.prompt, args.length, args.temperature,
                 args.seed))


def parse_args(argv):
    parser = _cli.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--text-file", type=_cli.existing_file, default=None,
                        help="train on this UTF-8 text instead of the "
                        "Python language reference")
    integers = (
        ("--units", 128, "units of each LSTM"),
        ("--epochs", 10, "training epochs"),
        ("--batch-size", 64, "training batch size"),
        ("--length", 300, "characters to sample"),
    )
    for option, default, text in integers:
        parser.add_argument(option, type=_cli.positive_int, default=default,
                            help=f"{text}, a positive integer")
    parser.add_argument("--learning-rate", type=_cli.rate, default=3e-3,
                        help="Adam learning rate, a finite number above 0")
    parser.add_argument("--generate", action="store_true",
                        help="only sample from a saved model (--model)")
    parser.add_argument("--model", type=_cli.existing_file, default=None,
                        help="saved .keras model to sample from")
    parser.add_argument("--vocab", type=_cli.existing_file, default=None,
                        help="vocab.json of the model (default: the one "
                        "next to --model)")
    parser.add_argument("--prompt", type=_cli.non_empty, default="The ",
                        help="text to continue, not empty")
    parser.add_argument("--temperature", type=_cli.rate, default=0.7,
                        help="sampling temperature, a finite number above 0 "
                        "(lower is more conservative)")
    _cli.add_common(
        parser, quick=QUICK,
        quick_help=f"the first {QUICK_CHARACTERS:,} characters",
        out=os.path.join("out", "text_generation"),
        seed_help="seed for the weights, the shuffling and the sampling",
    )
    args = parser.parse_args(argv)
    if args.generate and args.model is None:
        parser.fail("--model", args.model, "a saved .keras model with "
                    "--generate")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _cli.import_keras()
    start = time.time()
    try:
        if args.generate:
            generate(args)
            return 0
        os.makedirs(args.out, exist_ok=True)
        curves, models, vocab = train(args)
        report(curves, args, time.time() - start)
        plot(curves, os.path.join(args.out, "bits_per_character.png"))
        print(f"\nSample from the BNLSTM (temperature {args.temperature}):")
        print(sample(models["BNLSTM"], vocab, args.prompt, args.length,
                     args.temperature, args.seed))
    except InputError as error:
        print(f"text_generation.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
