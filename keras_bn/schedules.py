"""Step schedules for the clipping limits of batch renormalization.

A schedule maps the layer's training step (an integer tensor) to a float
tensor with `keras.ops`, so it runs on every Keras backend, eagerly and
compiled (`tf.function`, `jax.jit`). Schedules are serializable Keras
objects: they are saved in the layer's config and in `.keras` files.
"""

from keras import ops
from keras import saving

from keras_bn import _validation


@saving.register_keras_serializable(package="keras_bn")
class Schedule:
    """Base class of the step schedules that keras_bn layers accept.

    A subclass implements `__call__(step)`, returning a float32 tensor
    computed with `keras.ops`, and `get_config()`, and sets `value_range`
    to the `(lowest, highest)` value it can take (or `None` when unknown),
    which layers use to validate the schedule at construction.

    Example:

    >>> import keras
    >>> import keras_bn
    >>> class Halving(keras_bn.schedules.Schedule):
    ...     value_range = (0.0, 1.0)
    ...     def __call__(self, step):
    ...         return 0.5 ** keras.ops.cast(step, "float32")
    ...     def get_config(self):
    ...         return {}
    >>> float(Halving()(3))
    0.125
    """

    value_range = None

    def __call__(self, step):
        raise NotImplementedError(
            f"{type(self).__name__} must implement `__call__(step)`."
        )

    def get_config(self):
        raise NotImplementedError(
            f"{type(self).__name__} must implement `get_config()`."
        )

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        arguments = ", ".join(
            f"{key}={value!r}" for key, value in self.get_config().items()
        )
        return f"{type(self).__name__}({arguments})"


@saving.register_keras_serializable(package="keras_bn")
class LinearRamp(Schedule):
    """A value that moves linearly between two steps.

        value(step) = initial_value                        if step <= start
        value(step) = initial_value + (final_value - initial_value)
                      * (step - start_step) / (end_step - start_step)
                                                           if start < step < end
        value(step) = final_value                          if step >= end

    With `start_step == end_step` the value jumps to `final_value` at that
    step.

    Args:
        initial_value: Float, the value up to `start_step`. Defaults to
            `1.0`.
        final_value: Float, the value from `end_step` on. Defaults to `1.0`.
        start_step: Non-negative integer, the last step at `initial_value`.
            Defaults to `0`.
        end_step: Integer not less than `start_step`, the first step at
            `final_value`. Defaults to `0`.

    Call arguments:
        step: Integer scalar (tensor or Python int), the training step.

    Example:

    >>> import keras_bn
    >>> ramp = keras_bn.schedules.LinearRamp(1.0, 3.0, 100, 300)
    >>> [round(float(ramp(s)), 4) for s in (0, 100, 200, 300, 1000)]
    [1.0, 1.0, 2.0, 3.0, 3.0]

    Reference:

    - [Ioffe, 2017](https://arxiv.org/abs/1702.03275), section 4.1
      (the relaxation of `rmax` and `dmax`).
    """

    def __init__(
        self, initial_value=1.0, final_value=1.0, start_step=0, end_step=0
    ):
        self.initial_value = _validation.finite("initial_value", initial_value)
        self.final_value = _validation.finite("final_value", final_value)
        self.start_step = _validation.integer("start_step", start_step, 0)
        self.end_step = _validation.integer("end_step", end_step, 0)
        if self.end_step < self.start_step:
            raise ValueError(
                "Argument `end_step` must not be before `start_step`. "
                f"Received: start_step={start_step}, end_step={end_step}"
            )
        self.value_range = (
            min(self.initial_value, self.final_value),
            max(self.initial_value, self.final_value),
        )

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if self.end_step == self.start_step:
            progress = ops.cast(
                ops.greater_equal(step, float(self.end_step)), "float32"
            )
        else:
            progress = ops.clip(
                (step - float(self.start_step))
                / float(self.end_step - self.start_step),
                0.0,
                1.0,
            )
        return self.initial_value + progress * (
            self.final_value - self.initial_value
        )

    def get_config(self):
        return {
            "initial_value": self.initial_value,
            "final_value": self.final_value,
            "start_step": self.start_step,
            "end_step": self.end_step,
        }


