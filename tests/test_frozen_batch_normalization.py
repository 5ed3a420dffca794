"""Tests of keras_bn.FrozenBatchNormalization."""

import re
import warnings

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_bn
from tests import test_case
from tests import test_conversion

BACKEND = keras.backend.backend()


def _rng(seed=0):
    return np.random.default_rng(seed)


def _randomize(layer, rng):
    """Random statistics, scale and offset, all away from their initial
    values."""
    values = {
        "gamma": rng.uniform(0.5, 2.0, layer.moving_mean.shape),
        "beta": rng.normal(0.0, 1.0, layer.moving_mean.shape),
        "moving_mean": rng.normal(0.0, 2.0, layer.moving_mean.shape),
        "moving_variance": rng.uniform(0.3, 3.0, layer.moving_mean.shape),
    }
    for weight in layer.weights:
        weight.assign(values[weight.name].astype("float32"))


def _reference(x, layer, axes):
    """The inference formula in float64 NumPy, from the layer's weights."""
    shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]

    def weight(name, default):
        variable = getattr(layer, name)
        if variable is None:
            return default
        value = test_case.to_numpy(variable).astype("float64")
        return value.reshape(shape)

    mean = weight("moving_mean", 0.0)
    variance = weight("moving_variance", 1.0)
    gamma, beta = weight("gamma", 1.0), weight("beta", 0.0)
    x = x.astype("float64")
    return gamma * (x - mean) / np.sqrt(variance + layer.epsilon) + beta


