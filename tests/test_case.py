"""A small public-API layer test harness, used for every keras_bn layer.

Modelled on `keras.src.testing.TestCase.run_layer_test`, but built only on
public Keras APIs so that it tests what users do: config round trip,
serialization, symbolic and eager calls, a `fit()` step, `.keras`
save/load with equal outputs, and float32 weights under `mixed_float16`.
"""

import functools
import os
import pathlib
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest
from absl.testing import parameterized

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_script(path, *args, timeout):
    """Runs a repository script as a user would, from the repository root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH")) if p
    )
    return subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True,
        timeout=timeout, env=env, cwd=REPO,
    )


@functools.cache
def mirrored_strategy():
    """The process's one `MirroredStrategy` over the two logical CPUs.

    Every `MirroredStrategy` numbers its collectives from the same keys and
    TensorFlow remembers each key's tensor shape for the whole process, so
    a second strategy in one process can clash with the first: every test
    shares this one.
    """
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])


def _numpy(value):
    """`value` as a NumPy array; backend tensors (on torch, ones that
    require grad) go through `keras.ops.convert_to_numpy`."""
    if isinstance(value, (list, tuple)):
        return np.asarray([_numpy(v) for v in value])
    return np.asarray(keras.ops.convert_to_numpy(value))


TENSORFLOW = keras.backend.backend() == "tensorflow"


def save_and_load(model):
    """`model` saved to a `.keras` file in a temporary folder, loaded back."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        return keras.saving.load_model(path)


def needs_tensorflow(why):
    """Skips a test of what only TensorFlow has, saying what that is."""
    return pytest.mark.skipif(
        not TENSORFLOW, reason=f"needs TensorFlow: {why}"
    )


def to_numpy(x):
    """A NumPy copy of a tensor or variable of any backend."""
    return keras.ops.convert_to_numpy(x)


def jit_call(model, x, training=False):
    """`model(x)` compiled with XLA: `tf.function` or `jax.jit`.

    PyTorch has no XLA compilation in Keras; there the call is eager.
    """
    backend_name = keras.backend.backend()
    if backend_name == "tensorflow":
        import tensorflow as tf

        call = tf.function(
            lambda x: model(x, training=training), jit_compile=True
        )
        return to_numpy(call(x))
    if backend_name == "jax":
        import jax

        @jax.jit
        def call(trainable, non_trainable, x):
            return model.stateless_call(
                trainable, non_trainable, x, training=training
            )[0]

        return to_numpy(
            call(
                [v.value for v in model.trainable_variables],
                [v.value for v in model.non_trainable_variables],
                x,
            )
        )
    return to_numpy(model(x, training=training))


