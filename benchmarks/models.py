"""Whole `keras.applications` models, keras_bn's batch normalization
against core Keras's.

Every `keras.layers.BatchNormalization` of a model built with
`weights=None` is converted to `keras_bn.BatchNormalization`
(`keras_bn.convert_batch_normalization`), everything else equal. Each
measurement runs in a fresh Python process on the backend of
`KERAS_BACKEND` (compilation caches and the allocator's peak live as long
as the process), core and keras_bn processes alternating, and gives:

- the first `train_on_batch` (tracing, compilation and one step): what a
  user waits for before the first epoch moves;
- the median time of the next training steps;
- the growth of the process's peak resident memory over training, from
  before the first step to after the last.

The models compile with Keras's default, `jit_compile="auto"` (XLA on
JAX), or with `jit_compile=True` for `--jit-compile`. The table gives the
medians of `--repeats` processes of each and the
ratios keras_bn / core.

    python benchmarks/models.py
    KERAS_BACKEND=tensorflow python benchmarks/models.py --jit-compile
    python benchmarks/models.py --models MobileNetV2 --repeats 5
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import _cli

MODELS = ("MobileNetV2", "EfficientNetB0", "DenseNet121")
MEASURES = (("first", "first train_on_batch s"), ("step", "training step s"),
            ("memory", "peak memory growth MB"))


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Train keras.applications models with core Keras's and "
        "keras_bn's batch normalization, in fresh processes: first step, "
        "later steps and peak memory growth, as ratios."
    )
    parser.add_argument(
        "--models", default=",".join(MODELS),
        help="comma-separated keras.applications names "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--repeats", type=_cli.positive_int, default=3,
        help="fresh processes per model and implementation "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=_cli.positive_int, default=5,
        help="timed training steps after the first (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=_cli.positive_int, default=16,
        help="examples per step (default: %(default)s)",
    )
    parser.add_argument(
        "--image-size", type=_cli.positive_int, default=64,
        help="height and width of the inputs, at least 32 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--jit-compile", action="store_true",
        help="compile the models with jit_compile=True (default: Keras's "
        "'auto': XLA on JAX, not on a CPU with TensorFlow or PyTorch)",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("out", "models"),
        help="folder for results.json (default: %(default)s)",
    )
    parser.add_argument("--worker", choices=("core", "keras_bn"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = tuple(name for name in args.models.split(",") if name)
    unknown = [name for name in args.models if name not in MODELS]
    if unknown or not args.models:
        parser.error(
            f"argument --models: must name some of {', '.join(MODELS)}. "
            f"Received: {','.join(args.models)!r}"
        )
    if args.image_size < 32:
        parser.error(
            "argument --image-size: must be at least 32 (the models halve "
            f"it five times). Received: {args.image_size}"
        )
    return args


def _peak_mb():
    # Linux reports kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args):
    """Runs in a fresh process: prints one JSON line of measurements."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    (name,) = args.models
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(args.image_size, args.image_size, 3),
        classes=10,
    )
    if args.worker == "keras_bn":
        import keras_bn

        model = keras_bn.convert_batch_normalization(model)
    model.compile(
        optimizer="sgd", loss="sparse_categorical_crossentropy",
        jit_compile=True if args.jit_compile else "auto",
    )
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    x = rng.normal(size=shape).astype("float32")
    y = rng.integers(0, 10, args.batch_size)
    before = _peak_mb()
    start = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - start
    later = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        later.append(time.perf_counter() - start)
    print(json.dumps({
        "first": first, "step": statistics.median(later),
        "memory": _peak_mb() - before,
    }))


def _run(args, name, implementation):
    command = [
        sys.executable, __file__, "--worker", implementation,
        "--models", name, "--steps", str(args.steps),
        "--batch-size", str(args.batch_size),
        "--image-size", str(args.image_size),
    ] + (["--jit-compile"] if args.jit_compile else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"The {implementation} worker for {name} failed:\n"
                 f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    results = {}
    for name in args.models:
        runs = results[name] = {"core": [], "keras_bn": []}
        for i in range(args.repeats):
            order = ("core", "keras_bn") if i % 2 == 0 else (
                "keras_bn", "core")
            for implementation in order:
                print(f"{name} [{i + 1}/{args.repeats}] {implementation}",
                      file=sys.stderr)
                runs[implementation].append(_run(args, name, implementation))
    medians = {
        name: {
            implementation: {
                key: statistics.median(r[key] for r in implementation_runs)
                for key, _ in MEASURES
            }
            for implementation, implementation_runs in runs.items()
        }
        for name, runs in results.items()
    }
    import keras

    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset")
    print(
        f"Backend {keras.backend.backend()}, jit_compile="
        f"{args.jit_compile}, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size} inputs, weights=None; "
        f"TF_ENABLE_ONEDNN_OPTS={onednn}; medians of {args.repeats} fresh "
        "processes each.\n"
    )
    print("| model | measure | core | keras_bn | keras_bn / core |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, by_implementation in medians.items():
        for key, label in MEASURES:
            core = by_implementation["core"][key]
            ours = by_implementation["keras_bn"][key]
            ratio = f"{ours / core:.2f}" if core > 0 else "n/a"
            print(f"| {name} | {label} | {core:.3g} | {ours:.3g} | "
                  f"{ratio} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"runs": results, "medians": medians}, indent=1)
    )


if __name__ == "__main__":
    main()
