"""keras_bn against core Keras on the PyTorch and JAX backends.

For each backend (one child process each, since Keras reads
`KERAS_BACKEND` once) and each input shape, times a training step of
`keras_bn.BatchNormalization` and of `keras.layers.BatchNormalization`
(and of the renormalizing pair) side by side, calls alternating, and
measures each step's peak memory:

- torch: an eager step, forward with `training=True`, then
  `torch.autograd.grad` of `sum(y * dy)` with respect to the input and
  the trainable weights (the moving statistics are updated in the
  forward pass). Peak memory: the highest number of bytes the PyTorch CPU
  allocator holds during one step, above what it held before, from the
  allocation and free events `torch.profiler` records with
  `profile_memory=True` (exact tensor accounting, unlike the process's
  resident size, which the C allocator's caching blurs).
- jax: the jit-compiled step of `benchmarks/jax_step.py` (stateless call,
  `jax.value_and_grad`, new moving statistics). Peak memory: XLA's
  buffer assignment for the compiled step (`memory_analysis()`),
  temporaries plus outputs; the arguments are live before the step.

The ratios are keras_bn over core Keras: below 1 is better. Prints a
Markdown table.

    python benchmarks/backends.py
    python benchmarks/backends.py --backends torch --repeats 20
    python benchmarks/backends.py --quick
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import _cli

BACKENDS = ("torch", "jax")
FULL_SHAPES = ((64, 32, 32, 64), (256, 32, 32, 64), (1024, 512))
QUICK_SHAPES = ((8, 4, 4, 8),)
PAIRS = ("BatchNormalization", "BatchRenormalization")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends", default=",".join(BACKENDS),
        help="comma-separated backends among torch and jax (default: "
        "torch,jax)",
    )
    parser.add_argument(
        "--repeats", type=_cli.positive_int, default=10,
        help="timed calls of each implementation, alternating, whose median "
        "is reported (default: 10)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"one tiny shape {QUICK_SHAPES[0]}, 2 repeats: a smoke test",
    )
    parser.add_argument(
        "--threads", type=_cli.positive_int,
        help="PyTorch's intra-op threads (torch.set_num_threads; default: "
        "PyTorch's own choice). On a CPU shared with other busy processes "
        "use 1: PyTorch's batch-norm kernel opens a parallel region at "
        "every call, and a thread descheduled by the other processes makes "
        "each call wait tens of milliseconds at its barrier",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown or not args.backends:
        parser.error(
            f"--backends must name torch and/or jax. Received: "
            f"{','.join(args.backends) or repr('')}"
        )
    if args.quick:
        args.repeats = 2
    return args


def layers(pair):
    """`(core, keras_bn)` layers of `pair`, default arguments."""
    import keras

    import keras_bn

    if pair == "BatchNormalization":
        return keras.layers.BatchNormalization(), keras_bn.BatchNormalization()
    clipping = {"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0}
    return (
        keras.layers.BatchNormalization(
            renorm=True, renorm_clipping=clipping
        ),
        keras_bn.BatchRenormalization(renorm_clipping=clipping),
    )


def torch_step(layer, x, dy):
    """An eager training step of `layer` on torch, returning the grads."""
    import torch

    def step():
        inputs = x.detach().requires_grad_(True)
        y = layer(inputs, training=True)
        weights = [v.value for v in layer.trainable_weights]
        return torch.autograd.grad(torch.sum(y * dy), [inputs] + weights)

    return step


def torch_peak_bytes(step):
    """Peak bytes the CPU allocator holds during `step()`, above before."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        grads = step()
        del grads
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in p.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def jax_step_and_peak(layer, x, dy):
    """The compiled step of `benchmarks/jax_step.py` and its peak bytes."""
    import jax_step

    step = jax_step.training_step(layer, x, dy)
    memory = step.lower().compile().memory_analysis()
    return step, memory.temp_size_in_bytes + memory.output_size_in_bytes


