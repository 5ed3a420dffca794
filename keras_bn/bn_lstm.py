"""Recurrent batch normalization: `BNLSTMCell` and `BNLSTM`."""

from keras import initializers
from keras import ops
from keras import saving

from keras_bn import _lstm_gradient
from keras_bn import _recurrent
from keras_bn import _rnn
from keras_bn import _scan
from keras_bn import _validation


@saving.register_keras_serializable(package="keras_bn")
class BNLSTMCell(_recurrent.RecurrentCell):
    """The weights and the recurrence of `BNLSTM`.

    Unlike `keras.layers.LSTMCell`, this cell runs over whole sequences
    (inputs of shape `(batch, timesteps, features)`): its statistics depend
    on the step index, and it writes the per-step batch statistics into the
    moving statistics once, after the loop. Use it through `BNLSTM`, which
    adds the `keras.layers.LSTM` interface (`return_sequences`,
    `go_backwards`, ...); the arguments and the equations are documented
    there.

    Call arguments:
        sequences: Tensor of shape `(batch, timesteps, features)`.
        initial_state: Optional list `[h, c]`, each `(batch, units)`.
        mask: Optional boolean tensor `(batch, timesteps)`.
        training: Python boolean, training or inference mode.
        first_step: Optional integer tensor, the index of the first step
            in the stream (the rows of the moving statistics used and
            updated start there). Defaults to `None`, step 0.
        unroll: Python boolean, whether to run the steps as a Python loop.
            Defaults to `False`.

    Returns `(outputs, [h, c])`: the hidden states of every step, `(batch,
    timesteps, units)`, and the final states.

    Example:

    >>> import numpy as np
    >>> import keras_bn
    >>> cell = keras_bn.BNLSTMCell(3)
    >>> x = np.ones((2, 5, 4), "float32")
    >>> outputs, (h, c) = cell(x)
    >>> tuple(outputs.shape), tuple(h.shape)
    ((2, 5, 3), (2, 3))

    Reference:

    - [Cooijmans et al., 2016](https://arxiv.org/abs/1603.09025).
    """

    num_gates = 4
    step_terms = (("recurrent", 4), ("cell", 1))
    has_written_gradient = True

    def __init__(
        self,
        units,
        unit_forget_bias=True,
        cell_gamma_initializer=0.1,
        cell_beta_initializer="zeros",
        written_gradient=None,
        **kwargs,
    ):
        super().__init__(units, **kwargs)
        self.unit_forget_bias = _validation.boolean(
            "unit_forget_bias", unit_forget_bias
        )
        self.cell_gamma_initializer = _validation.initializer(
            cell_gamma_initializer
        )
        self.cell_beta_initializer = initializers.get(cell_beta_initializer)
        self.written_gradient = _validation.boolean(
            "written_gradient", written_gradient, allow_none=True
        )
        # `written_gradient=True` that cannot be honoured raises here.
        self.loop_path()
        self.state_size = [self.units, self.units]

    def get_config(self):
        config = {
            "unit_forget_bias": self.unit_forget_bias,
            "cell_gamma_initializer": initializers.serialize(
                self.cell_gamma_initializer
            ),
            "cell_beta_initializer": initializers.serialize(
                self.cell_beta_initializer
            ),
            "written_gradient": self.written_gradient,
        }
        return {**super().get_config(), **config}

    def _bias_initializer(self):
        if not self.unit_forget_bias:
            return self.bias_initializer
        units, initializer = self.units, self.bias_initializer

        def bias_initializer(shape, dtype=None):
            return ops.concatenate(
                [
                    initializer((units,), dtype=dtype),
                    ops.ones((units,), dtype=dtype),
                    initializer((units * 2,), dtype=dtype),
                ]
            )

        return bias_initializer

    def _build_step_parameters(self):
        self.cell_gamma = self._add_parameter(
            "cell_gamma", self.units, self.cell_gamma_initializer
        )
        self.cell_beta = self._add_parameter(
            "cell_beta", self.units, self.cell_beta_initializer
        )

    def _step_weights(self, dtype):
        return {
            **super()._step_weights(dtype),
            "cell_gamma": ops.cast(self.cell_gamma, dtype),
            "cell_beta": ops.cast(self.cell_beta, dtype),
        }

    def _train_written(self, inputs, states, weights, optional, unroll):
        return _lstm_gradient.train_lstm(
            inputs, states,
            _lstm_gradient.Weights(
                weights["recurrent_kernel"], weights["recurrent_gamma"],
                weights["cell_gamma"], weights["cell_beta"],
            ),
            optional, self.epsilon, unroll, _scan.compile_written_loops(),
        )

    def _step(self, inputs, states, weights, population, mask, dropout):
        population = population or {}
        recurrent, recurrent_stats = self._recurrent_term(
            states, weights, population.get("recurrent"), mask, dropout
        )
        i, f, g, o = ops.split(inputs + recurrent, 4, axis=-1)
        c = self.recurrent_activation(f) * states[1] + (
            self.recurrent_activation(i) * self.activation(g)
        )
        normalized, cell_stats = self._normalize_step(
            c, weights["cell_gamma"], weights["cell_beta"],
            population.get("cell"), mask,
        )
        h = self.recurrent_activation(o) * self.activation(normalized)
        return [h, c], {"recurrent": recurrent_stats, "cell": cell_stats}


