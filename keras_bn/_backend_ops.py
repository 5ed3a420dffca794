"""The operations `keras.ops` lacks, one function for every backend.

`_statistics` writes its math in `keras.ops`; where a backend has an
operation that computes the same numbers with less memory for the
gradient, the function here picks it, so the math keeps one form.
"""

from keras import backend
from keras import ops


def squared_difference(x, y):
    """`(x - y) ** 2`, element by element.

    On TensorFlow, `tf.math.squared_difference`: its gradient reads `x` and
    `y`, which the caller keeps anyway, where the gradient of `square(x -
    y)` keeps the difference, a temporary the size of `x`, alive from the
    forward pass to the backward one (what `tf.nn.moments`, and so core
    Keras, avoids the same way). Elsewhere the compiler (XLA on JAX) or
    PyTorch's kernel serves the calls where this matters.
    """
    if backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.math.squared_difference(x, y)
    return ops.square(x - y)


def no_gradient(value):
    """The gradient a custom gradient hands back for an input that has
    none: TensorFlow takes `None`, which saves ops in every step of a
    loop; JAX needs zeros."""
    if backend.backend() == "tensorflow":
        return None
    return ops.zeros_like(value)
