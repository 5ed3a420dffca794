"""The package's module structure: no module imports one that imports it."""

import ast
import pathlib

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
        for kernel_module in ("keras_bn._kernels", "keras_bn._dispatch",
                              "keras_bn._statistics"):
            self.assertLessEqual(
                graph[kernel_module],
                {"keras_bn._dispatch", "keras_bn._statistics"},
                kernel_module,
            )
