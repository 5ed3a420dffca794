"""Which path a batch-normalization call runs, and why.

Every batch-normalization layer of keras_bn computes the same numbers
through one of five paths, each a `Kernel` of functions of tensors:

- `"ops"`: the `keras.ops` kernel (`_ops_kernels`), on every backend and
  in every configuration; the others are faster ways to the same result.
- `"fused"`: TensorFlow's fused kernel (`FusedBatchNormV3`), for the last
  axis alone, never for training under XLA (`fused_problems`).
- `"xla"` and `"wide"`: an XLA-compiled kernel, and TensorFlow ops on a
  wider view of few channels, for training on a CPU (`_kernels`).
- `"torch"`: PyTorch's kernel (`_torch_kernels`) on the torch backend.

`choose` is the only place that picks one, from the facts of a call
(`Call`): a `Path` with the reason, or the `ValueError` a request the call
cannot honour deserves; `kernel` gives the path's `Kernel`. Layers expose
it as `normalization_path`; docs/performance.md lists the rules.

What a layer asks for follows Keras 3's `LSTM(use_cudnn=...)`:
`fused=None` lets keras_bn choose, `fused=True` means the backend's fused
kernel runs (or an error says why not), and `fused=False` means no kernel
runs. `xla_kernel` does the same for the XLA kernel; when it is `None`,
the environment variable `KERAS_BN_XLA_KERNEL` (`1` or `0`) is the
process-wide default, read when a call is traced.
"""

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import NamedTuple

from keras import backend

from keras_bn import _kernels
from keras_bn import _ops_kernels
from keras_bn import _replicas
from keras_bn import _torch_kernels

OPS = "ops"
FUSED = "fused"
XLA = "xla"
TORCH = "torch"
WIDE = "wide"

XLA_KERNEL_VARIABLE = "KERAS_BN_XLA_KERNEL"
# TensorFlow's kernel rejects smaller epsilons.
FUSED_MIN_EPSILON = 1.001e-5
FUSED_DTYPES = ("float16", "bfloat16", "float32")
HALF_DTYPES = ("float16", "bfloat16")
TORCH_DTYPES = ("float16", "bfloat16", "float32", "float64")
TORCH_KERNEL = "PyTorch's batch-normalization kernel"
# Below this many elements a step gains less from the XLA kernel than its
# compilation costs over thousands of steps: other paths serve such calls.
XLA_MIN_ELEMENTS = 2**20
# With this many channels or fewer, and fewer elements than this, the wide
# view's kernel runs as fast as the XLA kernel with nothing to compile
# (oneDNN off); its rows hold a multiple of `WIDE_ROW` entries.
WIDE_MAX_CHANNELS = 12
WIDE_MAX_ELEMENTS = 2**21
WIDE_ROW = 128
WIDE_MIN_ROW = 32
# oneDNN's fused kernel is fast for channel counts that are multiples of
# this, and slow for the others.
ONEDNN_CHANNEL_MULTIPLE = 4
# Under this many elements oneDNN's fused kernel is slower than the
# `keras.ops` path and the wide view, whatever the channels.
ONEDNN_MIN_ELEMENTS = 2**17
# With fewer channels, on the last axis, PyTorch's training kernel (its
# channels-last kernel on a CPU) is slower than the `keras.ops` path.
TORCH_MIN_CHANNELS = 8


@dataclasses.dataclass(frozen=True)
class Call:
    """The facts about one call that decide its path.

    `backend`, `device` (`"cpu"`, `"gpu"` or `"tpu"`), `onednn` (whether
    TensorFlow's CPU kernels are oneDNN's), the input's `dtype` name and
    number of `elements` (`None` if unknown); whether the call is `masked`,
    the layer splits `ghost` batches, normalizes the `last_axis_only` (then
    `channels` is its size) or `adjacent_axes` (one run, which PyTorch's
    kernel takes as its channel axis); its `epsilon`; whether
    cross-replica synchronization is in progress (`synchronizing`: a
    synchronized layer in training with more than one `tf.distribute`
    replica or `torch.distributed` process), the call is in `training`, and
    traced for XLA (`xla_compiling`); and what the layer asked for, `fused`
    and `xla_kernel` (`None`, `True` or `False`).
    """

    backend: str
    device: str
    onednn: bool
    dtype: str
    elements: int | None
    masked: bool
    ghost: bool
    last_axis_only: bool
    epsilon: float
    synchronizing: bool
    training: bool
    xla_compiling: bool
    fused: bool | None = None
    xla_kernel: bool | None = None
    adjacent_axes: bool = False
    channels: int | None = None


