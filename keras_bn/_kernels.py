"""TensorFlow kernels for batch normalization: functions of tensors.

Three faster ways to what the layers' `keras.ops` path computes, on the
TensorFlow backend; `_dispatch.choose` decides when each runs:

- TensorFlow's fused kernel (`FusedBatchNormV3`: cuDNN on a GPU, oneDNN or
  Eigen on a CPU), for the last axis alone: `fused_training` and
  `fused_inference`. When the scale and offset depend on the batch's
  statistics (batch renormalization) it runs twice in the forward pass
  (statistics, then the corrected normalization) and once backward.
- An XLA-compiled kernel, `xla_training`: small functions compiled with
  `jit_compile=True` (the moments and the normalization, in one function
  where the scale and offset do not depend on the statistics, and the
  gradient, wired together with `tf.custom_gradient`) that TensorFlow
  calls from an ordinary graph. It serves any axes, masks, ghost batches
  and float64. Each input shape compiles once; layers of one shape share
  it.
- The wide-view kernel, `wide_training`: the same closed-form gradient in
  ordinary TensorFlow ops, on a view of a `(rows, channels)` input with
  several rows side by side, for few channels on a CPU: nothing to
  compile.

The kernels know nothing of the layers: they take tensors, plain values
and an `affine(mean, variance)` function that returns the scale and offset
applied to the batch-normalized value. They return the batch statistics;
the layers update their moving statistics themselves.
"""

import functools

from keras_bn import _dispatch
from keras_bn import _statistics


def xla_training(x, axes, mask, epsilon, affine, affine_uses_statistics):
    """Batch-normalizes `x` over `axes` through the XLA-compiled kernel.

    Args:
        x: Float tensor (float32 or wider).
        axes: The reduced axes.
        mask: `None` or a tensor broadcastable to `x`; zeros are left out of
            the statistics.
        epsilon: Python float.
        affine: `affine(mean, variance)` returns the `(scale, offset)`
            applied to the batch-normalized value, broadcastable to `x`.
            They receive gradients; the statistics passed in do not (their
            share of the gradient reaches `x` through the kernel's).
        affine_uses_statistics: Whether `affine` needs the batch's
            statistics (batch renormalization); if not, it is called with
            `None`.

    Returns:
        `(outputs, mean, variance, count)`, the statistics as
        `_statistics.moments` returns them.
    """
    import tensorflow as tf

    axes = tuple(axes)
    rank = len(x.shape)
    channels = x.shape[-1]
    if mask is not None:
        mask = tf.cast(mask, x.dtype)
    per_channel = (
        axes == tuple(range(rank - 1))
        and channels is not None
        and (mask is None or len(mask.shape) == rank)
    )
    if per_channel:
        # The `(elements, channels)` view, which XLA on a CPU reduces
        # faster, and compiles faster, than a reduction over several axes;
        # a mask of one entry per position stays one column wide.
        statistics_shape = [1] * (rank - 1) + [channels]
        kernel_x = tf.reshape(x, (-1, channels))
        if mask is not None:
            width = 1 if mask.shape[-1] == 1 else channels
            target = tf.concat([tf.shape(x)[:-1], [width]], 0)
            mask = tf.reshape(tf.broadcast_to(mask, target), (-1, width))
        axes = (0,)

        def to_input(statistic):
            return tf.reshape(statistic, statistics_shape)

        def to_kernel(weight):
            return _row(weight, channels, x.dtype)

    else:
        kernel_x = x

        def to_input(statistic):
            return statistic

        to_kernel = to_input
    functions = _xla_functions(len(kernel_x.shape))

    if affine_uses_statistics or not per_channel:
        mean, variance, count = functions.moments(kernel_x, axes, mask)
        scale, offset = affine(to_input(mean), to_input(variance))

        def forward(scale, offset):
            y = functions.normalize(
                kernel_x, mean, variance, scale, offset, epsilon
            )
            return y, mean, variance, count

    else:
        # The moments and the normalization in one compiled function: one
        # compilation fewer, and fewer passes on the 2-D view (on more
        # axes it measured slower than two functions).
        scale, offset = affine(None, None)

        def forward(scale, offset):
            return functions.forward(kernel_x, mask, scale, offset, epsilon)

    @tf.custom_gradient
    def normalize(x, scale, offset):
        y, mean, variance, count = forward(to_kernel(scale), to_kernel(offset))

        def grad(dy, *_):
            # The batch's statistics' share of the gradient is in `dx`.
            dx, dscale, doffset = functions.normalize_grad(
                tf.reshape(dy, tf.shape(kernel_x)), kernel_x, mean, variance,
                count, mask, to_kernel(scale), axes, epsilon,
            )
            return (
                tf.reshape(dx, tf.shape(x)),
                _sum_to_shape(to_input(dscale), scale),
                _sum_to_shape(to_input(doffset), offset),
            )

        return (tf.reshape(y, tf.shape(x)), mean, variance, count), grad

    outputs, mean, variance, count = normalize(x, scale, offset)
    if mask is not None:
        count = to_input(count)
    return outputs, to_input(mean), to_input(variance), count


