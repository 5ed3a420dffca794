"""Population statistics recomputed with frozen weights (PreciseBN)."""

import logging

import keras
import numpy as np

from keras_bn import _data
from keras_bn import _statistics
from keras_bn import _validation
from keras_bn.batch_normalization import BatchNormalization
from keras_bn.frozen_batch_normalization import FrozenBatchNormalization

_LOG = logging.getLogger(__name__)

# Layers whose moving statistics are updated in training as
# `moving = moving * momentum + batch_statistic * (1 - momentum)`, with the
# layer's `momentum` (keras_bn's `momentum=None`: `1 - 1 / n` at the `n`-th
# update), and kept in its `moving_mean` and `moving_variance` weights (and
# `moving_stddev` for batch renormalization). Subclasses are covered.
_LAYER_TYPES = (keras.layers.BatchNormalization, BatchNormalization)

# The method through which a layer that counts its updates row by row (per
# time step, say) takes part; see `recompute_statistics`.
_ROWS_METHOD = "population_statistics"

# How the data is read: `keras_bn._data` says the rule.
_batches = _data.batches
_num_batches = _data.num_batches
_check_input_shape = _data.check_input_shape


def recompute_statistics(
    model, data, steps=None, batch_size=32, jit_compile=False, verbose=0
):
    """Sets moving statistics to the average of batch statistics on `data`.

    The moving averages that batch normalization keeps in training lag
    behind the weights; Wu & Johnson (2021) recompute the population
    statistics after training, with the weights frozen, as the equal-weight
    average of the statistics of `K` batches (about 10^3 to 10^4 examples):

        moving_mean = (1 / K) * sum_k mean_k
        moving_variance = (1 / K) * sum_k var_k

    where `mean_k` and `var_k` are the statistics each layer computes in
    training on batch `k` (biased variance, as in training; ghost batches,
    masks and `synchronized` as the layer is configured). Batch
    renormalization layers average the standard deviation instead, as their
    moving averages do, and derive the variance from it. This is also how
    to adapt a pretrained model's statistics to a new domain.

    Every batch-normalization layer of `model` is recomputed, nested ones
    included: `keras.layers.BatchNormalization` and every keras_bn layer,
    also those with `trainable=False`. The model runs forward in training
    mode on each batch, with no optimizer: trainable weights are not
    changed, and every other variable of the model (other layers' state,
    `num_batches_tracked`, random-generator states) is restored afterwards.
    Layers such as `Dropout` act as in training, so the statistics are those
    of the activations the layers saw in training, which is what their
    moving averages estimate too. No layer attribute changes: each batch's
    statistics are read from what the layer's own update, with its own
    `momentum`, writes into its moving statistics set to zero. A batch that
    gives a layer no element to count for a statistic (all masked) is left
    out of that statistic's average; a statistic no batch counted keeps its
    value. A core Keras layer with `momentum=1.0`, which keeps nothing of a
    batch, raises a `ValueError`.

    Layers that keep statistics row by row with counts of their own (for
    instance one row per time step) take part through a method
    `population_statistics()` that returns `(counter, weights)` pairs:
    `counter` is a weight with one entry per row, which every training call
    increases for the rows it updates, and `weights` are the moving
    statistics with those rows first. A training call must write a row's
    batch statistics outright when the row's counter is zero beforehand, as
    bias-corrected and cumulative averages do. Each row then becomes the
    equal-weight average over the batches that updated it, and the counters
    are restored.

    It runs on every Keras backend and imports TensorFlow only on the
    TensorFlow backend: there the pass is a `tf.function`, on JAX one
    `jax.jit`-compiled stateless call, on PyTorch an eager call without
    gradients. Under a `tf.distribute` strategy the model runs outside the
    replicas on the whole batch, so the statistics are those of the full
    batch.

    A model without batch normalization (no layer above, and none with
    `population_statistics()`) raises a `ValueError` rather than returning
    with nothing done, since recomputing its statistics is a mistake that a
    warning would let pass; `convert_batch_normalization` and
    `fold_batch_normalization` follow the same rule. So does a first batch
    whose shape does not fit the model's input, before anything runs.
    What was recomputed, and which layers were left and why
    (`keras_bn.FrozenBatchNormalization`, whose statistics are fixed), is
    logged at the `INFO` level to the `keras_bn.population` logger
    (`logging.basicConfig(level=logging.INFO)` shows it).

    Args:
        model: A built Keras model (or layer).
        data: The data, read as `model.fit` reads it, of which only the
            inputs `x` are used: an array or tensor (or a dict of them, for
            named inputs) cut into batches of `batch_size`; a tuple
            `(x, y)` or `(x, y, sample_weight)` of them, whose `x` is cut
            into batches; a list of arrays, the inputs of a model with as
            many; or the batches themselves: a `keras.utils.PyDataset`, a
            `tf.data.Dataset` (where TensorFlow is installed, on any
            backend), a PyTorch `DataLoader`, a generator or a list, each
            batch `x`, `(x, y)` or `(x, y, sample_weight)`. A tuple of as
            many arrays as a multi-input model has inputs could be either
            and raises a `ValueError`: pass the inputs as a list.
        steps: Positive integer, the number of batches to use, or `None` for
            all of `data` (which must then be finite). Defaults to `None`.
        batch_size: Positive integer, the batch size for NumPy `data`.
            Defaults to `32`.
        jit_compile: Whether to compile the forward pass with XLA on the
            TensorFlow backend. JAX always compiles it (with `jax.jit`);
            the PyTorch backend has no XLA and raises a `ValueError` for
            `True`. Defaults to `False`.
        verbose: `1` shows a progress bar (with the number of batches when
            it is known: for arrays, sized datasets and `steps`), `0` shows
            nothing. Defaults to `0`, as in `keras_bn.callbacks.PreciseBN`.

    Returns:
        The number of batches used.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> import keras_bn
    >>> model = keras.Sequential(
    ...     [keras.Input((3,)), keras_bn.BatchNormalization(momentum=0.99)]
    ... )
    >>> x = np.random.default_rng(0).normal(2.0, 1.0, (64, 3))
    >>> keras_bn.recompute_statistics(model, x, batch_size=16)
    4
    >>> mean = np.asarray(model.layers[0].moving_mean)
    >>> bool(np.allclose(mean, x.mean(axis=0), atol=1e-5))
    True

    Reference:

    - [Wu and Johnson, 2021](https://arxiv.org/abs/2105.07576).
    """
    steps = _validation.integer("steps", steps, 1, allow_none=True)
    batch_size = _validation.integer("batch_size", batch_size, 1)
    jit_compile = check_jit_compile(jit_compile)
    _validation.choice("verbose", verbose, (0, 1))
    bn_layers, row_layers = statistics_layers(model)
    averages = [_LayerAverage(layer) for layer in bn_layers] + [
        _RowAverage(counter, weights)
        for layer in row_layers
        for counter, weights in getattr(layer, _ROWS_METHOD)()
    ]
    recomputed = [w for average in averages for w in average.weights]
    recomputed_ids = {id(v) for v in recomputed}
    # Forward passes in training mode also move state that is not a
    # population statistic (seed generators, counters); it is put back.
    # Trainable weights are only changed by an optimizer, which never runs.
    others = [
        v for v in model.non_trainable_variables
        if id(v) not in recomputed_ids
    ]
    saved = [_numpy(v) for v in others]
    saved_recomputed = [_numpy(v) for v in recomputed]

    trainable = [layer.trainable for layer in bn_layers + row_layers]
    forward = _forward(model, jit_compile)
    data = _data.model_data(model, data)
    target = _num_batches(data, batch_size)
    if target is None or (steps is not None and steps < target):
        target = steps
    progbar = keras.utils.Progbar(target, verbose=verbose, unit_name="batch")
    count = 0
    try:
        for layer in bn_layers + row_layers:
            layer.trainable = True
        for x in _batches(data, batch_size):
            if steps is not None and count == steps:
                break
            if count == 0:
                _check_input_shape(model, x, data)
            for average in averages:
                average.start_batch()
            forward(x)
            for average in averages:
                average.end_batch()
            count += 1
            progbar.update(count)
        if count and (target is None or count < target):
            # Ends the progress bar's line.
            progbar.update(count, finalize=True)
    finally:
        for layer, value in zip(bn_layers + row_layers, trainable):
            layer.trainable = value
        for variable, value in zip(others, saved):
            variable.assign(value)
        for variable, value in zip(recomputed, saved_recomputed):
            # The averages replace them below; an interrupted pass leaves
            # the statistics as they were.
            variable.assign(value)
    for average in averages:
        average.assign()
    if count == 0:
        raise ValueError(
            "Argument `data` gave no batch, so no statistics were "
            f"recomputed. Received: data={data!r}"
        )
    _log_report(model, bn_layers, row_layers, count)
    return count


