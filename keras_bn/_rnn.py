"""The `keras.layers.RNN` interface of `BNLSTM` and `BNGRU`.

`RecurrentLayer` wraps a `RecurrentCell` (which runs whole sequences) with
core's arguments: `return_sequences`, `return_state`, `go_backwards`,
stateful streams, masks and initial states.
"""

import keras
from keras import layers
from keras import ops
from keras import regularizers

from keras_bn import _validation


class RecurrentLayer(layers.Layer):
    """The `keras.layers.RNN` interface around a `RecurrentCell`.

    As `keras.layers.RNN` for `keras.layers.LSTM`: a subclass builds its
    cell from its own arguments and passes it here with core's `RNN`
    arguments. The cell's arguments are read back as read-only properties
    (as `keras.layers.LSTM` does) and listed in the config.
    """

    def __init__(
        self,
        cell,
        *,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        zero_output_for_mask=False,
        use_cudnn="auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.cell = cell
        self.return_sequences = _validation.boolean(
            "return_sequences", return_sequences
        )
        self.return_state = _validation.boolean(
            "return_state", return_state
        )
        self.go_backwards = _validation.boolean(
            "go_backwards", go_backwards
        )
        self.stateful = _validation.boolean("stateful", stateful)
        self.unroll = _validation.boolean("unroll", unroll)
        self.zero_output_for_mask = _validation.boolean(
            "zero_output_for_mask", zero_output_for_mask
        )
        if use_cudnn not in ("auto", False):
            _validation.fail(
                "use_cudnn", use_cudnn, "'auto' or False",
                "The normalized recurrence has no cuDNN kernel.",
            )
        self.use_cudnn = use_cudnn
        self.supports_masking = True
        # Stateful use: the carried states and the stream's step index,
        # made in `build`. Kept out of the weights, as in
        # `keras.layers.RNN`, so that a stateful copy of a model takes the
        # weights of the model it copies.
        self._stream = None

    @property
    def units(self):
        return self.cell.units

    @property
    def activation(self):
        return self.cell.activation

    @property
    def recurrent_activation(self):
        return self.cell.recurrent_activation

    @property
    def use_bias(self):
        return self.cell.use_bias

    @property
    def kernel_initializer(self):
        return self.cell.kernel_initializer

    @property
    def recurrent_initializer(self):
        return self.cell.recurrent_initializer

    @property
    def bias_initializer(self):
        return self.cell.bias_initializer

    @property
    def kernel_regularizer(self):
        return self.cell.kernel_regularizer

    @property
    def recurrent_regularizer(self):
        return self.cell.recurrent_regularizer

    @property
    def bias_regularizer(self):
        return self.cell.bias_regularizer

    @property
    def kernel_constraint(self):
        return self.cell.kernel_constraint

    @property
    def recurrent_constraint(self):
        return self.cell.recurrent_constraint

    @property
    def bias_constraint(self):
        return self.cell.bias_constraint

    @property
    def dropout(self):
        return self.cell.dropout

    @property
    def recurrent_dropout(self):
        return self.cell.recurrent_dropout

    @property
    def seed(self):
        return self.cell.seed

    @property
    def max_timesteps(self):
        return self.cell.max_timesteps

    @property
    def momentum(self):
        return self.cell.momentum

    @property
    def epsilon(self):
        return self.cell.epsilon

    @property
    def statistics(self):
        return self.cell.statistics

    @property
    def input_gamma_initializer(self):
        return self.cell.input_gamma_initializer

    @property
    def recurrent_gamma_initializer(self):
        return self.cell.recurrent_gamma_initializer

    @property
    def initial_state_noise(self):
        return self.cell.initial_state_noise

    def loop_path(self, training=True):
        """The loop a call runs and why: a `Path` whose `name` is
        `"written"` (the gradient written out) or `"generic"` (the step
        loop)."""
        return self.cell.loop_path(training)

    @property
    def states(self):
        """The carried states (variables) of a stateful layer, or `None`."""
        return None if self._stream is None else self._stream.states

    @property
    def time_index(self):
        """The stream's next step index (a variable) when stateful."""
        return None if self._stream is None else self._stream.index

    def build(self, sequences_shape, initial_state_shape=None):
        if self.unroll and sequences_shape[1] is None:
            raise ValueError(
                f"Layer '{self.name}' cannot unroll a loop whose number of "
                "steps is unknown: give the inputs a fixed number of "
                "timesteps, or pass `unroll=False`. Received: "
                f"input_shape={tuple(sequences_shape)}"
            )
        self.cell.build(sequences_shape)
        self.input_spec = layers.InputSpec(
            ndim=3, axes={-1: sequences_shape[-1]}
        )
        if self.stateful:
            if self._stream is not None:
                self.reset_state()
            else:
                batch = sequences_shape[0]
                if batch is None:
                    raise ValueError(
                        f"Layer '{self.name}' is stateful, so it needs a "
                        "fixed batch size (`keras.Input(..., "
                        "batch_size=...)`). Received: "
                        f"input_shape={tuple(sequences_shape)}"
                    )
                self._stream = _Stream(
                    [
                        keras.Variable(
                            ops.zeros((batch, size)), trainable=False,
                            dtype=self.variable_dtype, name="rnn_state",
                        )
                        for size in self.cell.state_size
                    ],
                    keras.Variable(
                        0, trainable=False, dtype="int32", name="time_index"
                    ),
                )

    def reset_state(self):
        """Zeros the carried states and restarts the stream at step 0."""
        if self._stream is not None:
            for state in self._stream.states:
                state.assign(ops.zeros_like(state.value))
            self._stream.index.assign(0)

    def reset_states(self):
        """Alias of `reset_state`, as in `keras.layers.RNN`."""
        self.reset_state()

    def compute_output_shape(self, sequences_shape, initial_state_shape=None):
        batch = sequences_shape[0]
        if self.return_sequences:
            output_shape = (batch, sequences_shape[1], self.cell.units)
        else:
            output_shape = (batch, self.cell.units)
        if not self.return_state:
            return output_shape
        states = [(batch, size) for size in self.cell.state_size]
        return (output_shape, *states)

    def compute_mask(self, _, mask):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        output_mask = mask if self.return_sequences else None
        if self.return_state:
            return [output_mask] + [None] * len(self.cell.state_size)
        return output_mask

    def call(self, sequences, initial_state=None, mask=None, training=False):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        self._check_shapes(sequences, initial_state, mask)
        first_step = None
        if self._stream is not None:
            first_step = self._stream.index.value
            if initial_state is None:
                initial_state = [s.value for s in self._stream.states]
        if self.go_backwards:
            sequences = ops.flip(sequences, axis=1)
            if mask is not None:
                mask = ops.flip(mask, axis=1)
        outputs, states = self.cell(
            sequences, initial_state=initial_state, mask=mask,
            training=training, first_step=first_step, unroll=self.unroll,
        )
        if self._stream is not None:
            for variable, state in zip(self._stream.states, states):
                variable.assign(ops.cast(state, variable.dtype))
            self._stream.index.assign_add(
                ops.cast(ops.shape(sequences)[1], "int32")
            )
        if self.return_sequences:
            if self.zero_output_for_mask and mask is not None:
                outputs = ops.where(
                    ops.expand_dims(mask, -1), outputs, ops.zeros_like(outputs)
                )
        else:
            outputs = states[0]
        outputs = ops.cast(outputs, self.compute_dtype)
        if self.return_state:
            states = [ops.cast(s, self.compute_dtype) for s in states]
            return [outputs] + states
        return outputs

    def _check_shapes(self, sequences, initial_state, mask):
        """Raises for a mask or initial state that does not fit the input.

        Dimensions unknown when the call is traced are not checked.
        """
        batch, steps = tuple(sequences.shape)[:2]
        if self._stream is not None:
            expected = self._stream.states[0].shape[0]
            if batch is not None and batch != expected:
                raise ValueError(
                    f"Layer '{self.name}' is stateful with a batch size of "
                    f"{expected}: each call continues the {expected} "
                    "streams of the call before. Received: inputs of shape "
                    f"{tuple(sequences.shape)}"
                )
        if mask is not None:
            _check_shape(
                self.name, "mask", tuple(mask.shape), (batch, steps),
                f"(batch, timesteps) of the inputs of shape "
                f"{tuple(sequences.shape)}",
            )
        if initial_state is None:
            return
        if not isinstance(initial_state, (list, tuple)):
            initial_state = [initial_state]
        sizes = self.cell.state_size
        if len(initial_state) != len(sizes):
            raise ValueError(
                f"Layer '{self.name}' has {len(sizes)} states, so "
                "`initial_state` must be a list of that many tensors. "
                f"Received: {len(initial_state)} initial states"
            )
        for i, (state, size) in enumerate(zip(initial_state, sizes)):
            _check_shape(
                self.name, f"initial_state[{i}]", tuple(state.shape),
                (batch, size),
                f"(batch, units) for inputs of shape "
                f"{tuple(sequences.shape)}",
            )

    def get_config(self):
        config = self.cell.get_config()
        for key in ("name", "trainable", "dtype"):
            config.pop(key, None)
        config.update(
            {
                "return_sequences": self.return_sequences,
                "return_state": self.return_state,
                "go_backwards": self.go_backwards,
                "stateful": self.stateful,
                "unroll": self.unroll,
                "zero_output_for_mask": self.zero_output_for_mask,
                "activity_regularizer": regularizers.serialize(
                    self.activity_regularizer
                ),
            }
        )
        return {**super().get_config(), **config}


class _Stream:
    """A stateful layer's carried states and next step index.

    A plain object, so that Keras does not track the variables as weights.
    """

    def __init__(self, states, index):
        self.states = states
        self.index = index


def _check_shape(layer, name, received, expected, meaning):
    fits = len(received) == len(expected) and all(
        r is None or e is None or r == e for r, e in zip(received, expected)
    )
    if not fits:
        raise ValueError(
            f"Layer '{layer}': `{name}` must have shape {expected}, the "
            f"{meaning}. Received: {name}.shape={received}"
        )
