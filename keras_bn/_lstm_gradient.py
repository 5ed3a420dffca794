"""`BNLSTMCell`'s training loop with its gradient written out
(back-propagation through time).

Differentiating the loop makes the framework keep, step by step, every
intermediate the gradient of each op reads, and multiply `h^T dP` in every
step. Here the forward loop keeps only `h`, `c`, the normalized recurrent
product and the statistics; the backward loop recomputes the gates from
them, and the gradient of `W_h` is one matrix product over all steps after
it. The functions take tensors and plain values; nothing here knows a
layer.
"""

import functools

from keras import ops

from keras_bn import _scan
from keras_bn import _statistics


def train_lstm(inputs, states, weights, mask, recurrent_mask, epsilon,
               unroll, compile_loops):
    """The training recurrence of `BNLSTMCell`, with its gradient.

    `inputs` is the normalized input term, time-major `(steps, batch, 4 *
    units)`; `mask` `None` or `(steps, batch, 1)`. With `compile_loops`
    (TensorFlow), both loops run as XLA-compiled functions called from the
    graph. Returns the final states and `(hidden states, statistics)` as
    the generic loop does.
    """
    with_mask = mask is not None
    with_dropout = recurrent_mask is not None
    optional = [mask] if with_mask else []
    if with_dropout:
        optional.append(recurrent_mask)
    options = {
        "epsilon": epsilon, "with_mask": with_mask,
        "with_dropout": with_dropout, "unroll": unroll,
    }
    forward = functools.partial(_forward, **options)
    backward = functools.partial(_backward, **options)
    if compile_loops:
        forward = _scan.xla_function(forward)
        backward = _scan.xla_function(backward)

    @ops.custom_gradient
    def recurrence(*args):
        hs, cs, c_last, phats, stats = forward(*args)

        def grad(*upstream_args, upstream=None):
            upstream = upstream_args if upstream is None else upstream
            if len(upstream) == 1:
                # JAX hands over the outputs' gradients as one tuple.
                upstream = upstream[0]
            d_hs, d_c_last = upstream[0], upstream[1]
            if d_hs is None:
                d_hs = ops.zeros_like(hs)
            if d_c_last is None:
                d_c_last = ops.zeros_like(c_last)
            grads = backward(d_hs, d_c_last, hs, cs, phats, stats, *args)
            return tuple(grads) + tuple(
                _statistics.no_gradient(v) for v in args[7:]
            )

        return (hs, c_last, ops.stop_gradient(stats)), grad

    hs, c_last, stats = recurrence(
        inputs, states[0], states[1], weights["recurrent_kernel"],
        weights["recurrent_gamma"], weights["cell_gamma"],
        weights["cell_beta"], *optional,
    )
    return (hs[-1], c_last), (hs, stats)


def _moments(value, mask):
    mean, variance, count = _statistics.moments(value, [0], mask)
    return mean, variance, _statistics.step_count(count, mask)


def _forward(x, h0, c0, kernel, gamma_h, gamma_c, beta_c, *rest, epsilon,
             with_mask, with_dropout, unroll):
    dropout = rest[-1] if with_dropout else None
    units = h0.shape[-1]

    def step(carry, xs):
        h, c = carry
        m = xs[1] if with_mask else None
        product = ops.matmul(h if dropout is None else h * dropout, kernel)
        mean_p, variance_p, count = _moments(product, m)
        phat = (product - mean_p) * ops.rsqrt(variance_p + epsilon)
        i, f, g, o = ops.split(xs[0] + gamma_h * phat, 4, axis=-1)
        c_new = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        mean_c, variance_c, _ = _moments(c_new, m)
        chat = (c_new - mean_c) * ops.rsqrt(variance_c + epsilon)
        h_new = ops.sigmoid(o) * ops.tanh(chat * gamma_c + beta_c)
        if m is not None:
            h_new = ops.where(m > 0, h_new, h)
            c_new = ops.where(m > 0, c_new, c)
        stats = ops.concatenate(
            [mean_p[0], variance_p[0], count, mean_c[0], variance_c[0],
             count]
        )
        return (h_new, c_new), (h_new, c_new, phat, stats)

    xs = (x, rest[0]) if with_mask else (x,)
    like = (h0, c0, x[0], ops.zeros((10 * units + 2,), x.dtype))
    (_, c_last), (hs, cs, phats, stats) = _scan.scan(
        step, (h0, c0), xs, like, unroll
    )
    return hs, cs, c_last, phats, stats


