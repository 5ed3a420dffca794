"""The recurrence shared by `BNLSTMCell` and `BNGRUCell`.

`RecurrentCell` holds the weights and the moving statistics and runs the
whole sequence: per-step statistics computed in the loop, written to the
moving statistics once after it. Subclasses add their step.
"""

import keras
from keras import activations
from keras import constraints
from keras import initializers
from keras import layers
from keras import ops
from keras import regularizers

from keras_bn import _recurrent_paths
from keras_bn import _scan
from keras_bn import _statistics
from keras_bn import _validation

STATISTICS_MODES = ("per_step", "shared")


class RecurrentCell(layers.Layer):
    """Weights and recurrence shared by `BNLSTMCell` and `BNGRUCell`.

    Subclasses set `num_gates`, name their step-normalized terms in
    `step_terms` (`(name, size)` pairs, the recurrent product first) and
    implement `_step`.
    """

    num_gates = None
    step_terms = ()
    # A subclass with a training loop of its own (`_train_written`) sets
    # this, and takes `written_gradient` as an argument; here it is `None`,
    # keras_bn's choice (`loop_path`).
    has_written_gradient = False
    written_gradient = None

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
        initial_state_noise=0.1,
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
        self.input_gamma_initializer = _validation.initializer(
            input_gamma_initializer
        )
        self.recurrent_gamma_initializer = _validation.initializer(
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

    def call(self, sequences, initial_state=None, mask=None, training=False,
             first_step=None, unroll=False):
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
        inputs, input_stats = self._input_term(
            time_major_x, mask, training, steps, first_step
        )
        states = self._initial_states(
            initial_state, batch, dtype, training, first_step
        )
        optional = {}
        if mask is not None:
            optional["mask"] = mask
        if training and self.recurrent_dropout > 0:
            optional["dropout"] = self._dropout_mask(
                (batch, self.units), self.recurrent_dropout, x
            )
        last, hidden, statistics = self._recurrence(
            inputs, states, optional, training, first_step, unroll
        )
        if training:
            self._update_all_statistics(input_stats, statistics, first_step)
        outputs = ops.transpose(hidden, (1, 0, 2))
        return outputs, list(last)

    def _statistics_like(self, dtype):
        """The statistics of one step: `Moments` of vectors by term."""
        like = {}
        for name, size in self.step_terms:
            zeros = ops.zeros((size * self.units,), dtype)
            like[name] = _statistics.Moments(
                zeros, zeros, ops.zeros((1,), dtype)
            )
        return like

    def _recurrence(self, inputs, states, optional, training, first_step,
                    unroll):
        """The loop over the steps: `(last_states, hidden, statistics)`,
        time-major, the statistics `None` in inference.

        `optional` holds the optional inputs: `"mask"`, `(steps, batch,
        1)`, and `"dropout"`, the recurrent-dropout mask.
        """
        dtype = inputs.dtype
        # Read once, outside the loop: reading the variables in every step
        # (and accumulating their gradients there) is slower.
        weights = self._step_weights(dtype)
        if training and self.loop_path().name == _recurrent_paths.WRITTEN_LOOP:
            return self._train_written(
                inputs, states, weights, optional, unroll
            )
        population = None
        if not training:
            slots = self._slots(ops.shape(inputs)[0], first_step)
            population = {
                name: _statistics.Population(
                    *(ops.take(ops.cast(v, dtype), slots, axis=0)
                      for v in self._moving_statistics(name))
                )
                for name, _ in self.step_terms
            }
        dropout = optional.get("dropout")

        def step(inputs_t, states, population_t, mask_t):
            return self._step(
                inputs_t, states, weights, population_t, mask_t, dropout
            )

        return _scan.run_steps(
            step, inputs, states, optional.get("mask"), population,
            self._statistics_like(dtype), unroll,
        )

    def _update_all_statistics(self, input_stats, step_stats, first_step):
        """Writes a training call's statistics into the moving ones.

        `input_stats` are the input term's `Moments`, `step_stats` those of
        every step of each of `step_terms`, by name.
        """
        input_first = None if self.statistics == "shared" else first_step
        valid = self._update_moving_statistics(
            "input", input_stats, first_step=input_first
        )
        self._count_updates(self.input_updates, valid)
        for name, _ in self.step_terms:
            valid = self._update_moving_statistics(
                name, step_stats[name], first_step=first_step
            )
        # Every step term counts the same (unmasked) examples.
        self._count_updates(self.step_updates, valid)

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

    def _step(self, inputs, states, weights, population, mask, dropout):
        """One step: `(new_states, statistics)`.

        Args:
            inputs: The normalized input term of the step, biases added.
            states: List of the previous states.
            weights: `_step_weights`.
            population: `None` in training; in inference, the
                `Population` of each of `step_terms`, by name.
            mask: `None` or `(batch, 1)`, zero for padded examples.
            dropout: `None` or the recurrent-dropout mask.

        Returns:
            The new states (before masking) and, in training, the
            `Moments` of each of `step_terms`, by name (`None` in
            inference).
        """
        raise NotImplementedError

    def loop_path(self, training=True):
        """The loop a call runs, `"written"` or `"generic"`, and why
        (`_recurrent_paths.choose_recurrent_loop`)."""
        problems = _recurrent_paths.recurrent_loop_problems(
            keras.backend.backend(), self.has_written_gradient,
            self.activation is activations.tanh
            and self.recurrent_activation is activations.sigmoid,
        )
        return _recurrent_paths.choose_recurrent_loop(
            self.written_gradient, problems, training
        )

    def _train_written(self, inputs, states, weights, optional, unroll):
        """The training loop with its gradient written out, for a subclass
        with `has_written_gradient`; returns what `_scan.run_steps` does."""
        raise NotImplementedError

    def _recurrent_term(self, states, weights, population, mask, dropout):
        """`BN(W_h h; gamma_h)` and its statistics."""
        h = states[0]
        if dropout is not None:
            h = h * dropout
        product = ops.matmul(h, weights["recurrent_kernel"])
        return self._normalize_step(
            product, weights["recurrent_gamma"], None, population, mask
        )

    def _normalize_step(self, value, gamma, beta, population, mask):
        """Normalizes `value` over the batch, or with `population`."""
        gamma = ops.cast(gamma, value.dtype)
        beta = None if beta is None else ops.cast(beta, value.dtype)
        if population is None:
            path = _recurrent_paths.choose_step_normalization(
                keras.backend.backend(), mask is not None
            )
            return _recurrent_paths.step_normalization(path)(
                value, gamma, beta, mask, self.epsilon
            )
        scale, offset = _statistics.affine(
            population.mean, population.variance, self.epsilon, gamma, beta
        )
        return value * scale + offset, None

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
            stats = _statistics.Moments(
                ops.reshape(mean, (-1, product.shape[-1])),
                ops.reshape(variance, (-1, product.shape[-1])),
                ops.reshape(_statistics.step_count(count, mask), (-1, 1)),
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
        scale, offset = _statistics.affine(
            mean, variance, self.epsilon, ops.cast(self.input_gamma, x.dtype)
        )
        offset = offset + self._input_bias(x.dtype)
        return product * scale + offset, stats

    def _input_bias(self, dtype):
        """The bias added to the input term, outside the loop."""
        if self.bias is None:
            return 0.0
        return ops.cast(self.bias, dtype)

    def _initial_states(self, initial_state, batch, dtype, training,
                        first_step):
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
            # Without it, the first steps' terms are constant over the
            # batch (a zero state, inputs equal across the batch): batch
            # normalization maps them to zero in training, while the
            # moving means that inference subtracts lag behind the weights.
            noise = keras.random.normal(
                ops.shape(states[0]), stddev=self.initial_state_noise,
                dtype=dtype, seed=self.seed_generator,
            )
            if first_step is not None:
                # A stream's carried state is no initial state.
                noise = noise * ops.cast(ops.equal(first_step, 0), dtype)
            states[0] = states[0] + noise
        return states

    def _dropout_mask(self, shape, rate, x):
        return keras.random.dropout(
            ops.ones(shape, x.dtype), rate=rate, seed=self.seed_generator
        )

    def _update_moving_statistics(self, name, moments, first_step=None):
        """Writes one call's batch statistics into the moving statistics.

        The `Moments` of step `t` of the call go to the row of step
        `first_step + t` of the stream. Returns the number of steps behind
        each row's update, `(rows, 1)`.
        """
        moving_mean, moving_variance = self._moving_statistics(name)
        counter = (
            self.input_updates if name == "input" else self.step_updates
        )
        rows = moving_mean.shape[0]
        mean, variance, valid = _statistics.combine_steps(
            moments.mean, moments.variance, moments.count, rows, first_step
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


def _check_steps(layer, sequences_shape):
    """Raises for inputs of no time step (a loop with nothing to run)."""
    if sequences_shape[1] == 0:
        raise ValueError(
            f"Layer '{layer}' needs at least one time step. Received: "
            f"input_shape={sequences_shape}"
        )

