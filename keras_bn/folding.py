"""Folding batch normalization into the preceding layer for inference."""

import logging

import keras
import numpy as np

from keras_bn import _graph
from keras_bn import _statistics
from keras_bn.batch_normalization import BatchNormalization
from keras_bn.frozen_batch_normalization import FrozenBatchNormalization

_LOG = logging.getLogger(__name__)

# The layers a following batch normalization can be folded into: each
# computes `x @ kernel + bias` (or a convolution) with one output channel per
# position on the last axis of its kernel (a depthwise kernel's last two).
_FOLDABLE_TYPES = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.DepthwiseConv2D,
)


def fold_batch_normalization(model):
    """Returns a copy of `model` with batch normalization folded away.

    In inference, batch normalization is an affine map per channel,

        y = gamma * (z - moving_mean) / sqrt(moving_variance + epsilon)
            + beta,

    so when `z = conv(x, kernel) + bias` comes from a linear layer, both
    fold into one layer with

        s = gamma / sqrt(moving_variance + epsilon)
        kernel' = kernel * s    (per output channel)
        bias' = (bias - moving_mean) * s + beta.

    Every `keras.layers.BatchNormalization` or keras_bn batch normalization
    (`keras_bn.FrozenBatchNormalization` included) that directly follows
    a `Dense`, `Conv1D`, `Conv2D`, `Conv3D` or `DepthwiseConv2D` layer is
    folded into it when that layer has no activation, is called once and
    has the batch normalization as its only consumer (its output is no
    model output either), and when the batch
    normalization normalizes that layer's channel axis only (`axis=-1`, or
    `axis=1` after `data_format="channels_first"`). All other layers are
    copied unchanged, with their weights; nested Sequential and Functional
    models are folded the same way. Core layers with `renorm=True` are left
    as they are.

    Each batch normalization folded, and each one left with the reason
    (for instance `bn_3: not folded: after Dense 'dense_2' with activation
    'relu', which comes between`), is logged at the `INFO` level to the
    `keras_bn.folding` logger (`logging.basicConfig(level=logging.INFO)`
    shows it). A model without any batch normalization raises a
    `ValueError`, as `recompute_statistics` and
    `convert_batch_normalization` do: folding it is a mistake that an
    unchanged copy would let pass. A model whose batch normalizations can
    all not be folded is copied, and the log says why for each.

    The copy is for inference: in inference mode its outputs equal the
    original's up to float rounding (the folded weights are computed in
    float64), while in training mode it no longer normalizes. It is not
    compiled. Folding works on every Keras backend.

    Args:
        model: A built Sequential or Functional model.

    Returns:
        The pair `(folded_model, folded)` of the new model and the list of
        `(layer_name, batch_normalization_name)` pairs that were folded;
        the names of layers in nested models are prefixed with the nested
        model's name and `/`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> import keras_bn
    >>> model = keras.Sequential([
    ...     keras.Input((4,)), keras.layers.Dense(3, name="dense"),
    ...     keras_bn.BatchNormalization(name="bn"),
    ... ])
    >>> folded_model, folded = keras_bn.fold_batch_normalization(model)
    >>> folded
    [('dense', 'bn')]
    >>> x = np.ones((2, 4), "float32")
    >>> numpy = keras.ops.convert_to_numpy
    >>> bool(np.allclose(numpy(folded_model(x)), numpy(model(x)), atol=1e-6))
    True
    """
    if not _graph.is_graph_model(model) or not model.built:
        raise ValueError(
            "Argument `model` must be a built Sequential or Functional "
            f"model. Received: model={model!r}"
        )
    if not any(
        _is_any_batch_normalization(layer)
        for layer in model._flatten_layers(include_self=False)
    ):
        raise ValueError(
            "Argument `model` must hold a batch normalization to fold "
            "(keras.layers.BatchNormalization or a keras_bn layer, nested "
            f"ones included); it has none. Received: model={model!r}"
        )
    return _fold(model, prefix="")


def _fold(model, prefix):
    """`fold_batch_normalization` for a model checked already."""
    if isinstance(model, keras.Sequential):
        pairs, left = _sequential_pairs(model)
    else:
        pairs, left = _functional_pairs(model)
    for bn, reason in left:
        _LOG.info("%s%s: not folded: %s", prefix, bn.name, reason)
    folded_bn = {id(bn) for _, bn in pairs}
    producers = {id(producer): bn for producer, bn in pairs}
    folded = []
    copies = []

    def clone_function(layer):
        if _graph.is_graph_model(layer):
            inner, inner_folded = _fold(layer, f"{prefix}{layer.name}/")
            folded.extend(
                (f"{layer.name}/{a}", f"{layer.name}/{b}")
                for a, b in inner_folded
            )
            return inner
        bn = producers.get(id(layer))
        if bn is not None:
            config = layer.get_config()
            config["use_bias"] = True
            new = layer.__class__.from_config(config)
            copies.append((new, _folded_weights(layer, bn)))
            folded.append((layer.name, bn.name))
            _LOG.info(
                "%s%s: folded into %s %r", prefix, bn.name,
                type(layer).__name__, layer.name,
            )
            return new
        new = _graph.copy_node(layer)
        if isinstance(layer, keras.layers.Layer):
            copies.append((new, layer.get_weights()))
        return new

    if isinstance(model, keras.Sequential):
        new_layers = [
            clone_function(layer)
            for layer in model.layers
            if id(layer) not in folded_bn
        ]
        source = model.inputs[0]
        new_model = keras.Sequential(
            [keras.Input(batch_shape=source.shape, dtype=source.dtype)]
            + new_layers,
            name=model.name,
        )
    else:
        # A folded batch normalization is called as the identity; Keras
        # keeps the original layer object for it, which the copy never uses.
        skipped = set()

        def clone_or_skip(layer):
            if id(layer) in folded_bn:
                skipped.add(id(layer))
                return layer
            return clone_function(layer)

        def call_function(layer, *args, **kwargs):
            if id(layer) in skipped:
                return args[0]
            return layer(*args, **kwargs)

        new_model = keras.models.clone_model(
            model, clone_function=clone_or_skip, call_function=call_function
        )
    for layer, weights in copies:
        layer.set_weights(weights)
    return new_model, folded


