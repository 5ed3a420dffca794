"""Tests of keras_bn.BatchNormalization.

References: a NumPy implementation of the equations (float64, written from
the paper and the documented rules, not from the layer's code), core
`keras.layers.BatchNormalization`, and tf-keras's layer where installed.
"""

import contextlib
import functools
import os
import re
from unittest import mock

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_bn
from tests import paths
from tests import test_case

TF = keras.backend.backend() == "tensorflow"
TORCH = keras.backend.backend() == "torch"
requires_tf = pytest.mark.skipif(
    not TF, reason="uses tf.GradientTape and tf.distribute"
)
requires_torch = pytest.mark.skipif(
    not TORCH, reason="PyTorch's kernel runs on the torch backend only"
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def reference_train_step(x, gamma, beta, moving, cfg, mask=None):
    """One training step of batch normalization in float64 NumPy.

    Args:
        x: Input array.
        gamma, beta: Arrays in the weights' shape, or None.
        moving: Dict with "mean", "variance" (weights' shape) and "n" (the
            number of updates so far, for momentum=None); updated in place.
        cfg: Dict with "axis", "epsilon", "momentum", "virtual_batch_size".
        mask: Optional mask, the shape of x without its last axis or
            broadcastable to x.

    Returns:
        The normalized output.
    """
    x = np.asarray(x, np.float64)
    rank = x.ndim
    axis = cfg.get("axis", -1)
    axes = sorted(a % rank for a in np.atleast_1d(axis))
    reduce = tuple(i for i in range(rank) if i not in axes)
    bshape = [x.shape[i] if i in axes else 1 for i in range(rank)]
    if mask is None:
        m = np.ones_like(x)
    else:
        m = np.asarray(mask, np.float64)
        if m.ndim == rank - 1:
            m = m[..., None]
        m = np.broadcast_to(m, x.shape)
    batch = x.shape[0]
    size = cfg.get("virtual_batch_size") or batch
    eps = cfg.get("epsilon", 1e-3)
    g = np.ones(bshape) if gamma is None else np.reshape(gamma, bshape)
    b = np.zeros(bshape) if beta is None else np.reshape(beta, bshape)
    y = np.empty_like(x)
    means, variances, valid = [], [], []
    for start in range(0, batch, size):
        xs, ms = x[start : start + size], m[start : start + size]
        n = ms.sum(axis=reduce, keepdims=True)
        mean = (xs * ms).sum(axis=reduce, keepdims=True) / np.maximum(n, 1)
        var = (ms * (xs - mean) ** 2).sum(axis=reduce, keepdims=True)
        var = var / np.maximum(n, 1)
        y[start : start + size] = g * (xs - mean) / np.sqrt(var + eps) + b
        means.append(mean.reshape(-1))
        variances.append(var.reshape(-1))
        valid.append((n > 0).reshape(-1).astype(np.float64))
    means, variances, valid = map(np.array, (means, variances, valid))
    count = valid.sum(axis=0)
    mean = (means * valid).sum(axis=0) / np.maximum(count, 1)
    var = (variances * valid).sum(axis=0) / np.maximum(count, 1)
    momentum = cfg.get("momentum", 0.99)
    if momentum is None:
        momentum = moving["n"] / (moving["n"] + 1.0)
        moving["n"] += float(count.any())
    shape = moving["mean"].shape
    for key, stat in (("mean", mean), ("variance", var)):
        new = moving[key].reshape(-1) * momentum + stat * (1 - momentum)
        moving[key] = np.where(count > 0, new, moving[key].reshape(-1))
        moving[key] = moving[key].reshape(shape)
    return y


def reference_inference(x, gamma, beta, moving, cfg):
    rank = x.ndim
    axis = cfg.get("axis", -1)
    axes = sorted(a % rank for a in np.atleast_1d(axis))
    bshape = [x.shape[i] if i in axes else 1 for i in range(rank)]
    g = 1.0 if gamma is None else np.reshape(gamma, bshape)
    b = 0.0 if beta is None else np.reshape(beta, bshape)
    mean = np.reshape(moving["mean"], bshape)
    var = np.reshape(moving["variance"], bshape)
    return g * (x - mean) / np.sqrt(var + cfg.get("epsilon", 1e-3)) + b


def _randomize(layer, rng):
    """Random gamma/beta/moving statistics, so no test passes by accident."""
    weights = []
    for w in layer.weights:
        if w.name == "moving_variance":
            weights.append(rng.uniform(0.5, 2.0, w.shape))
        elif w.name in ("gamma", "beta", "moving_mean"):
            weights.append(rng.normal(0.0, 1.0, w.shape))
        else:
            weights.append(keras.ops.convert_to_numpy(w))
    layer.set_weights(weights)


def _named(layer, name):
    for w in layer.weights:
        if w.name == name:
            return keras.ops.convert_to_numpy(w)
    return None


# Config, input shape, mask kind: None, "sequence" (rank-1 mask), "example"
# (rank-1 mask of ones but the batch axis) or "full".
REFERENCE_GRID = (
    ("default", {}, (8, 4), None),
    ("axis_1_rank3", {"axis": 1}, (6, 3, 5), None),
    ("axes_list", {"axis": [1, 3]}, (4, 3, 2, 5), None),
    ("axes_negative", {"axis": [-1, 1]}, (4, 3, 2, 5), None),
    # Adjacent axes, which PyTorch's kernel takes as one channel axis.
    ("adjacent_axes", {"axis": [1, 2], "momentum": 0.8}, (6, 2, 3, 4),
     None),
    ("no_center", {"center": False, "momentum": 0.9}, (8, 4), None),
    ("no_scale", {"scale": False, "epsilon": 1e-5}, (8, 4), None),
    ("cumulative", {"momentum": None}, (8, 4), None),
    ("sequence_mask", {"momentum": 0.8}, (6, 5, 3), "sequence"),
    ("full_mask_axes", {"axis": [1, 2]}, (6, 2, 3), "full"),
    ("ghost", {"virtual_batch_size": 4}, (8, 3), None),
    ("ghost_remainder", {"virtual_batch_size": 3}, (8, 3), None),
    ("ghost_bigger_than_batch", {"virtual_batch_size": 16}, (8, 3), None),
    ("ghost_mask", {"virtual_batch_size": 2, "axis": 1}, (6, 3, 4), "sequence"),
    ("ghost_cumulative", {"virtual_batch_size": 4, "momentum": None},
     (12, 2, 3), None),
    # The keras.ops path merges adjacent reduced (or normalized) axes into
    # one; these cover the merges and the masks that must follow them.
    ("image_mask", {}, (4, 3, 3, 2), "sequence"),
    ("image_example_mask", {"momentum": 0.5}, (4, 3, 2, 2), "example"),
    ("channels_first_mask", {"axis": 1}, (4, 3, 2, 5), "full"),
    ("middle_axes", {"axis": [2, 3]}, (4, 2, 3, 2, 3), "sequence"),
    ("ghost_image_mask", {"virtual_batch_size": 2}, (6, 2, 3, 4),
     "sequence"),
    # Few channels: the wide view puts 64 rows side by side (384 entries),
    # or as many as divide the rows (4 of 12, 32 entries).
    ("few_channels", {"momentum": 0.8}, (16, 4, 4, 6), None),
    ("few_channels_rows_not_a_power_of_two", {}, (12, 8), None),
)


def _mask_for(kind, shape, rng, step=0):
    if kind is None:
        return None
    if kind == "sequence":
        mask = rng.random(shape[:-1]) > 0.35
    elif kind == "example":
        # One flag per example, broadcast over the other axes.
        mask = rng.random((shape[0],) + (1,) * (len(shape) - 2)) > 0.35
    else:
        mask = rng.random(shape) > 0.35
    mask[0] = True  # the first example always counts
    if step == 1:
        mask[: shape[0] // 2] = False  # a ghost batch may be all masked
    return mask


# The normalization paths that ran in this process's per-path grids.
PATHS_RAN = set()


class ReferenceTest(test_case.LayerTestCase):
    @parameterized.named_parameters(*paths.per_path(REFERENCE_GRID))
    def test_three_training_steps_and_inference(
        self, path, cfg, shape, mask_kind
    ):
        rng = _rng(1)
        layer = keras_bn.BatchNormalization(**cfg, **paths.KWARGS[path])
        paths.build_or_skip(self, layer, shape)
        _randomize(layer, rng)
        gamma, beta = _named(layer, "gamma"), _named(layer, "beta")
        moving = {
            "mean": _named(layer, "moving_mean").astype(np.float64),
            "variance": _named(layer, "moving_variance").astype(np.float64),
            "n": 0.0,
        }
        steps = [
            (
                rng.normal(step - 1.0, 1.0 + step, shape).astype("float32"),
                _mask_for(mask_kind, shape, rng, step),
            )
            for step in range(3)
        ]
        paths.skip_unless_serves(self, path, layer, *steps[0])
        for x, mask in steps:
            with paths.expect(self, path, PATHS_RAN):
                y = layer(x, training=True, mask=mask)
            expected = reference_train_step(x, gamma, beta, moving, cfg, mask)
            self.assertAllClose(y, expected, atol=2e-5, rtol=1e-4)
            self.assertAllClose(
                layer.moving_mean, moving["mean"], atol=1e-5, rtol=1e-5
            )
            self.assertAllClose(
                layer.moving_variance, moving["variance"], atol=1e-5,
                rtol=1e-5,
            )
        x = rng.normal(0.5, 2.0, shape).astype("float32")
        self.assertAllClose(
            layer(x, training=False),
            reference_inference(x, gamma, beta, moving, cfg),
            atol=2e-5, rtol=1e-4,
        )


CORE_GRID = (
    ("default", {}, (16, 4), None),
    ("axis_1", {"axis": 1}, (8, 3, 5), None),
    ("axis_minus_2", {"axis": -2}, (8, 3, 5), None),
    ("image", {"momentum": 0.9, "epsilon": 1e-5}, (4, 5, 5, 3), None),
    ("no_center", {"center": False}, (16, 4), None),
    ("no_scale", {"scale": False}, (16, 4), None),
    ("momentum_zero", {"momentum": 0.0}, (16, 4), None),
    ("initializers", {
        "gamma_initializer": "random_normal",
        "beta_initializer": "random_uniform",
        "moving_mean_initializer": "ones",
        "moving_variance_initializer": "zeros",
    }, (16, 4), None),
    ("mask", {"momentum": 0.7}, (6, 5, 3), "sequence"),
)


class CoreKerasEquivalenceTest(test_case.LayerTestCase):
    @parameterized.named_parameters(*paths.per_path(CORE_GRID))
    def test_same_outputs_and_statistics(self, path, cfg, shape, mask_kind):
        rng = _rng(2)
        ours = keras_bn.BatchNormalization(**cfg, **paths.KWARGS[path])
        core = keras.layers.BatchNormalization(**cfg)
        paths.build_or_skip(self, ours, shape)
        core.build(shape)
        core.set_weights(ours.get_weights())
        steps = [
            (
                rng.normal(step, 1.0 + step, shape).astype("float32"),
                _mask_for(mask_kind, shape, rng),
            )
            for step in range(4)
        ]
        paths.skip_unless_serves(self, path, ours, *steps[0])
        for x, mask in steps:
            with paths.expect(self, path, PATHS_RAN):
                y = ours(x, training=True, mask=mask)
            self.assertAllClose(y, core(x, training=True, mask=mask))
        for a, b in zip(ours.weights, core.weights):
            self.assertEqual(a.name, b.name)
            self.assertAllClose(a, b, msg=a.name)
        x = rng.normal(0, 3, shape).astype("float32")
        self.assertAllClose(ours(x), core(x))

    @parameterized.named_parameters(*CORE_GRID[:5])
    def test_same_weights_after_fit(self, cfg, shape, mask_kind):
        del mask_kind
        rng = _rng(3)
        x = rng.normal(1.0, 2.0, (32,) + shape[1:]).astype("float32")
        y = rng.normal(0.0, 1.0, x.shape).astype("float32")

        def model(layer):
            m = keras.Sequential([keras.Input(shape[1:]), layer])
            m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            return m

        ours = model(keras_bn.BatchNormalization(**cfg))
        core = model(keras.layers.BatchNormalization(**cfg))
        _randomize(ours.layers[0], rng)
        core.set_weights(ours.get_weights())
        for m in (ours, core):
            m.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        for a, b in zip(ours.weights, core.weights):
            self.assertAllClose(a, b, msg=a.name)

    @parameterized.named_parameters(
        ("keyword", (), {"renorm": True}),
        ("positional", (-1, 0.9, 1e-3, True, True, "zeros", "ones", "zeros",
                        "ones", None, None, None, None, True), {}),
    )
    def test_renorm_true_points_to_batch_renormalization(self, args, kwargs):
        with self.assertRaisesRegex(
            ValueError, "keras_bn.BatchRenormalization.*renorm=True"
        ):
            keras_bn.BatchNormalization(*args, **kwargs)
        core = keras.layers.BatchNormalization(
            renorm=True, renorm_clipping={"rmax": 2.0}
        )
        revived = keras_bn.BatchNormalization.from_config(core.get_config())
        self.assertIsInstance(revived, keras_bn.BatchRenormalization)
        self.assertEqual(revived.renorm_clipping, {"rmax": 2.0})

    def test_signature_is_core_keras_then_ours(self):
        self.assertEqual(test_case.core_signature_differences(
            keras_bn.BatchNormalization, keras.layers.BatchNormalization
        ), [])

    def test_config_and_weights_move_between_core_and_ours(self):
        core = keras.layers.BatchNormalization(
            axis=1, momentum=0.9, epsilon=1e-4, center=False
        )
        ours = keras_bn.BatchNormalization.from_config(core.get_config())
        x = _rng(4).normal(2, 3, (4, 3, 5)).astype("float32")
        core.build(x.shape)
        ours.build(x.shape)
        _randomize(core, _rng(5))
        ours.set_weights(core.get_weights())
        self.assertAllClose(ours(x), core(x))
        self.assertAllClose(ours(x, training=True), core(x, training=True))

    @pytest.mark.skipif(
        not TF or keras.__version__ < "3", reason="tf-keras needs TensorFlow"
    )
    @parameterized.named_parameters(
        ("ghost", {"virtual_batch_size": 4}, (16, 3)),
        ("axes_list", {"axis": [1, 3]}, (4, 3, 2, 5)),
    )
    def test_tf_keras_features(self, cfg, shape):
        tf_keras = pytest.importorskip("tf_keras")
        rng = _rng(6)
        ours = keras_bn.BatchNormalization(momentum=0.8, **cfg)
        theirs = tf_keras.layers.BatchNormalization(
            momentum=0.8, fused=False, **cfg
        )
        ours.build(shape)
        theirs.build(shape)
        _randomize(ours, rng)
        theirs.set_weights(
            [np.reshape(w, v.shape) for w, v in
             zip(ours.get_weights(), theirs.weights)]
        )
        # tf-keras groups examples j, j + G, j + 2G, ... (G groups); keras_bn
        # groups consecutive examples. Interleave tf-keras's input to match.
        size = cfg.get("virtual_batch_size", shape[0])

        def interleave(a):
            a = np.asarray(a)
            groups = a.reshape((-1, size) + a.shape[1:])
            return np.swapaxes(groups, 0, 1).reshape(a.shape)

        def deinterleave(a):
            a = np.asarray(a)
            groups = a.reshape((size, -1) + a.shape[1:])
            return np.swapaxes(groups, 0, 1).reshape(a.shape)

        for step in range(3):
            x = rng.normal(step, 2.0, shape).astype("float32")
            self.assertAllClose(
                ours(x, training=True),
                deinterleave(theirs(interleave(x), training=True)),
            )
        for a, b in zip(ours.weights, theirs.weights):
            self.assertAllClose(np.reshape(b.numpy(), a.shape), a)


class LayerHarnessTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("default", {}, (8, 4), 2, 2),
        ("axis_1", {"axis": 1}, (8, 3, 5), 2, 2),
        ("axes_list", {"axis": [1, 3]}, (4, 3, 2, 5), 2, 2),
        ("ghost", {"virtual_batch_size": 4}, (8, 6), 2, 2),
        ("ghost_remainder", {"virtual_batch_size": 3}, (8, 6), 2, 2),
        ("cumulative", {"momentum": None}, (8, 4), 2, 3),
        ("no_affine", {"center": False, "scale": False}, (8, 4), 0, 2),
        ("synchronized", {"synchronized": True}, (8, 4), 2, 2),
    )
    def test_layer(self, kwargs, shape, trainable, non_trainable):
        self.run_layer_test(
            keras_bn.BatchNormalization,
            kwargs,
            input_shape=shape,
            expected_num_trainable_weights=trainable,
            expected_num_non_trainable_weights=non_trainable,
        )


class SemanticsTest(test_case.LayerTestCase):
    def _layer(self, shape, **kwargs):
        layer = keras_bn.BatchNormalization(**kwargs)
        layer.build(shape)
        _randomize(layer, _rng(7))
        return layer

    def test_trainable_false_is_inference_mode(self):
        x = _rng(8).normal(3, 2, (16, 4)).astype("float32")
        layer = self._layer(x.shape)
        before = [keras.ops.convert_to_numpy(w) for w in layer.weights]
        expected = layer(x, training=False)
        layer.trainable = False
        self.assertAllClose(layer(x, training=True), expected)
        model = keras.Sequential([keras.Input((4,)), layer])
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, x, epochs=1, batch_size=8, verbose=0)
        for a, b in zip(layer.weights, before):
            self.assertAllClose(a, b, atol=0, rtol=0)

    def test_inference_does_not_update(self):
        x = _rng(9).normal(3, 2, (16, 4)).astype("float32")
        layer = self._layer(x.shape)
        before = layer.get_weights()
        layer(x, training=False)
        layer(x)
        for a, b in zip(layer.get_weights(), before):
            self.assertAllClose(a, b, atol=0, rtol=0)

    @parameterized.named_parameters(
        ("plain", {}), ("ghost", {"virtual_batch_size": 2}),
        ("cumulative", {"momentum": None}),
    )
    def test_all_masked_batch_leaves_statistics(self, kwargs):
        x = _rng(10).normal(3, 2, (4, 5, 3)).astype("float32")
        layer = self._layer(x.shape, **kwargs)
        before = layer.get_weights()
        y = layer(x, training=True, mask=np.zeros((4, 5), bool))
        self.assertTrue(np.all(np.isfinite(keras.ops.convert_to_numpy(y))))
        for a, b in zip(layer.get_weights(), before):
            self.assertAllClose(a, b, atol=0, rtol=0)

    def test_empty_batch_leaves_statistics(self):
        layer = self._layer((None, 3))
        before = layer.get_weights()
        y = layer(np.zeros((0, 3), "float32"), training=True)
        self.assertEqual(tuple(y.shape), (0, 3))
        for a, b in zip(layer.get_weights(), before):
            self.assertAllClose(a, b, atol=0, rtol=0)

    def test_batch_of_one(self):
        x = _rng(11).normal(3, 2, (1, 4)).astype("float32")
        layer = self._layer(x.shape, momentum=0.5)
        beta = _named(layer, "beta")
        moving_mean = _named(layer, "moving_mean")
        moving_var = _named(layer, "moving_variance")
        self.assertAllClose(layer(x, training=True)[0], beta)
        self.assertAllClose(
            layer.moving_mean, 0.5 * moving_mean + 0.5 * x[0]
        )
        self.assertAllClose(layer.moving_variance, 0.5 * moving_var)

    @parameterized.parameters("mixed_float16", "mixed_bfloat16")
    def test_float32_statistics_under_mixed_precision(self, policy):
        # Squares of these values overflow float16, whose maximum is 65504.
        x = _rng(12).normal(300.0, 30.0, (64, 4)).astype("float32")
        layer = keras_bn.BatchNormalization(momentum=0.0, dtype=policy)
        y = layer(x, training=True)
        self.assertEqual(keras.backend.standardize_dtype(y.dtype), policy[6:])
        for w in layer.weights:
            self.assertEqual(w.dtype, "float32")
        x_low = keras.ops.convert_to_numpy(
            keras.ops.cast(keras.ops.cast(x, policy[6:]), "float32")
        ).astype(np.float64)
        self.assertAllClose(layer.moving_mean, x_low.mean(0), rtol=1e-5)
        self.assertAllClose(layer.moving_variance, x_low.var(0), rtol=1e-4)
        expected = (x_low - x_low.mean(0)) / np.sqrt(x_low.var(0) + 1e-3)
        atol = 1e-2 if policy == "mixed_float16" else 4e-2
        self.assertAllClose(
            keras.ops.cast(y, "float32"), expected, atol=atol, rtol=0
        )

    @parameterized.named_parameters(*paths.per_path((("float64",),)))
    def test_float64_statistics_stay_float64(self, path):
        if keras.backend.backend() == "jax":
            self.skipTest("JAX has no float64 unless jax_enable_x64 is set")
        # float32 statistics would lose this spread against the mean.
        x = _rng(29).normal(1e4, 1e-3, (16, 2))
        layer = keras_bn.BatchNormalization(
            dtype="float64", momentum=0.0, **paths.KWARGS[path]
        )
        paths.build_or_skip(self, layer, x.shape)
        paths.skip_unless_serves(self, path, layer, x)
        with paths.expect(self, path, set()):
            y = layer(x, training=True)
        self.assertAllClose(
            y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3), atol=1e-9,
            rtol=1e-7,
        )
        self.assertAllClose(layer.moving_mean, x.mean(0), atol=0, rtol=1e-12)
        self.assertAllClose(layer.moving_variance, x.var(0), atol=0, rtol=1e-7)

    def test_cumulative_average_continues_after_loading(self):
        rng = _rng(13)
        batches = [rng.normal(i, 1 + i, (8, 3)).astype("float32")
                   for i in range(4)]
        model = keras.Sequential(
            [keras.Input((3,)), keras_bn.BatchNormalization(momentum=None)]
        )
        model.compile(optimizer="sgd", loss="mse")
        for b in batches[:3]:
            model.train_on_batch(b, np.zeros_like(b))
        loaded = test_case.save_and_load(model)
        loaded.train_on_batch(batches[3], np.zeros_like(batches[3]))
        layer = loaded.layers[0]
        self.assertEqual(int(keras.ops.convert_to_numpy(
            layer.num_batches_tracked)), 4)
        self.assertAllClose(
            layer.moving_mean, np.mean([b.mean(0) for b in batches], 0)
        )
        self.assertAllClose(
            layer.moving_variance, np.mean([b.var(0) for b in batches], 0)
        )

    def test_ghost_batches_normalize_each_group(self):
        x = _rng(14).normal(0, 1, (12, 3)).astype("float32")
        x[4:8] += 10.0
        layer = keras_bn.BatchNormalization(
            virtual_batch_size=4, center=False, scale=False, epsilon=1e-6
        )
        y = keras.ops.convert_to_numpy(layer(x, training=True))
        for g in range(3):
            self.assertAllClose(y[4 * g : 4 * g + 4].mean(0), 0, atol=1e-5)
            self.assertAllClose(y[4 * g : 4 * g + 4].std(0), 1, atol=1e-3)


class ErrorTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("momentum_high", {"momentum": 1.5}, "momentum=1.5"),
        ("momentum_one", {"momentum": 1.0}, "momentum=1.0"),
        ("momentum_negative", {"momentum": -0.1}, "momentum=-0.1"),
        ("momentum_string", {"momentum": "0.9"}, "momentum='0.9' (a str)"),
        ("epsilon_zero", {"epsilon": 0.0}, "epsilon=0.0"),
        ("epsilon_negative", {"epsilon": -1e-3}, "epsilon=-0.001"),
        ("vbs_zero", {"virtual_batch_size": 0}, "virtual_batch_size=0"),
        ("vbs_negative", {"virtual_batch_size": -4}, "virtual_batch_size=-4"),
        ("vbs_float", {"virtual_batch_size": 2.5}, "virtual_batch_size=2.5"),
        ("axis_repeated", {"axis": [1, 1]}, "axis=[1, 1]"),
        ("axis_float", {"axis": 1.0}, "axis=1.0"),
        ("axis_empty", {"axis": []}, "axis=[]"),
    )
    def test_construction(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, re.escape(message)):
            keras_bn.BatchNormalization(**kwargs)

    @parameterized.named_parameters(
        ("out_of_range", {"axis": 2}, (4, 3), "axis=2"),
        ("out_of_range_negative", {"axis": -3}, (4, 3), "axis=-3"),
        ("repeated_after_wrap", {"axis": [1, -1]}, (4, 3), r"axis=\[1, -1\]"),
        ("unknown_size", {}, (4, None), "None"),
        ("ghost_over_batch_axis", {"axis": 0, "virtual_batch_size": 2},
         (4, 3), "virtual_batch_size=2"),
    )
    def test_build(self, kwargs, shape, message):
        layer = keras_bn.BatchNormalization(**kwargs)
        with self.assertRaisesRegex(ValueError, message):
            layer.build(shape)

    def test_mask_that_does_not_fit(self):
        layer = keras_bn.BatchNormalization()
        x = np.zeros((4, 5, 3), "float32")
        with self.assertRaisesRegex(ValueError, r"mask.shape=\(4, 6\)"):
            layer(x, training=True, mask=np.ones((4, 6), bool))
        with self.assertRaisesRegex(ValueError, r"mask.shape=\(4,\)"):
            layer(x, training=True, mask=np.ones((4,), bool))


