"""Tests of examples/text_generation.py, run as a user runs it, and of its
stateful sampler against a full-sequence pass."""

import json
import math
import os
import pathlib
import tempfile

import keras
import numpy as np
import pytest

import keras_bn
from tests import test_case
from tests.test_examples import load_example

SCRIPT = test_case.REPO / "examples" / "text_generation.py"


def _run(*args, timeout=300):
    return test_case.run_script(SCRIPT, *args, timeout=timeout)


@pytest.mark.slow
def test_quick_run_then_generate_from_the_saved_model():
    with tempfile.TemporaryDirectory() as tmp:
        result = _run("--quick", "--quiet", "--out", tmp)
        assert result.returncode == 0, result.stderr[-3000:]
        # Its numbers mean nothing, and the output says so above them.
        assert "numbers mean nothing" in result.stdout
        assert "cuInit" not in result.stderr
        with open(os.path.join(tmp, "results.json")) as f:
            curves = json.load(f)["bits_per_character"]
        assert set(curves) == {"BNLSTM", "LSTM"}
        for values in curves.values():
            assert len(values) == 1
            # Bits per character lie between 0 and log2 of the vocabulary.
            assert math.isfinite(values[0]) and 0 < values[0] < 8
        assert pathlib.Path(tmp, "bits_per_character.png").read_bytes()[
            :4
        ] == b"\x89PNG"
        model = os.path.join(tmp, "bnlstm.keras")
        result = _run(
            "--generate", "--model", model, "--prompt", "The ", "--length",
            "20", timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        # The sample is all that goes to stdout: the prompt, then 20 more.
        assert result.stdout.startswith("The ")
        assert len(result.stdout.rstrip("\n")) == 24


def test_bad_input_exits_2_with_one_line():
    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.txt")
        open(empty, "w").close()
        missing = os.path.join(tmp, "missing.txt")
        cases = [
            (["--text-file", missing],
             f"argument --text-file: must be an existing file. Received: "
             f"{missing!r}"),
            (["--text-file", empty],
             f"argument --text-file: must hold at least 2020 characters to "
             f"train on. Received: {empty!r} (0 characters)"),
            (["--generate"],
             "argument --model: must be a saved .keras model with "
             "--generate. Received: None"),
            (["--generate", "--model", missing],
             f"argument --model: must be an existing file. Received: "
             f"{missing!r}"),
            (["--temperature", "0"],
             "argument --temperature: must be a finite number above 0. "
             "Received: '0'"),
            (["--quick", "--epochs", "0"],
             "argument --epochs: must be a positive integer. Received: '0'"),
        ]
        for args, message in cases:
            result = _run(*args, "--out", tmp, timeout=120)
            assert result.returncode == 2, (args, result.stderr[-2000:])
            assert message in result.stderr, (args, result.stderr)
            assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["BNLSTM", "LSTM"])
def test_sampler_equals_a_full_sequence_pass(kind):
    example = load_example("text_generation")
    vocab = list("abcde ")
    keras.utils.set_random_seed(0)
    model = example.build(keras, keras_bn, kind, len(vocab), 8)
    # Weights and BNLSTM statistics away from their initial values.
    rng = np.random.default_rng(0)
    model.set_weights(
        [w + rng.normal(0.0, 0.3, w.shape).astype(w.dtype) * (w.ndim > 1)
         for w in model.get_weights()]
    )
    ids = rng.integers(0, len(vocab), (16, 12))
    model(ids, training=True)
    prompt, length, temperature, seed = "bad cab", 12, 0.7, 3
    text = example.sample(model, vocab, prompt, length, temperature, seed)
    # The reference: the whole text so far through the model, every step.
    index = {c: i for i, c in enumerate(vocab)}
    expected = [index[c] for c in prompt]
    draw = np.random.default_rng(seed)
    for _ in range(length):
        logits = keras.ops.convert_to_numpy(
            model(np.array([expected]), training=False)
        )[0, -1]
        expected.append(example.next_id(logits, temperature, draw))
    assert text == "".join(vocab[i] for i in expected)
    assert len(text) == len(prompt) + length
