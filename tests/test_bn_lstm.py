"""Tests of keras_bn.BNLSTM and keras_bn.BNLSTMCell.

The reference is a float64 NumPy implementation of the equations of
Cooijmans et al. (2016), step by step, written from the paper and the
layer's documented rules (per-step statistics, the last kept step for later
steps, bias-corrected moving averages), not from the layer's code.
"""

import inspect
import os
import tempfile

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_bn
from keras_bn import _recurrent_paths
from tests import test_case

TF = keras.backend.backend() == "tensorflow"
requires_tf = pytest.mark.skipif(
    not TF, reason="uses tf.GradientTape and tf.distribute"
)

UNITS = 3
FEATURES = 4
# The documented default.
MOMENTUM = 0.9
# The tests that compare training calls with the NumPy reference, or with
# each other, turn off the noise on the initial state (random, and on by
# default); `InitialStateNoiseTest` checks the noise itself.
EXACT = {"initial_state_noise": 0.0}


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def masked_moments(v, m):
    """Mean and biased variance over axis 0 of `v` where `m`, and the count."""
    w = m.reshape(m.shape + (1,) * (v.ndim - m.ndim)).astype(np.float64)
    n = w.sum(axis=0)
    mean = (v * w).sum(axis=0) / np.maximum(n, 1)
    var = (w * (v - mean) ** 2).sum(axis=0) / np.maximum(n, 1)
    return mean, var, float(m.sum())


class ReferenceStatistics:
    """Per-step moving statistics as the documented bias-corrected average.

    Keeps the plain exponential averages `u` (starting at zero) and the
    number of updates `n` of every row, and reports `u / (1 - momentum**n)`.
    """

    def __init__(self, rows, width, momentum):
        self.momentum = momentum
        self.sums = {k: np.zeros((rows, width)) for k in ("mean", "var")}
        self.n = np.zeros(rows)

    def update(self, step_stats):
        """`step_stats`: one `(mean, var, count)` per step, in step order."""
        rows = len(self.n)
        for row in range(rows):
            steps = [
                s for t, s in enumerate(step_stats)
                if min(t, rows - 1) == row and s[2] > 0
            ]
            if not steps:
                continue
            for i, key in enumerate(("mean", "var")):
                value = np.mean([s[i] for s in steps], axis=0)
                self.sums[key][row] = (
                    self.momentum * self.sums[key][row]
                    + (1 - self.momentum) * value
                )
            self.n[row] += 1

    def value(self, key):
        n = self.n[:, None]
        weight = np.where(n > 0, 1 - self.momentum ** n, 1.0)
        initial = 0.0 if key == "mean" else 1.0
        return np.where(n > 0, self.sums[key] / weight, initial)

    def row(self, key, t):
        return self.value(key)[min(t, len(self.n) - 1)]


def bn(v, mean, var, gamma, eps, beta=0.0):
    return gamma * (v - mean) / np.sqrt(var + eps) + beta


def stream_update(statistics, step_stats, start):
    """Updates with the statistics of steps `start, start + 1, ...`."""
    statistics.update([(0.0, 0.0, 0.0)] * start + list(step_stats))


def reference_input_term(x, w, cfg, moving, m, training, start=0):
    """`BN(W_x x; gamma_x)` for every step; updates the input statistics.

    `start` is the stream's index of the first step of `x`.
    """
    batch, steps, _ = x.shape
    eps = cfg.get("epsilon", 1e-3)
    xw = x @ w["kernel"]
    gamma = w["input_gamma"]
    shared = cfg.get("statistics", "per_step") == "shared"
    if training and shared:
        stats = masked_moments(xw.reshape(batch * steps, -1), m.reshape(-1))
        moving["input"].update([stats])
        return bn(xw, stats[0], stats[1], gamma, eps)
    if training:
        stats = [masked_moments(xw[:, t], m[:, t]) for t in range(steps)]
        stream_update(moving["input"], stats, start)
    else:
        stats = [
            [moving["input"].row(k, 0 if shared else start + t)
             for k in ("mean", "var")]
            for t in range(steps)
        ]
    return np.stack(
        [bn(xw[:, t], s[0], s[1], gamma, eps) for t, s in enumerate(stats)],
        axis=1,
    )


def reference_lstm(
    x, w, cfg, moving, mask=None, training=True, state=None, start=0
):
    """BN-LSTM forward pass in float64, in the order the steps are processed.

    Args:
        x: `(batch, time, features)`, already reversed for `go_backwards`.
        w: Dict of the layer's weights by name.
        cfg: Dict with `statistics` and `epsilon`.
        moving: Dict of `ReferenceStatistics` for "input", "recurrent" and
            "cell"; updated in training.
        mask: Optional `(batch, time)` boolean array.
        training: Batch statistics and updates, or the moving statistics.
        state: Optional initial `(h, c)`.
        start: The stream's index of the first step of `x`.

    Returns:
        The hidden state of every step and the final `(h, c)`.
    """
    x = np.asarray(x, np.float64)
    batch, steps, _ = x.shape
    units = w["recurrent_kernel"].shape[0]
    eps = cfg.get("epsilon", 1e-3)
    m = np.ones((batch, steps), bool) if mask is None else np.asarray(mask)
    xn = reference_input_term(x, w, cfg, moving, m, training, start)
    if state is None:
        h, c = np.zeros((batch, units)), np.zeros((batch, units))
    else:
        h, c = (np.asarray(s, np.float64) for s in state)
    outputs, recurrent_stats, cell_stats = [], [], []
    for t in range(steps):
        hw = h @ w["recurrent_kernel"]
        if training:
            s = masked_moments(hw, m[:, t])
            recurrent_stats.append(s)
        else:
            s = [
                moving["recurrent"].row(k, start + t) for k in ("mean", "var")
            ]
        z = xn[:, t] + bn(hw, s[0], s[1], w["recurrent_gamma"], eps)
        z = z + w["bias"]
        i, f, g, o = np.split(z, 4, axis=-1)
        c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        if training:
            s = masked_moments(c_new, m[:, t])
            cell_stats.append(s)
        else:
            s = [moving["cell"].row(k, start + t) for k in ("mean", "var")]
        cn = bn(c_new, s[0], s[1], w["cell_gamma"], eps, w["cell_beta"])
        h_new = sigmoid(o) * np.tanh(cn)
        keep = m[:, t : t + 1]
        h, c = np.where(keep, h_new, h), np.where(keep, c_new, c)
        outputs.append(h)
    if training:
        stream_update(moving["recurrent"], recurrent_stats, start)
        stream_update(moving["cell"], cell_stats, start)
    return np.stack(outputs, axis=1), (h, c)


