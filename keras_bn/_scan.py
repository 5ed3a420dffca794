"""The recurrent layers' loop, one `scan` per backend, and the other
backend-specific pieces of `BNLSTM` and `BNGRU`.

`scan` is `keras.ops.scan` whose TensorFlow loop also compiles with XLA,
and whose TensorFlow and JAX loops read each step's slices of `xs` in the
step before. Everything here takes tensors and plain values; nothing knows
a layer.
"""

import keras
from keras import ops
from keras import tree

from keras_bn import _dispatch
from keras_bn import _recurrent_paths


def scan(step, init, xs, outputs_like, unroll=False, reverse=False):
    """Runs `step` over the leading axis of `xs`.

    `step(carry, xs_t)` returns the new carry and the step's outputs,
    shaped like `outputs_like`; `init`, `xs` and `outputs_like` are
    structures of tensors (tuples, dicts, NamedTuples), flattened here and
    packed again for `step` and for the result. TensorFlow's gradient of a
    loop needs `maximum_iterations` under XLA, which the TensorFlow
    `keras.ops.scan` does not set; this sets it, as the TensorFlow
    backend's `rnn` does. With `unroll=True` the steps run as a Python loop
    (the number of steps must be known). With `reverse=True` the steps run
    from the last, and the outputs keep the order of `xs`.

    Returns:
        `(last_carry, outputs)`, the outputs stacked over the steps.
    """

    backend = keras.backend.backend()
    if unroll or backend == "torch":
        # The torch backend's `keras.ops.scan` is a Python loop too, which
        # packs and flattens the structures again at every step.
        return _scan_python(step, init, xs, outputs_like, reverse)

    def flat_step(carry, xs_t):
        carry, ys = step(
            tree.pack_sequence_as(init, carry),
            tree.pack_sequence_as(xs, xs_t),
        )
        return tuple(tree.flatten(carry)), tuple(tree.flatten(ys))

    flat = (
        flat_step, tuple(tree.flatten(init)), tuple(tree.flatten(xs))
    )
    if backend == "jax":
        carry, ys = _scan_jax(*flat, reverse)
    elif backend == "tensorflow":
        carry, ys = _scan_tensorflow(
            *flat, tuple(tree.flatten(outputs_like)), reverse
        )
    else:
        carry, ys = ops.scan(*flat, reverse=reverse)
    return (
        tree.pack_sequence_as(init, list(carry)),
        tree.pack_sequence_as(outputs_like, list(ys)),
    )


def pack(structure):
    """The vectors (or rows of vectors) of `structure` as one tensor,
    concatenated along the last axis (`unpack` undoes it).

    A loop's statistics leave it as one output: every output of a loop
    costs a stack of its own in the gradient.
    """
    return ops.concatenate(tree.flatten(structure), axis=-1)


def unpack(like, packed):
    """`packed` (from `pack`) split back into the structure of `like`."""
    sizes = [v.shape[-1] for v in tree.flatten(like)]
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    return tree.pack_sequence_as(like, ops.split(packed, ends, axis=-1))


def _scan_python(step, init, xs, outputs_like, reverse):
    """The steps as a Python loop over the structures (the number of steps
    known); the outputs stacked once, after it."""
    flat_xs = tree.flatten(xs)
    carry, ys = init, []
    order = range(flat_xs[0].shape[0])
    for t in reversed(order) if reverse else order:
        carry, y = step(
            carry, tree.pack_sequence_as(xs, [x[t] for x in flat_xs])
        )
        ys.append(tree.flatten(y))
    if reverse:
        ys.reverse()
    stacked = [ops.stack(y, axis=0) for y in zip(*ys)]
    return carry, tree.pack_sequence_as(outputs_like, stacked)


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


def compile_written_loops():
    """Whether `BNLSTM`'s written training loops run as XLA-compiled
    functions (`_recurrent_paths.choose_loop_compilation` decides)."""
    backend = keras.backend.backend()
    on_tensorflow = backend == "tensorflow"
    if on_tensorflow:
        import tensorflow as tf
    path = _recurrent_paths.choose_loop_compilation(
        backend,
        _dispatch.device() if on_tensorflow else None,
        on_tensorflow and tf.executing_eagerly(),
        on_tensorflow and _dispatch.xla_compiling(),
    )
    return path.name == _dispatch.XLA


def xla_function(function):
    """`function` as an XLA-compiled TensorFlow function, called from an
    ordinary graph (only where `compile_written_loops` says so)."""
    import tensorflow as tf

    return tf.function(function, jit_compile=True, autograph=False)


def run_steps(step, inputs, states, mask, population, statistics_like,
              unroll):
    """The generic loop of a recurrent cell over time-major `inputs`.

    `step(inputs_t, states, population_t, mask_t)` returns the new states
    and, in training (`population is None`), the step's statistics, a
    structure like `statistics_like`; `population` is `None` or a
    structure of time-major tensors of which `step` gets each step's rows.
    Masked examples carry their states through.

    Returns:
        `(last_states, hidden, statistics)`: `hidden` time-major, and the
        statistics of every step (`None` in inference).
    """
    xs = {"inputs": inputs}
    if mask is not None:
        xs["mask"] = mask
    if population is not None:
        xs["population"] = population

    def body(old, xs):
        mask_t = xs.get("mask")
        new, stats = step(
            xs["inputs"], list(old), xs.get("population"), mask_t
        )
        if mask_t is not None:
            new = [ops.where(mask_t > 0, n, o) for n, o in zip(new, old)]
        outputs = {"hidden": new[0]}
        if population is None:
            outputs["statistics"] = ops.stop_gradient(pack(stats))
        return tuple(new), outputs

    outputs_like = {"hidden": states[0]}
    if population is None:
        outputs_like["statistics"] = pack(statistics_like)
    last, outputs = scan(
        body, tuple(states), xs, outputs_like, unroll
    )
    statistics = None
    if population is None:
        statistics = unpack(statistics_like, outputs["statistics"])
    return last, outputs["hidden"], statistics
