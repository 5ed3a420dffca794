"""Tests of keras_bn.BatchNormalization."""

import keras
import numpy as np
import pytest
from absl.testing import parameterized

import keras_bn
from tests import test_case


class BatchNormalizationLayerTest(test_case.LayerTestCase):
    @parameterized.named_parameters(
        ("default", {}, (8, 4), 2, 2),
        ("axis_1", {"axis": 1}, (8, 3, 5), 2, 2),
        ("axes_list", {"axis": [1, 3]}, (4, 3, 2, 5), 2, 2),
        ("ghost", {"virtual_batch_size": 4}, (8, 6), 2, 2),
        ("ghost_remainder", {"virtual_batch_size": 3}, (8, 6), 2, 2),
        ("cumulative", {"momentum": None}, (8, 4), 2, 3),
        ("no_affine", {"center": False, "scale": False}, (8, 4), 0, 2),
    )
    def test_layer(self, kwargs, shape, trainable, non_trainable):
        self.run_layer_test(
            keras_bn.BatchNormalization,
            kwargs,
            input_shape=shape,
            expected_num_trainable_weights=trainable,
            expected_num_non_trainable_weights=non_trainable,
        )