def named_weights(layer):
    return {
        w.name: keras.ops.convert_to_numpy(w).astype(np.float64)
        for w in layer.weights
    }


def randomize(layer, rng):
    """Gammas and betas away from their initial values, so they matter."""
    weights = []
    for w in layer.weights:
        value = keras.ops.convert_to_numpy(w)
        if w.name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, w.shape)
        elif w.name in ("cell_beta", "bias"):
            value = rng.normal(0.0, 0.5, w.shape)
        weights.append(value)
    layer.set_weights(weights)


def reference_moving(rows, momentum, statistics="per_step", units=UNITS):
    input_rows = rows if statistics == "per_step" else 1
    return {
        "input": ReferenceStatistics(input_rows, 4 * units, momentum),
        "recurrent": ReferenceStatistics(rows, 4 * units, momentum),
        "cell": ReferenceStatistics(rows, units, momentum),
    }


def assert_moving_statistics(test, layer, moving):
    cell = layer.cell
    for term in ("input", "recurrent", "cell"):
        for key, kind in (("mean", "mean"), ("var", "variance")):
            test.assertAllClose(
                getattr(cell, f"moving_{term}_{kind}"),
                moving[term].value(key), atol=2e-5, rtol=1e-4,
                msg=f"moving_{term}_{kind}",
            )


def make_mask(rng, batch, steps):
    """Variable lengths (post-padding) plus a few holes; never all empty."""
    lengths = rng.integers(2, steps + 1, batch)
    mask = np.arange(steps)[None, :] < lengths[:, None]
    mask[1, 0] = False
    mask[0] = True
    return mask


# Config, timesteps in training, whether to mask.
REFERENCE_GRID = (
    ("per_step", {}, 5, False),
    ("per_step_mask", {"momentum": 0.9}, 5, True),
    ("shared", {"statistics": "shared"}, 5, False),
    ("shared_mask", {"statistics": "shared", "epsilon": 1e-5}, 6, True),
    ("go_backwards", {"go_backwards": True}, 5, False),
    ("go_backwards_mask", {"go_backwards": True, "momentum": 0.5}, 5, True),
    ("beyond_max_timesteps", {"max_timesteps": 3}, 6, False),
    ("beyond_max_timesteps_mask", {"max_timesteps": 4}, 6, True),
)


# The training loops, and the `written_gradient` that forces each.
LOOPS = {"generic": False, "written": True}


def over_loops(grid):
    """`grid`'s named parameters, each with every loop as a last one."""
    return [
        (f"{name}_{loop}", *rest, loop) for name, *rest in grid
        for loop in LOOPS
    ]


def loop_argument(test, loop):
    """The layer argument that forces `loop`; skips where it cannot run."""
    if loop == "written" and keras.backend.backend() == "torch":
        test.skipTest("the written gradient runs on TensorFlow and JAX")
    return {"written_gradient": LOOPS[loop]}


class ReferenceTest(test_case.LayerTestCase):
    @parameterized.named_parameters(*over_loops(REFERENCE_GRID))
    def test_training_steps_and_longer_inference(
        self, cfg, steps, masked, loop
    ):
        rng = np.random.default_rng(3)
        batch = 8
        layer = keras_bn.BNLSTM(
            UNITS, return_sequences=True, return_state=True, **cfg,
            **loop_argument(self, loop), **EXACT,
        )
        self.assertEqual(layer.loop_path().name, loop)
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
            outputs, h, c = layer(
                x.astype("float32"), training=True, mask=mask
            )
            expected, (eh, ec) = reference_lstm(
                x[:, ::-1] if flip else x, w, cfg, moving,
                None if mask is None else (mask[:, ::-1] if flip else mask),
            )
            self.assertAllClose(outputs, expected, atol=2e-5, rtol=1e-4)
            self.assertAllClose(h, eh, atol=2e-5, rtol=1e-4)
            self.assertAllClose(c, ec, atol=2e-5, rtol=1e-4)
            assert_moving_statistics(self, layer, moving)
        # Inference on sequences longer than any kept step.
        longer = rows + 3
        x = rng.normal(0.5, 2.0, (batch, longer, FEATURES))
        outputs, h, c = layer(x.astype("float32"), training=False)
        expected, (eh, ec) = reference_lstm(
            x[:, ::-1] if flip else x, w, cfg, moving, training=False
        )
        self.assertAllClose(outputs, expected, atol=2e-5, rtol=1e-4)
        self.assertAllClose(c, ec, atol=2e-5, rtol=1e-4)

    def test_initial_state(self):
        rng = np.random.default_rng(4)
        layer = keras_bn.BNLSTM(UNITS, return_state=True, **EXACT)
        x = rng.normal(size=(8, 4, FEATURES))
        state = [rng.normal(size=(8, UNITS)) for _ in range(2)]
        layer.build(x.shape)
        randomize(layer, rng)
        w = named_weights(layer)
        h, _, c = layer(
            x.astype("float32"),
            initial_state=[s.astype("float32") for s in state],
            training=True,
        )
        _, (eh, ec) = reference_lstm(
            x, w, {}, reference_moving(4, MOMENTUM), state=state
        )
        self.assertAllClose(h, eh, atol=2e-5, rtol=1e-4)
        self.assertAllClose(c, ec, atol=2e-5, rtol=1e-4)

    def test_population_set_to_batch_statistics_reproduces_training(self):
        # The first update of a bias-corrected average is the batch's own
        # statistics, whatever the momentum.
        rng = np.random.default_rng(5)
        x = rng.normal(1.0, 2.0, (8, 5, FEATURES)).astype("float32")
        layer = keras_bn.BNLSTM(
            UNITS, return_sequences=True, momentum=0.99, **EXACT
        )
        layer.build(x.shape)
        randomize(layer, rng)
        train = layer(x, training=True)
        self.assertAllClose(
            layer(x, training=False), train, atol=1e-6, rtol=1e-5
        )

    def test_keras_lstm_weights_move_across(self):
        # The kernels and bias have keras.layers.LSTM's shapes (and its
        # (i, f, g, o) gate order): the forget-gate bias starts at 1.
        layer = keras_bn.BNLSTM(UNITS)
        core = keras.layers.LSTM(UNITS)
        layer.build((2, 5, FEATURES))
        core.build((2, 5, FEATURES))
        self.assertEqual(
            [tuple(w.shape) for w in layer.trainable_weights[:3]],
            [tuple(w.shape) for w in core.trainable_weights],
        )
        bias = named_weights(layer)["bias"]
        np.testing.assert_array_equal(bias[UNITS : 2 * UNITS], 1.0)
        np.testing.assert_array_equal(bias[:UNITS], 0.0)
        np.testing.assert_array_equal(bias[2 * UNITS :], 0.0)
        for name in ("input_gamma", "recurrent_gamma", "cell_gamma"):
            np.testing.assert_allclose(named_weights(layer)[name], 0.1)


