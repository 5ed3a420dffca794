"""Test setup shared by every test file.

Two logical CPU devices are created before TensorFlow initializes, so that
`tf.distribute.MirroredStrategy` tests can run on any machine; every test
starts from the same seed.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402

NUM_LOGICAL_CPUS = 2

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
    )
    # Exact float32 matmuls on GPUs (TF32 would loosen the 1e-5 checks).
    tf.config.experimental.enable_tensor_float_32_execution(False)


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1337)
    yield
    keras.config.set_dtype_policy("float32")