class LayerTestCase(parameterized.TestCase):
    def assertAllClose(self, actual, desired, atol=1e-5, rtol=1e-5, msg=""):
        np.testing.assert_allclose(
            _numpy(actual), _numpy(desired), atol=atol, rtol=rtol,
            err_msg=msg,
        )

    def run_layer_test(
        self,
        layer_cls,
        init_kwargs,
        input_shape,
        input_data=None,
        call_kwargs=None,
        expected_num_trainable_weights=None,
        expected_num_non_trainable_weights=None,
        run_training_check=True,
        run_mixed_precision_check=True,
    ):
        """Runs the public-API checks on `layer_cls(**init_kwargs)`.

        Args:
            layer_cls: The layer class.
            init_kwargs: Constructor arguments.
            input_shape: Full input shape, batch included.
            input_data: Optional NumPy input; random normal otherwise.
            call_kwargs: Extra call arguments (e.g. a mask).
            expected_num_trainable_weights: Checked when not `None`.
            expected_num_non_trainable_weights: Checked when not `None`.
            run_training_check: Whether to run a `fit()` step.
            run_mixed_precision_check: Whether to check `mixed_float16`.
        """
        call_kwargs = call_kwargs or {}
        if input_data is None:
            input_data = np.random.default_rng(0).normal(
                1.0, 2.0, input_shape
            ).astype("float32")
        self._check_config(layer_cls, init_kwargs)
        self._check_calls(
            layer_cls, init_kwargs, input_data, call_kwargs,
            expected_num_trainable_weights,
            expected_num_non_trainable_weights,
        )
        model = self._check_save_and_load(
            layer_cls, init_kwargs, input_data, run_training_check
        )
        if run_training_check:
            self.assertIsNotNone(model)
        if run_mixed_precision_check:
            self._check_mixed_precision(layer_cls, init_kwargs, input_data)

    def _check_config(self, layer_cls, init_kwargs):
        layer = layer_cls(**init_kwargs)
        config = layer.get_config()
        for key in init_kwargs:
            self.assertIn(key, config)
        revived = layer_cls.from_config(config)
        self.assertEqual(revived.get_config(), config)
        serialized = keras.saving.serialize_keras_object(layer)
        deserialized = keras.saving.deserialize_keras_object(serialized)
        self.assertIsInstance(deserialized, layer_cls)
        self.assertEqual(deserialized.get_config(), config)

    def _check_calls(
        self, layer_cls, init_kwargs, input_data, call_kwargs,
        expected_num_trainable_weights, expected_num_non_trainable_weights,
    ):
        # Symbolic call.
        layer = layer_cls(**init_kwargs)
        inputs = keras.Input(
            shape=input_data.shape[1:], batch_size=input_data.shape[0]
        )
        outputs = layer(inputs)
        expected_shape = layer.compute_output_shape(input_data.shape)
        self.assertEqual(tuple(outputs.shape), tuple(expected_shape))

        # Eager calls, in training and in inference.
        layer = layer_cls(**init_kwargs)
        for training in (True, False):
            y = keras.ops.convert_to_numpy(
                layer(input_data, training=training, **call_kwargs)
            )
            self.assertEqual(y.shape, tuple(expected_shape))
            self.assertTrue(np.all(np.isfinite(y)))
        if expected_num_trainable_weights is not None:
            self.assertLen(
                layer.trainable_weights, expected_num_trainable_weights
            )
        if expected_num_non_trainable_weights is not None:
            self.assertLen(
                layer.non_trainable_weights,
                expected_num_non_trainable_weights,
            )

    def _check_save_and_load(
        self, layer_cls, init_kwargs, input_data, run_training_check
    ):
        model = keras.Sequential(
            [keras.Input(shape=input_data.shape[1:]), layer_cls(**init_kwargs)]
        )
        if run_training_check:
            model.compile(optimizer="sgd", loss="mse")
            model.fit(
                input_data, np.zeros_like(model.predict(input_data, verbose=0)),
                batch_size=input_data.shape[0], epochs=1, verbose=0,
            )
        expected = model.predict(input_data, verbose=0)
        loaded = save_and_load(model)
        self.assertAllClose(
            loaded.predict(input_data, verbose=0), expected, atol=1e-6
        )
        for a, b in zip(model.weights, loaded.weights):
            self.assertAllClose(b, a, atol=0, rtol=0, msg=a.path)
        return model

    def _check_mixed_precision(self, layer_cls, init_kwargs, input_data):
        layer = layer_cls(**init_kwargs, dtype="mixed_float16")
        y = layer(input_data, training=True)
        self.assertEqual(keras.backend.standardize_dtype(y.dtype), "float16")
        for weight in layer.weights:
            if weight.dtype.startswith("float"):
                self.assertEqual(weight.dtype, "float32", weight.path)
        model = keras.Sequential(
            [
                keras.Input(shape=input_data.shape[1:]),
                layer_cls(**init_kwargs, dtype="mixed_float16"),
            ]
        )
        model.compile(optimizer="sgd", loss="mse")
        model.fit(
            input_data, np.zeros(y.shape, "float32"),
            batch_size=input_data.shape[0], epochs=1, verbose=0,
        )
        for weight in model.weights:
            self.assertTrue(
                np.all(np.isfinite(keras.ops.convert_to_numpy(weight))),
                weight.path,
            )


class XYBatches(keras.utils.PyDataset):
    """`(x, y)` batches of `batch_size` as a `keras.utils.PyDataset`, with
    a third element of ones (`sample_weight`) if `sample_weight`."""

    def __init__(self, x, y, batch_size, sample_weight=False):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.sample_weight = sample_weight

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        window = slice(index * self.batch_size, (index + 1) * self.batch_size)
        batch = (self.x[window], self.y[window])
        if self.sample_weight:
            batch += (np.ones(len(self.x[window])),)
        return batch


def core_signature_differences(ours, core, defaults_differ=()):
    """How `ours`'s constructor signature departs from `core`'s: it must
    list every one of `core`'s arguments by name, in `core`'s order and
    with `core`'s defaults (but those named in `defaults_differ`), before
    its own, and end with `**kwargs`. Empty when it does."""
    import inspect

    ours = list(inspect.signature(ours).parameters.values())
    core = list(inspect.signature(core).parameters.values())
    problems = []
    if [p.name for p in ours[: len(core) - 1]] != [
        p.name for p in core[:-1]
    ]:
        problems.append(
            f"argument order {[p.name for p in ours]} does not start with "
            f"{[p.name for p in core[:-1]]}"
        )
    for mine, theirs in zip(ours, core[:-1]):
        if mine.name in defaults_differ or mine.name != theirs.name:
            continue
        if mine.default != theirs.default:
            problems.append(
                f"{mine.name}: default {mine.default!r}, core's "
                f"{theirs.default!r}"
            )
    if ours[-1].kind is not inspect.Parameter.VAR_KEYWORD:
        problems.append("no **kwargs for the base layer's arguments")
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in ours):
        problems.append("*args hides the arguments")
    return problems
