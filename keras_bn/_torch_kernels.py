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

Like `_kernels`, the functions know nothing of the layers: they take
tensors, plain values and an `affine(mean, variance)` function, and return
the batch statistics; the layers update their moving statistics
themselves. `torch` is imported when a function runs, so keras_bn imports
without it.
"""

import math

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


def training(x, start, stop, epsilon, affine, affine_uses_statistics):
    """Batch normalization of `x` over all axes but `start` to `stop - 1`.

    Args:
        x: Float tensor (float16, bfloat16, float32 or float64), not empty.
        start, stop: The normalized axes are `start` to `stop - 1`.
        epsilon: Python float.
        affine: `affine(mean, variance)` returns the `(scale, offset)`
            vectors (one entry per normalized position, float32 or
            float64 like the statistics) applied to the batch-normalized
            value. They receive gradients; the statistics passed in do not.
        affine_uses_statistics: Whether `affine` needs the batch's
            statistics (batch renormalization); if not, it is called with
            `None`.

    Returns:
        `(y, mean, variance, count)`: `y` like `x`, the batch's mean and
        biased variance as vectors (float32, or float64 for float64
        inputs), and the number of elements behind each, a scalar.
    """
    import torch

    view = channel_view(x, start, stop)
    count = view.numel() // view.shape[1]
    if affine_uses_statistics:
        # The scale and offset depend on the statistics, which the training
        # kernel computes inside: a first call of the same kernel, without
        # gradient, gives them (bit for bit the ones the second call
        # normalizes with); its output is dropped at once.
        # Float32 (or float64) weights make the kernel return statistics in
        # their dtype for half-precision inputs, not rounded to the input's.
        ones = torch.ones(
            view.shape[1],
            dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
            device=x.device,
        )
        with torch.no_grad():
            _, mean, inverse_std = torch.native_batch_norm(
                view, ones, None, None, None, True, 0.0, epsilon
            )
        variance = _variance(inverse_std, epsilon)
        scale, offset = affine(mean, variance)
        y, _, _ = torch.native_batch_norm(
            view, scale, offset, None, None, True, 0.0, epsilon
        )
    else:
        scale, offset = affine(None, None)
        y, mean, inverse_std = torch.native_batch_norm(
            view, scale, offset, None, None, True, 0.0, epsilon
        )
        variance = _variance(inverse_std, epsilon)
    count = torch.tensor(float(count), dtype=mean.dtype, device=mean.device)
    return y.reshape(x.shape), mean, variance, count


def inference(x, start, stop, gamma, beta, mean, variance, epsilon):
    """Normalizes `x` with given statistics in one pass.

    `gamma` and `beta` may be `None`; every vector has one entry per
    normalized position and the statistics' dtype (float32, or float64
    for float64 inputs).
    """
    import torch

    y, _, _ = torch.native_batch_norm(
        channel_view(x, start, stop), gamma, beta, mean, variance, False,
        0.0, epsilon,
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
