"""Recurrent batch normalization for the GRU: `BNGRUCell` and `BNGRU`.

A thin variant of `keras_bn.BNLSTM`: the same per-step statistics and
moving-statistics machinery, with the GRU's step.
"""

from keras import ops
from keras import saving

from keras_bn import _recurrent
from keras_bn import _rnn
from keras_bn import _validation


@saving.register_keras_serializable(package="keras_bn")
class BNGRUCell(_recurrent.RecurrentCell):
    """The weights and the recurrence of `BNGRU`.

    Like `keras_bn.BNLSTMCell`, this cell runs over whole sequences
    (inputs of shape `(batch, timesteps, features)`), since its statistics
    depend on the step index; use it through `BNGRU`, where the arguments
    and the equations are documented.

    Call arguments:
        sequences: Tensor of shape `(batch, timesteps, features)`.
        initial_state: Optional list `[h]`, with `h` of shape `(batch,
            units)`.
        mask: Optional boolean tensor `(batch, timesteps)`.
        training: Python boolean, training or inference mode.
        first_step: Optional integer tensor, the index of the first step
            in the stream (the rows of the moving statistics used and
            updated start there). Defaults to `None`, step 0.
        unroll: Python boolean, whether to run the steps as a Python loop.
            Defaults to `False`.

    Returns `(outputs, [h])`: the hidden states of every step, `(batch,
    timesteps, units)`, and the final state.

    Example:

    >>> import numpy as np
    >>> import keras_bn
    >>> cell = keras_bn.BNGRUCell(3)
    >>> outputs, (h,) = cell(np.ones((2, 5, 4), "float32"))
    >>> tuple(outputs.shape), tuple(h.shape)
    ((2, 5, 3), (2, 3))

    Reference:

    - [Cooijmans et al., 2016](https://arxiv.org/abs/1603.09025).
    """

    num_gates = 3
    step_terms = (("recurrent", 3),)

    def __init__(self, units, reset_after=True, **kwargs):
        super().__init__(units, **kwargs)
        if reset_after is not True:
            _validation.fail(
                "reset_after", reset_after, "True",
                "BNGRU computes the GRU of `keras.layers.GRU(reset_after="
                "True)`, the reset gate applied after the recurrent product.",
            )
        self.reset_after = True

    def get_config(self):
        return {**super().get_config(), "reset_after": self.reset_after}

    def _bias_shape(self):
        # Input and recurrent biases, as `keras.layers.GRU` with
        # `reset_after=True`: the recurrent bias of the candidate is gated
        # by the reset gate.
        return (2, self.num_gates * self.units)

    def _input_bias(self, dtype):
        if self.bias is None:
            return 0.0
        return ops.cast(self.bias[0], dtype)

    def _step_weights(self, dtype):
        weights = super()._step_weights(dtype)
        if self.bias is not None:
            weights["recurrent_bias"] = ops.cast(self.bias[1], dtype)
        return weights

    def _step(self, inputs, states, weights, population, mask, dropout):
        recurrent, stats = self._recurrent_term(
            states, weights, (population or {}).get("recurrent"), mask,
            dropout,
        )
        if "recurrent_bias" in weights:
            recurrent = recurrent + weights["recurrent_bias"]
        x_z, x_r, x_h = ops.split(inputs, 3, axis=-1)
        h_z, h_r, h_h = ops.split(recurrent, 3, axis=-1)
        z = self.recurrent_activation(x_z + h_z)
        r = self.recurrent_activation(x_r + h_r)
        candidate = self.activation(x_h + r * h_h)
        h = z * states[0] + (1.0 - z) * candidate
        return [h], {"recurrent": stats}


