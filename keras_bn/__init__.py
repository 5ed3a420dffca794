"""Batch-normalization layers for Keras 3."""

from keras_bn.batch_normalization import BatchNormalization

__version__ = "0.1.0.dev0"

__all__ = ["BatchNormalization", "__version__"]