@requires_tf
class GradientTest(test_case.LayerTestCase):
    @parameterized.named_parameters(*over_loops(
        (("per_step", {}), ("shared_mask", {"statistics": "shared"}))
    ))
    def test_gradients_match_finite_differences(self, cfg, loop):
        import tensorflow as tf

        rng = np.random.default_rng(6)
        x = rng.normal(size=(6, 4, 2))
        mask = np.ones((6, 4), bool)
        mask[:2, 3:] = False
        probe = rng.normal(size=(6, 4, UNITS))
        layer = keras_bn.BNLSTM(
            UNITS, return_sequences=True, dtype="float64", **cfg,
            **loop_argument(self, loop), **EXACT,
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


    def test_written_gradient_equals_differentiated_loop(self):
        # Both loops give the same gradients of every input and weight, and
        # the same statistics.
        import tensorflow as tf

        rng = np.random.default_rng(11)
        x = tf.constant(rng.normal(size=(6, 5, 2)))
        mask = np.ones((6, 5), bool)
        mask[:2, 3:] = False
        mask[:, 4] = False
        probes = [rng.normal(size=s) for s in ((6, 5, UNITS), (6, UNITS))]
        results, weights = [], None
        for loop in LOOPS:
            layer = keras_bn.BNLSTM(
                UNITS, return_sequences=True, return_state=True,
                recurrent_dropout=0.3, initial_state_noise=0.1, seed=3,
                dtype="float64", **loop_argument(self, loop),
            )
            layer.build(x.shape)
            if weights is None:
                randomize(layer, rng)
                weights = layer.get_weights()
            layer.set_weights(weights)

            @tf.function
            def gradients(layer=layer):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y, _, c = layer(x, training=True, mask=mask)
                    loss = tf.reduce_sum(y * probes[0]) + tf.reduce_sum(
                        c * probes[1]
                    )
                return tape.gradient(loss, [x] + layer.trainable_weights)

            results.append(
                [np.asarray(g) for g in gradients()]
                + [np.asarray(v) for v in layer.non_trainable_weights]
            )
        for written, differentiated in zip(*results):
            self.assertAllClose(written, differentiated, atol=1e-10)


class LoopPathTest(test_case.LayerTestCase):
    def test_default_takes_the_written_loop_where_it_serves(self):
        layer = keras_bn.BNLSTM(UNITS)
        expected = "generic" if keras.backend.backend() == "torch" else (
            "written"
        )
        self.assertEqual(layer.loop_path().name, expected)
        self.assertEqual(layer.loop_path(training=False).name, "generic")
        self.assertEqual(keras_bn.BNGRU(UNITS).loop_path().name, "generic")
        self.assertIn(
            "no written gradient", keras_bn.BNGRU(UNITS).loop_path().reason
        )

    def test_other_activations_take_the_generic_loop(self):
        kwargs = {"activation": lambda v: keras.ops.tanh(v)}
        path = keras_bn.BNLSTM(UNITS, **kwargs).loop_path()
        self.assertEqual(path.name, "generic")
        self.assertIn("activation='tanh'", path.reason)
        with self.assertRaisesRegex(
            ValueError, r"paper's activations.*Received: "
            r"written_gradient=True",
        ):
            keras_bn.BNLSTM(UNITS, written_gradient=True, **kwargs)
        path = keras_bn.BNLSTM(UNITS, written_gradient=False).loop_path()
        self.assertEqual(str(path), "generic: written_gradient=False")

    @pytest.mark.skipif(
        keras.backend.backend() != "torch", reason="the torch backend"
    )
    def test_torch_refuses_the_written_loop(self):
        with self.assertRaisesRegex(
            ValueError, r"torch backend.*Received: written_gradient=True"
        ):
            keras_bn.BNLSTM(UNITS, written_gradient=True)

    def test_step_normalization(self):
        # PyTorch's kernel normalizes the unmasked steps on the torch
        # backend; the `keras.ops` step does the rest.
        backend = keras.backend.backend()
        unmasked = _recurrent_paths.choose_step_normalization(backend, False)
        masked = _recurrent_paths.choose_step_normalization(backend, True)
        self.assertEqual(
            unmasked.name, "torch" if backend == "torch" else "ops"
        )
        self.assertEqual(masked.name, "ops")
        self.assertIn("no mask" if backend == "torch" else backend,
                      masked.reason)

    def test_config_round_trip(self):
        layer = keras_bn.BNLSTM(UNITS, written_gradient=False)
        config = layer.get_config()
        self.assertIs(config["written_gradient"], False)
        revived = keras_bn.BNLSTM.from_config(config)
        self.assertIs(revived.written_gradient, False)
        self.assertEqual(revived.get_config(), config)


def autodiff_gradient(loss, values):
    """The gradient of `loss(values)` by the backend's own autodiff."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.grad(loss)(values)
    leaves = [v.detach().clone().requires_grad_(True) for v in values]
    loss(leaves).backward()
    return [leaf.grad.cpu().numpy() for leaf in leaves]


@pytest.mark.skipif(
    TF, reason="TensorFlow's gradients are checked in float64 above"
)
class AutodiffGradientTest(test_case.LayerTestCase):
    """JAX's and PyTorch's gradients of a training call, against central
    differences: with a mask (the `keras.ops` step) and without (on
    PyTorch, PyTorch's kernel normalizes each step)."""

    @parameterized.named_parameters(
        (f"{name}_{'masked' if masked else 'unmasked'}", cls, kwargs, masked)
        for name, cls, kwargs in (
            ("lstm_generic", keras_bn.BNLSTM, {"written_gradient": False}),
            ("lstm_written", keras_bn.BNLSTM, {"written_gradient": True}),
            ("gru", keras_bn.BNGRU, {}),
        )
        for masked in (True, False)
    )
    def test_gradients_match_finite_differences(self, cls, kwargs, masked):
        if kwargs.get("written_gradient") and not (
            keras.backend.backend() == "jax"
        ):
            self.skipTest("the written gradient runs on TensorFlow and JAX")
        # In float32 (JAX's default): central differences over a step of
        # 2e-3 are good to about 1 %; a missing term of the
        # batch-normalization gradient is off by far more.
        rng = np.random.default_rng(7)
        x = rng.normal(size=(6, 4, 2)).astype("float32")
        mask = None
        if masked:
            mask = np.ones((6, 4), bool)
            mask[:2, 3:] = False
        layer = cls(UNITS, return_sequences=True, **kwargs)
        layer.build(x.shape)
        randomize(layer, rng)
        probe = rng.normal(size=(6, 4, UNITS)).astype("float32")
        fixed = [v.value for v in layer.non_trainable_variables]

        def loss(values):
            y, _ = layer.stateless_call(
                values, fixed, x, training=True, mask=mask
            )
            return (y * keras.ops.convert_to_tensor(probe)).sum()

        values = [v.value for v in layer.trainable_variables]
        grads = autodiff_gradient(loss, values)
        delta = 2e-3
        for i, (value, grad) in enumerate(zip(values, grads)):
            flat = keras.ops.convert_to_numpy(value).astype(np.float64)
            flat = flat.reshape(-1)
            for index in rng.choice(flat.size, min(4, flat.size), False):
                shifted = []
                for sign in (1.0, -1.0):
                    bumped = flat.copy()
                    bumped[index] += sign * delta
                    moved = list(values)
                    moved[i] = keras.ops.convert_to_tensor(
                        bumped.reshape(value.shape).astype("float32")
                    )
                    shifted.append(float(loss(moved)))
                numeric = (shifted[0] - shifted[1]) / (2 * delta)
                self.assertAllClose(
                    np.asarray(grad).reshape(-1)[index], numeric,
                    atol=2e-3, rtol=2e-2,
                    msg=f"{layer.trainable_variables[i].name}[{index}]",
                )


def toy_task(rng, n):
    """Is the sum of feature 0 over time positive (with a margin)?"""
    x = rng.normal(0.0, 1.0, (2 * n, 8, 2)).astype("float32")
    total = x[..., 0].sum(axis=1)
    keep = np.abs(total) > 1.0
    return x[keep][:n], (total[keep][:n] > 0).astype("int32")


class PopulationStatisticsTest(test_case.LayerTestCase):
    def set_statistics(self, layer, moving):
        values = {}
        for term in ("input", "recurrent", "cell"):
            values[f"moving_{term}_mean"] = moving[term].value("mean")
            values[f"moving_{term}_variance"] = moving[term].value("var")
        layer.set_weights(
            [values.get(v.name, keras.ops.convert_to_numpy(v))
             for v in layer.weights]
        )

    @pytest.mark.slow
    def test_moving_statistics_match_recomputed_after_short_fit(self):
        rng = np.random.default_rng(9)
        x, y = toy_task(rng, 512)
        x_test, y_test = toy_task(rng, 512)
        model = keras.Sequential(
            [
                keras.Input((8, 2)),
                keras_bn.BNLSTM(8),
                keras.layers.Dense(2, activation="softmax"),
            ]
        )
        model.compile(
            keras.optimizers.Adam(0.003),
            "sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        model.fit(x, y, batch_size=32, epochs=6, verbose=0)
        lstm = model.layers[0]
        loss, accuracy = model.evaluate(x_test, y_test, verbose=0)

        # Statistics recomputed by the NumPy reference over all the training
        # data with the trained weights.
        exact = reference_moving(8, 0.0, units=8)
        reference_lstm(x, named_weights(lstm), {}, exact)
        self.set_statistics(lstm, exact)
        exact_loss, exact_accuracy = model.evaluate(x_test, y_test, verbose=0)
        self.assertGreater(exact_accuracy, 0.95)
        # Within one accuracy point, or at most 2 % worse in loss (a loss
        # below the recomputed one is no defect of the moving statistics).
        self.assertTrue(
            abs(accuracy - exact_accuracy) <= 0.01
            or loss <= 1.02 * exact_loss,
            f"moving: {accuracy=}, {loss=}; recomputed: {exact_accuracy=}, "
            f"{exact_loss=}",
        )

        # What a plain moving average still holds after a short fit: its
        # initial values. The task tells them apart.
        self.set_statistics(lstm, reference_moving(8, 0.0, units=8))
        _, initial_accuracy = model.evaluate(x_test, y_test, verbose=0)
        self.assertGreater(exact_accuracy - initial_accuracy, 0.2)

    def test_moving_statistics_change_after_fit(self):
        rng = np.random.default_rng(8)
        x, y = toy_task(rng, 64)
        model = keras.Sequential(
            [keras.Input((8, 2)), keras_bn.BNLSTM(4), keras.layers.Dense(1)]
        )
        model.compile("sgd", "mse")
        cell = model.layers[0].cell
        before = {
            v.name: keras.ops.convert_to_numpy(v).copy()
            for v in cell.non_trainable_weights
        }
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        for v in cell.non_trainable_weights:
            after = keras.ops.convert_to_numpy(v)
            self.assertFalse(np.allclose(after, before[v.name]), v.name)
        np.testing.assert_array_equal(cell.step_updates, 4)


@pytest.mark.skipif(not TF, reason="recompute_statistics needs TensorFlow")
class RecomputeStatisticsTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("per_step", "per_step"), ("shared", "shared")
    )
    def test_rows_become_equal_weight_averages(self, statistics):
        rng = np.random.default_rng(12)
        batches = [rng.normal(0.5, 1.0, (8, 5, 2)) for _ in range(3)]
        layer = keras_bn.BNLSTM(
            UNITS, max_timesteps=4, statistics=statistics,
            return_sequences=True, **EXACT,
        )
        layer.build((None, 5, 2))
        randomize(layer, rng)
        weights = named_weights(layer.cell)
        before = {
            v.name: keras.ops.convert_to_numpy(v)
            for v in layer.trainable_weights
        }
        keras_bn.recompute_statistics(
            layer, [b.astype("float32") for b in batches], verbose=0
        )
        cfg = {"statistics": statistics}
        per_batch = []
        for x in batches:
            moving = reference_moving(4, 0.0, statistics)
            reference_lstm(x, weights, cfg, moving)
            per_batch.append(moving)
        for term in ("input", "recurrent", "cell"):
            for key, kind in (("mean", "mean"), ("var", "variance")):
                expected = np.mean(
                    [m[term].value(key) for m in per_batch], axis=0
                )
                self.assertAllClose(
                    getattr(layer.cell, f"moving_{term}_{kind}"), expected,
                    atol=2e-5, rtol=1e-4, msg=f"moving_{term}_{kind}",
                )
        for v in layer.trainable_weights:
            self.assertAllClose(v, before[v.name], atol=0, rtol=0)


class IntegrationTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("default", {}, None),
        ("shared_mask_dropout", {
            "statistics": "shared", "return_sequences": True,
            "go_backwards": True, "dropout": 0.2, "recurrent_dropout": 0.2,
            "initial_state_noise": 0.1, "max_timesteps": 3, "seed": 1,
        }, "mask"),
    )
    def test_layer_harness(self, cfg, mask):
        rng = np.random.default_rng(9)
        call_kwargs = {}
        if mask:
            call_kwargs["mask"] = make_mask(rng, 8, 5)
        self.run_layer_test(
            keras_bn.BNLSTM,
            {"units": UNITS, **cfg},
            input_shape=(8, 5, FEATURES),
            call_kwargs=call_kwargs,
            expected_num_trainable_weights=7,
            expected_num_non_trainable_weights=8,
        )

    @pytest.mark.slow
    def test_jit_compile_equals_eager(self):
        rng = np.random.default_rng(10)
        x = rng.normal(size=(8, 5, FEATURES)).astype("float32")
        y = rng.normal(size=(8, 2)).astype("float32")
        # A padded last step, and more steps than kept statistics.
        padded = np.concatenate([x, np.zeros((8, 1, FEATURES))], axis=1)
        results = []
        for jit in (False, True):
            keras.utils.set_random_seed(0)
            model = keras.Sequential(
                [
                    keras.Input((6, FEATURES)),
                    keras.layers.Masking(),
                    keras_bn.BNLSTM(2, max_timesteps=3, **EXACT),
                ]
            )
            model.compile("adam", "mse", jit_compile=jit)
            model.fit(
                padded, y, batch_size=4, shuffle=False, epochs=1, verbose=0
            )
            results.append(
                (model.predict(padded, verbose=0), model.get_weights())
            )
        self.assertAllClose(results[1][0], results[0][0], atol=1e-5)
        for a, b in zip(results[0][1], results[1][1]):
            self.assertAllClose(b, a, atol=1e-5)

    def test_bidirectional_and_stacked(self):
        rng = np.random.default_rng(11)
        x = rng.normal(size=(8, 5, FEATURES)).astype("float32")
        mask = make_mask(rng, 8, 5)
        bidirectional = keras.layers.Bidirectional(
            keras_bn.BNLSTM(UNITS, return_sequences=True, **EXACT)
        )
        bidirectional.build(x.shape)
        for layer in (bidirectional.forward_layer,
                      bidirectional.backward_layer):
            randomize(layer, rng)
        forward = named_weights(bidirectional.forward_layer)
        backward = named_weights(bidirectional.backward_layer)
        y = bidirectional(x, training=True, mask=mask)
        expected_forward, _ = reference_lstm(
            x, forward, {}, reference_moving(5, MOMENTUM), mask
        )
        expected_backward, _ = reference_lstm(
            x[:, ::-1], backward, {}, reference_moving(5, MOMENTUM),
            mask[:, ::-1],
        )
        expected = np.concatenate(
            [expected_forward, expected_backward[:, ::-1]], axis=-1
        )
        # Bidirectional zeroes the outputs of padded steps.
        expected = expected * mask[..., None]
        self.assertAllClose(y, expected, atol=2e-5, rtol=1e-4)

        model = keras.Sequential(
            [
                keras.Input((5, FEATURES)),
                keras.layers.Bidirectional(
                    keras_bn.BNLSTM(UNITS, return_sequences=True, **EXACT)
                ),
                keras_bn.BNLSTM(2, **EXACT),
            ]
        )
        model(x, training=True)
        expected = model(x)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            loaded = keras.saving.load_model(path)
        self.assertAllClose(loaded(x), expected, atol=1e-6)

    @requires_tf
    def test_mirrored_strategy(self):
        rng = np.random.default_rng(12)
        x = rng.normal(size=(8, 5, FEATURES)).astype("float32")
        strategy = test_case.mirrored_strategy()
        with strategy.scope():
            model = keras.Sequential(
                [keras.Input((5, FEATURES)), keras_bn.BNLSTM(UNITS, **EXACT)]
            )
            model.compile("sgd", "mse")
        w = named_weights(model.layers[0])
        model.fit(
            x, np.zeros((8, UNITS)), batch_size=8, shuffle=False, verbose=0
        )
        # Each replica normalizes its half of the batch; the moving
        # statistics receive the mean of the replicas' (first) updates.
        halves = [reference_moving(5, MOMENTUM) for _ in range(2)]
        for half, part in zip(halves, (x[:4], x[4:])):
            reference_lstm(part, w, {}, half)
        cell = model.layers[0].cell
        for term in ("input", "recurrent", "cell"):
            for key, kind in (("mean", "mean"), ("var", "variance")):
                expected = np.mean([h[term].value(key) for h in halves], 0)
                self.assertAllClose(
                    getattr(cell, f"moving_{term}_{kind}"), expected,
                    atol=2e-5, rtol=1e-4,
                )
        np.testing.assert_array_equal(cell.step_updates, 1)

    def test_cell_runs_alone(self):
        rng = np.random.default_rng(13)
        x = rng.normal(size=(8, 5, FEATURES)).astype("float32")
        cell = keras_bn.BNLSTMCell(UNITS, **EXACT)
        cell.build(x.shape)
        randomize(cell, rng)
        outputs, (h, c) = cell(x, training=True)
        layer = keras_bn.BNLSTM(UNITS, return_sequences=True, **EXACT)
        layer.build(x.shape)
        layer.set_weights(cell.get_weights())
        self.assertAllClose(outputs, layer(x, training=True), atol=1e-6)
        revived = keras_bn.BNLSTMCell.from_config(cell.get_config())
        self.assertEqual(revived.get_config(), cell.get_config())


class ValidationTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("units_zero", {"units": 0}, "units=0"),
        ("units_negative", {"units": -2}, "units=-2"),
        ("units_float", {"units": 2.5}, "units=2.5"),
        ("max_timesteps_zero", {"max_timesteps": 0}, "max_timesteps=0"),
        ("statistics", {"statistics": "global"}, "statistics='global'"),
        ("momentum", {"momentum": 1.5}, "momentum=1.5"),
        ("epsilon", {"epsilon": 0.0}, "epsilon=0.0"),
        ("dropout", {"dropout": 1.0}, "dropout=1.0"),
        ("recurrent_dropout", {"recurrent_dropout": -0.1},
         "recurrent_dropout=-0.1"),
        ("noise", {"initial_state_noise": -1.0}, "initial_state_noise=-1.0"),
        ("written_gradient", {"written_gradient": "yes"},
         "written_gradient='yes'"),
    )
    def test_bad_arguments(self, kwargs, received):
        kwargs = {"units": UNITS, **kwargs}
        with self.assertRaisesRegex(ValueError, "Received: .*" + received):
            keras_bn.BNLSTM(**kwargs)

    @parameterized.named_parameters(
        ("rank_2", (8, FEATURES)), ("rank_4", (8, 5, 2, FEATURES))
    )
    def test_non_3d_input(self, shape):
        layer = keras_bn.BNLSTM(UNITS)
        with self.assertRaisesRegex(
            ValueError, "3D inputs.*Received: input_shape=" +
            str(shape).replace("(", r"\(").replace(")", r"\)")
        ):
            layer(np.zeros(shape, "float32"))

    @parameterized.named_parameters(("inference", False), ("training", True))
    def test_no_time_step(self, training):
        # Core's `LSTM` fails here deep in its loop (`slice index 0 of
        # dimension 1 out of bounds`); this names the input.
        for layer in (keras_bn.BNLSTM(UNITS), keras_bn.BNGRU(UNITS)):
            with self.assertRaisesRegex(
                ValueError,
                r"at least one time step.*input_shape=\(2, 0, 4\)",
            ):
                layer(np.zeros((2, 0, FEATURES), "float32"), training=training)
        # A built layer called with no time step.
        layer = keras_bn.BNLSTM(UNITS)
        layer(np.zeros((2, 3, FEATURES), "float32"))
        with self.assertRaisesRegex(ValueError, "at least one time step"):
            layer(np.zeros((2, 0, FEATURES), "float32"), training=training)

    def test_unknown_timesteps_need_max_timesteps(self):
        with self.assertRaisesRegex(ValueError, "max_timesteps=None"):
            keras.Sequential(
                [keras.Input((None, FEATURES)), keras_bn.BNLSTM(UNITS)]
            )
        model = keras.Sequential(
            [keras.Input((None, FEATURES)),
             keras_bn.BNLSTM(UNITS, max_timesteps=4)]
        )
        self.assertEqual(model.layers[0].cell.moving_cell_mean.shape, (4, 3))

    def test_config_holds_the_resolved_max_timesteps(self):
        layer = keras_bn.BNLSTM(UNITS)
        self.assertIsNone(layer.get_config()["max_timesteps"])
        layer.build((2, 5, FEATURES))
        config = layer.get_config()
        self.assertEqual(config["max_timesteps"], 5)
        # Rebuilds the same weights without a known number of steps.
        copy = keras_bn.BNLSTM.from_config(config)
        copy.build((2, None, FEATURES))
        copy.set_weights(layer.get_weights())
        # Configs written with `None` still load.
        old = keras_bn.BNLSTM.from_config({**config, "max_timesteps": None})
        old.build((2, 5, FEATURES))
        self.assertEqual(old.cell.moving_cell_mean.shape, (5, UNITS))

    def test_wrong_number_of_initial_states(self):
        layer = keras_bn.BNLSTM(UNITS)
        with self.assertRaisesRegex(ValueError, "Received: 1 initial states"):
            layer(
                np.zeros((2, 3, FEATURES), "float32"),
                initial_state=[np.zeros((2, UNITS), "float32")],
            )