@requires_tf
class GradientTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("plain", {}, None),
        ("axis_1_ghost", {"axis": 1, "virtual_batch_size": 3}, None),
        ("mask", {}, "sequence"),
    )
    def test_gradients_match_finite_differences(self, cfg, mask_kind):
        import tensorflow as tf

        rng = _rng(15)
        shape = (5, 3, 2)
        layer = keras_bn.BatchNormalization(dtype="float64", **cfg)
        layer.build(shape)
        _randomize(layer, rng)
        x = rng.normal(1.0, 2.0, shape)
        w = rng.normal(0.0, 1.0, shape)
        mask = _mask_for(mask_kind, shape, rng)

        def loss(x_value):
            y = layer(x_value, training=True, mask=mask)
            return tf.reduce_sum(y * w) + tf.reduce_sum(y**2) / 10

        x_var = tf.Variable(x)
        with tf.GradientTape() as tape:
            value = loss(x_var)
        grads = tape.gradient(value, [x_var, layer.gamma, layer.beta])

        def numeric(var):
            base = var.numpy().copy()
            out = np.zeros(base.size)
            for i in range(base.size):
                for sign in (1.0, -1.0):
                    bumped = base.reshape(-1).copy()
                    bumped[i] += sign * 1e-6
                    var.assign(bumped.reshape(base.shape))
                    out[i] += sign * float(loss(x_var)) / 2e-6
            var.assign(base)
            return out.reshape(base.shape)

        self.assertAllClose(grads[0], numeric(x_var), atol=1e-6)
        self.assertAllClose(grads[1], numeric(layer.gamma), atol=1e-6)
        self.assertAllClose(grads[2], numeric(layer.beta), atol=1e-6)


