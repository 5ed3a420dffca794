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
from typing import Any
from typing import NamedTuple

from keras import ops
from keras import tree

from keras_bn import _backend_ops
from keras_bn import _scan
from keras_bn import _statistics


class Weights(NamedTuple):
    """The weights the loop reads, as tensors."""

    recurrent_kernel: Any
    recurrent_gamma: Any
    cell_gamma: Any
    cell_beta: Any


def statistics_like(units, dtype):
    """The statistics of one step: `"recurrent"` and `"cell"` moments."""

    def moments(width):
        zeros = ops.zeros((width,), dtype)
        return _statistics.Moments(zeros, zeros, ops.zeros((1,), dtype))

    return {"recurrent": moments(4 * units), "cell": moments(units)}


def train_lstm(inputs, states, weights, optional, epsilon, unroll,
               compile_loops):
    """The training recurrence of `BNLSTMCell`, with its gradient.

    Args:
        inputs: The normalized input term, time-major `(steps, batch, 4 *
            units)`.
        states: The initial `[h, c]`.
        weights: `Weights`.
        optional: Dict of the optional inputs: `"mask"`, `(steps, batch,
            1)`, and `"dropout"`, the recurrent-dropout mask.
        epsilon: The layer's epsilon.
        unroll: Whether to run the steps as a Python loop.
        compile_loops: Whether both loops run as XLA-compiled functions
            called from the graph (TensorFlow).

    Returns:
        `(last_states, hidden, statistics)` as the generic loop returns
        them: the hidden states and the statistics of every step.
    """
    arguments = {
        "inputs": inputs, "h": states[0], "c": states[1],
        "weights": weights, "optional": optional,
    }
    forward = _loop(_forward, epsilon, unroll, compile_loops)
    backward = _loop(_backward, epsilon, unroll, compile_loops)

    # The one place where the arguments are flattened: a custom gradient
    # takes and returns tensors.
    @ops.custom_gradient
    def recurrence(*flat):
        args = tree.pack_sequence_as(arguments, list(flat))
        kept = forward(args)

        def grad(*upstream_args, upstream=None):
            upstream = upstream_args if upstream is None else upstream
            if len(upstream) == 1:
                # JAX hands over the outputs' gradients as one tuple.
                upstream = upstream[0]
            d_hidden, d_c_last = upstream[0], upstream[1]
            if d_hidden is None:
                d_hidden = ops.zeros_like(kept["hidden"])
            if d_c_last is None:
                d_c_last = ops.zeros_like(kept["c_last"])
            grads = backward(d_hidden, d_c_last, kept, args)
            grads["optional"] = {
                k: _backend_ops.no_gradient(v)
                for k, v in args["optional"].items()
            }
            return tuple(tree.flatten(grads))

        outputs = (
            kept["hidden"], kept["c_last"],
            ops.stop_gradient(kept["statistics"]),
        )
        return outputs, grad

    hidden, c_last, statistics = recurrence(*tree.flatten(arguments))
    like = statistics_like(states[0].shape[-1], inputs.dtype)
    return (hidden[-1], c_last), hidden, _scan.unpack(like, statistics)


@functools.cache
def _loop(function, epsilon, unroll, compiled):
    """`function` (`_forward` or `_backward`) with the layer's settings,
    XLA-compiled or not, made once per process: Keras traces a training
    function twice on TensorFlow (the optimizer builds its variables in
    the first trace), and the second finds the compiled loops traced."""
    loop = functools.partial(function, epsilon=epsilon, unroll=unroll)
    return _scan.xla_function(loop) if compiled else loop


def _forward(args, epsilon, unroll):
    """The forward loop: what the backward loop reads."""
    weights = args["weights"]
    dropout = args["optional"].get("dropout")
    h0, c0 = args["h"], args["c"]
    like = statistics_like(h0.shape[-1], h0.dtype)

    def step(carry, xs):
        h, c = carry
        m = xs.get("mask")
        if dropout is not None:
            h = h * dropout
        product = ops.matmul(h, weights.recurrent_kernel)
        recurrent = _statistics.step_moments(product, m)
        phat, _ = _statistics.standardize(product, recurrent, epsilon)
        i, f, g, o = ops.split(
            xs["inputs"] + weights.recurrent_gamma * phat, 4, axis=-1
        )
        c_new = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        cell = _statistics.step_moments(c_new, m)
        chat, _ = _statistics.standardize(c_new, cell, epsilon)
        h_new = ops.sigmoid(o) * ops.tanh(
            chat * weights.cell_gamma + weights.cell_beta
        )
        if m is not None:
            h_new = ops.where(m > 0, h_new, carry[0])
            c_new = ops.where(m > 0, c_new, c)
        stats = {"recurrent": _row(recurrent), "cell": _row(cell)}
        kept = {"hidden": h_new, "cell": c_new, "normalized": phat,
                "statistics": _scan.pack(stats)}
        return (h_new, c_new), kept

    xs = {"inputs": args["inputs"], **_mask(args)}
    kept_like = {"hidden": h0, "cell": c0, "normalized": args["inputs"][0],
                 "statistics": _scan.pack(like)}
    (_, c_last), kept = _scan.scan(step, (h0, c0), xs, kept_like, unroll)
    return {**kept, "c_last": c_last}


