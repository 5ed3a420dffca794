"""Where a batch-normalization training step's time goes, op by op.

Times, in one TensorFlow graph each and alternating between them, the
pieces of a training step on one tensor without XLA: TensorFlow's fused
kernel forward (`FusedBatchNormV3`) and backward (`FusedBatchNormGradV3`),
the inference-mode kernel call that batch renormalization adds (its
corrected normalization, once the training-mode call has the statistics),
keras_bn's XLA-compiled kernel forward and backward (called from an
ordinary graph, as the layers call it on a CPU), one element-wise op and
one reduction (the unit cost of TensorFlow's CPU runtime on this tensor),
and the whole steps of core Keras, keras_bn and tf-keras (when
installed). `docs/performance.md` quotes its output where a
speed target is missed.

    python benchmarks/profile_step.py
    python benchmarks/profile_step.py --shape 4096,1024 --repeats 30
"""

import os
import statistics
import sys
import time

import _cli

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"


def pieces(shape):
    """`{name: (function, args)}` of the timed pieces."""
    import keras
    import tensorflow as tf

    import keras_bn
    from keras_bn import _kernels

    channels = shape[-1]
    x = tf.random.normal(shape, mean=1.0, stddev=2.0)
    dy = tf.random.normal(shape)
    # The view the layers give TensorFlow's kernel (keras_bn._kernels).
    x4 = tf.reshape(x, (shape[0], -1, 1, channels))
    dy4 = tf.reshape(dy, x4.shape)
    gamma, beta = tf.ones(channels), tf.zeros(channels)
    _, _, _, *reserve = tf.raw_ops.FusedBatchNormV3(
        x=x4, scale=gamma, offset=beta, mean=tf.zeros(0),
        variance=tf.zeros(0), epsilon=1e-3, is_training=True,
    )

    @tf.function
    def kernel_forward(x4):
        return tf.compat.v1.nn.fused_batch_norm(
            x4, gamma, beta, epsilon=1e-3, is_training=True
        )

    @tf.function
    def kernel_backward(dy4, x4):
        return tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=dy4, x=x4, scale=gamma, reserve_space_1=reserve[0],
            reserve_space_2=reserve[1], reserve_space_3=reserve[2],
            epsilon=1e-3, is_training=True,
        )

    xla = _kernels._xla_functions(2)
    x2 = tf.reshape(x, (-1, channels))
    dy2 = tf.reshape(dy, x2.shape)
    mean, variance, count = xla.moments(x2, (0,), None)
    gamma2, beta2 = tf.reshape(gamma, (1, -1)), tf.reshape(beta, (1, -1))

    @tf.function
    def xla_forward(x2):
        mean, variance, _ = xla.moments(x2, (0,), None)
        return xla.normalize(x2, mean, variance, gamma2, beta2, 1e-3)

    @tf.function
    def xla_forward_merged(x2):
        return xla.forward(x2, None, gamma2, beta2, 1e-3)

    @tf.function
    def xla_backward(dy2, x2):
        return xla.normalize_grad(
            dy2, x2, mean, variance, count, None, gamma2, (0,), 1e-3
        )

    moments4 = tf.nn.moments(x4, [0, 1, 2])

    @tf.function
    def kernel_inference(x4):
        return tf.compat.v1.nn.fused_batch_norm(
            x4, gamma, beta, mean=moments4[0], variance=moments4[1],
            epsilon=1e-3, is_training=False,
        )

    @tf.function
    def elementwise(x):
        return x * 2.0

    @tf.function
    def reduction(x):
        return tf.reduce_sum(x, list(range(len(shape) - 1)))

    def training_step(layer):
        layer(x, training=False)

        @tf.function
        def step(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return tape.gradient(
                y, [x] + layer.trainable_weights, output_gradients=dy
            )

        return step

    timed = {
        "fused kernel forward": (kernel_forward, (x4,)),
        "fused kernel backward": (kernel_backward, (dy4, x4)),
        "fused kernel, inference mode (renorm adds it)": (
            kernel_inference, (x4,),
        ),
        "XLA kernel forward, renormalization (moments, normalize)": (
            xla_forward, (x2,),
        ),
        "XLA kernel forward, batch normalization (one function)": (
            xla_forward_merged, (x2,),
        ),
        "XLA kernel backward": (xla_backward, (dy2, x2)),
        "one element-wise op (x * 2)": (elementwise, (x,)),
        "one reduction (sum over the batch)": (reduction, (x,)),
        "step: keras.layers.BatchNormalization": (
            training_step(keras.layers.BatchNormalization()), (x, dy),
        ),
        "step: keras_bn.BatchNormalization": (
            training_step(keras_bn.BatchNormalization()), (x, dy),
        ),
        "step: keras_bn.BatchRenormalization": (
            training_step(keras_bn.BatchRenormalization()), (x, dy),
        ),
    }
    try:
        import tf_keras
    except ImportError:
        pass
    else:
        timed["step: tf_keras BatchNormalization (fused)"] = (
            training_step(tf_keras.layers.BatchNormalization()), (x, dy),
        )
    return timed


def main(argv=None):
    args = _cli.parse_shape_and_repeats(__doc__, argv)
    import tensorflow as tf

    timed = pieces(args.shape)
    for fn, fn_args in timed.values():
        for _ in range(3):
            fn(*fn_args)
    times = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, (fn, fn_args) in timed.items():
            start = time.perf_counter()
            fn(*fn_args)
            tf.test.experimental.sync_devices()
            times[name].append(time.perf_counter() - start)
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset")
    print(
        f"Input {args.shape}, float32, no XLA, TF_ENABLE_ONEDNN_OPTS="
        f"{onednn}; medians of {args.repeats} alternating calls.\n"
    )
    unit = statistics.median(times["one element-wise op (x * 2)"])
    print("| piece | ms | element-wise ops |")
    print("| --- | ---: | ---: |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.2f} | {median / unit:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