@requires_tf
class XLATest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("plain", {}, (16, 4), None),
        ("mask", {}, (8, 5, 3), "sequence"),
        ("axes_ghost_remainder", {"axis": [1, 2], "virtual_batch_size": 3},
         (8, 2, 3), None),
        ("cumulative", {"momentum": None}, (16, 4), None),
    )
    def test_jit_compile_equals_eager(self, cfg, shape, mask_kind):
        import tensorflow as tf

        rng = _rng(16)
        eager = keras_bn.BatchNormalization(**cfg)
        compiled = keras_bn.BatchNormalization(**cfg)
        eager.build(shape)
        compiled.build(shape)
        _randomize(eager, rng)
        compiled.set_weights(eager.get_weights())
        step = tf.function(
            lambda x, m: compiled(x, training=True, mask=m), jit_compile=True
        )
        for i in range(3):
            x = rng.normal(i, 2.0, shape).astype("float32")
            mask = _mask_for(mask_kind, shape, rng)
            mask = np.ones(x.shape, bool) if mask is None else mask
            self.assertAllClose(
                step(x, mask), eager(x, training=True, mask=mask)
            )
        for a, b in zip(compiled.weights, eager.weights):
            self.assertAllClose(a, b, msg=a.name)

    @parameterized.named_parameters(
        ("plain", {}), ("ghost", {"virtual_batch_size": 4}),
        ("cumulative", {"momentum": None}),
    )
    def test_fit_with_jit_compile_equals_eager(self, cfg):
        rng = _rng(17)
        x = rng.normal(1.0, 2.0, (32, 4, 3)).astype("float32")
        y = rng.normal(0.0, 1.0, (32, 4)).astype("float32")

        def model(jit):
            m = keras.Sequential([
                keras.Input((4, 3)),
                keras.layers.Dense(4),
                keras_bn.BatchNormalization(**cfg),
                keras.layers.GlobalAveragePooling1D(),
            ])
            m.compile(
                optimizer=keras.optimizers.SGD(0.1), loss="mse",
                jit_compile=jit, run_eagerly=not jit,
            )
            return m

        compiled, eager = model(True), model(False)
        compiled.set_weights(eager.get_weights())
        for m in (compiled, eager):
            m.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        for a, b in zip(compiled.weights, eager.weights):
            self.assertAllClose(a, b, atol=1e-5, rtol=1e-4, msg=a.path)


@requires_tf
class MirroredStrategyTest(test_case.LayerTestCase):
    def _run(self, strategy, cfg, x, mask, steps=2):
        import tensorflow as tf

        with strategy.scope():
            layer = keras_bn.BatchNormalization(**cfg)
            layer.build(x.shape)
        layer.set_weights(self._weights)
        dataset = tf.data.Dataset.from_tensors((x, mask))
        dist = strategy.experimental_distribute_dataset(dataset)

        @tf.function
        def step(batch):
            return strategy.run(
                lambda b: layer(b[0], training=True, mask=b[1]), args=(batch,)
            )

        for _ in range(steps):
            for batch in dist:
                out = step(batch)
        out = np.concatenate(
            [o.numpy() for o in strategy.experimental_local_results(out)]
        )
        return out, layer

    def _strategy(self):
        return test_case.mirrored_strategy()

    @parameterized.named_parameters(
        ("plain", {}, None),
        ("mask", {}, "sequence"),
        ("ghost", {"virtual_batch_size": 2}, None),
        ("ghost_mask", {"virtual_batch_size": 2}, "sequence"),
        ("axes_cumulative", {"axis": [1, 2], "momentum": None}, None),
    )
    def test_synchronized_equals_global_batch(self, cfg, mask_kind):
        import tensorflow as tf

        rng = _rng(18)
        shape = (8, 3, 4)
        x = rng.normal(0, 1, shape).astype("float32")
        x[4:] += 3.0  # the two replicas' halves differ
        mask = _mask_for(mask_kind, shape, rng)
        mask = np.ones(shape[:-1], bool) if mask is None else mask
        cfg = dict(cfg, momentum=cfg.get("momentum", 0.5))
        probe = keras_bn.BatchNormalization(**cfg)
        probe.build(shape)
        _randomize(probe, rng)
        self._weights = probe.get_weights()
        one_device = tf.distribute.OneDeviceStrategy("CPU:0")
        expected, single = self._run(
            one_device, dict(cfg, synchronized=True), x, mask
        )
        got, synced = self._run(
            self._strategy(), dict(cfg, synchronized=True), x, mask
        )
        self.assertAllClose(got, expected)
        for a, b in zip(synced.weights, single.weights):
            self.assertAllClose(a, b, msg=a.name)

    def test_unsynchronized_uses_replica_statistics(self):
        rng = _rng(19)
        shape = (8, 3)
        x = rng.normal(0, 1, shape).astype("float32")
        x[4:] = 3.0 * x[4:] + 5.0
        cfg = {"momentum": 0.5, "center": False, "scale": False}
        probe = keras_bn.BatchNormalization(**cfg)
        probe.build(shape)
        self._weights = probe.get_weights()
        got, layer = self._run(
            self._strategy(), cfg, x, np.ones(shape[:-1], bool), steps=1
        )
        halves = (x[:4].astype(np.float64), x[4:].astype(np.float64))
        expected = np.concatenate(
            [(h - h.mean(0)) / np.sqrt(h.var(0) + 1e-3) for h in halves]
        )
        self.assertAllClose(got, expected, atol=1e-5)
        self.assertAllClose(
            layer.moving_mean, np.mean([0.5 * h.mean(0) for h in halves], 0)
        )
        self.assertAllClose(
            layer.moving_variance,
            np.mean([0.5 + 0.5 * h.var(0) for h in halves], 0),
        )

    def test_fit_evaluate_predict_save_in_scope(self):
        rng = _rng(20)
        x = rng.normal(0, 1, (32, 5)).astype("float32")
        y = (x.sum(1) > 0).astype("float32")
        with self._strategy().scope():
            model = keras.Sequential([
                keras.Input((5,)),
                keras.layers.Dense(8),
                keras_bn.BatchNormalization(
                    synchronized=True, virtual_batch_size=4
                ),
                keras.layers.Dense(1, activation="sigmoid"),
            ])
            model.compile(optimizer="adam", loss="binary_crossentropy")
            model.fit(x, y, batch_size=16, epochs=2, verbose=0)
            model.evaluate(x, y, verbose=0)
            expected = model.predict(x, verbose=0)
            loaded = test_case.save_and_load(model)
            self.assertAllClose(loaded.predict(x, verbose=0), expected)


RENORM_CLIPPED = {
    "renorm": True, "renorm_momentum": 0.5, "fused": False,
    "renorm_clipping": {"rmax": 1.2, "rmin": 0.9, "dmax": 0.1},
}


@requires_tf
class UnknownShapeTest(test_case.LayerTestCase):
    """Traced with unknown batch and spatial sizes, the layer computes the
    same numbers as eagerly (the merged view then has dynamic sizes)."""

    @parameterized.named_parameters(
        ("image_ops_path", {"fused": False}, (4, 3, 3, 2), None),
        ("image_mask", {}, (4, 3, 3, 2), "sequence"),
        ("example_mask", {}, (4, 3, 2, 2), "example"),
        ("channels_first", {"axis": 1}, (4, 3, 2, 5), "full"),
        ("ghost_mask", {"virtual_batch_size": 2}, (6, 2, 3, 4), "sequence"),
        ("renorm", RENORM_CLIPPED, (4, 3, 3, 2), "sequence"),
    )
    def test_unknown_sizes_equal_eager(self, cfg, shape, mask_kind):
        import tensorflow as tf

        rng = _rng(23)
        eager, traced = (_layer(**cfg) for _ in "ab")
        for layer in (eager, traced):
            layer.build(shape)
        _randomize(eager, rng)
        traced.set_weights(eager.get_weights())
        mask = _mask_for(mask_kind, shape, rng)
        unknown = tf.TensorSpec((None,) * len(shape), "float32")
        if mask is None:
            step = tf.function(
                lambda x: traced(x, training=True), input_signature=[unknown]
            )
            args = ()
        else:
            mask_spec = tf.TensorSpec((None,) * mask.ndim, "bool")
            step = tf.function(
                lambda x, m: traced(x, training=True, mask=m),
                input_signature=[unknown, mask_spec],
            )
            args = (mask,)
        for i in range(2):
            x = rng.normal(i, 2.0, shape).astype("float32")
            self.assertAllClose(
                step(x, *args), eager(x, training=True, mask=mask),
                atol=1e-5, rtol=1e-5,
            )
        for a, b in zip(traced.weights, eager.weights):
            self.assertAllClose(a, b, atol=1e-6, rtol=1e-6, msg=a.name)
        infer = tf.function(lambda x: traced(x), input_signature=[unknown])
        x = rng.normal(0.0, 3.0, shape).astype("float32")
        self.assertAllClose(infer(x), eager(x), atol=1e-5, rtol=1e-5)

    @parameterized.named_parameters(
        (f"{name}_{known}", cfg, known)
        for name, cfg in (
            ("batch_norm", {}),
            ("renorm", {k: v for k, v in RENORM_CLIPPED.items()
                        if k != "fused"}),
        )
        for known in ("inner_sizes", "channels_only")
    )
    def test_fused_kernel_with_unknown_sizes_equals_ops_path(
        self, cfg, known
    ):
        # TensorFlow's kernel reshapes to its 4-D view with static sizes
        # where all but the batch are known, and with shape ops otherwise.
        import tensorflow as tf

        rng = _rng(24)
        shape = (5, 3, 2, 4)
        fused, plain = _layer(**cfg, fused=True), _layer(**cfg, fused=False)
        for layer in (fused, plain):
            layer.build(shape)
        _randomize(plain, rng)
        fused.set_weights(plain.get_weights())
        spec = tf.TensorSpec(
            (None, *shape[1:]) if known == "inner_sizes"
            else (None, None, None, shape[-1]), "float32",
        )
        step = tf.function(
            lambda x: fused(x, training=True), input_signature=[spec]
        )
        self.assertIn(
            "FusedBatchNorm",
            str(step.get_concrete_function().graph.as_graph_def()),
        )
        for i in range(2):
            x = rng.normal(10.0 * i, 2.0, shape).astype("float32")
            self.assertAllClose(
                step(x), plain(x, training=True), atol=1e-5, rtol=1e-5
            )
        for a, b in zip(fused.weights, plain.weights):
            self.assertAllClose(a, b, atol=1e-6, rtol=1e-5, msg=a.name)