def stateful_copy(layer, batch, features=FEATURES):
    """A stateful layer with `layer`'s config and weights."""
    config = {
        **layer.get_config(), "stateful": True,
        "max_timesteps": layer.cell.num_slots,
    }
    copy = type(layer).from_config(config)
    copy.build((batch, None, features))
    copy.set_weights(layer.get_weights())
    return copy


def trained_layer(cls, rng, steps, **kwargs):
    """A layer with randomized weights and moving statistics from training
    on two batches, so that every row of them differs."""
    layer = cls(UNITS, return_sequences=True, **kwargs)
    layer.build((8, steps, FEATURES))
    randomize(layer, rng)
    for scale in (1.0, 2.0):
        x = rng.normal(0.5, scale, (8, steps, FEATURES)).astype("float32")
        layer(x, training=True)
    return layer


class StatefulTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("chunks_of_1", 1), ("chunks_of_7", 7),
        ("chunks_longer_than_max_timesteps", 6),
    )
    def test_chunked_equals_whole_in_inference(self, chunk):
        rng = np.random.default_rng(20)
        base = trained_layer(keras_bn.BNLSTM, rng, 4)
        w = named_weights(base)
        # 13 steps, 4 kept rows: steps 3 to 12 use the last one.
        stream = rng.normal(0.5, 2.0, (2, 13, FEATURES)).astype("float32")
        whole = keras.ops.convert_to_numpy(base(stream))
        layer = stateful_copy(base, 2)
        parts = [
            keras.ops.convert_to_numpy(layer(stream[:, i : i + chunk]))
            for i in range(0, 13, chunk)
        ]
        self.assertAllClose(np.concatenate(parts, axis=1), whole, atol=1e-6)
        self.assertEqual(int(keras.ops.convert_to_numpy(layer.time_index)), 13)
        expected, (eh, ec) = reference_lstm(
            stream, w, {}, layer_moving(base), training=False
        )
        self.assertAllClose(whole, expected, atol=2e-5, rtol=1e-4)
        self.assertAllClose(layer.states[0], eh, atol=2e-5, rtol=1e-4)
        self.assertAllClose(layer.states[1], ec, atol=2e-5, rtol=1e-4)

    def test_reset_state_restarts_the_stream(self):
        rng = np.random.default_rng(21)
        base = trained_layer(keras_bn.BNLSTM, rng, 5)
        layer = stateful_copy(base, 2)
        x = rng.normal(0.5, 2.0, (2, 3, FEATURES)).astype("float32")
        first = keras.ops.convert_to_numpy(layer(x))
        second = keras.ops.convert_to_numpy(layer(x))
        # The second call continues the stream: other states, other rows.
        self.assertGreater(np.abs(second - first).max(), 1e-3)
        layer.reset_state()
        self.assertEqual(int(keras.ops.convert_to_numpy(layer.time_index)), 0)
        for state in layer.states:
            np.testing.assert_array_equal(state, 0.0)
        self.assertAllClose(layer(x), first, atol=0, rtol=0)

    @parameterized.named_parameters(*over_loops(
        (("per_step", {}), ("shared_mask", {"statistics": "shared"}))
    ))
    def test_training_on_chunks_follows_the_stream(self, cfg, loop):
        rng = np.random.default_rng(22)
        layer = keras_bn.BNLSTM(
            UNITS, return_sequences=True, stateful=True, max_timesteps=5,
            **cfg, **loop_argument(self, loop), **EXACT,
        )
        layer.build((8, None, FEATURES))
        randomize(layer, rng)
        w = named_weights(layer)
        moving = reference_moving(
            5, MOMENTUM, cfg.get("statistics", "per_step")
        )
        state, start = None, 0
        for steps in (3, 4, 2):
            x = rng.normal(start * 0.2, 1.0 + start, (8, steps, FEATURES))
            mask = make_mask(rng, 8, steps) if cfg else None
            outputs = layer(x.astype("float32"), training=True, mask=mask)
            expected, state = reference_lstm(
                x, w, cfg, moving, mask, state=state, start=start
            )
            self.assertAllClose(outputs, expected, atol=2e-5, rtol=1e-4)
            assert_moving_statistics(self, layer, moving)
            start += steps
        # Rows 0 to 2 were updated once, rows 3 and 4 by the second chunk
        # and row 4 by the third (it also serves every later step).
        np.testing.assert_array_equal(
            layer.cell.step_updates, [1, 1, 1, 1, 2]
        )

    @requires_tf
    def test_jit_compiled_predict_carries_the_stream(self):
        rng = np.random.default_rng(23)
        base = trained_layer(keras_bn.BNLSTM, rng, 4)
        stream = rng.normal(0.5, 2.0, (2, 9, FEATURES)).astype("float32")
        whole = keras.ops.convert_to_numpy(base(stream))
        inputs = keras.Input((None, FEATURES), batch_size=2)
        layer = type(base).from_config(
            {**base.get_config(), "stateful": True, "max_timesteps": 4}
        )
        model = keras.Model(inputs, layer(inputs))
        layer.set_weights(base.get_weights())
        model.compile(jit_compile=True)
        parts = [model.predict_on_batch(stream[:, i : i + 2])
                 for i in range(0, 9, 2)]
        self.assertAllClose(np.concatenate(parts, axis=1), whole, atol=1e-5)

    @parameterized.named_parameters(("training", True), ("inference", False))
    def test_unroll_equals_loop(self, training):
        rng = np.random.default_rng(24)
        base = trained_layer(keras_bn.BNLSTM, rng, 4, **EXACT)
        unrolled = type(base).from_config(
            {**base.get_config(), "unroll": True, "max_timesteps": 4}
        )
        unrolled.build((8, 6, FEATURES))
        unrolled.set_weights(base.get_weights())
        x = rng.normal(0.5, 2.0, (8, 6, FEATURES)).astype("float32")
        mask = make_mask(rng, 8, 6)
        self.assertAllClose(
            unrolled(x, training=training, mask=mask),
            base(x, training=training, mask=mask), atol=1e-6,
        )
        for a, b in zip(unrolled.weights, base.weights):
            self.assertAllClose(a, b, atol=1e-6, msg=a.name)


