"""Tests of keras_bn.callbacks.PreciseBN."""

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_bn
from tests import test_case


def make_model(bn_class=keras_bn.BatchNormalization, **bn_kwargs):
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, name="dense"),
            bn_class(name="bn", **bn_kwargs),
            keras.layers.Dense(1, name="head"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def data(num=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, (num, 5)).astype("float32")
    return x, x[:, :1] * 0.5


def batch_statistics(model, x, batch_size):
    """Equal-weight mean of the BN input's batch moments, in NumPy."""
    kernel, bias = model.get_layer("dense").get_weights()
    z = x.astype("float64") @ kernel + bias
    batches = [z[i : i + batch_size] for i in range(0, len(z), batch_size)]
    return (
        np.mean([b.mean(axis=0) for b in batches], axis=0),
        np.mean([b.var(axis=0) for b in batches], axis=0),
    )


# XLA compiles on TensorFlow and JAX; Keras's PyTorch backend has no XLA.
NO_XLA = keras.backend.backend() not in ("tensorflow", "jax")


class CountingBatches:
    """Batches that can be iterated again, counting the passes."""

    def __init__(self, x, batch_size):
        self.batches = [
            x[i : i + batch_size] for i in range(0, len(x), batch_size)
        ]
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def cycle(x, y, batch_size):
    """An endless generator of `(x, y)` batches."""
    while True:
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]


def tf_data():
    tf = pytest.importorskip(
        "tensorflow", reason="needs TensorFlow: tf.data is TensorFlow's"
    )
    return tf.data


