"""Where an XLA-compiled recurrent training step's time goes, kernel by kernel.

Compiles a training step (forward with `training=True`, gradients of
`sum(y * dy)` with respect to the input and the trainable weights) of
`keras_bn.BNLSTM` and of `keras.layers.LSTM` (or the GRU pair) with
`jit_compile=True`, records a few calls with TensorFlow's profiler while
XLA's CPU runtime marks each kernel it runs
(`--xla_cpu_enable_xprof_traceme`), and prints, for each layer, the
kernels that cost most, in microseconds per time step. Kernel names are
those of the optimized HLO (`step.experimental_get_compiler_ir`): a
`fusion` is element-wise work XLA fused into one loop, `MatMul` a matrix
product, `dynamic-slice` / `dynamic-update-slice` reads and writes of one
step of a sequence. `docs/recurrent.md` quotes its output.

    python benchmarks/xla_kernels.py
    python benchmarks/xla_kernels.py --layer GRU --top 20
"""

import argparse
import collections
import os
import re
import sys
import tempfile

import _cli

# Read when XLA first compiles, so before TensorFlow is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"



def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layer", choices=("LSTM", "GRU"), default="LSTM",
        help="which pair to profile (default: LSTM)",
    )
    parser.add_argument(
        "--shape", type=shape, default=(64, 100, 32),
        help="batch,steps,features of the input (default: 64,100,32)",
    )
    parser.add_argument(
        "--units", type=_cli.positive_int, default=128,
        help="units of the layers (default: 128)",
    )
    parser.add_argument(
        "--top", type=_cli.positive_int, default=12,
        help="kernels to print per layer (default: 12)",
    )
    parser.add_argument(
        "--calls", type=_cli.positive_int, default=5,
        help="profiled calls, after 3 untimed ones (default: 5)",
    )
    return parser.parse_args(argv)


def shape(text):
    """An argparse type: three positive integers, comma-separated."""
    sizes = [_cli.positive_int(s) for s in text.split(",")]
    if len(sizes) != 3:
        raise argparse.ArgumentTypeError(
            "must be batch,steps,features: three positive integers. "
            f"Received: {text!r}"
        )
    return tuple(sizes)


def kernel_times(layer, x, dy, calls):
    """`({kernel: microseconds per time step}, total ms per call)`."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    layer(x[:2])

    @tf.function(jit_compile=True)
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * dy)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    for _ in range(3):
        step(x, dy)
    hlo = step.experimental_get_compiler_ir(x, dy)(stage="optimized_hlo")
    names = set(re.findall(r"%([\w.\-]+) = ", hlo))
    with tempfile.TemporaryDirectory() as folder:
        tf.profiler.experimental.start(folder)
        for _ in range(calls):
            for gradient in step(x, dy):
                gradient.numpy()
        tf.profiler.experimental.stop()
        (path,) = [
            os.path.join(root, f)
            for root, _, files in os.walk(folder)
            for f in files
            if f.endswith(".xplane.pb")
        ]
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    totals = collections.Counter()
    wall = 0.0
    for plane in space.planes:
        metadata = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = metadata.get(event.metadata_id, "")
                if name in names:
                    totals[name] += event.duration_ps / 1e6
                elif name == "CpuExecutable::ExecuteAsyncOnStream":
                    wall += event.duration_ps / 1e9
    per_step = calls * x.shape[1]
    return {k: v / per_step for k, v in totals.items()}, wall / calls


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_bn

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=args.shape).astype("float32"))
    dy = tf.constant(
        rng.normal(size=(args.shape[0], args.units)).astype("float32")
    )
    pairs = {
        "LSTM": {
            "keras.layers.LSTM": keras.layers.LSTM,
            "keras_bn.BNLSTM": keras_bn.BNLSTM,
        },
        "GRU": {
            "keras.layers.GRU": keras.layers.GRU,
            "keras_bn.BNGRU": keras_bn.BNGRU,
        },
    }
    print(
        f"Training step, input {args.shape} (batch, steps, features), "
        f"{args.units} units, XLA; TF_ENABLE_ONEDNN_OPTS="
        f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}. Microseconds "
        "per time step, summed over the threads that ran each kernel."
    )
    for name, cls in pairs[args.layer].items():
        times, wall = kernel_times(cls(args.units), x, dy, args.calls)
        print(
            f"\n{name}: {wall:.1f} ms per call, the {args.top} costliest "
            "kernels\n"
        )
        print("| kernel | us per step |\n| --- | ---: |")
        costliest = sorted(times.items(), key=lambda kv: -kv[1])
        for kernel, us in costliest[: args.top]:
            print(f"| `{kernel}` | {us:.1f} |")


if __name__ == "__main__":
    main()