RENORM = {
    "renorm": True, "renorm_momentum": 0.5,
    "renorm_clipping": {"rmax": 1.2, "rmin": 0.9, "dmax": 0.1},
}
RENORM_MIXED = {
    "renorm": True, "renorm_momentum": 0.5,
    "renorm_clipping": {"rmax": 1.5, "dmax": 0.5},
}


def _xla_kernel(setting):
    """Forces the XLA kernel on ("1") or off ("0") while a call is traced."""
    return mock.patch.dict(os.environ, {"KERAS_BN_XLA_KERNEL": setting})


@requires_tf
class FusedPathTest(test_case.LayerTestCase):
    """The kernels and the keras.ops path give equal numbers.

    `kernel`: "xla" forces the XLA-compiled kernel where it can serve,
    "tensorflow" asks for TensorFlow's fused kernel (`fused=True`).
    """

    @parameterized.named_parameters(
        ("dense", {}, (16, 4), "float32", False, "xla"),
        ("dense_tf", {}, (16, 4), "float32", False, "tensorflow"),
        ("sequence", {"momentum": 0.5}, (4, 6, 3), "float32", False, "xla"),
        ("image_no_affine", {"center": False, "scale": False},
         (2, 3, 3, 4), "float32", False, "xla"),
        ("image_no_affine_tf", {"center": False, "scale": False},
         (2, 3, 3, 4), "float32", False, "tensorflow"),
        ("channels_first", {"axis": 1}, (4, 3, 5, 5), "float32", False,
         "xla"),
        ("two_axes_no_affine",
         {"axis": [1, 3], "center": False, "scale": False},
         (3, 2, 4, 3), "float32", False, "xla"),
        ("float64", {}, (16, 4), "float64", False, "xla"),
        ("cumulative", {"momentum": None}, (16, 4), "float32", False, "xla"),
        ("batch_of_one", {"momentum": 0.5}, (1, 4), "float32", False, "xla"),
        ("batch_of_one_tf", {"momentum": 0.5}, (1, 4), "float32", False,
         "tensorflow"),
        ("mixed_float16", {}, (4, 5, 5, 3), "mixed_float16", False,
         "tensorflow"),
        ("mixed_bfloat16", {}, (4, 5, 5, 3), "mixed_bfloat16", False,
         "tensorflow"),
        ("renorm", RENORM, (8, 3, 4), "float32", False, "xla"),
        ("renorm_tf", RENORM, (8, 3, 4), "float32", False, "tensorflow"),
        ("renorm_channels_first", dict(RENORM, axis=1), (8, 3, 4),
         "float32", False, "xla"),
        ("renorm_mixed", RENORM_MIXED, (8, 3, 4), "mixed_float16", False,
         "tensorflow"),
        ("renorm_mixed_bfloat16", RENORM_MIXED, (8, 3, 4), "mixed_bfloat16",
         False, "tensorflow"),
        # Under XLA the XLA kernel runs inlined in the outer function;
        # TensorFlow's kernel refuses to train there (`FusedUnderXLATest`).
        ("renorm_xla_kernel", RENORM, (8, 3, 4), "float32", True, "xla"),
        ("dense_xla_kernel", {}, (16, 4), "float32", True, "xla"),
    )
    def test_fused_equals_ops_path(self, cfg, shape, dtype, jit, kernel):
        import tensorflow as tf

        rng = _rng(21)
        fused = (True, False) if kernel == "tensorflow" else (None, False)
        layers = _twin_layers(shape, rng, fused, dtype=dtype, **cfg)
        compute = "float64" if dtype == "float64" else "float32"

        def step(layer, x, w):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = tf.cast(layer(x, training=True), compute)
                loss = tf.reduce_sum(y * w)
            grads = tape.gradient(loss, [x] + layer.trainable_weights)
            return [y] + grads

        fused_step = functools.partial(step, layers[0])
        if jit:
            fused_step = tf.function(fused_step, jit_compile=True)
        steps = [fused_step, functools.partial(step, layers[1])]
        loose = dtype.startswith("mixed")
        with _xla_kernel("1" if kernel == "xla" else "0"):
            for i in range(3):
                x = tf.constant(rng.normal(i, 2.0, shape).astype(compute))
                w = tf.constant(rng.normal(0.0, 1.0, shape).astype(compute))
                results = [run(x, w) for run in steps]
                for a, b in zip(*results):
                    self.assertAllClose(
                        a, b, atol=5e-2 if loose else 1e-4,
                        rtol=5e-2 if loose else 1e-4,
                    )
        for a, b in zip(*(layer.weights for layer in layers)):
            self.assertAllClose(a, b, atol=1e-5, rtol=1e-5, msg=a.name)
        x = rng.normal(0.0, 3.0, shape).astype(compute)
        self.assertAllClose(
            keras.ops.cast(layers[0](x), compute),
            keras.ops.cast(layers[1](x), compute),
            atol=1e-2 if loose else 1e-5,
        )

    @parameterized.named_parameters(
        ("sequence_mask", {}, (6, 5, 3), "sequence"),
        ("example_mask_channels_first", {"axis": 1}, (6, 3, 4), "example"),
        ("ghost", {"virtual_batch_size": 4}, (8, 5, 3), None),
        ("ghost_remainder_mask", {"virtual_batch_size": 4}, (10, 5, 3),
         "sequence"),
        ("renorm_mask", RENORM, (6, 5, 3), "sequence"),
        ("renorm_ghost_remainder", dict(RENORM, virtual_batch_size=3),
         (8, 2, 3), None),
    )
    def test_xla_kernel_with_masks_and_ghosts(self, cfg, shape, mask_kind):
        import tensorflow as tf

        rng = _rng(24)
        layers = _twin_layers(
            shape, rng, (None, False), **cfg
        )

        def step(layer, x, w, mask):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True, mask=mask)
                loss = tf.reduce_sum(y * w)
            return [y] + tape.gradient(loss, [x] + layer.trainable_weights)

        with _xla_kernel("1"):
            for i in range(3):
                x = tf.constant(rng.normal(i, 2.0, shape).astype("float32"))
                w = tf.constant(rng.normal(0.0, 1.0, shape).astype("float32"))
                mask = _mask_for(mask_kind, shape, rng, step=i)
                results = [step(layer, x, w, mask) for layer in layers]
                for a, b in zip(*results):
                    self.assertAllClose(a, b, atol=1e-4, rtol=1e-4)
        for a, b in zip(*(layer.weights for layer in layers)):
            self.assertAllClose(a, b, atol=1e-5, rtol=1e-5, msg=a.name)

    @parameterized.named_parameters(
        ("xla", "1", "XlaMustCompile"), ("tensorflow", "0", "FusedBatchNorm")
    )
    def test_kernel_setting_picks_the_kernel(self, setting, expected):
        import tensorflow as tf

        layer = keras_bn.BatchNormalization()
        layer.build((8, 4))
        step = tf.function(lambda x: layer(x, training=True))
        with _xla_kernel(setting):
            graph = step.get_concrete_function(
                tf.TensorSpec((None, 4), "float32")
            ).graph
        self.assertIn(expected, str(graph.as_graph_def()))

    def test_xla_kernel_does_not_retrace_per_shape_eagerly(self):
        # Eager callers (run_eagerly=True) reach the compiled functions
        # with each layer's own shape; TensorFlow warns when a function
        # retraces that often.
        rng = _rng(25)
        with _xla_kernel("1"), self.assertNoLogs("tensorflow", "WARNING"):
            for width in range(3, 11):
                layer = keras_bn.BatchNormalization()
                x = rng.normal(0.0, 1.0, (4, width)).astype("float32")
                y = keras.ops.convert_to_numpy(layer(x, training=True))
                self.assertAllClose(y.mean(axis=0), np.zeros(width),
                                    atol=1e-5)

    @parameterized.named_parameters(
        ("xla", {}, "float64", "1", 1e-9),
        ("renorm_xla", RENORM, "float64", "1", 1e-9),
        ("renorm_tensorflow", RENORM, "float32", "0", 1e-4),
    )
    def test_second_order_gradients_through_the_kernels(
        self, cfg, dtype, kernel, tolerance
    ):
        # A gradient penalty differentiates the input gradient again; the
        # statistics' dependence on the input must survive in it.
        import tensorflow as tf

        rng = _rng(23)
        shape = (6, 3)
        fused = (True, False) if kernel == "0" else (None, False)
        layers = _twin_layers(shape, rng, fused, dtype=dtype, **cfg)
        x = tf.constant(rng.normal(1.0, 2.0, shape).astype(dtype))
        w = tf.constant(rng.normal(0.0, 1.0, shape).astype(dtype))

        def penalty_grads(layer):
            with tf.GradientTape() as outer:
                outer.watch(x)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    y = layer(x, training=True)
                    loss = tf.reduce_sum(y * w) + tf.reduce_sum(y**3) / 10
                dx = inner.gradient(loss, x)
                penalty = tf.reduce_sum(dx**2)
            return outer.gradient(penalty, [x] + layer.trainable_weights)

        with _xla_kernel(kernel):
            kernel_grads = penalty_grads(layers[0])
            graph = tf.function(
                lambda x: layers[0](x, training=True)
            ).get_concrete_function(x).graph.as_graph_def()
        reference = penalty_grads(layers[1])
        for a, b in zip(kernel_grads, reference):
            self.assertAllClose(a, b, atol=tolerance, rtol=tolerance)
        self.assertIn(
            "XlaMustCompile" if kernel == "1" else "FusedBatchNorm",
            str(graph),
        )

    def test_fused_true_refuses_to_train_under_jit_compile(self):
        # XLA's expansion of TensorFlow's kernel computes the variance as
        # E[x**2] - E[x]**2; keras_bn refuses it rather than run it.
        import tensorflow as tf

        rng = _rng(22)
        shape = (4, 5, 5, 3)
        layer = keras_bn.BatchNormalization(fused=True)
        layer.build(shape)
        _randomize(layer, rng)
        x = rng.normal(0.0, 2.0, shape).astype("float32")
        train = tf.function(
            lambda x: layer(x, training=True), jit_compile=True
        )
        with self.assertRaisesRegex(ValueError, "fused=True.*jit_compile"):
            train(x)
        # Inference reads the moving statistics: the kernel serves it.
        infer = tf.function(
            lambda x: layer(x, training=False), jit_compile=True
        )
        self.assertAllClose(infer(x), layer(x, training=False), atol=1e-5)

    @parameterized.named_parameters(
        ("not_last_axis", {"axis": 1}, "axis=1"),
        ("ghost", {"virtual_batch_size": 2}, "virtual_batch_size=2"),
        ("small_epsilon", {"epsilon": 1e-6}, "epsilon=1e-06"),
    )
    def test_fused_true_that_cannot_fuse(self, cfg, message):
        layer = keras_bn.BatchNormalization(fused=True, **cfg)
        with self.assertRaisesRegex(ValueError, message):
            layer.build((4, 3, 2))

    def test_fused_must_be_boolean_or_none(self):
        with self.assertRaisesRegex(ValueError, r"fused='yes' \(a str\)"):
            keras_bn.BatchNormalization(fused="yes")


