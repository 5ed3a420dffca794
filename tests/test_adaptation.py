"""Tests of keras_bn.TENT, test-time adaptation by entropy minimization."""

import re

import keras
import numpy as np
from absl.testing import parameterized

import keras_bn
from tests import test_case

BN_CLASSES = (
    ("core", keras.layers.BatchNormalization),
    ("keras_bn", keras_bn.BatchNormalization),
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _tiny_model(bn_class, from_logits, seed=0):
    """Dense, batch normalization, Dense (softmax unless `from_logits`),
    with random weights, `gamma` and `beta`."""
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="dense_in"),
            bn_class(epsilon=1e-3, name="bn"),
            keras.layers.Dense(
                3, activation=None if from_logits else "softmax",
                name="dense_out",
            ),
        ]
    )
    rng = _rng(seed)
    for weight in model.weights:
        if weight.name == "gamma":
            weight.assign(rng.uniform(0.5, 1.5, weight.shape))
        elif weight.name in ("beta", "bias"):
            weight.assign(rng.normal(0.0, 0.5, weight.shape))
        elif weight.name == "kernel":
            weight.assign(rng.normal(0.0, 1.0, weight.shape))
        elif weight.name == "moving_mean":
            weight.assign(rng.normal(0.0, 1.0, weight.shape))
        elif weight.name == "moving_variance":
            weight.assign(rng.uniform(0.5, 2.0, weight.shape))
    return model


