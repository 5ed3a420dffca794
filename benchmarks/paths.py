"""Each normalization path against the others, call by call.

For every input shape, every path that can serve a float32 training call
on this backend and machine (`"ops"`, and on TensorFlow `"fused"`, `"xla"`
and `"wide"`, on torch `"torch"`) runs the same training step: the
kernel's forward pass and the gradient with respect to the input, the
scale and the offset, in a `tf.function` on TensorFlow and eagerly on
torch. Calls alternate between the paths, in one process; the table gives
the median time of each, the path `_dispatch.choose` takes with the
defaults, and its win: the time of the fastest other path over its own
(above 1, the chosen path is the fastest).

    python benchmarks/paths.py                       # TensorFlow
    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/paths.py
    KERAS_BACKEND=torch python benchmarks/paths.py

The XLA kernel's compilation is left out (the first call of each path is
not timed); `first_step.py` and `models.py` measure what a first call
costs.
"""

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHAPES = (
    (64, 32, 32, 64),
    (256, 32, 32, 64),
    (16, 32, 32, 32),
    (64, 32, 32, 30),
    (128, 32, 32, 8),
    (64, 32, 32, 3),
    (128, 64, 4),
    (64, 100, 256),
    (256, 512),
    (1024, 8),
)
EPSILON = 1e-3


def _parse(argv):
    import _cli

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=_cli.positive_int, default=30,
        help="timed calls of each path per shape (default: 30)",
    )
    parser.add_argument(
        "--shapes", default=None,
        help="semicolon-separated shapes, e.g. '64,32,32,64;1024,8' "
        "(default: a fixed set of ten)",
    )
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = SHAPES
    else:
        try:
            args.shapes = tuple(
                tuple(int(s) for s in shape.split(","))
                for shape in args.shapes.split(";")
            )
        except ValueError:
            parser.error(
                "argument --shapes: must be semicolon-separated lists of "
                f"integers. Received: {args.shapes!r}"
            )
    return args


def _facts(x):
    from keras_bn import _dispatch

    return _dispatch.call_facts(
        x, masked=False, training=True, ghost=False, last_axis_only=True,
        adjacent_axes=True, epsilon=EPSILON, synchronized=False, fused=None,
        xla_kernel=None,
    )


def candidate_paths(x):
    """`{name: Path}` of every path that can serve a float32 training call
    on `x` (last axis normalized) here, and the one `choose` takes."""
    from keras_bn import _dispatch

    facts = _facts(x)
    chosen = _dispatch.choose(facts)
    paths = {_dispatch.OPS: _dispatch.Path(_dispatch.OPS, "")}
    if facts.backend == "tensorflow":
        if not _dispatch.fused_problems(facts):
            paths[_dispatch.FUSED] = _dispatch.Path(_dispatch.FUSED, "")
        paths[_dispatch.XLA] = _dispatch.Path(_dispatch.XLA, "")
        # The wide view as it would serve the call where it is chosen.
        positions = _dispatch.wide_positions(
            dataclasses.replace(facts, onednn=False)
        )
        if positions:
            paths[_dispatch.WIDE] = _dispatch.Path(
                _dispatch.WIDE, "", positions
            )
    if facts.backend == "torch" and not _dispatch.torch_problems(facts):
        paths[_dispatch.TORCH] = _dispatch.Path(_dispatch.TORCH, "")
    return paths, chosen


def _step(path, x, scale, offset, dy):
    """A function that runs one training step of `path`'s kernel."""
    import keras

    from keras_bn import _dispatch

    kernel = _dispatch.kernel(path)
    axes = list(range(len(x.shape) - 1))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        @tf.function
        def step(x, scale, offset):
            with tf.GradientTape() as tape:
                tape.watch([x, scale, offset])
                y = kernel.normalize(
                    x, axes, None, EPSILON, scale, offset
                ).outputs
            return tape.gradient(y, [x, scale, offset], dy)

        return lambda: [t.numpy() for t in step(x, scale, offset)][-1]

    def step():
        inputs = [t.detach().requires_grad_() for t in (x, scale, offset)]
        y = kernel.normalize(inputs[0], axes, None, EPSILON, *inputs[1:])
        y.outputs.backward(dy)
        return inputs[-1].grad.sum().item()

    return step


def time_paths(shape, repeats):
    """`(chosen, {name: median ms})` for the paths serving `shape`."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    x, dy = (
        keras.ops.convert_to_tensor(
            rng.normal(1.0, 2.0, shape).astype("float32")
        )
        for _ in range(2)
    )
    kept = (1,) * (len(shape) - 1) + (shape[-1],)
    scale = keras.ops.ones(kept)
    offset = keras.ops.zeros(kept)
    paths, chosen = candidate_paths(x)
    steps = {
        name: _step(path, x, scale, offset, dy)
        for name, path in paths.items()
    }
    for step in steps.values():
        step()  # Tracing and compilation, not timed.
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(1e3 * (time.perf_counter() - start))
    return chosen, {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    args = _parse(argv)
    import keras

    from keras_bn import _dispatch

    backend = keras.backend.backend()
    if backend not in ("tensorflow", "torch"):
        print(f"The {backend} backend has one path, ops: nothing to compare.")
        return
    if backend == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
    onednn = backend == "tensorflow" and _dispatch.onednn_enabled()
    print(f"backend {backend}, oneDNN {'on' if onednn else 'off'}, "
          f"medians of {args.repeats} training steps, ms\n")
    names = [_dispatch.OPS, _dispatch.FUSED, _dispatch.XLA, _dispatch.WIDE,
             _dispatch.TORCH]
    print("| shape | " + " | ".join(names) + " | chosen | win |")
    print("| --- |" + " ---: |" * len(names) + " --- | ---: |")
    for shape in args.shapes:
        chosen, medians = time_paths(shape, args.repeats)
        others = [t for name, t in medians.items() if name != chosen.name]
        win = min(others) / medians[chosen.name] if others else float("nan")
        cells = [
            f"{medians[n]:.2f}" if n in medians else "–" for n in names
        ]
        print(f"| {' x '.join(map(str, shape))} | " + " | ".join(cells)
              + f" | {chosen.name} | {win:.2f} |", flush=True)


if __name__ == "__main__":
    main()