@requires_tf
class WideViewTest(test_case.LayerTestCase):
    """The wide-view kernel (few channels, oneDNN off) against core Keras
    computing in float64: outputs, gradients and moving statistics."""

    LIMIT = {"renorm": True, "renorm_momentum": 0.5,
             "renorm_clipping": {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}}

    def _layers(self, cfg, shape, rng):
        ours = _layer(**cfg)
        core = keras.layers.BatchNormalization(
            dtype="float64",
            **{k: v for k, v in cfg.items() if not k.startswith("renorm")},
        )
        ours.build(shape)
        core.build(shape)
        _randomize(ours, rng)
        for w in core.weights:
            w.assign(_named(ours, w.name).astype("float64"))
        return ours, core

    @parameterized.named_parameters(
        ("full_row", {}, (16, 4, 4, 6), 0.0),
        ("partial_row", {"momentum": 0.5}, (12, 8), 0.0),
        ("one_channel", {}, (256, 1), 0.0),
        ("no_affine", {"center": False, "scale": False}, (8, 4, 4, 4), 0.0),
        # Centred sums keep float32 accurate when the mean is large.
        ("large_mean", {}, (32, 8, 8), 1e3),
        # Renormalization with r = 1 and d = 0 is batch normalization.
        ("renorm_limit", LIMIT, (16, 4, 4, 6), 0.0),
    )
    def test_equals_core_keras_in_float64(self, cfg, shape, mean):
        import tensorflow as tf

        rng = _rng(31)
        ours, core = self._layers(cfg, shape, rng)
        tolerance = 1e-3 if mean else 1e-4
        for step in range(3):
            x = rng.normal(mean + step, 1.0 + step, shape).astype("float32")
            w = rng.normal(0.0, 1.0, shape)
            results = []
            for layer, dtype in ((ours, "float32"), (core, "float64")):
                x_value = tf.constant(x.astype(dtype))
                with paths.expect(self, "wide", set()) if layer is ours \
                        else contextlib.nullcontext():
                    with tf.GradientTape() as tape:
                        tape.watch(x_value)
                        y = tf.cast(layer(x_value, training=True), "float64")
                        loss = tf.reduce_sum(y * w)
                grads = tape.gradient(loss, [x_value] + layer.trainable_weights)
                results.append([y] + grads)
            self.assertLen(results[0], len(results[1]))
            for a, b in zip(*results):
                self.assertAllClose(
                    tf.cast(a, "float64"), b, atol=tolerance, rtol=tolerance
                )
        # Renormalization averages the standard deviation instead.
        names = ["moving_mean"] + ([] if "renorm" in cfg else [
            "moving_variance"])
        for name in names:
            self.assertAllClose(
                _named(ours, name), _named(core, name), atol=1e-4, rtol=1e-4,
                msg=name,
            )

    def test_second_order_gradients_equal_core_keras(self):
        # A gradient penalty differentiates the closed-form gradient again.
        import tensorflow as tf

        rng = _rng(32)
        shape = (16, 4, 4, 6)
        ours, core = self._layers({}, shape, rng)
        x = rng.normal(1.0, 2.0, shape).astype("float32")
        w = rng.normal(0.0, 1.0, shape)

        def penalty_grads(layer, dtype):
            x_value = tf.constant(x.astype(dtype))
            with tf.GradientTape() as outer:
                outer.watch(x_value)
                with tf.GradientTape() as inner:
                    inner.watch(x_value)
                    y = tf.cast(layer(x_value, training=True), "float64")
                    loss = tf.reduce_sum(y * w) + tf.reduce_sum(y**3) / 10
                dx = inner.gradient(loss, x_value)
                penalty = tf.reduce_sum(tf.cast(dx, "float64") ** 2)
            return outer.gradient(
                penalty, [x_value] + layer.trainable_weights
            )

        with paths.expect(self, "wide", set()):
            got = penalty_grads(ours, "float32")
        expected = penalty_grads(core, "float64")
        for a, b in zip(got, expected):
            self.assertAllClose(
                tf.cast(a, "float64"), b, atol=1e-3, rtol=1e-3
            )


def _layer(**kwargs):
    """keras_bn's layer for core Keras's arguments `kwargs`:
    `BatchRenormalization` for `renorm=True`."""
    if kwargs.pop("renorm", False):
        return keras_bn.BatchRenormalization(**kwargs)
    return keras_bn.BatchNormalization(**kwargs)


def _twin_layers(shape, rng, fused_values, **kwargs):
    """Two `_layer(**kwargs)` layers, one per `fused` value, built for
    `shape` with the same random weights."""
    layers = [_layer(fused=fused, **kwargs) for fused in fused_values]
    for layer in layers:
        layer.build(shape)
    _randomize(layers[0], rng)
    layers[1].set_weights(layers[0].get_weights())
    return layers


def _facts(**changes):
    """A float32 training call on a CPU with oneDNN, with `changes`."""
    from keras_bn import _dispatch

    facts = dict(
        backend="tensorflow", device="cpu", onednn=True, dtype="float32",
        elements=2**22, masked=False, ghost=False, last_axis_only=True,
        epsilon=1e-3, synchronizing=False, training=True,
        xla_compiling=False, fused=None, xla_kernel=None, channels=64,
    )
    facts.update(changes)
    return _dispatch.Call(**facts)


def _torch_facts(**changes):
    """A float32 training call on the torch backend, with `changes`."""
    facts = dict(
        backend="torch", device=None, onednn=False, adjacent_axes=True
    )
    facts.update(changes)
    return _facts(**facts)


