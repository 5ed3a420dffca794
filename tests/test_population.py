"""Tests of keras_bn.recompute_statistics."""

import contextlib
import inspect
import io
import os
import re
import tempfile

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_bn
from tests import test_case

BN_CLASSES = {
    "core": keras.layers.BatchNormalization,
    "keras_bn": keras_bn.BatchNormalization,
}
EPSILON = 1e-3


def make_model(bn_class, dict_inputs=False, **bn_kwargs):
    """Dense -> BN -> ReLU -> Dense -> BN, with non-trivial gamma/beta."""
    inputs = keras.Input((5,), name="features")
    h = keras.layers.Dense(4, name="dense1")(inputs)
    h = bn_class(name="bn1", **bn_kwargs)(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Dense(3, name="dense2")(h)
    outputs = bn_class(name="bn2", **bn_kwargs)(h)
    model = keras.Model(
        {"features": inputs} if dict_inputs else inputs, outputs
    )
    rng = np.random.default_rng(5)
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        layer.gamma.assign(rng.uniform(0.5, 2.0, layer.gamma.shape))
        layer.beta.assign(rng.normal(size=layer.beta.shape))
    return model


def reference_statistics(model, batches):
    """Paper equations in NumPy: the mean over batches of batch moments.

    Each batch runs through the model in training mode, so the second BN
    sees the first BN's batch-normalized outputs.
    """
    w1, b1 = model.get_layer("dense1").get_weights()
    w2, b2 = model.get_layer("dense2").get_weights()
    bn1 = model.get_layer("bn1")
    gamma, beta = np.asarray(bn1.gamma), np.asarray(bn1.beta)
    stats = {"bn1": [], "bn2": []}
    for x in batches:
        z1 = x.astype("float64") @ w1 + b1
        mean, var = z1.mean(axis=0), z1.var(axis=0)
        stats["bn1"].append((mean, var))
        h = np.maximum(gamma * (z1 - mean) / np.sqrt(var + EPSILON) + beta, 0)
        z2 = h @ w2 + b2
        stats["bn2"].append((z2.mean(axis=0), z2.var(axis=0)))
    return {
        name: tuple(np.mean([s[i] for s in values], axis=0) for i in (0, 1))
        for name, values in stats.items()
    }


def tf_data():
    """`tf.data`, which keras_bn takes on every backend when it is there."""
    tf = pytest.importorskip(
        "tensorflow", reason="needs TensorFlow: tf.data is TensorFlow's"
    )
    return tf.data


def torch_loader(x, batch_size):
    torch = pytest.importorskip(
        "torch", reason="needs PyTorch: DataLoader is PyTorch's"
    )
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


# XLA compiles on TensorFlow and JAX; Keras's PyTorch backend has no XLA.
NO_XLA = keras.backend.backend() not in ("tensorflow", "jax")


def data(num=96, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(2.0, 3.0, (num, 5)).astype("float32")


def split(x, batch_size):
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


class Batches(keras.utils.PyDataset):
    def __init__(self, x, batch_size):
        super().__init__()
        self.batches = split(x, batch_size)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index], None


class StepStatistics(keras.layers.Layer):
    """Statistics per time step with per-step update counts.

    A stand-in for the recurrent layers' per-step statistics: all-zero
    frames are padding, and a step's row is updated (cumulatively, so a
    fresh row is written outright) only by batches with a frame there.
    """

    def build(self, input_shape):
        shape = tuple(input_shape[1:])
        self.moving_mean = self.add_weight(
            shape=shape, initializer="zeros", trainable=False, name="mean"
        )
        self.moving_variance = self.add_weight(
            shape=shape, initializer="ones", trainable=False, name="variance"
        )
        self.updates = self.add_weight(
            shape=shape[:1], initializer="zeros", trainable=False,
            name="updates",
        )

    def call(self, x, training=False):
        if training:
            ops = keras.ops
            frames = ops.any(ops.not_equal(x, 0.0), axis=-1, keepdims=True)
            mask = ops.cast(frames, x.dtype)
            count = ops.sum(mask, axis=0)
            mean = ops.sum(x * mask, axis=0) / ops.maximum(count, 1.0)
            variance = ops.sum(
                ops.square(x - mean) * mask, axis=0
            ) / ops.maximum(count, 1.0)
            updated = ops.greater(count, 0.0)
            seen = ops.expand_dims(self.updates, -1)
            decay = seen / (seen + 1.0)
            for weight, value in (
                (self.moving_mean, mean), (self.moving_variance, variance)
            ):
                # `.value`: JAX takes no Keras variable in `where`.
                old = weight.value
                weight.assign(
                    ops.where(updated, old * decay + value * (1.0 - decay), old)
                )
            self.updates.assign_add(ops.cast(updated[:, 0], "float32"))
        return x

    def population_statistics(self):
        return [(self.updates, [self.moving_mean, self.moving_variance])]


class RecomputeStatisticsTest(test_case.LayerTestCase):
    def assert_statistics(self, model, expected):
        for name, (mean, variance) in expected.items():
            layer = model.get_layer(name)
            self.assertAllClose(layer.moving_mean, mean, atol=1e-5)
            self.assertAllClose(
                layer.moving_variance, variance, rtol=1e-5, atol=1e-5
            )

    @parameterized.product(bn=list(BN_CLASSES), jit_compile=[False, True])
    def test_equal_weight_average(self, bn, jit_compile):
        if jit_compile and NO_XLA:
            self.skipTest("jit_compile needs XLA: TensorFlow or JAX")
        model = make_model(BN_CLASSES[bn], momentum=0.9)
        x = data()
        trainable = [np.asarray(w) for w in model.trainable_weights]
        count = keras_bn.recompute_statistics(
            model, x, batch_size=32, jit_compile=jit_compile, verbose=0
        )
        self.assertEqual(count, 3)
        self.assert_statistics(model, reference_statistics(model, split(x, 32)))
        for weight, value in zip(model.trainable_weights, trainable):
            self.assertAllClose(weight, value, atol=0, rtol=0)
        # The mean of equal batches' means is the mean of the whole data.
        z1 = x @ np.asarray(model.get_layer("dense1").kernel) + np.asarray(
            model.get_layer("dense1").bias
        )
        self.assertAllClose(
            model.get_layer("bn1").moving_mean, z1.mean(axis=0), atol=1e-5
        )

    @parameterized.named_parameters(
        ("array", lambda x: x, False),
        (
            "dataset",
            lambda x: tf_data().Dataset.from_tensor_slices(x).batch(32),
            False,
        ),
        (
            "dataset_xy",
            lambda x: tf_data().Dataset.from_tensor_slices((x, x[:, :3])).batch(
                32
            ),
            False,
        ),
        ("generator", lambda x: (b for b in split(x, 32)), False),
        ("list_of_xy", lambda x: [(b, None) for b in split(x, 32)], False),
        ("tensor", keras.ops.convert_to_tensor, False),
        ("torch_data_loader", lambda x: torch_loader(x, 32), False),
        ("dict", lambda x: {"features": x}, True),
        ("py_dataset", lambda x: Batches(x, 32), False),
    )
    def test_data_types(self, make_data, dict_inputs):
        model = make_model(keras_bn.BatchNormalization, dict_inputs)
        x = data()
        count = keras_bn.recompute_statistics(
            model, make_data(x), batch_size=32, verbose=0
        )
        self.assertEqual(count, 3)
        self.assert_statistics(model, reference_statistics(model, split(x, 32)))

    def test_layers_keep_their_momentum_during_the_pass(self):
        seen = []

        class Recording(keras_bn.BatchNormalization):
            def call(self, inputs, training=None, mask=None):
                seen.append(self.momentum)
                return super().call(inputs, training=training, mask=mask)

        model = make_model(Recording, momentum=0.9)
        x = data()
        keras_bn.recompute_statistics(model, x, batch_size=32, verbose=0)
        self.assertNotEmpty(seen)
        self.assertEqual(set(seen), {0.9})
        self.assert_statistics(model, reference_statistics(model, split(x, 32)))

    @parameterized.named_parameters(
        ("momentum", 0.99), ("cumulative", None), ("no_memory", 0.0)
    )
    def test_an_all_masked_batch_is_left_out(self, momentum):
        # Channel 1 has no unmasked element in the second batch: its
        # average is the first and third batches' alone; channel 0 counts
        # all three.
        layer = keras_bn.BatchNormalization(
            momentum=momentum, epsilon=EPSILON
        )
        inputs = keras.Input((4, 2), name="x")
        masks = keras.Input((4, 2), dtype="bool", name="mask")
        model = keras.Model(
            {"x": inputs, "mask": masks}, layer(inputs, mask=masks)
        )
        rng = np.random.default_rng(2)
        x = rng.normal(3.0, 2.0, (24, 4, 2)).astype("float32")
        mask = rng.uniform(size=(24, 4, 2)) < 0.7
        mask[:, 0, 0] = True
        mask[8:16, :, 1] = False
        layer.moving_variance.assign([5.0, 5.0])
        keras_bn.recompute_statistics(
            model, {"x": x, "mask": mask}, batch_size=8
        )
        expected = []
        for c in range(2):
            stats = [
                (b[m].mean(), b[m].var())
                for b, m in zip(
                    np.split(x[..., c].astype("float64"), 3),
                    np.split(mask[..., c], 3),
                )
                if m.any()
            ]
            expected.append(np.mean(stats, axis=0))
        expected = np.array(expected)
        self.assertAllClose(layer.moving_mean, expected[:, 0], rtol=1e-5)
        self.assertAllClose(layer.moving_variance, expected[:, 1], rtol=1e-5)

    def test_large_means_are_recovered_exactly(self):
        # With momentum 0.99 each batch's statistics are read back from
        # `0.01 * statistic`: float32 rounding only, no cancellation.
        layer = keras_bn.BatchNormalization(momentum=0.99)
        model = keras.Sequential([keras.Input((3,)), layer])
        x = np.random.default_rng(4).normal(1e4, 1.0, (96, 3))
        keras_bn.recompute_statistics(model, x.astype("float32"))
        batches = split(x.astype("float32").astype("float64"), 32)
        self.assertAllClose(
            layer.moving_mean,
            np.mean([b.mean(axis=0) for b in batches], axis=0),
            rtol=1e-6, atol=0,
        )
        self.assertAllClose(
            layer.moving_variance,
            np.mean([b.var(axis=0) for b in batches], axis=0),
            rtol=1e-3,
        )

    def test_core_momentum_one_raises(self):
        model = make_model(keras.layers.BatchNormalization, momentum=1.0)
        with self.assertRaisesRegex(ValueError, r"momentum=1\.0.*\[0, 1\)"):
            keras_bn.recompute_statistics(model, data(), verbose=0)

    def test_steps_limits_batches(self):
        model = make_model(keras.layers.BatchNormalization)
        x = data()
        dataset = tf_data().Dataset.from_tensor_slices(x).batch(16).repeat()
        count = keras_bn.recompute_statistics(
            model, dataset, steps=2, verbose=1
        )
        self.assertEqual(count, 2)
        self.assert_statistics(
            model, reference_statistics(model, split(x, 16)[:2])
        )

    def test_ghost_batches(self):
        model = make_model(
            keras_bn.BatchNormalization, virtual_batch_size=8
        )
        x = data(64)
        keras_bn.recompute_statistics(model, x, batch_size=32, verbose=0)
        # Each ghost batch is normalized on its own, so the reference runs
        # on batches of 8; the moving statistics average their moments.
        self.assert_statistics(model, reference_statistics(model, split(x, 8)))

    def test_frozen_and_cumulative_layers(self):
        model = make_model(keras_bn.BatchNormalization, momentum=None)
        model.get_layer("bn1").trainable = False
        configs = [layer.get_config() for layer in model.layers]
        num_weights = len(model.weights)
        x = data()
        keras_bn.recompute_statistics(model, x, batch_size=32, verbose=0)
        self.assert_statistics(model, reference_statistics(model, split(x, 32)))
        self.assertFalse(model.get_layer("bn1").trainable)
        self.assertEqual(
            [layer.get_config() for layer in model.layers], configs
        )
        self.assertLen(model.weights, num_weights)
        self.assertEqual(
            int(model.get_layer("bn2").num_batches_tracked), 0
        )

    def test_other_state_is_restored(self):
        inputs = keras.Input((5,))
        h = keras.layers.Dropout(0.5, seed=1)(inputs)
        h = keras.layers.Dense(4)(h)
        h = keras_bn.BatchRenormalization(momentum=0.5, name="renorm")(h)
        h = keras.layers.Dense(4)(h)
        outputs = keras.layers.BatchNormalization(name="bn")(h)
        model = keras.Model(inputs, outputs)
        recomputed = {
            id(v) for name in ("renorm", "bn")
            for v in model.get_layer(name).non_trainable_weights
            if v.name in ("moving_mean", "moving_variance", "moving_stddev")
        }
        before = {
            id(v): np.asarray(v) for v in model.variables
            if id(v) not in recomputed
        }
        self.assertNotEmpty(before)
        x = data()
        keras_bn.recompute_statistics(model, x, batch_size=32, verbose=0)
        for variable in model.variables:
            if id(variable) in before:
                self.assertAllClose(
                    variable, before[id(variable)], atol=0, rtol=0,
                    msg=variable.path,
                )
        renorm = model.get_layer("renorm")
        self.assertAllClose(
            renorm.moving_variance,
            np.maximum(np.square(renorm.moving_stddev) - renorm.epsilon, 0),
            rtol=1e-5, atol=1e-6,
        )

    def test_batch_renormalization_averages_stddev(self):
        inputs = keras.Input((5,))
        outputs = keras_bn.BatchRenormalization(momentum=0.9, name="bn")(
            keras.layers.Dense(3, name="dense")(inputs)
        )
        model = keras.Model(inputs, outputs)
        x = data()
        keras_bn.recompute_statistics(model, x, batch_size=32, verbose=0)
        dense, bn = model.get_layer("dense"), model.get_layer("bn")
        z = [b @ np.asarray(dense.kernel) + np.asarray(dense.bias)
             for b in split(x, 32)]
        stddev = np.mean([np.sqrt(b.var(axis=0) + bn.epsilon) for b in z], 0)
        self.assertAllClose(bn.moving_stddev, stddev, rtol=1e-5)
        self.assertAllClose(
            bn.moving_mean, np.mean([b.mean(axis=0) for b in z], 0), atol=1e-5
        )

    def test_nested_model_and_save(self):
        inner = make_model(keras.layers.BatchNormalization)
        inputs = keras.Input((5,))
        model = keras.Model(inputs, keras.layers.Dense(2)(inner(inputs)))
        x = data()
        keras_bn.recompute_statistics(model, x, batch_size=32, verbose=0)
        self.assert_statistics(inner, reference_statistics(inner, split(x, 32)))
        expected = model.predict(x, verbose=0)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            loaded = keras.saving.load_model(path)
        self.assertAllClose(loaded.predict(x, verbose=0), expected, atol=0)

    @parameterized.named_parameters(("plain", False), ("synchronized", True))
    @test_case.needs_tensorflow("tf.distribute.MirroredStrategy")
    def test_mirrored_strategy(self, synchronized):
        strategy = test_case.mirrored_strategy()
        with strategy.scope():
            model = make_model(
                keras_bn.BatchNormalization, synchronized=synchronized
            )
        x = data()
        keras_bn.recompute_statistics(model, x, batch_size=32, verbose=0)
        self.assert_statistics(model, reference_statistics(model, split(x, 32)))

    @parameterized.named_parameters(("eager", False), ("jit", True))
    def test_rows_counted_by_the_layer(self, jit_compile):
        if jit_compile and NO_XLA:
            self.skipTest("jit_compile needs XLA: TensorFlow or JAX")
        rng = np.random.default_rng(3)
        x = rng.normal(1.0, 2.0, (24, 5, 3)).astype("float32")
        x[:, 4] = 0.0  # Step 4 is never seen.
        x[8:16, 3] = 0.0  # Step 3 is missing from the second batch...
        x[0:3, 2] = 0.0  # ... and step 2 from three sequences.
        inputs = keras.Input((5, 3))
        steps = StepStatistics(name="steps")
        outputs = keras_bn.BatchNormalization(axis=[1, 2], name="bn")(
            steps(inputs)
        )
        model = keras.Model(inputs, outputs)
        steps.moving_mean.assign(np.full((5, 3), 7.0))
        steps.updates.assign(np.full((5,), 40.0))
        keras_bn.recompute_statistics(
            model, x, batch_size=8, jit_compile=jit_compile, verbose=0
        )
        means, variances = np.zeros((5, 3)), np.zeros((5, 3))
        for t in range(4):
            per_batch = []
            for batch in split(x[:, t], 8):
                frames = batch[np.any(batch != 0.0, axis=-1)]
                if len(frames):
                    per_batch.append((frames.mean(0), frames.var(0)))
            means[t] = np.mean([m for m, _ in per_batch], axis=0)
            variances[t] = np.mean([v for _, v in per_batch], axis=0)
        means[4], variances[4] = 7.0, 1.0
        self.assertAllClose(steps.moving_mean, means, atol=1e-5)
        self.assertAllClose(steps.moving_variance, variances, rtol=1e-5)
        self.assertAllClose(steps.updates, np.full((5,), 40.0), atol=0)
        # The BN after it is recomputed too, over its batches' moments.
        bn = model.get_layer("bn")
        self.assertAllClose(
            bn.moving_mean,
            np.mean([b.mean(axis=0) for b in split(x, 8)], axis=0),
            atol=1e-5,
        )

    def test_interrupted_pass_changes_nothing(self):
        model = make_model(keras_bn.BatchNormalization)
        before = [np.asarray(v) for v in model.variables]

        def batches():
            yield data(32)
            raise RuntimeError("data source failed")

        with pytest.raises(RuntimeError, match="data source failed"):
            keras_bn.recompute_statistics(model, batches(), verbose=0)
        for variable, value in zip(model.variables, before):
            self.assertAllClose(variable, value, atol=0, rtol=0)
        self.assertEqual(model.get_layer("bn1").momentum, 0.99)

    def test_model_without_batch_normalization(self):
        model = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(2)], name="no_bn"
        )
        with pytest.raises(ValueError) as error:
            keras_bn.recompute_statistics(model, data())
        self.assertIn(f"Received: model={model!r}", str(error.value))
        self.assertIn("name=no_bn", str(error.value))

    @parameterized.named_parameters(
        ("array", lambda x: x, False, "(None, 5)", "(32, 7)"),
        (
            "dataset",
            lambda x: tf_data().Dataset.from_tensor_slices(x).batch(16),
            False, "(None, 5)", "(16, 7)",
        ),
        ("dict", lambda x: {"features": x}, True, "(None, 5)", "(32, 7)"),
        ("rank", lambda x: x[:, :, None], False, "(None, 5)", "(32, 7, 1)"),
    )
    def test_wrong_input_shape(self, make_data, dict_inputs, want, got):
        model = make_model(keras_bn.BatchNormalization, dict_inputs)
        before = [np.asarray(v) for v in model.variables]
        x = np.zeros((40, 7), "float32")
        with pytest.raises(ValueError) as error:
            keras_bn.recompute_statistics(model, make_data(x))
        message = str(error.value)
        # One paragraph naming both shapes, the received one as repr.
        self.assertNotIn("\n", message)
        self.assertIn(f"shape {want}", message)
        self.assertIn(f"Received: data (a {type(make_data(x)).__name__})",
                      message)
        self.assertTrue(message.endswith(f"first batch has shape {got}"))
        for variable, value in zip(model.variables, before):
            self.assertAllClose(variable, value, atol=0, rtol=0)

    @parameterized.named_parameters(
        ("array", lambda x: x, {}, "3/3"),
        (
            "dataset",
            lambda x: tf_data().Dataset.from_tensor_slices(x).batch(32),
            {}, "3/3",
        ),
        ("py_dataset", lambda x: Batches(x, 32), {}, "3/3"),
        (
            "steps",
            lambda x: tf_data().Dataset.from_tensor_slices(x).repeat().batch(
                32
            ),
            {"steps": 2}, "2/2",
        ),
        ("steps_beyond_data", lambda x: x, {"steps": 10}, "3/3"),
        ("generator", lambda x: (b for b in split(x, 32)), {}, "3/Unknown"),
    )
    def test_progress_bar(self, make_data, kwargs, shown):
        model = make_model(keras_bn.BatchNormalization)
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            keras_bn.recompute_statistics(
                model, make_data(data()), verbose=1, **kwargs
            )
        # Without the terminal's escape codes and padding.
        text = re.sub(r"\x1b\[[0-9;]*m", "", output.getvalue())
        last = re.split("[\r\n]", text.rstrip("\n"))[-1]
        self.assertRegex(last, f"^ *{re.escape(shown)} ")
        # The bar's line is ended, once.
        self.assertTrue(text.endswith("\n"), repr(text))
        self.assertFalse(text.endswith("\n\n"), repr(text))

    def test_verbose_defaults_agree(self):
        function = inspect.signature(keras_bn.recompute_statistics)
        callback = inspect.signature(keras_bn.callbacks.PreciseBN)
        self.assertEqual(function.parameters["verbose"].default, 0)
        self.assertEqual(callback.parameters["verbose"].default, 0)
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            keras_bn.recompute_statistics(
                make_model(keras_bn.BatchNormalization), data()
            )
        self.assertEqual(output.getvalue(), "")

    @parameterized.named_parameters(
        ("steps_zero", {"steps": 0}, "steps=0"),
        ("steps_float", {"steps": 1.5}, "steps=1.5"),
        ("batch_size", {"batch_size": -4}, "batch_size=-4"),
        ("verbose", {"verbose": 2}, "verbose=2"),
        ("verbose_str", {"verbose": "1"}, "verbose='1' (a str)"),
        ("steps_str", {"steps": "3"}, "steps='3' (a str)"),
        ("jit_compile", {"jit_compile": "yes"}, "jit_compile='yes' (a str)"),
    )
    def test_bad_arguments(self, kwargs, message):
        model = make_model(keras_bn.BatchNormalization)
        with pytest.raises(ValueError) as error:
            keras_bn.recompute_statistics(model, data(), **kwargs)
        self.assertIn(f"Received: {message}", str(error.value))

    @pytest.mark.skipif(not NO_XLA, reason="the backend compiles with XLA")
    def test_jit_compile_without_xla(self):
        model = make_model(keras_bn.BatchNormalization)
        before = [test_case.to_numpy(v) for v in model.variables]
        with pytest.raises(ValueError) as error:
            keras_bn.recompute_statistics(model, data(), jit_compile=True)
        message = str(error.value)
        self.assertIn(keras.backend.backend(), message)
        self.assertIn("Use `jit_compile=False`", message)
        self.assertTrue(message.endswith("Received: jit_compile=True"))
        for variable, value in zip(model.variables, before):
            self.assertAllClose(variable, value, atol=0, rtol=0)

    def test_empty_data(self):
        model = make_model(keras_bn.BatchNormalization)
        before = np.asarray(model.get_layer("bn1").moving_variance)
        with pytest.raises(ValueError, match="Received: data=\\[\\]"):
            keras_bn.recompute_statistics(model, [], verbose=0)
        self.assertAllClose(
            model.get_layer("bn1").moving_variance, before, atol=0
        )
        self.assertEqual(model.get_layer("bn1").momentum, 0.99)

    @parameterized.named_parameters(
        (
            "unbuilt",
            lambda: keras.Sequential(
                [keras_bn.BatchNormalization()], name="seq"
            ),
        ),
        ("not_a_model", lambda: "model.keras"),
    )
    def test_bad_model(self, make):
        model = make()
        with pytest.raises(ValueError) as error:
            keras_bn.recompute_statistics(model, data(), verbose=0)
        self.assertIn(f"Received: model={model!r}", str(error.value))