def layer_moving(layer):
    """`ReferenceStatistics` holding the layer's own moving statistics."""
    cell = layer.cell
    moving = {}
    for term in ("input", "recurrent", "cell"):
        mean, var = (
            keras.ops.convert_to_numpy(getattr(cell, f"moving_{term}_{k}"))
            .astype(np.float64) for k in ("mean", "variance")
        )
        statistics = ReferenceStatistics(*mean.shape, momentum=0.0)
        statistics.sums = {"mean": mean, "var": var}
        statistics.n[:] = 1
        moving[term] = statistics
    return moving


CORE_LSTM_ARGUMENTS = {
    "units": 5, "activation": "relu", "recurrent_activation": "hard_sigmoid",
    "use_bias": False, "kernel_initializer": "he_normal",
    "recurrent_initializer": "glorot_normal", "bias_initializer": "ones",
    "unit_forget_bias": False, "kernel_regularizer": "l2",
    "recurrent_regularizer": "l1", "bias_regularizer": "l1",
    "activity_regularizer": "l2", "kernel_constraint": "non_neg",
    "recurrent_constraint": "unit_norm", "bias_constraint": "max_norm",
    "dropout": 0.1, "recurrent_dropout": 0.2, "seed": 3,
    "return_sequences": True, "return_state": True, "go_backwards": True,
    "stateful": True, "unroll": True, "use_cudnn": False,
    "trainable": False, "name": "converted",
}
PROPERTIES = (
    "units", "activation", "recurrent_activation", "use_bias",
    "kernel_initializer", "recurrent_initializer", "bias_initializer",
    "kernel_regularizer", "recurrent_regularizer", "bias_regularizer",
    "kernel_constraint", "recurrent_constraint", "bias_constraint",
    "dropout", "recurrent_dropout",
)
KERAS_BN_ARGUMENTS = {
    "max_timesteps": 7, "momentum": 0.5, "epsilon": 1e-4,
    "statistics": "shared", "input_gamma_initializer": 0.3,
    "recurrent_gamma_initializer": "ones", "initial_state_noise": 0.1,
}


