"""Tests of examples/text_generation.py, run as a user runs it."""

import json
import math
import os
import pathlib
import tempfile

import pytest

from tests import test_case

SCRIPT = test_case.REPO / "examples" / "text_generation.py"


def _run(*args, timeout=300):
    return test_case.run_script(SCRIPT, *args, timeout=timeout)


@pytest.mark.slow
def test_quick_run_then_generate_from_the_saved_model():
    with tempfile.TemporaryDirectory() as tmp:
        result = _run("--quick", "--quiet", "--out", tmp)
        assert result.returncode == 0, result.stderr[-3000:]
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
            (["--text-file", missing], f"--text-file {missing}: no such file"),
            (["--text-file", empty], "0 characters, too short"),
            (["--generate"], "--generate needs --model PATH"),
            (["--generate", "--model", missing],
             f"--model {missing}: no such file"),
            (["--temperature", "0"], "--temperature must be positive"),
        ]
        for args, message in cases:
            result = _run(*args, "--out", tmp, timeout=120)
            assert result.returncode == 2, (args, result.stderr[-2000:])
            assert message in result.stderr, (args, result.stderr)
            assert "Traceback" not in result.stderr
