"""Batch normalization frozen to its inference map, for fine-tuning."""

from keras import constraints
from keras import initializers
from keras import layers
from keras import ops
from keras import regularizers
from keras import saving

from keras_bn import _layout
from keras_bn import _statistics
from keras_bn import _validation


@saving.register_keras_serializable(package="keras_bn")
class FrozenBatchNormalization(layers.Layer):
    """Batch normalization frozen to its inference map.

    In training and in inference alike, whatever `training` and `trainable`
    say, the layer computes

        y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta

    and never updates `moving_mean` and `moving_variance`. This is
    torchvision's and detectron2's `FrozenBatchNorm2d`: the standard way to
    fine-tune a pretrained backbone on small batches, whose statistics would
    be too noisy to normalize with or to learn from. Unlike
    `trainable = False` on a `BatchNormalization` layer, it stays frozen
    when a model or backbone is set back to `trainable = True`.

    The weights are those of `keras.layers.BatchNormalization` and
    `keras_bn.BatchNormalization`, with the same names and in the same
    order (`gamma`, `beta`, `moving_mean`, `moving_variance`), so
    `set_weights` moves weights between them both ways.
    `keras_bn.convert_batch_normalization(model,
    keras_bn.FrozenBatchNormalization)` freezes every batch normalization
    of a model, copying its statistics (and warns, naming them, about
    layers whose statistics still hold their initial values, which were
    never trained), and `keras_bn.fold_batch_normalization` folds the layer
    into a preceding linear layer. `keras_bn.recompute_statistics` leaves
    its statistics alone.

    `gamma` and `beta` are trainable only with `trainable_affine=True` (and
    while the layer is trainable); by default they are frozen too, as in
    torchvision. The statistics are never trainable. The map is computed in
    float32 (or wider, for float64 inputs) under `mixed_float16` and
    `mixed_bfloat16`, whose weights stay float32, and the output has the
    layer's compute dtype. Gradients flow to the input, and to `gamma` and
    `beta` when they are trainable.

    Args:
        axis: Integer or list of integers, the axis or axes that keep their
            own statistics (typically the features axis). Defaults to `-1`.
        epsilon: Positive float added to the variance to avoid dividing by
            zero. Defaults to `1e-3`.
        center: If `True`, add the offset `beta`. Defaults to `True`.
        scale: If `True`, multiply by `gamma`. Defaults to `True`.
        beta_initializer: Initializer for `beta`. Defaults to `"zeros"`.
        gamma_initializer: Initializer for `gamma`. Defaults to `"ones"`.
        moving_mean_initializer: Initializer for the moving mean. Defaults to
            `"zeros"`.
        moving_variance_initializer: Initializer for the moving variance.
            Defaults to `"ones"`.
        beta_regularizer: Optional regularizer for `beta`. Defaults to
            `None`.
        gamma_regularizer: Optional regularizer for `gamma`. Defaults to
            `None`.
        beta_constraint: Optional constraint for `beta`. Defaults to `None`.
        gamma_constraint: Optional constraint for `gamma`. Defaults to
            `None`.
        trainable_affine: If `True`, `gamma` and `beta` are trainable
            weights (the statistics stay frozen). Defaults to `False`.
        **kwargs: Base layer arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: Input tensor of any rank.
        training: Accepted and ignored: the layer computes the same map in
            training and in inference.
        mask: Accepted and passed on to the next layer; masked elements go
            through the same map as the others.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> import keras_bn
    >>> layer = keras_bn.FrozenBatchNormalization()
    >>> layer.build((None, 2))
    >>> layer.set_weights([
    ...     np.array([1.0, 2.0]), np.array([0.0, 1.0]),
    ...     np.array([1.0, -1.0]), np.array([4.0, 1.0]),
    ... ])
    >>> x = np.array([[3.0, -1.0]], "float32")
    >>> np.round(keras.ops.convert_to_numpy(layer(x, training=True)), 3)
    array([[1., 1.]], dtype=float32)
    >>> len(layer.trainable_weights)
    0

    Reference:

    - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
    - torchvision's `ops.FrozenBatchNorm2d` and detectron2's
      `layers.FrozenBatchNorm2d`.
    """

    def __init__(
        self,
        axis=-1,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        trainable_affine=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.axis = _validation.axis("axis", axis)
        self.epsilon = _validation.epsilon("epsilon", epsilon)
        self.center = _validation.boolean("center", center)
        self.scale = _validation.boolean("scale", scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(
            moving_variance_initializer
        )
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.trainable_affine = _validation.boolean(
            "trainable_affine", trainable_affine
        )
        self.supports_masking = True

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None

    def build(self, input_shape):
        axes = _layout.resolve_axes(self.axis, input_shape)
        rank = len(input_shape)
        self._param_shape = tuple(input_shape[a] for a in axes)
        # The parameters, in the order of `axes`, broadcast against inputs
        # of this rank once size-1 axes are put between them.
        self._broadcast_shape = tuple(
            input_shape[a] if a in axes else 1 for a in range(rank)
        )
        if self.scale:
            self.gamma = self._add_affine(
                "gamma", self.gamma_initializer, self.gamma_regularizer,
                self.gamma_constraint,
            )
        if self.center:
            self.beta = self._add_affine(
                "beta", self.beta_initializer, self.beta_regularizer,
                self.beta_constraint,
            )
        self.moving_mean = self._add_statistic(
            "moving_mean", self.moving_mean_initializer
        )
        self.moving_variance = self._add_statistic(
            "moving_variance", self.moving_variance_initializer
        )
        self.input_spec = layers.InputSpec(
            ndim=rank, axes={a: input_shape[a] for a in axes}
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, inputs, training=None, mask=None):
        # The same map in training and in inference, and for every element:
        # a mask, which only statistics would need, passes through.
        del training, mask
        x = ops.cast(inputs, _statistics.statistics_dtype(inputs.dtype))
        mean, variance, gamma, beta = (
            None if w is None else self._broadcast(w, x.dtype)
            for w in (
                self.moving_mean, self.moving_variance, self.gamma, self.beta
            )
        )
        scale, offset = _statistics.affine(
            mean, variance, self.epsilon, gamma, beta
        )
        return ops.cast(x * scale + offset, self.compute_dtype)

    def get_config(self):
        config = {
            "axis": self.axis,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(
                self.moving_mean_initializer
            ),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "trainable_affine": self.trainable_affine,
        }
        return {**super().get_config(), **config}

    def _add_affine(self, name, initializer, regularizer, constraint):
        # A non-trainable weight stays out of `trainable_weights` even when
        # the layer, or a model holding it, is set to `trainable = True`.
        return self.add_weight(
            shape=self._param_shape,
            name=name,
            initializer=initializer,
            regularizer=regularizer,
            constraint=constraint,
            trainable=self.trainable_affine,
            autocast=False,
        )

    def _add_statistic(self, name, initializer):
        return self.add_weight(
            shape=self._param_shape,
            name=name,
            initializer=initializer,
            trainable=False,
            autocast=False,
        )

    def _broadcast(self, weight, dtype):
        return ops.reshape(ops.cast(weight, dtype), self._broadcast_shape)
