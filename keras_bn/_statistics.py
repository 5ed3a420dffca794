"""Batch statistics shared by every keras_bn layer.

This is the only place where keras_bn computes moments, combines them
across ghost batches and replicas, and updates moving averages. The layers
call these functions; none of them repeats this math.

Conventions:

- Statistics are computed in float32 or wider (`statistics_dtype`), whatever
  the layer's compute dtype, and variances are clamped at zero.
- Moments are kept with `keepdims=True` so they broadcast against the input.
- `count` is the number of elements that contributed to each statistic;
  a statistic with `count == 0` (an all-masked or empty batch) is zero and is
  never written into a moving average.
"""

import math
from typing import Any
from typing import NamedTuple

import numpy as np
from keras import backend
from keras import ops
from keras import tree

from keras_bn import _backend_ops
from keras_bn import _replicas


class Moments(NamedTuple):
    """A term's batch mean, biased variance and the number of elements
    behind them: a pytree, as the recurrent loops pass them."""

    mean: Any
    variance: Any
    count: Any


class Normalized(NamedTuple):
    """What a training kernel returns: the normalized output, like the
    input, and the batch's `Moments`, `keepdims` against the input."""

    outputs: Any
    moments: Moments


class Population(NamedTuple):
    """The population statistics a term is normalized with in inference."""

    mean: Any
    variance: Any


def statistics_dtype(dtype):
    """The dtype statistics are computed in: float32 or wider.

    Not `backend.result_type(dtype, "float32")`: on the torch backend that
    gives float32 for float64 (Keras follows JAX's default of no 64-bit
    types there), which would compute float64 layers' statistics in
    float32.
    """
    dtype = backend.standardize_dtype(dtype)
    return "float64" if dtype == "float64" else "float32"


def cast(x, dtype):
    """`ops.cast(x, dtype)`, or `x` itself when it has that dtype already
    (which keeps a traced graph and its gradient shorter)."""
    if backend.standardize_dtype(x.dtype) == dtype:
        return x
    return ops.cast(x, dtype)


def in_statistics_dtype(x):
    """`x` cast to its `statistics_dtype` (float32 or float64)."""
    return cast(x, statistics_dtype(x.dtype))


def _element_count(x, axes):
    """Number of elements of `x` along `axes`, as a float scalar tensor."""
    sizes = [x.shape[axis] for axis in axes]
    if None not in sizes:
        return ops.convert_to_tensor(float(math.prod(sizes)), dtype=x.dtype)
    shape = ops.shape(x)
    count = ops.convert_to_tensor(1.0, dtype=x.dtype)
    for axis in axes:
        count = count * ops.cast(shape[axis], x.dtype)
    return count


def moments(x, axes, mask=None, synchronized=False, positions=1):
    """Mean, biased variance and element count of `x` over `axes`.

    Two passes (mean, then mean squared deviation), which keeps float32
    accurate when the mean is large against the standard deviation. With
    `synchronized=True` under `tf.distribute` or `torch.distributed`
    (`_replicas.replica_context`), each pass is reduced across replicas,
    so every replica gets the statistics of the global batch.

    Args:
        x: Tensor, already in `statistics_dtype`.
        axes: List of the axes to reduce.
        mask: Optional tensor broadcastable to `x`; elements where it is zero
            are left out of the statistics.
        synchronized: Whether to reduce across replicas.
        positions: For a wide view (`fold_positions`), a `(rows,
            positions * channels)` tensor reduced over `axes=[0]` without
            a mask or synchronization: the statistics are per channel,
            `(1, channels)`.

    Returns:
        `(mean, variance, count)`, each with `keepdims=True`; `count` is a
        scalar when there is no mask.
    """
    ctx = _replicas.replica_context() if synchronized else None
    if mask is None and ctx is None:
        # Sums over the count, not `ops.mean`: Keras 3.15's torch `mean`
        # accumulates float64 in float32, and under XLA `ops.mean` measured
        # less accurate for a large mean against a small spread.
        count = _element_count(x, axes)
        if positions != 1:
            count = count * positions
        mean = _column_sums(x, axes, positions) / count
        spread_mean = ops.stop_gradient(spread_positions(mean, positions))
        squares = fold_positions(
            squared_deviations(x, spread_mean, None, axes), positions
        )
        return mean, nonnegative(squares / count), count
    if positions != 1:
        raise ValueError(
            "A wide view's statistics take no mask and no synchronization. "
            f"Received: positions={positions!r}"
        )

    if mask is None:
        total = ops.sum(x, axis=axes, keepdims=True)
        count = _element_count(x, axes)
    else:
        mask = ops.cast(mask, x.dtype)
        total = ops.sum(x * mask, axis=axes, keepdims=True)
        count = ops.sum(
            ops.broadcast_to(mask, ops.shape(x)), axis=axes, keepdims=True
        )
    if ctx is not None:
        total, count = _replicas.cross_replica_sum([total, count])
    safe_count = at_least(count, 1.0)
    mean = total / safe_count

    squares = squared_deviations(x, ops.stop_gradient(mean), mask, axes)
    if ctx is not None:
        (squares,) = _replicas.cross_replica_sum([squares])
    variance = nonnegative(squares / safe_count)
    return mean, variance, count


