"""A worker for tests/test_distributed.py; run as a script, never imported.

Trains a small model with synchronized `keras_bn.BatchNormalization` for a
few steps of a custom `strategy.run` loop and saves the final weights.

Usage:
    python distributed_worker.py multiworker DATA.npz OUT.npz
        (TF_CONFIG set: one process per worker of
        MultiWorkerMirroredStrategy; each feeds its shard of the batch)
    python distributed_worker.py single DATA.npz OUT.npz
        (the same steps on one device with the global batch)
    python distributed_worker.py jax DATA.npz OUT.npz
        (KERAS_BACKEND=jax, keras.distribution.DataParallel over all the
        devices; XLA_FLAGS sets how many virtual CPU devices exist)
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

STEPS = 3


def build_model(keras, keras_bn, data):
    model = keras.Sequential(
        [
            keras.Input(data["x"].shape[1:]),
            keras.layers.Dense(4),
            keras_bn.BatchNormalization(
                synchronized=True,
                momentum=0.5,
                virtual_batch_size=int(data["virtual_batch_size"]) or None,
            ),
            keras.layers.Dense(1),
        ]
    )
    model.set_weights(list(data["weights"]))
    return model


def run_tensorflow(mode, data):
    import tensorflow as tf

    if mode == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.OneDeviceStrategy("CPU:0")
    import keras

    import keras_bn

    x, y, mask = data["x"], data["y"], data["mask"]
    replicas = strategy.num_replicas_in_sync
    shard = len(x) // replicas
    with strategy.scope():
        model = build_model(keras, keras_bn, data)
        optimizer = keras.optimizers.SGD(0.01)
        optimizer.build(model.trainable_variables)

    def local(values):
        def fn(ctx):
            i = ctx.replica_id_in_sync_group
            return tf.constant(values[i * shard : (i + 1) * shard])

        return strategy.experimental_distribute_values_from_function(fn)

    @tf.function
    def step(xs, ys, ms):
        def replica_fn(xb, yb, mb):
            with tf.GradientTape() as tape:
                hidden = model.layers[0](xb)
                hidden = model.layers[1](hidden, training=True, mask=mb)
                pred = model.layers[2](hidden)
                loss = tf.reduce_sum(tf.square(pred - yb)) / len(x)
            # The optimizer sums the gradients over replicas itself.
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)

        strategy.run(replica_fn, args=(xs, ys, ms))

    for _ in range(STEPS):
        step(local(x), local(y), local(mask))
    return [v.numpy() for v in model.weights]


def run_jax(data):
    import jax
    import keras

    import keras_bn

    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    model = build_model(keras, keras_bn, data)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(
        data["x"], data["y"], batch_size=len(data["x"]), epochs=STEPS,
        shuffle=False, verbose=0,
    )
    return [keras.ops.convert_to_numpy(v) for v in model.weights] + [
        len(jax.devices())
    ]


def main():
    import numpy as np

    mode, data_path, out_path = sys.argv[1:4]
    data = dict(np.load(data_path, allow_pickle=True))
    if mode == "jax":
        weights = run_jax(data)
    else:
        weights = run_tensorflow(mode, data)
    np.savez(out_path, *weights)


if __name__ == "__main__":
    main()