@saving.register_keras_serializable(package="keras_bn")
class Reciprocal(Schedule):
    """`1 / schedule(step)`, e.g. the lower limit `rmin = 1 / rmax`.

    Args:
        schedule: A positive `Schedule` (or its serialized config). Required.

    Call arguments:
        step: Integer scalar (tensor or Python int), the training step.

    Example:

    >>> import keras_bn
    >>> rmax = keras_bn.schedules.LinearRamp(1.0, 4.0, 0, 3)
    >>> float(keras_bn.schedules.Reciprocal(rmax)(3))
    0.25
    """

    def __init__(self, schedule):
        if isinstance(schedule, dict):
            schedule = saving.deserialize_keras_object(schedule)
        if not isinstance(schedule, Schedule):
            raise ValueError(
                "Argument `schedule` must be a keras_bn.schedules.Schedule. "
                f"Received: schedule={schedule!r}"
            )
        if schedule.value_range is not None and schedule.value_range[0] <= 0:
            raise ValueError(
                "Argument `schedule` must stay positive to be inverted. "
                f"Received: schedule={schedule!r} with values in "
                f"{list(schedule.value_range)}"
            )
        self.schedule = schedule
        if schedule.value_range is not None:
            low, high = schedule.value_range
            self.value_range = (1.0 / high, 1.0 / low)

    def __call__(self, step):
        return 1.0 / self.schedule(step)

    def get_config(self):
        return {"schedule": saving.serialize_keras_object(self.schedule)}

    def __repr__(self):
        return f"Reciprocal({self.schedule!r})"


def paper_renorm_clipping(
    rmax=3.0,
    dmax=5.0,
    warmup_steps=5000,
    rmax_steps=40000,
    dmax_steps=25000,
):
    """The `renorm_clipping` of the batch renormalization paper.

    Plain batch normalization (`rmax = 1`, `dmax = 0`) up to `warmup_steps`,
    then linear ramps to `rmax` at `rmax_steps` and to `dmax` at
    `dmax_steps`; `r` is clipped to `[1 / rmax, rmax]`. The defaults are the
    paper's (rmax 1 -> 3 over steps 5k -> 40k, dmax 0 -> 5 over 5k -> 25k);
    shorter runs can shrink the three step counts together.

    Args:
        rmax: Float >= 1, the final upper limit of `r`. Defaults to `3.0`.
        dmax: Float >= 0, the final limit of `|d|`. Defaults to `5.0`.
        warmup_steps: Integer, the last step of plain batch normalization.
            Defaults to `5000`.
        rmax_steps: Integer, the step at which `rmax` is reached. Defaults
            to `40000`.
        dmax_steps: Integer, the step at which `dmax` is reached. Defaults
            to `25000`.

    Returns:
        A dict with schedules under `"rmax"`, `"rmin"` and `"dmax"`, to pass
        as `renorm_clipping` to `keras_bn.BatchRenormalization`.

    Example:

    >>> import keras_bn
    >>> clipping = keras_bn.schedules.paper_renorm_clipping()
    >>> {k: round(float(v(15000)), 4) for k, v in clipping.items()}
    {'rmax': 1.5714, 'rmin': 0.6364, 'dmax': 2.5}
    >>> layer = keras_bn.BatchRenormalization(renorm_clipping=clipping)

    Reference:

    - [Ioffe, 2017](https://arxiv.org/abs/1702.03275), section 4.1.
    """
    rmax = _validation.real("rmax", rmax, 1.0)
    dmax = _validation.real("dmax", dmax, 0.0)
    warmup_steps = _validation.integer("warmup_steps", warmup_steps, 0)
    for name, value in (("rmax_steps", rmax_steps), ("dmax_steps", dmax_steps)):
        _validation.integer(name, value, 0)
        if value < warmup_steps:
            _validation.fail(
                name, value, f"at least warmup_steps={warmup_steps}"
            )
    rmax_schedule = LinearRamp(1.0, rmax, warmup_steps, rmax_steps)
    return {
        "rmax": rmax_schedule,
        "rmin": Reciprocal(rmax_schedule),
        "dmax": LinearRamp(0.0, dmax, warmup_steps, dmax_steps),
    }