class DispatchTest(test_case.LayerTestCase):
    """The one function that picks a path, its rules and its errors."""

    @parameterized.named_parameters(
        ("onednn", {}, "fused"),
        ("eigen", {"onednn": False}, "xla"),
        ("eigen_small", {"onednn": False, "elements": 1000}, "ops"),
        ("eigen_unknown_size", {"onednn": False, "elements": None}, "xla"),
        ("mask_cpu", {"masked": True}, "xla"),
        ("mask_cpu_small", {"masked": True, "elements": 1000}, "ops"),
        ("ghost_cpu", {"ghost": True}, "xla"),
        ("axes_cpu", {"last_axis_only": False}, "xla"),
        ("float64_cpu", {"dtype": "float64"}, "xla"),
        ("half_cpu", {"dtype": "float16", "onednn": False}, "fused"),
        ("half_mask_cpu", {"dtype": "bfloat16", "masked": True}, "ops"),
        ("gpu", {"device": "gpu"}, "fused"),
        ("gpu_mask", {"device": "gpu", "masked": True}, "ops"),
        ("gpu_float64", {"device": "gpu", "dtype": "float64"}, "ops"),
        ("under_xla", {"xla_compiling": True, "onednn": False}, "ops"),
        ("under_xla_gpu", {"xla_compiling": True, "device": "gpu"}, "ops"),
        ("under_xla_half", {"xla_compiling": True, "dtype": "float16"},
         "ops"),
        ("inference_half_under_xla", {"xla_compiling": True,
                                      "training": False,
                                      "dtype": "bfloat16"}, "fused"),
        ("under_xla_mask", {"xla_compiling": True, "masked": True}, "ops"),
        ("synchronizing", {"synchronizing": True}, "ops"),
        ("small_epsilon", {"epsilon": 1e-6, "onednn": False,
                           "elements": 10}, "ops"),
        ("jax", {"backend": "jax", "fused": None}, "ops"),
        ("fused_false", {"fused": False, "onednn": False}, "ops"),
        ("fused_true", {"fused": True, "onednn": False}, "fused"),
        ("xla_true", {"xla_kernel": True}, "xla"),
        ("xla_true_gpu", {"xla_kernel": True, "device": "gpu"}, "xla"),
        ("xla_false", {"xla_kernel": False, "onednn": False}, "fused"),
        ("xla_false_mask", {"xla_kernel": False, "masked": True}, "ops"),
        ("inference", {"training": False}, "ops"),
        ("inference_half", {"training": False, "dtype": "float16"}, "fused"),
        ("inference_fused_true", {"training": False, "fused": True},
         "fused"),
        ("inference_mask_fused_true", {"training": False, "fused": True,
                                       "masked": True}, "fused"),
        ("inference_xla_true", {"training": False, "xla_kernel": True},
         "ops"),
        # Few channels with oneDNN off: the wide view, below 2**21 elements.
        ("eigen_few_channels", {"onednn": False, "channels": 8,
                                "elements": 2**20}, "wide"),
        ("eigen_few_channels_small", {"onednn": False, "channels": 12,
                                      "elements": 12 * 64}, "wide"),
        ("eigen_few_channels_small_epsilon", {
            "onednn": False, "channels": 8, "elements": 2**20,
            "epsilon": 1e-6}, "wide"),
        ("eigen_13_channels", {"onednn": False, "channels": 13,
                               "elements": 13 * 2**17}, "xla"),
        ("eigen_few_channels_large", {"onednn": False, "channels": 8,
                                      "elements": 2**21}, "xla"),
        ("eigen_few_channels_odd_rows", {"onednn": False, "channels": 8,
                                         "elements": 8 * 1023}, "ops"),
        ("eigen_few_channels_mask", {"onednn": False, "channels": 8,
                                     "elements": 2**20, "masked": True},
         "xla"),
        ("eigen_few_channels_ghost", {"onednn": False, "channels": 8,
                                      "elements": 2**20, "ghost": True},
         "xla"),
        ("eigen_few_channels_axes", {"onednn": False, "channels": 8,
                                     "elements": 2**20,
                                     "last_axis_only": False}, "xla"),
        ("eigen_few_channels_float64", {"onednn": False, "channels": 8,
                                        "elements": 2**20,
                                        "dtype": "float64"}, "xla"),
        ("eigen_few_channels_synchronizing", {
            "onednn": False, "channels": 8, "elements": 2**20,
            "synchronizing": True}, "ops"),
        ("eigen_few_channels_under_xla", {
            "onednn": False, "channels": 8, "elements": 2**20,
            "xla_compiling": True}, "ops"),
        # xla_kernel=False rules out the XLA kernel, not the other paths.
        ("eigen_few_channels_xla_false", {
            "onednn": False, "channels": 8, "elements": 2**20,
            "xla_kernel": False}, "wide"),
        ("xla_false_small", {"xla_kernel": False, "onednn": False,
                             "elements": 1000}, "ops"),
        ("xla_false_odd_channels", {"xla_kernel": False, "channels": 30},
         "ops"),
        ("xla_false_float64", {"xla_kernel": False, "dtype": "float64"},
         "ops"),
        ("xla_false_half", {"xla_kernel": False, "dtype": "float16",
                            "onednn": False}, "fused"),
        ("eigen_few_channels_gpu", {"onednn": False, "channels": 8,
                                    "elements": 2**20, "device": "gpu"},
         "fused"),
        ("onednn_few_channels", {"channels": 8, "elements": 2**20}, "fused"),
        # oneDNN's kernel is slow for channel counts not a multiple of 4.
        ("onednn_three_channels", {"channels": 3, "elements": 3 * 2**15},
         "wide"),
        ("onednn_odd_channels", {"channels": 30}, "xla"),
        ("onednn_odd_channels_small", {"channels": 30, "elements": 30 * 64},
         "ops"),
        ("onednn_odd_channels_half", {"channels": 30, "elements": 30 * 64,
                                      "dtype": "bfloat16"}, "fused"),
        ("onednn_odd_channels_mask", {"channels": 30, "masked": True,
                                      "elements": 30 * 64}, "ops"),
        # And under 2**17 elements, whatever the channels.
        ("onednn_small", {"elements": 2**16}, "ops"),
        ("onednn_small_few_channels", {"channels": 8, "elements": 2**15},
         "wide"),
        ("onednn_at_the_threshold", {"channels": 512, "elements": 2**17},
         "fused"),
        ("onednn_small_half", {"elements": 2**10, "dtype": "float16"},
         "fused"),
    )
    def test_rules(self, changes, expected):
        from keras_bn import _dispatch

        path = _dispatch.choose(_facts(**changes))
        self.assertEqual(path.name, expected, path.reason)
        self.assertTrue(path.reason)

    @parameterized.named_parameters(
        # The smallest power of two that makes a row a multiple of 128
        # entries, or the largest one that divides the rows, with at
        # least 32 entries a row.
        ("eight_channels", 8, 2**17, 16),
        ("twelve_channels", 12, 2**17, 32),
        ("three_channels", 3, 2**15, 128),
        ("one_channel", 1, 64, 64),
        ("rows_of_twelve", 8, 12, 4),
        ("rows_too_short", 8, 6, None),
        ("odd_rows", 4, 1023, None),
    )
    def test_wide_view_positions(self, channels, rows, expected):
        from keras_bn import _dispatch

        facts = _facts(onednn=False, channels=channels,
                       elements=channels * rows)
        self.assertEqual(_dispatch.wide_positions(facts), expected)
        if expected:
            self.assertEqual(_dispatch.choose(facts).positions, expected)

    @parameterized.named_parameters(
        ("mask", {"fused": True, "masked": True}, "fused=True", "mask"),
        ("float64", {"fused": True, "dtype": "float64"}, "fused=True",
         "float64"),
        ("synchronizing", {"fused": True, "synchronizing": True},
         "fused=True", "synchronization"),
        ("xla_synchronizing", {"xla_kernel": True, "synchronizing": True},
         "xla_kernel=True", "synchronization"),
        ("under_xla", {"fused": True, "xla_compiling": True}, "fused=True",
         r"jit_compile.*E\[x\*\*2\] - E\[x\]\*\*2"),
    )
    def test_refusals_say_why(self, changes, argument, reason):
        from keras_bn import _dispatch

        with self.assertRaisesRegex(ValueError, f"{argument}.*{reason}"):
            _dispatch.choose(_facts(**changes))

    @parameterized.named_parameters(
        ("argument", {"xla_kernel": False}, None, "xla_kernel=False"),
        ("environment", {}, "0", "KERAS_BN_XLA_KERNEL=0"),
    )
    def test_refused_xla_kernel_is_named_in_the_reason(
        self, changes, setting, named
    ):
        from keras_bn import _dispatch

        cases = [({"onednn": False}, "fused"), ({"channels": 30}, "ops"),
                 ({"dtype": "float64"}, "ops")]
        with _xla_kernel(setting or ""):
            for facts, expected in cases:
                path = _dispatch.choose(_facts(**changes, **facts))
                self.assertEqual(path.name, expected, msg=facts)
                self.assertIn(f"{named} rules out the XLA kernel",
                              path.reason)

    @parameterized.named_parameters(("on", "1", "xla"), ("off", "0", "fused"))
    def test_environment_variable_is_the_process_default(
        self, setting, expected
    ):
        from keras_bn import _dispatch

        with _xla_kernel(setting):
            self.assertEqual(_dispatch.choose(_facts()).name, expected)
            # A layer's own request wins.
            self.assertEqual(
                _dispatch.choose(_facts(fused=False)).name, "ops"
            )

    def test_normalization_path_of_a_layer(self):
        x = np.zeros((8, 4), "float32")
        layer = keras_bn.BatchNormalization(fused=False)
        path = layer.normalization_path(x, training=True)
        self.assertEqual(path.name, "ops")
        self.assertIn("fused=False", str(path))
        if TF or TORCH:
            layer = keras_bn.BatchNormalization(fused=True)
            self.assertEqual(
                layer.normalization_path(x, training=True).name,
                "fused" if TF else "torch",
            )

    @parameterized.named_parameters(
        ("plain", {}, "torch"),
        ("channels_first", {"last_axis_only": False}, "torch"),
        ("half", {"dtype": "bfloat16"}, "torch"),
        ("float64", {"dtype": "float64"}, "torch"),
        ("small", {"elements": 12}, "torch"),
        ("small_epsilon", {"epsilon": 1e-8}, "torch"),
        ("mask", {"masked": True}, "ops"),
        ("ghost", {"ghost": True}, "ops"),
        ("axes_apart", {"adjacent_axes": False}, "ops"),
        ("synchronizing", {"synchronizing": True}, "ops"),
        ("empty", {"elements": 0}, "ops"),
        ("integer", {"dtype": "int32"}, "ops"),
        ("inference", {"training": False}, "torch"),
        ("inference_mask", {"training": False, "masked": True}, "torch"),
        ("inference_empty", {"training": False, "elements": 0}, "torch"),
        ("fused_true", {"fused": True}, "torch"),
        ("fused_false", {"fused": False}, "ops"),
        # PyTorch's channels-last training kernel is slow for few channels.
        ("few_channels", {"channels": 4}, "ops"),
        ("eight_channels", {"channels": 8}, "torch"),
        ("few_channels_inference", {"channels": 3, "training": False},
         "torch"),
        ("few_channels_fused_true", {"channels": 3, "fused": True}, "torch"),
        ("channels_first_few", {"channels": None, "last_axis_only": False},
         "torch"),
    )
    def test_torch_rules(self, changes, expected):
        from keras_bn import _dispatch

        path = _dispatch.choose(_torch_facts(**changes))
        self.assertEqual(path.name, expected, path.reason)
        self.assertTrue(path.reason)

    @parameterized.named_parameters(
        ("mask", {"masked": True}, "mask"),
        ("ghost", {"ghost": True}, "ghost batches"),
        ("axes_apart", {"adjacent_axes": False}, "not adjacent"),
        ("synchronizing", {"synchronizing": True}, "synchronization"),
        ("empty", {"elements": 0}, "empty"),
    )
    def test_torch_refusals_say_why(self, changes, reason):
        from keras_bn import _dispatch

        with self.assertRaisesRegex(
            ValueError, f"fused=True.*PyTorch.*{reason}"
        ):
            _dispatch.choose(_torch_facts(fused=True, **changes))