def two_input_model():
    """Two inputs added, then BN: its statistics are those of `a + b`."""
    a = keras.Input((5,), name="a")
    b = keras.Input((5,), name="b")
    h = keras_bn.BatchNormalization(name="bn")(keras.layers.Add()([a, b]))
    return keras.Model([a, b], h)


def numpy_statistics(x, batch_size):
    """The equal-weight mean over batches of `x`'s batch moments."""
    batches = split(x.astype("float64"), batch_size)
    return (
        np.mean([b.mean(axis=0) for b in batches], axis=0),
        np.mean([b.var(axis=0) for b in batches], axis=0),
    )


def torch_xy_loader(x, y, batch_size):
    torch = pytest.importorskip(
        "torch", reason="needs PyTorch: DataLoader is PyTorch's"
    )
    dataset = torch.utils.data.TensorDataset(
        torch.from_numpy(x), torch.from_numpy(y)
    )
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


class DataAsFitTakesItTest(test_case.LayerTestCase):
    """`data` is read as `model.fit` reads it, and only `x` is used."""

    @parameterized.named_parameters(
        ("array", lambda x, y, w: x),
        ("x_y", lambda x, y, w: (x, y)),
        ("x_y_sample_weight", lambda x, y, w: (x, y, w)),
        ("x_only_tuple", lambda x, y, w: (x,)),
        ("x_none", lambda x, y, w: (x, None)),
        ("generator_x_y", lambda x, y, w: (
            (x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)
        )),
        ("py_dataset_x_y_w", lambda x, y, w: test_case.XYBatches(
            x, y, 32, sample_weight=True)),
        ("tf_data_x_y_w", lambda x, y, w: tf_data().Dataset.from_tensor_slices(
            (x, y, w)).batch(32)),
    )
    def test_single_input(self, make_data):
        model = make_model(keras_bn.BatchNormalization)
        x = data()
        y = np.arange(len(x), dtype="float32")[:, None]
        w = np.ones(len(x), "float32")
        count = keras_bn.recompute_statistics(
            model, make_data(x, y, w), batch_size=32
        )
        self.assertEqual(count, 3)
        self.assert_statistics(model, reference_statistics(model, split(x, 32)))

    @pytest.mark.skipif(
        keras.backend.backend() != "torch",
        reason="a DataLoader's tensors are PyTorch's: tested on the torch "
        "backend (other backends take them too, through NumPy)",
    )
    def test_torch_data_loader_of_x_y(self):
        model = make_model(keras_bn.BatchNormalization)
        x = data()
        y = np.zeros((len(x), 1), "float32")
        count = keras_bn.recompute_statistics(
            model, torch_xy_loader(x, y, 32)
        )
        self.assertEqual(count, 3)
        self.assert_statistics(model, reference_statistics(model, split(x, 32)))

    @parameterized.named_parameters(
        ("list", lambda a, b, y: [a, b]),
        ("list_y", lambda a, b, y: ([a, b], y)),
        ("tuple_y", lambda a, b, y: ((a, b), y)),
        ("dict_y", lambda a, b, y: ({"a": a, "b": b}, y)),
        ("list_of_batches", lambda a, b, y: [
            ([a[i : i + 32], b[i : i + 32]], y[i : i + 32])
            for i in range(0, len(a), 32)
        ]),
    )
    def test_two_inputs(self, make_data):
        model = two_input_model()
        a, b = data(seed=1), data(seed=2)
        y = np.zeros((len(a), 1), "float32")
        count = keras_bn.recompute_statistics(
            model, make_data(a, b, y), batch_size=32
        )
        self.assertEqual(count, 3)
        mean, variance = numpy_statistics(a + b, 32)
        layer = model.get_layer("bn")
        self.assertAllClose(layer.moving_mean, mean, atol=1e-5)
        self.assertAllClose(layer.moving_variance, variance, rtol=1e-5)

    @parameterized.named_parameters(
        ("tuple_as_inputs", lambda m: two_input_model(),
         lambda a, b: (a, b), "Pass the inputs as a list"),
        ("four_arrays", lambda m: m, lambda a, b: (a, a, a, a),
         "must be `(x,)`, `(x, y)` or `(x, y, sample_weight)`"),
        ("rows_differ", lambda m: m, lambda a, b: (a, b[:10]),
         "as many rows"),
        ("list_length", lambda m: two_input_model(), lambda a, b: [a, b, a],
         "one array per input of the model, which has 2 inputs"),
    )
    def test_ambiguous_or_inconsistent_data(self, make_model_for, make_data,
                                            message):
        model = make_model_for(make_model(keras_bn.BatchNormalization))
        before = [test_case.to_numpy(v) for v in model.variables]
        a, b = data(seed=1), data(seed=2)
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            keras_bn.recompute_statistics(model, make_data(a, b))
        self.assertIn("Received: data=(", str(error.value).replace(
            "data=[", "data=("))
        self.assertIn("<array of shape (96, 5)>", str(error.value))
        for variable, value in zip(model.variables, before):
            self.assertAllClose(variable, value, atol=0, rtol=0)

    def test_report_is_logged(self):
        inputs = keras.Input((5,))
        h = keras_bn.BatchNormalization(name="live")(inputs)
        outputs = keras_bn.FrozenBatchNormalization(name="fixed")(h)
        model = keras.Model(inputs, outputs)
        with self.assertLogs("keras_bn", level="INFO") as logs:
            keras_bn.recompute_statistics(model, data(), batch_size=32)
        self.assertEqual(
            logs.output,
            [
                "INFO:keras_bn.population:live: statistics recomputed over "
                "3 batch(es)",
                "INFO:keras_bn.population:fixed: FrozenBatchNormalization, "
                "left as it is: its statistics are fixed",
            ],
        )

    def assert_statistics(self, model, expected):
        RecomputeStatisticsTest.assert_statistics(self, model, expected)
