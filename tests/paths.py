"""Running a reference test once per normalization path.

keras_bn computes batch normalization through its `keras.ops` code
(`"ops"`), TensorFlow's fused kernel (`"fused"`), its XLA-compiled kernel
(`"xla"`), its wide-view kernel (`"wide"`) or, on the torch backend,
PyTorch's kernel (`"torch"`); which one a call takes depends on the
backend and the machine. The reference grids therefore run each case once
per path the backend has, forced through the layers' public arguments
(the wide view, which has none, through the fact that picks it: oneDNN
off), and check that the forced path is the one that ran, so every path is
compared with the reference on every machine where it can run, not only
with another path.
"""

import contextlib
from unittest import mock

import keras

from keras_bn import _dispatch

# The layer arguments that force each path.
KWARGS = {
    _dispatch.OPS: {"fused": False},
    _dispatch.FUSED: {"fused": True},
    _dispatch.XLA: {"xla_kernel": True},
    # `fused=True` asks for the backend's kernel: PyTorch's on torch.
    _dispatch.TORCH: {"fused": True},
    # Chosen by `fused=None` for few channels when oneDNN is off.
    _dispatch.WIDE: {},
}


def available_paths():
    """The paths a float32 training call can take here, forced or not.

    On TensorFlow `"ops"`, `"fused"` and `"xla"`, and `"wide"` on a CPU;
    on torch `"ops"` and `"torch"`; on JAX `"ops"` alone.
    """
    name = keras.backend.backend()
    if name == "tensorflow":
        wide = (_dispatch.WIDE,) if _dispatch.device() == "cpu" else ()
        return (_dispatch.OPS, _dispatch.FUSED, _dispatch.XLA) + wide
    if name == "torch":
        return (_dispatch.OPS, _dispatch.TORCH)
    return (_dispatch.OPS,)


@contextlib.contextmanager
def conditions(path):
    """The facts of the machine under which `choose` picks `path`: for the
    wide view, oneDNN off; for the others, this machine's."""
    if path != _dispatch.WIDE:
        yield
        return
    with mock.patch.object(_dispatch, "onednn_enabled", lambda: False):
        yield


def per_path(grid):
    """`(name, *params)` cases as `(f"{name}_{path}", path, *params)`,
    for every path of this backend."""
    return tuple(
        (f"{name}_{path}", path, *params)
        for name, *params in grid
        for path in available_paths()
    )


def build_or_skip(testcase, layer, shape):
    """Builds `layer`, skipping the test if its configuration rules out
    the path its arguments ask for (the layer's own error says why)."""
    try:
        layer.build(shape)
    except ValueError as error:
        testcase.skipTest(f"the path cannot serve this layer: {error}")


def skip_unless_serves(testcase, path, layer, x, mask=None):
    """Skips the test if a training call of `layer` on `x` (with `mask`)
    cannot take `path`, which its arguments ask for."""
    try:
        with conditions(path):
            chosen = layer.normalization_path(x, training=True, mask=mask)
    except ValueError as error:
        testcase.skipTest(f"the path cannot serve this call: {error}")
    if path == _dispatch.WIDE and chosen.name != _dispatch.WIDE:
        testcase.skipTest(f"the wide view cannot serve this call: {chosen}")


@contextlib.contextmanager
def expect(testcase, path, ran):
    """Checks that every training call in the block took `path`.

    Adds `path` to the set `ran` when at least one did.
    """
    chosen = []
    choose = _dispatch.choose

    def recording_choose(call):
        result = choose(call)
        if call.training:
            chosen.append(result.name)
        return result

    with conditions(path):
        with mock.patch.object(_dispatch, "choose", recording_choose):
            yield
    testcase.assertTrue(chosen, "no training call was made")
    testcase.assertEqual(set(chosen), {path}, f"paths taken: {chosen}")
    ran.add(path)


def check_every_path_ran(testcase, ran):
    """Fails when a path that can run here ran in none of the grid tests."""
    if not ran:
        testcase.skipTest("no per-path grid test ran in this process")
    missing = set(available_paths()) - ran
    testcase.assertFalse(
        missing,
        f"paths available on this machine that no reference test ran: "
        f"{sorted(missing)}",
    )