def statistics_layers(model):
    """The layers whose statistics `recompute_statistics` recomputes.

    Returns the pair `(bn_layers, row_layers)`: batch-normalization layers,
    and layers that count their updates row by row. Raises a `ValueError`
    when `model` is not built or has neither.
    """
    if not isinstance(model, keras.layers.Layer) or not model.built:
        raise ValueError(
            "Argument `model` must be a built Keras model or layer. "
            f"Received: model={model!r}"
        )
    layers = _flatten(model)
    bn_layers = [layer for layer in layers if isinstance(layer, _LAYER_TYPES)]
    row_layers = [
        layer for layer in layers
        if hasattr(layer, _ROWS_METHOD)
        and not isinstance(layer, _LAYER_TYPES)
    ]
    if not bn_layers and not row_layers:
        raise ValueError(
            "Argument `model` must hold a batch-normalization layer "
            "(keras.layers.BatchNormalization or a keras_bn layer, nested "
            "ones included) whose statistics can be recomputed; it has "
            f"none. Received: model={model!r}"
        )
    return bn_layers, row_layers


def _log_report(model, bn_layers, row_layers, count):
    """Logs the layers recomputed and those left, with the reason."""
    if not _LOG.isEnabledFor(logging.INFO):
        return
    done = {id(layer) for layer in bn_layers + row_layers}
    for layer in bn_layers + row_layers:
        _LOG.info(
            "%s: statistics recomputed over %d batch(es)", layer.name, count
        )
    for layer in _flatten(model):
        if id(layer) not in done and isinstance(
            layer, FrozenBatchNormalization
        ):
            _LOG.info(
                "%s: FrozenBatchNormalization, left as it is: its "
                "statistics are fixed",
                layer.name,
            )


