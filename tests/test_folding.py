"""Tests of keras_bn.fold_batch_normalization."""

import os
import subprocess
import sys
import tempfile
import textwrap

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

# (layer, input shape without batch); channels_first is only run under XLA,
# since TensorFlow has no channels_first 1D/2D convolution on CPU.
PRODUCERS = {
    "dense": (lambda **kw: keras.layers.Dense(6, **kw), (5,)),
    "dense_3d": (lambda **kw: keras.layers.Dense(6, **kw), (3, 5)),
    "conv1d": (lambda **kw: keras.layers.Conv1D(6, 3, **kw), (7, 3)),
    "conv2d": (lambda **kw: keras.layers.Conv2D(6, 3, **kw), (6, 6, 3)),
    "conv2d_groups": (
        lambda **kw: keras.layers.Conv2D(6, 3, groups=3, **kw),
        (6, 6, 3),
    ),
    "conv3d": (lambda **kw: keras.layers.Conv3D(6, 2, **kw), (4, 4, 4, 3)),
    "depthwise": (
        lambda **kw: keras.layers.DepthwiseConv2D(
            3, depth_multiplier=2, **kw
        ),
        (6, 6, 3),
    ),
}


# `keras.applications` models, small and without weights: MobileNetV3 and
# ConvNeXt hold `keras.ops` operations as graph nodes (`x + y`), ConvNeXt
# has no batch normalization at all, EfficientNet has preprocessing layers
# with weights of their own and squeeze-and-excitation products.
APPLICATIONS = {
    "mobilenet_v3_small": (keras.applications.MobileNetV3Small, (96, 96, 3)),
    "convnext_tiny": (keras.applications.ConvNeXtTiny, (32, 32, 3)),
    "efficientnet_b0": (keras.applications.EfficientNetB0, (32, 32, 3)),
}


class Scale(keras.Operation):
    """An operation that is not a layer and cannot give its config."""

    def __init__(self, *factors):
        super().__init__()
        self.factors = factors

    def call(self, x):
        for factor in self.factors:
            x = x * factor
        return x

    def compute_output_spec(self, x):
        return keras.KerasTensor(x.shape, x.dtype)


def application(name):
    """A `keras.applications` model with random BN statistics, and inputs."""
    make, shape = APPLICATIONS[name]
    model = make(
        weights=None, input_shape=shape, classes=5, classifier_activation=None
    )
    # Milder than `randomize_batch_normalization`: a deep stack of maps
    # that far from the identity overflows float32.
    randomize_batch_normalization(model, spread=0.5)
    x = np.random.default_rng(1).uniform(0.0, 255.0, (2,) + shape)
    return model, x.astype("float32")


def all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def randomize_batch_normalization(model, seed=0, spread=2.0):
    """Gives every BN layer statistics and an affine map far from init.

    Scales and variances are uniform in `[1 / (1 + spread), 1 + spread]`,
    means and offsets normal with standard deviation `spread`.
    """
    rng = np.random.default_rng(seed)
    for layer in all_layers(model):
        if not isinstance(layer, tuple(BN_CLASSES.values())):
            continue
        for weight in layer.weights:
            if weight.name in ("gamma", "moving_variance", "moving_stddev"):
                weight.assign(
                    rng.uniform(1 / (1 + spread), 1 + spread, weight.shape)
                )
            elif weight.name in ("beta", "moving_mean"):
                weight.assign(rng.normal(0.0, spread, weight.shape))


def predict(model, x, jit_compile):
    if jit_compile:
        return test_case.jit_call(model, x)
    return test_case.to_numpy(model(x, training=False))


def bn_names(model):
    return [
        layer.name for layer in all_layers(model)
        if isinstance(layer, tuple(BN_CLASSES.values()))
    ]


