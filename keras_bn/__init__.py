"""Batch-normalization layers for Keras 3."""

from keras_bn import schedules
from keras_bn.batch_normalization import BatchNormalization
from keras_bn.batch_renormalization import BatchRenormalization

__version__ = "0.1.0.dev0"

__all__ = [
    "BatchNormalization",
    "BatchRenormalization",
    "schedules",
    "__version__",
]
