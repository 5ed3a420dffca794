"""Tests of examples/stock_series.py: its pieces, and a run as a user would."""

import argparse
import json
import math
import os
import pathlib
import re
import tempfile

import numpy as np
import pytest
from absl.testing import parameterized

from tests import test_case
from tests.test_examples import load_example

SCRIPT = test_case.REPO / "examples" / "stock_series.py"

pytest.importorskip("arch", reason="the examples extra is not installed")


def _run(*args, timeout=300):
    return test_case.run_script(SCRIPT, *args, timeout=timeout)


@pytest.mark.slow
def test_quick_run_writes_sane_results_for_both_tasks():
    with tempfile.TemporaryDirectory() as tmp:
        result = _run("--quick", "--quiet", "--out", tmp)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(os.path.join(tmp, "results.json")) as f:
            results = json.load(f)

        returns = results["returns"]
        assert set(returns) == {
            "zero return", "yesterday's return", "BNLSTM", "LSTM"
        }
        for name, m in returns.items():
            assert math.isfinite(m["rmse"]) and m["rmse"] > 0, name
            assert math.isfinite(m["mae"]) and m["mae"] > 0, name
        assert returns["zero return"]["directional_accuracy"] is None
        assert 0.0 <= returns["BNLSTM"]["directional_accuracy"] <= 1.0
        # Comparisons are "x % better" or "x % worse", never "-x % better".
        assert re.search(r"BNLSTM \d+\.\d\d % (better|worse)", result.stdout)
        assert not re.search(r"-\d+(\.\d+)? %", result.stdout)

        volatility = results["volatility"]
        params = volatility["garch_params"]
        assert params["omega"] > 0 and params["alpha[1]"] >= 0
        assert 0 < params["alpha[1]"] + params["beta[1]"] < 1
        # The range misses overnight moves: smaller, same order of size.
        assert 0.3 < volatility["garch_range_ratio"] < 1.2
        assert set(volatility["baselines"]) == {
            "20-day average", "GARCH(1,1)", "GARCH(1,1), range-scaled"
        }
        for m in volatility["baselines"].values():
            assert 0 < m["qlike"] < 2 and 0 < m["rmse_log_volatility"] < 2
        runs = volatility["runs"]
        # --quick: 2 networks x 1 learning rate x 2 seeds.
        assert sorted((r["model"], r["seed"]) for r in runs) == [
            ("BNLSTM", 0), ("BNLSTM", 1), ("LSTM", 0), ("LSTM", 1)
        ]
        for run in runs:
            assert not run["diverged"], run
            assert 0 < run["qlike"] < 2, run
            assert 0 < run["rmse_log_volatility"] < 2, run
        assert [row["seeds"] for row in volatility["summary"]] == [2, 2]
        assert "than the range-scaled GARCH(1,1)" in result.stdout
        assert "Spread over seeds" in result.stdout

        for plot in ("predictions.png", "volatility.png"):
            png = pathlib.Path(tmp, plot).read_bytes()
            assert png.startswith(b"\x89PNG"), plot
        assert pathlib.Path(tmp, "bnlstm.keras").is_file()
        assert pathlib.Path(tmp, "results.md").read_text().strip()


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
            (["--csv", missing],
             f"argument --csv: must be an existing file. Received: "
             f"{missing!r}"),
            (["--csv", no_volume], "missing column(s) Volume"),
            (["--csv", short], "too few for a window of 20 days"),
        ]
        for args, message in cases:
            result = _run(*args, "--out", tmp, timeout=120)
            assert result.returncode == 2, (args, result.stderr[-2000:])
            assert message in result.stderr, (args, result.stderr)
            assert "Traceback" not in result.stderr


class PiecesTest(parameterized.TestCase):
    """The example's pieces, on made-up numbers, without training."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.module = load_example("stock_series")

    @parameterized.named_parameters(
        ("lower_error", 0.9, "10.00 % better"),
        ("equal_error", 1.0, "0.00 % better"),
        ("higher_error", 1.0056, "0.56 % worse"),
    )
    def test_compared_says_better_or_worse(self, error, expected):
        self.assertEqual(self.module.compared(error, 1.0), expected)

    def test_qlike_is_zero_only_for_the_realised_value(self):
        realised = np.array([0.5, 1.0, 2.0])
        self.assertAlmostEqual(self.module.qlike(realised, realised), 0.0)
        for factor in (0.5, 2.0):
            self.assertGreater(
                self.module.qlike(realised, factor * realised), 0.05
            )
        # Under-forecasting costs more than over-forecasting by as much.
        self.assertGreater(
            self.module.qlike(realised, realised / 2),
            self.module.qlike(realised, realised * 2),
        )
        self.assertAlmostEqual(
            self.module.rmse_log_volatility(realised, 4 * realised),
            math.log(2),
        )

    def test_window_i_ends_the_day_before_its_target(self):
        days = np.arange(10.0)[:, None]
        x = self.module.windows(days, 3)
        targets = days[3:, 0]
        self.assertEqual(x.shape, (7, 3, 1))
        np.testing.assert_array_equal(x[:, -1, 0] + 1, targets)

    @parameterized.named_parameters(
        ("steadier_everywhere", (0.01, 0.02), (0.03, 0.05),
         "kept training more stable"),
        ("never_steadier", (0.04, 0.05), (0.03, 0.05),
         "did not keep training more stable"),
        ("mixed", (0.01, 0.09), (0.03, 0.05), "mixed evidence"),
        ("lstm_diverged", (0.04, 0.05), (0.03, None),
         "varied less over seeds at 1 of 2"),
    )
    def test_verdict_on_stability(self, bn_stds, lstm_stds, expected):
        args = argparse.Namespace(
            learning_rates=[1e-3, 1e-2], seeds=5, epochs=20
        )
        summary = [
            _row(kind, rate, std)
            for kind, stds in (("BNLSTM", bn_stds), ("LSTM", lstm_stds))
            for rate, std in zip(args.learning_rates, stds)
        ]
        results = {
            "baselines": {
                "GARCH(1,1), range-scaled": {
                    "qlike": 0.5, "rmse_log_volatility": 0.6
                },
            },
            "summary": summary,
            "runs": [{"learning_rate": 1e-3, "epochs": 20},
                     {"learning_rate": 1e-3, "epochs": 7}],
        }
        text = " ".join(self.module.volatility_verdict(results, args))
        self.assertIn(expected, text)
        self.assertIn("20.00 % better than the range-scaled GARCH", text)
        self.assertIn("20-epoch limit", text)
        self.assertIn("1 of 2 runs at 0.001.", text)
        # Made-up rows have a log error of 0.4 < 0.6: a network wins.
        self.assertIn("Lowest RMSE of log volatility: BNLSTM at 0.001", text)
        self.assertEqual("; a diverged run" in text, None in lstm_stds)


def _row(kind, rate, std):
    """A summary row: mean QLIKE 0.4; `std=None` means one seed diverged."""
    qlike = {"mean": 0.4, "std": std or 0.0, "min": 0.3, "max": 0.5}
    return {
        "model": kind, "learning_rate": rate, "seeds": 5,
        "diverged": int(std is None), "qlike": qlike,
        "rmse_log_volatility": qlike, "better_than_garch": 5,
    }