def serialized(value):
    return keras.saving.serialize_keras_object(value)


class CoreCompatibilityTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("default", keras.layers.LSTM, keras_bn.BNLSTM, {"units": 4}),
        ("every_argument", keras.layers.LSTM, keras_bn.BNLSTM,
         CORE_LSTM_ARGUMENTS),
        ("gru_default", keras.layers.GRU, keras_bn.BNGRU, {"units": 4}),
        ("gru_every_argument", keras.layers.GRU, keras_bn.BNGRU,
         {**{k: v for k, v in CORE_LSTM_ARGUMENTS.items()
             if k != "unit_forget_bias"}, "reset_after": True}),
    )
    def test_core_config_loads(self, core_cls, cls, kwargs):
        core = core_cls(**kwargs)
        config = core.get_config()
        # Older files also carry `implementation`, which Keras 3 ignores.
        layer = cls.from_config({**config, "implementation": 1})
        revived = layer.get_config()
        for key, value in config.items():
            self.assertEqual(revived[key], value, key)
        self.assertEqual(cls.from_config(revived).get_config(), revived)
        for name in PROPERTIES + (("unit_forget_bias",)
                                  if core_cls is keras.layers.LSTM else ()):
            self.assertEqual(
                serialized(getattr(layer, name)),
                serialized(getattr(core, name)), name,
            )
        self.assertEqual(layer.stateful, core.stateful)
        self.assertEqual(layer.unroll, core.unroll)
        # The converted layer runs.
        x = np.random.default_rng(25).normal(size=(2, 3, FEATURES))
        outputs = layer(x.astype("float32"))
        self.assertEqual(
            tuple(keras.ops.shape(keras.tree.flatten(outputs)[0]))[-1],
            kwargs["units"],
        )

    @parameterized.named_parameters(
        ("lstm", keras.layers.LSTM, keras_bn.BNLSTM),
        ("gru", keras.layers.GRU, keras_bn.BNGRU),
    )
    def test_positional_arguments_follow_core(self, core_cls, cls):
        # Every argument by position, in core's order, as core takes them.
        names = [
            name for name in inspect.signature(core_cls.__init__).parameters
            if name not in ("self", "kwargs")
        ]
        arguments = {**CORE_LSTM_ARGUMENTS, "reset_after": True}
        values = [arguments.get(name) for name in names]
        values[names.index("use_cudnn")] = False
        layer = cls(*values)
        core = core_cls(*values)
        config = layer.get_config()
        for key, value in core.get_config().items():
            if key not in ("name", "use_cudnn"):
                self.assertEqual(config[key], value, key)
        # Python's own errors, as for core's layer: keras_bn's arguments
        # are keyword-only.
        with self.assertRaisesRegex(
            TypeError, "multiple values for argument 'activation'"
        ):
            cls(4, "relu", activation="tanh")
        with self.assertRaisesRegex(TypeError, "positional arguments"):
            cls(*values, None)

    @parameterized.named_parameters(
        ("lstm", keras.layers.LSTM, keras_bn.BNLSTM),
        ("gru", keras.layers.GRU, keras_bn.BNGRU),
    )
    def test_signature_starts_with_core(self, core_cls, cls):
        # Core's arguments with core's defaults in core's order, then
        # keras_bn's, keyword-only with defaults, then the base layer's
        # `**kwargs`; every one documented.
        def parameters(klass):
            return list(inspect.signature(klass).parameters.values())

        core = [
            (p.name, p.default) for p in parameters(core_cls)
            if p.kind is not p.VAR_KEYWORD
        ]
        ours = parameters(cls)
        self.assertEqual([(p.name, p.default) for p in ours][: len(core)],
                         core)
        for p in ours[len(core) : -1]:
            self.assertIs(p.kind, p.KEYWORD_ONLY, p.name)
            self.assertIsNot(p.default, p.empty, p.name)
        self.assertIs(ours[-1].kind, ours[-1].VAR_KEYWORD)
        for p in ours[:-1]:
            self.assertIn(f"\n        {p.name}: ", cls.__doc__, p.name)

    @parameterized.named_parameters(
        ("lstm", keras_bn.BNLSTM), ("gru", keras_bn.BNGRU)
    )
    def test_properties_equal_arguments(self, cls):
        arguments = {**CORE_LSTM_ARGUMENTS, **KERAS_BN_ARGUMENTS}
        if cls is keras_bn.BNGRU:
            arguments.pop("unit_forget_bias")
        layer = cls(**arguments)
        for name in PROPERTIES + tuple(KERAS_BN_ARGUMENTS):
            expected = arguments[name]
            if isinstance(expected, float) and name.endswith("initializer"):
                # A float means a constant.
                expected = keras.initializers.Constant(expected)
            elif name.endswith(("initializer", "regularizer", "constraint")):
                expected = getattr(
                    keras, name.split("_")[-1] + "s"
                ).get(expected)
            elif name.endswith("activation"):
                expected = keras.activations.get(expected)
            self.assertEqual(
                serialized(getattr(layer, name)), serialized(expected), name
            )
        with self.assertRaises(AttributeError):
            layer.units = 2


class ShapeErrorTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("batch", (5, 8), r"`mask` must have shape \(4, 8\).*inputs of "
         r"shape \(4, 8, 4\)\. Received: mask.shape=\(5, 8\)"),
        ("steps", (4, 7), r"`mask` must have shape \(4, 8\).*"
         r"Received: mask.shape=\(4, 7\)"),
        ("rank", (4, 8, 1), r"Received: mask.shape=\(4, 8, 1\)"),
    )
    def test_bad_mask(self, shape, message):
        layer = keras_bn.BNLSTM(UNITS)
        with self.assertRaisesRegex(ValueError, message):
            layer(np.zeros((4, 8, FEATURES), "float32"),
                  mask=np.ones(shape, bool))

    def test_bad_initial_state(self):
        layer = keras_bn.BNLSTM(UNITS)
        with self.assertRaisesRegex(
            ValueError,
            r"`initial_state\[1\]` must have shape \(4, 3\).*Received: "
            r"initial_state\[1\].shape=\(4, 2\)",
        ):
            layer(
                np.zeros((4, 8, FEATURES), "float32"),
                initial_state=[np.zeros((4, UNITS), "float32"),
                               np.zeros((4, 2), "float32")],
            )

    def test_stateful_needs_its_batch_size(self):
        with self.assertRaisesRegex(
            ValueError, r"fixed batch size.*input_shape=\(None, 5, 4\)"
        ):
            keras.Sequential([
                keras.Input((5, FEATURES)),
                keras_bn.BNLSTM(UNITS, stateful=True),
            ])
        layer = keras_bn.BNLSTM(UNITS, stateful=True)
        layer(np.zeros((2, 5, FEATURES), "float32"))
        with self.assertRaisesRegex(
            ValueError, r"batch size of 2.*inputs of shape \(3, 5, 4\)"
        ):
            layer(np.zeros((3, 5, FEATURES), "float32"))

    def test_unroll_needs_known_steps(self):
        with self.assertRaisesRegex(
            ValueError, r"cannot unroll.*input_shape=\(None, None, 4\)"
        ):
            keras.Sequential([
                keras.Input((None, FEATURES)),
                keras_bn.BNLSTM(UNITS, unroll=True, max_timesteps=3),
            ])

    @parameterized.named_parameters(
        ("use_cudnn", keras_bn.BNLSTM, {"use_cudnn": True},
         r"`use_cudnn` must be 'auto' or False.*Received: use_cudnn=True"),
        ("stateful", keras_bn.BNLSTM, {"stateful": 1},
         "Received: stateful=1"),
        ("reset_after", keras_bn.BNGRU, {"reset_after": False},
         r"`reset_after` must be True.*Received: reset_after=False"),
    )
    def test_bad_core_arguments(self, cls, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            cls(UNITS, **kwargs)