def squared_deviations(x, mean, mask, axes):
    """`sum(mask * (x - mean)**2)` over `axes`, `keepdims=True`; `mean` is
    a constant to the gradient (the statistics' own share of it is
    zero)."""
    deviation = _backend_ops.squared_difference(x, mean)
    if mask is not None:
        deviation = deviation * mask
    return ops.sum(deviation, axis=axes, keepdims=True)


def ghost_split(x, mask, virtual_batch_size):
    """Splits the batch axis into ghost batches of `virtual_batch_size`.

    A batch that does not divide evenly is padded with masked-out examples,
    so that its remainder forms a last, smaller ghost batch.

    Args:
        x: Tensor whose first axis is the batch.
        mask: `None` or a tensor of the rank of `x`, broadcastable to it.
        virtual_batch_size: Python int.

    Returns:
        `(x, mask)` with a new leading ghost axis: `x` has shape
        `(num_ghosts, virtual_batch_size) + x.shape[1:]` and `mask`, when not
        `None`, is broadcastable to it.
    """
    batch = ops.shape(x)[0]
    if mask is not None:
        mask = ops.cast(mask, x.dtype)
        mask = ops.broadcast_to(mask, (batch,) + tuple(ops.shape(mask)[1:]))
    if x.shape[0] is None or x.shape[0] % virtual_batch_size:
        pad = (-batch) % virtual_batch_size
        if mask is None:
            mask = ops.ones((batch,) + (1,) * (len(x.shape) - 1), x.dtype)
        x = _pad_batch(x, pad)
        mask = _pad_batch(mask, pad)
    x = _split_batch(x, virtual_batch_size)
    if mask is not None:
        mask = _split_batch(mask, virtual_batch_size)
    return x, mask


def _pad_batch(x, pad):
    zeros = ops.zeros((pad,) + tuple(ops.shape(x)[1:]), x.dtype)
    return ops.concatenate([x, zeros], axis=0)


def _split_batch(x, size):
    return ops.reshape(x, (-1, size) + tuple(ops.shape(x)[1:]))


def ghost_merge(y, batch_size):
    """Inverse of `ghost_split`: back to one batch axis, padding dropped."""
    y = ops.reshape(y, (-1,) + tuple(ops.shape(y)[2:]))
    return y[:batch_size]


def combine_ghosts(mean, variance, count, synchronized=False):
    """Statistics for the moving averages from per-ghost-batch statistics.

    The moving averages are updated once per step with the equal-weight mean
    of the statistics of the ghost batches that counted any element (over all
    replicas when `synchronized`).

    Args:
        mean, variance, count: Per-ghost statistics from `moments`, with the
            ghost axis first.
        synchronized: Whether to average across replicas.

    Returns:
        `(mean, variance, valid)` without the ghost axis; `valid` holds the
        number of ghost batches that contributed.
    """
    valid = ops.cast(ops.greater(count, 0.0), mean.dtype)
    valid = ops.broadcast_to(valid, ops.shape(mean))
    sums = [
        ops.sum(mean * valid, axis=0),
        ops.sum(variance * valid, axis=0),
        ops.sum(valid, axis=0),
    ]
    if synchronized:
        sums = _replicas.cross_replica_sum(sums)
    mean_sum, variance_sum, valid = sums
    safe = at_least(valid, 1.0)
    return mean_sum / safe, variance_sum / safe, valid


