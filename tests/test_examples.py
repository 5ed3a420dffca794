"""Tests of the runnable examples' command lines and the quickstart run."""

import argparse
import contextlib
import importlib.util
import io
import math
import os
import pathlib
import re
import subprocess
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


EXAMPLE_NAMES = (
    "quickstart", "small_batch_renorm", "fine_tuning", "adaptation",
    "stock_series", "text_generation",
)
# An existing file, which no --out may be.
A_FILE = str(EXAMPLES / "_cli.py")
MISSING = str(EXAMPLES / "no_such_file.txt")

# One bad value for every option of every example that takes a value:
# each is refused whatever else is given, `--quick` included.
BAD_ARGUMENTS = (
    ("quickstart", "--epochs", "0"),
    ("quickstart", "--learning-rate", "nan"),
    ("quickstart", "--batch-size", "-32"),
    ("quickstart", "--seed", "-3"),
    ("quickstart", "--out", A_FILE),
    ("small_batch_renorm", "--steps", "-5"),
    ("small_batch_renorm", "--seeds", "0"),
    ("small_batch_renorm", "--seed", "-1"),
    ("small_batch_renorm", "--out", A_FILE),
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
    ("fine_tuning", "--out", A_FILE),
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
    ("adaptation", "--out", A_FILE),
    ("stock_series", "--task", "prices"),
    ("stock_series", "--dataset", "dow"),
    ("stock_series", "--csv", MISSING),
    ("stock_series", "--window", "0"),
    ("stock_series", "--units", "-16"),
    ("stock_series", "--epochs", "0"),
    ("stock_series", "--batch-size", "0"),
    ("stock_series", "--learning-rate", "0"),
    ("stock_series", "--learning-rates", "inf"),
    ("stock_series", "--seeds", "0"),
    ("stock_series", "--seed", "2147483648"),
    ("stock_series", "--out", A_FILE),
    ("text_generation", "--text-file", MISSING),
    ("text_generation", "--units", "-1"),
    ("text_generation", "--epochs", "0"),
    ("text_generation", "--batch-size", "1.5"),
    ("text_generation", "--length", "0"),
    ("text_generation", "--learning-rate", "inf"),
    ("text_generation", "--model", MISSING),
    ("text_generation", "--vocab", MISSING),
    ("text_generation", "--prompt", ""),
    ("text_generation", "--temperature", "0"),
    ("text_generation", "--seed", "-1"),
    ("text_generation", "--out", A_FILE),
)

# Values that are fine alone but not together.
BAD_COMBINATIONS = (
    ("adaptation", ["--train-size", "1700", "--labelled", "100"],
     "--train-size", 1700),
    ("text_generation", ["--generate"], "--model", None),
)


