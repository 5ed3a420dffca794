"""TensorFlow kernels for the common case of the batch-normalization layers.

The layers compute everything with `keras.ops` (the math is in
`_statistics`). On the TensorFlow backend, training without cross-replica
synchronization in progress runs faster through one of two kernels, which
give the same numbers up to float rounding:

- TensorFlow's fused kernel (`FusedBatchNormV3`: cuDNN on a GPU, oneDNN or
  Eigen on a CPU), for the last axis alone, without a mask or ghost
  batches; it also serves half-precision inference. Batch renormalization
  calls it twice in the forward pass (statistics, then the corrected
  normalization) and once in the backward pass.
- An XLA-compiled kernel, in float32 (and float64, which TensorFlow's
  kernel does not take) on a CPU where TensorFlow's kernel is Eigen's
  (oneDNN off; TensorFlow turns oneDNN on by default only on x86 CPUs with
  AVX-512 VNNI or newer instructions), and for the masks, ghost batches and
  axes TensorFlow's kernel cannot take: three small functions compiled
  with `jit_compile=True` (the moments, the normalization, and its
  gradient, wired together with `tf.custom_gradient`) that TensorFlow calls
  from an ordinary graph. On a CPU they cost about two thirds of Eigen's
  kernel and half of a chain of TensorFlow ops (docs/performance.md).
  Each input shape compiles once; layers of one shape share it.

The environment variable `KERAS_BN_XLA_KERNEL` overrides the choice of the
second: `0` never uses it, `1` uses it wherever it can serve (on a GPU, with
oneDNN, inside an XLA-compiled function), and anything else (the default)
as above. It is read when a layer's call is traced.
"""

import functools
import os

from keras_bn import _statistics

XLA_KERNEL_VARIABLE = "KERAS_BN_XLA_KERNEL"


def xla_compiling():
    """Whether TensorFlow is tracing a function for XLA (`jit_compile`)."""
    import tensorflow as tf

    return tf.__internal__.get_enclosing_xla_context() is not None


def use_xla_kernel(fusable):
    """Whether a float32 or float64 training call takes the XLA kernel.

    Args:
        fusable: Whether TensorFlow's fused kernel could serve the call.
    """
    setting = os.environ.get(XLA_KERNEL_VARIABLE, "auto").strip()
    if setting in ("0", "1"):
        return setting == "1"
    if xla_compiling() or not _cpu_only():
        # Under XLA the layer's own ops compile as well; on a GPU cuDNN's
        # kernel is the fast one.
        return False
    return not fusable or not _onednn_enabled()


@functools.cache
def _cpu_only():
    import tensorflow as tf

    return not any(
        tf.config.list_logical_devices(kind) for kind in ("GPU", "TPU")
    )


@functools.cache
def _onednn_enabled():
    # oneDNN's fused kernel measured faster than the XLA one on a CPU.
    from tensorflow.python.util import _pywrap_util_port

    return _pywrap_util_port.IsMklEnabled()


def xla_normalize(layer, x, axes, mask):
    """Batch-normalizes `x` over `axes` through the XLA-compiled kernel.

    `x` is the layer's merged view of its input (with a leading ghost axis
    for ghost batches) and `mask` is `None` or broadcastable to it. The
    scale and offset applied to the batch-normalized value come from the
    layer's `_normalized_affine`; they receive gradients, and the batch
    statistics do through the kernel's gradient.

    Returns:
        `(outputs, mean, variance, count)`, the statistics as
        `_statistics.moments` returns them.
    """
    import tensorflow as tf

    functions = _xla_functions(len(x.shape))
    axes = tuple(axes)
    epsilon = layer.epsilon
    if mask is not None:
        mask = tf.cast(mask, x.dtype)
    mean, variance, count = functions.moments(x, axes, mask)

    @tf.custom_gradient
    def normalize(x, mean, variance, scale, offset):
        y = functions.normalize(x, mean, variance, scale, offset, epsilon)

        def grad(dy):
            dx, dscale, doffset = functions.normalize_grad(
                dy, x, mean, variance, count, mask, scale, axes, epsilon
            )
            # `mean` and `variance` are the batch's own statistics: their
            # share of the gradient is already in `dx`.
            return (
                dx,
                None,
                None,
                _sum_to_shape(dscale, scale),
                _sum_to_shape(doffset, offset),
            )

        return y, grad

    scale, offset = layer._normalized_affine(
        mean, variance, lambda w: layer._broadcast(w, x.dtype)
    )
    outputs = normalize(x, mean, variance, scale, offset)
    return outputs, mean, variance, count


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
        return (x - mean) * (tf.math.rsqrt(variance + epsilon) * scale) + (
            offset
        )

    @compiled
    def normalize_grad(
        dy, x, mean, variance, count, mask, scale, axes, epsilon
    ):
        # y = x_hat * scale + offset with x_hat = (x - mean) * inv_std and
        # the batch's (masked) mean and variance over `count` elements: the
        # classic batch-norm gradient, in which the statistics' share
        # reaches only the elements that counted. Every output, counted or
        # not, depends on the statistics, so the sums run over all of them.
        inv_std = tf.math.rsqrt(variance + epsilon)
        x_hat = (x - mean) * inv_std
        doffset = tf.reduce_sum(dy, axes, keepdims=True)
        dscale = tf.reduce_sum(dy * x_hat, axes, keepdims=True)
        share = (doffset + x_hat * dscale) / tf.maximum(count, 1.0)
        if mask is not None:
            share = share * mask
        dx = (scale * inv_std) * (dy - share)
        return dx, dscale, doffset

    return types.SimpleNamespace(
        moments=moments, normalize=normalize, normalize_grad=normalize_grad
    )