def wide_training(x, positions, epsilon, affine, affine_uses_statistics):
    """Batch-normalizes the rows of `x` through the wide-view kernel.

    With few channels a `(rows, channels)` tensor is a poor shape for a
    CPU: each reduction and element-wise op works on rows shorter than its
    vector loop. This kernel views `x` as `(rows / positions, positions *
    channels)`, reduces and normalizes that, and folds the per-position
    sums into per-channel ones (`_statistics.fold_positions`); the
    gradient is the closed form of `_statistics.normalize_grad` on the same
    view, wired in with `tf.custom_gradient`.

    Args:
        x: Float tensor `(rows, channels)`, `rows` a multiple of
            `positions`.
        positions: Rows side by side in each row of the wide view
            (`_dispatch.wide_positions`).
        epsilon, affine, affine_uses_statistics: As for `xla_training`.

    Returns:
        `(outputs, mean, variance, count)`, the statistics `(1, channels)`.
    """
    import tensorflow as tf

    channels = x.shape[-1]
    wide = tf.reshape(x, (-1, positions * channels))
    mean, variance, count = _statistics.moments(
        wide, [0], positions=positions
    )
    if affine_uses_statistics:
        scale, offset = affine(mean, variance)
    else:
        scale, offset = affine(None, None)

    def spread(value):
        return _statistics.spread_positions(value, positions)

    @tf.custom_gradient
    def normalize(x, scale, offset):
        row_scale = _row(scale, channels, x.dtype)
        total_scale, total_offset = _statistics.affine(
            mean, variance, epsilon, row_scale,
            _row(offset, channels, x.dtype),
        )
        y = wide * spread(total_scale) + spread(total_offset)

        def grad(dy):
            dx, dscale, doffset = _statistics.normalize_grad(
                tf.reshape(dy, tf.shape(wide)), wide, mean, variance, count,
                None, row_scale, [0], epsilon, positions,
            )
            return (
                tf.reshape(dx, tf.shape(x)),
                _sum_to_shape(dscale, scale),
                _sum_to_shape(doffset, offset),
            )

        return tf.reshape(y, tf.shape(x)), grad

    return normalize(x, scale, offset), mean, variance, count


def _row(value, channels, dtype):
    """A per-channel value (any shape that broadcasts against the last
    axis) as a `(1, channels)` row of `dtype`."""
    import tensorflow as tf

    return tf.broadcast_to(
        tf.reshape(tf.cast(value, dtype), (1, -1)), (1, channels)
    )


def _sum_to_shape(gradient, like):
    """`gradient` summed over the axes along which `like` was broadcast."""
    import tensorflow as tf

    extra = len(gradient.shape) - len(like.shape)
    if extra:
        gradient = tf.reduce_sum(gradient, list(range(extra)))
    axes = [
        a
        for a, (g, w) in enumerate(zip(gradient.shape, like.shape))
        if w == 1 and g != 1
    ]
    if axes:
        gradient = tf.reduce_sum(gradient, axes, keepdims=True)
    return gradient


@functools.cache
def _xla_functions(rank):
    """The kernel's compiled functions for inputs of `rank`.

    Made once per process and rank. With `reduce_retracing`, layers of
    many shapes share one trace per rank (XLA still compiles each shape),
    so eager callers get no retracing warnings; a trace generalized
    across ranks would lose the static rank the statistics need.
    """
    import types

    import tensorflow as tf

    del rank  # The cache key.
    compiled = functools.partial(
        tf.function, jit_compile=True, autograph=False, reduce_retracing=True
    )

    @compiled
    def moments(x, axes, mask):
        return _statistics.moments(x, list(axes), mask)

    @compiled
    def normalize(x, mean, variance, scale, offset, epsilon):
        scale, offset = _statistics.affine(
            mean, variance, epsilon, scale, offset
        )
        return x * scale + offset

    @compiled
    def forward(x, mask, scale, offset, epsilon):
        mean, variance, count = _statistics.moments(x, [0], mask)
        inv_std, shift = _statistics.affine(mean, variance, epsilon)
        y = (x * inv_std + shift) * scale + offset
        return y, mean, variance, count

    @compiled
    def normalize_grad(
        dy, x, mean, variance, count, mask, scale, axes, epsilon
    ):
        return _statistics.normalize_grad(
            dy, x, mean, variance, count, mask, scale, list(axes), epsilon
        )

    return types.SimpleNamespace(
        moments=moments, normalize=normalize, forward=forward,
        normalize_grad=normalize_grad,
    )


