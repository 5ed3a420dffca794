"""Batch renormalization, with clipping limits that may follow a schedule."""

import math
import numbers

from keras import ops
from keras import saving

from keras_bn import _statistics
from keras_bn import _validation
from keras_bn import schedules
from keras_bn.batch_normalization import BatchNormalization

_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


@saving.register_keras_serializable(package="keras_bn")
class BatchRenormalization(BatchNormalization):
    """Batch renormalization (Ioffe, 2017).

    A drop-in for `keras.layers.BatchNormalization(renorm=True, ...)`: the
    same arguments, weights (`gamma`, `beta`, `moving_mean`,
    `moving_variance`, `moving_stddev`, `renorm_mean`, `renorm_stddev`) and
    update formulas, so code moves over by changing the class name. On top
    of core Keras, each clipping limit may follow a schedule
    (`keras_bn.schedules`) driven by a step counter that the layer keeps and
    saves, and every feature of `keras_bn.BatchNormalization` (axis lists,
    masks, ghost batches, `synchronized`, mixed precision, `momentum=None`)
    works as there.

    **Training** (`training=True` and `layer.trainable`): with the batch
    statistics `mean_B`, `var_B` (per ghost batch with
    `virtual_batch_size`), `sigma_B = sqrt(var_B + epsilon)` and the
    renormalization statistics `renorm_mean`, `renorm_stddev` (floored at
    `sqrt(epsilon)`),

        r = stop_gradient(clip(sigma_B / renorm_stddev, rmin, rmax))
        d = stop_gradient(clip((mean_B - renorm_mean) / renorm_stddev,
                               -dmax, dmax))
        y = gamma * ((x - mean_B) / sigma_B * r + d) + beta

    and then, once per step (ghost batches' statistics averaged first),

        renorm_mean = renorm_mean * renorm_momentum
                      + mean_B * (1 - renorm_momentum)
        renorm_stddev = renorm_stddev * renorm_momentum
                        + sigma_B * (1 - renorm_momentum)
        moving_mean = moving_mean * momentum + mean_B * (1 - momentum)
        moving_stddev = moving_stddev * momentum + sigma_B * (1 - momentum)
        moving_variance = relu(moving_stddev ** 2 - epsilon)

    A missing clipping key means no clip on that side, as in core Keras;
    the paper clips `r` to `[1 / rmax, rmax]`, which
    `keras_bn.schedules.paper_renorm_clipping()` sets up together with the
    paper's warm-up. `rmin = rmax = 1` and `dmax = 0` give exactly batch
    normalization. The step counter `renorm_step` counts training calls and
    drives the schedules; the first training call uses step 0.

    **Inference** (`training=False`, or `trainable=False`): plain batch
    normalization with `moving_mean` and `moving_variance`.

    **Diagnostics**: `renorm_diagnostics()` returns the step, the clipping
    limits for the next training step and the fraction of `r` and `d`
    entries (features, per ghost batch) that the last training step
    clipped; the fractions are also the non-trainable weights
    `r_clipped_fraction` and `d_clipped_fraction`.

    Args:
        axis: Integer or list of integers, the axes that keep their own
            statistics, as in `keras_bn.BatchNormalization`. Defaults to
            `-1`.
        momentum: Float in `[0, 1)`, the decay of `moving_mean` and
            `moving_stddev` (the inference statistics), or `None` for a
            cumulative average. Defaults to `0.99`.
        epsilon: Positive float added to the variance. Defaults to `1e-3`.
        center: If `True`, add the offset `beta`. Defaults to `True`.
        scale: If `True`, multiply by `gamma`. Defaults to `True`.
        beta_initializer: Initializer for `beta`. Defaults to `"zeros"`.
        gamma_initializer: Initializer for `gamma`. Defaults to `"ones"`.
        moving_mean_initializer: Initializer for `moving_mean` and
            `renorm_mean`. Defaults to `"zeros"`.
        moving_variance_initializer: Initializer for `moving_variance`;
            `moving_stddev` and `renorm_stddev` start at its square root.
            Defaults to `"ones"`.
        beta_regularizer: Optional regularizer for `beta`. Defaults to
            `None`.
        gamma_regularizer: Optional regularizer for `gamma`. Defaults to
            `None`.
        beta_constraint: Optional constraint for `beta`. Defaults to `None`.
        gamma_constraint: Optional constraint for `gamma`. Defaults to
            `None`.
        renorm: Must be `True` (accepted so that core Keras configs load).
            Defaults to `True`.
        renorm_clipping: Dict with optional keys `"rmax"` (>= 1), `"rmin"`
            (in `[0, 1]`) and `"dmax"` (>= 0), each a float or a
            `keras_bn.schedules.Schedule` evaluated at `renorm_step`. A
            missing (or `None`) key means no clip on that side, and
            `renorm_clipping=None` no clipping at all. Defaults to `None`.
        renorm_momentum: Float in `[0, 1)`, the decay of `renorm_mean` and
            `renorm_stddev`, the statistics `r` and `d` are computed
            against. Defaults to `0.99`.
        synchronized: If `True`, under a `tf.distribute` strategy or
            `torch.distributed` every replica uses the global batch's
            statistics, as in `keras_bn.BatchNormalization`. Defaults to
            `False`.
        virtual_batch_size: Positive integer, the size of the ghost batches
            (each with its own `r` and `d`), or `None`. Defaults to `None`.
        fused: Whether the backend's fused kernel runs, as in
            `keras_bn.BatchNormalization`: `None` lets keras_bn choose,
            `True` requires it (or raises a `ValueError` that says why),
            `False` never. Defaults to `None`.
        xla_kernel: Whether keras_bn's XLA-compiled kernel runs in
            training on TensorFlow, as in `keras_bn.BatchNormalization`.
            Defaults to `None`.
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).

    Call arguments:
        inputs: Input tensor of any rank.
        training: Python boolean: renormalize with the batch statistics and
            update the statistics (`True`), or normalize with the moving
            statistics (`False`).
        mask: Optional boolean tensor, as in `keras_bn.BatchNormalization`.

    Example:

    >>> import numpy as np
    >>> import keras_bn
    >>> layer = keras_bn.BatchRenormalization(
    ...     renorm_clipping=keras_bn.schedules.paper_renorm_clipping(
    ...         warmup_steps=1, rmax_steps=8, dmax_steps=5))
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (8, 4))
    >>> for _ in range(3):
    ...     y = layer(x.astype("float32"), training=True)
    >>> stats = layer.renorm_diagnostics()
    >>> int(stats["step"]), round(float(stats["rmax"]), 4)
    (3, 1.5714)
    >>> round(float(stats["dmax"]), 4), float(stats["d_clipped"])
    (2.5, 1.0)

    Reference:

    - [Ioffe, 2017](https://arxiv.org/abs/1702.03275).
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
        renorm=True,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        virtual_batch_size=None,
        fused=None,
        xla_kernel=None,
        **kwargs,
    ):
        if renorm is not True:
            raise ValueError(
                "keras_bn.BatchRenormalization always renormalizes; use "
                "keras_bn.BatchNormalization for plain batch normalization. "
                f"Received: renorm={renorm!r}"
            )
        super().__init__(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            renorm=False,
            synchronized=synchronized,
            virtual_batch_size=virtual_batch_size,
            fused=fused,
            xla_kernel=xla_kernel,
            **kwargs,
        )
        self.renorm = True
        self.renorm_clipping = _validate_clipping(renorm_clipping)
        self.renorm_momentum = _validation.momentum(
            "renorm_momentum", renorm_momentum
        )

        self.moving_stddev = None
        self.renorm_mean = None
        self.renorm_stddev = None
        self.renorm_step = None
        self.r_clipped_fraction = None
        self.d_clipped_fraction = None

    def build(self, input_shape):
        super().build(input_shape)
        variance_initializer = self.moving_variance_initializer

        def stddev_initializer(shape, dtype=None):
            # `moving_stddev ** 2` equals the initial variance, as in core
            # Keras (no epsilon).
            return ops.sqrt(variance_initializer(shape, dtype=dtype))

        self.moving_stddev = self._add_statistic(
            "moving_stddev", stddev_initializer
        )
        self.renorm_mean = self._add_statistic(
            "renorm_mean", self.moving_mean_initializer
        )
        self.renorm_stddev = self._add_statistic(
            "renorm_stddev", stddev_initializer
        )
        # Every replica takes the same number of steps, so the first
        # replica's count is the count.
        self.renorm_step = self.add_weight(
            shape=(),
            name="renorm_step",
            initializer="zeros",
            dtype="int",
            trainable=False,
            aggregation="only_first_replica",
        )
        self.r_clipped_fraction = self._add_diagnostic("r_clipped_fraction")
        self.d_clipped_fraction = self._add_diagnostic("d_clipped_fraction")

    def get_config(self):
        clipping = {
            key: (
                saving.serialize_keras_object(value)
                if isinstance(value, schedules.Schedule)
                else value
            )
            for key, value in self.renorm_clipping.items()
        }
        config = {
            "renorm": True,
            "renorm_clipping": clipping,
            "renorm_momentum": self.renorm_momentum,
        }
        return {**super().get_config(), **config}

    def renorm_diagnostics(self):
        """The renormalization state, for logging.

        Returns:
            A dict of scalar tensors: `"step"` (training calls so far),
            `"rmax"`, `"rmin"` and `"dmax"` (the limits the next training
            call will use; `inf`, `0` and `inf` when not clipped),
            `"r_clipped"` and `"d_clipped"` (the fraction of `r` and `d`
            entries the last training call clipped).
        """
        if self.renorm_step is None:
            raise ValueError(
                f"Layer '{self.name}' has no diagnostics before it is built."
            )
        limits = self._limits(self.renorm_step, "float32")
        defaults = {"rmax": math.inf, "rmin": 0.0, "dmax": math.inf}
        diagnostics = {"step": ops.convert_to_tensor(self.renorm_step)}
        for key in _CLIPPING_KEYS:
            value = limits.get(key)
            diagnostics[key] = ops.convert_to_tensor(
                defaults[key] if value is None else value, "float32"
            )
        diagnostics["r_clipped"] = ops.convert_to_tensor(
            self.r_clipped_fraction
        )
        diagnostics["d_clipped"] = ops.convert_to_tensor(
            self.d_clipped_fraction
        )
        return diagnostics

    def _add_diagnostic(self, name):
        return self.add_weight(
            shape=(),
            name=name,
            initializer="zeros",
            dtype="float32",
            trainable=False,
            autocast=False,
            aggregation="mean",
        )

    def _train_step(self, kernel, inputs, mask):
        outputs = super()._train_step(kernel, inputs, mask)
        self.renorm_step.assign_add(ops.cast(1, self.renorm_step.dtype))
        return outputs

    def _normalize(self, kernel, x, axes, mask):
        """`x` renormalized: `r` and `d`, functions of the batch's moments,
        folded into the scale `r * gamma` and the offset
        `d * gamma + beta`."""
        weights = (
            *self._scale_offset(x),
            self._shaped(self.renorm_mean, x),
            self._shaped(self.renorm_stddev, x),
        )

        def scale_offset(moments):
            dtype = moments.mean.dtype
            gamma, beta, renorm_mean, renorm_stddev = (
                _statistics.cast(w, dtype) for w in weights
            )
            r, d = self._corrections(
                moments.mean,
                _statistics.stddev(moments.variance, self.epsilon),
                renorm_mean,
                renorm_stddev,
            )
            return r * gamma, d * gamma + beta

        if kernel.moments is None:
            # A kernel that computes the moments only as it normalizes.
            return kernel.corrected(x, axes, self.epsilon, scale_offset)
        moments = kernel.moments(x, axes, mask)
        scale, offset = scale_offset(moments)
        return kernel.normalize(
            x, axes, mask, self.epsilon, scale, offset, moments
        )

    def _corrections(self, mean, stddev, renorm_mean, renorm_stddev):
        """Clipped, gradient-stopped `r` and `d`; records the clipping."""
        # A floor keeps `r` and `d` finite if `renorm_stddev` starts at 0.
        renorm_stddev = _statistics.at_least(
            renorm_stddev, math.sqrt(self.epsilon)
        )
        r_raw = stddev / renorm_stddev
        d_raw = (mean - renorm_mean) / renorm_stddev
        limits = self._limits(self.renorm_step, mean.dtype)
        r, d = r_raw, d_raw
        if limits.get("rmin") is not None:
            r = _statistics.at_least(r, limits["rmin"])
        if limits.get("rmax") is not None:
            r = _statistics.at_most(r, limits["rmax"])
        if limits.get("dmax") is not None:
            d = ops.clip(d, -limits["dmax"], limits["dmax"])
        self.r_clipped_fraction.assign(_changed_fraction(r_raw, r))
        self.d_clipped_fraction.assign(_changed_fraction(d_raw, d))
        return ops.stop_gradient(r), ops.stop_gradient(d)

    def _update_moving_statistics(self, mean, variance, count):
        stddev = _statistics.stddev(variance, self.epsilon)
        renorm_decay = self.renorm_momentum
        _statistics.assign_moving_average(
            self.renorm_mean, mean, renorm_decay, count
        )
        _statistics.assign_moving_average(
            self.renorm_stddev, stddev, renorm_decay, count
        )
        decay = self._decay(count)
        _statistics.assign_moving_average(self.moving_mean, mean, decay, count)
        _statistics.assign_moving_average(
            self.moving_stddev, stddev, decay, count
        )
        # `moving_variance` follows `moving_stddev` so that inference divides
        # by `moving_stddev`; a zero decay writes the derived value only
        # where the batch counted.
        moving_stddev = ops.cast(self.moving_stddev, stddev.dtype)
        _statistics.assign_moving_average(
            self.moving_variance,
            _statistics.variance_from_stddev(moving_stddev, self.epsilon),
            0.0,
            count,
        )

    def _limits(self, step, dtype):
        """The clipping limits at `step`, as tensors of `dtype` or None."""
        limits = {}
        for key, value in self.renorm_clipping.items():
            if isinstance(value, schedules.Schedule):
                value = value(step)
            limits[key] = None if value is None else ops.cast(value, dtype)
        return limits


def _changed_fraction(before, after):
    return ops.mean(ops.cast(ops.not_equal(before, after), "float32"))


def _validate_clipping(renorm_clipping):
    if renorm_clipping is None:
        return {}
    if not isinstance(renorm_clipping, dict):
        raise ValueError(
            "Argument `renorm_clipping` must be a dict or None. Received: "
            f"renorm_clipping={renorm_clipping!r}"
        )
    unknown = sorted(set(renorm_clipping) - set(_CLIPPING_KEYS))
    if unknown:
        raise ValueError(
            f"Argument `renorm_clipping` has unknown keys {unknown}; the "
            f"allowed keys are {list(_CLIPPING_KEYS)}. Received: "
            f"renorm_clipping={renorm_clipping!r}"
        )
    allowed = {"rmax": (1.0, math.inf), "rmin": (0.0, 1.0),
               "dmax": (0.0, math.inf)}
    clipping = {}
    for key, value in renorm_clipping.items():
        if isinstance(value, dict):
            value = saving.deserialize_keras_object(value)
        if value is None:
            clipping[key] = None
            continue
        if isinstance(value, schedules.Schedule):
            value_range = value.value_range
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
            value_range = (value, value)
        else:
            raise ValueError(
                f"`renorm_clipping['{key}']` must be a float, a "
                "keras_bn.schedules.Schedule or None. Received: "
                f"{key}={value!r}"
            )
        low, high = allowed[key]
        if value_range is not None and not (
            low <= value_range[0] and value_range[1] <= high
        ):
            raise ValueError(
                f"`renorm_clipping['{key}']` must stay in [{low}, {high}]. "
                f"Received: {key}={value!r}"
            )
        clipping[key] = value
    return clipping
