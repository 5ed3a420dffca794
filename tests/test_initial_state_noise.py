"""The noise on the initial hidden state of `BNLSTM` and `BNGRU`.

Without it the first steps' terms are constant over the batch (a zero
state, and inputs equal across the batch, such as black border pixels):
training normalizes them to zero whatever their value, while inference
subtracts moving means that lag behind the weights. With the default noise
the recurrent term has a spread from the first step on, the spread a NumPy
computation from the recurrent kernel predicts.
"""

import keras
import numpy as np
from absl.testing import parameterized

import keras_bn
from tests import test_case
from tests.test_bn_lstm import EXACT
from tests.test_bn_lstm import loop_argument

UNITS = 3
FEATURES = 2
# The paper's value, and the layers' default.
NOISE = 0.1

# Layer class, loop (`None`: the layer's only one).
LAYERS = (
    ("lstm_generic", keras_bn.BNLSTM, "generic"),
    ("lstm_written", keras_bn.BNLSTM, "written"),
    ("gru", keras_bn.BNGRU, None),
)


def layer_argument(test, loop):
    return {} if loop is None else loop_argument(test, loop)


class InitialStateNoiseTest(test_case.LayerTestCase):
    @parameterized.named_parameters(*LAYERS)
    def test_default_spreads_the_first_recurrent_term(self, cls, loop):
        # A batch whose first step is zero in every example: without noise
        # the state after it is the same for all, and the recurrent terms
        # of steps 0 and 1 have no variance.
        rng = np.random.default_rng(0)
        batch = 4096
        x = rng.normal(size=(batch, 3, FEATURES)).astype("float32")
        x[:, 0] = 0.0
        layer = cls(UNITS, seed=1, **layer_argument(self, loop))
        self.assertEqual(layer.initial_state_noise, NOISE)
        layer(x, training=True)
        kernel = keras.ops.convert_to_numpy(layer.cell.recurrent_kernel)
        # W_h n with n ~ N(0, NOISE**2 I): mean 0, variance
        # NOISE**2 |W_h[:, k]|**2 for column k.
        expected = NOISE**2 * np.sum(np.square(kernel), axis=0)
        mean = keras.ops.convert_to_numpy(layer.cell.moving_recurrent_mean)
        variance = keras.ops.convert_to_numpy(
            layer.cell.moving_recurrent_variance
        )
        # Sampling error: relative sqrt(2 / batch) = 2.2 % for the
        # variance, sqrt(variance / batch) for the mean.
        self.assertAllClose(variance[0], expected, atol=0, rtol=0.1)
        self.assertAllClose(
            mean[0], np.zeros_like(expected),
            atol=float(5 * np.sqrt(expected.max() / batch)), rtol=0,
        )
        # The spread carries on to the next step (zero without noise).
        self.assertGreater(variance[1].min(), 1e-6)

    @parameterized.named_parameters(*LAYERS)
    def test_no_noise_leaves_the_first_recurrent_term_constant(
        self, cls, loop
    ):
        x = np.random.default_rng(1).normal(size=(64, 3, FEATURES))
        x[:, 0] = 0.0
        layer = cls(UNITS, **EXACT, **layer_argument(self, loop))
        layer(x.astype("float32"), training=True)
        variance = keras.ops.convert_to_numpy(
            layer.cell.moving_recurrent_variance
        )
        self.assertAllClose(
            variance[:2], np.zeros_like(variance[:2]), atol=1e-10, rtol=0
        )

    @parameterized.named_parameters(*LAYERS)
    def test_a_stream_gets_noise_at_its_start_only(self, cls, loop):
        rng = np.random.default_rng(2)
        kwargs = {
            "return_sequences": True, "stateful": True, "max_timesteps": 4,
            "seed": 3, **layer_argument(self, loop),
        }
        noisy = cls(UNITS, initial_state_noise=NOISE, **kwargs)
        exact = cls(UNITS, **EXACT, **kwargs)
        for layer in (noisy, exact):
            layer.build((8, None, FEATURES))
        exact.set_weights(noisy.get_weights())
        first, second = (
            rng.normal(size=(8, 3, FEATURES)).astype("float32")
            for _ in range(2)
        )
        outputs = [
            keras.ops.convert_to_numpy(layer(first, training=True))
            for layer in (noisy, exact)
        ]
        # The stream's first step starts from a noisy state.
        self.assertGreater(np.abs(outputs[0] - outputs[1]).max(), 1e-3)
        # The same carried states, statistics and time index: the next
        # chunk continues the stream without noise.
        exact.set_weights(noisy.get_weights())
        for carried, state in zip(exact.states, noisy.states):
            carried.assign(state)
        self.assertAllClose(
            noisy(second, training=True), exact(second, training=True),
            atol=1e-6,
        )
        self.assertAllClose(
            exact.cell.moving_recurrent_variance,
            noisy.cell.moving_recurrent_variance, atol=1e-6,
        )
