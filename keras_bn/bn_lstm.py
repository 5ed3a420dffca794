"""Recurrent batch normalization: `BNLSTMCell` and `BNLSTM`.

The machinery here (per-step statistics computed in the loop and written to
the moving statistics once after it) is shared with `keras_bn.BNGRU`.
"""

import inspect
import numbers

import keras
import numpy as np
from keras import activations
from keras import constraints
from keras import initializers
from keras import layers
from keras import ops
from keras import regularizers
from keras import saving

from keras_bn import _dispatch
from keras_bn import _statistics
from keras_bn import _validation

STATISTICS_MODES = ("per_step", "shared")


class _BNRecurrentCell(layers.Layer):
    """Weights and recurrence shared by `BNLSTMCell` and `BNGRUCell`.

    Subclasses set `num_gates`, name their step-normalized terms in
    `step_terms` (`(name, size)` pairs, the recurrent product first) and
    implement `_step`.
    """

    num_gates = None
    step_terms = ()

    def __init__(
        self,
        units,
        activation="tanh",
        recurrent_activation="sigmoid",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        bias_constraint=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        max_timesteps=None,
        momentum=0.9,
        epsilon=1e-3,
        statistics="per_step",
        input_gamma_initializer=0.1,
        recurrent_gamma_initializer=0.1,
        initial_state_noise=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = _validation.integer("units", units, 1)
        self.activation = activations.get(activation)
        self.recurrent_activation = activations.get(recurrent_activation)
        self.use_bias = _validation.boolean("use_bias", use_bias)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.recurrent_initializer = initializers.get(recurrent_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.recurrent_regularizer = regularizers.get(recurrent_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.recurrent_constraint = constraints.get(recurrent_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        self.dropout = _validation.rate("dropout", dropout)
        self.recurrent_dropout = _validation.rate(
            "recurrent_dropout", recurrent_dropout
        )
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed=seed)
        self.max_timesteps = _validation.integer(
            "max_timesteps", max_timesteps, 1, allow_none=True
        )
        self.momentum = _validation.momentum("momentum", momentum)
        self.epsilon = _validation.epsilon("epsilon", epsilon)
        self.statistics = _validation.choice(
            "statistics", statistics, STATISTICS_MODES
        )
        self.input_gamma_initializer = _initializer(input_gamma_initializer)
        self.recurrent_gamma_initializer = _initializer(
            recurrent_gamma_initializer
        )
        self.initial_state_noise = _validation.non_negative(
            "initial_state_noise", initial_state_noise
        )
        self.state_size = [self.units]
        self.output_size = self.units
        self.supports_masking = True

    def build(self, sequences_shape):
        sequences_shape = tuple(sequences_shape)
        if len(sequences_shape) != 3:
            raise ValueError(
                f"Layer '{self.name}' expects 3D inputs of shape (batch, "
                "timesteps, features). Received: "
                f"input_shape={sequences_shape}"
            )
        _check_steps(self.name, sequences_shape)
        if sequences_shape[-1] is None:
            raise ValueError(
                f"Layer '{self.name}' needs a known number of features. "
                f"Received: input_shape={sequences_shape}"
            )
        self.num_slots = self.max_timesteps or sequences_shape[1]
        if self.num_slots is None:
            raise ValueError(
                f"Layer '{self.name}' keeps statistics for each time step, "
                "so it needs `max_timesteps` when the number of timesteps is "
                "not known when it is built. Received: max_timesteps=None, "
                f"input_shape={sequences_shape}"
            )
        width = self.num_gates * self.units
        self.kernel = self.add_weight(
            shape=(sequences_shape[-1], width),
            name="kernel",
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
            autocast=False,
        )
        self.recurrent_kernel = self.add_weight(
            shape=(self.units, width),
            name="recurrent_kernel",
            initializer=self.recurrent_initializer,
            regularizer=self.recurrent_regularizer,
            constraint=self.recurrent_constraint,
            autocast=False,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                shape=self._bias_shape(),
                name="bias",
                initializer=self._bias_initializer(),
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
                autocast=False,
            )
        self.input_gamma = self._add_parameter(
            "input_gamma", width, self.input_gamma_initializer
        )
        self.recurrent_gamma = self._add_parameter(
            "recurrent_gamma", width, self.recurrent_gamma_initializer
        )
        self._build_step_parameters()
        input_rows = self.num_slots if self.statistics == "per_step" else 1
        self._add_moving_statistics("input", input_rows, width)
        for name, size in self.step_terms:
            self._add_moving_statistics(
                name, self.num_slots, size * self.units
            )
        self.input_updates = self._add_counter("input_updates", input_rows)
        self.step_updates = self._add_counter("step_updates", self.num_slots)

    def call(
        self,
        sequences,
        initial_state=None,
        mask=None,
        training=False,
        first_step=None,
        unroll=False,
    ):
        """Runs the recurrence over `sequences`, in the order given.

        Returns the hidden state of every step, `(batch, timesteps,
        units)`, and the list of final states. Masked steps carry the states
        of the step before. `first_step` (an integer tensor, or `None` for
        0) is the index in the stream of the first step, which picks the
        rows of the moving statistics the steps use and update; `unroll`
        runs the steps as a Python loop instead of a symbolic one.
        """
        _check_steps(self.name, tuple(sequences.shape))
        dtype = _statistics.statistics_dtype(sequences.dtype)
        x = ops.cast(sequences, dtype)
        batch, steps = ops.shape(x)[0], ops.shape(x)[1]
        training = bool(training) and self.trainable
        if mask is not None:
            mask = ops.expand_dims(ops.cast(mask, dtype), -1)
        if training and self.dropout > 0:
            x = x * ops.expand_dims(
                self._dropout_mask((batch, ops.shape(x)[2]), self.dropout, x),
                1,
            )
        time_major_x = ops.transpose(x, (1, 0, 2))
        if mask is not None:
            mask = ops.transpose(mask, (1, 0, 2))
        input_term = self._input_term
        if training and _compile_input_term():
            import tensorflow as tf

            # Outside the loop (XLA cannot take TensorFlow's loop
            # gradients in from an ordinary graph); fused, the passes
            # over the large `(steps, batch, gates * units)` tensor cost
            # less than TensorFlow's separate ops.
            input_term = tf.function(
                self._input_term, jit_compile=True, autograph=False
            )
        inputs, input_stats = input_term(
            time_major_x, mask, training, steps, first_step
        )
        states = self._initial_states(initial_state, batch, dtype, training)
        recurrent_mask = None
        if training and self.recurrent_dropout > 0:
            recurrent_mask = self._dropout_mask(
                (batch, self.units), self.recurrent_dropout, x
            )
        time_major = [inputs]
        if mask is not None:
            time_major.append(mask)
        if not training:
            slots = self._slots(steps, first_step)
            for name, _ in self.step_terms:
                time_major.extend(
                    ops.take(ops.cast(v, dtype), slots, axis=0)
                    for v in self._moving_statistics(name)
                )
        # Read once, outside the loop: reading the variables in every step
        # (and accumulating their gradients there) is measurably slower.
        weights = self._step_weights(dtype)

        def step(carry, xs):
            xs = list(xs)
            inputs_t = xs.pop(0)
            mask_t = xs.pop(0) if mask is not None else None
            old = list(carry)
            population = None
            if not training:
                population = [
                    tuple(xs[i : i + 2])
                    for i in range(0, 2 * len(self.step_terms), 2)
                ]
            new, stats = self._step(
                inputs_t, old, weights, population, mask_t, recurrent_mask
            )
            if mask_t is not None:
                new = [ops.where(mask_t > 0, n, o) for n, o in zip(new, old)]
            if not training:
                return tuple(new), (new[0],)
            # One output for all statistics: every output of the loop costs
            # a stack of its own in the gradient.
            stats = ops.stop_gradient(ops.concatenate(stats))
            return tuple(new), (new[0], stats)

        # Per step term: mean and variance (`size * units` each) and count.
        sizes = []
        for _, size in self.step_terms:
            sizes += [size * self.units] * 2 + [1]
        outputs_like = [states[0]]
        if training:
            outputs_like.append(ops.zeros((sum(sizes),), dtype))
        recurrence = None
        if training:
            recurrence = self._train_recurrence(
                inputs, states, weights, mask, recurrent_mask, unroll
            )
        if recurrence is None:
            recurrence = _scan(
                step, tuple(states), tuple(time_major), tuple(outputs_like),
                unroll,
            )
        last, sequence = recurrence
        if training:
            input_first = None if self.statistics == "shared" else first_step
            valid = self._update_moving_statistics(
                "input", *input_stats, first_step=input_first
            )
            self._count_updates(self.input_updates, valid)
            step_stats = ops.split(
                sequence[1], [int(i) for i in np.cumsum(sizes)[:-1]], axis=-1
            )
            for i, (name, _) in enumerate(self.step_terms):
                valid = self._update_moving_statistics(
                    name, *step_stats[3 * i : 3 * i + 3],
                    first_step=first_step,
                )
            # Every step term counts the same (unmasked) examples.
            self._count_updates(self.step_updates, valid)
        outputs = ops.transpose(sequence[0], (1, 0, 2))
        return outputs, list(last)

    def compute_mask(self, sequences, mask=None):
        # The owning layer decides which mask its outputs carry.
        return None

    def get_config(self):
        config = {
            "units": self.units,
            "activation": activations.serialize(self.activation),
            "recurrent_activation": activations.serialize(
                self.recurrent_activation
            ),
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(
                self.kernel_initializer
            ),
            "recurrent_initializer": initializers.serialize(
                self.recurrent_initializer
            ),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(
                self.kernel_regularizer
            ),
            "recurrent_regularizer": regularizers.serialize(
                self.recurrent_regularizer
            ),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "recurrent_constraint": constraints.serialize(
                self.recurrent_constraint
            ),
            "bias_constraint": constraints.serialize(self.bias_constraint),
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "seed": self.seed,
            # Resolved once built, so that the config rebuilds the same
            # weights on inputs of any length.
            "max_timesteps": (
                self.num_slots if self.built else self.max_timesteps
            ),
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "statistics": self.statistics,
            "input_gamma_initializer": initializers.serialize(
                self.input_gamma_initializer
            ),
            "recurrent_gamma_initializer": initializers.serialize(
                self.recurrent_gamma_initializer
            ),
            "initial_state_noise": self.initial_state_noise,
        }
        return {**super().get_config(), **config}

    def _bias_shape(self):
        return (self.num_gates * self.units,)

    def _bias_initializer(self):
        return self.bias_initializer

    def _build_step_parameters(self):
        """Creates the weights that only the subclass's step uses."""

    def _step_weights(self, dtype):
        """The weights the loop uses, as tensors of `dtype`."""
        return {
            "recurrent_kernel": ops.cast(self.recurrent_kernel, dtype),
            "recurrent_gamma": ops.cast(self.recurrent_gamma, dtype),
        }

    def _step(self, inputs, states, weights, population, mask, recurrent_mask):
        """One step: `(new_states, statistics)`.

        Args:
            inputs: The normalized input term of the step, biases added.
            states: List of the previous states.
            weights: `_step_weights`.
            population: `None` in training; in inference, a `(mean,
                variance)` pair for each of `step_terms`.
            mask: `None` or `(batch, 1)`, zero for padded examples.
            recurrent_mask: `None` or the recurrent-dropout mask.

        Returns:
            The new states (before masking) and, in training, `(mean,
            variance, count)` of each of `step_terms`, flattened.
        """
        raise NotImplementedError

    def _train_recurrence(
        self, inputs, states, weights, mask, recurrent_mask, unroll
    ):
        """The training loop with a gradient of its own, or `None`.

        Returns `None` to run `_step` in the generic loop; a subclass may
        return `(last_states, (hidden_states, statistics))`, both
        time-major, the statistics as the generic loop returns them.
        """
        return None

    def _recurrent_term(
        self, states, weights, population, mask, recurrent_mask
    ):
        """`BN(W_h h; gamma_h)` and its statistics."""
        h = states[0]
        if recurrent_mask is not None:
            h = h * recurrent_mask
        product = ops.matmul(h, weights["recurrent_kernel"])
        return self._normalize_step(
            product, weights["recurrent_gamma"], None, population, mask
        )

    def _normalize_step(self, value, gamma, beta, population, mask):
        """Normalizes `value` over the batch, or with `population`."""
        if population is None:
            # The statistics' share of the gradient is `_batch_normalize`'s.
            mean, variance, count = _statistics.moments(
                ops.stop_gradient(value), [0], mask
            )
            stats = (mean[0], variance[0], _step_count(count, mask))
            normalized = _batch_normalize(
                value, mean, variance, count, mask, self.epsilon,
                ops.cast(gamma, value.dtype),
                None if beta is None else ops.cast(beta, value.dtype),
            )
            return normalized, stats
        mean, variance = population
        return self._affine(value, mean, variance, gamma, beta), ()

    def _affine(self, value, mean, variance, gamma, beta):
        scale, offset = self._scale_offset(mean, variance, gamma, beta)
        return value * scale + offset

    def _scale_offset(self, mean, variance, gamma, beta):
        """`BN(v) = v * scale + offset` for the given statistics."""
        return _statistics.affine(
            mean,
            variance,
            self.epsilon,
            ops.cast(gamma, mean.dtype),
            None if beta is None else ops.cast(beta, mean.dtype),
        )

    def _slots(self, steps, first_step):
        """The row of the moving statistics each of `steps` steps uses."""
        index = ops.arange(steps)
        if first_step is not None:
            index = index + ops.cast(first_step, index.dtype)
        return ops.minimum(index, self.num_slots - 1)

    def _input_term(self, x, mask, training, steps, first_step=None):
        """`BN(W_x x_t; gamma_x) + b` of every step, and its statistics.

        `x` is time-major, `(steps, batch, features)`, and so is the
        result, `(steps, batch, num_gates * units)`. The product of all
        steps is one matrix product, normalized outside the loop, which
        only reads its rows: the loop's gradient hands back one tensor for
        all steps, and the backward pass through the product is again one
        matrix product.
        """
        product = ops.matmul(x, ops.cast(self.kernel, x.dtype))
        if training:
            axes = [1] if self.statistics == "per_step" else [0, 1]
            mean, variance, count = _statistics.moments(product, axes, mask)
            stats = (
                ops.reshape(mean, (-1, product.shape[-1])),
                ops.reshape(variance, (-1, product.shape[-1])),
                ops.reshape(_step_count(count, mask), (-1, 1)),
            )
        else:
            mean, variance = (
                ops.cast(v, x.dtype) for v in self._moving_statistics("input")
            )
            if self.statistics == "per_step":
                slots = self._slots(steps, first_step)
                mean = ops.take(mean, slots, axis=0)
                variance = ops.take(variance, slots, axis=0)
            mean = ops.expand_dims(mean, 1)
            variance = ops.expand_dims(variance, 1)
            stats = None
        scale, offset = self._scale_offset(
            mean, variance, self.input_gamma, None
        )
        offset = offset + self._input_bias(x.dtype)
        return product * scale + offset, stats

    def _input_bias(self, dtype):
        """The bias added to the input term, outside the loop."""
        if self.bias is None:
            return 0.0
        return ops.cast(self.bias, dtype)

    def _initial_states(self, initial_state, batch, dtype, training):
        if initial_state is None:
            states = [
                ops.zeros((batch, size), dtype) for size in self.state_size
            ]
        else:
            if not isinstance(initial_state, (list, tuple)):
                initial_state = [initial_state]
            if len(initial_state) != len(self.state_size):
                raise ValueError(
                    f"Layer '{self.name}' has {len(self.state_size)} "
                    "states, so `initial_state` must be a list of that many "
                    "tensors. Received: "
                    f"{len(initial_state)} initial states"
                )
            states = [ops.cast(s, dtype) for s in initial_state]
        if training and self.initial_state_noise > 0:
            # The paper's fix for early steps whose recurrent term has zero
            # variance over the batch (e.g. all-black first pixels): their
            # normalization would blow up the gradients.
            states[0] = states[0] + keras.random.normal(
                ops.shape(states[0]),
                stddev=self.initial_state_noise,
                dtype=dtype,
                seed=self.seed_generator,
            )
        return states

    def _dropout_mask(self, shape, rate, x):
        return keras.random.dropout(
            ops.ones(shape, x.dtype), rate=rate, seed=self.seed_generator
        )

    def _update_moving_statistics(
        self, name, mean, variance, count, first_step=None
    ):
        """Writes one call's batch statistics into the moving statistics.

        The statistics of step `t` of the call go to the row of step
        `first_step + t` of the stream. Returns the number of steps behind
        each row's update, `(rows, 1)`.
        """
        moving_mean, moving_variance = self._moving_statistics(name)
        counter = (
            self.input_updates if name == "input" else self.step_updates
        )
        rows = moving_mean.shape[0]
        mean, variance, valid = _statistics.combine_steps(
            mean, variance, count, rows, first_step
        )
        decay = _statistics.bias_corrected_decay(
            self.momentum, ops.cast(ops.reshape(counter, (rows, 1)), mean.dtype)
        )
        _statistics.assign_moving_average(moving_mean, mean, decay, valid)
        _statistics.assign_moving_average(
            moving_variance, variance, decay, valid
        )
        return valid

    def _count_updates(self, counter, valid):
        counter.assign_add(
            ops.cast(ops.greater(valid[:, 0], 0.0), counter.dtype)
        )

    def _add_parameter(self, name, size, initializer):
        return self.add_weight(
            shape=(size,), name=name, initializer=initializer, autocast=False
        )

    def _add_moving_statistics(self, term, rows, width):
        for kind, initializer in (("mean", "zeros"), ("variance", "ones")):
            name = f"moving_{term}_{kind}"
            setattr(
                self,
                name,
                self.add_weight(
                    shape=(rows, width),
                    name=name,
                    initializer=initializer,
                    trainable=False,
                    autocast=False,
                    aggregation="mean",
                ),
            )

    def _moving_statistics(self, term):
        return (
            getattr(self, f"moving_{term}_mean"),
            getattr(self, f"moving_{term}_variance"),
        )

    def population_statistics(self):
        """`(counter, moving statistics)` pairs for `recompute_statistics`.

        Each counter holds one update count per row (time step) of the
        moving statistics listed with it; the bias-corrected average writes
        a row's batch statistics outright while its count is zero.
        """
        steps = [
            weight
            for name, _ in self.step_terms
            for weight in self._moving_statistics(name)
        ]
        return [
            (self.input_updates, list(self._moving_statistics("input"))),
            (self.step_updates, steps),
        ]

    def _add_counter(self, name, rows):
        return self.add_weight(
            shape=(rows,),
            name=name,
            initializer="zeros",
            dtype="int32",
            trainable=False,
            aggregation="only_first_replica",
        )


@saving.register_keras_serializable(package="keras_bn")
class BNLSTMCell(_BNRecurrentCell):
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

    def __init__(
        self,
        units,
        unit_forget_bias=True,
        cell_gamma_initializer=0.1,
        cell_beta_initializer="zeros",
        **kwargs,
    ):
        super().__init__(units, **kwargs)
        self.unit_forget_bias = _validation.boolean(
            "unit_forget_bias", unit_forget_bias
        )
        self.cell_gamma_initializer = _initializer(cell_gamma_initializer)
        self.cell_beta_initializer = initializers.get(cell_beta_initializer)
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

    def _train_recurrence(
        self, inputs, states, weights, mask, recurrent_mask, unroll
    ):
        # The written gradient assumes the paper's activations, and a
        # custom gradient of several outputs, which the torch backend's
        # `custom_gradient` (one output's gradient) does not take.
        if not (
            self.activation is activations.tanh
            and self.recurrent_activation is activations.sigmoid
            and keras.backend.backend() in ("tensorflow", "jax")
        ):
            return None
        return _train_lstm(
            inputs, states, weights, mask, recurrent_mask, self.epsilon,
            unroll, _compile_input_term(),
        )

    def _step(self, inputs, states, weights, population, mask, recurrent_mask):
        recurrent_population = cell_population = None
        if population is not None:
            recurrent_population, cell_population = population
        recurrent, recurrent_stats = self._recurrent_term(
            states, weights, recurrent_population, mask, recurrent_mask
        )
        i, f, g, o = ops.split(inputs + recurrent, 4, axis=-1)
        c = self.recurrent_activation(f) * states[1] + (
            self.recurrent_activation(i) * self.activation(g)
        )
        normalized, cell_stats = self._normalize_step(
            c, weights["cell_gamma"], weights["cell_beta"], cell_population,
            mask,
        )
        h = self.recurrent_activation(o) * self.activation(normalized)
        return [h, c], recurrent_stats + cell_stats


class _BNRecurrent(layers.Layer):
    """The `keras.layers.RNN` interface around a `_BNRecurrentCell`.

    Subclasses set `cell_class` and `cell_name`. The cell's arguments are
    written once, in the cell's `__init__`: the layer passes every keyword
    argument the cell takes on to it, reads them back as read-only
    properties (as `keras.layers.LSTM` does) and lists them in its config.
    """

    cell_class = None
    cell_name = None
    # The order in which core's layer takes its arguments after `units`,
    # so that positional calls move over with the class name.
    positional_arguments = ()

    def __init__(self, units, *args, **kwargs):
        if len(args) > len(self.positional_arguments):
            raise TypeError(
                f"{type(self).__name__} takes at most "
                f"{len(self.positional_arguments) + 1} positional arguments "
                f"(units, then {', '.join(self.positional_arguments)}), as "
                f"core Keras's layer does. Received: {len(args) + 1}"
            )
        for name, value in zip(self.positional_arguments, args):
            if name in kwargs:
                raise TypeError(
                    f"{type(self).__name__} got argument `{name}` both by "
                    f"position and by keyword. Received: {name}={value!r} "
                    f"and {name}={kwargs[name]!r}"
                )
            kwargs[name] = value
        self._set_up(units, **kwargs)

    def _set_up(
        self,
        units,
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
        # Keras 3's own layers accept `implementation` and ignore it.
        kwargs.pop("implementation", None)
        names = _cell_arguments(self.cell_class)
        cell_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        super().__init__(**kwargs)
        self.cell = self.cell_class(
            units, name=self.cell_name, **cell_kwargs, **_cell_kwargs(kwargs)
        )
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

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("units",) + _cell_arguments(cls.cell_class):
            if not hasattr(cls, name):
                setattr(cls, name, _cell_property(name))

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


def _cell_arguments(cell_class):
    """The names of the keyword arguments `cell_class` takes, in order."""
    names = []
    for klass in cell_class.__mro__:
        if klass is layers.Layer:
            break
        if "__init__" not in vars(klass):
            continue
        for parameter in inspect.signature(klass.__init__).parameters.values():
            if parameter.kind is parameter.POSITIONAL_OR_KEYWORD and (
                parameter.name not in ("self", "units")
                and parameter.name not in names
            ):
                names.append(parameter.name)
    return tuple(names)


def _cell_property(name):
    def getter(self):
        return getattr(self.cell, name)

    getter.__name__ = name
    getter.__doc__ = f"The cell's `{name}` (read-only)."
    return property(getter)


def _check_steps(layer, sequences_shape):
    """Raises for inputs of no time step (a loop with nothing to run)."""
    if sequences_shape[1] == 0:
        raise ValueError(
            f"Layer '{layer}' needs at least one time step. Received: "
            f"input_shape={sequences_shape}"
        )


def _check_shape(layer, name, received, expected, meaning):
    fits = len(received) == len(expected) and all(
        r is None or e is None or r == e for r, e in zip(received, expected)
    )
    if not fits:
        raise ValueError(
            f"Layer '{layer}': `{name}` must have shape {expected}, the "
            f"{meaning}. Received: {name}.shape={received}"
        )


@saving.register_keras_serializable(package="keras_bn")
class BNLSTM(_BNRecurrent):
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
            Gaussian noise added to the initial hidden state in training.
            The paper uses 0.1 when early steps have zero variance over the
            batch (e.g. black border pixels). Defaults to `0.0`.
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
        zero_output_for_mask: Whether masked steps output zeros (with
            `return_sequences=True`). Defaults to `False`.
        use_cudnn: `"auto"` or `False`; there is no cuDNN kernel for the
            normalized recurrence, and `True` (which requires one) raises.
            Defaults to `"auto"`.
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

    cell_class = BNLSTMCell
    cell_name = "bnlstm_cell"
    positional_arguments = (
        "activation", "recurrent_activation", "use_bias",
        "kernel_initializer", "recurrent_initializer", "bias_initializer",
        "unit_forget_bias", "kernel_regularizer", "recurrent_regularizer",
        "bias_regularizer", "activity_regularizer", "kernel_constraint",
        "recurrent_constraint", "bias_constraint", "dropout",
        "recurrent_dropout", "seed", "return_sequences", "return_state",
        "go_backwards", "stateful", "unroll", "use_cudnn",
    )


def _cell_kwargs(kwargs):
    """The base-layer arguments a layer passes on to its cell."""
    return {
        "dtype": kwargs.get("dtype"),
        "trainable": kwargs.get("trainable", True),
    }


def _compile_input_term():
    """Whether a training call runs its input term through XLA
    (`_dispatch.choose_recurrent_input` decides)."""
    on_tensorflow = keras.backend.backend() == "tensorflow"
    if on_tensorflow:
        import tensorflow as tf
    path = _dispatch.choose_recurrent_input(
        keras.backend.backend(),
        _dispatch.device() if on_tensorflow else None,
        on_tensorflow and tf.executing_eagerly(),
        on_tensorflow and _dispatch.xla_compiling(),
    )
    return path.name == _dispatch.XLA


def _batch_normalize(value, mean, variance, count, mask, epsilon, gamma, beta):
    """`gamma * (value - mean) / sqrt(variance + epsilon) + beta` with the
    gradient of batch normalization over axis 0.

    `mean`, `variance` and `count` are the batch statistics of `value`
    (where `mask`, `(batch, 1)`); the gradient counts their dependence on
    `value` in closed form, which takes fewer ops per step than
    differentiating the statistics (measured: `docs/recurrent.md`). `beta`
    may be `None`.
    """
    with_beta = beta is not None
    # Every tensor the gradient reads is an argument: JAX does not let a
    # custom gradient close over the values of the loop it runs in.
    statistics = [mean, variance, count]
    if mask is not None:
        statistics.append(mask)
    # TensorFlow takes `None` for the gradients of the statistics, which
    # saves ops in every step; JAX needs zeros.
    no_gradient = keras.backend.backend() == "tensorflow"

    @ops.custom_gradient
    def normalize(value, gamma, *rest):
        beta = rest[0] if with_beta else None
        mean, variance, count = rest[with_beta : with_beta + 3]
        scale, offset = _statistics.affine(
            mean, variance, epsilon, gamma, beta
        )

        def grad(*args, upstream=None):
            dy = args[0] if upstream is None else upstream
            dx, dgamma, dbeta = _statistics.normalize_grad(
                dy, value, mean, variance, count,
                rest[-1] if mask is not None else None, gamma, [0], epsilon,
            )
            grads = [dx, ops.reshape(dgamma, (-1,))]
            if with_beta:
                grads.append(ops.reshape(dbeta, (-1,)))
            return tuple(grads) + tuple(
                None if no_gradient else ops.zeros_like(s)
                for s in statistics
            )

        return value * scale + offset, grad

    betas = [beta] if with_beta else []
    return normalize(value, gamma, *betas, *statistics)


def _train_lstm(inputs, states, weights, mask, recurrent_mask, epsilon,
                unroll, compile_loops):
    """The training recurrence of `BNLSTMCell`, with its gradient written
    out (back-propagation through time).

    Differentiating the loop makes the framework keep, step by step, every
    intermediate the gradient of each op reads, and multiply `h^T dP` in
    every step. Here the forward loop keeps only `h`, `c`, the normalized
    recurrent product and the statistics; the backward loop recomputes the
    gates from them, and the gradient of `W_h` is one matrix product over
    all steps after it. With `compile_loops` (TensorFlow), both loops run
    as XLA-compiled functions called from the graph.

    `inputs` is the normalized input term, time-major `(steps, batch, 4 *
    units)`; `mask` `None` or `(steps, batch, 1)`. Returns the final states
    and `(hidden states, statistics)` as the generic loop does.
    """
    with_mask = mask is not None
    with_dropout = recurrent_mask is not None
    units = states[0].shape[-1]
    optional = [mask] if with_mask else []
    if with_dropout:
        optional.append(recurrent_mask)
    # TensorFlow takes `None` for the gradients of the masks; JAX needs
    # zeros.
    no_gradient = keras.backend.backend() == "tensorflow"

    def moments(value, m):
        mean, variance, count = _statistics.moments(value, [0], m)
        return mean, variance, _step_count(count, m)

    def forward(x, h0, c0, kernel, gamma_h, gamma_c, beta_c, *rest):
        dropout = rest[-1] if with_dropout else None

        def step(carry, xs):
            h, c = carry
            m = xs[1] if with_mask else None
            product = ops.matmul(h if dropout is None else h * dropout, kernel)
            mean_p, variance_p, count = moments(product, m)
            phat = (product - mean_p) * ops.rsqrt(variance_p + epsilon)
            i, f, g, o = ops.split(xs[0] + gamma_h * phat, 4, axis=-1)
            c_new = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
            mean_c, variance_c, _ = moments(c_new, m)
            chat = (c_new - mean_c) * ops.rsqrt(variance_c + epsilon)
            h_new = ops.sigmoid(o) * ops.tanh(chat * gamma_c + beta_c)
            if m is not None:
                h_new = ops.where(m > 0, h_new, h)
                c_new = ops.where(m > 0, c_new, c)
            stats = ops.concatenate(
                [mean_p[0], variance_p[0], count, mean_c[0], variance_c[0],
                 count]
            )
            return (h_new, c_new), (h_new, c_new, phat, stats)

        xs = (x, rest[0]) if with_mask else (x,)
        like = (h0, c0, x[0], ops.zeros((10 * units + 2,), x.dtype))
        (_, c_last), (hs, cs, phats, stats) = _scan(
            step, (h0, c0), xs, like, unroll
        )
        return hs, cs, c_last, phats, stats

    def backward(d_hs, d_c_last, hs, cs, phats, stats, x, h0, c0, kernel,
                 gamma_h, gamma_c, beta_c, *rest):
        dropout = rest[-1] if with_dropout else None
        kernel_t = ops.transpose(kernel)
        h_prev = ops.concatenate([h0[None], hs[:-1]], axis=0)
        c_prev = ops.concatenate([c0[None], cs[:-1]], axis=0)

        def step(carry, xs):
            dh, dc, d_gamma_h, d_gamma_c, d_beta_c = carry
            dh_up, x_t, phat, c, c_prev, st = xs[:6]
            m = xs[6] if with_mask else None
            # The forward step again, from what it kept.
            inv_p = ops.rsqrt(st[4 * units : 8 * units] + epsilon)
            inv_c = ops.rsqrt(st[9 * units + 1 : 10 * units + 1] + epsilon)
            # Masked rows hold the carried `c`, not the one normalized;
            # their gradients are zero, so it does not matter.
            chat = (c - st[8 * units + 1 : 9 * units + 1]) * inv_c
            zi, zf, zg, zo = ops.split(x_t + gamma_h * phat, 4, axis=-1)
            si, sf, so = ops.sigmoid(zi), ops.sigmoid(zf), ops.sigmoid(zo)
            tg = ops.tanh(zg)
            tn = ops.tanh(chat * gamma_c + beta_c)
            share = 1.0 / ops.maximum(st[10 * units + 1 :], 1.0)
            dh = dh + dh_up
            if m is not None:
                share = share * m
                dh_new, dc_new = dh * m, dc * m
            else:
                dh_new, dc_new = dh, dc
            # Batch normalization of the cell, then the cell update.
            dn = dh_new * so * (1.0 - tn * tn)
            # One reduction for both sums (and below): XLA on a CPU runs
            # each reduction as a kernel of its own.
            s1, s2 = ops.split(
                ops.sum(ops.concatenate([dn, dn * chat], axis=-1), axis=0), 2
            )
            dct = gamma_c * inv_c * (dn - (s1 + chat * s2) * share) + dc_new
            dz = ops.concatenate(
                [
                    dct * tg * si * (1.0 - si),
                    dct * c_prev * sf * (1.0 - sf),
                    dct * si * (1.0 - tg * tg),
                    dh_new * tn * so * (1.0 - so),
                ],
                axis=-1,
            )
            # Batch normalization of the recurrent product.
            q1, q2 = ops.split(
                ops.sum(ops.concatenate([dz, dz * phat], axis=-1), axis=0), 2
            )
            dp = gamma_h * inv_p * (dz - (q1 + phat * q2) * share)
            dh_prev = ops.matmul(dp, kernel_t)
            if dropout is not None:
                dh_prev = dh_prev * dropout
            dc_prev = dct * sf
            if m is not None:
                dh_prev = dh_prev + (dh - dh_new)
                dc_prev = dc_prev + (dc - dc_new)
            carry = (dh_prev, dc_prev, d_gamma_h + q2, d_gamma_c + s2,
                     d_beta_c + s1)
            return carry, (dz, dp)

        xs = (d_hs, x, phats, cs, c_prev, stats) + (
            (rest[0],) if with_mask else ()
        )
        init = (ops.zeros_like(h0), d_c_last, ops.zeros_like(gamma_h),
                ops.zeros_like(gamma_c), ops.zeros_like(beta_c))
        (dh0, dc0, d_gamma_h, d_gamma_c, d_beta_c), (dzs, dps) = _scan(
            step, init, xs, (x[0], x[0]), unroll, reverse=True
        )
        if dropout is not None:
            h_prev = h_prev * dropout
        d_kernel = ops.matmul(
            ops.transpose(ops.reshape(h_prev, (-1, units))),
            ops.reshape(dps, (-1, 4 * units)),
        )
        return dzs, dh0, dc0, d_kernel, d_gamma_h, d_gamma_c, d_beta_c

    if compile_loops:
        import tensorflow as tf

        forward = tf.function(forward, jit_compile=True, autograph=False)
        backward = tf.function(backward, jit_compile=True, autograph=False)

    @ops.custom_gradient
    def recurrence(*args):
        hs, cs, c_last, phats, stats = forward(*args)

        def grad(*upstream_args, upstream=None):
            upstream = upstream_args if upstream is None else upstream
            if len(upstream) == 1:
                # JAX hands over the outputs' gradients as one tuple.
                upstream = upstream[0]
            d_hs, d_c_last = upstream[0], upstream[1]
            if d_hs is None:
                d_hs = ops.zeros_like(hs)
            if d_c_last is None:
                d_c_last = ops.zeros_like(c_last)
            grads = backward(d_hs, d_c_last, hs, cs, phats, stats, *args)
            return tuple(grads) + tuple(
                None if no_gradient else ops.zeros_like(v)
                for v in args[7:]
            )

        return (hs, c_last, ops.stop_gradient(stats)), grad

    hs, c_last, stats = recurrence(
        inputs, states[0], states[1], weights["recurrent_kernel"],
        weights["recurrent_gamma"], weights["cell_gamma"],
        weights["cell_beta"], *optional,
    )
    return (hs[-1], c_last), (hs, stats)


def _scan(step, init, xs, outputs_like, unroll=False, reverse=False):
    """`keras.ops.scan` whose TensorFlow loop also compiles with XLA.

    `step(carry, xs)` returns the new carry and the step's outputs, shaped
    like `outputs_like`. TensorFlow's gradient of a loop needs
    `maximum_iterations` under XLA, which the TensorFlow `keras.ops.scan`
    does not set; this sets it, as the TensorFlow backend's `rnn` does.
    With `unroll=True` the steps run as a Python loop (the number of steps
    must be known). With `reverse=True` the steps run from the last, and
    the outputs keep the order of `xs`.

    On TensorFlow and JAX each step's slices of `xs` are read in the step
    before and carried, not read in the step that uses them.
    """
    if unroll:
        carry, ys = init, []
        order = range(xs[0].shape[0])
        for t in reversed(order) if reverse else order:
            carry, y = step(carry, tuple(x[t] for x in xs))
            ys.append(y)
        if reverse:
            ys.reverse()
        return tuple(carry), tuple(ops.stack(y, axis=0) for y in zip(*ys))
    if keras.backend.backend() == "jax":
        # As below for TensorFlow: each step's inputs are read in the step
        # before and carried, so that XLA copies them out of the sequence
        # instead of fusing the read into the step's element-wise ops.
        # `xs` shifted by one step, the step past the end repeated.
        if reverse:
            first = tuple(x[-1] for x in xs)
            following = tuple(ops.concatenate([x[:1], x[:-1]]) for x in xs)
        else:
            first = tuple(x[0] for x in xs)
            following = tuple(ops.concatenate([x[1:], x[-1:]]) for x in xs)

        def carried_step(carry, following):
            carry, current = carry
            carry, ys = step(carry, current)
            return (carry, following), ys

        (carry, _), ys = ops.scan(
            carried_step, (tuple(init), first), following, reverse=reverse
        )
        return carry, ys
    if keras.backend.backend() != "tensorflow":
        return ops.scan(step, init, xs, reverse=reverse)
    import tensorflow as tf

    steps = xs[0].shape[0] or tf.shape(xs[0])[0]
    inputs = [
        tf.TensorArray(
            x.dtype, size=steps, element_shape=x.shape[1:],
            # The step after the last reads the last step again.
            clear_after_read=False,
        ).unstack(x)
        for x in xs
    ]
    outputs = [
        tf.TensorArray(o.dtype, size=steps, element_shape=o.shape)
        for o in outputs_like
    ]

    def position(t):
        return steps - 1 - t if reverse else t

    def read(t):
        # The read after the last step is of a step that exists.
        index = tf.clip_by_value(position(t), 0, steps - 1)
        return [a.read(index) for a in inputs]

    def body(t, carry, current, outputs):
        index = position(t)
        carry, ys = step(tuple(carry), tuple(current))
        outputs = [o.write(index, y) for o, y in zip(outputs, ys)]
        # The next step's inputs are read here and carried over: XLA then
        # copies each out of its sequence, where a read in the step would
        # fuse into the step's element-wise ops, which it slows several
        # times over on a CPU (measured: docs/recurrent.md).
        return t + 1, list(carry), read(t + 1), outputs

    _, carry, _, outputs = tf.while_loop(
        lambda t, *_: t < steps,
        body,
        (0, list(init), read(0), outputs),
        maximum_iterations=steps,
        swap_memory=True,
        # As the TensorFlow backend's `rnn`: measured about 4 % faster
        # than the default 10 in an ordinary graph.
        parallel_iterations=32,
    )
    return tuple(carry), tuple(o.stack() for o in outputs)


def _step_count(count, mask):
    """The elements behind each step's statistics, flattened.

    With a mask, `moments` counts every feature separately; they all count
    the same examples.
    """
    if mask is not None:
        count = count[..., :1]
    return ops.reshape(count, (-1,))


def _initializer(value):
    """`initializers.get`, also accepting a float for a constant."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return initializers.Constant(float(value))
    return initializers.get(value)