def assign_moving_average(variable, value, decay, valid):
    """`variable = variable * decay + value * (1 - decay)` where `valid`.

    Elements whose `valid` is zero, or whose new value is not finite, keep
    their old value: an empty or all-masked batch never writes into the
    moving statistics.
    """
    old = cast(variable.value, backend.standardize_dtype(value.dtype))
    new = old * decay + value * (1.0 - decay)
    update = ops.logical_and(ops.greater(valid, 0), ops.isfinite(new))
    variable.assign(
        cast(ops.where(update, new, old), variable.dtype)
    )


def bias_corrected_decay(momentum, updates):
    """The decay that makes `assign_moving_average` bias-corrected.

    Updating with `decay = momentum * (1 - momentum**n) / (1 -
    momentum**(n + 1))`, where `n` counts the earlier updates, keeps the
    moving value after `N` updates at

        sum_k (1 - momentum) * momentum**(N - k) * value_k / (1 - momentum**N)

    (Adam's bias-corrected average): the first update replaces the initial
    value, and the weights of the values seen so far always sum to one.

    Args:
        momentum: Python float in `[0, 1)`.
        updates: Float tensor, the number of earlier updates `n`.
    """
    power = ops.power(ops.cast(momentum, updates.dtype), updates)
    return momentum * (1.0 - power) / (1.0 - power * momentum)


def combine_steps(mean, variance, count, num_slots, first_step=None):
    """Per-step statistics gathered into `num_slots` slots, one per step.

    Step `t` goes to slot `min(first_step + t, num_slots - 1)`, so the last
    slot also receives every later step. A slot gets the equal-weight mean
    of the statistics of its steps that counted any element; the
    statistics of a slot without one (`valid` zero) are not to be used.

    Args:
        mean, variance: Tensors of shape `(steps, features)`.
        count: Tensor broadcastable to `(steps, 1)`, the elements behind each
            step's statistics.
        num_slots: Python int.
        first_step: `None` (0) or an integer scalar tensor, the index of
            the first step in its stream.

    Returns:
        `(mean, variance, valid)`: `(num_slots, features)` statistics and,
        of shape `(num_slots, 1)`, the number of steps that contributed.
    """
    steps = ops.shape(mean)[0]
    valid = ops.cast(ops.greater(count, 0.0), mean.dtype)
    valid = ops.broadcast_to(ops.reshape(valid, (-1, 1)), (steps, 1))
    if first_step is None and isinstance(steps, int) and steps <= num_slots:
        # Step `t` is slot `t`'s only step: the statistics as they are
        # (`valid` keeps an empty step's out of the moving statistics),
        # the slots after the last step empty.
        combined = (mean, variance, valid)
        if steps < num_slots:
            rows = [[0, num_slots - steps], [0, 0]]
            combined = tuple(ops.pad(v, rows) for v in combined)
        return combined
    index = ops.arange(steps, dtype="int32")
    if first_step is not None:
        index = index + ops.cast(first_step, "int32")
    slots = ops.minimum(index, num_slots - 1)
    # (slots, steps): which steps each slot averages.
    weights = ops.transpose(ops.one_hot(slots, num_slots, dtype=mean.dtype))
    weights = weights * ops.transpose(valid)
    valid = ops.sum(weights, axis=1, keepdims=True)
    safe = at_least(valid, 1.0)
    return (
        ops.matmul(weights, mean) / safe,
        ops.matmul(weights, variance) / safe,
        valid,
    )


