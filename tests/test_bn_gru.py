"""Tests of keras_bn.BNGRU and keras_bn.BNGRUCell.

The reference is a float64 NumPy implementation of the GRU of
`keras.layers.GRU` (`reset_after=True`) with the input and recurrent
products batch-normalized per time step, step by step; the statistics
helpers are shared with `tests/test_bn_lstm.py`.
"""

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_bn
from tests import test_case
from tests.test_bn_lstm import EXACT
from tests.test_bn_lstm import ReferenceStatistics
from tests.test_bn_lstm import bn
from tests.test_bn_lstm import make_mask
from tests.test_bn_lstm import masked_moments
from tests.test_bn_lstm import named_weights
from tests.test_bn_lstm import randomize
from tests.test_bn_lstm import reference_input_term
from tests.test_bn_lstm import sigmoid

TF = keras.backend.backend() == "tensorflow"
requires_tf = pytest.mark.skipif(not TF, reason="uses tf.GradientTape")

UNITS = 3
FEATURES = 4
# The documented default.
MOMENTUM = 0.9


def reference_gru(x, w, cfg, moving, mask=None, training=True, state=None):
    """BN-GRU forward pass in float64, in the order the steps are processed.

    Args as for `tests.test_bn_lstm.reference_lstm`, with "input" and
    "recurrent" statistics and the initial state `h`.
    """
    x = np.asarray(x, np.float64)
    batch, steps, _ = x.shape
    units = w["recurrent_kernel"].shape[0]
    eps = cfg.get("epsilon", 1e-3)
    m = np.ones((batch, steps), bool) if mask is None else np.asarray(mask)
    xn = reference_input_term(x, w, cfg, moving, m, training) + w["bias"][0]
    h = np.zeros((batch, units)) if state is None else np.asarray(state)
    outputs, recurrent_stats = [], []
    for t in range(steps):
        hw = h @ w["recurrent_kernel"]
        if training:
            s = masked_moments(hw, m[:, t])
            recurrent_stats.append(s)
        else:
            s = [moving["recurrent"].row(k, t) for k in ("mean", "var")]
        hn = bn(hw, s[0], s[1], w["recurrent_gamma"], eps) + w["bias"][1]
        x_z, x_r, x_h = np.split(xn[:, t], 3, axis=-1)
        h_z, h_r, h_h = np.split(hn, 3, axis=-1)
        z, r = sigmoid(x_z + h_z), sigmoid(x_r + h_r)
        h_new = z * h + (1 - z) * np.tanh(x_h + r * h_h)
        h = np.where(m[:, t : t + 1], h_new, h)
        outputs.append(h)
    if training:
        moving["recurrent"].update(recurrent_stats)
    return np.stack(outputs, axis=1), h


def reference_moving(rows, momentum, statistics="per_step"):
    input_rows = rows if statistics == "per_step" else 1
    return {
        "input": ReferenceStatistics(input_rows, 3 * UNITS, momentum),
        "recurrent": ReferenceStatistics(rows, 3 * UNITS, momentum),
    }


REFERENCE_GRID = (
    ("per_step", {}, 5, False),
    ("shared_mask", {"statistics": "shared", "momentum": 0.9}, 5, True),
    ("go_backwards_mask", {"go_backwards": True}, 5, True),
    ("beyond_max_timesteps", {"max_timesteps": 3, "momentum": 0.5}, 6, True),
)