def image_view(inputs, channels):
    """`inputs` as the (N, H, W, C) tensor TensorFlow's kernel takes.

    In a TensorFlow graph the axes between the batch and the channels
    become H, which oneDNN's kernel serves faster than a long N. Under XLA,
    which expands the kernel into reductions over N, H and W, every axis
    but the channels becomes N: XLA on a CPU reduces one axis faster than
    several.
    """
    import tensorflow as tf

    if _dispatch.xla_compiling():
        return tf.reshape(inputs, (-1, 1, 1, channels))
    shape = tf.shape(inputs)
    batch = shape[0] if len(inputs.shape) > 1 else 1
    return tf.reshape(
        inputs, tf.stack([batch, tf.reduce_prod(shape[1:-1]), 1, channels])
    )


def fused_training(x, epsilon, affine, affine_uses_statistics):
    """Batch normalization of `x` (N, H, W, C) through TensorFlow's kernel.

    One kernel forward and one backward instead of a chain of element-wise
    ops and reductions; half-precision inputs are read as they are, with
    statistics accumulated in float32 inside the kernel.

    Args:
        x: The (N, H, W, C) view of the input (`image_view`).
        epsilon: Python float, at least `_dispatch.FUSED_MIN_EPSILON`.
        affine: `affine(mean, variance)` returns the float32 `(scale,
            offset)` vectors applied to the batch-normalized value.
        affine_uses_statistics: Whether `affine` needs the batch's
            statistics (batch renormalization); if not, it is called with
            `None` and the kernel runs once.

    Returns:
        `(y, mean, variance, count)`: `y` like `x`, the batch's float32
        mean and biased variance per channel, and the element count.
    """
    import tensorflow as tf

    # The kernel's statistics are float32 for every input dtype.
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), "float32")
    if affine_uses_statistics:
        y, mean, variance = _corrected_fused_batch_norm(
            x, epsilon, affine, count
        )
    else:
        scale, offset = affine(None, None)
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, epsilon=epsilon, is_training=True
        )
        variance = _statistics.biased_variance(variance, count)
    return y, mean, variance, count


def _corrected_fused_batch_norm(x, epsilon, affine, count):
    """Batch normalization whose scale and offset need the statistics.

    The kernel cannot apply such a scale and offset in the call that
    computes the statistics. A first training-mode call computes them (its
    output is not used); a second, inference-mode call normalizes with
    those statistics and the corrected scale and offset; and the gradient
    is the training-mode kernel's, with the first call's saved statistics:
    the correction is a constant to the gradient, the batch's statistics
    are not. Two forward kernels and one backward cost about as much as
    plain batch normalization's one and one (docs/performance.md), where a
    moments pass of TensorFlow ops before the kernel cost more.

    Returns:
        `(y, mean, variance)`, the variance biased.
    """
    import tensorflow as tf

    channels = x.shape[-1]
    _, mean, variance, *reserve = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=tf.ones(channels), offset=tf.zeros(channels),
        mean=tf.zeros(0), variance=tf.zeros(0), epsilon=epsilon,
        is_training=True,
    )
    variance = _statistics.biased_variance(variance, count)
    scale, offset = affine(mean, variance)

    @tf.custom_gradient
    def normalize(x, scale, offset):
        y, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=mean, variance=variance,
            epsilon=epsilon, is_training=False,
        )

        def grad(dy):
            dx, dscale, doffset, *_ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy, x=x, scale=scale, reserve_space_1=reserve[0],
                reserve_space_2=reserve[1], reserve_space_3=reserve[2],
                epsilon=epsilon, is_training=True,
            )
            return dx, dscale, doffset

        return y, grad

    return normalize(x, scale, offset), mean, variance


def fused_inference(x, gamma, beta, mean, variance, epsilon):
    """Normalizes `x` (N, H, W, C) with given statistics, in one kernel.

    `gamma` and `beta` are float32 vectors (ones and zeros for a layer
    without them).
    """
    import tensorflow as tf

    y, _, _ = tf.compat.v1.nn.fused_batch_norm(
        x, gamma, beta, mean=mean, variance=variance, epsilon=epsilon,
        is_training=False,
    )
    return y
