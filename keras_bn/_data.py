"""The data the tools take, read as `model.fit` reads it.

`recompute_statistics` and `keras_bn.callbacks.PreciseBN` use only the
inputs `x` of their data. The rule, as `fit` applies it:

- an array or tensor (NumPy, TensorFlow, JAX, PyTorch), or a dict of them
  for named inputs, is `x`, cut into batches;
- a tuple of arrays is `(x,)`, `(x, y)` or `(x, y, sample_weight)`, as
  `fit`'s `validation_data` and a dataset's elements are: its `x` is cut
  into batches and `y` and `sample_weight` are not used;
- a list of arrays is `x` of a model with that many inputs (`fit(x=[a,
  b])`); for a model with one input it is a list of batches;
- anything else is iterated for batches: a `keras.utils.PyDataset`, a
  `tf.data.Dataset`, a PyTorch `DataLoader`, a generator or a list of
  batches, each batch `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`.

A tuple of as many arrays as a multi-input model has inputs could be
either `x` or `(x, y)`: it is refused, naming both ways to write it.
"""

import math
import sys

import keras
import numpy as np

from keras_bn import _graph


class Arrays:
    """Inputs `x` held in arrays, to be cut into batches."""

    def __init__(self, x):
        self.x = x

    def __repr__(self):
        return _describe(self.x)


def model_data(model, data):
    """`data` for `model` under the rule above: `Arrays` or an iterable."""
    if isinstance(data, dict) or is_array(data):
        return Arrays(data)
    inputs = _num_inputs(model)
    if isinstance(data, tuple) and data and _is_arrays(data[0]) and all(
        item is None or _is_arrays(item) for item in data[1:]
    ):
        return Arrays(_tuple_x(data, inputs))
    if (
        isinstance(data, list)
        and inputs is not None
        and inputs > 1
        and data
        and all(is_array(item) for item in data)
    ):
        if len(data) != inputs:
            raise ValueError(
                "Argument `data` must give one array per input of the model, "
                f"which has {inputs} inputs, when it is a list of arrays. "
                f"Received: data={_describe(data)}"
            )
        _check_rows(data, "the inputs")
        return Arrays(data)
    return data


def _tuple_x(data, inputs):
    """The `x` of a tuple `(x,)`, `(x, y)` or `(x, y, sample_weight)`."""
    if len(data) > 3:
        raise ValueError(
            "Argument `data` must be `(x,)`, `(x, y)` or `(x, y, "
            "sample_weight)` when it is a tuple of arrays, as in "
            "`model.fit`; for a model with several inputs pass `x` as a "
            f"list. Received: data={_describe(data)}"
        )
    if (
        inputs is not None
        and inputs > 1
        and len(data) == inputs
        and all(is_array(item) for item in data)
    ):
        raise ValueError(
            f"Argument `data` is a tuple of {len(data)} arrays and the model "
            f"has {inputs} inputs, so it could be the inputs or `(x, y"
            f"{', sample_weight' if inputs == 3 else ''})`. Pass the inputs "
            "as a list, `[x1, x2, ...]`, or with their targets as "
            f"`((x1, x2, ...), y)`. Received: data={_describe(data)}"
        )
    _check_rows([item for item in data if item is not None], "x, y and "
                "sample_weight")
    return data[0]


def _check_rows(items, what):
    rows = {
        int(leaf.shape[0]) for item in items
        for leaf in keras.tree.flatten(item)
    }
    if len(rows) > 1:
        raise ValueError(
            f"Argument `data` must hold as many rows in each of {what}. "
            f"Received: data={_describe(items)}, with {sorted(rows)} rows"
        )


def _num_inputs(model):
    """The number of inputs of a Sequential or Functional model, or `None`."""
    if not _graph.is_graph_model(model):
        return None
    try:
        if isinstance(model, keras.Sequential):
            return 1
        return len(keras.tree.flatten(model.input))
    except (AttributeError, ValueError):
        return None


def _is_arrays(value):
    """Whether `value` is an array or a non-empty structure of arrays."""
    if is_array(value):
        return True
    if not isinstance(value, (list, tuple, dict)):
        return False
    leaves = keras.tree.flatten(value)
    return bool(leaves) and all(is_array(leaf) for leaf in leaves)


