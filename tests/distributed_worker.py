"""A worker for tests/test_distributed.py; run as a script, never imported.

Trains a small model with a synchronized `keras_bn.BatchNormalization` (or
`BatchRenormalization`) for a few steps and saves the final weights
(moving statistics included). Every distributed mode has a one-process
reference run on the global batch.

Usage:
    python distributed_worker.py multiworker DATA.npz OUT.npz
        (TF_CONFIG set: one process per worker of
        MultiWorkerMirroredStrategy, a custom `strategy.run` loop; each
        feeds its shard of the batch)
    python distributed_worker.py single DATA.npz OUT.npz
        (the same steps on one TensorFlow device with the global batch)
    python distributed_worker.py jax DATA.npz OUT.npz [PORT INDEX DEVICES]
        (KERAS_BACKEND=jax, `model.fit` under keras.distribution's
        DataParallel over all the devices. Without PORT, one process, and
        XLA_FLAGS may set how many virtual CPU devices exist; with it, one
        of two processes joined by `jax.distributed` on 127.0.0.1:PORT,
        with DEVICES local CPU devices, feeding its half of the batch)
    python distributed_worker.py torch DATA.npz OUT.npz [PORT RANK [DDP]]
        (KERAS_BACKEND=torch, a custom loop with torch autograd and a Keras
        optimizer. Without PORT, one process on the global batch; with it,
        rank RANK of a two-process gloo group whose store is on
        127.0.0.1:PORT, feeding its half of the batch and summing the
        gradients itself, or with DDP=1 leaving that to
        DistributedDataParallel around the model)

TensorFlow is imported only in the TensorFlow modes (keras_bn itself may
still import it where it is installed).
"""

import datetime
import os
import socket
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

STEPS = 3
PROCESSES = 2
TIMEOUT_S = 60


def build_layer(keras_bn, data):
    kwargs = dict(
        synchronized=True,
        momentum=0.5,
        virtual_batch_size=int(data["virtual_batch_size"]) or None,
    )
    if int(data["renorm"]):
        return keras_bn.BatchRenormalization(
            renorm_clipping={"rmax": 2.0, "dmax": 1.0},
            renorm_momentum=0.5,
            **kwargs,
        )
    return keras_bn.BatchNormalization(**kwargs)


def set_initial_weights(model, data):
    """The weights of `data`: two dense layers around the normalization.

    They are laid out as a `keras_bn.BatchNormalization` model's; batch
    renormalization takes its `gamma` and `beta` and keeps its own
    initial statistics.
    """
    weights = list(data["weights"])
    if not int(data["renorm"]):
        model.set_weights(weights)
        return
    first, norm, last = (layer for layer in model.layers if layer.weights)
    first.set_weights(weights[:2])
    norm.gamma.assign(weights[2])
    norm.beta.assign(weights[3])
    last.set_weights(weights[-2:])


def build_model(keras, keras_bn, data):
    model = keras.Sequential(
        [
            keras.Input(data["x"].shape[1:]),
            keras.layers.Dense(4),
            build_layer(keras_bn, data),
            keras.layers.Dense(1),
        ]
    )
    set_initial_weights(model, data)
    return model


def build_masked_model(keras, keras_bn, data):
    """`build_model` as a functional model whose second input is the mask."""
    x_in = keras.Input(data["x"].shape[1:])
    mask_in = keras.Input(data["mask"].shape[1:], dtype="bool")
    hidden = keras.layers.Dense(4)(x_in)
    hidden = build_layer(keras_bn, data)(
        hidden, mask=mask_in if int(data["masked"]) else None
    )
    model = keras.Model([x_in, mask_in], keras.layers.Dense(1)(hidden))
    set_initial_weights(model, data)
    return model


def local_mask(data):
    return data["mask"] if int(data["masked"]) else None


def shard(values, index, count):
    size = len(values) // count
    return values[index * size : (index + 1) * size]


def run_tensorflow(mode, data):
    import tensorflow as tf

    if mode == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.OneDeviceStrategy("CPU:0")
    import keras

    import keras_bn

    x, y, mask = data["x"], data["y"], local_mask(data)
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        model = build_model(keras, keras_bn, data)
        optimizer = keras.optimizers.SGD(0.01)
        optimizer.build(model.trainable_variables)

    def local(values):
        def fn(ctx):
            i = ctx.replica_id_in_sync_group
            return tf.constant(shard(values, i, replicas))

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

    masks = None if mask is None else local(mask)
    for _ in range(STEPS):
        step(local(x), local(y), masks)
    return [v.numpy() for v in model.weights]


