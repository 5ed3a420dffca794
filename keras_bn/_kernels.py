"""TensorFlow kernels for batch normalization: functions of tensors.

Three faster ways to what the `keras.ops` kernel (`_ops_kernels`)
computes, on the TensorFlow backend; `_dispatch.choose` decides when each
runs:

- An XLA-compiled kernel, `xla_normalize`: small functions compiled with
  `jit_compile=True` (the moments and the normalization, in one function
  for statistics per channel of the last axis, and the gradient, wired
  together with `tf.custom_gradient`) that TensorFlow calls from an
  ordinary graph. It serves any axes, masks, ghost batches and float64.
  Each input shape compiles once; layers of one shape share it.
- The wide-view kernel, `wide_normalize`: the same closed-form gradient in
  ordinary TensorFlow ops, on a view of a `(rows, channels)` input with
  several rows side by side, for few channels on a CPU: nothing to
  compile.
- TensorFlow's fused kernel (`FusedBatchNormV3`: cuDNN on a GPU, oneDNN or
  Eigen on a CPU), for the last axis alone: `fused_normalize` and
  `fused_inference`. Batch renormalization, whose scale and offset depend
  on the batch's statistics, which this kernel computes inside, runs
  `fused_corrected`: the kernel twice in the forward pass and once
  backward.

They have the `_ops_kernels` signatures: `normalize(x, axes, mask,
epsilon, scale, offset, moments=None)` returns
`_statistics.Normalized(outputs, moments)`, `moments(x, axes, mask)` the
batch's `Moments`, all `keepdims` against `x`. They know nothing of the
layers; the layers update their moving statistics themselves.
"""

import functools
import math

from keras_bn import _layout
from keras_bn import _statistics


def xla_moments(x, axes, mask=None):
    """The batch's `Moments` of `x` over `axes`, computed by the XLA
    kernel's compiled function."""
    view = _layout.merged_view(_statistics.in_statistics_dtype(x), axes, mask)
    functions = _xla_functions(len(view.x.shape))
    mean, variance, count = functions.moments(
        view.x, tuple(view.axes), _mask(view)
    )
    return _statistics.Moments(
        view.statistic(mean), view.statistic(variance), view.statistic(count)
    )


def xla_normalize(x, axes, mask, epsilon, scale, offset, moments=None):
    """Batch-normalizes `x` over `axes` through the XLA-compiled kernel.

    On the merged view (`_layout.merged_view`); a `(elements, channels)`
    view without given `moments` runs the moments and the normalization
    as one compiled function. The gradient is the closed form of
    `_statistics.normalize_grad`, compiled: the batch statistics' share
    reaches `x` through it, not through `moments`.
    """
    import tensorflow as tf

    view = _layout.merged_view(_statistics.in_statistics_dtype(x), axes, mask)
    kernel_x, kernel_axes, kernel_mask = view.x, view.axes, _mask(view)
    functions = _xla_functions(len(kernel_x.shape))
    if moments is None and kernel_axes == [0] and len(kernel_x.shape) == 2:
        def forward(scale, offset):
            return functions.forward(kernel_x, kernel_mask, scale, offset,
                                     epsilon)
    else:
        if moments is None:
            mean, variance, count = functions.moments(
                kernel_x, tuple(kernel_axes), kernel_mask
            )
        else:
            mean, variance, count = (view.of(m) for m in moments)

        def forward(scale, offset):
            y = functions.normalize(
                kernel_x, mean, variance, scale, offset, epsilon
            )
            return y, mean, variance, count

    @tf.custom_gradient
    def normalize(x, scale, offset):
        y, mean, variance, count = forward(scale, offset)

        def grad(dy, *_):
            dx, dscale, doffset = functions.normalize_grad(
                dy, x, mean, variance, count, kernel_mask, scale,
                tuple(kernel_axes), epsilon,
            )
            return (
                dx,
                _sum_to_shape(dscale, scale),
                _sum_to_shape(doffset, offset),
            )

        return (y, mean, variance, count), grad

    y, mean, variance, count = normalize(
        kernel_x, view.of(_float_like(scale, kernel_x)),
        view.of(_float_like(offset, kernel_x)),
    )
    return _statistics.Normalized(
        view.output(y),
        _statistics.Moments(
            view.statistic(mean), view.statistic(variance),
            view.statistic(count),
        ),
    )


