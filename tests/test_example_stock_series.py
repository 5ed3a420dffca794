"""Tests of examples/stock_series.py, run as a user runs it."""

import json
import math
import os
import pathlib
import tempfile

import pytest

from tests import test_case

SCRIPT = test_case.REPO / "examples" / "stock_series.py"

pytest.importorskip("arch", reason="the examples extra is not installed")


def _run(*args, timeout=300):
    return test_case.run_script(SCRIPT, *args, timeout=timeout)


@pytest.mark.slow
def test_quick_run_writes_finite_metrics_plot_and_models():
    with tempfile.TemporaryDirectory() as tmp:
        result = _run("--quick", "--quiet", "--out", tmp)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(os.path.join(tmp, "results.json")) as f:
            test = json.load(f)["test"]
        assert set(test) == {
            "zero return", "yesterday's return", "BNLSTM", "LSTM"
        }
        for name, m in test.items():
            assert math.isfinite(m["rmse"]) and m["rmse"] > 0, name
            assert math.isfinite(m["mae"]) and m["mae"] > 0, name
        assert test["zero return"]["directional_accuracy"] is None
        assert 0.0 <= test["BNLSTM"]["directional_accuracy"] <= 1.0
        assert "naive baseline" in result.stdout
        assert pathlib.Path(tmp, "predictions.png").read_bytes().startswith(
            b"\x89PNG"
        )
        assert pathlib.Path(tmp, "bnlstm.keras").is_file()


def _write_csv(path, rows, columns=("Date", "Open", "High", "Low", "Close",
                                    "Volume")):
    with open(path, "w") as f:
        f.write(",".join(columns) + "\n")
        for i in range(rows):
            values = [f"2020-01-{1 + i % 28:02d}"]
            values += ["1.5"] * (len(columns) - 1)
            f.write(",".join(values) + "\n")


def test_bad_input_exits_2_with_one_line():
    with tempfile.TemporaryDirectory() as tmp:
        missing = os.path.join(tmp, "missing.csv")
        no_volume = os.path.join(tmp, "no_volume.csv")
        _write_csv(no_volume, 100, ("Date", "Open", "High", "Low", "Close"))
        short = os.path.join(tmp, "short.csv")
        _write_csv(short, 30)
        cases = [
            (["--csv", missing], f"--csv {missing}: no such file"),
            (["--csv", no_volume], "missing column(s) Volume"),
            (["--csv", short], "too few for a window of 20 days"),
            (["--window", "0"], "--window must be a positive integer, got 0"),
        ]
        for args, message in cases:
            result = _run(*args, "--out", tmp, timeout=120)
            assert result.returncode == 2, (args, result.stderr[-2000:])
            assert message in result.stderr, (args, result.stderr)
            assert "Traceback" not in result.stderr