def _backward(d_hs, d_c_last, hs, cs, phats, stats, x, h0, c0, kernel,
              gamma_h, gamma_c, beta_c, *rest, epsilon, with_mask,
              with_dropout, unroll):
    dropout = rest[-1] if with_dropout else None
    units = h0.shape[-1]
    h_prev = ops.concatenate([h0[None], hs[:-1]], axis=0)
    c_prev = ops.concatenate([c0[None], cs[:-1]], axis=0)
    step = functools.partial(
        _backward_step, kernel_t=ops.transpose(kernel), dropout=dropout,
        gamma_h=gamma_h, gamma_c=gamma_c, beta_c=beta_c, epsilon=epsilon,
        units=units, with_mask=with_mask,
    )
    xs = (d_hs, x, phats, cs, c_prev, stats) + (
        (rest[0],) if with_mask else ()
    )
    init = (ops.zeros_like(h0), d_c_last, ops.zeros_like(gamma_h),
            ops.zeros_like(gamma_c), ops.zeros_like(beta_c))
    (dh0, dc0, d_gamma_h, d_gamma_c, d_beta_c), (dzs, dps) = _scan.scan(
        step, init, xs, (x[0], x[0]), unroll, reverse=True
    )
    if dropout is not None:
        h_prev = h_prev * dropout
    d_kernel = ops.matmul(
        ops.transpose(ops.reshape(h_prev, (-1, units))),
        ops.reshape(dps, (-1, 4 * units)),
    )
    return dzs, dh0, dc0, d_kernel, d_gamma_h, d_gamma_c, d_beta_c


def _backward_step(carry, xs, kernel_t, dropout, gamma_h, gamma_c, beta_c,
                   epsilon, units, with_mask):
    dh, dc, d_gamma_h, d_gamma_c, d_beta_c = carry
    dh_up, x_t, phat, c, c_prev, st = xs[:6]
    m = xs[6] if with_mask else None
    # The forward step again, from what it kept.
    inv_p = ops.rsqrt(st[4 * units : 8 * units] + epsilon)
    inv_c = ops.rsqrt(st[9 * units + 1 : 10 * units + 1] + epsilon)
    # Masked rows hold the carried `c`, not the one normalized; their
    # gradients are zero, so it does not matter.
    chat = (c - st[8 * units + 1 : 9 * units + 1]) * inv_c
    zi, zf, zg, zo = ops.split(x_t + gamma_h * phat, 4, axis=-1)
    si, sf, so = ops.sigmoid(zi), ops.sigmoid(zf), ops.sigmoid(zo)
    tg = ops.tanh(zg)
    tn = ops.tanh(chat * gamma_c + beta_c)
    share = 1.0 / ops.maximum(st[10 * units + 1 :], 1.0)
    dh = dh + dh_up
    if m is not None:
        share = share * m
        dh_new, dc_new = dh * m, dc * m
    else:
        dh_new, dc_new = dh, dc
    # Batch normalization of the cell, then the cell update.
    dn = dh_new * so * (1.0 - tn * tn)
    # One reduction for both sums (and below): XLA on a CPU runs each
    # reduction as a kernel of its own.
    s1, s2 = ops.split(
        ops.sum(ops.concatenate([dn, dn * chat], axis=-1), axis=0), 2
    )
    dct = gamma_c * inv_c * (dn - (s1 + chat * s2) * share) + dc_new
    dz = ops.concatenate(
        [
            dct * tg * si * (1.0 - si),
            dct * c_prev * sf * (1.0 - sf),
            dct * si * (1.0 - tg * tg),
            dh_new * tn * so * (1.0 - so),
        ],
        axis=-1,
    )
    # Batch normalization of the recurrent product.
    q1, q2 = ops.split(
        ops.sum(ops.concatenate([dz, dz * phat], axis=-1), axis=0), 2
    )
    dp = gamma_h * inv_p * (dz - (q1 + phat * q2) * share)
    dh_prev = ops.matmul(dp, kernel_t)
    if dropout is not None:
        dh_prev = dh_prev * dropout
    dc_prev = dct * sf
    if m is not None:
        dh_prev = dh_prev + (dh - dh_new)
        dc_prev = dc_prev + (dc - dc_new)
    carry = (dh_prev, dc_prev, d_gamma_h + q2, d_gamma_c + s2,
             d_beta_c + s1)
    return carry, (dz, dp)