@dataclasses.dataclass(frozen=True)
class Path:
    """The path a call takes (`"ops"`, `"fused"`, `"xla"`, `"wide"` or
    `"torch"`) and why; for `"wide"`, the `positions` side by side in a
    row of the wide view."""

    name: str
    reason: str
    positions: int = 1

    def __str__(self):
        return f"{self.name}: {self.reason}"


class Kernel(NamedTuple):
    """The functions of tensors a path runs (signatures in `_ops_kernels`);
    `moments` is `None` where a kernel computes them only as it normalizes
    (`corrected` then takes a scale and offset that are a function of them).
    """

    normalize: Callable
    moments: Callable | None
    inference: Callable
    corrected: Callable | None = None


def kernel(path, synchronized=False):
    """The `Kernel` of `path`; `synchronized` reduces the statistics
    across replicas (only the `keras.ops` kernel serves that)."""
    if path.name == OPS:
        # XLA reduces one merged axis faster than a run of axes;
        # TensorFlow's own kernels merge adjacent axes themselves.
        merge = backend.backend() != "tensorflow" or xla_compiling()
        both = {"synchronized": synchronized, "merge_axes": merge}
        return Kernel(functools.partial(_ops_kernels.normalize, **both),
                      functools.partial(_ops_kernels.moments, **both),
                      functools.partial(_ops_kernels.inference,
                                        merge_axes=merge))
    if path.name == XLA:
        return Kernel(_kernels.xla_normalize, _kernels.xla_moments,
                      _ops_kernels.inference)
    if path.name == WIDE:
        wide = {"positions": path.positions}
        return Kernel(functools.partial(_kernels.wide_normalize, **wide),
                      functools.partial(_kernels.wide_moments, **wide),
                      _ops_kernels.inference)
    if path.name == FUSED:
        return Kernel(_kernels.fused_normalize, None,
                      _kernels.fused_inference, _kernels.fused_corrected)
    return Kernel(_torch_kernels.normalize, _torch_kernels.moments,
                  _torch_kernels.inference)


def choose(call):
    """The path `call` runs through.

    Raises:
        ValueError: If the layer asked for a kernel (`fused=True` or
            `xla_kernel=True`) that cannot serve this call, naming why.
    """
    if call.fused is False:
        return Path(OPS, "fused=False")
    if call.backend == "torch":
        return _choose_torch(call)
    if call.backend != "tensorflow":
        return Path(OPS, f"the {call.backend} backend runs keras.ops")
    if call.fused:
        problems = fused_problems(call)
        if problems:
            _refuse("fused", call, problems, "TensorFlow's fused kernel")
        return Path(FUSED, "fused=True")
    if not call.training:
        # The XLA kernel is a training kernel: `xla_kernel` does not apply.
        if call.dtype in HALF_DTYPES and not fused_problems(call):
            return Path(
                FUSED, "half-precision inference: TensorFlow's kernel reads "
                "the input without a cast"
            )
        return Path(OPS, "inference is two element-wise ops on any path")
    if call.synchronizing:
        if call.xla_kernel:
            _refuse("xla_kernel", call, _synchronizing(), "the XLA kernel")
        return Path(OPS, _synchronizing()[0])
    xla_kernel = call.xla_kernel
    if xla_kernel is None:
        xla_kernel = process_xla_kernel_default()
    if xla_kernel:
        return Path(XLA, "xla_kernel=True" if call.xla_kernel else (
            f"{XLA_KERNEL_VARIABLE}=1"))
    problems = fused_problems(call)
    if call.xla_compiling:
        # `fused_problems` always names XLA's expansion of the kernel here.
        return Path(OPS, "under XLA the keras.ops path compiles as well; "
                    + _cannot_fuse(problems))
    if call.device != "cpu":
        if problems:
            return Path(OPS, _cannot_fuse(problems))
        return Path(FUSED, f"TensorFlow's kernel on the {call.device}")
    return _choose_cpu(call, xla_kernel, problems)


