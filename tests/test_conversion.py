"""Tests of keras_bn.convert_batch_normalization."""

import os
import tempfile

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_bn
from tests import test_case
from tests import test_folding


def all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def count(model, cls):
    return sum(type(layer) is cls for layer in all_layers(model))


def randomize_statistics(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in all_layers(model):
        if type(layer) is not keras.layers.BatchNormalization:
            continue
        for weight in layer.weights:
            if weight.name in ("gamma", "moving_variance", "moving_stddev"):
                weight.assign(rng.uniform(0.3, 3.0, weight.shape))
            elif weight.name in ("beta", "moving_mean", "renorm_mean"):
                weight.assign(rng.normal(0.0, 1.0, weight.shape))


def user_model():
    block = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.BatchNormalization(momentum=0.9, name="block_bn"),
            keras.layers.ReLU(),
        ],
        name="block",
    )
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.GlobalAveragePooling2D()(block(inputs))
    h = keras.layers.Dense(3, name="dense")(h)
    h = keras.layers.BatchNormalization(
        epsilon=1e-2, center=False, name="head_bn"
    )(h)
    model = keras.Model(inputs, h)
    model.get_layer("block").get_layer("block_bn").trainable = False
    randomize_statistics(model)
    return model


class ConvertBatchNormalizationTest(test_case.LayerTestCase):
    @pytest.mark.slow
    def test_applications_model(self):
        model = keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=5,
            classifier_activation=None,
        )
        randomize_statistics(model)
        num_bn = count(model, keras.layers.BatchNormalization)
        self.assertGreater(num_bn, 40)
        converted = keras_bn.convert_batch_normalization(
            model, keras_bn.BatchNormalization, virtual_batch_size=4
        )
        self.assertEqual(count(converted, keras_bn.BatchNormalization), num_bn)
        self.assertEqual(count(converted, keras.layers.BatchNormalization), 0)
        self.assertTrue(
            all(
                layer.virtual_batch_size == 4
                for layer in all_layers(converted)
                if isinstance(layer, keras_bn.BatchNormalization)
            )
        )
        x = np.random.default_rng(1).normal(size=(4, 32, 32, 3))
        x = x.astype("float32")
        expected = model.predict(x, verbose=0)
        self.assertAllClose(
            converted.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5
        )

    @pytest.mark.slow
    @parameterized.named_parameters(
        (name, name) for name in test_folding.APPLICATIONS
    )
    def test_applications(self, name):
        model, x = test_folding.application(name)
        num_bn = count(model, keras.layers.BatchNormalization)
        if num_bn == 0:
            # ConvNeXt normalizes layers, not batches: nothing to convert.
            with pytest.raises(ValueError, match="it has none"):
                keras_bn.convert_batch_normalization(
                    model, keras_bn.BatchRenormalization
                )
            return
        converted = keras_bn.convert_batch_normalization(
            model, keras_bn.BatchRenormalization
        )
        self.assertEqual(count(converted, keras.layers.BatchNormalization), 0)
        self.assertEqual(
            count(converted, keras_bn.BatchRenormalization), num_bn
        )
        expected = test_case.to_numpy(model(x, training=False))
        # Float32 rounding differences grow through 50 layers.
        self.assertAllClose(
            converted(x, training=False),
            expected,
            rtol=1e-4,
            atol=1e-4 * np.abs(expected).max(),
        )

    def test_default_layer_class_trains_as_core_keras(self):
        model = user_model()
        converted = keras_bn.convert_batch_normalization(model)
        self.assertIs(
            type(converted.get_layer("head_bn")), keras_bn.BatchNormalization
        )
        x = np.random.default_rng(1).normal(size=(8, 6, 6, 3))
        x = x.astype("float32")
        self.assertAllClose(
            converted(x, training=True), model(x, training=True),
            rtol=1e-5, atol=1e-5,
        )

    def test_operations_that_are_not_layers(self):
        inputs = keras.Input((4,))
        h = keras.layers.BatchNormalization(name="bn")(inputs)
        h = keras.layers.Lambda(lambda t: t * 2.0)(h)
        outputs = keras.ops.tanh(h) + test_folding.Scale(3.0)(inputs)
        model = keras.Model(inputs, outputs)
        randomize_statistics(model)
        converted = keras_bn.convert_batch_normalization(model)
        self.assertIsInstance(
            converted.get_layer("bn"), keras_bn.BatchNormalization
        )
        x = np.random.default_rng(1).normal(size=(3, 4)).astype("float32")
        self.assertAllClose(converted(x), model(x), rtol=1e-6, atol=1e-6)

    def test_user_model_keeps_arguments_weights_and_flags(self):
        model = user_model()
        converted = keras_bn.convert_batch_normalization(
            model, keras_bn.BatchNormalization
        )
        self.assertEqual(count(converted, keras.layers.BatchNormalization), 0)
        for name, path in (("block_bn", ("block",)), ("head_bn", ())):
            original, new = model, converted
            for step in path:
                original = original.get_layer(step)
                new = new.get_layer(step)
            original, new = original.get_layer(name), new.get_layer(name)
            self.assertIsInstance(new, keras_bn.BatchNormalization)
            for key in ("momentum", "epsilon", "center", "scale", "axis"):
                self.assertEqual(
                    new.get_config()[key], original.get_config()[key]
                )
            self.assertEqual(new.trainable, original.trainable)
            self.assertEqual(
                [w.name for w in new.weights],
                [w.name for w in original.weights],
            )
            for a, b in zip(original.weights, new.weights):
                self.assertAllClose(b, a, atol=0, rtol=0)
        x = np.random.default_rng(1).normal(size=(4, 6, 6, 3))
        x = x.astype("float32")
        self.assertAllClose(converted(x), model(x), rtol=1e-6, atol=1e-6)
        # Frozen layers stay in inference mode in training calls.
        self.assertAllClose(
            converted.get_layer("block")(x, training=True),
            model.get_layer("block")(x, training=True),
            rtol=1e-6, atol=1e-6,
        )

    def test_training_matches_core_keras(self):
        model = user_model()
        converted = keras_bn.convert_batch_normalization(
            model, keras_bn.BatchNormalization
        )
        x = np.random.default_rng(1).normal(size=(8, 6, 6, 3))
        x = x.astype("float32")
        y = np.ones((8, 3), "float32")
        for m in (model, converted):
            m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            m.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        for a, b in zip(model.weights, converted.weights):
            self.assertAllClose(b, a, rtol=1e-5, atol=1e-5, msg=a.path)

    def test_cumulative_momentum_adds_weight(self):
        model = user_model()
        converted = keras_bn.convert_batch_normalization(model, momentum=None)
        head = converted.get_layer("head_bn")
        self.assertIsNone(head.momentum)
        self.assertEqual(int(head.num_batches_tracked), 0)
        x = np.random.default_rng(1).normal(size=(4, 6, 6, 3))
        x = x.astype("float32")
        self.assertAllClose(converted(x), model(x), rtol=1e-6, atol=1e-6)

    def test_to_batch_renormalization(self):
        model = user_model()
        converted = keras_bn.convert_batch_normalization(
            model, layer_class=keras_bn.BatchRenormalization
        )
        self.assertEqual(count(converted, keras_bn.BatchRenormalization), 2)
        original = model.get_layer("head_bn")
        head = converted.get_layer("head_bn")
        stddev = np.sqrt(test_case.to_numpy(original.moving_variance) + 1e-2)
        self.assertAllClose(head.moving_stddev, stddev, rtol=1e-6)
        self.assertAllClose(head.renorm_stddev, stddev, rtol=1e-6)
        self.assertAllClose(head.renorm_mean, original.moving_mean, atol=0)
        x = np.random.default_rng(1).normal(size=(4, 6, 6, 3))
        x = x.astype("float32")
        self.assertAllClose(converted(x), model(x), rtol=1e-6, atol=1e-6)

    def test_core_renorm_to_batch_renormalization(self):
        inputs = keras.Input((4,))
        outputs = keras.layers.BatchNormalization(
            renorm=True, renorm_clipping={"rmax": 2.0}, name="bn"
        )(inputs)
        model = keras.Model(inputs, outputs)
        randomize_statistics(model)
        # keras_bn.BatchNormalization.from_config gives the subclass.
        plain = keras_bn.convert_batch_normalization(
            model, keras_bn.BatchNormalization
        )
        self.assertIsInstance(
            plain.get_layer("bn"), keras_bn.BatchRenormalization
        )
        converted = keras_bn.convert_batch_normalization(
            model, layer_class=keras_bn.BatchRenormalization
        )
        original, new = model.get_layer("bn"), converted.get_layer("bn")
        self.assertEqual(new.renorm_clipping["rmax"], 2.0)
        values = {w.name: w for w in original.weights}
        for weight in new.weights:
            if weight.name in values:
                self.assertAllClose(weight, values[weight.name], atol=0)
        x = np.random.default_rng(1).normal(size=(4, 4)).astype("float32")
        self.assertAllClose(converted(x), model(x), rtol=1e-6, atol=1e-6)

    def test_save_load_and_jit_compile(self):
        converted = keras_bn.convert_batch_normalization(
            user_model(), virtual_batch_size=2
        )
        x = np.random.default_rng(1).normal(size=(4, 6, 6, 3))
        x = x.astype("float32")
        expected = test_case.to_numpy(converted(x))
        self.assertAllClose(
            test_case.jit_call(converted, x),
            expected, rtol=1e-5, atol=1e-6,
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "converted.keras")
            converted.save(path)
            loaded = keras.saving.load_model(path)
        self.assertAllClose(loaded(x), expected, atol=0)
        self.assertEqual(
            loaded.get_layer("head_bn").virtual_batch_size, 2
        )

    @test_case.needs_tensorflow("tf.distribute.MirroredStrategy")
    def test_mirrored_strategy_synchronized(self):
        strategy = test_case.mirrored_strategy()
        with strategy.scope():
            model = user_model()
            converted = keras_bn.convert_batch_normalization(
                model, synchronized=True
            )
            converted.compile(optimizer="sgd", loss="mse")
        x = np.random.default_rng(1).normal(size=(8, 6, 6, 3))
        x = x.astype("float32")
        self.assertAllClose(
            converted.predict(x, batch_size=8, verbose=0),
            model.predict(x, batch_size=8, verbose=0),
            rtol=1e-5, atol=1e-5,
        )
        converted.fit(x, np.ones((8, 3)), batch_size=8, verbose=0)
        self.assertTrue(converted.get_layer("head_bn").synchronized)

    @parameterized.named_parameters(
        ("core_class", keras.layers.BatchNormalization),
        ("other_layer", keras.layers.Dense),
        ("instance", keras_bn.BatchNormalization()),
    )
    def test_bad_layer_class(self, layer_class):
        with pytest.raises(ValueError) as error:
            keras_bn.convert_batch_normalization(
                user_model(), layer_class=layer_class
            )
        self.assertIn(
            f"Received: layer_class={layer_class!r}", str(error.value)
        )

    @parameterized.named_parameters(
        ("layer", lambda: keras.layers.Dense(2)),
        ("path", lambda: "model.keras"),
        ("unbuilt", lambda: keras.Sequential([keras.layers.Dense(2)])),
    )
    def test_bad_model(self, make):
        model = make()
        with pytest.raises(ValueError) as error:
            keras_bn.convert_batch_normalization(model)
        self.assertIn(f"Received: model={model!r}", str(error.value))

    @parameterized.named_parameters(
        ("no_bn", lambda: keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(2)]),
         keras_bn.BatchNormalization, "a keras.layers.BatchNormalization"),
        ("keras_bn_only", lambda: keras.Sequential(
            [keras.Input((3,)), keras_bn.BatchNormalization()]),
         keras_bn.BatchNormalization, "a keras.layers.BatchNormalization"),
        ("frozen_only", lambda: keras.Sequential(
            [keras.Input((3,)), keras_bn.FrozenBatchNormalization()]),
         keras_bn.FrozenBatchNormalization,
         "a batch normalization to freeze"),
    )
    def test_nothing_to_convert_raises(self, make, layer_class, what):
        model = make()
        with pytest.raises(ValueError) as error:
            keras_bn.convert_batch_normalization(model, layer_class)
        message = str(error.value)
        self.assertIn(f"Argument `model` must hold {what}", message)
        self.assertIn(f"to {layer_class.__name__}.", message)
        self.assertTrue(message.endswith(f"Received: model={model!r}"))

    def test_report_is_logged(self):
        inputs = keras.Input((4,))
        h = keras.layers.BatchNormalization(name="core")(inputs)
        h = keras_bn.BatchNormalization(name="ours")(h)
        h = keras_bn.FrozenBatchNormalization(name="frozen")(h)
        model = keras.Model(inputs, h)
        with self.assertLogs("keras_bn.conversion", level="INFO") as logs:
            keras_bn.convert_batch_normalization(model)
        prefix = "INFO:keras_bn.conversion:"
        self.assertEqual(
            logs.output,
            [
                prefix + "core: BatchNormalization converted to "
                "keras_bn.BatchNormalization",
                prefix + "ours: left as it is: already "
                "keras_bn.BatchNormalization; only core Keras layers become "
                "BatchNormalization",
                prefix + "frozen: left as it is: already frozen",
            ],
        )

    @parameterized.named_parameters(
        ("momentum", {"momentum": 1.5}, "momentum=1.5"),
        ("momentum_str", {"momentum": "0.9"}, "momentum='0.9' (a str)"),
    )
    def test_bad_kwargs_are_reported_by_the_layer(self, kwargs, message):
        with pytest.raises(ValueError) as error:
            keras_bn.convert_batch_normalization(user_model(), **kwargs)
        self.assertIn(f"Received: {message}", str(error.value))
