"""Test-time adaptation of batch normalization by entropy minimization."""

import contextlib

import keras
import numpy as np
from keras import ops

from keras_bn import _validation
from keras_bn.batch_normalization import BatchNormalization
from keras_bn.batch_renormalization import BatchRenormalization


class TENT:
    """Test-time adaptation by entropy minimization (Wang et al., 2021).

    TENT adapts a trained classifier to a shifted test domain from the
    unlabelled test batches alone. For each incoming batch it takes `steps`
    optimizer steps on the mean Shannon entropy of the model's predicted
    class probabilities,

        loss = mean over the batch of -sum_k p_k * log(p_k),

    updating only the scale `gamma` and offset `beta` of the model's batch
    normalization layers, which normalize with the batch's own statistics
    (not the moving ones); then it predicts the batch with the adapted
    model. Adaptation is online: what one batch teaches carries over to the
    next, unless `episodic=True`, which restores the source weights before
    every batch, as the paper's episodic variant does.

    The steps run through Keras's own training machinery: an inner model
    that calls `model(x, training=True)`, with the entropy as its loss
    (`compute_loss`), compiled with `optimizer` and trained with
    `train_on_batch`, so TENT runs on every backend, with `jit_compile`
    where the backend has it.

    The model is adapted in place, as in the reference code: TENT sets
    `model.trainable = True` and then `trainable = False` on every layer
    that holds no adapted batch normalization, so that only `gamma` and
    `beta` of those layers are trainable. Adapted are `keras.layers.
    BatchNormalization` (without `renorm`) and `keras_bn.BatchNormalization`
    layers; batch renormalization, `keras_bn.FrozenBatchNormalization` and
    the recurrent layers are left frozen and normalize with their moving
    statistics. Every layer runs in training mode during adaptation and
    prediction, so `Dropout` drops units, as in the reference (whose model
    is in `train()` mode).

    The moving statistics are not updated: batch normalization uses the
    test batch's statistics, which is all the method needs, and after each
    adaptation or prediction TENT puts the moving statistics back to the
    values they had before it, so they keep their source values.
    `model(x)` in inference after adaptation thus combines the source
    statistics with the adapted `gamma` and `beta`; predict through TENT
    instead.

    `reset()` restores every weight of `model` (trainable or not) and the
    optimizer's state to their values when TENT was created.

    Known failure: with many steps, a large learning rate or small batches,
    entropy minimization can collapse, predicting one class with confidence
    for every input, and the error rises again the longer it adapts.
    `episodic=True` bounds the damage to one batch, at the price of
    forgetting what earlier batches taught; otherwise, watch the predicted
    class distribution and call `reset()` when it degenerates.

    The predictions of a batch come from a forward pass after its
    adaptation steps (the reference returns those of the last step's
    forward pass, before that step's update), so each batch takes
    `steps + 1` forward passes.

    Args:
        model: A built Keras model whose outputs are class probabilities
            (or logits, with `from_logits=True`) on the last axis, or one
            sigmoid unit (or its logit) for two classes, with at least one
            batch normalization layer that TENT adapts.
        optimizer: A Keras optimizer, its name or its config, for `gamma`
            and `beta`; it must be used by this TENT alone, since `reset()`
            restores its state. `None` gives `keras.optimizers.Adam(
            learning_rate=1e-3)`, the reference's setting for CIFAR-10-C
            (with batches of 200). Defaults to `None`.
        steps: Positive integer, the optimizer steps taken on each batch.
            Defaults to `1`.
        episodic: If `True`, restore the source weights and the optimizer's
            state before each batch. Defaults to `False`.
        from_logits: Whether the model's outputs are logits rather than
            probabilities. Defaults to `False`.
        jit_compile: Whether the adaptation and prediction steps are
            compiled with XLA, as in `Model.compile`. Defaults to `"auto"`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> import keras_bn
    >>> model = keras.Sequential([
    ...     keras.Input((4,)), keras.layers.Dense(8),
    ...     keras.layers.BatchNormalization(), keras.layers.ReLU(),
    ...     keras.layers.Dense(3, activation="softmax"),
    ... ])
    >>> tent = keras_bn.TENT(model, keras.optimizers.SGD(0.1))
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (16, 4))
    >>> tent.predict_on_batch(x.astype("float32")).shape
    (16, 3)
    >>> gamma = model.layers[1].gamma
    >>> bool(np.any(keras.ops.convert_to_numpy(gamma) != 1.0))
    True
    >>> tent.reset()
    >>> keras.ops.convert_to_numpy(gamma).tolist() == [1.0] * 8
    True

    Reference:

    - [Wang, Shelhamer, Liu, Olshausen and Darrell, 2021](
      https://arxiv.org/abs/2006.10726), "Tent: Fully Test-time Adaptation
      by Entropy Minimization".
    - AdaBN, [Li et al., 2016](https://arxiv.org/abs/1603.04779), which
      only replaces the statistics: `keras_bn.recompute_statistics` on
      the target data.
    """

    def __init__(
        self,
        model,
        optimizer=None,
        steps=1,
        episodic=False,
        from_logits=False,
        jit_compile="auto",
    ):
        if not isinstance(model, keras.Model) or not model.built:
            _validation.fail("model", model, "a built Keras model")
        self.steps = _validation.integer("steps", steps, 1)
        self.episodic = _validation.boolean("episodic", episodic)
        self.from_logits = _validation.boolean("from_logits", from_logits)
        if jit_compile != "auto":
            _validation.boolean("jit_compile", jit_compile)
        self.model = model
        self.layers = _adaptable_layers(model)
        if not self.layers:
            _validation.fail(
                "model", model,
                "a model with at least one batch normalization layer that "
                "TENT adapts (keras.layers.BatchNormalization without "
                "renorm, or keras_bn.BatchNormalization)",
            )
        _make_only_affine_trainable(model, self.layers)
        if optimizer is None:
            optimizer = keras.optimizers.Adam(learning_rate=1e-3)
        self._adapter = _EntropyMinimization(model, self.from_logits)
        self._adapter.compile(
            optimizer=keras.optimizers.get(optimizer),
            jit_compile=jit_compile,
        )
        self.optimizer = self._adapter.optimizer
        self.optimizer.build(self._adapter.trainable_variables)
        self._source = _values(model.weights)
        self._optimizer_source = _values(self.optimizer.variables)

    @property
    def trainable_weights(self):
        """The weights TENT adapts: `gamma` and `beta` of `self.layers`."""
        return list(self._adapter.trainable_weights)

    def adapt(self, x):
        """Takes `steps` entropy-minimization steps on batch `x`.

        With `episodic=True`, restores the source weights first.

        Args:
            x: One batch of unlabelled inputs.
        """
        if self.episodic:
            self.reset()
        with _moving_statistics_kept(self.layers):
            for _ in range(self.steps):
                self._adapter.train_on_batch(x)

    def predict_on_batch(self, x):
        """Adapts on batch `x` (see `adapt`), then predicts it.

        The prediction normalizes with the batch's statistics.

        Args:
            x: One batch of unlabelled inputs.

        Returns:
            The adapted model's outputs for `x`, as NumPy arrays.
        """
        self.adapt(x)
        with _moving_statistics_kept(self.layers):
            return self._adapter.predict_on_batch(x)

    def predict(self, x, batch_size=32):
        """`predict_on_batch` on consecutive batches of `x`, in order.

        This is one online pass: each batch is adapted on (after the
        previous ones, unless `episodic`) and then predicted. The batch
        size matters, since every batch is normalized with its own
        statistics.

        Args:
            x: An array, or a structure of arrays for a model with several
                inputs, split along the first axis.
            batch_size: Positive integer, the size of the batches (the last
                one may be smaller). Defaults to `32`.

        Returns:
            The predictions for all of `x`, concatenated.
        """
        batch_size = _validation.integer("batch_size", batch_size, 1)
        size = len(keras.tree.flatten(x)[0])
        outputs = [
            self.predict_on_batch(
                keras.tree.map_structure(
                    lambda a, start=start: a[start : start + batch_size], x
                )
            )
            for start in range(0, size, batch_size)
        ]
        return keras.tree.map_structure(
            lambda *parts: np.concatenate(parts), *outputs
        )

    def reset(self):
        """Restores the source weights of `model` and the optimizer's
        state, exactly."""
        for variable, value in zip(self.model.weights, self._source):
            variable.assign(value)
        for variable, value in zip(
            self.optimizer.variables, self._optimizer_source
        ):
            variable.assign(value)


