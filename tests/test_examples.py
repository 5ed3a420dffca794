"""Tests of the runnable examples' command lines and the quickstart run."""

import argparse
import contextlib
import importlib.util
import io
import math
import pathlib
import re
import sys
import tempfile
from unittest import mock

import pytest
from absl.testing import parameterized

from tests import test_case

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
QUICKSTART = EXAMPLES / "quickstart.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_example(path, *args, timeout):
    return test_case.run_script(path, *args, timeout=timeout)


def load_example(name):
    """The example `examples/<name>.py` as a module, without running it.

    The examples import their libraries inside functions, so this is cheap;
    `examples/` goes on `sys.path` as it does when a user runs a script.
    """
    _examples_on_path()
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_error(name, argv):
    """The exit status and standard error of the example's parser."""
    stderr = io.StringIO()
    module = load_example(name)
    # argparse names the program after sys.argv[0], as a user's shell sets it.
    script = [str(EXAMPLES / f"{name}.py")]
    with (
        mock.patch.object(sys, "argv", script),
        contextlib.redirect_stderr(stderr),
        pytest.raises(SystemExit) as end,
    ):
        module.parse_args(argv)
    return end.value.code, stderr.getvalue()


# One bad value for every numeric option of every example this file covers
# (text_generation.py has its own tests).
BAD_ARGUMENTS = (
    ("quickstart", "--epochs", "0"),
    ("quickstart", "--learning-rate", "nan"),
    ("quickstart", "--batch-size", "-32"),
    ("quickstart", "--seed", "-3"),
    ("small_batch_renorm", "--steps", "-5"),
    ("small_batch_renorm", "--seeds", "0"),
    ("fine_tuning", "--seed", "-1"),
    ("fine_tuning", "--seeds", "0"),
    ("fine_tuning", "--pretrain-size", "1.5"),
    ("fine_tuning", "--pretrain-epochs", "0"),
    ("fine_tuning", "--labelled", "5"),
    ("fine_tuning", "--unlabelled", "-4096"),
    ("fine_tuning", "--test-size", "many"),
    ("fine_tuning", "--fine-tune-epochs", "0"),
    ("fine_tuning", "--fine-tune-batch-size", "0"),
    ("fine_tuning", "--fine-tune-learning-rate", "-0.001"),
    ("adaptation", "--seed", "-1"),
    ("adaptation", "--seeds", "0"),
    ("adaptation", "--train-size", "1.5"),
    ("adaptation", "--epochs", "0"),
    ("adaptation", "--labelled", "-100"),
    ("adaptation", "--batch-size", "0"),
    ("adaptation", "--tent-steps", "0"),
    ("adaptation", "--long-tent-steps", "many"),
    ("adaptation", "--fine-tune-epochs", "0"),
    ("adaptation", "--fine-tune-batch-size", "0"),
    ("adaptation", "--tent-learning-rate", "nan"),
    ("adaptation", "--long-tent-learning-rate", "0"),
    ("adaptation", "--fine-tune-learning-rate", "-0.001"),
    ("adaptation", "--contrast", "inf"),
    ("adaptation", "--brightness", "-0.1"),
    ("adaptation", "--noise", "loud"),
    ("stock_series", "--window", "0"),
    ("stock_series", "--units", "-16"),
    ("stock_series", "--epochs", "0"),
    ("stock_series", "--batch-size", "0"),
    ("stock_series", "--learning-rate", "0"),
    ("stock_series", "--learning-rates", "inf"),
    ("stock_series", "--seeds", "0"),
    ("stock_series", "--seed", "-1"),
)