def run_jax(data, port=None, index=0, local_devices=1):
    import jax

    processes = 1
    if port is not None:
        processes = PROCESSES
        # Every process must have the same number of devices.
        jax.config.update("jax_num_cpu_devices", local_devices)
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            coordinator_bind_address=f"127.0.0.1:{port}",
            num_processes=processes,
            process_id=index,
            initialization_timeout=TIMEOUT_S,
            shutdown_timeout_seconds=TIMEOUT_S,
        )
    import keras

    import keras_bn

    # Arrays are global: every process must create the same initial values.
    keras.utils.set_random_seed(0)
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(
            devices=keras.distribution.list_devices(),
            # Each process passes its own shard of the global batch.
            auto_shard_dataset=False,
        )
    )
    model = build_masked_model(keras, keras_bn, data)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x, y, mask = (shard(data[k], index, processes) for k in ("x", "y", "mask"))
    model.fit(
        [x, mask], y, batch_size=len(x), epochs=STEPS, shuffle=False,
        verbose=0,
    )
    weights = [
        # Replicated on every device: any local copy is the value.
        jax.device_get(v.value.addressable_data(0))
        for v in model.weights
    ]
    return weights + [len(jax.devices())]


def run_torch(data, port=None, rank=0, ddp=0):
    import torch
    from torch import distributed

    torch.set_num_threads(1)
    processes = 1
    if port is not None:
        processes = PROCESSES
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        # `init_method="tcp://127.0.0.1:PORT"` would do, but its store
        # listens on every interface; this one listens on 127.0.0.1 only
        # (and GLOO_SOCKET_IFNAME=lo keeps gloo's own sockets there).
        listener = None
        if rank == 0:
            listener = socket.create_server(("127.0.0.1", port))
        store = distributed.TCPStore(
            "127.0.0.1",
            port,
            processes,
            is_master=rank == 0,
            timeout=timeout,
            master_listen_fd=None if listener is None else listener.fileno(),
        )
        distributed.init_process_group(
            "gloo", store=store, rank=rank, world_size=processes,
            timeout=timeout,
        )
    import keras

    import keras_bn

    x, y, mask = (
        keras.ops.convert_to_tensor(shard(data[k], rank, processes))
        for k in ("x", "y", "mask")
    )
    if ddp:
        model = build_masked_model(keras, keras_bn, data)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        model = build_model(keras, keras_bn, data)
        mask = mask if int(data["masked"]) else None
    variables = model.trainable_variables
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(variables)
    # The sum of the processes' losses is the global batch's.
    scale = 1.0 / len(data["x"])
    if ddp:
        scale *= processes  # DistributedDataParallel averages gradients
    first_output = None
    for step in range(STEPS):
        for v in variables:
            v.value.grad = None
        if ddp:
            pred = wrapped([x, mask], training=True)
        else:
            hidden = model.layers[0](x)
            hidden = model.layers[1](hidden, training=True, mask=mask)
            if step == 0:
                first_output = keras.ops.convert_to_numpy(hidden)
            pred = model.layers[2](hidden)
        loss = torch.sum(torch.square(pred - y)) * scale
        loss.backward()
        grads = [v.value.grad for v in variables]
        if processes > 1 and not ddp:
            for grad in grads:
                distributed.all_reduce(grad)
        with torch.no_grad():
            optimizer.apply(grads, variables)
    weights = [keras.ops.convert_to_numpy(v) for v in model.weights]
    if processes > 1:
        distributed.destroy_process_group()
    return weights + ([] if first_output is None else [first_output])


def main():
    import numpy as np

    mode, data_path, out_path, *rest = sys.argv[1:]
    data = dict(np.load(data_path, allow_pickle=True))
    if mode == "jax":
        weights = run_jax(data, *map(int, rest))
    elif mode == "torch":
        weights = run_torch(data, *map(int, rest))
    else:
        weights = run_tensorflow(mode, data)
    np.savez(out_path, *weights)


if __name__ == "__main__":
    main()