def wide_moments(x, axes, mask=None, positions=1):
    """The batch's `Moments` of a `(..., channels)` `x` over all but its
    last axis, on the wide view (`wide_normalize`)."""
    del axes, mask  # The last axis alone, no mask (`_dispatch`).
    wide = _wide_view(x, positions)
    mean, variance, count = _statistics.moments(
        wide, [0], positions=positions
    )
    return _statistics.Moments(
        _kept(mean, x), _kept(variance, x), count
    )


def wide_normalize(
    x, axes, mask, epsilon, scale, offset, moments=None, positions=1
):
    """Batch-normalizes a `(..., channels)` `x` through the wide view.

    With few channels a `(rows, channels)` tensor is a poor shape for a
    CPU: each reduction and element-wise op works on rows shorter than its
    vector loop. This kernel views `x` as `(rows / positions, positions *
    channels)`, reduces and normalizes that, and folds the per-position
    sums into per-channel ones (`_statistics.fold_positions`); the
    gradient is the closed form of `_statistics.normalize_grad` on the same
    view, wired in with `tf.custom_gradient`. `positions`
    (`_dispatch.wide_positions`) divides the rows; the normalized axis is
    the last alone, without a mask.
    """
    import tensorflow as tf

    x = _statistics.in_statistics_dtype(x)
    channels = x.shape[-1]
    wide = _wide_view(x, positions)
    if moments is None:
        moments = wide_moments(x, axes, mask, positions)
    mean, variance = (
        tf.reshape(m, (1, channels)) for m in moments[:2]
    )
    count = moments.count

    def spread(value):
        return _statistics.spread_positions(value, positions)

    @tf.custom_gradient
    def normalize(x, scale, offset):
        total_scale, total_offset = _statistics.affine(
            mean, variance, epsilon, scale, offset
        )
        y = wide * spread(total_scale) + spread(total_offset)

        def grad(dy):
            dx, dscale, doffset = _statistics.normalize_grad(
                tf.reshape(dy, tf.shape(wide)), wide, mean, variance, count,
                None, scale, [0], epsilon, positions,
            )
            return tf.reshape(dx, tf.shape(x)), dscale, doffset

        return tf.reshape(y, tf.shape(x)), grad

    outputs = normalize(
        x, _row(scale, channels, x.dtype), _row(offset, channels, x.dtype)
    )
    return _statistics.Normalized(outputs, moments)


def _wide_view(x, positions):
    import tensorflow as tf

    return tf.reshape(x, (-1, positions * x.shape[-1]))


def _kept(statistic, x):
    """A per-channel statistic `keepdims` against `x` (last axis kept)."""
    import tensorflow as tf

    rank = len(x.shape)
    return tf.reshape(
        statistic, _layout.kept_shape(x.shape, list(range(rank - 1)))
    )


def _float_like(value, x):
    return _statistics.cast(value, x.dtype)


def _mask(view):
    import tensorflow as tf

    return None if view.mask is None else tf.cast(view.mask, view.x.dtype)


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


def _image_view(x):
    """`x` (last axis normalized) as the (N, H, W, C) tensor TensorFlow's
    kernel takes: the axes between the batch and the channels become H,
    which oneDNN's kernel serves faster than a long N. A static shape
    (the batch may be unknown) reshapes without shape ops to trace."""
    import tensorflow as tf

    inner = tuple(x.shape[1:-1])
    if len(x.shape) < 2:
        return tf.reshape(x, (1, 1, 1, x.shape[-1]))
    if None not in inner:
        return tf.reshape(
            x, _static_shape(x, (math.prod(inner), 1, x.shape[-1]))
        )
    shape = tf.shape(x)
    return tf.reshape(
        x, tf.stack([shape[0], tf.reduce_prod(shape[1:-1]), 1, x.shape[-1]])
    )


def _as_shape_of(y, x):
    """`y` reshaped to `x`'s shape."""
    import tensorflow as tf

    if None in tuple(x.shape[1:]):
        return tf.reshape(y, tf.shape(x))
    return tf.reshape(y, _static_shape(x, tuple(x.shape[1:])))


def _static_shape(x, rest):
    """`(batch, *rest)` for `tf.reshape`, the batch `-1` where unknown (or
    `tf.shape` where `-1` could not be inferred: no elements)."""
    import tensorflow as tf

    if x.shape[0] is not None:
        return (x.shape[0], *rest)
    if math.prod(rest) == 0:
        return tf.concat([tf.shape(x)[:1], rest], 0)
    return (-1, *rest)


