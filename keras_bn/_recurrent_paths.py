"""Which paths a recurrent layer's call runs, and why.

The recurrent layers' counterpart of `_dispatch`: whether `BNLSTM`'s
written training loops are XLA-compiled (`choose_loop_compilation`),
which training loop runs (`choose_recurrent_loop`) and how each step is
normalized over the batch (`choose_step_normalization`). Each decides
from facts given as arguments and returns a `_dispatch.Path`.
"""

from keras_bn import _statistics
from keras_bn import _torch_kernels
from keras_bn._dispatch import OPS
from keras_bn._dispatch import TORCH
from keras_bn._dispatch import TORCH_KERNEL
from keras_bn._dispatch import XLA
from keras_bn._dispatch import XLA_KERNEL_VARIABLE
from keras_bn._dispatch import Path
from keras_bn._dispatch import process_xla_kernel_default


def choose_loop_compilation(backend, device, eager, xla_compiling):
    """Whether `BNLSTM`'s written training loops run as XLA-compiled
    functions called from the graph (`"xla"`) or as TensorFlow's loops
    (`"ops"`).

    In an ordinary TensorFlow graph on a CPU, XLA compiles each loop's
    step into a few fused kernels, where TensorFlow's loop runs every op
    of the step on its own. `KERAS_BN_XLA_KERNEL` decides as for the
    batch-normalization layers: `0` never, `1` on any device.
    """
    if backend != "tensorflow":
        return Path(OPS, f"the {backend} backend runs keras.ops")
    setting = process_xla_kernel_default()
    if setting is False:
        return Path(OPS, f"{XLA_KERNEL_VARIABLE}=0")
    if eager:
        return Path(OPS, "an eager call would compile at every call")
    if xla_compiling:
        return Path(OPS, "the call is compiled by XLA already")
    if setting:
        return Path(XLA, f"{XLA_KERNEL_VARIABLE}=1")
    if device == "cpu":
        return Path(XLA, "XLA fuses each step's element-wise ops and "
                    "reductions on a CPU")
    return Path(OPS, f"TensorFlow's ops on the {device}")


# The loops of a recurrent layer's training call: the step loop that the
# framework differentiates (every layer, every backend), or `BNLSTM`'s loop
# with its back-propagation through time written out.
GENERIC_LOOP = "generic"
WRITTEN_LOOP = "written"


def recurrent_loop_problems(backend, has_written_gradient, paper_activations):
    """Why a recurrent layer's written gradient cannot serve its training
    calls (empty: it can)."""
    problems = []
    if not has_written_gradient:
        problems.append("the layer has no written gradient")
    if not paper_activations:
        problems.append(
            "the written gradient is that of the paper's activations, "
            "activation='tanh' and recurrent_activation='sigmoid'"
        )
    if backend not in ("tensorflow", "jax"):
        problems.append(
            f"the {backend} backend's custom gradient takes the gradient of "
            "one output, and the written loop has several"
        )
    return problems


def choose_step_normalization(backend, masked):
    """How a recurrent training step is normalized over the batch:
    `"torch"`, PyTorch's kernel, which autograd differentiates in one
    kernel, or `"ops"`, `_statistics.normalize_step` and its gradient."""
    if backend != "torch":
        return Path(OPS, f"the {backend} backend runs keras.ops")
    if masked:
        return Path(OPS, f"{TORCH_KERNEL} takes no mask")
    return Path(TORCH, f"{TORCH_KERNEL}: statistics and normalization in "
                "one kernel, the gradient in one, without Python")


def step_normalization(path):
    """The function of `path` (`choose_step_normalization`), with the
    signature of `_statistics.normalize_step`."""
    if path.name == TORCH:
        return _torch_kernels.normalize_step
    return _statistics.normalize_step


def choose_recurrent_loop(written_gradient, problems, training):
    """The loop a recurrent layer's call runs, and why: `"written"`,
    `BNLSTM`'s loop with its gradient written out (it keeps `h`, `c`, the
    normalized recurrent product and each step's statistics, where a
    differentiated loop keeps every intermediate), or `"generic"`, the step
    loop, which inference runs. As Keras's `LSTM(use_cudnn=...)`:
    `written_gradient=None` lets keras_bn choose, `True` requires the
    written loop (a `ValueError` names the `problems` from
    `recurrent_loop_problems`), `False` rules it out.
    """
    if written_gradient is False:
        return Path(GENERIC_LOOP, "written_gradient=False")
    if written_gradient and problems:
        raise ValueError(
            "Argument `written_gradient=True` asks for the loop with its "
            "gradient written out, which cannot serve this layer: "
            f"{'; '.join(problems)}. Use `written_gradient=None` to let "
            "keras_bn choose. Received: written_gradient=True"
        )
    if not training:
        return Path(GENERIC_LOOP, "inference has no gradient to write out")
    if problems:
        return Path(GENERIC_LOOP, "; ".join(problems))
    if written_gradient:
        return Path(WRITTEN_LOOP, "written_gradient=True")
    return Path(WRITTEN_LOOP, "the written gradient keeps fewer "
                "intermediates per step than the differentiated loop")
