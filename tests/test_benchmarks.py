"""Tests of benchmarks/run.py: it runs and reports sound numbers.

Speed is never asserted: the numbers depend on the machine and its load.
"""

import json
import math
import pathlib
import tempfile

import pytest
from absl.testing import parameterized

from tests import test_case

REPO = pathlib.Path(__file__).resolve().parent.parent
RUN = REPO / "benchmarks" / "run.py"
PROFILE = REPO / "benchmarks" / "profile_step.py"
JAX_STEP = REPO / "benchmarks" / "jax_step.py"
FIRST_STEP = REPO / "benchmarks" / "first_step.py"
MODELS = REPO / "benchmarks" / "models.py"
BACKENDS = REPO / "benchmarks" / "backends.py"
XLA_KERNELS = REPO / "benchmarks" / "xla_kernels.py"
PATHS = REPO / "benchmarks" / "paths.py"
PERMUTED_DIGITS = REPO / "benchmarks" / "permuted_digits.py"
RECURRENT_STEP = REPO / "benchmarks" / "recurrent_step.py"
POLICIES = ("float32", "mixed_float16")
# The byte model documented in benchmarks/README.md, in passes over the
# activation tensor.
PASSES = {"train": 8, "inference": 2}
ITEMSIZE = {"float32": 4, "mixed_float16": 2}


def run_benchmark(*args, timeout):
    return test_case.run_script(RUN, *args, timeout=timeout)


def positive_finite(value):
    return (
        isinstance(value, float) and math.isfinite(value) and value > 0.0
    )