class CliTypesTest(parameterized.TestCase):
    """The argument types every example shares, from `examples/_cli.py`."""

    @parameterized.named_parameters(
        ("positive_int", "positive_int", "7", 7),
        ("non_negative_int", "non_negative_int", "0", 0),
        ("rate", "rate", "3e-3", 3e-3),
        ("seed", "seed", "2147483647", 2147483647),
        ("file", "existing_file", __file__, __file__),
        ("text", "non_empty", "The ", "The "),
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
        ("seed_large", "seed", "2147483648",
         "an integer from 0 to 2147483647"),
        ("folder_file", "folder", __file__,
         "a folder (an existing file is not one)"),
        ("file_missing", "existing_file", "missing.txt", "an existing file"),
        ("text_empty", "non_empty", "", "a non-empty text"),
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
        (f"{name}_{option[2:]}{suffix}", name, option, value, extra)
        for name, option, value in BAD_ARGUMENTS
        for suffix, extra in (("", []), ("_quick", ["--quick"]))
    )
    def test_one_line_error_and_status_2(self, name, option, value, extra):
        code, stderr = parse_error(name, [*extra, option, value])
        self.assertEqual(code, 2)
        last_line = stderr.strip().splitlines()[-1]
        self.assertStartsWith(
            last_line, f"{name}.py: error: argument {option}: must be "
        )
        self.assertEndsWith(last_line, f". Received: {value!r}")

    @parameterized.named_parameters(
        (f"{name}_{option[2:]}", name, argv, option, value)
        for name, argv, option, value in BAD_COMBINATIONS
    )
    def test_combinations_are_worded_the_same(self, name, argv, option,
                                              value):
        code, stderr = parse_error(name, argv)
        self.assertEqual(code, 2)
        last_line = stderr.strip().splitlines()[-1]
        self.assertStartsWith(
            last_line, f"{name}.py: error: argument {option}: must be "
        )
        self.assertEndsWith(last_line, f". Received: {value!r}")

    @parameterized.named_parameters((name, name) for name in EXAMPLE_NAMES)
    def test_grid_covers_every_option(self, name):
        # An option added later without an entry above fails here.
        parser = _parser(name)
        valued = {
            action.option_strings[0]: action.type
            for action in parser._actions
            if action.option_strings and action.nargs != 0
        }
        for option, kind in valued.items():
            self.assertEqual(
                getattr(kind, "__module__", None), "_cli", (name, option)
            )
        covered = {o for n, o, _ in BAD_ARGUMENTS if n == name}
        self.assertEqual(set(valued), covered, name)
        flags = {
            action.option_strings[-1] for action in parser._actions
            if action.nargs == 0
        }
        self.assertContainsSubset({"--help", "--quick", "--quiet"}, flags)

    @parameterized.named_parameters((name, name) for name in EXAMPLE_NAMES)
    def test_explicit_values_win_over_quick(self, name):
        module = load_example(name)
        ordinary = vars(module.parse_args([]))
        quick = vars(module.parse_args(["--quick"]))
        self.assertTrue(module.QUICK)
        for dest, value in module.QUICK.items():
            self.assertEqual(quick[dest], value, dest)
            self.assertNotEqual(ordinary[dest], value, dest)
        # --quick changes nothing else.
        self.assertEqual(
            {k: v for k, v in quick.items() if k not in module.QUICK},
            {**{k: v for k, v in ordinary.items() if k not in module.QUICK},
             "quick": True},
        )
        for dest, value in module.QUICK.items():
            option = "--" + dest.replace("_", "-")
            if isinstance(value, list):
                chosen, given = [0.5], ["0.5"]
            else:
                chosen = max(value, ordinary[dest]) + 1
                given = [str(chosen)]
            for argv in ([option, *given, "--quick"],
                         ["--quick", option, *given]):
                args = module.parse_args(argv)
                self.assertEqual(getattr(args, dest), chosen, argv)
                # The other options still take --quick's defaults.
                for other, other_value in module.QUICK.items():
                    if other != dest:
                        self.assertEqual(getattr(args, other), other_value)

    def test_every_example_quiets_tensorflow_before_importing_it(self):
        # Importing an example must set the C++ log level and not import
        # TensorFlow, in a process where the level was not set.
        code = (
            "import os, sys\n"
            f"sys.path.insert(0, {str(EXAMPLES)!r})\n"
            f"for name in {EXAMPLE_NAMES!r}:\n"
            "    os.environ.pop('TF_CPP_MIN_LOG_LEVEL', None)\n"
            "    __import__(name)\n"
            "    assert os.environ.get('TF_CPP_MIN_LOG_LEVEL') == '3', name\n"
            "    assert 'tensorflow' not in sys.modules, name\n"
            "print('ok')\n"
        )
        env = {k: v for k, v in os.environ.items()
               if k != "TF_CPP_MIN_LOG_LEVEL"}
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True,
            text=True, timeout=120,
        )
        self.assertEqual(result.stdout.strip(), "ok", result.stderr)

    def test_keras_and_tensorflow_import_without_cpp_log(self):
        # TensorFlow 2.19+ logs at start-up whatever TF_CPP_MIN_LOG_LEVEL
        # says; `_cli.import_keras` hides it, and only it.
        code = (
            "import sys\n"
            f"sys.path.insert(0, {str(EXAMPLES)!r})\n"
            "import _cli\n"
            "keras = _cli.import_keras()\n"
            "import numpy as np\n"
            "model = keras.Sequential([keras.Input((3,)), "
            "keras.layers.Dense(2)])\n"
            "model.compile('sgd', 'mse')\n"
            "model.fit(np.ones((8, 3)), np.ones((8, 2)), verbose=0)\n"
            "print('after', file=sys.stderr)\n"
        )
        env = {k: v for k, v in os.environ.items()
               if k != "TF_CPP_MIN_LOG_LEVEL"}
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True,
            text=True, timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, "after\n")

    @parameterized.named_parameters(
        ("quickstart", "quickstart", ["--epochs", "0"]),
        ("small_batch_renorm", "small_batch_renorm", ["--steps", "-5"]),
        ("fine_tuning", "fine_tuning", ["--seeds", "0"]),
        ("adaptation", "adaptation", ["--tent-steps", "0"]),
        ("stock_series", "stock_series", ["--seeds", "0"]),
        ("text_generation", "text_generation",
         ["--quick", "--units", "-1"]),
    )
    def test_script_exits_2_before_importing_tensorflow(self, name, argv):
        result = run_example(EXAMPLES / f"{name}.py", *argv, timeout=60)
        self.assertEqual(result.returncode, 2, msg=result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertStartsWith(
            result.stderr.strip().splitlines()[-1], f"{name}.py: error: "
        )
        self.assertEqual(result.stdout, "")

    @parameterized.named_parameters((name, name) for name in EXAMPLE_NAMES)
    def test_help_lists_the_shared_options(self, name):
        result = run_example(EXAMPLES / f"{name}.py", "--help", timeout=60)
        self.assertEqual(result.returncode, 0, msg=result.stderr)
        for option in ("--quick", "--quiet", "--seed", "--out"):
            self.assertRegex(
                result.stdout, rf"(?m)^ +{option}( [A-Z_]+)?\s+[a-z]"
            )
        self.assertNotIn("(default: None)", result.stdout)
        self.assertNotIn("(default: False)", result.stdout)


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

        self.assertIn("numbers mean nothing", result.stdout)
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
