"""Converting a model's core batch normalization to keras_bn layers."""

import inspect
import logging
import warnings

import keras
import numpy as np

from keras_bn import _graph
from keras_bn import _statistics
from keras_bn.batch_normalization import BatchNormalization
from keras_bn.batch_renormalization import BatchRenormalization
from keras_bn.frozen_batch_normalization import FrozenBatchNormalization

_LOG = logging.getLogger(__name__)

_RENORM_KEYS = ("renorm", "renorm_clipping", "renorm_momentum")
# The base layer's arguments in every layer's config.
_BASE_ARGUMENTS = ("name", "trainable", "dtype")

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
    a layer (such as `x + y` on the model's tensors) is copied as it is.
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

    Each layer converted, and each batch normalization left as it is with
    the reason (already a keras_bn layer, say), is logged at the `INFO`
    level to the `keras_bn.conversion` logger
    (`logging.basicConfig(level=logging.INFO)` shows it). A model with
    nothing to convert raises a `ValueError`, as `recompute_statistics`
    and `fold_batch_normalization` do for a model without batch
    normalization: an unchanged copy would hide the mistake.

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

    With `layer_class=keras_bn.FrozenBatchNormalization` the conversion
    freezes the model: every batch normalization, core Keras's and
    keras_bn's (renormalization included), becomes a frozen layer with the
    arguments that apply to it (`axis`, `epsilon`, `center`, `scale`, the
    initializers, regularizers and constraints), the same `gamma`, `beta`,
    `moving_mean` and `moving_variance`, and the same inference outputs,
    now in training too. A `UserWarning` names the layers whose statistics
    still hold their initial values (mean 0, variance 1 everywhere): they
    were never trained, and frozen they would keep those values.

    Args:
        model: A built Sequential or Functional model.
        layer_class: The keras_bn class to use:
            `keras_bn.BatchNormalization`, `keras_bn.FrozenBatchNormalization`
            or a subclass of either. Defaults to
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
        and issubclass(
            layer_class, (BatchNormalization, FrozenBatchNormalization)
        )
    ):
        raise ValueError(
            "Argument `layer_class` must be keras_bn.BatchNormalization, "
            "keras_bn.FrozenBatchNormalization or a subclass of either. "
            f"Received: layer_class={layer_class!r}"
        )
    freezing = issubclass(layer_class, FrozenBatchNormalization)
    if not _graph.is_graph_model(model) or not model.built:
        raise ValueError(
            "Argument `model` must be a built Sequential or Functional "
            f"model. Received: model={model!r}"
        )
    _check_something_to_convert(model, layer_class, freezing)
    copies = []

    def clone_function(layer):
        if _converts(layer, freezing):
            config = layer.get_config()
            if freezing:
                config = _frozen_arguments(config, layer_class)
            elif not layer.renorm:
                # Each keras_bn class sets its own renormalization defaults.
                for key in _RENORM_KEYS:
                    config.pop(key, None)
            target = layer_class
            if layer_class is BatchNormalization and layer.renorm:
                # As `BatchNormalization.from_config` does.
                target = BatchRenormalization
            # The constructor, not `from_config`, so that a bad argument
            # raises the layer's own `ValueError`.
            new = target(**{**config, **kwargs})
            _LOG.info(
                "%s: %s converted to keras_bn.%s", layer.name,
                type(layer).__name__, target.__name__,
            )
        else:
            _log_left(layer, layer_class)
            new = _graph.copy_node(layer)
        copies.append((layer, new))
        return new

    new_model = keras.models.clone_model(
        model, clone_function=clone_function, recursive=True
    )
    for layer, new in copies:
        if isinstance(new, (BatchNormalization, FrozenBatchNormalization)):
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
    if freezing:
        _warn_untrained(
            new for _, new in copies
            if isinstance(new, FrozenBatchNormalization)
        )
    return new_model


def _converts(layer, freezing):
    """Whether `layer` becomes a new layer: core BN, or any BN to freeze."""
    return type(layer) is keras.layers.BatchNormalization or (
        freezing and isinstance(layer, BatchNormalization)
    )


def _check_something_to_convert(model, layer_class, freezing):
    if not any(
        _converts(layer, freezing)
        for layer in model._flatten_layers(include_self=False)
    ):
        what = (
            "a batch normalization to freeze (keras.layers."
            "BatchNormalization or a keras_bn layer other than "
            "FrozenBatchNormalization"
            if freezing
            else "a keras.layers.BatchNormalization to convert (keras_bn "
            "layers are left as they are"
        )
        raise ValueError(
            f"Argument `model` must hold {what}, nested ones included); it "
            f"has none, so there is nothing to convert to "
            f"{layer_class.__name__}. Received: model={model!r}"
        )


def _log_left(layer, layer_class):
    """Logs why a batch normalization `layer` is copied unchanged."""
    if isinstance(layer, FrozenBatchNormalization):
        reason = "already frozen"
    elif isinstance(layer, BatchNormalization):
        reason = (
            f"already keras_bn.{type(layer).__name__}; only core Keras "
            f"layers become {layer_class.__name__}"
        )
    elif isinstance(layer, keras.layers.BatchNormalization):
        reason = (
            f"a subclass of keras.layers.BatchNormalization "
            f"({type(layer).__name__}), whose own behaviour a conversion "
            "would drop"
        )
    else:
        return
    _LOG.info("%s: left as it is: %s", layer.name, reason)


def _frozen_arguments(config, layer_class):
    """The entries of a batch normalization's `config` that `layer_class`
    (a frozen class) takes: momentum, renormalization, ghost batches and
    synchronization do not apply to a layer that never trains its
    statistics."""
    names = set(inspect.signature(layer_class.__init__).parameters)
    return {
        key: value for key, value in config.items()
        if key in names or key in _BASE_ARGUMENTS
    }


def _warn_untrained(layers):
    """Warns about frozen layers whose statistics are the initial ones.

    Statistics of exactly zero mean and unit variance everywhere were never
    updated: frozen, they would normalize with numbers no data gave.
    """
    untrained = [
        layer.name for layer in layers
        if not np.any(layer.moving_mean.numpy())
        and np.all(layer.moving_variance.numpy() == 1)
    ]
    if untrained:
        warnings.warn(
            f"{len(untrained)} batch normalization layer(s) frozen with "
            "their initial statistics (moving_mean 0, moving_variance 1 "
            "everywhere), which no training has updated: "
            f"{', '.join(repr(name) for name in untrained)}. Frozen, they "
            "keep these statistics for good: freeze a trained model, or "
            "first recompute the statistics on data "
            "(keras_bn.recompute_statistics).",
            stacklevel=3,
        )