class BenchmarkTest(parameterized.TestCase):
    def run_to_report(self, *args, timeout):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        out = pathlib.Path(tmp.name, "bench")
        result = run_benchmark(*args, "--out", str(out), timeout=timeout)
        self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
        report = json.loads((out / "results.json").read_text())
        self.assertEqual((out / "results.md").read_text(), result.stdout)
        return report, result.stdout

    def assertSoundTimings(self, row, repeats):
        for implementation in ("core", "keras_bn"):
            timing = row[implementation]
            msg = f"{row['name']} ({implementation}): {timing}"
            self.assertLen(timing["times_s"], repeats, msg)
            for value in timing["times_s"]:
                self.assertTrue(positive_finite(value), msg)
            for key in ("median_s", "min_s", "first_call_s"):
                self.assertTrue(positive_finite(timing[key]), msg)
            self.assertLessEqual(timing["min_s"], timing["median_s"], msg)
        self.assertTrue(positive_finite(row["ratio"]), row["name"])

    @pytest.mark.slow
    def test_quick_run_reports_every_row(self):
        report, table = self.run_to_report("--quick", timeout=600)
        self.assertTrue(report["quick"])
        self.assertEqual(report["repeats"], 2)
        self.assertTrue(positive_finite(report["copy_bandwidth_bytes_per_s"]))

        rows = report["results"]
        self.assertNotEmpty(rows)
        for row in rows:
            self.assertSoundTimings(row, repeats=2)
            expected = row["core"]["median_s"] / row["keras_bn"]["median_s"]
            self.assertAlmostEqual(row["ratio"], expected)
            self.assertIn(f"| {row['pair']} | {tuple(row['shape'])} ", table)

        # The BatchNormalization grids are always there, whatever other
        # layers exist yet.
        grid = {
            (policy, jit, step)
            for policy in POLICIES
            for jit in (False, True)
            for step in PASSES
        }
        for pair in ("BatchNormalization", "BatchNormalization(fused=False)"):
            self.assertEqual(
                {
                    (r["policy"], r["jit_compile"], r["step"])
                    for r in rows
                    if r["pair"] == pair
                },
                grid,
            )

        for row in rows:
            if row["pair"] not in ("LSTM", "GRU"):
                self.assertEqual(
                    row["floor_bytes"],
                    PASSES[row["step"]]
                    * math.prod(row["shape"])
                    * ITEMSIZE[row["policy"]],
                )
                for implementation in ("core", "keras_bn"):
                    fraction = row[implementation]["floor_fraction"]
                    self.assertTrue(positive_finite(fraction), row["name"])
                    self.assertAlmostEqual(
                        fraction,
                        row["floor_bytes"]
                        / row[implementation]["median_s"]
                        / report["copy_bandwidth_bytes_per_s"],
                    )
            else:
                self.assertIsNone(row["floor_bytes"], row["name"])

    @pytest.mark.slow
    def test_only_filters_rows(self):
        pattern = "^BatchNormalization .* float32 graph inference$"
        report, _ = self.run_to_report(
            "--quick", "--only", pattern, "--repeats", "3", "--warmup", "0",
            timeout=300,
        )
        self.assertEqual(
            [r["name"] for r in report["results"]],
            ["BatchNormalization (4, 4, 4, 8) float32 graph inference"],
        )
        self.assertSoundTimings(report["results"][0], repeats=3)

    @parameterized.named_parameters(
        ("zero_repeats", ["--repeats", "0"], "--repeats", "Received: 0"),
        ("negative_warmup", ["--warmup", "-1"], "--warmup", "Received: -1"),
        ("bad_regex", ["--only", "(xla"], "--only", "Received: (xla"),
    )
    def test_bad_input_is_a_one_line_error(self, args, option, received):
        result = run_benchmark(*args, timeout=60)
        self.assertEqual(result.returncode, 2, msg=result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        last_line = result.stderr.strip().splitlines()[-1]
        self.assertStartsWith(last_line, "run.py: error: ")
        self.assertIn(option, last_line)
        self.assertIn(received, last_line)

    @pytest.mark.slow
    def test_only_matching_nothing_is_an_error(self):
        result = run_benchmark("--quick", "--only", "NoSuchLayer", timeout=300)
        self.assertEqual(result.returncode, 2, msg=result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("Received: ['NoSuchLayer']", result.stderr)


def table_rows(stdout):
    """The body rows of the Markdown table in `stdout`, as cell lists."""
    return [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| ---")
    ][1:]


class ScriptTablesTest(parameterized.TestCase):
    """profile_step.py and jax_step.py: a table of positive timings."""

    def run_to_rows(self, script):
        result = test_case.run_script(
            script, "--shape", "4,2,2,3", "--repeats", "2", timeout=300
        )
        self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
        self.assertIn("(4, 2, 2, 3)", result.stdout)
        rows = table_rows(result.stdout)
        for name, ms, *_ in rows:
            self.assertTrue(positive_finite(float(ms)), name)
        return result.stdout, rows

    @pytest.mark.slow
    def test_profile_reports_every_piece(self):
        _, rows = self.run_to_rows(PROFILE)
        names = [name for name, _, _ in rows]
        for expected in (
            "fused kernel forward", "fused kernel backward",
            "step: keras.layers.BatchNormalization",
            "step: keras_bn.BatchNormalization",
            "step: keras_bn.BatchRenormalization",
        ):
            self.assertIn(expected, names)
        for name, _, units in rows:
            self.assertTrue(positive_finite(float(units)), name)

    @pytest.mark.slow
    def test_jax_step_reports_every_layer(self):
        stdout, rows = self.run_to_rows(JAX_STEP)
        self.assertEqual(
            [name for name, _ in rows],
            [
                "keras.layers.BatchNormalization",
                "keras_bn.BatchNormalization",
                "keras.layers.BatchNormalization(renorm=True)",
                "keras_bn.BatchRenormalization",
            ],
        )
        self.assertIn("JAX", stdout)

    @pytest.mark.slow
    def test_backends_reports_torch_and_jax(self):
        result = test_case.run_script(BACKENDS, "--quick", timeout=600)
        self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
        self.assertIn("avx512_vnni", result.stdout)
        rows = table_rows(result.stdout)
        self.assertEqual(
            [(row[0], row[1], row[3]) for row in rows],
            [
                ("torch", "BatchNormalization", "torch"),
                ("torch", "BatchRenormalization", "torch"),
                ("jax", "BatchNormalization", "ops"),
                ("jax", "BatchRenormalization", "ops"),
            ],
        )
        for row in rows:
            core_ms, ours_ms, ratio, core_mib, ours_mib, memory = map(
                float, row[4:]
            )
            for value in (core_ms, ours_ms, ratio, memory):
                self.assertTrue(positive_finite(value), row)
            if row[0] == "torch":
                # Allocator accounting, not timing: the same on every
                # machine. PyTorch's kernel keeps fewer tensors than core
                # Keras's chain of ops.
                self.assertLess(memory, 1.0, row)

    @parameterized.named_parameters(
        ("conv", ["--batch-size", "4", "--image-size", "16"],
         ["first step", "later step"]),
        ("gru", ["--model", "gru"], ["first epoch", "later epoch"]),
    )
    @pytest.mark.slow
    def test_first_step_reports_both_models(self, options, labels):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        result = test_case.run_script(
            FIRST_STEP, "--repeats", "1", *options, "--out", tmp.name,
            timeout=300,
        )
        self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
        rows = table_rows(result.stdout)
        self.assertEqual([row[0] for row in rows], labels)
        report = json.loads(pathlib.Path(tmp.name, "results.json").read_text())
        for (name, core, ours, ratio), key in zip(rows, ("first", "later")):
            medians = report["medians"]
            self.assertAlmostEqual(
                float(ratio),
                medians["keras_bn"][key] / medians["core"][key], places=2,
            )
            for value in (core, ours):
                self.assertTrue(positive_finite(float(value)), name)

    @pytest.mark.slow
    def test_recurrent_step_reports_the_pair(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        result = test_case.run_script(
            RECURRENT_STEP, "--model", "gru", "--units", "4",
            "--batch-size", "4", "--steps", "3", "--features", "2",
            "--repeats", "3", "--warmup", "1", "--out", tmp.name,
            timeout=300,
        )
        self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
        [row] = table_rows(result.stdout)
        report = json.loads(pathlib.Path(tmp.name, "results.json").read_text())
        for name in ("core", "keras_bn"):
            self.assertLen(report["times_s"][name], 3)
            for value in report["times_s"][name]:
                self.assertTrue(positive_finite(value), name)
        medians = report["medians_s"]
        core, ours, ratio = (float(v) for v in row)
        self.assertAlmostEqual(core, medians["core"] * 1e3, delta=core / 100)
        self.assertAlmostEqual(ours, medians["keras_bn"] * 1e3,
                               delta=ours / 100)
        self.assertAlmostEqual(
            ratio, medians["keras_bn"] / medians["core"], places=2
        )

    @pytest.mark.slow
    def test_models_reports_every_measure(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        result = test_case.run_script(
            MODELS, "--models", "MobileNetV2", "--repeats", "1", "--steps",
            "1", "--batch-size", "2", "--image-size", "32", "--out",
            tmp.name, timeout=600,
        )
        self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
        rows = table_rows(result.stdout)
        self.assertEqual([row[1] for row in rows], [
            "first train_on_batch s", "training step s",
            "peak memory growth MB",
        ])
        report = json.loads(pathlib.Path(tmp.name, "results.json").read_text())
        medians = report["medians"]["MobileNetV2"]
        for (_, name, core, ours, ratio), key in zip(
            rows, ("first", "step")
        ):
            for value in (core, ours):
                self.assertTrue(positive_finite(float(value)), name)
            self.assertAlmostEqual(
                float(ratio),
                medians["keras_bn"][key] / medians["core"][key], places=2,
            )
        # A tiny model's training may fit in memory the process had.
        self.assertGreaterEqual(float(rows[2][2]), 0.0)

    @pytest.mark.slow
    def test_paths_times_every_path_that_serves(self):
        result = test_case.run_script(
            PATHS, "--shapes", "64,3;16,4,8", "--repeats", "2", timeout=300
        )
        self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
        rows = table_rows(result.stdout)
        self.assertEqual([row[0] for row in rows], ["64 x 3", "16 x 4 x 8"])
        for row in rows:
            # ops, fused, xla, wide, torch; the chosen path and its win.
            timed = [float(cell) for cell in row[1:6] if cell != "–"]
            self.assertGreaterEqual(len(timed), 2, row)
            self.assertTrue(all(positive_finite(t) for t in timed), row)
            self.assertIn(row[6], ("ops", "fused", "xla", "wide"))
            self.assertTrue(positive_finite(float(row[7])), row)

    @pytest.mark.slow
    def test_xla_kernels_reports_both_layers(self):
        result = test_case.run_script(
            XLA_KERNELS, "--shape", "4,3,2", "--units", "3", "--calls", "1",
            "--top", "5", timeout=300,
        )
        self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
        for name in ("keras.layers.LSTM", "keras_bn.BNLSTM"):
            self.assertRegex(result.stdout, name + r": [0-9.]+ ms per call")
        rows = [
            row for row in (
                [cell.strip() for cell in line.split("|")[1:-1]]
                for line in result.stdout.splitlines()
                if line.startswith("| ") and not line.startswith("| ---")
            )
            if row[0] != "kernel"
        ]
        # Five kernels per layer, each named, each with a positive time.
        self.assertLen(rows, 10)
        for name, us in rows:
            self.assertRegex(name, r"^`[\w.\-]+`$")
            self.assertTrue(positive_finite(float(us)), name)

    @parameterized.named_parameters(
        ("first_step_repeats", FIRST_STEP, ["--repeats", "0"],
         "Received: '0'"),
        ("first_step_model", FIRST_STEP, ["--model", "rnn"],
         "invalid choice: 'rnn'"),
        ("bad_shape", PROFILE, ["--shape", "4,x"], "Received: 4,x"),
        ("one_axis", PROFILE, ["--shape", "8"], "Received: (8,)"),
        ("zero_repeats", PROFILE, ["--repeats", "0"], "Received: 0"),
        ("jax_zero_size", JAX_STEP, ["--shape", "0,3"], "Received: (0, 3)"),
        ("unknown_backend", BACKENDS, ["--backends", "tf"], "Received: tf"),
        ("zero_threads", BACKENDS, ["--threads", "0"], "Received: '0'"),
        ("zero_calls", XLA_KERNELS, ["--calls", "0"], "Received: '0'"),
        ("two_sizes", XLA_KERNELS, ["--shape", "4,3"], "Received: '4,3'"),
        ("unknown_model", MODELS, ["--models", "ResNet"],
         "Received: 'ResNet'"),
        ("small_image", MODELS, ["--image-size", "16"], "Received: 16"),
        ("paths_shapes", PATHS, ["--shapes", "4,x"], "Received: '4,x'"),
        ("paths_repeats", PATHS, ["--repeats", "0"], "Received: '0'"),
        ("unknown_recurrent_model", PERMUTED_DIGITS, ["--models", "rnn"],
         "Received: 'rnn'"),
        ("negative_early_rows", PERMUTED_DIGITS, ["--early-rows", "-1"],
         "Received: -1"),
        ("zero_epochs", PERMUTED_DIGITS, ["--epochs", "0"], "Received: '0'"),
        ("zero_units", RECURRENT_STEP, ["--units", "0"], "Received: '0'"),
        ("recurrent_model", RECURRENT_STEP, ["--model", "rnn"],
         "invalid choice: 'rnn'"),
    )
    def test_bad_input_is_a_one_line_error(self, script, args, received):
        result = test_case.run_script(script, *args, timeout=60)
        self.assertEqual(result.returncode, 2, msg=result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        last_line = result.stderr.strip().splitlines()[-1]
        self.assertStartsWith(last_line, f"{script.name}: error: ")
        self.assertIn(args[0], last_line)
        self.assertIn(received, last_line)

    @pytest.mark.slow
    def test_permuted_digits_reports_every_model(self):
        result = test_case.run_script(
            PERMUTED_DIGITS, "--quick",
            "--models", "lstm,bnlstm", "--early-rows", "2", timeout=300,
        )
        self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
        rows = [
            [cell.strip() for cell in line.split("|")[1:-1]]
            for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")
        ][1:]
        self.assertEqual([row[0] for row in rows], ["lstm", "bnlstm"])
        # Accuracies in [0, 1]; the LSTM has no statistics to recompute.
        self.assertEqual(rows[0][3:5], ["–", "–"])
        for row in rows:
            for value in row[2:5]:
                if value != "–":
                    self.assertBetween(float(value), 0.0, 1.0)
