"""Tests of examples/fine_tuning.py, run as a user runs it."""

import json
import math
import os
import pathlib
import tempfile

import pytest

from tests import test_case

SCRIPT = test_case.REPO / "examples" / "fine_tuning.py"


def _run(*args, timeout=300):
    return test_case.run_script(SCRIPT, *args, timeout=timeout)


@pytest.mark.slow
def test_quick_run_writes_finite_aucs_and_plot():
    with tempfile.TemporaryDirectory() as tmp:
        result = _run("--quick", "--quiet", "--out", tmp)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(os.path.join(tmp, "results.json")) as f:
            aucs = json.load(f)["auc"]
        assert set(aucs) == {
            "no adaptation", "statistics only", "BN trainable", "BN frozen",
            "statistics re-estimated",
        }
        for values in aucs.values():
            assert len(values) == 1
            assert math.isfinite(values[0]) and 0.0 <= values[0] <= 1.0
        assert "statistics re-estimated" in result.stdout
        png = pathlib.Path(tmp, "fine_tuning_auc.png").read_bytes()
        assert png.startswith(b"\x89PNG")

