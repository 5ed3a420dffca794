"""Copying the nodes of a Keras model's graph, for the model tools.

A functional model's graph holds layers and also `keras.ops` operations
that are not layers (`x + y` on symbolic tensors becomes an `Add`
operation), which have no weights. The tools copy every node here.
"""

import keras
from keras.src.models.functional import Functional
from keras.src.saving.serialization_lib import SafeModeScope


def is_graph_model(layer):
    """Whether `layer` is a Sequential or Functional model.

    Subclassed models have no graph of layers to rewrite.
    """
    return isinstance(layer, (keras.Sequential, Functional))


def copy_node(node):
    """A new node like `node`, from its config, with no weights set.

    A layer's weights are the caller's to set (`copy_weights`). An
    operation that is not a layer holds no state: it is rebuilt from its
    config as `keras.models.clone_model` does, or, when it cannot give one,
    used as it is. Safe mode, which refuses to rebuild a `Lambda` layer's
    Python function from a file, is off here: the function comes from the
    caller's own live model.
    """
    with SafeModeScope(safe_mode=False):
        if isinstance(node, keras.layers.Layer):
            return node.__class__.from_config(node.get_config())
        try:
            config = node.get_config()
        except NotImplementedError:
            return node
        return node.__class__.from_config(config)


def copy_weights(source, target):
    """Sets the weights of `target` to those of `source`, when it has any."""
    if isinstance(source, keras.layers.Layer):
        target.set_weights(source.get_weights())
