"""TensorFlow kernels for the common case of the batch-normalization layers.

The layers compute everything with `keras.ops` (the math is in
`_statistics`). On the TensorFlow backend, training without a mask, ghost
batches or cross-replica synchronization in progress runs faster through
one of two kernels, which give the same numbers up to float rounding:

- TensorFlow's fused kernel (`FusedBatchNormV3`: cuDNN on a GPU, oneDNN or
  Eigen on a CPU), for the last axis alone; it also serves half-precision
  inference.
- An XLA-compiled kernel, in float32 (and float64, which TensorFlow's
  kernel does not take) on a CPU where TensorFlow's kernel is Eigen's
  (oneDNN off, the default on most CPUs): three small functions compiled
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


def use_xla_kernel(corrects):
    """Whether a float32 or float64 training call takes the XLA kernel.

    `corrects`: whether the layer corrects the normalized value with the
    batch's statistics (batch renormalization), so that TensorFlow's fused
    kernel would need a separate moments pass.
    """
    setting = os.environ.get(XLA_KERNEL_VARIABLE, "auto").strip()
    if setting in ("0", "1"):
        return setting == "1"
    if xla_compiling() or not _cpu_only():
        # Under XLA the layer's own ops compile as well; on a GPU cuDNN's
        # kernel is the fast one.
        return False
    return corrects or not _onednn_enabled()


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


def xla_training(layer, inputs):
    """`layer`'s training call through the XLA-compiled kernel.

    Works on the layer's merged view of the input. The scale and offset
    applied to the batch-normalized value come from the layer's
    `_fused_scale_offset`, as with TensorFlow's fused kernel; they receive
    gradients, and the batch statistics do through the kernel's gradient.
    """
    import tensorflow as tf

    functions = _xla_functions()
    axes = tuple(layer._reduction_axes)
    epsilon = layer.epsilon
    x = layer._to_view(inputs)
    mean, variance = functions.moments(x, axes)

    @tf.custom_gradient
    def normalize(x, mean, variance, scale, offset):
        y = functions.normalize(x, mean, variance, scale, offset, epsilon)

        def grad(dy):
            dx, dscale, doffset = functions.normalize_grad(
                dy, x, mean, variance, scale, axes, epsilon
            )
            # `mean` and `variance` are the batch's own statistics: their
            # share of the gradient is already in `dx`.
            return dx, None, None, dscale, doffset

        return y, grad

    scale, offset = layer._fused_scale_offset(
        layer._to_param_shape(mean), layer._to_param_shape(variance)
    )
    y = normalize(
        x,
        mean,
        variance,
        tf.reshape(scale, layer._broadcast_shape),
        tf.reshape(offset, layer._broadcast_shape),
    )
    count = tf.cast(
        tf.size(x, tf.int64) // tf.size(mean, tf.int64), mean.dtype
    )
    layer._update_moving_statistics(
        layer._to_param_shape(mean), layer._to_param_shape(variance), count
    )
    return tf.reshape(y, tf.shape(inputs))


@functools.cache
def _xla_functions():
    """The kernel's compiled functions, made once per process."""
    import types

    import tensorflow as tf

    compiled = functools.partial(
        tf.function, jit_compile=True, autograph=False
    )

    @compiled
    def moments(x, axes):
        mean, variance, _ = _statistics.moments(x, list(axes))
        return mean, variance

    @compiled
    def normalize(x, mean, variance, scale, offset, epsilon):
        return (x - mean) * (tf.math.rsqrt(variance + epsilon) * scale) + (
            offset
        )

    @compiled
    def normalize_grad(dy, x, mean, variance, scale, axes, epsilon):
        # y = x_hat * scale + offset with x_hat = (x - mean) * inv_std and
        # the batch's mean and variance: the classic batch-norm gradient.
        count = tf.cast(
            tf.size(x, tf.int64) // tf.size(mean, tf.int64), x.dtype
        )
        inv_std = tf.math.rsqrt(variance + epsilon)
        x_hat = (x - mean) * inv_std
        doffset = tf.reduce_sum(dy, axes, keepdims=True)
        dscale = tf.reduce_sum(dy * x_hat, axes, keepdims=True)
        dx = (scale * inv_std) * (dy - (doffset + x_hat * dscale) / count)
        return dx, dscale, doffset

    return types.SimpleNamespace(
        moments=moments, normalize=normalize, normalize_grad=normalize_grad
    )


def fused_training(layer, inputs):
    """`layer`'s training call through TensorFlow's fused kernel.

    One kernel forward and one backward instead of a chain of element-wise
    ops and reductions; half-precision inputs are read as they are, with
    statistics accumulated in float32 inside the kernel.

    A layer whose scale and offset depend on the batch's statistics
    (`_fused_scale_offset` overridden) needs them before the kernel runs:
    they are computed first (one more pass over the input, with no backward
    pass) and the kernel applies the scale and offset itself. Normalizing
    with a unit scale and correcting the kernel's output instead measured
    slower, with and without XLA: the output costs a pass of its own, and
    so do its gradients.
    """
    import tensorflow as tf

    channels = layer._param_shape[0]
    x = tf.reshape(inputs, (-1, 1, 1, channels))
    if corrects(layer):
        mean, variance, count = _statistics.moments(
            tf.cast(x, _statistics.statistics_dtype(x.dtype)), [0, 1, 2]
        )
        mean = tf.reshape(mean, (channels,))
        variance = tf.reshape(variance, (channels,))
        scale, offset = layer._fused_scale_offset(mean, variance)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, epsilon=layer.epsilon, is_training=True
        )
    else:
        scale, offset = layer._fused_scale_offset(None, None)
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, epsilon=layer.epsilon, is_training=True
        )
        # The kernel returns the unbiased variance; Keras keeps the biased.
        count = tf.cast(tf.shape(x)[0], variance.dtype)
        variance = variance * ((count - 1.0) / tf.maximum(count, 1.0))
    layer._update_moving_statistics(mean, variance, count)
    return tf.reshape(y, tf.shape(inputs))


def fused_inference(layer, inputs):
    """`layer`'s inference call through TensorFlow's fused kernel."""
    import tensorflow as tf

    channels = layer._param_shape[0]
    x = tf.reshape(inputs, (-1, 1, 1, channels))
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
        type(layer)._fused_scale_offset
        is not BatchNormalization._fused_scale_offset
    )