@saving.register_keras_serializable(package="keras_bn")
class BNGRU(_rnn.RecurrentLayer):
    """Gated recurrent unit with recurrent batch normalization.

    The recurrent batch normalization of Cooijmans et al. (2016) applied to
    the GRU of `keras.layers.GRU` (`reset_after=True`): the input and
    recurrent products are normalized separately, with statistics per time
    step,

        (x_z, x_r, x_h) = BN(W_x x_t; gamma_x) + b_x
        (h_z, h_r, h_h) = BN(W_h h_{t-1}; gamma_h) + b_h
        z = sigmoid(x_z + h_z),  r = sigmoid(x_r + h_r)
        h_t = z * h_{t-1} + (1 - z) * tanh(x_h + r * h_h)

    with `BN(v; gamma) = gamma * (v - mean) / sqrt(var + epsilon)`. The
    weights (`kernel`, `recurrent_kernel`, and `bias` of shape `(2, 3 *
    units)`, gate order `(z, r, h)`) are those of `keras.layers.GRU`, so
    they move between the two with `set_weights`.

    Everything else is as in `keras_bn.BNLSTM`, whose documentation explains
    the per-step statistics, `statistics="shared"`, masking, stateful
    streams, and the bias-corrected moving statistics (kept for the input
    and recurrent terms; a GRU has no cell state to normalize). Every
    argument of `keras.layers.GRU` is accepted, so a core layer's config
    loads into this one, and the layer has core's read-only properties.

    Args:
        units: Positive integer, dimensionality of the output space.
        activation: Activation of the candidate. Defaults to `"tanh"`.
        recurrent_activation: Activation of the gates. Defaults to
            `"sigmoid"`.
        use_bias: Whether to add the biases. Defaults to `True`.
        kernel_initializer: Initializer for `kernel` (`W_x`). Defaults to
            `"glorot_uniform"`.
        recurrent_initializer: Initializer for `recurrent_kernel` (`W_h`).
            Defaults to `"orthogonal"`.
        bias_initializer: Initializer for `bias`. Defaults to `"zeros"`.
        kernel_regularizer: Regularizer for `kernel`. Defaults to `None`.
        recurrent_regularizer: Regularizer for `recurrent_kernel`. Defaults
            to `None`.
        bias_regularizer: Regularizer for `bias`. Defaults to `None`.
        activity_regularizer: Regularizer for the layer's output. Defaults
            to `None`.
        kernel_constraint: Constraint for `kernel`. Defaults to `None`.
        recurrent_constraint: Constraint for `recurrent_kernel`. Defaults to
            `None`.
        bias_constraint: Constraint for `bias`. Defaults to `None`.
        dropout: Float in `[0, 1)`, the fraction of the input features
            dropped (one mask per sequence). Defaults to `0.0`.
        recurrent_dropout: Float in `[0, 1)`, the fraction of `h_{t-1}`
            dropped before `W_h` (one mask per sequence). Defaults to `0.0`.
        seed: Random seed for dropout and the initial-state noise. Defaults
            to `None`.
        return_sequences: Whether to return every step's output, or only
            the last. Defaults to `False`.
        return_state: Whether to also return the final `h`. Defaults to
            `False`.
        go_backwards: Whether to process the sequence backwards and return
            the reversed sequence. Defaults to `False`.
        stateful: Whether each call continues the streams of the call
            before (states and time index; see `keras_bn.BNLSTM`). Defaults
            to `False`.
        unroll: Whether to run the steps as a Python loop (the number of
            timesteps must be known). Defaults to `False`.
        reset_after: Must be `True`, the GRU this layer computes (accepted
            so that `keras.layers.GRU` configs load). Defaults to `True`.
        use_cudnn: `"auto"` or `False`; there is no cuDNN kernel for the
            normalized recurrence. Defaults to `"auto"`.
        zero_output_for_mask: Whether masked steps output zeros (with
            `return_sequences=True`). Defaults to `False`.
        max_timesteps: Positive integer, the number of steps that keep
            their own moving statistics, or `None` for the number of
            timesteps of the input the layer is built on (a built layer's
            config holds that number). Defaults to `None`.
        momentum: Float in `[0, 1)`, the decay of the bias-corrected moving
            averages. Defaults to `0.9`.
        epsilon: Positive float added to the variances. Defaults to `1e-3`.
        statistics: `"per_step"` or `"shared"` (input-term statistics pooled
            over batch and time). Defaults to `"per_step"`.
        input_gamma_initializer: Initializer (or float) for `input_gamma`.
            Defaults to `0.1`.
        recurrent_gamma_initializer: Initializer (or float) for
            `recurrent_gamma`. Defaults to `0.1`.
        initial_state_noise: Non-negative float, the standard deviation of
            Gaussian noise added to the initial state in training (for a
            stateful layer, at the start of its stream only), as for
            `BNLSTM`. `0.0` turns it off. Defaults to `0.1`.
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`);
            `implementation` is accepted and ignored, as in Keras 3.
    Call arguments:
        sequences: A 3D tensor `(batch, timesteps, features)`.
        initial_state: Optional list `[h]`, `h` of shape `(batch, units)`.
        mask: Optional boolean tensor `(batch, timesteps)`; `False` marks
            padded steps, left out of their step's statistics.
        training: Python boolean: batch statistics and moving-statistics
            updates (`True`), or the moving statistics (`False`).

    Example:

    >>> import numpy as np
    >>> import keras_bn
    >>> x = np.random.default_rng(0).normal(size=(8, 5, 4)).astype("float32")
    >>> layer = keras_bn.BNGRU(3, max_timesteps=3)
    >>> tuple(layer(x, training=True).shape)
    (8, 3)
    >>> tuple(layer.cell.moving_recurrent_variance.shape)
    (3, 9)

    Reference:

    - [Cooijmans et al., 2016](https://arxiv.org/abs/1603.09025).
    """

    def __init__(
        self, units, activation="tanh", recurrent_activation="sigmoid",
        use_bias=True, kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal", bias_initializer="zeros",
        kernel_regularizer=None, recurrent_regularizer=None,
        bias_regularizer=None, activity_regularizer=None,
        kernel_constraint=None, recurrent_constraint=None, bias_constraint=None,
        dropout=0.0, recurrent_dropout=0.0, seed=None, return_sequences=False,
        return_state=False, go_backwards=False, stateful=False, unroll=False,
        reset_after=True, use_cudnn="auto",
        *,
        zero_output_for_mask=False, max_timesteps=None, momentum=0.9,
        epsilon=1e-3, statistics="per_step", input_gamma_initializer=0.1,
        recurrent_gamma_initializer=0.1, initial_state_noise=0.1, **kwargs,
    ):
        # Keras 3's own layers accept `implementation` and ignore it.
        kwargs.pop("implementation", None)
        cell = BNGRUCell(
            units,
            activation=activation,
            recurrent_activation=recurrent_activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            seed=seed,
            reset_after=reset_after,
            max_timesteps=max_timesteps,
            momentum=momentum,
            epsilon=epsilon,
            statistics=statistics,
            input_gamma_initializer=input_gamma_initializer,
            recurrent_gamma_initializer=recurrent_gamma_initializer,
            initial_state_noise=initial_state_noise,
            name="bngru_cell",
            dtype=kwargs.get("dtype"),
            trainable=kwargs.get("trainable", True),
        )
        super().__init__(
            cell,
            return_sequences=return_sequences,
            return_state=return_state,
            go_backwards=go_backwards,
            stateful=stateful,
            unroll=unroll,
            zero_output_for_mask=zero_output_for_mask,
            use_cudnn=use_cudnn,
            activity_regularizer=activity_regularizer,
            **kwargs,
        )

    @property
    def reset_after(self):
        return self.cell.reset_after