def _describe(value):
    """A short account of `value`: shapes instead of numbers."""
    if is_array(value):
        return f"<array of shape {tuple(value.shape)}>"
    if isinstance(value, dict):
        return "{" + ", ".join(
            f"{k!r}: {_describe(v)}" for k, v in value.items()
        ) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_describe(v) for v in value) + "]"
    if isinstance(value, tuple):
        inner = ", ".join(_describe(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def num_batches(data, batch_size):
    """The number of batches in `data`, or `None` when it is not known."""
    if isinstance(data, Arrays):
        size = len(keras.tree.flatten(data.x)[0])
        return math.ceil(size / batch_size)
    if isinstance(data, dict) or is_array(data):
        return num_batches(Arrays(data), batch_size)
    if is_tf_dataset(data):
        cardinality = int(data.cardinality())
        return cardinality if cardinality >= 0 else None
    try:
        return len(data)
    except TypeError:
        return None


def batches(data, batch_size):
    """The inputs `x` of each batch of `data`."""
    if isinstance(data, dict) or is_array(data):
        data = Arrays(data)
    if isinstance(data, Arrays):
        size = len(keras.tree.flatten(data.x)[0])
        for start in range(0, size, batch_size):
            yield keras.tree.map_structure(
                lambda a, start=start: a[start : start + batch_size], data.x
            )
        return
    for batch in data:
        x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
        yield _foreign_to_numpy(x)


def check_input_shape(model, x, data):
    """Raises a short error when batch `x` does not fit `model`'s input.

    Only for Sequential and Functional models, whose inputs are known, and
    only when `x` has as many arrays as the model has inputs; anything else
    is left to the model.
    """
    if not _graph.is_graph_model(model):
        return
    try:
        # A Sequential model's `input` exists only once it was called.
        if isinstance(model, keras.Sequential):
            inputs = model.inputs
        else:
            inputs = model.input
    except (AttributeError, ValueError):
        return
    if isinstance(inputs, dict) and isinstance(x, dict):
        if set(inputs) != set(x):
            return
        pairs = [(inputs[key], x[key]) for key in inputs]
    else:
        inputs, x = keras.tree.flatten(inputs), keras.tree.flatten(x)
        if len(inputs) != len(x):
            return
        pairs = list(zip(inputs, x))
    for spec, array in pairs:
        shape = getattr(array, "shape", None)
        if shape is None:
            continue
        shape = tuple(None if d is None else int(d) for d in shape)
        want = tuple(spec.shape)
        fits = len(shape) == len(want) and all(
            w is None or d is None or w == d for w, d in zip(want, shape)
        )
        if not fits:
            name = f" `{spec.name}`" if len(pairs) > 1 else ""
            given = data.x if isinstance(data, Arrays) else data
            raise ValueError(
                "Argument `data` must give batches that fit the model's "
                f"input{name} of shape {want}, where None is any size. "
                f"Received: data (a {type(given).__name__}) whose first "
                f"batch has shape {shape!r}"
            )


def is_tf_dataset(data):
    # TensorFlow is imported by whoever made a `tf.data.Dataset`; keras_bn
    # does not import it on other backends.
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(data, tf.data.Dataset)


def _framework(value):
    """`"tensorflow"` or `"torch"` for a tensor of theirs, else `None`.

    Neither is imported here: a tensor of one exists only once its user
    imported it.
    """
    tf = sys.modules.get("tensorflow")
    if tf is not None and tf.is_tensor(value):
        return "tensorflow"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return "torch"
    return None


def _foreign_to_numpy(x):
    """`x` with TensorFlow and PyTorch tensors of another backend as NumPy.

    A `tf.data.Dataset` or a PyTorch `DataLoader` gives its own tensors,
    which other backends' compiled functions do not take.
    """
    backend_name = keras.backend.backend()

    def convert(value):
        framework = _framework(value)
        if framework is None or framework == backend_name:
            return value
        if framework == "torch":
            return value.detach().cpu().numpy()
        return value.numpy()

    return keras.tree.map_structure(convert, x)


def is_array(data):
    return (
        isinstance(data, np.ndarray)
        or keras.ops.is_tensor(data)
        or _framework(data) is not None
    )