def run_child(backend, shapes, repeats, threads):
    """Measures every pair and shape on `backend`; returns result rows."""
    import numpy as np

    if backend == "torch" and threads:
        import torch

        torch.set_num_threads(threads)

    rng = np.random.default_rng(0)
    rows = []
    for shape in shapes:
        x_host = rng.normal(1.0, 2.0, shape).astype("float32")
        dy_host = rng.normal(0.0, 1.0, shape).astype("float32")
        if backend == "torch":
            import torch

            x, dy = torch.from_numpy(x_host), torch.from_numpy(dy_host)
        else:
            import jax

            x, dy = jax.device_put(x_host), jax.device_put(dy_host)
        for pair in PAIRS:
            steps, peaks, paths = {}, {}, {}
            for name, layer in zip(("core", "keras_bn"), layers(pair)):
                if backend == "torch":
                    layer.build(shape)
                    steps[name] = torch_step(layer, x, dy)
                    steps[name]()
                    peaks[name] = torch_peak_bytes(steps[name])
                else:
                    steps[name], peaks[name] = jax_step_and_peak(
                        layer, x, dy
                    )
                paths[name] = getattr(layer, "normalization_path", None)
            path = paths["keras_bn"](x_host, training=True).name
            for step in steps.values():
                for _ in range(2):
                    step()
            times = {name: [] for name in steps}
            for _ in range(repeats):
                for name, step in steps.items():
                    start = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - start)
            medians = {n: statistics.median(t) for n, t in times.items()}
            rows.append({
                "backend": backend, "pair": pair, "shape": list(shape),
                "path": path,
                "core_ms": medians["core"] * 1e3,
                "keras_bn_ms": medians["keras_bn"] * 1e3,
                "time_ratio": medians["keras_bn"] / medians["core"],
                "core_peak_mib": peaks["core"] / 2**20,
                "keras_bn_peak_mib": peaks["keras_bn"] / 2**20,
                "memory_ratio": peaks["keras_bn"] / peaks["core"],
            })
            print(f"{backend} {pair} {shape} done", file=sys.stderr)
    return rows


def versions(backend):
    import keras

    if backend == "torch":
        import torch

        return (
            f"keras {keras.__version__}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads"
        )
    import jax

    return f"keras {keras.__version__}, jax {jax.__version__}"


def cpu_kind():
    """The CPU model and whether it has AVX-512 VNNI, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines()
         if line.startswith("model name")),
        platform.machine(),
    )
    vnni = "with" if "avx512_vnni" in info else "without"
    return f"{model}, {os.cpu_count()} CPUs, {vnni} avx512_vnni"


def main(argv=None):
    args = parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.child:
        os.environ["KERAS_BACKEND"] = args.child
        rows = run_child(args.child, shapes, args.repeats, args.threads)
        print(json.dumps({"versions": versions(args.child), "rows": rows}))
        return 0
    results = []
    for backend in args.backends:
        command = [
            sys.executable, os.path.abspath(__file__),
            "--child", backend, "--repeats", str(args.repeats),
        ] + (["--quick"] if args.quick else []) + (
            ["--threads", str(args.threads)] if args.threads else []
        )
        env = dict(os.environ, KERAS_BACKEND=backend)
        done = subprocess.run(
            command, stdout=subprocess.PIPE, text=True, env=env
        )
        if done.returncode:
            print(f"The {backend} run failed.", file=sys.stderr)
            return done.returncode
        results.append(json.loads(done.stdout.splitlines()[-1]))
    print(
        f"CPU: {cpu_kind()}. Training steps, float32, medians of "
        f"{args.repeats} alternating calls; ratios keras_bn / core Keras.\n"
    )
    for result in results:
        print(f"- {result['versions']}")
    print()
    print("| backend | layer | shape | keras_bn path | core ms | keras_bn ms "
          "| time ratio | core peak MiB | keras_bn peak MiB | memory ratio |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        for r in result["rows"]:
            print(
                f"| {r['backend']} | {r['pair']} | {tuple(r['shape'])} "
                f"| {r['path']} | {r['core_ms']:.3g} | {r['keras_bn_ms']:.3g} "
                f"| {r['time_ratio']:.2f} | {r['core_peak_mib']:.3g} "
                f"| {r['keras_bn_peak_mib']:.3g} | {r['memory_ratio']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
