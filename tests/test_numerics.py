"""The numerics contract: every path meets float64 on hard inputs.

Each case trains a one-layer model for one step with Keras's own training
function, eagerly (`run_eagerly=True`), in a graph (TensorFlow's
`tf.function`) and under `jit_compile=True`, on inputs whose mean is 1,
100 and 1000 times their spread, where `E[x**2] - E[x]**2` in float32
loses the variance. With `momentum=0` the moving statistics after the
step are the batch's, so they, the training output (through the loss, a
mean squared error against the reference) and the inference output are
compared with a float64 NumPy implementation of the equations, and with
core Keras's `BatchNormalization` on the same input and mode: keras_bn
must be within 1 % of float64 and no worse than core Keras.
"""

import functools

import keras
import numpy as np
from absl.testing import parameterized

import keras_bn
from keras_bn import _dispatch
from tests import paths
from tests import test_case

BACKEND = keras.backend.backend()
SHAPE = (64, 4, 4, 8)
SPREAD = 2.0
RATIOS = (1.0, 1e2, 1e3)
EPSILON = 1e-3
CLIPPING = {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0}
# TensorFlow has a graph mode of its own; elsewhere `jit_compile=False`
# runs the step as `run_eagerly=True` does.
MODES = ("eager", "graph", "jit_compile") if BACKEND == "tensorflow" else (
    "eager", "jit_compile")
KINDS = ("bn", "renorm")
# The path `fused=None` picks, beside every path forced by its argument.
AUTO = "auto"
# What no path may exceed: the moving variance's error relative to
# float64, and the outputs' error against their unit spread (or, for
# bfloat16 outputs of up to `dmax`, a few of their rounding steps).
VARIANCE_BOUND = 1e-2
OUTPUT_BOUND = 1e-2


def _bounds(epsilon):
    output = max(OUTPUT_BOUND, 8.0 * epsilon)
    return {"variance": VARIANCE_BOUND, "training": output**2,
            "inference": output}
# The rounding that may separate two correct implementations, at a
# mean/spread `ratio`, in units of the compute dtype's epsilon: outputs
# are `x * scale + offset`, as in core Keras and `tf.nn.batch_normalization`,
# and `x * scale` reaches `ratio` plus four spreads.
def _rounding(ratio, epsilon):
    output = 4.0 * epsilon * (ratio + 4.0)
    return {"variance": 1e2 * epsilon, "training": output**2,
            "inference": output}


FLOAT32_EPSILON = float(np.finfo("float32").eps)
# Half-precision layers compute their statistics in float32, and round
# their output to float16 or bfloat16.
HALF_EPSILON = {"mixed_float16": float(np.finfo("float16").eps),
                "mixed_bfloat16": 2.0**-7}


def _inputs(ratio, dtype="float32"):
    rng = np.random.default_rng(int(ratio) + 7)
    x = rng.normal(ratio * SPREAD, SPREAD, SHAPE)
    # The reference sees exactly the values the layer sees: a mixed
    # precision layer casts its input to its compute dtype.
    compute = keras.DTypePolicy(dtype).compute_dtype
    return np.asarray(keras.ops.convert_to_numpy(
        keras.ops.cast(x.astype("float32"), compute)), "float64")


class _Reference:
    """Float64 batch normalization and renormalization, from the equations
    (the layers' docstrings, Ioffe 2017), with `gamma = 1`, `beta = 0` and
    `momentum = renorm_momentum = 0`."""

    def __init__(self, kind):
        self.kind = kind
        channels = SHAPE[-1]
        self.renorm_mean = np.zeros(channels)
        self.renorm_stddev = np.ones(channels)

    def train_step(self, x):
        axes = tuple(range(x.ndim - 1))
        mean = x.mean(axis=axes)
        variance = ((x - mean) ** 2).mean(axis=axes)
        sigma = np.sqrt(variance + EPSILON)
        y = (x - mean) / sigma
        if self.kind == "renorm":
            r = np.clip(sigma / self.renorm_stddev, CLIPPING["rmin"],
                        CLIPPING["rmax"])
            d = np.clip((mean - self.renorm_mean) / self.renorm_stddev,
                        -CLIPPING["dmax"], CLIPPING["dmax"])
            y = y * r + d
            self.renorm_mean, self.renorm_stddev = mean, sigma
        inference = (x - mean) / np.sqrt(variance + EPSILON)
        return y, mean, variance, inference


def _layer(kind, core, dtype, **kwargs):
    renorm = {"renorm_clipping": CLIPPING, "renorm_momentum": 0.0}
    args = dict(momentum=0.0, epsilon=EPSILON, dtype=dtype, **kwargs)
    if core:
        if kind == "renorm":
            args.update(renorm=True, **renorm)
        return keras.layers.BatchNormalization(**args)
    if kind == "renorm":
        return keras_bn.BatchRenormalization(**args, **renorm)
    return keras_bn.BatchNormalization(**args)