def _choose_cpu(call, xla_kernel, problems):
    """`choose` for a training call on a CPU, outside XLA compilation."""
    small = call.elements is not None and call.elements < XLA_MIN_ELEMENTS
    slow = slow_cpu_kernel(call)
    positions = wide_positions(call)
    if positions and slow:
        return Path(WIDE, f"{slow}; with {call.channels} channels, "
                    f"TensorFlow's ops on a view of {positions} rows side "
                    "by side, nothing to compile", positions)
    if xla_kernel is not False and not small and call.dtype in (
        "float32", "float64"
    ):
        if problems:
            return Path(XLA, "on a CPU the XLA kernel serves the call; "
                        + _cannot_fuse(problems))
        if slow:
            return Path(XLA, f"{slow}; the XLA kernel is faster")
        return Path(FUSED, "oneDNN's fused kernel")
    # Why not the XLA kernel, where it could have served.
    if xla_kernel is False:
        without_xla = [("xla_kernel=False" if call.xla_kernel is False
                        else f"{XLA_KERNEL_VARIABLE}=0")
                       + " rules out the XLA kernel"]
    elif call.dtype in ("float32", "float64"):
        without_xla = [f"under {XLA_MIN_ELEMENTS} elements the XLA kernel's "
                       "compilation costs more than it saves"]
    else:
        without_xla = []
    if problems:
        return Path(OPS, "; ".join([_cannot_fuse(problems)] + without_xla))
    if slow and call.dtype == "float32" and (small or call.onednn):
        # Above 2**20 elements Eigen's kernel is the faster of the two.
        return Path(OPS, "; ".join(
            [f"{slow}; the keras.ops path is faster than it, with nothing "
             "to compile"] + without_xla))
    return Path(FUSED, "; ".join(
        ["TensorFlow's kernel serves the call"] + without_xla))


def call_facts(
    inputs, *, masked, training, ghost, last_axis_only, adjacent_axes,
    epsilon, synchronized, fused, xla_kernel,
):
    """The `Call` of a layer's call on `inputs`: the layer's configuration
    as given, and what the backend, the device, oneDNN, XLA and the
    replica context say."""
    backend_name = backend.backend()
    on_tensorflow = backend_name == "tensorflow"
    shape = tuple(inputs.shape)
    return Call(
        backend=backend_name,
        device=device() if on_tensorflow else None,
        onednn=on_tensorflow and onednn_enabled(),
        dtype=backend.standardize_dtype(inputs.dtype),
        elements=None if None in shape else math.prod(shape),
        masked=masked,
        ghost=ghost,
        last_axis_only=last_axis_only,
        epsilon=epsilon,
        synchronizing=bool(
            training and synchronized
            and _replicas.replica_context() is not None
        ),
        training=training,
        xla_compiling=on_tensorflow and xla_compiling(),
        fused=fused,
        xla_kernel=xla_kernel,
        adjacent_axes=adjacent_axes,
        channels=shape[-1] if last_axis_only else None,
    )