def affine(mean, variance, epsilon, gamma=None, beta=None):
    """`(scale, offset)` such that batch normalization is `x * scale + offset`.

        scale = gamma / sqrt(variance + epsilon)
        offset = beta - mean * scale

    `gamma` and `beta` may be `None` (1 and 0); every argument broadcasts
    against the others. NumPy arguments give NumPy results in their own
    precision (the folding tool works in float64).
    """
    if _math(variance) is np:
        scale = 1.0 / np.sqrt(variance + epsilon)
    else:
        scale = ops.rsqrt(variance + epsilon)
    if gamma is not None:
        scale = scale * gamma
    if beta is None:
        return scale, -mean * scale
    return scale, beta - mean * scale


def normalize_grad(
    dy, x, mean, variance, count, mask, scale, axes, epsilon, positions=1
):
    """Gradient of batch normalization with the batch's own statistics.

    For `y = x_hat * scale + offset`, `x_hat = (x - mean) / sqrt(variance +
    epsilon)` and the (masked) mean and biased variance of `x` over `axes`
    from `count` elements: the classic closed form, in which the
    statistics' share reaches only the elements that counted. Every
    output, counted or not, depends on the statistics, so the sums run
    over all of them. For a wide view (`positions > 1`, see `moments`)
    `mean`, `variance` and `scale` are per channel, as are the sums.

    Returns:
        `(dx, dscale, doffset)`, the last two summed over `axes` with
        `keepdims=True`.
    """
    inv_std, _ = affine(mean, variance, epsilon)
    centered = x - spread_positions(mean, positions)
    doffset = _column_sums(dy, axes, positions)
    # sum(dy * x_hat), x_hat = centered * inv_std.
    dscale = inv_std * _column_sums(dy * centered, axes, positions)
    # dx = a * (dy - (doffset + x_hat * dscale) / count), the share masked,
    # as per-channel coefficients of dy, the centered x and 1: each is one
    # pass over the data for TensorFlow's element-wise ops, which do not
    # fuse.
    a = scale * inv_std
    share = a / at_least(count, 1.0)
    x_term = centered * spread_positions(
        -share * dscale * inv_std, positions
    ) - spread_positions(share * doffset, positions)
    if mask is not None:
        x_term = x_term * mask
    return dy * spread_positions(a, positions) + x_term, dscale, doffset


def fold_positions(sums, positions):
    """Per-channel sums from the column sums of a wide view.

    A wide view of a `(rows, channels)` tensor puts `positions` rows side
    by side, `(rows / positions, positions * channels)`: with few channels
    each row is long enough for the CPU's vector units. Its column sums
    `(1, positions * channels)` fold into `(1, channels)`.
    """
    if positions == 1:
        return sums
    channels = sums.shape[-1] // positions
    return ops.sum(
        ops.reshape(sums, (positions, channels)), axis=0, keepdims=True
    )


def spread_positions(value, positions):
    """A `(1, channels)` value repeated for every position of a wide view
    (`fold_positions`)."""
    if positions == 1:
        return value
    return ops.tile(value, (1, positions))


def _column_sums(x, axes, positions):
    return fold_positions(ops.sum(x, axis=axes, keepdims=True), positions)


def cumulative_decay(updates):
    """`n / (n + 1)`: the decay that keeps an equal-weight running average.

    Updating with it after `n` earlier updates (a float tensor) makes the
    moving value the plain mean of every value seen, the first included.
    """
    return updates / (updates + 1.0)


def biased_variance(unbiased, count):
    """The biased variance from the unbiased one over `count` elements (a
    tensor, or a Python number)."""
    if isinstance(count, (int, float)):
        return unbiased * ((count - 1.0) / max(count, 1.0))
    return unbiased * ((count - 1.0) / at_least(count, 1.0))


def stddev(variance, epsilon):
    """`sqrt(variance + epsilon)`, the standard deviation batch
    renormalization keeps."""
    return _math(variance).sqrt(variance + epsilon)


def variance_from_stddev(stddev, epsilon):
    """Inverse of `stddev`, clamped at zero: `max(stddev**2 - epsilon, 0)`."""
    xp = _math(stddev)
    variance = xp.square(stddev) - epsilon
    return np.maximum(variance, 0.0) if xp is np else nonnegative(variance)


def nonnegative(x):
    """`maximum(x, 0)` in `x`'s dtype, one op (`relu`) on every backend."""
    return ops.relu(x)