class FoldBatchNormalizationTest(test_case.LayerTestCase):
    def assert_same_inference(
        self, model, folded_model, x, jit_compile, tolerance=1e-5
    ):
        expected = predict(model, x, jit_compile)
        actual = predict(folded_model, x, jit_compile)
        # Relative to the outputs' scale.
        self.assertAllClose(
            actual,
            expected,
            rtol=tolerance,
            atol=tolerance * np.abs(expected).max(),
        )

    @parameterized.product(
        producer=list(PRODUCERS),
        bn=list(BN_CLASSES),
        model_type=["functional", "sequential"],
    )
    def test_folds_channels_last(self, producer, bn, model_type):
        # Sequential models also cover producers without a bias.
        functional = model_type == "functional"
        use_bias = functional
        make, shape = PRODUCERS[producer]
        layers = [
            make(use_bias=use_bias, name="producer"),
            BN_CLASSES[bn](name="bn"),
        ]
        if functional:
            inputs = keras.Input(shape)
            model = keras.Model(inputs, layers[1](layers[0](inputs)))
        else:
            model = keras.Sequential([keras.Input(shape)] + layers)
        randomize_batch_normalization(model)
        folded_model, folded = keras_bn.fold_batch_normalization(model)
        self.assertEqual(folded, [("producer", "bn")])
        self.assertEqual(bn_names(folded_model), [])
        self.assertIsInstance(
            folded_model, keras.Model if functional else keras.Sequential
        )
        x = np.random.default_rng(1).normal(size=(4,) + shape)
        x = x.astype("float32")
        self.assert_same_inference(model, folded_model, x, jit_compile=False)
        self.assert_same_inference(model, folded_model, x, jit_compile=True)

    @parameterized.product(
        producer=["conv1d", "conv2d", "conv3d", "depthwise"],
        bn=list(BN_CLASSES),
    )
    def test_folds_channels_first(self, producer, bn):
        make, shape = PRODUCERS[producer]
        shape = (shape[-1],) + shape[:-1]
        inputs = keras.Input(shape)
        outputs = BN_CLASSES[bn](axis=1, name="bn")(
            make(data_format="channels_first", name="producer")(inputs)
        )
        model = keras.Model(inputs, outputs)
        randomize_batch_normalization(model)
        folded_model, folded = keras_bn.fold_batch_normalization(model)
        self.assertEqual(folded, [("producer", "bn")])
        x = np.random.default_rng(1).normal(size=(4,) + shape)
        self.assert_same_inference(
            model, folded_model, x.astype("float32"), jit_compile=True
        )

    def test_folds_keras_bn_variants(self):
        inputs = keras.Input((5,))
        h = keras.layers.Dense(4, name="d1")(inputs)
        h = keras_bn.BatchNormalization(
            axis=[-1], momentum=None, virtual_batch_size=2, name="bn1"
        )(h)
        h = keras.layers.Dense(3, name="d2")(h)
        h = keras_bn.BatchRenormalization(name="bn2")(h)
        h = keras.layers.Dense(2, name="d3")(h)
        outputs = keras_bn.BatchNormalization(
            center=False, scale=False, name="bn3"
        )(h)
        model = keras.Model(inputs, outputs)
        randomize_batch_normalization(model)
        # Batch renormalization infers with `moving_variance`, which its
        # training derives from `moving_stddev`.
        bn2 = model.get_layer("bn2")
        bn2.moving_variance.assign(
            np.square(test_case.to_numpy(bn2.moving_stddev)) - bn2.epsilon
        )
        folded_model, folded = keras_bn.fold_batch_normalization(model)
        self.assertEqual(
            folded, [("d1", "bn1"), ("d2", "bn2"), ("d3", "bn3")]
        )
        x = np.random.default_rng(1).normal(size=(4, 5)).astype("float32")
        self.assert_same_inference(model, folded_model, x, jit_compile=False)

    def test_leaves_unfoldable_layers_alone(self):
        inputs = keras.Input((6, 6, 3))
        # An activation between the convolution and the BN.
        h = keras.layers.Conv2D(4, 3, activation="relu", name="relu_conv")(
            inputs
        )
        h = keras.layers.BatchNormalization(name="after_relu")(h)
        # A convolution with a second consumer.
        shared = keras.layers.Conv2D(4, 1, name="shared")(h)
        h = keras_bn.BatchNormalization(name="after_shared")(shared)
        h = keras.layers.Add()([h, shared])
        # A BN over another axis than the channels.
        h = keras.layers.Conv2D(4, 1, name="conv_axis")(h)
        h = keras_bn.BatchNormalization(axis=1, name="wrong_axis")(h)
        # A BN after a layer that cannot absorb it.
        h = keras.layers.BatchNormalization(name="after_add")(h)
        # Core batch renormalization.
        h = keras.layers.Conv2D(4, 1, name="renorm_conv")(h)
        h = keras.layers.BatchNormalization(renorm=True, name="renorm")(h)
        # A convolution whose output is also a model output.
        out = keras.layers.Conv2D(4, 1, name="out_conv")(h)
        bn_out = keras_bn.BatchNormalization(name="out_bn")(out)
        model = keras.Model(inputs, [out, bn_out])
        randomize_batch_normalization(model)
        with self.assertLogs("keras_bn.folding", level="INFO") as logs:
            folded_model, folded = keras_bn.fold_batch_normalization(model)
        self.assertEqual(folded, [])
        self.assertEqual(bn_names(folded_model), bn_names(model))
        # Each one left, with the reason.
        prefix = "INFO:keras_bn.folding:"
        self.assertEqual(
            sorted(logs.output),
            sorted(prefix + line for line in (
                "after_relu: not folded: after Conv2D 'relu_conv' with "
                "activation 'relu', which comes between",
                "after_shared: not folded: after Conv2D 'shared', whose "
                "output other layers read too",
                "wrong_axis: not folded: it normalizes axis 1, not only the "
                "channel axis 3 of Conv2D 'conv_axis'",
                "after_add: not folded: after BatchNormalization "
                "'wrong_axis', not a Dense, Conv1D, Conv2D, Conv3D or "
                "DepthwiseConv2D layer",
                "renorm: not folded: a core BatchNormalization with "
                "renorm=True",
                "out_bn: not folded: after Conv2D 'out_conv', whose output "
                "is a model output too",
            )),
        )
        x = np.random.default_rng(1).normal(size=(2, 6, 6, 3))
        x = x.astype("float32")
        for a, b in zip(model(x), folded_model(x)):
            self.assertAllClose(b, a, atol=0, rtol=0)

    @parameterized.named_parameters(
        ("sequential", "sequential"), ("functional", "functional")
    )
    def test_dense_with_relu_is_left_and_said(self, model_type):
        layers = [
            keras.layers.Dense(4, name="linear"),
            keras_bn.BatchNormalization(name="bn_1"),
            keras.layers.Dense(3, activation="relu", name="dense_2"),
            keras_bn.BatchNormalization(name="bn_3"),
        ]
        if model_type == "sequential":
            model = keras.Sequential([keras.Input((5,))] + layers)
        else:
            inputs = keras.Input((5,))
            h = inputs
            for layer in layers:
                h = layer(h)
            model = keras.Model(inputs, h)
        randomize_batch_normalization(model)
        with self.assertLogs("keras_bn.folding", level="INFO") as logs:
            folded_model, folded = keras_bn.fold_batch_normalization(model)
        self.assertEqual(folded, [("linear", "bn_1")])
        self.assertEqual(
            logs.output,
            [
                "INFO:keras_bn.folding:bn_3: not folded: after Dense "
                "'dense_2' with activation 'relu', which comes between",
                "INFO:keras_bn.folding:bn_1: folded into Dense 'linear'",
            ],
        )
        self.assertEqual(bn_names(folded_model), ["bn_3"])
        x = np.random.default_rng(1).normal(size=(4, 5)).astype("float32")
        self.assert_same_inference(model, folded_model, x, jit_compile=False)

    @parameterized.named_parameters(
        ("sequential", lambda: keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(2)])),
        ("layer_normalization", lambda: keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(2),
             keras.layers.LayerNormalization()])),
    )
    def test_model_without_batch_normalization_raises(self, make):
        model = make()
        with pytest.raises(ValueError) as error:
            keras_bn.fold_batch_normalization(model)
        message = str(error.value)
        self.assertIn(
            "Argument `model` must hold a batch normalization", message
        )
        self.assertTrue(message.endswith(f"Received: model={model!r}"))

    def test_operations_that_are_not_layers(self):
        # `keras.ops` calls on symbolic tensors are graph nodes of their own.
        inputs = keras.Input((6, 6, 3))
        h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
        h = keras_bn.BatchNormalization(name="bn")(h)
        h = keras.ops.relu(h) * 2.0 + keras.ops.mean(h, axis=-1, keepdims=True)
        h = Scale(2.0, -1.0)(h)
        h = keras.layers.Lambda(lambda t: t - 1.0)(h)
        h = keras.layers.BatchNormalization(name="after_ops")(h)
        outputs = keras.ops.concatenate([h, keras.ops.square(h)], axis=-1)
        model = keras.Model(inputs, outputs)
        self.assertTrue(
            any(
                not isinstance(op, keras.layers.Layer)
                for op in model.operations
            )
        )
        randomize_batch_normalization(model)
        folded_model, folded = keras_bn.fold_batch_normalization(model)
        self.assertEqual(folded, [("conv", "bn")])
        self.assertEqual(bn_names(folded_model), ["after_ops"])
        x = np.random.default_rng(1).normal(size=(2, 6, 6, 3))
        self.assert_same_inference(
            model, folded_model, x.astype("float32"), jit_compile=False
        )

    @pytest.mark.slow
    @parameterized.named_parameters((name, name) for name in APPLICATIONS)
    def test_applications(self, name):
        model, x = application(name)
        num_bn = len(bn_names(model))
        if num_bn == 0:
            # ConvNeXt normalizes layers, not batches: nothing to fold.
            with pytest.raises(ValueError, match="it has none"):
                keras_bn.fold_batch_normalization(model)
            return
        folded_model, folded = keras_bn.fold_batch_normalization(model)
        # Every batch normalization of these models follows a convolution.
        self.assertLen(folded, num_bn)
        self.assertEqual(bn_names(folded_model), [])
        # Float32 rounding differences grow through 50 layers.
        self.assert_same_inference(
            model, folded_model, x, jit_compile=False, tolerance=1e-4
        )

    def test_shared_producer_is_left_alone(self):
        dense = keras.layers.Dense(3, name="shared_dense")
        a, b = keras.Input((3,)), keras.Input((3,))
        h = keras_bn.BatchNormalization(name="bn")(dense(a))
        model = keras.Model([a, b], [h, dense(b)])
        _, folded = keras_bn.fold_batch_normalization(model)
        self.assertEqual(folded, [])

    def test_nested_models_and_save(self):
        inner = keras.Sequential(
            [
                keras.Input((6, 6, 3)),
                keras.layers.Conv2D(4, 3, name="conv"),
                keras.layers.BatchNormalization(name="bn"),
                keras.layers.ReLU(),
                keras.layers.GlobalAveragePooling2D(),
            ],
            name="backbone",
        )
        inputs = keras.Input((6, 6, 3))
        h = inner(inputs)
        h = keras.layers.Dropout(0.5)(h)
        h = keras.layers.Dense(2, name="head")(h)
        outputs = keras_bn.BatchNormalization(name="head_bn")(h)
        model = keras.Model(inputs, outputs)
        randomize_batch_normalization(model)
        folded_model, folded = keras_bn.fold_batch_normalization(model)
        self.assertEqual(
            folded, [("backbone/conv", "backbone/bn"), ("head", "head_bn")]
        )
        self.assertEqual(bn_names(folded_model), [])
        x = np.random.default_rng(1).normal(size=(3, 6, 6, 3))
        x = x.astype("float32")
        self.assert_same_inference(model, folded_model, x, jit_compile=False)
        expected = folded_model.predict(x, verbose=0)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "folded.keras")
            folded_model.save(path)
            loaded = keras.saving.load_model(path)
        self.assertAllClose(loaded.predict(x, verbose=0), expected, atol=0)

    @pytest.mark.slow
    def test_loading_without_importing_keras_bn(self):
        # What the guides say: a fully folded model loads without keras_bn;
        # one with keras_bn layers needs the import, else Keras's error.
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3),
                keras_bn.BatchNormalization(virtual_batch_size=2),
            ]
        )
        randomize_batch_normalization(model)
        folded_model, _ = keras_bn.fold_batch_normalization(model)
        x = np.random.default_rng(1).normal(size=(2, 4)).astype("float32")
        with tempfile.TemporaryDirectory() as tmp:
            for name, m in (("folded", folded_model), ("model", model)):
                m.save(os.path.join(tmp, f"{name}.keras"))
            np.save(os.path.join(tmp, "x.npy"), x)
            np.save(os.path.join(tmp, "y.npy"), predict(model, x, False))
            script = textwrap.dedent(
                f"""
                import os, sys
                import keras, numpy as np
                tmp = {tmp!r}
                x = np.load(os.path.join(tmp, "x.npy"))
                y = np.load(os.path.join(tmp, "y.npy"))
                folded = keras.saving.load_model(
                    os.path.join(tmp, "folded.keras")
                )
                assert "keras_bn" not in sys.modules
                out = keras.ops.convert_to_numpy(folded(x))
                print("folded", np.abs(out - y).max())
                try:
                    keras.saving.load_model(os.path.join(tmp, "model.keras"))
                except Exception as error:
                    print("error", "Could not locate class "
                          "'BatchNormalization'" in str(error))
                import keras_bn
                model = keras.saving.load_model(
                    os.path.join(tmp, "model.keras")
                )
                out = keras.ops.convert_to_numpy(model(x))
                print("imported", np.abs(out - y).max())
                """
            )
            result = subprocess.run(
                [sys.executable, "-c", script],
                capture_output=True, text=True, timeout=300,
                cwd=os.path.dirname(os.path.dirname(__file__)),
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = dict(
            line.split(" ", 1) for line in result.stdout.strip().split("\n")
        )
        self.assertLess(float(lines["folded"]), 1e-5)
        self.assertEqual(lines["error"], "True")
        self.assertEqual(float(lines["imported"]), 0.0)

    def test_original_model_is_unchanged(self):
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3, use_bias=False),
                keras_bn.BatchNormalization(),
            ]
        )
        randomize_batch_normalization(model)
        before = [test_case.to_numpy(w) for w in model.weights]
        folded_model, _ = keras_bn.fold_batch_normalization(model)
        for weight, value in zip(model.weights, before):
            self.assertAllClose(weight, value, atol=0, rtol=0)
        self.assertFalse(model.layers[0].use_bias)
        self.assertTrue(folded_model.layers[0].use_bias)

    @test_case.needs_tensorflow("tf.distribute.MirroredStrategy")
    def test_mirrored_strategy(self):
        strategy = test_case.mirrored_strategy()
        with strategy.scope():
            model = keras.Sequential(
                [
                    keras.Input((5,)),
                    keras.layers.Dense(4),
                    keras_bn.BatchNormalization(synchronized=True),
                ]
            )
            randomize_batch_normalization(model)
            folded_model, folded = keras_bn.fold_batch_normalization(model)
        self.assertLen(folded, 1)
        x = np.random.default_rng(1).normal(size=(8, 5)).astype("float32")
        self.assertAllClose(
            folded_model.predict(x, batch_size=8, verbose=0),
            model.predict(x, batch_size=8, verbose=0),
            rtol=1e-5, atol=1e-5,
        )

    @parameterized.named_parameters(
        ("unbuilt", lambda: keras.Sequential([keras.layers.Dense(2)])),
        ("layer", lambda: keras.layers.Dense(2)),
        ("path", lambda: "model.keras"),
    )
    def test_rejects_bad_model(self, make):
        model = make()
        with pytest.raises(ValueError) as error:
            keras_bn.fold_batch_normalization(model)
        self.assertIn(f"Received: model={model!r}", str(error.value))