def _model(layer, mode):
    inputs = keras.Input(SHAPE[1:], batch_size=SHAPE[0])
    model = keras.Model(inputs, layer(inputs))
    # A learning rate of zero: the step runs the gradient and leaves
    # gamma and beta at 1 and 0.
    model.compile(
        optimizer=keras.optimizers.SGD(0.0), loss="mse",
        run_eagerly=mode == "eager", jit_compile=mode == "jit_compile",
    )
    return model


def _errors(layer, model, x, reference):
    """The step's errors against float64: the moving variance's relative
    error, the training output's mean squared error, and the inference
    output's largest error."""
    y, _, variance, inference = reference
    loss = float(np.asarray(model.train_on_batch(x, y.astype("float32"))))
    moving = np.asarray(test_case.to_numpy(layer.moving_variance), "float64")
    predicted = np.asarray(
        keras.ops.convert_to_numpy(model.predict_on_batch(x)), "float64")
    return {
        "variance": float(np.max(np.abs(moving - variance) / variance)),
        "training": loss,
        "inference": float(np.max(np.abs(predicted - inference))),
    }


def _steps(kind, core, mode, dtype, kwargs=None):
    """The errors of each ratio's step of one model, in order."""
    layer = _layer(kind, core, dtype, **(kwargs or {}))
    model = _model(layer, mode)
    reference = _Reference(kind)
    return [
        _errors(layer, model, _inputs(ratio, dtype),
                reference.train_step(_inputs(ratio, dtype)))
        for ratio in RATIOS
    ]


@functools.cache
def _core_steps(kind, mode, dtype):
    return _steps(kind, True, mode, dtype)


def _grid():
    forced = paths.available_paths()
    return tuple(
        (f"{path}_{kind}_{mode}", path, kind, mode)
        for path in (AUTO,) + forced
        for kind in KINDS
        for mode in MODES
    )


class NumericsTest(test_case.LayerTestCase):
    ran = set()

    def _check(self, errors, core, epsilon, label):
        for ratio, ours, theirs in zip(RATIOS, errors, core):
            rounding = _rounding(ratio, epsilon)
            for name, error in ours.items():
                where = f"{label}, mean/spread {ratio:g}, {name}: {ours}"
                self.assertTrue(np.isfinite(error), where)
                self.assertLessEqual(error, _bounds(epsilon)[name], where)
                self.assertLessEqual(
                    error, 2.0 * theirs[name] + rounding[name],
                    f"{where}; core Keras: {theirs}",
                )

    @parameterized.named_parameters(*_grid())
    def test_float32_against_float64(self, path, kind, mode):
        kwargs = {} if path == AUTO else paths.KWARGS[path]
        if path == _dispatch.FUSED and mode == "jit_compile":
            self._check_refused(kind, kwargs)
            return
        if path == _dispatch.WIDE and mode == "jit_compile":
            self.skipTest("under XLA the wide view is not taken: XLA "
                          "compiles the keras.ops path")
        if path != AUTO:
            probe = _layer(kind, False, "float32", **kwargs)
            paths.skip_unless_serves(
                self, path, probe, np.zeros(SHAPE, "float32"))
        label = f"{kind} on the {path} path, {mode}"
        if path == AUTO:
            errors = _steps(kind, False, mode, "float32", kwargs)
        else:
            with paths.expect(self, path, self.ran):
                errors = _steps(kind, False, mode, "float32", kwargs)
        self._check(errors, _core_steps(kind, mode, "float32"),
                    FLOAT32_EPSILON, label)

    @parameterized.named_parameters(
        (f"{kind}_{dtype}_{mode}", kind, dtype, mode)
        for kind in KINDS
        for dtype in ("mixed_float16", "mixed_bfloat16")
        for mode in MODES
    )
    def test_half_precision_against_float64(self, kind, dtype, mode):
        errors = _steps(kind, False, mode, dtype)
        self._check(errors, _core_steps(kind, mode, dtype),
                    HALF_EPSILON[dtype], f"{kind}, {dtype}, {mode}")

    def _check_refused(self, kind, kwargs):
        layer = _layer(kind, False, "float32", **kwargs)
        model = _model(layer, "jit_compile")
        x = _inputs(RATIOS[-1])
        with self.assertRaisesRegex(ValueError, "fused=True.*jit_compile"):
            model.train_on_batch(x, x)


class EveryPathRanTest(test_case.LayerTestCase):
    def test_every_available_path_ran(self):
        paths.check_every_path_ran(self, NumericsTest.ran)
