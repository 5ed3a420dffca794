"""PyTorch's batch-normalization kernel for keras_bn: functions of tensors.

On the torch backend `torch.native_batch_norm` (the kernel behind
`torch.nn.functional.batch_norm`) computes a training step's statistics
and normalization in one kernel and its gradient in one, and keeps
nothing for the backward pass but the input and two vectors; the
`keras.ops` path runs a dozen element-wise ops and reductions, each with
its own temporary. `_dispatch.choose` decides when it runs.

The kernel normalizes axis 1 of an `(N, C, ...)` tensor. The normalized
axes of a keras_bn layer (one axis, or one run of adjacent axes) are that
axis of a view of the input that merges the axes before them and the
axes after them: `(64, 32, 32, 64)` normalized on its last axis is read as
`(65536, 64)`, for which PyTorch picks its channels-last kernel, without a
copy. Half-precision inputs are read as they are, the statistics
accumulated in float32 with float32 weights.

The functions have the signatures of `_ops_kernels` (`normalize`,
`moments`, `inference`, statistics `keepdims` against the input) and know
nothing of the layers; the layers update their moving statistics
themselves. `normalize_step`, one step of a recurrent layer, has the
signature of `_statistics.normalize_step`
(`_recurrent_paths.choose_step_normalization` decides when it runs).
`torch` is imported when a function runs, so keras_bn imports without it.
"""

import math

from keras_bn import _layout
from keras_bn import _statistics


def channel_view(x, start, stop):
    """`x` as `(N, C)` or `(N, C, L)`, `C` its axes `start` to `stop - 1`.

    `N` merges the axes before `start` and `L` those from `stop` (left out
    when there are none, so that PyTorch takes its channels-last kernel).
    """
    shape = tuple(x.shape)
    sizes = [math.prod(shape[:start]), math.prod(shape[start:stop])]
    if stop < len(shape):
        sizes.append(math.prod(shape[stop:]))
    return x.reshape(sizes)


# The epsilon of the call that computes moments alone: the variance is
# recovered from `1 / sqrt(variance + epsilon)`, more exactly for a
# smaller one.
_MOMENTS_EPSILON = 1e-12


def _weights_dtype(x):
    import torch

    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _vector(value, x):
    """A per-channel value as the kernel's vector: float32, or float64 for
    float64 inputs (so that half-precision inputs get float32
    statistics, not ones rounded to the input's dtype)."""
    return value.reshape(-1).to(_weights_dtype(x))


def _kernel_view(x, axes):
    return channel_view(x, *_layout.kept_axes_span(len(x.shape), axes))


def _moments(x, axes, view, mean, inverse_std, epsilon):
    import torch

    shape = _layout.kept_shape(x.shape, axes)
    count = torch.tensor(
        float(view.numel() // view.shape[1]), dtype=mean.dtype,
        device=mean.device,
    )
    variance = _variance(inverse_std, epsilon)
    return _statistics.Moments(
        mean.reshape(shape), variance.reshape(shape), count
    )


def moments(x, axes, mask=None):
    """The batch's `Moments` of `x` over `axes` (the kept axes adjacent,
    no mask), from a call of the kernel without gradient."""
    import torch

    del mask  # None (`_dispatch`).
    view = _kernel_view(x, axes)
    ones = torch.ones(view.shape[1], dtype=_weights_dtype(x), device=x.device)
    with torch.no_grad():
        _, mean, inverse_std = torch.native_batch_norm(
            view, ones, None, None, None, True, 0.0, _MOMENTS_EPSILON
        )
    return _moments(x, axes, view, mean, inverse_std, _MOMENTS_EPSILON)


def normalize(x, axes, mask, epsilon, scale, offset, moments=None):
    """Batch normalization of `x` (float16, bfloat16, float32 or float64,
    not empty) over `axes`, the kept axes adjacent, without a mask.

    The kernel computes the statistics itself: given `moments` (from
    `moments`, bit for bit the ones it computes) are returned as they
    are.
    """
    import torch

    del mask  # None (`_dispatch`).
    view = _kernel_view(x, axes)
    y, mean, inverse_std = torch.native_batch_norm(
        view, _vector(scale, x), _vector(offset, x), None, None, True, 0.0,
        epsilon,
    )
    if moments is None:
        moments = _moments(x, axes, view, mean, inverse_std, epsilon)
    return _statistics.Normalized(y.reshape(x.shape), moments)


def inference(x, axes, epsilon, scale, offset, mean, variance):
    """Normalizes `x` with given statistics in one pass."""
    import torch

    y, _, _ = torch.native_batch_norm(
        _kernel_view(x, axes),
        *(_vector(v, x) for v in (scale, offset, mean, variance)),
        False, 0.0, epsilon,
    )
    return y.reshape(x.shape)


def _variance(inverse_std, epsilon):
    """The biased variance from the kernel's `1 / sqrt(variance + epsilon)`.

    Computed in float64 so that the subtraction of `epsilon` loses no more
    than the float32 rounding of `inverse_std`; clamped at zero.
    """
    stddev = 1.0 / inverse_std.double()
    variance = _statistics.variance_from_stddev(stddev, epsilon)
    return variance.to(inverse_std.dtype)


def normalize_step(value, gamma, beta, mask, epsilon):
    """One step of a recurrent layer, `(batch, features)`, normalized over
    the batch with PyTorch's kernel, which autograd differentiates in one
    kernel (`_statistics.normalize_step`'s signature and result; no
    mask)."""
    import torch

    del mask  # None (`_dispatch.choose_step_normalization`).
    y, mean, _ = torch.native_batch_norm(
        value, gamma, beta, None, None, True, 0.0, epsilon
    )
    with torch.no_grad():
        variance = torch.var(value, dim=0, correction=0)
    count = torch.full(
        (1,), value.shape[0], dtype=value.dtype, device=value.device
    )
    return y, _statistics.Moments(mean.detach(), variance, count)