class PreciseBNTest(test_case.LayerTestCase):
    def assert_precise(self, model, x, batch_size):
        mean, variance = batch_statistics(model, x, batch_size)
        bn = model.get_layer("bn")
        self.assertAllClose(bn.moving_mean, mean, atol=1e-5)
        self.assertAllClose(bn.moving_variance, variance, rtol=1e-5)

    @parameterized.product(
        bn=["core", "keras_bn"], jit_compile=[False, True]
    )
    def test_statistics_after_fit(self, bn, jit_compile):
        if jit_compile and NO_XLA:
            self.skipTest("jit_compile needs XLA: TensorFlow or JAX")
        bn_class = {
            "core": keras.layers.BatchNormalization,
            "keras_bn": keras_bn.BatchNormalization,
        }[bn]
        model = make_model(bn_class)
        x, y = data()
        callback = keras_bn.callbacks.PreciseBN(
            x, batch_size=16, jit_compile=jit_compile
        )
        model.fit(x, y, batch_size=16, epochs=2, callbacks=[callback],
                  verbose=0)
        # Recomputed with the final weights.
        self.assert_precise(model, x, 16)

    def test_validation_uses_recomputed_statistics(self):
        model = make_model(momentum=0.5)
        x, y = data()
        callback = keras_bn.callbacks.PreciseBN(x, batch_size=16)
        history = model.fit(
            x, y, batch_size=16, epochs=1, validation_data=(x, y),
            callbacks=[callback], verbose=0,
        )
        # Nothing changes the model after validation, so evaluating again
        # must give the validation loss.
        self.assertAllClose(
            history.history["val_loss"][0],
            model.evaluate(x, y, batch_size=16, verbose=0),
            rtol=1e-5,
        )
        self.assert_precise(model, x, 16)

    @parameterized.named_parameters(
        ("every_epoch", 1, 5, 5),
        ("every_second", 2, 5, 3),
        ("every_second_even", 2, 4, 2),
    )
    def test_every_n_epochs(self, every_n_epochs, epochs, passes):
        model = make_model()
        x, y = data(32)
        batches = CountingBatches(x, 16)
        callback = keras_bn.callbacks.PreciseBN(
            batches, steps=2, every_n_epochs=every_n_epochs
        )
        model.fit(x, y, batch_size=16, epochs=epochs, callbacks=[callback],
                  validation_data=(x, y), verbose=0)
        self.assertEqual(batches.passes, passes)
        self.assert_precise(model, x, 16)

    @parameterized.named_parameters(
        ("array", lambda x, y: x, {}),
        ("x_y", lambda x, y: (x, y), {}),
        ("x_y_sample_weight", lambda x, y: (x, y, np.ones(len(x))), {}),
        ("py_dataset", lambda x, y: test_case.XYBatches(x, y, 16), {}),
        ("tf_data_x_y", lambda x, y: tf_data().Dataset.from_tensor_slices(
            (x, y)).batch(16), {}),
        # Any 4 consecutive batches of the cycle are the 4 batches of x.
        ("generator", lambda x, y: cycle(x, y, 16), {"steps": 4}),
    )
    def test_data_as_fit_takes_it(self, make_data, kwargs):
        model = make_model()
        x, y = data()
        callback = keras_bn.callbacks.PreciseBN(
            make_data(x, y), batch_size=16, **kwargs
        )
        model.fit(x, y, batch_size=16, epochs=2, callbacks=[callback],
                  verbose=0)
        self.assert_precise(model, x, 16)

    @pytest.mark.skipif(
        keras.backend.backend() != "torch",
        reason="a DataLoader's tensors are PyTorch's: tested on the torch "
        "backend",
    )
    def test_torch_data_loader(self):
        import torch

        model = make_model()
        x, y = data()
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(
                torch.from_numpy(x), torch.from_numpy(y)
            ),
            batch_size=16,
        )
        callback = keras_bn.callbacks.PreciseBN(loader)
        model.fit(x, y, batch_size=16, epochs=2, callbacks=[callback],
                  verbose=0)
        self.assert_precise(model, x, 16)

    def test_generator_needs_steps(self):
        x, y = data()
        with pytest.raises(ValueError, match="needs `steps`") as error:
            keras_bn.callbacks.PreciseBN(cycle(x, y, 16))
        self.assertIn("with steps=None", str(error.value))

    def test_steps(self):
        model = make_model()
        x, y = data()
        tf = pytest.importorskip(
            "tensorflow", reason="needs TensorFlow: tf.data is TensorFlow's"
        )
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        callback = keras_bn.callbacks.PreciseBN(dataset.repeat(), steps=2)
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[callback],
                  verbose=0)
        self.assert_precise(model, x[:32], 16)

    @test_case.needs_tensorflow("tf.distribute.MirroredStrategy")
    def test_mirrored_strategy(self):
        strategy = test_case.mirrored_strategy()
        with strategy.scope():
            model = make_model(synchronized=True)
        x, y = data()
        callback = keras_bn.callbacks.PreciseBN(x, batch_size=16)
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[callback],
                  verbose=0)
        self.assert_precise(model, x, 16)

    @parameterized.named_parameters(
        ("steps", {"steps": 0}, "steps=0"),
        ("every_n_epochs", {"every_n_epochs": 0}, "every_n_epochs=0"),
        ("batch_size", {"batch_size": 2.5}, "batch_size=2.5"),
        ("verbose", {"verbose": 3}, "verbose=3"),
        ("verbose_str", {"verbose": "0"}, "verbose='0' (a str)"),
        ("steps_str", {"steps": "2"}, "steps='2' (a str)"),
        ("jit_compile", {"jit_compile": 1}, "jit_compile=1"),
    )
    def test_bad_arguments(self, kwargs, message):
        with pytest.raises(ValueError) as error:
            keras_bn.callbacks.PreciseBN(data()[0], **kwargs)
        self.assertIn(f"Received: {message}", str(error.value))

    @pytest.mark.skipif(not NO_XLA, reason="the backend compiles with XLA")
    def test_jit_compile_without_xla(self):
        with pytest.raises(ValueError) as error:
            keras_bn.callbacks.PreciseBN(data()[0], jit_compile=True)
        message = str(error.value)
        self.assertIn(f"the backend is {keras.backend.backend()}", message)
        self.assertTrue(message.endswith("Received: jit_compile=True"))

    def test_model_without_batch_normalization_fails_before_training(self):
        model = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(1, name="head")]
        )
        model.compile(optimizer="sgd", loss="mse")
        before = test_case.to_numpy(model.get_layer("head").kernel)
        x, y = data()
        with pytest.raises(ValueError) as error:
            model.fit(x, y, callbacks=[keras_bn.callbacks.PreciseBN(x)],
                      verbose=0)
        self.assertIn(f"Received: model={model!r}", str(error.value))
        self.assertAllClose(
            model.get_layer("head").kernel, before, atol=0, rtol=0
        )