def fused_training(layer, inputs):
    """`layer`'s training call through TensorFlow's fused kernel.

    One kernel forward and one backward instead of a chain of element-wise
    ops and reductions; half-precision inputs are read as they are, with
    statistics accumulated in float32 inside the kernel. A layer whose
    scale and offset depend on the batch's statistics (batch
    renormalization) goes through `_corrected_fused_batch_norm`.
    """
    import tensorflow as tf

    x = _image_view(layer, inputs)
    # The kernel's statistics are float32 for every input dtype.
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), "float32")
    if corrects(layer):
        y, mean, variance = _corrected_fused_batch_norm(layer, x, count)
    else:
        scale, offset = layer._normalized_affine(
            None, None, lambda w: tf.cast(w, "float32")
        )
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, epsilon=layer.epsilon, is_training=True
        )
        variance = _statistics.biased_variance(variance, count)
    layer._update_moving_statistics(mean, variance, count)
    return tf.reshape(y, tf.shape(inputs))


def _image_view(layer, inputs):
    """`inputs` as the (N, H, W, C) tensor TensorFlow's kernel takes.

    In a TensorFlow graph the axes between the batch and the channels
    become H: oneDNN's kernel measured about 10 % faster on
    (64, 1024, 1, 64) than on (65536, 1, 1, 64), and Eigen's the same.
    Under XLA, which expands the kernel into reductions over N, H and W,
    every axis but the channels becomes N: XLA on a CPU reduces one axis
    about twice as fast as several.
    """
    import tensorflow as tf

    channels = layer._param_shape[0]
    if xla_compiling():
        return tf.reshape(inputs, (-1, 1, 1, channels))
    shape = tf.shape(inputs)
    batch = shape[0] if len(inputs.shape) > 1 else 1
    return tf.reshape(
        inputs, tf.stack([batch, tf.reduce_prod(shape[1:-1]), 1, channels])
    )


def _corrected_fused_batch_norm(layer, x, count):
    """Batch renormalization of `x` (N, H, W, C) through TensorFlow's kernel.

    The scale and offset applied to the normalized value need the batch's
    statistics, so the kernel cannot apply them in the same call that
    computes the statistics. A first training-mode call computes them
    (its output is not used); a second, inference-mode call normalizes
    with those statistics and the corrected scale and offset; and the
    gradient is the training-mode kernel's, with the first call's saved
    statistics: `r` and `d` are constants to the gradient, the batch's
    statistics are not. Two forward kernels and one backward measured
    1.00x to 1.05x batch normalization's one and one with oneDNN
    (docs/performance.md), where a moments pass of TensorFlow ops before
    the kernel cost 1.3x to 2x.

    Returns:
        `(y, mean, variance)`, the statistics as the layer keeps them.
    """
    import tensorflow as tf

    epsilon = layer.epsilon
    channels = layer._param_shape[0]
    _, mean, variance, *reserve = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=tf.ones(channels), offset=tf.zeros(channels),
        mean=tf.zeros(0), variance=tf.zeros(0), epsilon=epsilon,
        is_training=True,
    )
    variance = _statistics.biased_variance(variance, count)
    scale, offset = layer._normalized_affine(
        mean, variance, lambda w: tf.cast(w, mean.dtype)
    )

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


def fused_inference(layer, inputs):
    """`layer`'s inference call through TensorFlow's fused kernel."""
    import tensorflow as tf

    channels = layer._param_shape[0]
    x = _image_view(layer, inputs)
    gamma = tf.ones(channels) if layer.gamma is None else layer.gamma
    beta = tf.zeros(channels) if layer.beta is None else layer.beta
    y, _, _ = tf.compat.v1.nn.fused_batch_norm(
        x, gamma, beta, mean=layer.moving_mean,
        variance=layer.moving_variance, epsilon=layer.epsilon,
        is_training=False,
    )
    return tf.reshape(y, tf.shape(inputs))


def corrects(layer):
    """Whether `layer` corrects the batch-normalized value in training."""
    from keras_bn.batch_normalization import BatchNormalization

    return (
        type(layer)._normalized_affine
        is not BatchNormalization._normalized_affine
    )
