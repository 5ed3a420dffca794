"""The recurrent layers' loop, one `scan` per backend, and the other
backend-specific pieces of `BNLSTM` and `BNGRU`.

`scan` is `keras.ops.scan` whose TensorFlow loop also compiles with XLA,
and whose TensorFlow and JAX loops read each step's slices of `xs` in the
step before. Everything here takes tensors and plain values; nothing knows
a layer.
"""

import keras
from keras import ops

from keras_bn import _dispatch


def scan(step, init, xs, outputs_like, unroll=False, reverse=False):
    """Runs `step` over the leading axis of `xs`.

    `step(carry, xs_t)` returns the new carry and the step's outputs,
    shaped like `outputs_like`; `init`, `xs` and `outputs_like` are tuples.
    TensorFlow's gradient of a loop needs `maximum_iterations` under XLA,
    which the TensorFlow `keras.ops.scan` does not set; this sets it, as
    the TensorFlow backend's `rnn` does. With `unroll=True` the steps run
    as a Python loop (the number of steps must be known). With
    `reverse=True` the steps run from the last, and the outputs keep the
    order of `xs`.

    Returns:
        `(last_carry, outputs)`, the outputs stacked over the steps.
    """
    if unroll:
        return _scan_unrolled(step, init, xs, reverse)
    backend = keras.backend.backend()
    if backend == "jax":
        return _scan_jax(step, init, xs, reverse)
    if backend == "tensorflow":
        return _scan_tensorflow(step, init, xs, outputs_like, reverse)
    return ops.scan(step, init, xs, reverse=reverse)


def _scan_unrolled(step, init, xs, reverse):
    carry, ys = init, []
    order = range(xs[0].shape[0])
    for t in reversed(order) if reverse else order:
        carry, y = step(carry, tuple(x[t] for x in xs))
        ys.append(y)
    if reverse:
        ys.reverse()
    return tuple(carry), tuple(ops.stack(y, axis=0) for y in zip(*ys))


def _scan_jax(step, init, xs, reverse):
    """`keras.ops.scan` with each step's slices read in the step before.

    Each step's inputs are read in the step before and carried, so that
    XLA copies them out of the sequence instead of fusing the read into
    the step's element-wise ops. The scan runs over `xs` shifted by one
    step, the step past the end repeated.
    """
    if reverse:
        first = tuple(x[-1] for x in xs)
        following = tuple(ops.concatenate([x[:1], x[:-1]]) for x in xs)
    else:
        first = tuple(x[0] for x in xs)
        following = tuple(ops.concatenate([x[1:], x[-1:]]) for x in xs)

    def carried_step(carry, following):
        carry, current = carry
        carry, ys = step(carry, current)
        return (carry, following), ys

    (carry, _), ys = ops.scan(
        carried_step, (tuple(init), first), following, reverse=reverse
    )
    return carry, ys


def _scan_tensorflow(step, init, xs, outputs_like, reverse):
    """A `tf.while_loop` over `TensorArray`s, `maximum_iterations` set."""
    import tensorflow as tf

    steps = xs[0].shape[0] or tf.shape(xs[0])[0]
    inputs = [
        tf.TensorArray(
            x.dtype, size=steps, element_shape=x.shape[1:],
            # The step after the last reads the last step again.
            clear_after_read=False,
        ).unstack(x)
        for x in xs
    ]
    outputs = [
        tf.TensorArray(o.dtype, size=steps, element_shape=o.shape)
        for o in outputs_like
    ]

    def position(t):
        return steps - 1 - t if reverse else t

    def read(t):
        # The read after the last step is of a step that exists.
        index = tf.clip_by_value(position(t), 0, steps - 1)
        return [a.read(index) for a in inputs]

    def body(t, carry, current, outputs):
        index = position(t)
        carry, ys = step(tuple(carry), tuple(current))
        outputs = [o.write(index, y) for o, y in zip(outputs, ys)]
        # The next step's inputs are read here and carried over: XLA then
        # copies each out of its sequence, where a read in the step would
        # fuse into the step's element-wise ops, which it slows on a CPU
        # (docs/recurrent.md).
        return t + 1, list(carry), read(t + 1), outputs

    _, carry, _, outputs = tf.while_loop(
        lambda t, *_: t < steps,
        body,
        (0, list(init), read(0), outputs),
        maximum_iterations=steps,
        swap_memory=True,
        # As the TensorFlow backend's `rnn`.
        parallel_iterations=32,
    )
    return tuple(carry), tuple(o.stack() for o in outputs)


def compile_input_term():
    """Whether a training call runs its input term through XLA
    (`_dispatch.choose_recurrent_input` decides)."""
    backend = keras.backend.backend()
    on_tensorflow = backend == "tensorflow"
    if on_tensorflow:
        import tensorflow as tf
    path = _dispatch.choose_recurrent_input(
        backend,
        _dispatch.device() if on_tensorflow else None,
        on_tensorflow and tf.executing_eagerly(),
        on_tensorflow and _dispatch.xla_compiling(),
    )
    return path.name == _dispatch.XLA


def xla_function(function):
    """`function` as an XLA-compiled TensorFlow function, called from an
    ordinary graph (only where `compile_input_term` says so)."""
    import tensorflow as tf

    return tf.function(function, jit_compile=True, autograph=False)


def run_steps(step, inputs, states, mask, population, width, unroll):
    """The generic loop of a recurrent cell over time-major `inputs`.

    `step(inputs_t, states, population_t, mask_t)` returns the new states
    and, in training (`population is None`), the step's statistics as a
    list of vectors, concatenated into one of `width`. Masked examples
    carry their states through. Returns `(last_states, (hidden,
    statistics))`, or `(last_states, (hidden,))` in inference.
    """
    time_major = [inputs]
    if mask is not None:
        time_major.append(mask)
    if population is not None:
        for pair in population:
            time_major.extend(pair)
    pairs = 0 if population is None else len(population)

    def body(carry, xs):
        xs = list(xs)
        inputs_t = xs.pop(0)
        mask_t = xs.pop(0) if mask is not None else None
        old = list(carry)
        population_t = None
        if population is not None:
            population_t = [
                tuple(xs[i : i + 2]) for i in range(0, 2 * pairs, 2)
            ]
        new, stats = step(inputs_t, old, population_t, mask_t)
        if mask_t is not None:
            new = [ops.where(mask_t > 0, n, o) for n, o in zip(new, old)]
        if population is not None:
            return tuple(new), (new[0],)
        # One output for all statistics: every output of the loop costs a
        # stack of its own in the gradient.
        stats = ops.stop_gradient(ops.concatenate(stats))
        return tuple(new), (new[0], stats)

    outputs_like = [states[0]]
    if population is None:
        outputs_like.append(ops.zeros((width,), inputs.dtype))
    return scan(
        body, tuple(states), tuple(time_major), tuple(outputs_like), unroll
    )
