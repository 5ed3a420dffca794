"""Tests of examples/adaptation.py, run as a user runs it."""

import json
import math
import os
import pathlib
import tempfile

import pytest

from tests import test_case

SCRIPT = test_case.REPO / "examples" / "adaptation.py"
METHODS = {
    "source", "AdaBN", "TENT online", "TENT episodic", "TENT online, long",
    "TENT episodic, long", "fine-tune, BN trainable", "fine-tune, BN frozen",
    "AdaBN, then BN frozen",
}


@pytest.mark.slow
def test_quick_run_writes_accuracies_table_and_plot():
    with tempfile.TemporaryDirectory() as tmp:
        result = test_case.run_script(
            SCRIPT, "--quick", "--quiet", "--out", tmp, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        with open(os.path.join(tmp, "results.json")) as f:
            results = json.load(f)
        for kind in ("accuracy", "top_class_share"):
            assert set(results[kind]) == METHODS
            for values in results[kind].values():
                assert len(values) == 1
                assert math.isfinite(values[0]) and 0.0 <= values[0] <= 1.0
        table = pathlib.Path(tmp, "results.md").read_text()
        for method in METHODS:
            assert f"| {method} " in table
        assert "AdaBN here" in result.stdout
        png = pathlib.Path(tmp, "adaptation_accuracy.png").read_bytes()
        assert png.startswith(b"\x89PNG")
        # The progress bar is Keras's; --quiet must hide it.
        assert "━" not in result.stdout


def test_help_lists_every_option():
    result = test_case.run_script(SCRIPT, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--quick", "--quiet", "--seed", "--seeds", "--out",
                   "--tent-steps", "--long-tent-steps", "--labelled"):
        assert option in result.stdout


def test_too_few_test_digits_is_a_one_line_error():
    result = test_case.run_script(
        SCRIPT, "--train-size", "1700", "--labelled", "100", timeout=60
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("adaptation.py: error: argument --train-size: ")
    assert last.endswith("Received: 1700")