class ReferenceTest(test_case.LayerTestCase):
    @parameterized.named_parameters(*REFERENCE_GRID)
    def test_training_steps_and_longer_inference(self, cfg, steps, masked):
        rng = np.random.default_rng(3)
        batch = 8
        layer = keras_bn.BNGRU(
            UNITS, return_sequences=True, return_state=True, **cfg, **EXACT
        )
        layer.build((batch, steps, FEATURES))
        randomize(layer, rng)
        w = named_weights(layer)
        rows = cfg.get("max_timesteps", steps)
        moving = reference_moving(
            rows,
            cfg.get("momentum", MOMENTUM),
            cfg.get("statistics", "per_step"),
        )
        flip = cfg.get("go_backwards", False)
        for step in range(3):
            x = rng.normal(step * 0.5, 1.0 + step, (batch, steps, FEATURES))
            mask = make_mask(rng, batch, steps) if masked else None
            outputs, h = layer(x.astype("float32"), training=True, mask=mask)
            expected, eh = reference_gru(
                x[:, ::-1] if flip else x, w, cfg, moving,
                None if mask is None else (mask[:, ::-1] if flip else mask),
            )
            self.assertAllClose(outputs, expected, atol=2e-5, rtol=1e-4)
            self.assertAllClose(h, eh, atol=2e-5, rtol=1e-4)
            for term in ("input", "recurrent"):
                for key, kind in (("mean", "mean"), ("var", "variance")):
                    self.assertAllClose(
                        getattr(layer.cell, f"moving_{term}_{kind}"),
                        moving[term].value(key), atol=2e-5, rtol=1e-4,
                    )
        x = rng.normal(0.5, 2.0, (batch, rows + 3, FEATURES))
        outputs, h = layer(x.astype("float32"), training=False)
        expected, eh = reference_gru(
            x[:, ::-1] if flip else x, w, cfg, moving, training=False
        )
        self.assertAllClose(outputs, expected, atol=2e-5, rtol=1e-4)

    def test_keras_gru_weights_move_across(self):
        layer = keras_bn.BNGRU(UNITS)
        core = keras.layers.GRU(UNITS)
        layer.build((2, 5, FEATURES))
        core.build((2, 5, FEATURES))
        layer.set_weights(
            core.get_weights()
            + [keras.ops.convert_to_numpy(w) for w in layer.weights[3:]]
        )
        for a, b in zip(layer.weights[:3], core.weights):
            self.assertAllClose(a, b, atol=0, rtol=0)


@requires_tf
class GradientTest(test_case.LayerTestCase):
    def test_gradients_match_finite_differences(self):
        import tensorflow as tf

        rng = np.random.default_rng(6)
        x = rng.normal(size=(6, 4, 2))
        mask = np.ones((6, 4), bool)
        mask[:2, 3:] = False
        probe = rng.normal(size=(6, 4, UNITS))
        layer = keras_bn.BNGRU(
            UNITS, return_sequences=True, dtype="float64", **EXACT
        )
        layer.build(x.shape)
        randomize(layer, rng)

        @tf.function
        def loss():
            y = layer(x, training=True, mask=mask)
            return tf.reduce_sum(y * probe)

        with tf.GradientTape() as tape:
            value = loss()
        grads = tape.gradient(value, layer.trainable_weights)
        delta = 1e-6
        for weight, grad in zip(layer.trainable_weights, grads):
            original = weight.numpy()
            flat = original.reshape(-1)
            for index in rng.choice(flat.size, min(4, flat.size), False):
                shifted = []
                for sign in (1.0, -1.0):
                    bumped = flat.copy()
                    bumped[index] += sign * delta
                    weight.assign(bumped.reshape(original.shape))
                    shifted.append(float(loss()))
                weight.assign(original)
                numeric = (shifted[0] - shifted[1]) / (2 * delta)
                self.assertAllClose(
                    np.asarray(grad).reshape(-1)[index], numeric,
                    atol=1e-6, rtol=1e-5, msg=f"{weight.name}[{index}]",
                )


class IntegrationTest(test_case.LayerTestCase):
    def test_layer_harness(self):
        rng = np.random.default_rng(9)
        self.run_layer_test(
            keras_bn.BNGRU,
            {
                "units": UNITS, "return_sequences": True, "dropout": 0.1,
                "recurrent_dropout": 0.1, "max_timesteps": 3, "seed": 2,
            },
            input_shape=(8, 5, FEATURES),
            call_kwargs={"mask": make_mask(rng, 8, 5)},
            expected_num_trainable_weights=5,
            expected_num_non_trainable_weights=6,
        )

    @pytest.mark.slow
    def test_jit_compile_equals_eager(self):
        rng = np.random.default_rng(10)
        x = rng.normal(size=(8, 5, FEATURES)).astype("float32")
        y = rng.normal(size=(8, 2)).astype("float32")
        results = []
        for jit in (False, True):
            keras.utils.set_random_seed(0)
            model = keras.Sequential(
                [
                    keras.Input((5, FEATURES)),
                    keras.layers.Bidirectional(
                        keras_bn.BNGRU(2, statistics="shared", **EXACT)
                    ),
                ]
            )
            model.compile("adam", "mse", jit_compile=jit)
            model.fit(x, np.tile(y, 2), batch_size=4, shuffle=False,
                      verbose=0)
            results.append((model.predict(x, verbose=0), model.get_weights()))
        self.assertAllClose(results[1][0], results[0][0], atol=1e-5)
        for a, b in zip(results[0][1], results[1][1]):
            self.assertAllClose(b, a, atol=1e-5)

    def test_moving_statistics_change_after_fit(self):
        rng = np.random.default_rng(8)
        x = rng.normal(size=(32, 5, FEATURES)).astype("float32")
        model = keras.Sequential(
            [keras.Input((5, FEATURES)), keras_bn.BNGRU(UNITS)]
        )
        model.compile("sgd", "mse")
        cell = model.layers[0].cell
        before = [
            keras.ops.convert_to_numpy(v).copy()
            for v in cell.non_trainable_weights
        ]
        model.fit(x, np.zeros((32, UNITS)), batch_size=16, verbose=0)
        for v, old in zip(cell.non_trainable_weights, before):
            self.assertFalse(
                np.allclose(keras.ops.convert_to_numpy(v), old), v.name
            )


class ValidationTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("units", {"units": 0}, "units=0"),
        ("max_timesteps", {"max_timesteps": -1}, "max_timesteps=-1"),
        ("statistics", {"statistics": "time"}, "statistics='time'"),
    )
    def test_bad_arguments(self, kwargs, received):
        kwargs = {"units": UNITS, **kwargs}
        with self.assertRaisesRegex(ValueError, "Received: .*" + received):
            keras_bn.BNGRU(**kwargs)

    def test_non_3d_input(self):
        with self.assertRaisesRegex(
            ValueError, r"3D inputs.*Received: input_shape=\(8, 4\)"
        ):
            keras_bn.BNGRU(UNITS)(np.zeros((8, 4), "float32"))


class StatefulTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("chunks_of_1", 1), ("chunks_of_7", 7),
        ("chunks_longer_than_max_timesteps", 5),
    )
    def test_chunked_equals_whole_in_inference(self, chunk):
        rng = np.random.default_rng(30)
        base = keras_bn.BNGRU(UNITS, return_sequences=True, max_timesteps=4)
        base.build((8, 4, FEATURES))
        randomize(base, rng)
        for scale in (1.0, 2.0):
            base(rng.normal(0.5, scale, (8, 4, FEATURES)).astype("float32"),
                 training=True)
        stream = rng.normal(0.5, 2.0, (2, 11, FEATURES)).astype("float32")
        whole = keras.ops.convert_to_numpy(base(stream))
        layer = keras_bn.BNGRU.from_config(
            {**base.get_config(), "stateful": True}
        )
        layer.build((2, None, FEATURES))
        layer.set_weights(base.get_weights())
        parts = [
            keras.ops.convert_to_numpy(layer(stream[:, i : i + chunk]))
            for i in range(0, 11, chunk)
        ]
        self.assertAllClose(np.concatenate(parts, axis=1), whole, atol=1e-6)
        layer.reset_state()
        self.assertAllClose(layer(stream[:, :3]), whole[:, :3], atol=1e-6)

    def test_training_on_chunks_follows_the_stream(self):
        rng = np.random.default_rng(31)
        layer = keras_bn.BNGRU(
            UNITS, return_sequences=True, stateful=True, max_timesteps=4,
            **EXACT,
        )
        layer.build((8, None, FEATURES))
        randomize(layer, rng)
        w = named_weights(layer)
        whole_moving = reference_moving(4, MOMENTUM)
        x = rng.normal(0.5, 2.0, (8, 6, FEATURES))
        expected, _ = reference_gru(x, w, {}, whole_moving)
        outputs = [
            keras.ops.convert_to_numpy(layer(chunk, training=True))
            for chunk in (x[:, :2].astype("float32"),
                          x[:, 2:].astype("float32"))
        ]
        # The outputs equal one pass over the whole stream; the first
        # chunk updated rows 0 and 1, the second rows 2 and 3.
        self.assertAllClose(
            np.concatenate(outputs, axis=1), expected, atol=2e-5, rtol=1e-4
        )
        np.testing.assert_array_equal(layer.cell.step_updates, 1)
        for term in ("input", "recurrent"):
            self.assertAllClose(
                getattr(layer.cell, f"moving_{term}_mean"),
                whole_moving[term].value("mean"), atol=2e-5, rtol=1e-4,
            )

    def test_unroll_equals_loop(self):
        rng = np.random.default_rng(32)
        x = rng.normal(size=(8, 5, FEATURES)).astype("float32")
        layers = [
            keras_bn.BNGRU(UNITS, unroll=u, **EXACT) for u in (False, True)
        ]
        for layer in layers:
            layer.build(x.shape)
        randomize(layers[0], rng)
        layers[1].set_weights(layers[0].get_weights())
        for training in (True, False):
            self.assertAllClose(
                layers[1](x, training=training),
                layers[0](x, training=training), atol=1e-6,
            )
