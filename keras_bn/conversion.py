"""Converting a model's core batch normalization to keras_bn layers."""

import keras

from keras_bn import _graph
from keras_bn import _statistics
from keras_bn.batch_normalization import BatchNormalization
from keras_bn.batch_renormalization import BatchRenormalization

_RENORM_KEYS = ("renorm", "renorm_clipping", "renorm_momentum")

# Batch renormalization's statistics, from plain batch normalization's:
# the standard deviation that gives the same inference,
# `moving_variance = moving_stddev ** 2 - epsilon`, and renormalization
# statistics that start where the moving ones are.
_DERIVED = {
    "moving_stddev": lambda w, eps: _statistics.stddev(
        w["moving_variance"], eps
    ),
    "renorm_mean": lambda w, eps: w["moving_mean"],
    "renorm_stddev": lambda w, eps: _statistics.stddev(
        w["moving_variance"], eps
    ),
}


def convert_batch_normalization(
    model, layer_class=BatchNormalization, **kwargs
):
    """Returns a copy of `model` with keras_bn batch normalization.

    Every `keras.layers.BatchNormalization` of `model` (nested models
    included) becomes `layer_class` with the same arguments and weights
    (`gamma`, `beta`, `moving_mean`, `moving_variance`), `kwargs`
    overriding or adding arguments; every other layer is copied unchanged,
    with its weights, and every operation of a functional model that is not
    a layer (such as `x + y` on the model's tensors) is copied as it is. A
    model without core batch normalization comes back as an equal copy.
    For `keras_bn.BatchRenormalization` the renormalization statistics
    start from the moving ones
    (`moving_stddev = renorm_stddev = sqrt(moving_variance + epsilon)`,
    `renorm_mean = moving_mean`); a core layer with `renorm=True` keeps its
    own. In inference mode the copy computes the same outputs,

        y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon)
            + beta,

    while in training it uses what the new class and `kwargs` add: ghost
    batches (`virtual_batch_size`), synchronized statistics with masks, a
    cumulative average (`momentum=None`). This is how to fine-tune a
    pretrained network, such as a `keras.applications` model, with them.
    The copy is not compiled; `trainable` flags are kept. Conversion works
    on every Keras backend.

    The default class, `keras_bn.BatchNormalization`, trains exactly as
    core Keras does until `kwargs` ask for more, so converting on its own
    changes no result. Batch renormalization is a choice to make with its
    clipping: without `renorm_clipping` its `r` and `d` are not clipped,
    which is unstable early in training, so pass the paper's warm-up,

        convert_batch_normalization(
            model,
            keras_bn.BatchRenormalization,
            renorm_clipping=keras_bn.schedules.paper_renorm_clipping(),
        )

    (core layers with `renorm=True` become `keras_bn.BatchRenormalization`
    with their own clipping either way).

    Args:
        model: A built Sequential or Functional model.
        layer_class: The keras_bn class to use:
            `keras_bn.BatchNormalization` or a subclass. Defaults to
            `keras_bn.BatchNormalization`.
        **kwargs: Arguments for every new layer, on top of those of the
            layer it replaces (for instance `virtual_batch_size=16`).

    Returns:
        The new model.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> import keras_bn
    >>> model = keras.Sequential([
    ...     keras.Input((4,)), keras.layers.Dense(3),
    ...     keras.layers.BatchNormalization(),
    ... ])
    >>> new = keras_bn.convert_batch_normalization(
    ...     model, virtual_batch_size=8
    ... )
    >>> isinstance(new.layers[1], keras_bn.BatchNormalization)
    True
    >>> new.layers[1].virtual_batch_size
    8
    >>> x = np.ones((2, 4), "float32")
    >>> numpy = keras.ops.convert_to_numpy
    >>> bool(np.allclose(numpy(new(x)), numpy(model(x))))
    True

    Reference:

    - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
    """
    if not (
        isinstance(layer_class, type)
        and issubclass(layer_class, BatchNormalization)
    ):
        raise ValueError(
            "Argument `layer_class` must be keras_bn.BatchNormalization or "
            f"a subclass of it. Received: layer_class={layer_class!r}"
        )
    if not _graph.is_graph_model(model) or not model.built:
        raise ValueError(
            "Argument `model` must be a built Sequential or Functional "
            f"model. Received: model={model!r}"
        )
    copies = []

    def clone_function(layer):
        if type(layer) is keras.layers.BatchNormalization:
            config = layer.get_config()
            if not layer.renorm:
                # Each keras_bn class sets its own renormalization defaults.
                for key in _RENORM_KEYS:
                    config.pop(key, None)
            target = layer_class
            if layer.renorm and layer_class is BatchNormalization:
                # As `BatchNormalization.from_config` does.
                target = BatchRenormalization
            # The constructor, not `from_config`, so that a bad argument
            # raises the layer's own `ValueError`.
            new = target(**{**config, **kwargs})
        else:
            new = _graph.copy_node(layer)
        copies.append((layer, new))
        return new

    new_model = keras.models.clone_model(
        model, clone_function=clone_function, recursive=True
    )
    for layer, new in copies:
        if isinstance(new, BatchNormalization):
            # By name: the new layer may have weights of its own (such as
            # `num_batches_tracked`), which keep their initial values.
            values = {w.name: w.numpy() for w in layer.weights}
            for weight in new.weights:
                if weight.name in values:
                    weight.assign(values[weight.name])
                elif weight.name in _DERIVED:
                    weight.assign(_DERIVED[weight.name](values, new.epsilon))
        else:
            _graph.copy_weights(layer, new)
    return new_model
