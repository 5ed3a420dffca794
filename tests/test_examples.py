"""Tests of the runnable examples, each run as a user runs it."""

import math
import pathlib
import re
import tempfile

import pytest
from absl.testing import parameterized

from tests import test_case

REPO = pathlib.Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "examples" / "quickstart.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_example(path, *args, timeout):
    return test_case.run_script(path, *args, timeout=timeout)


class QuickstartTest(parameterized.TestCase):
    @pytest.mark.slow
    def test_quick_run_prints_curves_and_writes_plot(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        out = pathlib.Path(tmp.name, "plots")
        result = run_example(
            QUICKSTART, "--quick", "--quiet", "--out", str(out), timeout=300
        )
        self.assertEqual(result.returncode, 0, msg=result.stderr)

        rows = re.findall(
            r"^\s*(\d+)\s+(\S+)\s+(\S+)\s*$", result.stdout, re.MULTILINE
        )
        self.assertEqual([int(r[0]) for r in rows], [1, 2], result.stdout)
        for _, with_bn, without_bn in rows:
            for value in (float(with_bn), float(without_bn)):
                self.assertTrue(math.isfinite(value), result.stdout)
                self.assertBetween(value, 0.0, 1.0)

        firsts = re.findall(
            r"^First epoch at 95% validation accuracy, (with|without) BN: "
            r"(\d+|never)$",
            result.stdout,
            re.MULTILINE,
        )
        self.assertEqual([f[0] for f in firsts], ["with", "without"])
        losses = re.findall(
            r"^Final training loss, (with|without) BN: (\S+)$",
            result.stdout,
            re.MULTILINE,
        )
        self.assertEqual([f[0] for f in losses], ["with", "without"])
        for _, loss in losses:
            self.assertTrue(math.isfinite(float(loss)), result.stdout)
            self.assertGreaterEqual(float(loss), 0.0)

        plot = out / "quickstart.png"
        self.assertTrue(plot.is_file(), result.stdout)
        self.assertEqual(plot.read_bytes()[:8], PNG_SIGNATURE)
        # The progress bar is Keras's; --quiet must hide it.
        self.assertNotIn("━", result.stdout)

    @parameterized.named_parameters(
        ("zero_epochs", ["--epochs", "0"], "--epochs", "Received: 0"),
        ("negative_rate", ["--learning-rate", "-1"], "--learning-rate",
         "Received: -1.0"),
        ("nan_rate", ["--learning-rate", "nan"], "--learning-rate",
         "Received: nan"),
        ("zero_batch", ["--batch-size", "0"], "--batch-size", "Received: 0"),
        ("negative_seed", ["--seed", "-3"], "--seed", "Received: -3"),
        ("not_an_integer", ["--epochs", "two"], "--epochs", "'two'"),
    )
    def test_bad_input_is_a_one_line_error(self, args, option, received):
        result = run_example(QUICKSTART, *args, timeout=60)
        self.assertEqual(result.returncode, 2, msg=result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        last_line = result.stderr.strip().splitlines()[-1]
        self.assertStartsWith(last_line, "quickstart.py: error: ")
        self.assertIn(option, last_line)
        self.assertIn(received, last_line)
        self.assertEqual(result.stdout, "")

    def test_help_documents_every_option(self):
        result = run_example(QUICKSTART, "--help", timeout=60)
        self.assertEqual(result.returncode, 0, msg=result.stderr)
        for option in (
            "--epochs",
            "--learning-rate",
            "--batch-size",
            "--seed",
            "--out",
            "--quick",
            "--quiet",
        ):
            # The option's line in the options list, then its help text.
            self.assertRegex(
                result.stdout, rf"(?m)^ +{option}( [A-Z_]+)?\s+[a-z]"
            )