class _EntropyMinimization(keras.Model):
    """`model` in training mode, trained on its predictions' entropy."""

    def __init__(self, model, from_logits):
        # A name without the class's leading underscore, which TensorFlow
        # refuses as a name scope.
        super().__init__(name="entropy_minimization")
        self.adapted = model
        self.from_logits = from_logits

    def call(self, inputs):
        return self.adapted(inputs, training=True)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        del x, y, sample_weight, training
        return ops.mean(_entropy(y_pred, self.from_logits))


def _entropy(outputs, from_logits=False):
    """The Shannon entropy (in nats) of each distribution on the last axis.

    `-sum_k p_k * log(p_k)`, in float32 at least; probabilities are clipped
    at a tiny positive value before the logarithm. A last axis of size 1
    holds the probability (or logit) of the second of two classes, as a
    sigmoid unit does.
    """
    outputs = ops.cast(outputs, "float32")
    if outputs.shape[-1] == 1:
        # softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)].
        other = ops.zeros_like(outputs) if from_logits else 1.0 - outputs
        outputs = ops.concatenate([other, outputs], axis=-1)
    if from_logits:
        log_p = ops.log_softmax(outputs, axis=-1)
        p = ops.exp(log_p)
    else:
        p = outputs
        log_p = ops.log(ops.clip(p, keras.config.epsilon(), 1.0))
    return -ops.sum(p * log_p, axis=-1)


def _adaptable_layers(model):
    """The batch normalization layers of `model` that TENT adapts."""
    # `_flatten_layers` is the only Keras 3 walk over nested layers.
    return [
        layer for layer in model._flatten_layers(include_self=False)
        if (
            isinstance(layer, keras.layers.BatchNormalization)
            and not layer.renorm
        )
        or (
            isinstance(layer, BatchNormalization)
            and not isinstance(layer, BatchRenormalization)
        )
    ]


def _make_only_affine_trainable(model, adapted):
    """Makes `gamma` and `beta` of `adapted` the only trainable weights.

    Every layer holding none of `adapted` is set to `trainable = False`,
    which also puts other batch normalization layers in inference mode.
    """
    model.trainable = True
    adapted_ids = {id(layer) for layer in adapted}
    for layer in model._flatten_layers(include_self=False):
        if not any(
            id(inner) in adapted_ids
            for inner in layer._flatten_layers(include_self=True)
        ):
            layer.trainable = False


@contextlib.contextmanager
def _moving_statistics_kept(layers):
    """Restores the non-trainable weights of `layers` (the moving
    statistics, and `num_batches_tracked` for `momentum=None`) on exit.

    Their training calls update them as usual; TENT normalizes with the
    batch's statistics and puts the source values back afterwards, without
    changing any layer's attributes.
    """
    variables = [w for layer in layers for w in layer.non_trainable_weights]
    values = _values(variables)
    try:
        yield
    finally:
        for variable, value in zip(variables, values):
            variable.assign(value)


def _values(variables):
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]