def check_jit_compile(jit_compile):
    """`jit_compile` as a bool, or a `ValueError` if it cannot be honoured."""
    jit_compile = _validation.boolean("jit_compile", jit_compile)
    name = keras.backend.backend()
    if jit_compile and name not in ("tensorflow", "jax"):
        raise ValueError(
            "Argument `jit_compile=True` asks for an XLA-compiled forward "
            f"pass, which the TensorFlow and JAX backends give; the backend "
            f"is {name}. Use `jit_compile=False`. Received: jit_compile=True"
        )
    return jit_compile


def _flatten(model):
    """`model` and every layer in it, nested ones included."""
    # `_flatten_layers` is the only Keras 3 walk over nested layers (layers
    # inside models and inside other layers' attributes).
    return model._flatten_layers(include_self=True)


class _LayerAverage:
    """The equal-weight average of a batch-normalization layer's batch
    statistics, element by element, read from its moving statistics.

    Before each batch the moving statistics are set to negative zero (and
    keras_bn's update count to zero), so that a training call leaves
    `batch_statistic * (1 - momentum)` in every element it updates, and
    leaves alone (negative zero) those its batch gave no element to count.
    A variance, or a standard deviation, that a batch updated is never
    negative zero, so those elements are told apart; the others are left
    out of their average, and an element no batch updated keeps its value
    from before.
    """

    def __init__(self, layer):
        self.weights = _population(layer)
        self.epsilon = layer.epsilon
        self.renormalizing = getattr(layer, "moving_stddev", None) is not None
        # What tells which elements a batch updated.
        self.witness = len(self.weights) - 1
        momentum = layer.momentum
        self.counter = getattr(layer, "num_batches_tracked", None)
        if momentum is None:
            # Cumulative: the first update writes the batch's statistics.
            momentum = 0.0
        elif not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"Layer '{layer.name}' has momentum={momentum!r}, which "
                "keeps none of a batch's statistics, so they cannot be "
                "recomputed; a momentum in [0, 1) is needed."
            )
        self.cumulative = layer.momentum is None
        self.share = 1.0 - float(momentum)
        self.totals = [np.zeros(w.shape, "float64") for w in self.weights]
        self.counts = np.zeros(self.weights[0].shape, "float64")

    def start_batch(self):
        for weight in self.weights:
            weight.assign(np.full(weight.shape, -0.0))
        if self.cumulative:
            self.counter.assign(np.zeros(self.counter.shape))

    def end_batch(self):
        values = [_numpy(w).astype("float64") for w in self.weights]
        witness = values[self.witness]
        updated = ~((witness == 0.0) & np.signbit(witness))
        self.counts += updated
        for total, value in zip(self.totals, values):
            total += np.where(updated, value / self.share, 0.0)

    def assign(self):
        averages = [
            np.where(
                self.counts > 0,
                total / np.maximum(self.counts, 1.0),
                _numpy(weight),
            )
            for total, weight in zip(self.totals, self.weights)
        ]
        if self.renormalizing:
            # `moving_variance` follows `moving_stddev`, as in training.
            averages[1] = np.where(
                self.counts > 0,
                _statistics.variance_from_stddev(averages[2], self.epsilon),
                averages[1],
            )
        for weight, average in zip(self.weights, averages):
            weight.assign(average.astype(weight.dtype))


