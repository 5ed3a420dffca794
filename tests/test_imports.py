"""The package's module structure: no module imports one that imports it,
and keras_bn works without TensorFlow on the other backends."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest
from absl.testing import parameterized

import keras_bn

PACKAGE = pathlib.Path(keras_bn.__file__).parent


def _imports(path):
    """The keras_bn modules `path` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "keras_bn":
                names.update(f"keras_bn.{a.name}" for a in node.names)
            elif node.module.startswith("keras_bn."):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(
                a.name for a in node.names if a.name.startswith("keras_bn.")
            )
    return names


def _graph():
    modules = {
        f"keras_bn.{p.stem}": p
        for p in PACKAGE.glob("*.py")
        if p.stem != "__init__"
    }
    return {
        name: {m for m in _imports(path) if m in modules}
        for name, path in modules.items()
    }


def _cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, trail + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


class ImportGraphTest(parameterized.TestCase):
    def test_no_import_cycle(self):
        self.assertIsNone(_cycle(_graph()))

    def test_the_checker_finds_a_cycle(self):
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
        self.assertEqual(_cycle(graph), ["a", "b", "c", "a"])

    def test_kernels_know_no_layer(self):
        graph = _graph()
        kernels = {"keras_bn._ops_kernels", "keras_bn._kernels",
                   "keras_bn._torch_kernels"}
        below_layers = kernels | {
            "keras_bn._dispatch", "keras_bn._statistics",
            "keras_bn._replicas", "keras_bn._backend_ops", "keras_bn._layout",
        }
        for kernel_module in sorted(below_layers):
            self.assertLessEqual(
                graph[kernel_module], below_layers, kernel_module
            )


# Run in a fresh process in which TensorFlow cannot be imported: keras_bn's
# layers and tools must work on JAX and PyTorch without it.
WITHOUT_TENSORFLOW = '''
import sys

# What Python does for a package that is not installed: `import` raises
# ModuleNotFoundError and `importlib.util.find_spec` returns None (which
# libraries such as torch._dynamo ask).
for blocked in ("tensorflow", "tf_keras"):
    sys.modules[blocked] = None

import keras
import numpy as np

import keras_bn

rng = np.random.default_rng(0)
x = rng.normal(size=(16, 4, 3)).astype("float32")
y = rng.normal(size=(16, 2)).astype("float32")
inputs = keras.Input((4, 3))
h = keras_bn.BNLSTM(5, return_sequences=True)(inputs)
h = keras_bn.BNGRU(5)(h)
h = keras.layers.Dense(6, name="to_fold")(h)
h = keras_bn.BatchNormalization(name="folded_bn")(h)
h = keras.layers.Dense(4)(h)
h = keras_bn.BatchRenormalization(
    renorm_clipping=keras_bn.schedules.paper_renorm_clipping(), name="renorm"
)(h)
h = keras.layers.Dense(2)(h)
outputs = keras.layers.BatchNormalization()(h)
model = keras.Model(inputs, outputs)
model.compile(optimizer="sgd", loss="mse")
model.fit(
    x, y, batch_size=8, epochs=2, verbose=0,
    callbacks=[keras_bn.callbacks.PreciseBN(x, batch_size=8)],
)
assert keras_bn.recompute_statistics(model, x, batch_size=8) == 2
stats = model.get_layer("renorm").renorm_diagnostics()
assert int(keras.ops.convert_to_numpy(stats["step"])) == 4, stats
folded, pairs = keras_bn.fold_batch_normalization(model)
assert ("to_fold", "folded_bn") in pairs, pairs
np.testing.assert_allclose(
    keras.ops.convert_to_numpy(folded(x)),
    keras.ops.convert_to_numpy(model(x)),
    rtol=1e-4, atol=1e-4,
)
converted = keras_bn.convert_batch_normalization(model)
np.testing.assert_allclose(
    keras.ops.convert_to_numpy(converted(x)),
    keras.ops.convert_to_numpy(model(x)),
    rtol=1e-5, atol=1e-5,
)
loaded = [
    name for name, module in sys.modules.items()
    if name.split(".")[0] in ("tensorflow", "tf_keras") and module is not None
]
assert not loaded, loaded
print("ok", keras.backend.backend())
'''


class WithoutTensorFlowTest(parameterized.TestCase):
    @pytest.mark.slow
    @parameterized.named_parameters(("jax", "jax"), ("torch", "torch"))
    def test_layers_and_tools_without_tensorflow(self, backend_name):
        pytest.importorskip(backend_name)
        env = dict(os.environ, KERAS_BACKEND=backend_name)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PACKAGE.parent), env.get("PYTHONPATH")) if p
        )
        result = subprocess.run(
            [sys.executable, "-c", WITHOUT_TENSORFLOW],
            capture_output=True, text=True, timeout=600, env=env,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertEqual(result.stdout.split()[-2:], ["ok", backend_name])