def _conv_model(bn_class):
    """A small image classifier with two adapted normalizations, a batch
    renormalization and a frozen one, which TENT leaves alone."""
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    h = bn_class(name="bn_1")(h)
    h = keras.layers.ReLU()(h)
    h = keras_bn.BatchRenormalization(name="renorm")(h)
    h = keras_bn.FrozenBatchNormalization(
        trainable_affine=True, name="frozen"
    )(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(5, name="dense")(h)
    h = bn_class(name="bn_2")(h)
    outputs = keras.layers.Softmax()(h)
    return keras.Model(inputs, outputs)


def _numpy_weights(model):
    return {w.path: test_case.to_numpy(w).copy() for w in model.weights}


def _reference_step(model, x, learning_rate, from_logits, epsilon=1e-3):
    """One SGD step of `_tiny_model` on the batch's mean entropy, by hand.

    Returns the new `gamma` and `beta`, and the predictions of the updated
    model with the batch's statistics.
    """
    def weight(layer, name):
        variable = getattr(model.get_layer(layer), name)
        return test_case.to_numpy(variable).astype("float64")

    x = x.astype("float64")
    z = x @ weight("dense_in", "kernel") + weight("dense_in", "bias")
    mean, variance = z.mean(axis=0), z.var(axis=0)
    x_hat = (z - mean) / np.sqrt(variance + epsilon)
    w_out = weight("dense_out", "kernel")
    b_out = weight("dense_out", "bias")

    def predict(gamma, beta):
        logits = (gamma * x_hat + beta) @ w_out + b_out
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        return logits, p

    gamma, beta = weight("bn", "gamma"), weight("bn", "beta")
    _, p = predict(gamma, beta)
    log_p = np.log(p)
    h = -(p * log_p).sum(axis=1, keepdims=True)
    # d(-sum_k p_k log p_k)/d logit_j = -p_j (log p_j + H), averaged over
    # the batch; the logits are affine in gamma and beta given x_hat.
    d_logits = -p * (log_p + h) / len(x)
    d_out = d_logits @ w_out.T
    gamma = gamma - learning_rate * (d_out * x_hat).sum(axis=0)
    beta = beta - learning_rate * d_out.sum(axis=0)
    logits, p = predict(gamma, beta)
    return gamma, beta, logits if from_logits else p


class TENTTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        (f"{name}_{kind}", cls, from_logits)
        for name, cls in BN_CLASSES
        for kind, from_logits in (("probabilities", False), ("logits", True))
    )
    def test_one_step_equals_hand_computed_entropy_step(
        self, bn_class, from_logits
    ):
        model = _tiny_model(bn_class, from_logits)
        x = _rng(1).normal(1.0, 2.0, (8, 3)).astype("float32")
        gamma, beta, expected = _reference_step(
            model, x, learning_rate=0.5, from_logits=from_logits
        )
        tent = keras_bn.TENT(
            model, keras.optimizers.SGD(0.5), from_logits=from_logits
        )
        predictions = tent.predict_on_batch(x)
        bn = model.get_layer("bn")
        self.assertAllClose(bn.gamma, gamma, rtol=1e-5, atol=1e-5)
        self.assertAllClose(bn.beta, beta, rtol=1e-5, atol=1e-5)
        self.assertAllClose(predictions, expected, rtol=1e-5, atol=1e-5)

    @parameterized.named_parameters(*BN_CLASSES)
    def test_only_scale_and_offset_change(self, bn_class):
        model = _conv_model(bn_class)
        before = _numpy_weights(model)
        tent = keras_bn.TENT(model, keras.optimizers.Adam(0.05), steps=3)
        self.assertEqual(
            sorted(w.path for w in tent.trainable_weights),
            sorted(
                f"{bn}/{name}" for bn in ("bn_1", "bn_2")
                for name in ("gamma", "beta")
            ),
        )
        self.assertEqual(
            [layer.name for layer in tent.layers], ["bn_1", "bn_2"]
        )
        x = _rng(2).normal(2.0, 3.0, (8, 6, 6, 2)).astype("float32")
        tent.predict_on_batch(x)
        tent.predict_on_batch(x[:5])
        after = _numpy_weights(model)
        adapted = {
            f"{bn}/{name}" for bn in ("bn_1", "bn_2")
            for name in ("gamma", "beta")
        }
        for path, value in before.items():
            changed = not np.array_equal(after[path], value)
            self.assertEqual(changed, path in adapted, path)
        # TENT changes no attribute of the layers it adapts.
        for layer in tent.layers:
            self.assertEqual(layer.momentum, 0.99)

    def test_normalizes_with_the_batch_statistics(self):
        model = _tiny_model(keras.layers.BatchNormalization, False)
        x = _rng(3).normal(4.0, 2.0, (8, 3)).astype("float32")
        expected = test_case.to_numpy(model(x, training=True))
        # A step of size zero leaves gamma and beta where they are.
        tent = keras_bn.TENT(model, keras.optimizers.SGD(0.0))
        self.assertAllClose(
            tent.predict_on_batch(x), expected, rtol=1e-5, atol=1e-6
        )

    @parameterized.named_parameters(*BN_CLASSES)
    def test_reset_restores_the_source_exactly(self, bn_class):
        model = _conv_model(bn_class)
        before = _numpy_weights(model)
        tent = keras_bn.TENT(model, keras.optimizers.Adam(0.05))
        optimizer_before = [
            test_case.to_numpy(v).copy() for v in tent.optimizer.variables
        ]
        rng = _rng(4)
        batches = [
            rng.normal(1.0, 2.0, (8, 6, 6, 2)).astype("float32")
            for _ in range(3)
        ]
        first = tent.predict_on_batch(batches[0])
        for batch in batches[1:]:
            tent.predict_on_batch(batch)
        self.assertGreater(
            int(test_case.to_numpy(tent.optimizer.iterations)), 0
        )
        tent.reset()
        for weight in model.weights:
            self.assertAllClose(
                weight, before[weight.path], atol=0, rtol=0, msg=weight.path
            )
        for variable, value in zip(tent.optimizer.variables, optimizer_before):
            self.assertAllClose(variable, value, atol=0, rtol=0,
                                msg=variable.path)
        self.assertAllClose(
            tent.predict_on_batch(batches[0]), first, atol=0, rtol=0
        )

    @parameterized.named_parameters(*BN_CLASSES)
    def test_episodic_predicts_the_same_batch_the_same(self, bn_class):
        x = _rng(5).normal(1.0, 2.0, (8, 6, 6, 2)).astype("float32")
        episodic = keras_bn.TENT(
            _conv_model(bn_class), keras.optimizers.Adam(0.05), steps=2,
            episodic=True,
        )
        first = episodic.predict_on_batch(x)
        self.assertAllClose(
            episodic.predict_on_batch(x), first, atol=0, rtol=0
        )
        online = keras_bn.TENT(
            _conv_model(bn_class), keras.optimizers.Adam(0.05), steps=2
        )
        first = online.predict_on_batch(x)
        self.assertFalse(np.allclose(online.predict_on_batch(x), first))

    @parameterized.named_parameters(("probability", False), ("logit", True))
    def test_one_sigmoid_unit_is_two_classes(self, from_logits):
        """A sigmoid unit `z` adapts as softmax over the logits `[0, z]`."""
        x = _rng(9).normal(1.0, 2.0, (8, 3)).astype("float32")
        source = _tiny_model(keras.layers.BatchNormalization, True)

        def model(units, activation):
            model = keras.Sequential(
                [
                    keras.Input((3,)),
                    keras.layers.Dense(4, name="dense_in"),
                    keras.layers.BatchNormalization(name="bn"),
                    keras.layers.Dense(units, activation=activation),
                ]
            )
            for name in ("dense_in", "bn"):
                model.get_layer(name).set_weights(
                    source.get_layer(name).get_weights()
                )
            return model

        kernel, bias = source.get_layer("dense_out").get_weights()
        two = model(2, None)
        two.layers[-1].set_weights(
            [kernel[:, :2] * [0.0, 1.0], bias[:2] * [0.0, 1.0]]
        )
        sigmoid = model(1, None if from_logits else "sigmoid")
        sigmoid.layers[-1].set_weights([kernel[:, 1:2], bias[1:2]])
        for model, logits in ((two, True), (sigmoid, from_logits)):
            keras_bn.TENT(
                model, keras.optimizers.SGD(0.5), steps=2,
                from_logits=logits,
            ).predict_on_batch(x)
        for name in ("gamma", "beta"):
            self.assertAllClose(
                getattr(sigmoid.get_layer("bn"), name),
                getattr(two.get_layer("bn"), name),
                rtol=1e-5, atol=1e-5,
            )

    def test_steps_minimize_the_entropy(self):
        model = _tiny_model(keras_bn.BatchNormalization, False)
        x = _rng(6).normal(size=(16, 3)).astype("float32")

        def mean_entropy(p):
            return float(-(p * np.log(p)).sum(axis=1).mean())

        before = mean_entropy(test_case.to_numpy(model(x, training=True)))
        tent = keras_bn.TENT(model, keras.optimizers.SGD(0.5), steps=5)
        self.assertLess(mean_entropy(tent.predict_on_batch(x)), before)

    def test_predict_is_one_online_pass(self):
        x = _rng(7).normal(size=(20, 3)).astype("float32")
        one_call = keras_bn.TENT(
            _tiny_model(keras.layers.BatchNormalization, False),
            keras.optimizers.SGD(0.5),
        )
        by_batch = keras_bn.TENT(
            _tiny_model(keras.layers.BatchNormalization, False),
            keras.optimizers.SGD(0.5),
        )
        expected = np.concatenate(
            [by_batch.predict_on_batch(x[i : i + 8]) for i in (0, 8, 16)]
        )
        self.assertAllClose(
            one_call.predict(x, batch_size=8), expected, rtol=1e-6, atol=1e-6
        )

    @parameterized.named_parameters(("jit", True), ("no_jit", False))
    def test_jit_compile(self, jit_compile):
        if jit_compile and keras.backend.backend() == "torch":
            self.skipTest("Keras compiles no XLA functions on PyTorch")
        x = _rng(8).normal(1.0, 2.0, (8, 3)).astype("float32")
        model = _tiny_model(keras_bn.BatchNormalization, True)
        gamma, beta, expected = _reference_step(
            model, x, learning_rate=0.5, from_logits=True
        )
        tent = keras_bn.TENT(
            model, keras.optimizers.SGD(0.5), from_logits=True,
            jit_compile=jit_compile,
        )
        self.assertAllClose(
            tent.predict_on_batch(x), expected, rtol=1e-5, atol=1e-5
        )
        self.assertAllClose(
            model.get_layer("bn").gamma, gamma, rtol=1e-5, atol=1e-5
        )

    @parameterized.named_parameters(
        ("steps_zero", {"steps": 0}, "steps=0"),
        ("steps_float", {"steps": 1.5}, "steps=1.5"),
        ("episodic", {"episodic": "yes"}, "episodic='yes'"),
        ("from_logits", {"from_logits": 1}, "from_logits=1"),
        ("jit_compile", {"jit_compile": "always"}, "jit_compile='always'"),
    )
    def test_bad_arguments(self, kwargs, message):
        model = _tiny_model(keras.layers.BatchNormalization, False)
        with self.assertRaisesRegex(ValueError, re.escape(message)):
            keras_bn.TENT(model, **kwargs)

    def test_model_without_adaptable_normalization(self):
        model = keras.Sequential(
            [
                keras.Input((3,)),
                keras_bn.FrozenBatchNormalization(),
                keras.layers.Dense(2, activation="softmax"),
            ]
        )
        with self.assertRaisesRegex(ValueError, "Argument `model`"):
            keras_bn.TENT(model)