def _sequential_pairs(model):
    """`([(producer, bn)], [(bn, reason)])`: pairs to fold, and the left."""
    pairs, left = [], []
    layers = model.layers
    for index, bn in enumerate(layers):
        if not _is_any_batch_normalization(bn):
            continue
        if index == 0:
            reason = "it is the first layer: nothing before it to fold into"
        else:
            reason = _why_not_foldable(layers[index - 1], bn)
        if reason is None:
            pairs.append((layers[index - 1], bn))
        else:
            left.append((bn, reason))
    return pairs, left


def _functional_pairs(model):
    """`([(producer, bn)], [(bn, reason)])`: pairs to fold, and the left."""
    outputs = {id(t) for t in model.outputs}
    pairs, left = [], []
    for bn in model.layers:
        if not _is_any_batch_normalization(bn):
            continue
        reason = _why_not_in_graph(bn, outputs)
        if reason is None:
            pairs.append((bn._inbound_nodes[0].parent_nodes[0].operation, bn))
        else:
            left.append((bn, reason))
    return pairs, left


def _why_not_in_graph(bn, outputs):
    """Why `bn` of a Functional model cannot be folded, or `None`."""
    # Keras 3 keeps the call graph only in these node lists.
    if len(bn._inbound_nodes) != 1:
        return f"it is called {len(bn._inbound_nodes)} times"
    parents = bn._inbound_nodes[0].parent_nodes
    if len(parents) != 1:
        return "it does not read the output of one layer"
    producer = parents[0].operation
    if isinstance(producer, keras.layers.InputLayer):
        return "it reads a model input: nothing before it to fold into"
    described = _describe(producer)
    if len(producer._inbound_nodes) != 1:
        return (
            f"after {described}, which is called "
            f"{len(producer._inbound_nodes)} times"
        )
    if len(producer._outbound_nodes) != 1:
        return f"after {described}, whose output other layers read too"
    if any(id(t) in outputs for t in producer._inbound_nodes[0].outputs):
        return f"after {described}, whose output is a model output too"
    return _why_not_foldable(producer, bn)


def _is_any_batch_normalization(layer):
    return isinstance(
        layer,
        (
            keras.layers.BatchNormalization,
            BatchNormalization,
            FrozenBatchNormalization,
        ),
    )


def _is_batch_normalization(layer):
    if isinstance(layer, (BatchNormalization, FrozenBatchNormalization)):
        return True
    return type(layer) is keras.layers.BatchNormalization and not (
        layer.renorm
    )


def _describe(layer):
    return f"{type(layer).__name__} {layer.name!r}"


def _why_not_foldable(producer, bn):
    """Why `bn` cannot be folded into `producer`, or `None`."""
    if not _is_batch_normalization(bn):
        if getattr(bn, "renorm", False):
            return "a core BatchNormalization with renorm=True"
        return f"{type(bn).__name__} is not a batch normalization it folds"
    described = _describe(producer)
    if type(producer) not in _FOLDABLE_TYPES:
        return (
            f"after {described}, not a Dense, Conv1D, Conv2D, Conv3D or "
            "DepthwiseConv2D layer"
        )
    config = producer.get_config()
    activation = config.get("activation")
    if activation != "linear":
        return (
            f"after {described} with activation {activation!r}, which "
            "comes between"
        )
    if config.get("lora_rank"):
        return f"after {described}, which has LoRA weights"
    if getattr(producer, "quantization_mode", None) is not None:
        return f"after {described}, which is quantized"
    rank = bn.input_spec.ndim
    channel_axis = (
        1 if config.get("data_format") == "channels_first" else rank - 1
    )
    axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    if sorted(a % rank for a in axes) != [channel_axis]:
        return (
            f"it normalizes axis {bn.axis!r}, not only the channel axis "
            f"{channel_axis} of {described}"
        )
    return None


def _folded_weights(producer, bn):
    """`[kernel, bias]` of `producer` with `bn`'s inference map folded in."""
    weights = {w.name: _float64(w) for w in bn.weights}
    variance = weights["moving_variance"]
    scale, offset = _statistics.affine(
        weights["moving_mean"],
        variance,
        bn.epsilon,
        weights.get("gamma"),
        weights.get("beta"),
    )
    scale = np.broadcast_to(scale, variance.shape)
    kernel = _float64(producer.kernel)
    if isinstance(producer, keras.layers.DepthwiseConv2D):
        kernel_scale = scale.reshape(kernel.shape[-2:])
    else:
        kernel_scale = scale
    bias = (
        _float64(producer.bias)
        if producer.use_bias
        else np.zeros(variance.shape)
    )
    bias = bias * scale + offset
    return [
        (kernel * kernel_scale).astype(producer.kernel.dtype),
        bias.astype(producer.kernel.dtype),
    ]


def _float64(variable):
    # `np.asarray` fails on PyTorch tensors that require grad.
    return keras.ops.convert_to_numpy(variable).astype("float64")