@requires_tf
class GraphOpsTest(test_case.LayerTestCase):
    """What a requested path puts in the traced graph."""

    @parameterized.named_parameters(
        ("fused_true", {"fused": True}, ["FusedBatchNorm"],
         ["XlaMustCompile"]),
        ("fused_false", {"fused": False}, [],
         ["FusedBatchNorm", "XlaMustCompile"]),
        ("xla_true", {"xla_kernel": True}, ["XlaMustCompile"],
         ["FusedBatchNorm"]),
        ("renorm_fused_true", {"fused": True, **RENORM}, ["FusedBatchNorm"],
         ["XlaMustCompile"]),
    )
    def test_requested_path_is_in_the_graph(self, cfg, present, absent):
        import tensorflow as tf

        layer = _layer(**cfg)
        layer.build((8, 4))

        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return tape.gradient(y, x)

        graph = str(
            tf.function(step)
            .get_concrete_function(tf.TensorSpec((None, 4), "float32"))
            .graph.as_graph_def()
        )
        for op in present:
            self.assertIn(op, graph)
        for op in absent:
            self.assertNotIn(op, graph)


class KernelRequestTest(test_case.LayerTestCase):
    @pytest.mark.skipif(
        not (TF or TORCH), reason="JAX has no fused kernel to ask for"
    )
    def test_fused_true_with_a_mask_raises_at_call(self):
        layer = keras_bn.BatchNormalization(fused=True)
        x = np.ones((4, 3, 2), "float32")
        mask = np.ones((4, 3), bool)
        with self.assertRaisesRegex(ValueError, "fused=True.*mask"):
            layer(x, training=True, mask=mask)
        # In inference the mask changes nothing, and the kernel serves.
        self.assertEqual(
            layer.normalization_path(x, training=False, mask=mask).name,
            "torch" if TORCH else "fused",
        )

    def test_xla_kernel_true_with_fused_set_is_refused(self):
        for fused in (True, False):
            with self.assertRaisesRegex(
                ValueError, f"fused={fused}, xla_kernel=True"
            ):
                keras_bn.BatchNormalization(fused=fused, xla_kernel=True)

    @pytest.mark.skipif(TF, reason="checks a backend other than TensorFlow")
    def test_xla_kernel_refused_on_other_backends(self):
        layer = keras_bn.BatchNormalization(xla_kernel=True)
        with self.assertRaisesRegex(ValueError, "xla_kernel=True.*backend"):
            layer.build((4, 3))

    @pytest.mark.skipif(
        TF or TORCH, reason="TensorFlow and torch have a fused kernel"
    )
    def test_fused_true_refused_without_a_fused_kernel(self):
        layer = keras_bn.BatchNormalization(fused=True)
        with self.assertRaisesRegex(
            ValueError, f"the backend is {keras.backend.backend()}"
        ):
            layer.build((4, 3))


def _torch_step(layer, x, w, mask=None):
    """Output and gradients (input, then trainable weights) of one
    training call, by torch's autograd, for the loss `sum(y * w)`."""
    import torch

    x = torch.tensor(x, requires_grad=True)
    y = layer(x, training=True, mask=mask)
    loss = torch.sum(y.float() * torch.tensor(w))
    weights = [v.value for v in layer.trainable_weights]
    return [y.float()] + list(torch.autograd.grad(loss, [x] + weights))


@requires_torch
class TorchPathTest(test_case.LayerTestCase):
    """PyTorch's kernel (`fused=True` on torch) against core Keras and
    against keras_bn's `keras.ops` path, gradients included."""

    @parameterized.named_parameters(
        ("dense", {}, (16, 4)),
        ("image", {"momentum": 0.9, "epsilon": 1e-5}, (4, 5, 5, 3)),
        ("channels_first", {"axis": 1}, (4, 3, 5, 5)),
        ("sequence_axis_1", {"axis": 1, "momentum": 0.5}, (6, 3, 4)),
        ("no_affine", {"center": False, "scale": False}, (2, 3, 3, 4)),
        ("batch_of_one", {"momentum": 0.5}, (1, 4)),
    )
    def test_gradients_and_statistics_equal_core_keras(self, cfg, shape):
        rng = _rng(26)
        ours = keras_bn.BatchNormalization(fused=True, **cfg)
        core = keras.layers.BatchNormalization(**cfg)
        ours.build(shape)
        core.build(shape)
        _randomize(ours, rng)
        core.set_weights(ours.get_weights())
        for i in range(3):
            x = rng.normal(i, 1.0 + i, shape).astype("float32")
            w = rng.normal(0.0, 1.0, shape).astype("float32")
            with paths.expect(self, "torch", set()):
                got = _torch_step(ours, x, w)
            expected = _torch_step(core, x, w)
            self.assertLen(got, len(expected))
            for a, b in zip(got, expected):
                self.assertAllClose(a, b, atol=1e-4, rtol=1e-4)
        for a, b in zip(ours.weights, core.weights):
            self.assertAllClose(a, b, msg=a.name)
        x = rng.normal(0.0, 3.0, shape).astype("float32")
        self.assertEqual(ours.normalization_path(x).name, "torch")
        self.assertAllClose(ours(x), core(x))

    @parameterized.named_parameters(
        ("adjacent_axes", {"axis": [1, 2]}, (6, 2, 3, 4), "float32"),
        ("float64", {}, (16, 4), "float64"),
        ("cumulative", {"momentum": None}, (16, 4), "float32"),
        ("renorm", RENORM, (8, 3, 4), "float32"),
        ("renorm_channels_first", dict(RENORM, axis=1), (8, 3, 4),
         "float32"),
        ("renorm_no_affine", dict(RENORM, center=False, scale=False),
         (2, 3, 3, 4), "float32"),
        ("mixed_float16", {}, (4, 5, 5, 3), "mixed_float16"),
        ("mixed_bfloat16", {"scale": False}, (4, 5, 5, 3), "mixed_bfloat16"),
        ("renorm_mixed", RENORM_MIXED, (8, 3, 4), "mixed_float16"),
        ("renorm_mixed_bfloat16", RENORM_MIXED, (8, 3, 4), "mixed_bfloat16"),
    )
    def test_equals_ops_path(self, cfg, shape, dtype):
        rng = _rng(27)
        layers = _twin_layers(
            shape, rng, (True, False), dtype=dtype, **cfg
        )
        compute = "float64" if dtype == "float64" else "float32"
        loose = dtype.startswith("mixed")
        for i in range(3):
            x = rng.normal(i, 2.0, shape).astype(compute)
            w = rng.normal(0.0, 1.0, shape).astype("float32")
            with paths.expect(self, "torch", set()):
                got = _torch_step(layers[0], x, w)
            expected = _torch_step(layers[1], x, w)
            for a, b in zip(got, expected):
                self.assertAllClose(
                    a, b, atol=5e-2 if loose else 1e-5,
                    rtol=5e-2 if loose else 1e-5,
                )
        for a, b in zip(*(layer.weights for layer in layers)):
            self.assertAllClose(a, b, atol=1e-5, rtol=1e-5, msg=a.name)
        x = rng.normal(0.0, 3.0, shape).astype(compute)
        self.assertEqual(layers[0].normalization_path(x).name, "torch")
        self.assertAllClose(
            keras.ops.cast(layers[0](x), compute),
            keras.ops.cast(layers[1](x), compute),
            atol=1e-2 if loose else 1e-5,
        )

    def test_save_load_and_config_keep_the_torch_path(self):
        rng = _rng(28)
        x = rng.normal(1.0, 2.0, (16, 3, 4)).astype("float32")
        y = rng.normal(0.0, 1.0, x.shape).astype("float32")
        layer = keras_bn.BatchNormalization(axis=1, momentum=0.5, fused=True)
        config = layer.get_config()
        self.assertIs(config["fused"], True)
        self.assertEqual(
            keras_bn.BatchNormalization.from_config(config).get_config(),
            config,
        )
        model = keras.Sequential([keras.Input((3, 4)), layer])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        loaded = test_case.save_and_load(model)
        self.assertEqual(loaded.layers[0].get_config(), layer.get_config())
        self.assertEqual(
            loaded.layers[0].normalization_path(x, training=True).name,
            "torch",
        )
        self.assertAllClose(
            loaded.predict(x, verbose=0), model.predict(x, verbose=0)
        )
        for m in (model, loaded):
            m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        for a, b in zip(model.weights, loaded.weights):
            self.assertAllClose(a, b, msg=a.path)

    @parameterized.named_parameters(
        ("axes_apart", {"axis": [1, 3]}, "not adjacent.*axis=\\[1, 3\\]"),
        ("ghost", {"virtual_batch_size": 2}, "ghost.*virtual_batch_size=2"),
    )
    def test_fused_true_that_cannot_serve_the_layer(self, cfg, message):
        layer = keras_bn.BatchNormalization(fused=True, **cfg)
        with self.assertRaisesRegex(ValueError, f"PyTorch.*{message}"):
            layer.build((4, 3, 2, 5))



class EveryPathRanTest(test_case.LayerTestCase):
    """Last in the file: the per-path grids above ran every path here."""

    def test_every_available_path_ran(self):
        paths.check_every_path_ran(self, PATHS_RAN)