def _image_count(image):
    """The elements behind each channel's statistics in the kernel's view:
    a Python float where its shape is static."""
    import tensorflow as tf

    if None in tuple(image.shape[:3]):
        return tf.cast(tf.reduce_prod(tf.shape(image)[:3]), "float32")
    return float(math.prod(image.shape[:3]))


def _vector(value):
    """A per-channel value as the float32 vector the kernel takes."""
    import tensorflow as tf

    return tf.reshape(tf.cast(value, "float32"), (-1,))


def _fused_moments(mean, variance, count, x):
    import tensorflow as tf

    return _statistics.Moments(
        _kept(mean, x),
        _kept(_statistics.biased_variance(variance, count), x),
        tf.constant(count, "float32") if isinstance(count, float) else count,
    )


def fused_normalize(x, axes, mask, epsilon, scale, offset, moments=None):
    """Batch normalization of `x` over all but its last axis through
    TensorFlow's kernel.

    One kernel forward and one backward instead of a chain of element-wise
    ops and reductions; half-precision inputs are read as they are, with
    statistics accumulated in float32 inside the kernel. The kernel takes
    no mask and computes the statistics itself: `mask` and `moments` must
    be `None` (`_dispatch`), and `epsilon` at least
    `_dispatch.FUSED_MIN_EPSILON`.
    """
    import tensorflow as tf

    del axes  # All but the last.
    if mask is not None or moments is not None:
        raise ValueError(
            "TensorFlow's fused kernel takes no mask and no given moments."
        )
    image = _image_view(x)
    # The kernel's statistics are float32 for every input dtype.
    count = _image_count(image)
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        image, _vector(scale), _vector(offset), epsilon=epsilon,
        is_training=True,
    )
    return _statistics.Normalized(
        _as_shape_of(y, x), _fused_moments(mean, variance, count, x)
    )


def fused_corrected(x, axes, epsilon, scale_offset):
    """`fused_normalize` for a scale and offset that depend on the batch's
    statistics (batch renormalization's `r` and `d`).

    The kernel cannot apply such a scale and offset in the call that
    computes the statistics. A first training-mode call computes them (its
    output is not used); `scale_offset(moments)` gives the scale and offset
    (`keepdims`, constants to the gradient but for their own); a second,
    inference-mode call normalizes with those statistics, scale and
    offset; and the gradient is the training-mode kernel's, with the first
    call's saved statistics. Two forward kernels and one backward cost
    about as much as plain batch normalization's one and one, where a
    moments pass of TensorFlow ops before the kernel cost more.
    """
    import tensorflow as tf

    del axes  # All but the last.
    image = _image_view(x)
    channels = x.shape[-1]
    count = _image_count(image)
    _, mean, variance, *reserve = tf.raw_ops.FusedBatchNormV3(
        x=image, scale=tf.ones(channels), offset=tf.zeros(channels),
        mean=tf.zeros(0), variance=tf.zeros(0), epsilon=epsilon,
        is_training=True,
    )
    moments = _fused_moments(mean, variance, count, x)
    scale, offset = scale_offset(moments)

    @tf.custom_gradient
    def normalize(image, scale, offset):
        y, *_ = tf.raw_ops.FusedBatchNormV3(
            x=image, scale=scale, offset=offset, mean=mean,
            variance=_vector(moments.variance), epsilon=epsilon,
            is_training=False,
        )

        def grad(dy):
            dx, dscale, doffset, *_ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy, x=image, scale=scale,
                reserve_space_1=reserve[0], reserve_space_2=reserve[1],
                reserve_space_3=reserve[2], epsilon=epsilon,
                is_training=True,
            )
            return dx, dscale, doffset

        return y, grad

    y = normalize(image, _vector(scale), _vector(offset))
    return _statistics.Normalized(_as_shape_of(y, x), moments)


def fused_inference(x, axes, epsilon, scale, offset, mean, variance):
    """`x` normalized over all but its last axis with given statistics,
    in one kernel."""
    import tensorflow as tf

    del axes  # All but the last.
    y, _, _ = tf.compat.v1.nn.fused_batch_norm(
        _image_view(x), _vector(scale), _vector(offset), mean=_vector(mean),
        variance=_vector(variance), epsilon=epsilon, is_training=False,
    )
    return _as_shape_of(y, x)
