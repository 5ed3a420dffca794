"""Tests of keras_bn.BatchRenormalization.

References: a float64 NumPy implementation of the paper's equations and of
core Keras's documented update rules (written from them, not from the
layer's code), with schedules evaluated by `np.interp`; core
`keras.layers.BatchNormalization(renorm=True, ...)`; and core plain batch
normalization for `rmin = rmax = 1, dmax = 0`.
"""


import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_bn
from keras_bn import schedules
from tests import paths
from tests import test_case

TF = keras.backend.backend() == "tensorflow"
requires_tf = pytest.mark.skipif(
    not TF, reason="uses tf.GradientTape/tf.distribute"
)

STATISTICS = (
    "moving_mean", "moving_variance", "moving_stddev", "renorm_mean",
    "renorm_stddev",
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _axes_and_shape(x, cfg):
    rank = x.ndim
    axis = cfg.get("axis", -1)
    axis = axis if isinstance(axis, list) else [axis]
    axes = sorted(a % rank for a in axis)
    reduce = tuple(i for i in range(rank) if i not in axes)
    bshape = [x.shape[i] if i in axes else 1 for i in range(rank)]
    return reduce, bshape


def reference_train_step(x, state, cfg, limits, mask=None, fixed_rd=None):
    """One training step of batch renormalization in float64 NumPy.

    Args:
        x: Input array.
        state: Dict of float64 arrays in the weights' shape: "gamma" and
            "beta" (or None), and the names in `STATISTICS`; plus "n", the
            number of updates so far (for momentum=None). Updated in place.
        cfg: Layer arguments ("axis", "epsilon", "momentum",
            "renorm_momentum", "virtual_batch_size").
        limits: Dict with the clipping limits "rmax", "rmin", "dmax" in
            force at this step (a missing key means no clip).
        mask: Optional mask, the shape of x without its last axis or
            broadcastable to x.
        fixed_rd: Optional list of `(r, d)` for each ghost batch, used
            instead of the values computed from x (for gradients with r and
            d held constant).

    Returns:
        `(y, info)`: the output, and a dict with "r_clipped" and
        "d_clipped" (the fractions of the (ghost batch, feature) entries of
        r and d that were clipped) and "rd" (the `(r, d)` of each ghost
        batch).
    """
    x = np.asarray(x, np.float64)
    reduce, bshape = _axes_and_shape(x, cfg)
    if mask is None:
        m = np.ones_like(x)
    else:
        m = np.asarray(mask, np.float64)
        if m.ndim == x.ndim - 1:
            m = m[..., None]
        m = np.broadcast_to(m, x.shape)
    eps = cfg.get("epsilon", 1e-3)
    g = 1.0 if state["gamma"] is None else state["gamma"].reshape(bshape)
    b = 0.0 if state["beta"] is None else state["beta"].reshape(bshape)
    mu = state["renorm_mean"].reshape(bshape)
    sigma = np.maximum(state["renorm_stddev"].reshape(bshape), np.sqrt(eps))
    batch = x.shape[0]
    size = cfg.get("virtual_batch_size") or batch
    y = np.empty_like(x)
    means, variances, valid, r_clipped, d_clipped, rd = [], [], [], [], [], []
    for start in range(0, batch, size):
        xs, ms = x[start : start + size], m[start : start + size]
        n = ms.sum(axis=reduce, keepdims=True)
        mean = (xs * ms).sum(axis=reduce, keepdims=True) / np.maximum(n, 1)
        var = (ms * (xs - mean) ** 2).sum(axis=reduce, keepdims=True)
        var = var / np.maximum(n, 1)
        sigma_b = np.sqrt(var + eps)
        r = sigma_b / sigma
        d = (mean - mu) / sigma
        r_clip = np.clip(r, limits.get("rmin"), limits.get("rmax"))
        dmax = limits.get("dmax")
        d_clip = d if dmax is None else np.clip(d, -dmax, dmax)
        if fixed_rd is not None:
            r_clip, d_clip = fixed_rd[len(rd)]
        rd.append((r_clip, d_clip))
        y[start : start + size] = g * ((xs - mean) / sigma_b * r_clip + d_clip)
        y[start : start + size] += b
        r_clipped.append(r_clip != r)
        d_clipped.append(d_clip != d)
        means.append(mean.reshape(-1))
        variances.append(var.reshape(-1))
        valid.append((n > 0).reshape(-1).astype(np.float64))
    means, variances, valid = map(np.array, (means, variances, valid))
    count = valid.sum(axis=0)
    mean = (means * valid).sum(axis=0) / np.maximum(count, 1)
    stddev = np.sqrt(
        (variances * valid).sum(axis=0) / np.maximum(count, 1) + eps
    )
    momentum = cfg.get("momentum", 0.99)
    if momentum is None:
        momentum = state["n"] / (state["n"] + 1.0)
        state["n"] += float(count.any())
    renorm_momentum = cfg.get("renorm_momentum", 0.99)
    updates = {
        "renorm_mean": (mean, renorm_momentum),
        "renorm_stddev": (stddev, renorm_momentum),
        "moving_mean": (mean, momentum),
        "moving_stddev": (stddev, momentum),
    }
    for key, (value, decay) in updates.items():
        shape = state[key].shape
        old = state[key].reshape(-1)
        new = np.where(count > 0, old * decay + value * (1 - decay), old)
        state[key] = new.reshape(shape)
    variance = np.maximum(state["moving_stddev"] ** 2 - eps, 0.0)
    state["moving_variance"] = np.where(
        (count > 0).reshape(variance.shape), variance, state["moving_variance"]
    )
    info = {
        "r_clipped": np.mean(r_clipped),
        "d_clipped": np.mean(d_clipped),
        "rd": rd,
    }
    return y, info


def reference_inference(x, state, cfg):
    _, bshape = _axes_and_shape(x, cfg)
    g = 1.0 if state["gamma"] is None else state["gamma"].reshape(bshape)
    b = 0.0 if state["beta"] is None else state["beta"].reshape(bshape)
    mean = state["moving_mean"].reshape(bshape)
    var = state["moving_variance"].reshape(bshape)
    return g * (x - mean) / np.sqrt(var + cfg.get("epsilon", 1e-3)) + b


# A clipping spec maps a key to a float or to a ramp {"steps": (start, end),
# "values": (initial, final)}, optionally inverted with "reciprocal": True.


def reference_limits(clipping, step):
    """Clipping limits at `step` for a clipping spec, with `np.interp`."""
    limits = {}
    for key, value in clipping.items():
        if isinstance(value, dict):
            ramp = np.interp(step, value["steps"], value["values"])
            value = 1.0 / ramp if value.get("reciprocal") else ramp
        limits[key] = value
    return limits


def _to_layer_clipping(clipping):
    """The layer's `renorm_clipping` for a clipping spec."""
    out = {}
    for key, value in clipping.items():
        if isinstance(value, dict):
            (start, end), (initial, final) = value["steps"], value["values"]
            ramp = schedules.LinearRamp(initial, final, start, end)
            if value.get("reciprocal"):
                ramp = schedules.Reciprocal(ramp)
            value = ramp
        out[key] = value
    return out


def _named(layer, name):
    for w in layer.weights:
        if w.name == name:
            return keras.ops.convert_to_numpy(w)
    return None


def _step(layer):
    return int(keras.ops.convert_to_numpy(layer.renorm_step))


def _weight(layer, name):
    return next(w for w in layer.weights if w.name == name)


def _randomize(layer, rng):
    """Random gamma/beta and statistics, so no test passes by accident."""
    stddev = rng.uniform(0.7, 1.5, layer.moving_mean.shape)
    values = {
        "gamma": rng.normal(1.0, 0.5, stddev.shape),
        "beta": rng.normal(0.0, 1.0, stddev.shape),
        "moving_mean": rng.normal(0.0, 1.0, stddev.shape),
        "moving_stddev": stddev,
        "moving_variance": stddev**2 - layer.epsilon,
        "renorm_mean": rng.normal(0.0, 1.0, stddev.shape),
        "renorm_stddev": rng.uniform(0.7, 1.5, stddev.shape),
    }
    for w in layer.weights:
        if w.name in values:
            w.assign(values[w.name].astype(w.dtype))


def _copy_by_name(source, target):
    for w in target.weights:
        value = _named(source, w.name)
        if value is not None:
            w.assign(value)


def _state(layer):
    state = {name: _named(layer, name) for name in STATISTICS}
    state = {k: v.astype(np.float64) for k, v in state.items()}
    for name in ("gamma", "beta"):
        value = _named(layer, name)
        state[name] = None if value is None else value.astype(np.float64)
    state["n"] = 0.0
    return state


def _mask_for(kind, shape, rng, step=0):
    if kind is None:
        return None
    if kind == "sequence":
        mask = rng.random(shape[:-1]) > 0.35
    else:
        mask = rng.random(shape) > 0.35
    mask[0] = True  # the first example always counts
    if step == 1:
        mask[: shape[0] // 2] = False  # a ghost batch may be all masked
    return mask


TIGHT = {"rmax": 1.2, "rmin": 0.8, "dmax": 0.3}
RAMPS = {
    "rmax": {"steps": (1, 4), "values": (1.0, 2.5)},
    "rmin": {"steps": (1, 4), "values": (1.0, 2.5), "reciprocal": True},
    "dmax": {"steps": (0, 3), "values": (0.0, 1.5)},
}

# Config (its "renorm_clipping" as a reference spec), shape, mask kind.
REFERENCE_GRID = (
    ("unclipped", {}, (8, 4), None),
    ("tight", {"renorm_clipping": TIGHT}, (8, 4), None),
    ("schedule", {"renorm_clipping": RAMPS, "renorm_momentum": 0.8},
     (8, 4), None),
    ("rmax_only_axis_1", {"axis": 1, "renorm_clipping": {"rmax": 1.3}},
     (6, 3, 5), None),
    ("axes_list", {"axis": [1, 3], "renorm_clipping": TIGHT},
     (4, 3, 2, 5), None),
    ("no_center_no_scale", {"center": False, "scale": False,
                            "renorm_clipping": TIGHT, "momentum": 0.9},
     (8, 4), None),
    ("cumulative", {"momentum": None, "renorm_clipping": RAMPS}, (8, 4), None),
    ("sequence_mask", {"renorm_clipping": TIGHT, "momentum": 0.8},
     (6, 5, 3), "sequence"),
    ("full_mask_axes", {"axis": [1, 2], "renorm_clipping": RAMPS},
     (6, 2, 3), "full"),
    ("ghost", {"virtual_batch_size": 4, "renorm_clipping": TIGHT},
     (8, 3), None),
    ("ghost_remainder", {"virtual_batch_size": 3, "renorm_clipping": RAMPS},
     (8, 3), None),
    ("ghost_mask", {"virtual_batch_size": 2, "axis": 1,
                    "renorm_clipping": TIGHT}, (6, 3, 4), "sequence"),
    # Few channels: the wide view (see test_batch_normalization.py).
    ("few_channels", {"renorm_clipping": TIGHT, "momentum": 0.8},
     (16, 4, 4, 6), None),
)


# The normalization paths that ran in this process's per-path grids.
PATHS_RAN = set()


class ReferenceTest(test_case.LayerTestCase):
    @parameterized.named_parameters(*paths.per_path(REFERENCE_GRID))
    def test_training_steps_and_inference(self, path, cfg, shape, mask_kind):
        rng = _rng(1)
        clipping = cfg.get("renorm_clipping") or {}
        layer = keras_bn.BatchRenormalization(
            **dict(cfg, renorm_clipping=_to_layer_clipping(clipping)),
            **paths.KWARGS[path],
        )
        paths.build_or_skip(self, layer, shape)
        _randomize(layer, rng)
        state = _state(layer)
        clipped = []
        steps = [
            (
                rng.normal(step - 1.0, 1.0 + step, shape).astype("float32"),
                _mask_for(mask_kind, shape, rng, step),
            )
            for step in range(5)
        ]
        paths.skip_unless_serves(self, path, layer, *steps[0])
        for step, (x, mask) in enumerate(steps):
            with paths.expect(self, path, PATHS_RAN):
                y = layer(x, training=True, mask=mask)
            expected, info = reference_train_step(
                x, state, cfg, reference_limits(clipping, step), mask
            )
            self.assertAllClose(y, expected, atol=2e-5, rtol=1e-4)
            for name in STATISTICS:
                self.assertAllClose(
                    _named(layer, name), state[name], msg=f"{name} {step}"
                )
            diagnostics = layer.renorm_diagnostics()
            self.assertAllClose(diagnostics["r_clipped"], info["r_clipped"])
            self.assertAllClose(diagnostics["d_clipped"], info["d_clipped"])
            self.assertEqual(int(diagnostics["step"]), step + 1)
            clipped.append(info["r_clipped"] + info["d_clipped"])
        if clipping:
            self.assertGreater(max(clipped), 0.0)  # the clip was exercised
        x = rng.normal(0.5, 2.0, shape).astype("float32")
        self.assertAllClose(
            layer(x, training=False),
            reference_inference(x.astype(np.float64), state, cfg),
            atol=2e-5, rtol=1e-4,
        )

    @parameterized.named_parameters(*paths.per_path((("float64",),)))
    def test_float64_stays_float64(self, path):
        if keras.backend.backend() == "jax":
            self.skipTest("JAX has no float64 unless jax_enable_x64 is set")
        # A spread of 1e-3 around 1e4: float32 statistics, r or d would
        # miss the reference by far more than the tolerances.
        rng = _rng(31)
        shape = (16, 2)
        clipping = {"rmax": 1.5, "rmin": 0.5, "dmax": 0.5}
        layer = keras_bn.BatchRenormalization(
            dtype="float64", renorm_clipping=clipping, epsilon=1e-9,
            **paths.KWARGS[path],
        )
        paths.build_or_skip(self, layer, shape)
        _randomize(layer, rng)
        layer.renorm_mean.assign(np.full(2, 1e4))
        layer.renorm_stddev.assign(np.full(2, 1e-3))
        state = _state(layer)
        cfg = {"epsilon": 1e-9}
        x = rng.normal(1e4 + 2e-4, 1.2e-3, shape)
        paths.skip_unless_serves(self, path, layer, x)
        with paths.expect(self, path, PATHS_RAN):
            y = layer(x, training=True)
        expected, _ = reference_train_step(x, state, cfg, clipping)
        self.assertAllClose(y, expected, atol=1e-7, rtol=1e-7)
        for name in STATISTICS:
            self.assertAllClose(
                _named(layer, name), state[name], atol=0, rtol=1e-9,
                msg=name,
            )

    @parameterized.parameters(0, 4999, 5000, 15000, 25000, 40000, 100000)
    def test_paper_schedule_at_step(self, step):
        rng = _rng(2)
        shape = (6, 4)
        layer = keras_bn.BatchRenormalization(
            renorm_clipping=schedules.paper_renorm_clipping()
        )
        layer.build(shape)
        _randomize(layer, rng)
        layer.renorm_step.assign(step)
        state = _state(layer)
        rmax = np.interp(step, [5000, 40000], [1.0, 3.0])
        limits = {
            "rmax": rmax,
            "rmin": 1.0 / rmax,
            "dmax": np.interp(step, [5000, 25000], [0.0, 5.0]),
        }
        x = rng.normal(2.0, 3.0, shape).astype("float32")
        expected, _ = reference_train_step(x, state, {}, limits)
        self.assertAllClose(
            layer(x, training=True), expected, atol=2e-5, rtol=1e-4
        )
        after = layer.renorm_diagnostics()
        self.assertEqual(int(after["step"]), step + 1)
        self.assertAllClose(
            after["rmax"], np.interp(step + 1, [5000, 40000], [1.0, 3.0])
        )

    def test_diagnostics_without_clipping(self):
        layer = keras_bn.BatchRenormalization()
        layer(np.ones((4, 2), "float32"), training=True)
        diagnostics = layer.renorm_diagnostics()
        self.assertEqual(float(diagnostics["rmax"]), np.inf)
        self.assertEqual(float(diagnostics["rmin"]), 0.0)
        self.assertEqual(float(diagnostics["dmax"]), np.inf)
        self.assertEqual(float(diagnostics["r_clipped"]), 0.0)

    def test_diagnostics_before_build(self):
        with self.assertRaisesRegex(ValueError, "before it is built"):
            keras_bn.BatchRenormalization(name="early").renorm_diagnostics()


CORE_GRID = (
    ("default_clip", {"renorm_clipping": {"rmax": 2.0, "rmin": 0.5,
                                          "dmax": 1.0}}, (16, 4), None),
    ("no_clipping", {}, (16, 4), None),
    ("tight", {"renorm_clipping": TIGHT, "renorm_momentum": 0.9},
     (16, 4), None),
    ("rmax_only_axis_1", {"axis": 1, "renorm_clipping": {"rmax": 1.5},
                          "momentum": 0.9, "renorm_momentum": 0.5},
     (8, 3, 5), None),
    ("dmax_only_axis_minus_2", {"axis": -2, "renorm_clipping": {"dmax": 0.2}},
     (8, 3, 5), None),
    ("image", {"momentum": 0.8, "epsilon": 1e-5, "renorm_clipping": TIGHT},
     (4, 5, 5, 3), None),
    ("no_center", {"center": False, "renorm_clipping": TIGHT}, (16, 4), None),
    ("no_scale", {"scale": False, "renorm_clipping": TIGHT}, (16, 4), None),
    ("momentum_zero", {"momentum": 0.0, "renorm_momentum": 0.0,
                       "renorm_clipping": TIGHT}, (16, 4), None),
    ("initializers", {
        "moving_mean_initializer": "ones",
        "moving_variance_initializer": keras.initializers.Constant(4.0),
        "renorm_clipping": TIGHT,
    }, (16, 4), None),
    ("mask", {"momentum": 0.7, "renorm_clipping": TIGHT}, (6, 5, 3),
     "sequence"),
)


class CoreKerasEquivalenceTest(test_case.LayerTestCase):
    @parameterized.named_parameters(*paths.per_path(CORE_GRID))
    def test_same_outputs_and_statistics(self, path, cfg, shape, mask_kind):
        rng = _rng(3)
        ours = keras_bn.BatchRenormalization(**cfg, **paths.KWARGS[path])
        core = keras.layers.BatchNormalization(renorm=True, **cfg)
        paths.build_or_skip(self, ours, shape)
        core.build(shape)
        for w in core.weights:
            self.assertAllClose(_named(ours, w.name), w, msg=w.name)
        if "initializers" not in self._testMethodName:
            _randomize(core, rng)
            _copy_by_name(core, ours)
        steps = [
            (
                rng.normal(step, 1.0 + step, shape).astype("float32"),
                _mask_for(mask_kind, shape, rng),
            )
            for step in range(5)
        ]
        paths.skip_unless_serves(self, path, ours, *steps[0])
        for step, (x, mask) in enumerate(steps):
            with paths.expect(self, path, PATHS_RAN):
                y = ours(x, training=True, mask=mask)
            self.assertAllClose(
                y, core(x, training=True, mask=mask), msg=str(step)
            )
        for w in core.weights:
            self.assertAllClose(_named(ours, w.name), w, msg=w.name)
        x = rng.normal(0, 3, shape).astype("float32")
        self.assertAllClose(ours(x), core(x))

    @parameterized.named_parameters(*CORE_GRID[:4])
    def test_same_weights_after_fit(self, cfg, shape, mask_kind):
        del mask_kind
        rng = _rng(4)
        x = rng.normal(1.0, 2.0, (32,) + shape[1:]).astype("float32")
        y = rng.normal(0.0, 1.0, x.shape).astype("float32")

        def model(layer):
            m = keras.Sequential(
                [keras.Input(shape[1:]), keras.layers.Dense(shape[-1]), layer]
            )
            m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            return m

        ours = model(keras_bn.BatchRenormalization(**cfg))
        core = model(keras.layers.BatchNormalization(renorm=True, **cfg))
        core.layers[0].set_weights(ours.layers[0].get_weights())
        _copy_by_name(core.layers[1], ours.layers[1])
        for m in (ours, core):
            m.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        self.assertAllClose(
            ours.layers[0].kernel, core.layers[0].kernel, atol=1e-5
        )
        for w in core.layers[1].weights:
            self.assertAllClose(_named(ours.layers[1], w.name), w, msg=w.name)

    def test_signature_is_core_keras_then_ours(self):
        # `renorm` defaults to `True` here: the class renormalizes.
        self.assertEqual(test_case.core_signature_differences(
            keras_bn.BatchRenormalization, keras.layers.BatchNormalization,
            defaults_differ=("renorm",),
        ), [])

    def test_core_config_loads(self):
        core = keras.layers.BatchNormalization(
            axis=1, momentum=0.9, epsilon=1e-4, renorm=True,
            renorm_clipping={"rmax": 2.0, "dmax": 0.5}, renorm_momentum=0.8,
        )
        ours = keras_bn.BatchRenormalization.from_config(core.get_config())
        x = _rng(5).normal(2, 3, (4, 3, 5)).astype("float32")
        core.build(x.shape)
        ours.build(x.shape)
        _randomize(core, _rng(6))
        _copy_by_name(core, ours)
        self.assertAllClose(ours(x), core(x))
        self.assertAllClose(ours(x, training=True), core(x, training=True))


class BatchNormalizationLimitTest(test_case.LayerTestCase):
    """`rmin = rmax = 1, dmax = 0` is batch normalization."""

    @parameterized.named_parameters(
        ("constant", {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}),
        ("paper_warmup", schedules.paper_renorm_clipping()),
    )
    @requires_tf
    def test_forward_and_gradients_equal_batch_normalization(self, clipping):
        import tensorflow as tf

        rng = _rng(7)
        shape = (6, 3, 4)
        ours = keras_bn.BatchRenormalization(renorm_clipping=clipping)
        core = keras.layers.BatchNormalization()
        ours.build(shape)
        core.build(shape)
        _randomize(ours, rng)
        _copy_by_name(ours, core)
        for step in range(3):
            x = tf.constant(rng.normal(step, 2.0, shape).astype("float32"))
            w = rng.normal(0.0, 1.0, shape).astype("float32")
            results = []
            for layer in (ours, core):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = layer(x, training=True)
                    loss = tf.reduce_sum(y * w)
                grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
                results.append([y] + grads)
            for a, b in zip(*results):
                self.assertAllClose(a, b, atol=1e-6, rtol=1e-5)
        # The moving variance differs by design: renormalization averages
        # the standard deviation, batch normalization the variance.
        self.assertAllClose(ours.moving_mean, core.moving_mean, atol=1e-6)


@requires_tf
class GradientTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("unclipped", {}, None),
        ("clipped_ghost_axis_1",
         {"axis": 1, "virtual_batch_size": 3,
          "renorm_clipping": {"rmax": 1.1, "rmin": 0.9, "dmax": 0.2}}, None),
        ("mask", {"renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}, "sequence"),
    )
    def test_gradients_match_finite_differences(self, cfg, mask_kind):
        import tensorflow as tf

        rng = _rng(8)
        shape = (5, 3, 2)
        layer = keras_bn.BatchRenormalization(dtype="float64", **cfg)
        layer.build(shape)
        _randomize(layer, rng)
        initial = [
            keras.ops.convert_to_numpy(v) for v in layer.non_trainable_variables
        ]
        state = _state(layer)
        x = rng.normal(1.0, 2.0, shape)
        w = rng.normal(0.0, 1.0, shape)
        mask = _mask_for(mask_kind, shape, rng)
        limits = cfg.get("renorm_clipping", {})

        def layer_loss(x_value):
            # Every call starts from the same state: a training call moves
            # the statistics that r and d are computed against.
            for v, value in zip(layer.non_trainable_variables, initial):
                v.assign(value)
            y = layer(x_value, training=True, mask=mask)
            return tf.reduce_sum(y * w) + tf.reduce_sum(y**2) / 10

        x_var = tf.Variable(x)
        with tf.GradientTape() as tape:
            value = layer_loss(x_var)
        grads = tape.gradient(value, [x_var, layer.gamma, layer.beta])

        _, info = reference_train_step(x, dict(state), cfg, limits, mask)

        def reference_loss(x_value, fixed_rd):
            y, _ = reference_train_step(
                x_value, dict(state), cfg, limits, mask, fixed_rd=fixed_rd
            )
            return np.sum(y * w) + np.sum(y**2) / 10

        def numeric(f, var):
            base = var.numpy().copy()
            out = np.zeros(base.size)
            for i in range(base.size):
                for sign in (1.0, -1.0):
                    bumped = base.reshape(-1).copy()
                    bumped[i] += sign * 1e-6
                    var.assign(bumped.reshape(base.shape))
                    out[i] += sign * float(f()) / 2e-6
            var.assign(base)
            return out.reshape(base.shape)

        # With r and d held at their values for x, as the paper prescribes.
        frozen = numeric(
            lambda: reference_loss(x_var.numpy(), info["rd"]), x_var
        )
        self.assertAllClose(grads[0], frozen, atol=1e-6)
        # r and d do not depend on gamma and beta, so the layer itself can
        # be differentiated numerically there.
        self.assertAllClose(
            grads[1], numeric(lambda: layer_loss(x), layer.gamma),
            atol=1e-6,
        )
        self.assertAllClose(
            grads[2], numeric(lambda: layer_loss(x), layer.beta),
            atol=1e-6,
        )
        if not limits:
            # Letting r and d follow x changes the derivative: the layer's
            # gradient really leaves them out.
            moving = numeric(
                lambda: reference_loss(x_var.numpy(), None), x_var
            )
            self.assertGreater(np.max(np.abs(moving - frozen)), 1e-3)


class LayerTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("default", {}, (8, 4)),
        ("paper_schedule",
         {"renorm_clipping": schedules.paper_renorm_clipping()}, (8, 4)),
        ("axes_ghost_constant",
         {"axis": [1, 2], "virtual_batch_size": 4,
          "renorm_clipping": {"rmax": 2.0, "dmax": 1.0}}, (8, 2, 3)),
        ("no_center_cumulative",
         {"center": False, "momentum": None,
          "renorm_clipping": {"rmin": 0.5}}, (8, 3, 2)),
    )
    def test_layer(self, kwargs, shape):
        center = kwargs.get("center", True)
        cumulative = "momentum" in kwargs and kwargs["momentum"] is None
        self.run_layer_test(
            keras_bn.BatchRenormalization,
            init_kwargs=kwargs,
            input_shape=shape,
            expected_num_trainable_weights=1 + center,
            # 5 statistics, the step, 2 diagnostics (+ the cumulative count).
            expected_num_non_trainable_weights=8 + cumulative,
        )

    def test_weight_names_extend_batch_normalization(self):
        layer = keras_bn.BatchRenormalization()
        layer.build((2, 3))
        plain = keras_bn.BatchNormalization()
        plain.build((2, 3))
        names = [w.name for w in layer.weights]
        self.assertEqual(names[:4], [w.name for w in plain.weights])
        self.assertEqual(
            names[4:],
            ["moving_stddev", "renorm_mean", "renorm_stddev", "renorm_step",
             "r_clipped_fraction", "d_clipped_fraction"],
        )
        self.assertIsInstance(layer, keras_bn.BatchNormalization)
        self.assertTrue(layer.renorm)

    def test_inference_and_frozen_layer_change_nothing(self):
        rng = _rng(9)
        layer = keras_bn.BatchRenormalization(renorm_clipping=TIGHT)
        layer.build((8, 3))
        _randomize(layer, rng)
        before = [keras.ops.convert_to_numpy(w) for w in layer.weights]
        state = _state(layer)
        x = rng.normal(1.0, 2.0, (8, 3)).astype("float32")
        expected = reference_inference(x.astype(np.float64), state, {})
        self.assertAllClose(layer(x), expected, atol=2e-5)
        layer.trainable = False
        self.assertAllClose(layer(x, training=True), expected, atol=2e-5)
        for w, value in zip(layer.weights, before):
            self.assertAllClose(w, value, atol=0, rtol=0, msg=w.name)

    def test_all_masked_batch_leaves_statistics(self):
        layer = keras_bn.BatchRenormalization(renorm_clipping=TIGHT)
        layer.build((4, 5, 3))
        _randomize(layer, _rng(10))
        before = {name: _named(layer, name) for name in STATISTICS}
        x = _rng(11).normal(0, 1, (4, 5, 3)).astype("float32")
        y = layer(x, training=True, mask=np.zeros((4, 5), bool))
        self.assertTrue(np.all(np.isfinite(keras.ops.convert_to_numpy(y))))
        for name, value in before.items():
            self.assertAllClose(_named(layer, name), value, atol=0, rtol=0)
        self.assertEqual(_step(layer), 1)

    @parameterized.parameters("mixed_float16", "mixed_bfloat16")
    def test_float32_statistics_under_mixed_precision(self, policy):
        rng = _rng(12)
        shape = (8, 3)
        x = rng.normal(3.0, 2.0, shape).astype("float32")
        mixed = keras_bn.BatchRenormalization(renorm_clipping=TIGHT,
                                              dtype=policy)
        plain = keras_bn.BatchRenormalization(renorm_clipping=TIGHT)
        for layer in (mixed, plain):
            for _ in range(3):
                y = layer(x, training=True)
            self.assertEqual(
                keras.backend.standardize_dtype(y.dtype), layer.compute_dtype
            )
        self.assertEqual(mixed.compute_dtype, policy[len("mixed_"):])
        for w in plain.weights:
            ours = _weight(mixed, w.name)
            self.assertEqual(ours.dtype, w.dtype, w.name)
            # Statistics of the float16 input, computed in float32.
            self.assertAllClose(ours, w, atol=2e-3, rtol=1e-3, msg=w.name)

    def test_save_at_step_n_continues_from_n(self):
        rng = _rng(13)
        x = rng.normal(1.0, 2.0, (32, 4)).astype("float32")
        y = rng.normal(0.0, 1.0, (32, 1)).astype("float32")
        clipping = schedules.paper_renorm_clipping(
            warmup_steps=2, rmax_steps=10, dmax_steps=6
        )
        model = keras.Sequential([
            keras.Input((4,)),
            keras.layers.Dense(4),
            keras_bn.BatchRenormalization(renorm_clipping=clipping),
            keras.layers.Dense(1),
        ])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        loaded = test_case.save_and_load(model)
        layer = loaded.layers[1]
        self.assertIsInstance(layer, keras_bn.BatchRenormalization)
        self.assertEqual(_step(layer), 4)
        self.assertAllClose(
            layer.renorm_diagnostics()["rmax"],
            np.interp(4, [2, 10], [1.0, 3.0]),
        )
        for m in (model, loaded):
            m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        self.assertEqual(_step(layer), 8)
        for a, b in zip(model.weights, loaded.weights):
            self.assertAllClose(b, a, atol=1e-6, msg=a.path)


class ArgumentTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("unknown_key", {"renorm_clipping": {"rmax": 2.0, "dmin": 0.1}},
         r"\['dmin'\]"),
        ("rmax_below_1", {"renorm_clipping": {"rmax": 0.5}}, "rmax=0.5"),
        ("rmin_above_1", {"renorm_clipping": {"rmin": 1.5}}, "rmin=1.5"),
        ("rmin_negative", {"renorm_clipping": {"rmin": -0.5}}, "rmin=-0.5"),
        ("dmax_negative", {"renorm_clipping": {"dmax": -1.0}}, "dmax=-1.0"),
        ("dmax_nan", {"renorm_clipping": {"dmax": float("nan")}}, "dmax=nan"),
        ("rmax_string", {"renorm_clipping": {"rmax": "3"}}, "rmax='3'"),
        ("rmax_schedule_below_1",
         {"renorm_clipping": {"rmax": schedules.LinearRamp(0.5, 3.0, 0, 9)}},
         r"rmax=LinearRamp\(initial_value=0.5"),
        ("dmax_schedule_negative",
         {"renorm_clipping": {"dmax": schedules.LinearRamp(0.0, -2.0, 1, 2)}},
         "final_value=-2.0"),
        ("clipping_not_a_dict", {"renorm_clipping": 3.0},
         "renorm_clipping=3.0"),
        ("renorm_momentum", {"renorm_momentum": 1.5}, "renorm_momentum=1.5"),
        ("renorm_false", {"renorm": False}, "renorm=False"),
        ("momentum_from_base", {"momentum": 1.5}, "momentum=1.5"),
    )
    def test_construction(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            keras_bn.BatchRenormalization(**kwargs)

    def test_schedule_end_before_start(self):
        with self.assertRaisesRegex(ValueError, "start_step=9, end_step=3"):
            keras_bn.BatchRenormalization(
                renorm_clipping={"rmax": schedules.LinearRamp(1.0, 2.0, 9, 3)}
            )

    def test_none_values_mean_no_clip(self):
        layer = keras_bn.BatchRenormalization(
            renorm_clipping={"rmax": None, "dmax": 0.5}
        )
        revived = keras_bn.BatchRenormalization.from_config(layer.get_config())
        self.assertEqual(revived.get_config(), layer.get_config())
        layer(np.ones((4, 2), "float32"), training=True)
        self.assertEqual(float(layer.renorm_diagnostics()["rmax"]), np.inf)


@requires_tf
class XLATest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("schedule", {"renorm_clipping": RAMPS}, (16, 4), None),
        ("mask", {"renorm_clipping": TIGHT}, (8, 5, 3), "sequence"),
        ("axes_ghost_remainder",
         {"axis": [1, 2], "virtual_batch_size": 3, "renorm_clipping": RAMPS},
         (8, 2, 3), None),
        ("cumulative", {"momentum": None, "renorm_clipping": TIGHT},
         (16, 4), None),
    )
    def test_jit_compile_equals_eager(self, cfg, shape, mask_kind):
        import tensorflow as tf

        rng = _rng(14)
        cfg = dict(cfg, renorm_clipping=_to_layer_clipping(
            cfg["renorm_clipping"]))
        eager = keras_bn.BatchRenormalization(**cfg)
        compiled = keras_bn.BatchRenormalization(**cfg)
        eager.build(shape)
        compiled.build(shape)
        _randomize(eager, rng)
        compiled.set_weights(eager.get_weights())
        step = tf.function(
            lambda x, m: compiled(x, training=True, mask=m), jit_compile=True
        )
        for i in range(5):
            x = rng.normal(i, 2.0, shape).astype("float32")
            mask = _mask_for(mask_kind, shape, rng)
            mask = np.ones(x.shape, bool) if mask is None else mask
            self.assertAllClose(
                step(x, mask), eager(x, training=True, mask=mask)
            )
        for a, b in zip(compiled.weights, eager.weights):
            self.assertAllClose(a, b, msg=a.name)
        self.assertEqual(_step(compiled), 5)

    @parameterized.named_parameters(
        ("schedule", {"renorm_clipping": RAMPS}),
        ("ghost", {"virtual_batch_size": 4, "renorm_clipping": TIGHT}),
    )
    def test_fit_with_jit_compile_equals_eager(self, cfg):
        rng = _rng(15)
        x = rng.normal(1.0, 2.0, (32, 4, 3)).astype("float32")
        y = rng.normal(0.0, 1.0, (32, 4)).astype("float32")
        cfg = dict(cfg, renorm_clipping=_to_layer_clipping(
            cfg["renorm_clipping"]))

        def model(jit):
            m = keras.Sequential([
                keras.Input((4, 3)),
                keras.layers.Dense(4),
                keras_bn.BatchRenormalization(**cfg),
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
        self.assertEqual(_step(compiled.layers[1]), 8)



@requires_tf
class MirroredStrategyTest(test_case.LayerTestCase):
    def _run(self, strategy, cfg, x, mask, weights, steps=2):
        import tensorflow as tf

        with strategy.scope():
            layer = keras_bn.BatchRenormalization(**cfg)
            layer.build(x.shape)
        layer.set_weights(weights)
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

    def _weights(self, cfg, shape, rng):
        probe = keras_bn.BatchRenormalization(**cfg)
        probe.build(shape)
        _randomize(probe, rng)
        return probe.get_weights()

    @parameterized.named_parameters(
        ("constant", {"renorm_clipping": TIGHT}, None),
        ("schedule_mask", {"renorm_clipping": RAMPS}, "sequence"),
        ("ghost", {"virtual_batch_size": 2, "renorm_clipping": TIGHT}, None),
        ("axes_cumulative", {"axis": [1, 2], "momentum": None,
                             "renorm_clipping": RAMPS}, None),
    )
    def test_synchronized_equals_global_batch(self, cfg, mask_kind):
        import tensorflow as tf

        rng = _rng(16)
        shape = (8, 3, 4)
        x = rng.normal(0, 1, shape).astype("float32")
        x[4:] += 3.0  # the two replicas' halves differ
        mask = _mask_for(mask_kind, shape, rng)
        mask = np.ones(shape[:-1], bool) if mask is None else mask
        cfg = dict(
            cfg, momentum=cfg.get("momentum", 0.5), renorm_momentum=0.6,
            renorm_clipping=_to_layer_clipping(cfg["renorm_clipping"]),
            synchronized=True,
        )
        weights = self._weights(cfg, shape, rng)
        one_device = tf.distribute.OneDeviceStrategy("CPU:0")
        expected, single = self._run(one_device, cfg, x, mask, weights)
        got, synced = self._run(self._strategy(), cfg, x, mask, weights)
        self.assertAllClose(got, expected)
        for a, b in zip(synced.weights, single.weights):
            self.assertAllClose(a, b, msg=a.name)
        self.assertEqual(_step(synced), 2)

    def test_unsynchronized_uses_replica_statistics(self):
        rng = _rng(17)
        shape = (8, 3)
        x = rng.normal(0, 1, shape).astype("float32")
        x[4:] = 3.0 * x[4:] + 5.0
        cfg = {"momentum": 0.5, "renorm_momentum": 0.7,
               "renorm_clipping": TIGHT}
        weights = self._weights(cfg, shape, rng)
        got, layer = self._run(
            self._strategy(), cfg, x, np.ones(shape[:-1], bool), weights,
            steps=1,
        )
        probe = keras_bn.BatchRenormalization(**cfg)
        probe.build(shape)
        probe.set_weights(weights)
        outputs, states, infos = [], [], []
        for half in (x[:4], x[4:]):
            state = _state(probe)
            y, info = reference_train_step(half, state, cfg, TIGHT)
            outputs.append(y)
            states.append(state)
            infos.append(info)
        self.assertAllClose(got, np.concatenate(outputs), atol=2e-5)
        for name in ("moving_mean", "moving_stddev", "renorm_mean",
                     "renorm_stddev"):
            self.assertAllClose(
                _named(layer, name), np.mean([s[name] for s in states], 0),
                msg=name,
            )
        stddev = np.mean([s["moving_stddev"] for s in states], 0)
        self.assertAllClose(layer.moving_variance, stddev**2 - 1e-3)
        for key in ("r_clipped", "d_clipped"):
            self.assertAllClose(
                layer.renorm_diagnostics()[key],
                np.mean([info[key] for info in infos]),
            )
        self.assertEqual(_step(layer), 1)

    @pytest.mark.slow
    def test_fit_evaluate_predict_save_in_scope(self):
        rng = _rng(18)
        x = rng.normal(0, 1, (32, 5)).astype("float32")
        y = (x.sum(1) > 0).astype("float32")
        with self._strategy().scope():
            model = keras.Sequential([
                keras.Input((5,)),
                keras.layers.Dense(8),
                keras_bn.BatchRenormalization(
                    synchronized=True, virtual_batch_size=4,
                    renorm_clipping=schedules.paper_renorm_clipping(
                        warmup_steps=1, rmax_steps=3, dmax_steps=2
                    ),
                ),
                keras.layers.Dense(1, activation="sigmoid"),
            ])
            model.compile(optimizer="adam", loss="binary_crossentropy")
            model.fit(x, y, batch_size=16, epochs=2, verbose=0)
            self.assertEqual(_step(model.layers[1]), 4)
            model.evaluate(x, y, verbose=0)
            expected = model.predict(x, verbose=0)
            loaded = test_case.save_and_load(model)
            self.assertAllClose(loaded.predict(x, verbose=0), expected)
            self.assertEqual(_step(loaded.layers[1]), 4)


class EveryPathRanTest(test_case.LayerTestCase):
    """Last in the file: the per-path grids above ran every path here."""

    def test_every_available_path_ran(self):
        paths.check_every_path_ran(self, PATHS_RAN)