class CliTypesTest(parameterized.TestCase):
    """The argument types every example shares, from `examples/_cli.py`."""

    @parameterized.named_parameters(
        ("positive_int", "positive_int", "7", 7),
        ("non_negative_int", "non_negative_int", "0", 0),
        ("rate", "rate", "3e-3", 3e-3),
    )
    def test_accepts(self, kind, text, expected):
        self.assertEqual(getattr(_cli(), kind)(text), expected)

    @parameterized.named_parameters(
        ("int_zero", "positive_int", "0", "a positive integer"),
        ("int_fraction", "positive_int", "1.5", "a positive integer"),
        ("int_word", "positive_int", "two", "a positive integer"),
        ("seed_negative", "non_negative_int", "-1", "a non-negative integer"),
        ("rate_zero", "rate", "0", "a finite number above 0"),
        ("rate_negative", "rate", "-0.1", "a finite number above 0"),
        ("rate_nan", "rate", "nan", "a finite number above 0"),
        ("rate_inf", "rate", "inf", "a finite number above 0"),
        ("rate_word", "rate", "fast", "a finite number above 0"),
    )
    def test_refuses_with_the_value_as_repr(self, kind, text, expected):
        with self.assertRaises(argparse.ArgumentTypeError) as raised:
            getattr(_cli(), kind)(text)
        self.assertEqual(
            str(raised.exception), f"must be {expected}. Received: {text!r}"
        )

    def test_int_at_least_names_its_minimum(self):
        at_least_20 = _cli().int_at_least(20)
        self.assertEqual(at_least_20("20"), 20)
        with self.assertRaisesRegex(
            argparse.ArgumentTypeError,
            "must be an integer of at least 20. Received: '19'",
        ):
            at_least_20("19")


def _cli():
    _examples_on_path()
    return importlib.import_module("_cli")


def _examples_on_path():
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))


class BadArgumentsTest(parameterized.TestCase):
    @parameterized.named_parameters(
        (f"{name}_{option[2:]}", name, option, value)
        for name, option, value in BAD_ARGUMENTS
    )
    def test_one_line_error_and_status_2(self, name, option, value):
        code, stderr = parse_error(name, [option, value])
        self.assertEqual(code, 2)
        last_line = stderr.strip().splitlines()[-1]
        self.assertStartsWith(last_line, f"{name}.py: error: argument {option}")
        self.assertIn(f"Received: {value!r}", last_line)

    def test_grid_covers_every_numeric_option(self):
        # An option added later without an entry above fails here.
        for name in ("quickstart", "small_batch_renorm", "fine_tuning",
                     "adaptation", "stock_series"):
            typed = {
                action.option_strings[0]: action.type
                for action in _parser(name)._actions
                if action.type not in (None, str, pathlib.Path)
            }
            for option, kind in typed.items():
                self.assertEqual(kind.__module__, "_cli", (name, option))
            covered = {o for n, o, _ in BAD_ARGUMENTS if n == name}
            self.assertEqual(set(typed), covered, name)

    @parameterized.named_parameters(
        ("quickstart", "quickstart", ["--epochs", "0"]),
        ("small_batch_renorm", "small_batch_renorm", ["--steps", "-5"]),
        ("fine_tuning", "fine_tuning", ["--seeds", "0"]),
        ("adaptation", "adaptation", ["--tent-steps", "0"]),
        ("stock_series", "stock_series", ["--seeds", "0"]),
    )
    def test_script_exits_2_before_importing_tensorflow(self, name, argv):
        result = run_example(EXAMPLES / f"{name}.py", *argv, timeout=60)
        self.assertEqual(result.returncode, 2, msg=result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertStartsWith(
            result.stderr.strip().splitlines()[-1], f"{name}.py: error: "
        )
        self.assertEqual(result.stdout, "")

    def test_small_batch_renorm_defaults_follow_quick(self):
        module = load_example("small_batch_renorm")
        self.assertEqual(
            (module.parse_args([]).steps, module.parse_args([]).seeds),
            (1500, 5),
        )
        quick = module.parse_args(["--quick"])
        self.assertEqual((quick.steps, quick.seeds), (300, 2))
        chosen = module.parse_args(["--quick", "--steps", "7", "--seeds", "1"])
        self.assertEqual((chosen.steps, chosen.seeds), (7, 1))


def _parser(name):
    """The example's `ArgumentParser`, caught as `parse_args` builds it."""
    built = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        built.append(self)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        load_example(name).parse_args([])
    return built[0]


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