def _loss_gradients(layer, x, w):
    """Gradients of `sum(layer(x, training=True) * w)` with respect to `x`
    and to the layer's trainable weights, on the backend's autodiff."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * w)
        grads = tape.gradient(loss, [x] + layer.trainable_weights)
        return [g.numpy() for g in grads]
    if BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_weights]

        def loss(x, trainable):
            y, _ = layer.stateless_call(
                trainable, non_trainable, x, training=True
            )
            return (y * w).sum()

        dx, dweights = jax.grad(loss, argnums=(0, 1))(
            x, [v.value for v in layer.trainable_weights]
        )
        return [np.asarray(g) for g in [dx, *dweights]]
    import torch

    x = torch.tensor(x, requires_grad=True)
    loss = (layer(x, training=True) * torch.tensor(w)).sum()
    values = [v.value for v in layer.trainable_weights]
    grads = torch.autograd.grad(loss, [x] + values)
    return [g.numpy() for g in grads]


def _finite_difference(f, value, step=1e-2):
    """Central differences of scalar `f` at every entry of `value`.

    The layer is affine in the input, `gamma` and `beta`, so central
    differences are exact but for float32 rounding.
    """
    grad = np.zeros(value.shape, "float64")
    for index in np.ndindex(value.shape):
        up, down = value.copy(), value.copy()
        up[index] += step
        down[index] -= step
        grad[index] = (f(up) - f(down)) / (2 * step)
    return grad


def _frozen_model(trainable_affine=False):
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(3, name="dense"),
            keras_bn.FrozenBatchNormalization(
                trainable_affine=trainable_affine, name="frozen"
            ),
        ]
    )
    _randomize(model.get_layer("frozen"), _rng(3))
    return model


def _named(layer, name):
    (weight,) = [w for w in layer.weights if w.name == name]
    return weight


class LayerTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("default", {}, (8, 4), 0, 4),
        ("trainable_affine", {"trainable_affine": True}, (8, 4), 2, 2),
        ("axis_1", {"axis": 1}, (8, 3, 5), 0, 4),
        ("axes_list", {"axis": [1, 3], "trainable_affine": True},
         (4, 3, 2, 5), 2, 2),
        ("no_affine", {"center": False, "scale": False}, (8, 4), 0, 2),
    )
    def test_layer(self, kwargs, shape, trainable, non_trainable):
        self.run_layer_test(
            keras_bn.FrozenBatchNormalization,
            kwargs,
            input_shape=shape,
            expected_num_trainable_weights=trainable,
            expected_num_non_trainable_weights=non_trainable,
        )

    @parameterized.named_parameters(
        ("last", -1, (6, 4)),
        ("channels_first", 1, (3, 4, 5, 2)),
        ("two_axes", [1, 3], (3, 4, 2, 5)),
        ("no_center", -1, (6, 4), {"center": False}),
        ("no_scale", 2, (6, 3, 4), {"scale": False, "epsilon": 0.1}),
    )
    def test_training_and_inference_equal_numpy(self, axis, shape, extra=()):
        layer = keras_bn.FrozenBatchNormalization(axis=axis, **dict(extra))
        layer.build(shape)
        _randomize(layer, _rng(1))
        axes = [a % len(shape) for a in np.atleast_1d(axis)]
        x = _rng(2).normal(1.0, 3.0, shape).astype("float32")
        expected = _reference(x, layer, axes)
        before = [test_case.to_numpy(w) for w in layer.weights]
        for training in (True, False, None):
            self.assertAllClose(
                layer(x, training=training), expected, rtol=1e-5, atol=1e-5
            )
        model = keras.Sequential([keras.Input(shape[1:]), layer])
        self.assertAllClose(
            test_case.jit_call(model, x, training=True), expected,
            rtol=1e-5, atol=1e-5,
        )
        for value, weight in zip(before, layer.weights):
            self.assertAllClose(weight, value, atol=0, rtol=0)

    @parameterized.named_parameters(
        ("frozen_affine", False), ("trainable_affine", True)
    )
    def test_fit_keeps_statistics_after_model_trainable_true(
        self, trainable_affine
    ):
        model = _frozen_model(trainable_affine)
        model.trainable = False
        model.trainable = True
        frozen = model.get_layer("frozen")
        self.assertTrue(frozen.trainable)
        names = sorted(w.name for w in frozen.trainable_weights)
        self.assertEqual(names, ["beta", "gamma"] if trainable_affine else [])
        before = {w.name: test_case.to_numpy(w) for w in frozen.weights}
        dense_before = test_case.to_numpy(model.get_layer("dense").kernel)
        x = _rng(4).normal(2.0, 3.0, (16, 5)).astype("float32")
        y = _rng(5).normal(size=(16, 3)).astype("float32")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        for weight in frozen.weights:
            moved = not np.array_equal(
                test_case.to_numpy(weight), before[weight.name]
            )
            self.assertEqual(
                moved,
                trainable_affine and weight.name in ("gamma", "beta"),
                weight.name,
            )
        self.assertFalse(
            np.array_equal(
                test_case.to_numpy(model.get_layer("dense").kernel),
                dense_before,
            )
        )
        # Trained or not, the layer is the inference map of its weights.
        h = test_case.to_numpy(model.get_layer("dense")(x))
        self.assertAllClose(
            model(x, training=True), _reference(h, frozen, [1]),
            rtol=1e-5, atol=1e-5,
        )

    @test_case.needs_tensorflow("tf.distribute.MirroredStrategy")
    def test_fit_under_mirrored_strategy(self):
        # Each replica applies the same fixed map; gamma and beta get the
        # replicas' summed gradients, as any trainable weight does.
        with test_case.mirrored_strategy().scope():
            model = _frozen_model(trainable_affine=True)
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        frozen = model.get_layer("frozen")
        before = {w.name: test_case.to_numpy(w) for w in frozen.weights}
        x = _rng(6).normal(2.0, 3.0, (16, 5)).astype("float32")
        y = _rng(7).normal(size=(16, 3)).astype("float32")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        for name in ("moving_mean", "moving_variance"):
            self.assertAllClose(
                _named(frozen, name), before[name], atol=0, rtol=0
            )
        self.assertFalse(np.array_equal(
            test_case.to_numpy(_named(frozen, "gamma")), before["gamma"]
        ))
        h = test_case.to_numpy(model.get_layer("dense")(x))
        self.assertAllClose(
            model.predict(x, verbose=0), _reference(h, frozen, [1]),
            rtol=1e-5, atol=1e-5,
        )

    def test_trainable_false_freezes_the_affine_weights_too(self):
        layer = keras_bn.FrozenBatchNormalization(trainable_affine=True)
        layer.build((None, 3))
        layer.trainable = False
        self.assertEqual(layer.trainable_weights, [])
        layer.trainable = True
        self.assertLen(layer.trainable_weights, 2)

    @parameterized.named_parameters(
        ("frozen_affine", False, (4, 3), -1),
        ("trainable_affine", True, (4, 3), -1),
        ("trainable_affine_axis_1", True, (2, 3, 2), 1),
    )
    def test_gradients_match_finite_differences(
        self, trainable_affine, shape, axis
    ):
        layer = keras_bn.FrozenBatchNormalization(
            axis=axis, trainable_affine=trainable_affine
        )
        layer.build(shape)
        _randomize(layer, _rng(6))
        x = _rng(7).normal(size=shape).astype("float32")
        w = _rng(8).normal(size=shape).astype("float32")
        grads = _loss_gradients(layer, x, w)
        self.assertLen(grads, 3 if trainable_affine else 1)

        def loss_at(value):
            return float(
                np.sum(test_case.to_numpy(layer(value, training=True)) * w)
            )

        self.assertAllClose(
            grads[0], _finite_difference(loss_at, x), rtol=1e-3, atol=1e-3
        )
        for variable, grad in zip(layer.trainable_weights, grads[1:]):
            original = test_case.to_numpy(variable)

            def loss_with(value, variable=variable):
                variable.assign(value.astype("float32"))
                return loss_at(x)

            numeric = _finite_difference(loss_with, original.copy())
            variable.assign(original)
            self.assertAllClose(
                grad, numeric, rtol=1e-3, atol=1e-3, msg=variable.name
            )

    @parameterized.named_parameters(
        ("core", keras.layers.BatchNormalization),
        ("keras_bn", keras_bn.BatchNormalization),
    )
    def test_set_weights_both_ways(self, cls):
        x = _rng(9).normal(1.0, 2.0, (6, 4)).astype("float32")
        source = cls(epsilon=1e-2)
        source.build(x.shape)
        for weight in source.weights:
            weight.assign(_rng(10).uniform(0.5, 2.0, weight.shape))
        frozen = keras_bn.FrozenBatchNormalization(epsilon=1e-2)
        frozen.build(x.shape)
        self.assertEqual(
            [w.name for w in frozen.weights], [w.name for w in source.weights]
        )
        frozen.set_weights(source.get_weights())
        self.assertAllClose(
            frozen(x, training=True), source(x, training=False),
            rtol=1e-6, atol=1e-6,
        )
        back = cls(epsilon=1e-2)
        back.build(x.shape)
        back.set_weights(frozen.get_weights())
        for a, b in zip(source.weights, back.weights):
            self.assertAllClose(b, a, atol=0, rtol=0)

    @parameterized.named_parameters(
        ("epsilon_zero", {"epsilon": 0.0}, "epsilon=0.0"),
        ("epsilon_string", {"epsilon": "small"}, "epsilon='small'"),
        ("center_int", {"center": 1}, "center=1"),
        ("trainable_affine", {"trainable_affine": "yes"},
         "trainable_affine='yes'"),
        ("axis_float", {"axis": 1.0}, "axis=1.0"),
    )
    def test_bad_arguments(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, re.escape(message)):
            keras_bn.FrozenBatchNormalization(**kwargs)

    def test_axis_out_of_range(self):
        layer = keras_bn.FrozenBatchNormalization(axis=2)
        with self.assertRaisesRegex(ValueError, "axis=2"):
            layer.build((4, 3))

    def test_float32_weights_under_mixed_precision(self):
        layer = keras_bn.FrozenBatchNormalization(dtype="mixed_float16")
        layer.build((None, 3))
        _randomize(layer, _rng(11))
        x = _rng(12).normal(size=(4, 3)).astype("float32")
        y = layer(x, training=True)
        self.assertEqual(keras.backend.standardize_dtype(y.dtype), "float16")
        self.assertEqual({w.dtype for w in layer.weights}, {"float32"})
        self.assertAllClose(y, _reference(x, layer, [1]), rtol=2e-3,
                            atol=2e-3)

    def test_recompute_statistics_leaves_it_alone(self):
        model = _frozen_model()
        with self.assertRaisesRegex(ValueError, "has none"):
            keras_bn.recompute_statistics(model, np.ones((8, 5), "float32"))


class ConversionTest(test_case.LayerTestCase):
    @pytest.mark.slow
    def test_freeze_and_fold_applications_model(self):
        model = keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=5,
            classifier_activation=None,
        )
        test_conversion.randomize_statistics(model)
        num_bn = test_conversion.count(model, keras.layers.BatchNormalization)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            frozen = keras_bn.convert_batch_normalization(
                model, keras_bn.FrozenBatchNormalization
            )
        self.assertEqual(
            test_conversion.count(frozen, keras_bn.FrozenBatchNormalization),
            num_bn,
        )
        self.assertEqual(
            test_conversion.count(frozen, keras.layers.BatchNormalization), 0
        )
        x = _rng(13).normal(size=(4, 32, 32, 3)).astype("float32")
        expected = test_case.to_numpy(model(x, training=False))
        tolerance = {"rtol": 1e-4, "atol": 1e-4 * np.abs(expected).max()}
        self.assertAllClose(frozen(x, training=True), expected, **tolerance)
        frozen.trainable = True
        self.assertFalse(
            any(
                "moving" in w.name or w.name in ("gamma", "beta")
                for w in frozen.trainable_weights
            )
        )
        folded, pairs = keras_bn.fold_batch_normalization(frozen)
        self.assertGreater(len(pairs), 40)
        self.assertEqual(
            test_conversion.count(folded, keras_bn.FrozenBatchNormalization),
            num_bn - len(pairs),
        )
        self.assertAllClose(folded(x), expected, **tolerance)

    @parameterized.named_parameters(
        ("core", None), ("keras_bn", keras_bn.BatchNormalization),
        ("renorm", keras_bn.BatchRenormalization),
    )
    def test_freezes_every_batch_normalization(self, source_class):
        model = test_conversion.user_model()
        if source_class is not None:
            model = keras_bn.convert_batch_normalization(model, source_class)
        frozen = keras_bn.convert_batch_normalization(
            model, keras_bn.FrozenBatchNormalization, trainable_affine=True
        )
        x = _rng(14).normal(size=(4, 6, 6, 3)).astype("float32")
        self.assertAllClose(
            frozen(x, training=True), model(x, training=False),
            rtol=1e-5, atol=1e-5,
        )
        head = frozen.get_layer("head_bn")
        self.assertIsInstance(head, keras_bn.FrozenBatchNormalization)
        self.assertTrue(head.trainable_affine)
        self.assertEqual(head.epsilon, 1e-2)
        self.assertFalse(head.center)
        block = frozen.get_layer("block").get_layer("block_bn")
        # Flags are kept: a layer frozen with `trainable = False` stays so.
        self.assertFalse(block.trainable)
        for layer in (head, block):
            original = test_conversion.all_layers(model)
            original = next(o for o in original if o.name == layer.name)
            for name in ("moving_mean", "moving_variance"):
                self.assertAllClose(
                    getattr(layer, name), getattr(original, name),
                    atol=0, rtol=0,
                )
        loaded = test_case.save_and_load(frozen)
        self.assertAllClose(
            loaded(x, training=True), frozen(x, training=True), atol=1e-6
        )

    def test_warns_about_untrained_statistics(self):
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3),
                keras.layers.BatchNormalization(name="untrained_bn"),
                keras.layers.Dense(3),
                keras.layers.BatchNormalization(name="trained_bn"),
            ]
        )
        model.get_layer("trained_bn").moving_mean.assign([0.0, 0.5, 0.0])
        with self.assertWarnsRegex(UserWarning, "'untrained_bn'") as caught:
            keras_bn.convert_batch_normalization(
                model, keras_bn.FrozenBatchNormalization
            )
        self.assertNotIn("trained_bn'", str(caught.warning).replace(
            "'untrained_bn'", ""))

    def test_no_warning_when_not_freezing(self):
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.BatchNormalization()]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            keras_bn.convert_batch_normalization(model)