class _RowAverage:
    """The equal-weight average, row by row, of a layer's batch statistics.

    Before each batch the counter is zeroed, so that the layer writes the
    batch's statistics outright into the rows it updates; after the batch,
    the rows whose counter moved are added up.
    """

    def __init__(self, counter, weights):
        self.counter = counter
        self.weights = list(weights)
        self.totals = [np.zeros(w.shape, "float64") for w in self.weights]
        self.counts = np.zeros(counter.shape, "float64")

    def start_batch(self):
        self.counter.assign(np.zeros(self.counter.shape))

    def end_batch(self):
        updated = _numpy(self.counter) > 0
        self.counts += updated
        for total, weight in zip(self.totals, self.weights):
            value = _numpy(weight).astype("float64")
            total += np.where(self._rows(updated, weight), value, 0.0)

    def assign(self):
        for total, weight in zip(self.totals, self.weights):
            counts = self._rows(self.counts, weight)
            # A row no batch updated still holds its value from before.
            weight.assign(
                np.where(
                    counts > 0,
                    total / np.maximum(counts, 1.0),
                    _numpy(weight),
                )
            )

    @staticmethod
    def _rows(per_row, weight):
        extra = len(weight.shape) - per_row.ndim
        return per_row.reshape(per_row.shape + (1,) * extra)


def _population(layer):
    """The weights of `layer` that its momentum updates.

    Batch renormalization (core `renorm=True` and keras_bn's) averages the
    standard deviation in `moving_stddev` and derives `moving_variance`
    from it.
    """
    names = ("moving_mean", "moving_variance", "moving_stddev")
    return [
        getattr(layer, name) for name in names
        if getattr(layer, name, None) is not None
    ]


def _forward(model, jit_compile):
    """A function that runs `model` on a batch in training mode.

    TensorFlow runs it as a `tf.function` (compiled with XLA when
    `jit_compile`), JAX as one `jax.jit`-compiled stateless call whose new
    state is written back to the variables, and PyTorch eagerly without
    recording gradients.
    """
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        return tf.function(
            lambda x: model(x, training=True),
            jit_compile=jit_compile,
            reduce_retracing=True,
        )
    if name == "jax":
        return _jax_forward(model)
    if name == "torch":
        import torch

        def forward(x):
            with torch.no_grad():
                model(x, training=True)

        return forward
    return lambda x: model(x, training=True)


def _jax_forward(model):
    import jax

    variables = _unique(
        model.trainable_variables + model.non_trainable_variables
    )
    position = {id(v): i for i, v in enumerate(variables)}
    # Only non-trainable state moves in a forward pass.
    updated = _unique(model.non_trainable_variables)

    @jax.jit
    def step(values, x):
        mapping = list(zip(variables, values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            model(x, training=True)
        new = []
        for variable in updated:
            current = scope.get_current_value(variable)
            if current is None:
                current = values[position[id(variable)]]
            new.append(current)
        return new

    def forward(x):
        new = step([v.value for v in variables], x)
        for variable, value in zip(updated, new):
            variable.assign(value)

    return forward


def _unique(variables):
    seen = set()
    return [
        v for v in variables if id(v) not in seen and not seen.add(id(v))
    ]


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable)
