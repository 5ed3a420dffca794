"""Batch normalization, a drop-in for `keras.layers.BatchNormalization`."""


from keras import constraints
from keras import initializers
from keras import layers
from keras import ops
from keras import regularizers
from keras import saving

from keras_bn import _dispatch
from keras_bn import _layout
from keras_bn import _replicas
from keras_bn import _statistics
from keras_bn import _validation


@saving.register_keras_serializable(package="keras_bn")
class BatchNormalization(layers.Layer):
    """Batch normalization (Ioffe & Szegedy, 2015).

    A drop-in replacement for `keras.layers.BatchNormalization`: the same
    arguments, defaults and weights (`gamma`, `beta`, `moving_mean`,
    `moving_variance`, in that order, so `set_weights` moves weights between
    the two), and the same outputs and moving statistics for every
    configuration both accept. On top of core Keras it normalizes over
    several axes, supports ghost batches (`virtual_batch_size`), keeps masks
    and cross-replica synchronization working together, and offers a
    cumulative moving average (`momentum=None`).

    **Training** (`training=True` and `layer.trainable`): for every position
    on the normalized `axis`, with the mean and biased variance of the batch
    over all other axes (masked elements left out),

        mean_B = mean(x),  var_B = mean((x - mean_B) ** 2)
        y = gamma * (x - mean_B) / sqrt(var_B + epsilon) + beta

    and the moving statistics are updated once per step:

        moving_mean = moving_mean * momentum + mean_B * (1 - momentum)
        moving_variance = moving_variance * momentum + var_B * (1 - momentum)

    With `momentum=None` the update rate is `1 / n` at the layer's `n`-th
    update, so the moving statistics are the equal-weight average of every
    batch seen (PyTorch's convention); the count `n` is kept in the
    non-trainable weight `num_batches_tracked` and saved with the layer.

    **Inference** (`training=False`, the default, or `trainable=False`):

        y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta

    Setting `layer.trainable = False` runs the layer in inference mode, as in
    core Keras: this is what fine-tuning needs (the statistics learned in
    pretraining are kept and used).

    Ghost batches: with `virtual_batch_size=v`, training statistics are
    computed for each group of `v` consecutive examples and each group is
    normalized with its own statistics; the moving statistics are updated
    once per step with the mean of the groups' statistics; inference is
    unchanged. A batch whose size is not a multiple of `v` is split into
    full groups and one last, smaller group with the remainder.

    Statistics are computed in float32 (or wider, for float64 inputs) under
    `mixed_float16` and `mixed_bfloat16`, variances are clamped at zero, and
    the output has the layer's compute dtype. A batch that contributes no
    element to a statistic (all masked, or empty) leaves that moving
    statistic untouched. A batch of one example is allowed in training: its
    variance is zero, so the output is `beta`.

    Args:
        axis: Integer or list of integers, the axis or axes that keep their
            own statistics (typically the features axis); statistics are
            computed over all other axes. After a `Conv2D` layer with
            `data_format="channels_first"`, use `axis=1`. Defaults to `-1`.
        momentum: Float in `[0, 1)`, the decay of the moving averages, or
            `None` for a cumulative average over all training batches.
            Defaults to `0.99`.
        epsilon: Positive float added to the variance to avoid dividing by
            zero. Defaults to `1e-3`.
        center: If `True`, add the offset `beta`. Defaults to `True`.
        scale: If `True`, multiply by `gamma`. When the next layer is linear
            this can be disabled, since the next layer can do the scaling.
            Defaults to `True`.
        beta_initializer: Initializer for `beta`. Defaults to `"zeros"`.
        gamma_initializer: Initializer for `gamma`. Defaults to `"ones"`.
        moving_mean_initializer: Initializer for the moving mean. Defaults to
            `"zeros"`.
        moving_variance_initializer: Initializer for the moving variance.
            Defaults to `"ones"`.
        beta_regularizer: Optional regularizer for `beta`. Defaults to
            `None`.
        gamma_regularizer: Optional regularizer for `gamma`. Defaults to
            `None`.
        beta_constraint: Optional constraint for `beta`. Defaults to `None`.
        gamma_constraint: Optional constraint for `gamma`. Defaults to
            `None`.
        synchronized: If `True`, in training every replica normalizes
            with the statistics of the global batch: under a `tf.distribute`
            strategy (replicas) or an initialized `torch.distributed`
            process group (one replica per process, as
            `torch.nn.SyncBatchNorm`), the per-replica sums are all-reduced,
            masks included, and gradients flow through the reduction. If
            `False`, each replica uses its own batch's statistics (on
            TensorFlow the moving statistics receive the mean of the
            replicas' updates). With ghost batches, the groups are formed
            within each replica and only the moving-statistics update is
            synchronized. On the JAX backend, under `keras.distribution`
            (one process or several), arrays are global, so statistics
            always cover the whole batch and `True` changes nothing. The
            NumPy and OpenVINO backends do not accept `True`. Defaults to
            `False`.
        virtual_batch_size: Positive integer, the size of the ghost batches
            that training statistics are computed over, or `None` to use the
            whole batch. Defaults to `None`.
        fused: Whether the backend's fused batch-normalization kernel runs,
            as Keras's `LSTM(use_cudnn=...)`: on TensorFlow its fused
            kernel (cuDNN on a GPU, oneDNN or Eigen on a CPU), on torch
            PyTorch's `torch.native_batch_norm`; JAX has none. `None` lets
            keras_bn choose the fastest path for each call; `True` runs the
            kernel, or raises a `ValueError` that says why it cannot (at
            build time for the backend, ghost batches, and on TensorFlow
            axes other than the last alone or `epsilon < 1.001e-5`, on
            torch axes that are not adjacent; at call time for a mask in
            training, synchronization in progress, on TensorFlow float64 in
            training, on torch an empty training batch); `False` runs no
            kernel, only the `keras.ops` code. The results are the same on
            every path, up to float rounding;
            `layer.normalization_path(x, training=True)` tells which path a
            call takes and why (docs/performance.md lists the rules).
            Defaults to `None`.
        xla_kernel: Whether keras_bn's XLA-compiled kernel runs in
            training on the TensorFlow backend (it serves any axes, masks,
            ghost batches and float64; each input shape compiles once):
            `None` lets keras_bn choose (on a CPU, for tensors of at least
            2**20 elements, where TensorFlow's kernel cannot serve or is
            slow there); `True` runs it in every training call, or raises a
            `ValueError` (other backends, synchronization in progress);
            `False` never (the other paths are chosen as with `None`).
            With `None`, the environment variable
            `KERAS_BN_XLA_KERNEL=1` or `=0` sets a process-wide `True` or
            `False`. Cannot be `True` together with a `fused` that is not
            `None`. Defaults to `None`.
        renorm: Must be `False`; accepted so that the signature is core
            Keras's. Batch renormalization is
            `keras_bn.BatchRenormalization`, with the same arguments, and
            `from_config` gives one for a core Keras config with
            `renorm=True`. Defaults to `False`.
        renorm_clipping, renorm_momentum: Accepted with `renorm=False` and
            unused, as in core Keras. Default to `None` and `0.99`.
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).

    Call arguments:
        inputs: Input tensor of any rank.
        training: Python boolean: normalize with the batch statistics and
            update the moving statistics (`True`), or normalize with the
            moving statistics (`False`).
        mask: Optional boolean tensor; `False` marks elements that are left
            out of the batch statistics. Either the shape of `inputs` without
            its last axis (the masks Keras layers propagate), or a shape
            broadcastable to `inputs`. The output is computed for every
            element.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import keras_bn
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (8, 4))
    >>> layer = keras_bn.BatchNormalization(virtual_batch_size=4)
    >>> y = keras.ops.convert_to_numpy(
    ...     layer(x.astype("float32"), training=True))
    >>> bool(np.allclose(y[:4].mean(axis=0), 0.0, atol=1e-5))
    True
    >>> [w.name for w in layer.weights]
    ['gamma', 'beta', 'moving_mean', 'moving_variance']

    Reference:

    - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
    - [Hoffer et al., 2017](https://arxiv.org/abs/1705.08741) (ghost
      batches).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        virtual_batch_size=None,
        fused=None,
        xla_kernel=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.axis = _validation.axis("axis", axis)
        self.momentum = _validation.momentum(
            "momentum", momentum, allow_none=True
        )
        self.epsilon = _validation.epsilon("epsilon", epsilon)
        self.center = _validation.boolean("center", center)
        self.scale = _validation.boolean("scale", scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(
            moving_variance_initializer
        )
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        _check_renorm(type(self).__name__, renorm)
        synchronized = _validation.boolean("synchronized", synchronized)
        _replicas.check_backend(synchronized)
        self.synchronized = synchronized
        self.virtual_batch_size = _validation.integer(
            "virtual_batch_size", virtual_batch_size, 1, allow_none=True
        )
        self.fused = _validation.boolean("fused", fused, allow_none=True)
        self.xla_kernel = _validation.boolean(
            "xla_kernel", xla_kernel, allow_none=True
        )
        if self.xla_kernel and self.fused is not None:
            raise ValueError(
                "Argument `xla_kernel=True` asks for the XLA kernel, which "
                "`fused` rules out: `fused=True` asks for the backend's fused "
                "kernel and `fused=False` for no kernel. Received: "
                f"fused={fused!r}, xla_kernel={xla_kernel!r}"
            )
        self.supports_masking = True

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.num_batches_tracked = None

    def build(self, input_shape):
        axes = _layout.resolve_axes(self.axis, input_shape)
        if self.virtual_batch_size is not None and 0 in axes:
            raise ValueError(
                "Ghost batches split axis 0, so it cannot be a normalized "
                f"axis. Received: axis={self.axis!r}, "
                f"virtual_batch_size={self.virtual_batch_size}"
            )
        self._axes = axes
        self._param_shape = tuple(input_shape[a] for a in axes)
        self._reduced = [a for a in range(len(input_shape)) if a not in axes]
        # The statistics and weights as the kernels take them: `keepdims`
        # against the input.
        self._kept_shape = tuple(
            _layout.kept_shape(input_shape, self._reduced)
        )
        # One run of adjacent axes (PyTorch's kernel takes them as one).
        self._adjacent = axes == list(range(axes[0], axes[-1] + 1))
        shape = self._param_shape
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = self._add_statistic(
            "moving_mean", self.moving_mean_initializer
        )
        self.moving_variance = self._add_statistic(
            "moving_variance", self.moving_variance_initializer
        )
        if self.momentum is None:
            self.num_batches_tracked = self.add_weight(
                shape=(),
                name="num_batches_tracked",
                initializer="zeros",
                dtype="int",
                trainable=False,
                aggregation="only_first_replica",
            )
        self.input_spec = layers.InputSpec(
            ndim=len(input_shape), axes={a: input_shape[a] for a in axes}
        )
        self._check_requested_kernels(len(input_shape))

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            mask = _layout.standardize_mask(mask, inputs, self.name)
        training = bool(training and self.trainable)
        path = _dispatch.choose(self._call_facts(inputs, mask, training))
        ghosts = self.virtual_batch_size is not None
        kernel = _dispatch.kernel(path, self.synchronized and not ghosts)
        if training:
            outputs = self._train_step(kernel, inputs, mask)
        else:
            outputs = kernel.inference(
                inputs, self._reduced, self.epsilon,
                *self._scale_offset(inputs),
                self._shaped(self.moving_mean, inputs),
                self._shaped(self.moving_variance, inputs),
            )
        return _statistics.cast(outputs, self.compute_dtype)

    def normalization_path(self, inputs, training=False, mask=None):
        """The path a call with `inputs` takes, and why.

        keras_bn normalizes through its `keras.ops` code (`"ops"`),
        TensorFlow's fused kernel (`"fused"`), an XLA-compiled kernel
        (`"xla"`) or, on torch, PyTorch's kernel (`"torch"`), with the
        same results up to float rounding; one function chooses, from
        the backend, the device, oneDNN, the input's dtype and size, the
        mask, ghost batches, the axes, whether synchronization is in
        progress, training, XLA compilation and the layer's `fused` and
        `xla_kernel` arguments. This asks it, outside
        any `tf.function`: a call traced for XLA (`jit_compile=True`) may
        take another path.

        Args:
            inputs: A tensor or array shaped like the layer's inputs.
            training: Whether the call would be in training mode.
            mask: Optional mask, as `call` takes it.

        Returns:
            A `Path` with `.name` (`"ops"`, `"fused"`, `"xla"` or
            `"torch"`) and `.reason`, a sentence.

        Raises:
            ValueError: If `fused=True` or `xla_kernel=True` cannot serve
                such a call.
        """
        inputs = ops.convert_to_tensor(inputs)
        if not self.built:
            self.build(inputs.shape)
        if mask is not None:
            mask = _layout.standardize_mask(
                ops.convert_to_tensor(mask), inputs, self.name
            )
        training = bool(training and self.trainable)
        return _dispatch.choose(self._call_facts(inputs, mask, training))

    @classmethod
    def from_config(cls, config):
        """The layer of `config`; a core Keras config with `renorm=True`
        gives a `keras_bn.BatchRenormalization`."""
        if cls is BatchNormalization and config.get("renorm"):
            renormalizing = saving.get_registered_object(
                "keras_bn>BatchRenormalization"
            )
            return renormalizing.from_config(config)
        return super().from_config(config)

    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(
                self.moving_mean_initializer
            ),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "virtual_batch_size": self.virtual_batch_size,
            "fused": self.fused,
            "xla_kernel": self.xla_kernel,
        }
        return {**super().get_config(), **config}

    def _check_requested_kernels(self, rank):
        """Raises at build time if a kernel asked for can never serve."""
        _dispatch.check_requested_kernels(
            fused=self.fused,
            xla_kernel=self.xla_kernel,
            last_axis_only=self._axes == [rank - 1],
            adjacent_axes=self._adjacent,
            axis=self.axis,
            virtual_batch_size=self.virtual_batch_size,
            epsilon=self.epsilon,
        )

    def _call_facts(self, inputs, mask, training):
        """What `_dispatch.choose` needs to know about this call."""
        rank = len(inputs.shape)
        return _dispatch.call_facts(
            inputs,
            masked=mask is not None,
            training=training,
            ghost=self.virtual_batch_size is not None,
            last_axis_only=self._axes == [rank - 1],
            adjacent_axes=self._adjacent,
            epsilon=self.epsilon,
            synchronized=self.synchronized,
            fused=self.fused,
            xla_kernel=self.xla_kernel,
        )

    def _add_statistic(self, name, initializer):
        return self.add_weight(
            shape=self._param_shape,
            name=name,
            initializer=initializer,
            trainable=False,
            autocast=False,
            aggregation="mean",
        )

    def _train_step(self, kernel, inputs, mask):
        """Normalizes with batch statistics through `kernel` (a
        `_dispatch.Kernel`) and updates the moving statistics."""
        x, axes = inputs, self._reduced
        ghosts = self.virtual_batch_size is not None
        if ghosts:
            x, mask = _statistics.ghost_split(
                inputs, mask, self.virtual_batch_size
            )
            axes = [a + 1 for a in axes]
        outputs, (mean, variance, count) = self._normalize(
            kernel, x, axes, mask
        )
        if ghosts:
            mean, variance, count = _statistics.combine_ghosts(
                mean, variance, count, synchronized=self.synchronized
            )
            outputs = _statistics.ghost_merge(outputs, ops.shape(inputs)[0])
        self._update_moving_statistics(
            self._to_param_shape(mean),
            self._to_param_shape(variance),
            self._to_param_shape(count),
        )
        return outputs

    def _normalize(self, kernel, x, axes, mask):
        """`x` batch-normalized over `axes` with `gamma` and `beta`: a
        `_statistics.Normalized`, the moments `keepdims` against `x`."""
        scale, offset = self._scale_offset(x)
        return kernel.normalize(x, axes, mask, self.epsilon, scale, offset)

    def _scale_offset(self, x):
        """`gamma` and `beta` (ones and zeros where the layer has none)
        as the kernels take them for `x` (`_shaped`); the kernels cast
        them."""
        gamma = ops.ones(self._param_shape) if self.gamma is None else (
            self.gamma
        )
        beta = ops.zeros(self._param_shape) if self.beta is None else (
            self.beta
        )
        return self._shaped(gamma, x), self._shaped(beta, x)

    def _shaped(self, weight, x):
        """A per-position `weight`, `keepdims` against `x` (which may have
        a leading ghost axis)."""
        lead = (1,) * (len(x.shape) - len(self._kept_shape))
        return ops.reshape(weight, lead + self._kept_shape)

    def _update_moving_statistics(self, mean, variance, count):
        """Moves the moving statistics towards the batch's.

        Args:
            mean, variance: Batch statistics in the weights' shape.
            count: Elements (or ghost batches) behind each statistic, as a
                scalar or in the weights' shape; zero means "no update".
        """
        decay = self._decay(count)
        _statistics.assign_moving_average(self.moving_mean, mean, decay, count)
        _statistics.assign_moving_average(
            self.moving_variance, variance, decay, count
        )

    def _decay(self, count):
        """The decay of this step's update; counts it for `momentum=None`."""
        if self.momentum is not None:
            return self.momentum
        seen = ops.cast(self.num_batches_tracked, count.dtype)
        self.num_batches_tracked.assign_add(
            ops.cast(
                ops.any(ops.greater(count, 0)), self.num_batches_tracked.dtype
            )
        )
        return _statistics.cumulative_decay(seen)

    def _to_param_shape(self, statistic):
        if len(statistic.shape) == 0:
            return statistic
        return ops.reshape(statistic, self._param_shape)


def _check_renorm(class_name, renorm):
    if renorm:
        raise ValueError(
            f"{class_name} does not do batch renormalization: use "
            "keras_bn.BatchRenormalization, which takes the same arguments "
            "(`from_config` turns a core Keras config with `renorm=True` "
            f"into one). Received: renorm={renorm!r}"
        )
