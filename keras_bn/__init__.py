"""Batch-normalization layers for Keras 3."""

from keras_bn import callbacks
from keras_bn import schedules
from keras_bn.adaptation import TENT
from keras_bn.batch_normalization import BatchNormalization
from keras_bn.batch_renormalization import BatchRenormalization
from keras_bn.bn_gru import BNGRU
from keras_bn.bn_gru import BNGRUCell
from keras_bn.bn_lstm import BNLSTM
from keras_bn.bn_lstm import BNLSTMCell
from keras_bn.conversion import convert_batch_normalization
from keras_bn.folding import fold_batch_normalization
from keras_bn.frozen_batch_normalization import FrozenBatchNormalization
from keras_bn.population import recompute_statistics

__version__ = "0.1.0"

__all__ = [
    "BatchNormalization",
    "BatchRenormalization",
    "FrozenBatchNormalization",
    "BNGRU",
    "BNGRUCell",
    "BNLSTM",
    "BNLSTMCell",
    "callbacks",
    "convert_batch_normalization",
    "fold_batch_normalization",
    "recompute_statistics",
    "schedules",
    "TENT",
    "__version__",
]
