"""Callbacks for batch normalization during `fit`."""

import collections.abc

import keras

from keras_bn import _validation
from keras_bn import population


class PreciseBN(keras.callbacks.Callback):
    """Recomputes the population statistics during `fit` (PreciseBN).

    Every `every_n_epochs` epochs, and once more at the end of training if
    the last epoch was not one of them, the moving statistics of every
    batch-normalization layer of the model are replaced by the equal-weight
    average of the batch statistics over `steps` batches of `data`, with
    the weights frozen (see `keras_bn.recompute_statistics`):

        moving_mean = (1 / K) * sum_k mean_k
        moving_variance = (1 / K) * sum_k var_k

    The statistics are recomputed when the epoch's training steps are done,
    before its validation, so `val_` metrics, checkpoints and the final
    model all use them. Training itself is unchanged: in training mode the
    layers normalize with batch statistics, and the moving averages go on
    from the recomputed values. A model without batch normalization raises
    a `ValueError` when training begins. It works on every Keras backend.

    Args:
        data: The data, read as `model.fit` reads it, of which only the
            inputs `x` are used (see `keras_bn.recompute_statistics`): an
            array or tensor, a tuple `(x, y)` or `(x, y, sample_weight)`
            of them, or a list of arrays for a multi-input model, cut into
            batches of `batch_size`; or an iterable of batches that can be
            iterated again every time, such as a `keras.utils.PyDataset`,
            a `tf.data.Dataset` (where TensorFlow is installed) or a
            PyTorch `DataLoader`. A generator (or any iterator) can be read
            only once, so it needs `steps`: each pass takes the next
            `steps` batches from it.
        steps: Positive integer, the number of batches to use each time, or
            `None` for all of `data`. Defaults to `None`.
        every_n_epochs: Positive integer, how often to recompute. Defaults
            to `1`.
        batch_size: Positive integer, the batch size for NumPy `data`.
            Defaults to `32`.
        jit_compile: Whether to compile the forward pass with XLA, as in
            `keras_bn.recompute_statistics` (TensorFlow; JAX always
            compiles; PyTorch refuses `True`). Defaults to `False`.
        verbose: `1` shows a progress bar for each pass, `0` shows
            nothing. Defaults to `0`, as in `keras_bn.recompute_statistics`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> import keras_bn
    >>> x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
    >>> model = keras.Sequential(
    ...     [keras.Input((3,)), keras.layers.Dense(2),
    ...      keras_bn.BatchNormalization()]
    ... )
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> callback = keras_bn.callbacks.PreciseBN(x, steps=2, batch_size=32)
    >>> _ = model.fit(x, x[:, :2], epochs=2, callbacks=[callback], verbose=0)

    Reference:

    - [Wu and Johnson, 2021](https://arxiv.org/abs/2105.07576).
    """

    def __init__(
        self,
        data,
        steps=None,
        every_n_epochs=1,
        batch_size=32,
        jit_compile=False,
        verbose=0,
    ):
        super().__init__()
        _validation.integer("steps", steps, 1, allow_none=True)
        _validation.integer("every_n_epochs", every_n_epochs, 1)
        _validation.integer("batch_size", batch_size, 1)
        _validation.choice("verbose", verbose, (0, 1))
        _check_reusable(data, steps)
        self.data = data
        self.steps = steps
        self.every_n_epochs = int(every_n_epochs)
        self.batch_size = int(batch_size)
        self.jit_compile = population.check_jit_compile(jit_compile)
        self.verbose = verbose
        self._epoch = None
        self._recomputed_epoch = None

    def on_train_begin(self, logs=None):
        # A model without batch normalization fails here, before training.
        population.statistics_layers(self.model)
        self._epoch = None
        self._recomputed_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_test_begin(self, logs=None):
        # `fit` validates before `on_epoch_end`; recomputing here lets the
        # validation of this epoch use the new statistics.
        if self._epoch is not None and self._due(self._epoch):
            self._recompute(self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self._due(epoch):
            self._recompute(epoch)

    def on_train_end(self, logs=None):
        if self._epoch is not None and self._recomputed_epoch != self._epoch:
            self._recompute(self._epoch)
        self._epoch = None

    def _due(self, epoch):
        return (
            (epoch + 1) % self.every_n_epochs == 0
            and self._recomputed_epoch != epoch
        )

    def _recompute(self, epoch):
        population.recompute_statistics(
            self.model,
            self.data,
            steps=self.steps,
            batch_size=self.batch_size,
            jit_compile=self.jit_compile,
            verbose=self.verbose,
        )
        self._recomputed_epoch = epoch


def _check_reusable(data, steps):
    """Refuses an iterator without `steps`: its first pass would end it."""
    if isinstance(data, collections.abc.Iterator) and steps is None:
        raise ValueError(
            "Argument `data` is a generator or iterator, which can be read "
            "only once, so the callback needs `steps`, the number of "
            "batches to take from it at each pass. Pass `steps`, or data "
            "that can be iterated again (an array, a `keras.utils."
            "PyDataset`, a `tf.data.Dataset`, a `DataLoader`). Received: "
            f"data={data!r} with steps=None"
        )
