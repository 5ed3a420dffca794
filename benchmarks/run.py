"""Speed of keras_bn's layers against core Keras and the memory floor.

Times, in one process, a training step (forward, backward to the inputs and
the weights, moving-statistics update) and an inference call of each
keras_bn layer and of its core Keras counterpart, side by side, with and
without XLA (`jit_compile`), in float32 and under `mixed_float16`. Each
timing is the median over `--repeats` calls after `--warmup` calls, the
core and keras_bn calls alternating; the first call (tracing, XLA
compilation and one run) is timed on its own.

It also measures the machine's copy bandwidth (a large NumPy copy, bytes
read plus bytes written over time) and, for every batch-normalization
timing, the fraction of the bandwidth floor it reaches: the least number of
bytes the step must move (see `benchmarks/README.md`), divided by the time
and by the bandwidth.

Prints Markdown tables to stdout (progress goes to stderr) and writes
`results.json` and `results.md` to `--out`.

    python benchmarks/run.py
    python benchmarks/run.py --quick
    python benchmarks/run.py --only "BatchNormalization .*xla train"
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import re
import statistics
import sys
import time

# Keeps TensorFlow's C++ start-up messages out of the tables.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The timed steps are `tf.function`s with a `tf.GradientTape`.
os.environ["KERAS_BACKEND"] = "tensorflow"

POLICIES = ("float32", "mixed_float16")
STEPS = ("train", "inference")
IMPLEMENTATIONS = ("core", "keras_bn")
# Bytes a step must move at the least, in passes over the activation
# tensor, for a tensor too large to stay in cache (benchmarks/README.md).
# Forward: read x for the statistics, read x and write y. Backward: read x
# and dy for the two reductions, then read x and dy and write dx.
TRAIN_PASSES = 8
# Read x, write y; the statistics are known.
INFERENCE_PASSES = 2

FULL_NORM_SHAPES = (
    (256, 32, 32, 64), (64, 32, 32, 64), (4096, 1024), (64, 100, 256),
    # Few channels (an input layer's), and a channel count that is not a
    # multiple of 4, for which oneDNN's fused kernel is slow.
    (128, 32, 32, 3), (64, 32, 32, 30),
)
# One tiny shape per pair, so that --quick checks every code path quickly.
QUICK_NORM_SHAPES = ((4, 4, 4, 8),)
# (batch, timesteps, features); the layers get `features` units, except
# where RECURRENT_UNITS says otherwise.
FULL_RECURRENT_SHAPES = ((64, 100, 32), (64, 100, 128), (64, 100, 256))
# The recurrent layers' speed target: inputs of 32 features into 128 units.
RECURRENT_UNITS = {(64, 100, 32): 128}
QUICK_RECURRENT_SHAPES = ((4, 5, 8),)
FULL_COPY_BYTES = 256 * 2**20
QUICK_COPY_BYTES = 16 * 2**20


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=(
            "Time keras_bn's layers against core Keras (training step and "
            "inference, with and without XLA, float32 and mixed_float16) "
            "and against the machine's copy-bandwidth floor."
        )
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed calls per measurement, whose median is reported, a "
        "positive integer (default: 10, or 2 with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="untimed calls after the first call, a non-negative integer "
        "(default: 3, or 1 with --quick)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="REGEX",
        help="run only the rows whose name (layer, shape, dtype, 'xla' or "
        "'graph', step, e.g. 'BatchNormalization (4096, 1024) float32 xla "
        "train') contains a match of this regular expression; may be "
        "repeated (default: every row)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one tiny shape per layer, 2 repeats: checks that every kind "
        "of row runs, in about a minute; the timings mean nothing",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("out", "benchmarks"),
        help="folder for results.json and results.md, created if missing "
        "(default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error(
            f"--repeats must be a positive integer. Received: {args.repeats}"
        )
    if args.warmup < 0:
        parser.error(
            "--warmup must be a non-negative integer. Received: "
            f"{args.warmup}"
        )
    for pattern in args.only or ():
        try:
            re.compile(pattern)
        except re.error as error:
            parser.error(
                f"--only must be a regular expression ({error}). Received: "
                f"{pattern}"
            )
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out must be a folder. Received: {args.out}")
    args.error = parser.error
    return args


@dataclasses.dataclass(frozen=True)
class Pair:
    """A keras_bn layer and the layer it is compared with.

    `core` and `keras_bn` take the input shape and the dtype policy and
    return a new layer; `core` is core Keras's counterpart, except in the
    pair that prices batch renormalization against keras_bn's own batch
    normalization. `memory_bound` pairs get the bandwidth-floor column.
    """

    name: str
    core: object
    keras_bn: object
    shapes: tuple
    memory_bound: bool
    steps: tuple = STEPS


@dataclasses.dataclass(frozen=True)
class Row:
    pair: Pair
    shape: tuple
    policy: str
    jit: bool
    step: str

    @property
    def name(self):
        mode = "xla" if self.jit else "graph"
        return f"{self.pair.name} {self.shape} {self.policy} {mode} {self.step}"


def make_pairs(quick):
    """The compared pairs of core Keras and keras_bn layers."""
    import keras

    import keras_bn

    norm_shapes = QUICK_NORM_SHAPES if quick else FULL_NORM_SHAPES
    recurrent_shapes = (
        QUICK_RECURRENT_SHAPES if quick else FULL_RECURRENT_SHAPES
    )
    # Clipping on, as in the paper's relaxed phase, so the clip ops run.
    clipping = {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0}
    return [
        Pair(
            "BatchNormalization",
            lambda shape, dtype: keras.layers.BatchNormalization(dtype=dtype),
            lambda shape, dtype: keras_bn.BatchNormalization(dtype=dtype),
            norm_shapes,
            memory_bound=True,
        ),
        # The `keras.ops` path, which the other backends and the
        # configurations TensorFlow's fused kernel does not cover take.
        Pair(
            "BatchNormalization(fused=False)",
            lambda shape, dtype: keras.layers.BatchNormalization(dtype=dtype),
            lambda shape, dtype: keras_bn.BatchNormalization(
                fused=False, dtype=dtype
            ),
            norm_shapes,
            memory_bound=True,
        ),
        Pair(
            "BatchRenormalization",
            lambda shape, dtype: keras.layers.BatchNormalization(
                renorm=True, renorm_clipping=clipping, dtype=dtype
            ),
            lambda shape, dtype: keras_bn.BatchRenormalization(
                renorm_clipping=clipping, dtype=dtype
            ),
            norm_shapes,
            memory_bound=True,
        ),
        # What renormalization adds to keras_bn's batch normalization, in
        # one run; inference is the same two element-wise ops in both.
        Pair(
            "BatchRenormalization vs keras_bn BN",
            lambda shape, dtype: keras_bn.BatchNormalization(dtype=dtype),
            lambda shape, dtype: keras_bn.BatchRenormalization(
                renorm_clipping=clipping, dtype=dtype
            ),
            norm_shapes,
            memory_bound=True,
            steps=("train",),
        ),
        Pair(
            "LSTM",
            lambda shape, dtype: keras.layers.LSTM(
                recurrent_units(shape), dtype=dtype
            ),
            lambda shape, dtype: keras_bn.BNLSTM(
                recurrent_units(shape), dtype=dtype
            ),
            recurrent_shapes,
            memory_bound=False,
        ),
        Pair(
            "GRU",
            lambda shape, dtype: keras.layers.GRU(
                recurrent_units(shape), dtype=dtype
            ),
            lambda shape, dtype: keras_bn.BNGRU(
                recurrent_units(shape), dtype=dtype
            ),
            recurrent_shapes,
            memory_bound=False,
        ),
    ]


def recurrent_units(shape):
    """The units of the recurrent layers timed on inputs of `shape`."""
    return RECURRENT_UNITS.get(tuple(shape), shape[-1])


def make_rows(pairs, only):
    rows = [
        Row(pair, shape, policy, jit, step)
        for pair in pairs
        for shape in pair.shapes
        for policy in POLICIES
        for jit in (False, True)
        for step in pair.steps
    ]
    if only:
        rows = [r for r in rows if any(re.search(p, r.name) for p in only)]
    return rows


def copy_bandwidth(nbytes, repeats):
    """Bytes per second read plus written by a NumPy copy of `nbytes`."""
    import numpy as np

    source = np.ones(nbytes // 4, dtype=np.float32)
    target = np.empty_like(source)
    # The first copy also pays for mapping the target's pages.
    np.copyto(target, source)
    times = []
    for _ in range(max(repeats, 3)):
        start = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - start)
    return 2 * source.nbytes / statistics.median(times)


def compiled_step(layer, x, step, jit):
    """A `tf.function` running `step` on `layer`, and its arguments."""
    import tensorflow as tf

    # Builds the layer outside the timed calls and gives the output's
    # shape and dtype for the incoming gradient.
    y = layer(x, training=False)
    if step == "inference":

        @tf.function(jit_compile=jit)
        def infer(x):
            return layer(x, training=False)

        return infer, (x,)

    dy = tf.random.normal(y.shape, dtype=y.dtype)
    trainable = layer.trainable_weights

    @tf.function(jit_compile=jit)
    def train(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        # A real incoming gradient: with ones the backward pass through
        # batch normalization is zero and a compiler may skip reading it.
        return tape.gradient(y, [x] + trainable, output_gradients=dy)

    return train, (x, dy)


def time_row(row, warmup, repeats):
    """First-call time and timed durations, in seconds, of both layers.

    The timed calls alternate between core Keras and keras_bn, so that a
    drift in the machine's speed (another job starting, the CPU clock)
    touches both alike and the ratio stays fair.
    """
    import tensorflow as tf

    dtype = "float16" if row.policy == "mixed_float16" else "float32"
    x = tf.random.normal(row.shape, mean=1.0, stddev=2.0, dtype=dtype)
    sync = tf.test.experimental.sync_devices
    calls, first = {}, {}
    for implementation in IMPLEMENTATIONS:
        layer = getattr(row.pair, implementation)(row.shape, row.policy)
        fn, args = compiled_step(layer, x, row.step, row.jit)
        start = time.perf_counter()
        fn(*args)
        sync()
        first[implementation] = time.perf_counter() - start
        calls[implementation] = (fn, args)
    for fn, args in calls.values():
        for _ in range(warmup):
            fn(*args)
    sync()
    times = {implementation: [] for implementation in calls}
    for _ in range(repeats):
        for implementation, (fn, args) in calls.items():
            start = time.perf_counter()
            fn(*args)
            sync()
            times[implementation].append(time.perf_counter() - start)
    return first, times


def floor_bytes(row):
    """Least bytes the step moves, or `None` where the model does not apply."""
    if not row.pair.memory_bound:
        return None
    passes = TRAIN_PASSES if row.step == "train" else INFERENCE_PASSES
    itemsize = 2 if row.policy == "mixed_float16" else 4
    return passes * math.prod(row.shape) * itemsize


def measure(row, bandwidth, warmup, repeats):
    result = {
        "name": row.name,
        "pair": row.pair.name,
        "shape": list(row.shape),
        "policy": row.policy,
        "jit_compile": row.jit,
        "step": row.step,
        "floor_bytes": floor_bytes(row),
    }
    first, times = time_row(row, warmup, repeats)
    for implementation in IMPLEMENTATIONS:
        median = statistics.median(times[implementation])
        floor = result["floor_bytes"]
        result[implementation] = {
            "median_s": median,
            "min_s": min(times[implementation]),
            "times_s": times[implementation],
            "first_call_s": first[implementation],
            "floor_fraction": (
                None if floor is None else floor / median / bandwidth
            ),
        }
    result["ratio"] = result["core"]["median_s"] / result["keras_bn"][
        "median_s"
    ]
    return result


def machine():
    import keras
    import tensorflow as tf

    import keras_bn

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpus": [
            tf.config.experimental.get_device_details(g).get(
                "device_name", g.name
            )
            for g in gpus
        ],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_bn": keras_bn.__version__,
        # oneDNN's kernels (TensorFlow's default on some Intel CPUs only)
        # change the fused batch-normalization kernel's speed a lot.
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
    }


def _ms(seconds):
    return f"{seconds * 1e3:.3g}"


def _percent(fraction):
    return "" if fraction is None else f"{fraction:.1%}"


def markdown(report):
    info = report["machine"]
    device = ", ".join(info["gpus"]) or "no GPU"
    lines = [
        f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), {device}; "
        f"TensorFlow {info['tensorflow']}, Keras {info['keras']}, keras_bn "
        f"{info['keras_bn']}; TF_ENABLE_ONEDNN_OPTS="
        f"{info['tf_enable_onednn_opts'] or 'unset'}.",
        "",
        f"Copy bandwidth (NumPy, read + write): "
        f"{report['copy_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s. Medians "
        f"of {report['repeats']} calls after {report['warmup']} warm-up "
        "calls, alternating core and keras_bn; ratio = core time / "
        "keras_bn time (above 1: keras_bn is faster); floor = least bytes "
        "moved / time / copy bandwidth.",
        "",
        "| layer | shape | dtype | XLA | step | core ms | keras_bn ms "
        "| ratio | core floor | keras_bn floor |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['pair']} | {tuple(r['shape'])} | {r['policy']} "
            f"| {'yes' if r['jit_compile'] else 'no'} | {r['step']} "
            f"| {_ms(r['core']['median_s'])} "
            f"| {_ms(r['keras_bn']['median_s'])} | {r['ratio']:.2f} "
            f"| {_percent(r['core']['floor_fraction'])} "
            f"| {_percent(r['keras_bn']['floor_fraction'])} |"
        )
    lines += [
        "",
        "First call (tracing, compilation and one run), seconds; keras_bn's "
        "float32 training steps without XLA compile its XLA kernel here:",
        "",
        "| layer | shape | dtype | XLA | step | core s | keras_bn s |",
        "| --- | --- | --- | --- | --- | ---: | ---: |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['pair']} | {tuple(r['shape'])} | {r['policy']} "
            f"| {'yes' if r['jit_compile'] else 'no'} | {r['step']} "
            f"| {r['core']['first_call_s']:.2f} "
            f"| {r['keras_bn']['first_call_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    # TensorFlow is imported after the arguments are checked, so that
    # `--help` and argument errors answer at once.
    args = parse_args(argv)
    pairs = make_pairs(args.quick)
    rows = make_rows(pairs, args.only)
    if not rows:
        args.error(
            "--only matched no row; names look like 'BatchNormalization "
            f"(4096, 1024) float32 xla train'. Received: {args.only}"
        )

    copy_bytes = QUICK_COPY_BYTES if args.quick else FULL_COPY_BYTES
    bandwidth = copy_bandwidth(copy_bytes, args.repeats)
    results = []
    for i, row in enumerate(rows, start=1):
        print(f"[{i}/{len(rows)}] {row.name}", file=sys.stderr, flush=True)
        results.append(measure(row, bandwidth, args.warmup, args.repeats))

    report = {
        "machine": machine(),
        "quick": args.quick,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "copy_bytes": copy_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "train_passes": TRAIN_PASSES,
        "inference_passes": INFERENCE_PASSES,
        "results": results,
    }
    table = markdown(report)
    print(table, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    (args.out / "results.md").write_text(table)
    print(f"Wrote {args.out / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