@saving.register_keras_serializable(package="keras_bn")
class BNLSTM(_rnn.RecurrentLayer):
    """Long short-term memory with recurrent batch normalization.

    The LSTM of Cooijmans et al. (2016): the input and recurrent products
    are batch-normalized separately, and so is the cell state on its way to
    the output,

        (i, f, g, o) = BN(W_h h_{t-1}; gamma_h) + BN(W_x x_t; gamma_x) + b
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))

    with `BN(z; gamma, beta) = gamma * (z - mean) / sqrt(var + epsilon) +
    beta`. The two products have no offset of their own (the bias `b`
    serves); the carried `c_t` is not normalized. The gate order in
    `kernel`, `recurrent_kernel` and `bias` is Keras's `(i, f, g, o)`, so
    these weights move to and from `keras.layers.LSTM` with `set_weights`.

    **Statistics per time step.** In training, `mean` and `var` are the
    mean and biased variance over the batch, separately for every step `t`
    (padded steps left out); `gamma` and `beta` are shared over time. With
    `statistics="shared"` the input term is normalized with statistics
    pooled over the batch and all steps (sequence-wise batch normalization,
    Laurent et al. 2016, which variable-length batches need), while the
    recurrent and cell terms keep per-step statistics, since a step cannot
    wait for the later steps of its own recurrence.

    **Population statistics.** The moving statistics are kept for each of
    the first `max_timesteps` steps, shaped `(max_timesteps, features)`
    (one row for the shared input term). In inference, step `t` uses row
    `min(t, max_timesteps - 1)`, so sequences longer than in training use
    the last kept step. In training, steps past the last row update it with
    the mean of their statistics. The loop returns the batch statistics of
    every step and the moving statistics are updated once per call, after
    it, as a bias-corrected exponential moving average:

        moving = sum_k (1 - momentum) momentum^(n - k) stat_k
                 / (1 - momentum^n)

    over the `n` batches seen so far (counted per row, in the non-trainable
    `input_updates` and `step_updates`). The first batch sets the moving
    statistics outright, so they never carry their initial values: with the
    plain moving average that `keras.layers.BatchNormalization` keeps, the
    initial variance of 1 still dominates the tiny variances of recurrent
    pre-activations after hundreds of steps, and inference with it is badly
    off. The default `momentum=0.9` (Keras layers use 0.99) keeps the
    statistics within about ten batches of the current weights, which the
    statistics of recurrent terms need while the weights still move fast;
    with long training on small batches, a larger momentum averages out more
    noise. For the most accurate population statistics, recompute them
    after training with the weights frozen (Wu & Johnson, 2021).

    Statistics and the recurrence are computed in float32 (or wider, for
    float64 inputs) under mixed precision; the outputs have the layer's
    compute dtype. Masked steps carry the states of the step before through,
    as in `keras.layers.LSTM`; the outputs at masked steps are those states
    (zeros with `zero_output_for_mask=True`, which `Bidirectional` sets).
    With `go_backwards=True` the steps are counted in the order they are
    processed, from the end of the sequence.

    **Stateful streams.** With `stateful=True` (which needs a fixed batch
    size, `keras.Input(..., batch_size=...)`), the final states of a call
    are the initial states of the next, and so is the time index: the `t`-th
    step of the stream since the last `reset_state()` uses row `min(t,
    max_timesteps - 1)` of the moving statistics, so a sequence fed in
    chunks gives the outputs it gives fed whole in inference. In training,
    each step is normalized with its own batch statistics and updates the
    row of its index in the stream (truncated back-propagation through a
    long sequence, as the paper's Penn Treebank runs). The states and the
    index are variables outside the layer's weights, as in
    `keras.layers.RNN`: `states` holds the states, `time_index` the index of
    the next step, and `reset_state()` zeros both.

    Every argument of `keras.layers.LSTM` is accepted, so a core layer's
    config loads into this one, and the layer has core's read-only
    properties (`units`, `activation`, the initializers, ...).

    Args:
        units: Positive integer, dimensionality of the output space.
        activation: Activation of the candidate and of the output. Defaults
            to `"tanh"`.
        recurrent_activation: Activation of the gates. Defaults to
            `"sigmoid"`.
        use_bias: Whether to add the bias `b`. Defaults to `True`.
        kernel_initializer: Initializer for `kernel` (`W_x`). Defaults to
            `"glorot_uniform"`.
        recurrent_initializer: Initializer for `recurrent_kernel` (`W_h`).
            Defaults to `"orthogonal"`.
        bias_initializer: Initializer for `bias`. Defaults to `"zeros"`.
        unit_forget_bias: If `True`, the forget-gate bias starts at 1.
            Defaults to `True`.
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
        return_state: Whether to also return the final `h` and `c`.
            Defaults to `False`.
        go_backwards: Whether to process the sequence backwards and return
            the reversed sequence. Defaults to `False`.
        stateful: Whether each call continues the streams of the call
            before (states and time index). Defaults to `False`.
        unroll: Whether to run the steps as a Python loop (the number of
            timesteps must be known) instead of a symbolic loop. Defaults
            to `False`.
        use_cudnn: `"auto"` or `False`; there is no cuDNN kernel for the
            normalized recurrence, and `True` (which requires one) raises.
            Defaults to `"auto"`.
        zero_output_for_mask: Whether masked steps output zeros (with
            `return_sequences=True`). Defaults to `False`.
        max_timesteps: Positive integer, the number of steps that keep
            their own moving statistics, or `None` for the number of
            timesteps of the input the layer is built on (which must then
            be known; a built layer's config holds that number). Defaults
            to `None`.
        momentum: Float in `[0, 1)`, the decay of the bias-corrected moving
            averages. Defaults to `0.9`.
        epsilon: Positive float added to the variances. Defaults to `1e-3`.
        statistics: `"per_step"` or `"shared"` (input-term statistics pooled
            over batch and time). Defaults to `"per_step"`.
        input_gamma_initializer: Initializer (or float) for `input_gamma`.
            Defaults to `0.1`: larger values saturate the gates.
        recurrent_gamma_initializer: Initializer (or float) for
            `recurrent_gamma`. Defaults to `0.1`.
        cell_gamma_initializer: Initializer (or float) for `cell_gamma`.
            Defaults to `0.1`.
        cell_beta_initializer: Initializer for `cell_beta`. Defaults to
            `"zeros"`.
        initial_state_noise: Non-negative float, the standard deviation of
            Gaussian noise added to the initial hidden state in training
            (for a stateful layer, at the start of its stream only). Without
            it the first steps' terms are constant over the batch (a zero
            state, inputs such as black border pixels): training normalizes
            them to zero, while inference subtracts moving means that lag
            behind the weights. `0.0` turns it off. Defaults to `0.1`, the
            paper's value.
        written_gradient: Whether training runs the loop with its
            back-propagation through time written out, which keeps fewer
            intermediates per step than the differentiated step loop: `None`
            lets keras_bn choose (the written loop wherever it serves),
            `True` requires it (a `ValueError` says why it cannot serve:
            activations other than the paper's `tanh` and `sigmoid`, or the
            torch backend), `False` runs the step loop. `loop_path()` names
            the loop a call runs. Defaults to `None`.
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`);
            `implementation`, which Keras 3 ignores, is accepted and
            ignored.
    Call arguments:
        sequences: A 3D tensor `(batch, timesteps, features)`.
        initial_state: Optional list `[h, c]` of tensors `(batch, units)`.
        mask: Optional boolean tensor `(batch, timesteps)`; `False` marks
            padded steps, left out of their step's statistics.
        training: Python boolean: batch statistics and moving-statistics
            updates (`True`), or the moving statistics (`False`).

    Example:

    >>> import numpy as np
    >>> import keras_bn
    >>> x = np.random.default_rng(0).normal(size=(8, 5, 4)).astype("float32")
    >>> layer = keras_bn.BNLSTM(3, return_sequences=True)
    >>> tuple(layer(x, training=True).shape)
    (8, 5, 3)
    >>> tuple(layer.cell.moving_recurrent_mean.shape)
    (5, 12)

    Reference:

    - [Cooijmans et al., 2016](https://arxiv.org/abs/1603.09025).
    - [Laurent et al., 2016](https://arxiv.org/abs/1510.01378)
      (`statistics="shared"`).
    """

    def __init__(
        self, units, activation="tanh", recurrent_activation="sigmoid",
        use_bias=True, kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal", bias_initializer="zeros",
        unit_forget_bias=True, kernel_regularizer=None,
        recurrent_regularizer=None, bias_regularizer=None,
        activity_regularizer=None, kernel_constraint=None,
        recurrent_constraint=None, bias_constraint=None, dropout=0.0,
        recurrent_dropout=0.0, seed=None, return_sequences=False,
        return_state=False, go_backwards=False, stateful=False, unroll=False,
        use_cudnn="auto",
        *,
        zero_output_for_mask=False, max_timesteps=None, momentum=0.9,
        epsilon=1e-3, statistics="per_step", input_gamma_initializer=0.1,
        recurrent_gamma_initializer=0.1, cell_gamma_initializer=0.1,
        cell_beta_initializer="zeros", initial_state_noise=0.1,
        written_gradient=None, **kwargs,
    ):
        # Keras 3's own layers accept `implementation` and ignore it.
        kwargs.pop("implementation", None)
        cell = BNLSTMCell(
            units,
            activation=activation,
            recurrent_activation=recurrent_activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            unit_forget_bias=unit_forget_bias,
            kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            seed=seed,
            max_timesteps=max_timesteps,
            momentum=momentum,
            epsilon=epsilon,
            statistics=statistics,
            input_gamma_initializer=input_gamma_initializer,
            recurrent_gamma_initializer=recurrent_gamma_initializer,
            cell_gamma_initializer=cell_gamma_initializer,
            cell_beta_initializer=cell_beta_initializer,
            initial_state_noise=initial_state_noise,
            written_gradient=written_gradient,
            name="bnlstm_cell",
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
    def unit_forget_bias(self):
        return self.cell.unit_forget_bias

    @property
    def cell_gamma_initializer(self):
        return self.cell.cell_gamma_initializer

    @property
    def cell_beta_initializer(self):
        return self.cell.cell_beta_initializer

    @property
    def written_gradient(self):
        return self.cell.written_gradient