def _row(moments):
    """A step's moments as vectors."""
    return _statistics.Moments(moments.mean[0], moments.variance[0],
                               moments.count)


def _mask(args):
    mask = args["optional"].get("mask")
    return {} if mask is None else {"mask": mask}


def _backward(d_hidden, d_c_last, kept, args, epsilon, unroll):
    """The backward loop, then the gradient of `W_h`: the gradients of
    `args` but its optional inputs."""
    weights = args["weights"]
    dropout = args["optional"].get("dropout")
    h0, c0 = args["h"], args["c"]
    units = h0.shape[-1]
    step = functools.partial(
        _backward_step, weights=weights,
        kernel_t=ops.transpose(weights.recurrent_kernel), dropout=dropout,
        epsilon=epsilon, like=statistics_like(units, h0.dtype),
    )
    xs = {
        "d_hidden": d_hidden, "inputs": args["inputs"],
        "normalized": kept["normalized"], "cell": kept["cell"],
        "cell_before": ops.concatenate([c0[None], kept["cell"][:-1]], 0),
        "statistics": kept["statistics"], **_mask(args),
    }
    init = {
        "dh": ops.zeros_like(h0), "dc": d_c_last,
        "recurrent_gamma": ops.zeros_like(weights.recurrent_gamma),
        "cell_gamma": ops.zeros_like(weights.cell_gamma),
        "cell_beta": ops.zeros_like(weights.cell_beta),
    }
    outputs_like = {"inputs": args["inputs"][0],
                    "product": args["inputs"][0]}
    last, d = _scan.scan(step, init, xs, outputs_like, unroll, reverse=True)
    h_before = ops.concatenate([h0[None], kept["hidden"][:-1]], axis=0)
    if dropout is not None:
        h_before = h_before * dropout
    d_kernel = ops.matmul(
        ops.transpose(ops.reshape(h_before, (-1, units))),
        ops.reshape(d["product"], (-1, 4 * units)),
    )
    return {
        "inputs": d["inputs"], "h": last["dh"], "c": last["dc"],
        "weights": Weights(d_kernel, last["recurrent_gamma"],
                           last["cell_gamma"], last["cell_beta"]),
    }


def _backward_step(carry, xs, weights, kernel_t, dropout, epsilon, like):
    """One step back: the gradients of the step's inputs, its states and
    (summed in the carry) the gammas and beta."""
    m = xs.get("mask")
    stats = _scan.unpack(like, xs["statistics"])
    recurrent, cell = stats["recurrent"], stats["cell"]
    phat = xs["normalized"]
    # The forward step again, from what it kept. Masked rows hold the
    # carried `c`, not the one normalized; their gradients are zero, so it
    # does not matter.
    chat, inv_c = _statistics.standardize(xs["cell"], cell, epsilon)
    zi, zf, zg, zo = ops.split(
        xs["inputs"] + weights.recurrent_gamma * phat, 4, axis=-1
    )
    si, sf, so = ops.sigmoid(zi), ops.sigmoid(zf), ops.sigmoid(zo)
    tg = ops.tanh(zg)
    tn = ops.tanh(chat * weights.cell_gamma + weights.cell_beta)
    dh = carry["dh"] + xs["d_hidden"]
    dc = carry["dc"]
    if m is not None:
        dh_new, dc_new = dh * m, dc * m
    else:
        dh_new, dc_new = dh, dc
    # Batch normalization of the cell, then the cell update.
    dct, d_cell_gamma, d_cell_beta = _statistics.standardize_grad(
        dh_new * so * (1.0 - tn * tn), chat, inv_c, cell.count, m,
        weights.cell_gamma,
    )
    dct = dct + dc_new
    dz = ops.concatenate(
        [
            dct * tg * si * (1.0 - si),
            dct * xs["cell_before"] * sf * (1.0 - sf),
            dct * si * (1.0 - tg * tg),
            dh_new * tn * so * (1.0 - so),
        ],
        axis=-1,
    )
    # Batch normalization of the recurrent product.
    dp, d_recurrent_gamma, _ = _statistics.standardize_grad(
        dz, phat, ops.rsqrt(recurrent.variance + epsilon), recurrent.count,
        m, weights.recurrent_gamma,
    )
    dh_prev = ops.matmul(dp, kernel_t)
    if dropout is not None:
        dh_prev = dh_prev * dropout
    dc_prev = dct * sf
    if m is not None:
        dh_prev = dh_prev + (dh - dh_new)
        dc_prev = dc_prev + (dc - dc_new)
    carry = {
        "dh": dh_prev, "dc": dc_prev,
        "recurrent_gamma": carry["recurrent_gamma"] + d_recurrent_gamma,
        "cell_gamma": carry["cell_gamma"] + d_cell_gamma,
        "cell_beta": carry["cell_beta"] + d_cell_beta,
    }
    return carry, {"inputs": dz, "product": dp}