def check_requested_kernels(
    *, fused, xla_kernel, last_axis_only, adjacent_axes, axis,
    virtual_batch_size, epsilon,
):
    """Raises the `ValueError` a layer's `fused=True` or `xla_kernel=True`
    deserves at build time, when no call of its could take that kernel."""
    backend_name = backend.backend()
    if fused:
        problems = config_problems(
            backend_name, last_axis_only, virtual_batch_size is not None,
            epsilon, adjacent_axes,
        )
        if problems:
            raise ValueError(
                f"Argument `fused=True` asks for {fused_kernel(backend_name)}"
                f", which cannot serve this layer: {'; '.join(problems)}. "
                "Use `fused=None` to let keras_bn choose. Received: "
                f"fused=True, axis={axis!r}, "
                f"virtual_batch_size={virtual_batch_size!r}, "
                f"epsilon={epsilon!r}"
            )
    if xla_kernel and backend_name != "tensorflow":
        raise ValueError(
            "Argument `xla_kernel=True` asks for the XLA kernel, which runs "
            f"on the TensorFlow backend only; the backend is {backend_name}. "
            "Received: xla_kernel=True"
        )


def slow_cpu_kernel(call):
    """Why TensorFlow's fused kernel is the slow choice for a float32 call
    on a CPU (`None`: it is not): Eigen's (oneDNN off), and oneDNN's for
    a channel count that is not a multiple of `ONEDNN_CHANNEL_MULTIPLE` or
    under `ONEDNN_MIN_ELEMENTS` elements (docs/performance.md)."""
    if not call.onednn:
        return "oneDNN is off, and Eigen's fused kernel is slow on a CPU"
    if call.channels and call.channels % ONEDNN_CHANNEL_MULTIPLE:
        return (f"oneDNN's fused kernel is slow for {call.channels} "
                f"channels, not a multiple of {ONEDNN_CHANNEL_MULTIPLE}")
    if call.elements is not None and call.elements < ONEDNN_MIN_ELEMENTS:
        return (f"oneDNN's fused kernel is slow under {ONEDNN_MIN_ELEMENTS} "
                "elements")
    return None


def wide_positions(call):
    """How many rows of a call's `(rows, channels)` view the wide-view
    kernel puts side by side, or `None` where it does not serve.

    It serves a float32 call on the last axis alone, without a mask, ghost
    batches or synchronization, with at most `WIDE_MAX_CHANNELS` channels
    and fewer than `WIDE_MAX_ELEMENTS` elements: the smallest power of two
    of rows that holds a multiple of `WIDE_ROW` entries, or the largest
    that divides the rows if smaller, of at least `WIDE_MIN_ROW` entries.
    """
    channels = call.channels
    if (
        call.dtype != "float32"
        or not call.last_axis_only
        or call.masked
        or call.ghost
        or call.synchronizing
        or not channels
        or channels > WIDE_MAX_CHANNELS
        or call.elements is None
        or call.elements >= WIDE_MAX_ELEMENTS
    ):
        return None
    positions = 1
    while (positions * channels) % WIDE_ROW:
        positions *= 2
    rows = call.elements // channels
    while rows % positions:
        positions //= 2
    if positions * channels < WIDE_MIN_ROW:
        return None
    return positions


def _choose_torch(call):
    """The path on the torch backend: PyTorch's kernel wherever it serves
    (statistics and normalization in one kernel, the gradient in one),
    except for few channels in training."""
    problems = torch_problems(call)
    if call.fused:
        if problems:
            _refuse("fused", call, problems, TORCH_KERNEL)
        return Path(TORCH, "fused=True")
    if problems:
        return Path(OPS, f"{TORCH_KERNEL} cannot serve: "
                    + "; ".join(problems))
    if call.training and call.channels and (
        call.channels < TORCH_MIN_CHANNELS
    ):
        return Path(OPS, f"{TORCH_KERNEL} is slow in training for fewer "
                    f"than {TORCH_MIN_CHANNELS} channels on the last axis")
    if call.training:
        return Path(TORCH, f"{TORCH_KERNEL}: statistics and normalization "
                    "in one kernel, the gradient in one")
    return Path(TORCH, f"{TORCH_KERNEL}: inference in one pass")


def torch_problems(call):
    """Why PyTorch's kernel cannot serve `call` (empty: it can)."""
    problems = _call_problems(call, TORCH_DTYPES, config_problems(
        call.backend, call.last_axis_only, call.ghost, call.epsilon,
        call.adjacent_axes,
    ))
    if call.training and call.elements == 0:
        problems.append("the batch is empty")
    return problems


