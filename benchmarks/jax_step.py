"""Training steps of the normalization layers on the JAX backend.

Times, alternately in one process, a jit-compiled training step (forward
through `stateless_call`, gradients of `sum(y * dy)` with respect to the
input and the trainable weights, new moving statistics) of core Keras's
`BatchNormalization` (plain and with `renorm=True`) and of keras_bn's
`BatchNormalization` and `BatchRenormalization`. On JAX every layer runs
the `keras.ops` path, which XLA compiles.

    python benchmarks/jax_step.py
    python benchmarks/jax_step.py --shape 4096,1024 --repeats 30
"""

import os
import statistics
import sys
import time

import _cli

os.environ["KERAS_BACKEND"] = "jax"


def training_step(layer, x, dy):
    """A jit-compiled training step of `layer`, as a function of nothing.

    Its `lower()` lowers the jitted step for these arguments.
    """
    import jax
    import jax.numpy as jnp

    layer.build(x.shape)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def step(trainable, non_trainable, x, dy):
        def loss(trainable, x):
            y, updated = layer.stateless_call(
                trainable, non_trainable, x, training=True
            )
            return jnp.sum(y * dy), updated

        (_, updated), grads = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True
        )(trainable, x)
        return grads, updated

    def run():
        return jax.block_until_ready(step(trainable, non_trainable, x, dy))

    # For benchmarks/backends.py, which reads the compiled step's memory.
    run.lower = lambda: step.lower(trainable, non_trainable, x, dy)
    return run


def main(argv=None):
    args = _cli.parse_shape_and_repeats(__doc__, argv)
    import jax
    import keras
    import numpy as np

    import keras_bn

    rng = np.random.default_rng(0)
    # On the device once, so that the timed calls copy nothing.
    x = jax.device_put(rng.normal(1.0, 2.0, args.shape).astype("float32"))
    dy = jax.device_put(rng.normal(0.0, 1.0, args.shape).astype("float32"))
    layers = {
        "keras.layers.BatchNormalization": keras.layers.BatchNormalization(),
        "keras_bn.BatchNormalization": keras_bn.BatchNormalization(),
        "keras.layers.BatchNormalization(renorm=True)": (
            keras.layers.BatchNormalization(renorm=True)
        ),
        "keras_bn.BatchRenormalization": keras_bn.BatchRenormalization(),
    }
    steps = {
        name: training_step(layer, x, dy) for name, layer in layers.items()
    }
    for step in steps.values():
        for _ in range(3):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    print(
        f"Input {args.shape}, float32, JAX {jax.__version__} on "
        f"{jax.default_backend()}; jit-compiled training steps, medians of "
        f"{args.repeats} alternating calls.\n"
    )
    print("| layer | ms |")
    print("| --- | ---: |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