def at_least(x, floor):
    """`maximum(x, floor)` in `x`'s dtype.

    Keras 3.15's torch `ops.maximum` and `ops.minimum` return float32 for
    float64 tensors; `ops.clip` keeps the dtype on every backend.
    """
    return ops.clip(x, floor, math.inf)


def at_most(x, ceiling):
    """`minimum(x, ceiling)` in `x`'s dtype (see `at_least`)."""
    return ops.clip(x, -math.inf, ceiling)


def _math(x):
    """NumPy for NumPy arrays (kept in their precision), else `keras.ops`."""
    return np if isinstance(x, (np.ndarray, np.generic)) else ops


def step_count(count, mask):
    """The elements behind a recurrent step's statistics, flattened (with a
    mask `moments` counts each feature; all count the same examples)."""
    if mask is not None:
        count = count[..., :1]
    return ops.reshape(count, (-1,))


def step_moments(value, mask):
    """The batch `Moments` of one step of a recurrent layer (axis 0), the
    mean and variance `(1, features)`, the count `(1,)`."""
    mean, variance, count = moments(value, [0], mask)
    return Moments(mean, variance, step_count(count, mask))


def standardize(value, step, epsilon):
    """`(value - mean) / sqrt(variance + epsilon)` for the `Moments` of a
    step, and `1 / sqrt(variance + epsilon)`."""
    inv_std = ops.rsqrt(step.variance + epsilon)
    return (value - step.mean) * inv_std, inv_std


def standardize_grad(dy, x_hat, inv_std, count, mask, gamma):
    """Gradient of `x_hat * gamma + beta`, `x_hat = standardize(x)` with
    the batch's own statistics over axis 0 (the recurrent layers' steps).

    The closed form, in which the statistics' share reaches only the
    elements that counted (`mask`, `(batch, 1)`, or `None`); every output
    depends on the statistics, so the sums run over all of them.

    Returns:
        `(dx, dgamma, dbeta)`, the last two vectors.
    """
    # One reduction for both sums: XLA on a CPU runs each reduction as a
    # kernel of its own.
    dbeta, dgamma = ops.split(
        ops.sum(ops.concatenate([dy, dy * x_hat], axis=-1), axis=0), 2
    )
    share = 1.0 / at_least(count, 1.0)
    if mask is not None:
        share = share * mask
    dx = gamma * inv_std * (dy - (dbeta + x_hat * dgamma) * share)
    return dx, dgamma, dbeta


def normalize_step(value, gamma, beta, mask, epsilon):
    """One step of a recurrent layer normalized over the batch (axis 0),
    `standardize(value) * gamma + beta` (as `value * scale + offset`),
    with `standardize_grad` as its gradient (which takes fewer ops per step
    than differentiating the statistics).

    `beta` may be `None`. Returns the normalized value and the step's
    `Moments`, as vectors.
    """
    step = step_moments(ops.stop_gradient(value), mask)
    # Every tensor the gradient reads is an argument: JAX does not let a
    # custom gradient close over the values of the loop it runs in.
    arguments = {"value": value, "gamma": gamma, "step": step}
    if beta is not None:
        arguments["beta"] = beta
    if mask is not None:
        arguments["mask"] = mask

    @ops.custom_gradient
    def normalize(*flat):
        args = tree.pack_sequence_as(arguments, list(flat))
        step = args["step"]
        scale, offset = affine(
            step.mean, step.variance, epsilon, args["gamma"], args.get("beta")
        )

        def grad(*upstream_args, upstream=None):
            dy = upstream_args[0] if upstream is None else upstream
            x_hat, inv_std = standardize(args["value"], step, epsilon)
            dx, dgamma, dbeta = standardize_grad(
                dy, x_hat, inv_std, args["step"].count, args.get("mask"),
                args["gamma"],
            )
            grads = tree.map_structure(_backend_ops.no_gradient, args)
            grads.update(value=dx, gamma=dgamma)
            if "beta" in args:
                grads["beta"] = dbeta
            return tuple(tree.flatten(grads))

        return args["value"] * scale + offset, grad

    normalized = normalize(*tree.flatten(arguments))
    return normalized, Moments(step.mean[0], step.variance[0], step.count)