def fused_kernel(backend):
    """The kernel `fused=True` asks for on `backend`, in words."""
    if backend == "torch":
        return TORCH_KERNEL
    return "TensorFlow's fused kernel"


def fused_problems(call):
    """Why TensorFlow's fused kernel cannot serve `call` (empty: it can).
    Under XLA a training call cannot: XLA's expansion of the kernel computes
    the variance as `E[x**2] - E[x]**2` in float32, without a clamp, wrong
    (even negative) for a large mean against a small spread."""
    problems = _call_problems(call, FUSED_DTYPES, config_problems(
        call.backend, call.last_axis_only, call.ghost, call.epsilon
    ))
    if call.training and call.xla_compiling:
        problems.append(
            "under XLA (jit_compile) the kernel's training statistics are "
            "computed as E[x**2] - E[x]**2, which loses the variance when "
            "the mean is large against the spread"
        )
    return problems


def _call_problems(call, dtypes, problems):
    """`problems` (the configuration's) and what rules a kernel out for
    this call: a dtype not in `dtypes`, or in training a mask or
    synchronization in progress."""
    if call.dtype not in dtypes:
        problems.append(f"the input's dtype is {call.dtype}")
    if call.training and call.masked:
        problems.append("the call has a mask")
    if call.training and call.synchronizing:
        problems.extend(_synchronizing())
    return problems


def config_problems(
    backend, last_axis_only, ghost, epsilon, adjacent_axes=False
):
    """Why the backend's fused kernel (TensorFlow's, or PyTorch's on the
    torch backend) cannot serve any call of a configuration."""
    problems = []
    if backend == "torch":
        if not adjacent_axes:
            problems.append("the normalized axes are not adjacent")
        if ghost:
            problems.append("virtual_batch_size splits ghost batches")
        return problems
    if backend != "tensorflow":
        problems.append(f"the backend is {backend}")
    if not last_axis_only:
        problems.append("the normalized axes are not the last axis alone")
    if ghost:
        problems.append("virtual_batch_size splits ghost batches")
    if epsilon < FUSED_MIN_EPSILON:
        problems.append(f"epsilon={epsilon!r} is below {FUSED_MIN_EPSILON}")
    return problems


def process_xla_kernel_default():
    """`KERAS_BN_XLA_KERNEL`: `True` (`1`), `False` (`0`) or `None`."""
    setting = os.environ.get(XLA_KERNEL_VARIABLE, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    return None


def _synchronizing():
    return ["cross-replica synchronization is in progress, and the kernels "
            "compute each replica's statistics alone"]


def _cannot_fuse(problems):
    return "TensorFlow's kernel cannot serve: " + "; ".join(problems)


def _refuse(argument, call, problems, kernel):
    value = getattr(call, argument)
    raise ValueError(
        f"Argument `{argument}={value!r}` asks for {kernel}, which cannot "
        f"serve this call: {'; '.join(problems)}. Use `{argument}=None` to "
        f"let keras_bn choose. Received: {argument}={value!r}"
    )


@functools.cache
def device():
    """The kind of device TensorFlow computes on: cpu, gpu or tpu."""
    import tensorflow as tf

    for kind in ("TPU", "GPU"):
        if tf.config.list_logical_devices(kind):
            return kind.lower()
    return "cpu"


@functools.cache
def onednn_enabled():
    """Whether TensorFlow's CPU kernels are oneDNN's.

    TensorFlow turns oneDNN on by default on x86 CPUs with AVX-512 VNNI or
    newer instructions; `TF_ENABLE_ONEDNN_OPTS` (read when TensorFlow is
    imported) overrides that.
    """
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def xla_compiling():
    """Whether TensorFlow is tracing a function for XLA (`jit_compile`)."""
    import tensorflow as tf

    return tf.__internal__.get_enclosing_xla_context() is not None
