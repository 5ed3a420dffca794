"""Tests of keras_bn.schedules.

References: the paper's schedule written out by hand, and `np.interp` for
linear ramps.
"""

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_bn
from keras_bn import schedules
from tests import test_case

TF = keras.backend.backend() == "tensorflow"

PAPER_STEPS = (0, 4999, 5000, 15000, 25000, 40000, 100000)
# Ioffe (2017), section 4.1: rmax 1 -> 3 over steps 5k -> 40k, dmax 0 -> 5
# over steps 5k -> 25k, and r clipped to [1 / rmax, rmax].
PAPER_RMAX = (1.0, 1.0, 1.0, 1.0 + 2.0 * 10 / 35, 1.0 + 2.0 * 20 / 35, 3.0, 3.0)
PAPER_DMAX = (0.0, 0.0, 0.0, 2.5, 5.0, 5.0, 5.0)


class PaperScheduleTest(test_case.LayerTestCase):
    def test_paper_values(self):
        clipping = schedules.paper_renorm_clipping()
        self.assertEqual(sorted(clipping), ["dmax", "rmax", "rmin"])
        for step, rmax, dmax in zip(PAPER_STEPS, PAPER_RMAX, PAPER_DMAX):
            self.assertAllClose(clipping["rmax"](step), rmax, msg=str(step))
            self.assertAllClose(clipping["rmin"](step), 1 / rmax)
            self.assertAllClose(clipping["dmax"](step), dmax, msg=str(step))

    def test_shortened_schedule(self):
        clipping = schedules.paper_renorm_clipping(
            rmax=2.0, dmax=1.0, warmup_steps=10, rmax_steps=30, dmax_steps=20
        )
        steps = np.arange(0, 40)
        rmax = [float(clipping["rmax"](s)) for s in steps]
        dmax = [float(clipping["dmax"](s)) for s in steps]
        self.assertAllClose(rmax, np.interp(steps, [10, 30], [1.0, 2.0]))
        self.assertAllClose(dmax, np.interp(steps, [10, 20], [0.0, 1.0]))

    @parameterized.named_parameters(
        ("rmax", {"rmax": 0.5}, "rmax=0.5"),
        ("dmax", {"dmax": -1.0}, "dmax=-1.0"),
        ("steps", {"warmup_steps": 50, "rmax_steps": 10}, "rmax_steps=10"),
    )
    def test_bad_arguments(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            schedules.paper_renorm_clipping(**kwargs)


class LinearRampTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("up", 1.0, 3.0, 5, 40),
        ("down", 2.0, -1.0, 0, 7),
        ("flat", 4.0, 4.0, 3, 9),
        ("big_steps", 0.0, 5.0, 5000, 25000),
    )
    def test_equals_interpolation(self, initial, final, start, end):
        ramp = schedules.LinearRamp(initial, final, start, end)
        steps = np.unique(
            np.linspace(0, 2 * end + 3, 50).astype(int).tolist()
            + [start, end, start + 1, end - 1]
        )
        expected = np.interp(steps, [start, end], [initial, final])
        got = [float(ramp(int(s))) for s in steps]
        self.assertAllClose(got, expected, atol=1e-5)
        self.assertEqual(
            ramp.value_range, (min(initial, final), max(initial, final))
        )

    def test_jump_when_start_equals_end(self):
        ramp = schedules.LinearRamp(1.0, 2.0, 10, 10)
        self.assertEqual(
            [float(ramp(s)) for s in (0, 9, 10, 11)], [1.0, 1.0, 2.0, 2.0]
        )

    def test_integer_tensor_steps(self):
        ramp = schedules.LinearRamp(1.0, 3.0, 5, 15)
        for dtype in ("int32", "int64"):
            step = keras.ops.convert_to_tensor(10, dtype)
            self.assertAllClose(ramp(step), 2.0)

    @pytest.mark.skipif(
        keras.backend.backend() not in ("tensorflow", "jax"),
        reason="XLA compilation: tf.function or jax.jit",
    )
    def test_jit_compile_equals_eager(self):
        ramp = schedules.LinearRamp(0.5, 3.0, 7, 31)
        if TF:
            import tensorflow as tf

            compiled = tf.function(ramp, jit_compile=True)
        else:
            import jax

            compiled = jax.jit(ramp)
        for step in (0, 7, 8, 19, 31, 1000):
            step = keras.ops.convert_to_tensor(step, "int32")
            self.assertAllClose(compiled(step), ramp(step), atol=0, rtol=0)
            expected = np.interp(int(step), [7, 31], [0.5, 3.0])
            self.assertAllClose(compiled(step), expected, rtol=1e-6)

    def test_schedule_in_training_and_diagnostics(self):
        # The limits the layer reports after `n` training steps are the
        # schedule's at step `n`, on every backend, in `fit` as compiled
        # by that backend.
        layer = keras_bn.BatchRenormalization(
            renorm_clipping={
                "rmax": schedules.LinearRamp(1.0, 3.0, 1, 5),
                "dmax": schedules.LinearRamp(0.0, 5.0, 1, 3),
            },
            name="bn",
        )
        model = keras.Sequential([keras.Input((3,)), layer])
        model.compile(optimizer="sgd", loss="mse")
        x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
        model.fit(x, x, batch_size=4, epochs=1, verbose=0)
        stats = layer.renorm_diagnostics()
        self.assertEqual(int(test_case.to_numpy(stats["step"])), 2)
        self.assertAllClose(stats["rmax"], np.interp(2, [1, 5], [1.0, 3.0]))
        self.assertAllClose(stats["dmax"], np.interp(2, [1, 3], [0.0, 5.0]))
        self.assertAllClose(stats["rmin"], 0.0)
        for key in ("r_clipped", "d_clipped"):
            fraction = float(test_case.to_numpy(stats[key]))
            self.assertBetween(fraction, 0.0, 1.0)

    @parameterized.named_parameters(
        ("end_before_start", {"start_step": 10, "end_step": 5},
         "start_step=10, end_step=5"),
        ("negative_start", {"start_step": -1, "end_step": 5},
         "start_step=-1"),
        ("float_step", {"end_step": 2.5}, "end_step=2.5"),
        ("nan_value", {"final_value": float("nan")}, "final_value=nan"),
        ("string_value", {"initial_value": "1"},
         r"initial_value='1' \(a str\)"),
    )
    def test_bad_arguments(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            schedules.LinearRamp(**kwargs)


class ReciprocalTest(test_case.LayerTestCase):
    def test_values_and_range(self):
        ramp = schedules.LinearRamp(1.0, 4.0, 2, 8)
        inverse = schedules.Reciprocal(ramp)
        for step in (0, 2, 5, 8, 20):
            self.assertAllClose(inverse(step), 1.0 / float(ramp(step)))
        self.assertEqual(inverse.value_range, (0.25, 1.0))

    @parameterized.named_parameters(
        ("not_positive", schedules.LinearRamp(0.0, 1.0, 0, 5),
         "initial_value=0.0"),
        ("not_a_schedule", 2.0, "schedule=2.0"),
    )
    def test_bad_arguments(self, schedule, message):
        with self.assertRaisesRegex(ValueError, message):
            schedules.Reciprocal(schedule)


class SerializationTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("ramp", schedules.LinearRamp(1.0, 3.0, 5, 40)),
        ("reciprocal", schedules.Reciprocal(schedules.LinearRamp(1, 3, 5, 9))),
    )
    def test_round_trip(self, schedule):
        serialized = keras.saving.serialize_keras_object(schedule)
        revived = keras.saving.deserialize_keras_object(serialized)
        self.assertIsInstance(revived, type(schedule))
        self.assertEqual(revived.get_config(), schedule.get_config())
        self.assertEqual(repr(revived), repr(schedule))
        for step in (0, 5, 7, 40):
            self.assertAllClose(revived(step), schedule(step))

    def test_custom_schedule_in_a_layer(self):
        @keras.saving.register_keras_serializable(package="keras_bn_tests")
        class Steps(schedules.Schedule):
            value_range = (1.0, 2.0)

            def __call__(self, step):
                return keras.ops.where(keras.ops.less(step, 2), 1.0, 2.0)

            def get_config(self):
                return {}

        layer = keras_bn.BatchRenormalization(renorm_clipping={"rmax": Steps()})
        revived = keras_bn.BatchRenormalization.from_config(layer.get_config())
        self.assertIsInstance(revived.renorm_clipping["rmax"], Steps)
        self.assertEqual(revived.get_config(), layer.get_config())
