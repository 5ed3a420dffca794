"""Distributed training on each backend's own engine.

TensorFlow's MultiWorkerMirroredStrategy (two worker processes), JAX's
keras.distribution DataParallel (one process with four devices, and two
processes joined by `jax.distributed`) and a two-process gloo
`torch.distributed` group (a custom loop, and DistributedDataParallel).
Each case runs `tests/distributed_worker.py` in fresh processes on
127.0.0.1 (a strategy, device count or process group must be set before
the framework starts), bounded by a timeout and killed if still running,
and compares the trained weights, moving statistics included, with a
one-process run on the whole global batch.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import pytest

import keras_bn
from tests import test_case

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TIMEOUT = 180
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _missing(package):
    return importlib.util.find_spec(package) is None


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _data(tmp, virtual_batch_size, masked=True, renorm=False,
          global_batch=16):
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, (global_batch, 5, 3)).astype("float32")
    x[global_batch // 2 :] += 2.0  # the workers' halves differ
    y = rng.normal(0.0, 1.0, (global_batch, 5, 1)).astype("float32")
    mask = rng.random((global_batch, 5)) > 0.3
    probe = keras.Sequential(
        [
            keras.Input((5, 3)),
            keras.layers.Dense(4),
            keras_bn.BatchNormalization(),
            keras.layers.Dense(1),
        ]
    )
    weights = np.empty(len(probe.weights), dtype=object)
    weights[:] = [rng.normal(0.5, 0.5, w.shape).astype("float32")
                  for w in probe.weights]
    path = os.path.join(tmp, "data.npz")
    np.savez(
        path, x=x, y=y, mask=mask, weights=weights,
        virtual_batch_size=virtual_batch_size or 0, masked=int(masked),
        renorm=int(renorm),
    )
    return path


def _run(args, env):
    """Starts a worker; its output goes to a file, so it never blocks."""
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        [sys.executable, WORKER, *args], env=env, stdout=log,
        stderr=subprocess.STDOUT, text=True,
    )
    return process, log


def _wait(processes, timeout=TIMEOUT):
    """Waits for every worker; kills them all on a failure or the timeout.

    A worker that fails leaves its peers waiting for it, so the first
    failure ends the wait.
    """
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [process.poll() for process, _ in processes]
            if None not in codes or any(codes):
                break
            time.sleep(0.2)
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    failures = []
    for process, log in processes:
        log.seek(0)
        out = log.read()
        log.close()
        if process.returncode:
            failures.append(
                f"{process.args[2:]} exited with {process.returncode} "
                f"(negative: killed after a failure or {timeout} s):\n"
                f"{out[-2000:]}"
            )
    assert not failures, "\n\n".join(failures)


def _load(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k[4:]))]


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute only"
)
@pytest.mark.parametrize("virtual_batch_size", [None, 4])
def test_multi_worker_mirrored_equals_global_batch(virtual_batch_size):
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(tmp, virtual_batch_size)
        ports = _free_ports(2)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        processes = []
        for index in range(2):
            tf_config = {
                "cluster": cluster,
                "task": {"type": "worker", "index": index},
            }
            env = _env(TF_CONFIG=json.dumps(tf_config))
            out = os.path.join(tmp, f"worker{index}.npz")
            processes.append(_run(["multiworker", data, out], env))
        single = os.path.join(tmp, "single.npz")
        processes.append(_run(["single", data, single], _env()))
        _wait(processes)
        expected = _load(single)
        for index in range(2):
            got = _load(os.path.join(tmp, f"worker{index}.npz"))
            _assert_all_close(got, expected)


def _initial_weights(data):
    with np.load(data, allow_pickle=True) as f:
        return list(f["weights"])


def _assert_all_close(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _jax_env(**extra):
    return _env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", **extra)


@pytest.mark.slow
@pytest.mark.skipif(_missing("jax"), reason="jax is not installed")
def test_jax_data_parallel_uses_global_batch():
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(tmp, None)
        out = os.path.join(tmp, "jax.npz")
        single = os.path.join(tmp, "single.npz")
        env = _jax_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
        _wait([
            _run(["jax", data, out], env),
            _run(["jax", data, single], _jax_env()),
        ])
        got, expected = _load(out), _load(single)
        assert int(got.pop()) == 4
        assert int(expected.pop()) == 1
        _assert_all_close(got, expected)
        # The reference run's statistics are those of the global batch, so
        # they differ from any shard's: check that they moved at all.
        assert not np.allclose(expected[4], _initial_weights(data)[4])


@pytest.mark.slow
@pytest.mark.skipif(_missing("jax"), reason="jax is not installed")
@pytest.mark.parametrize("local_devices", [1, 2])
def test_jax_multi_process_equals_global_batch(local_devices):
    # Two processes joined by `jax.distributed` (gloo collectives on CPU),
    # each feeding its half of the batch to `model.fit` under DataParallel
    # over every process's devices.
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(tmp, None)
        (port,) = _free_ports(1)
        processes = [
            _run(
                ["jax", data, os.path.join(tmp, f"process{i}.npz"),
                 str(port), str(i), str(local_devices)],
                _jax_env(),
            )
            for i in range(2)
        ]
        single = os.path.join(tmp, "single.npz")
        processes.append(_run(["jax", data, single], _jax_env()))
        _wait(processes)
        expected = _load(single)
        assert int(expected.pop()) == 1
        for i in range(2):
            got = _load(os.path.join(tmp, f"process{i}.npz"))
            assert int(got.pop()) == 2 * local_devices
            _assert_all_close(got, expected)
        assert not np.allclose(expected[4], _initial_weights(data)[4])


def _global_batch_normalization(data_path):
    """NumPy: the first training call's output on the global batch."""
    with np.load(data_path, allow_pickle=True) as f:
        x, mask, masked = f["x"], f["mask"], bool(f["masked"])
        kernel, bias, gamma, beta = list(f["weights"])[:4]
    hidden = x.astype("float64") @ kernel + bias
    weight = mask[..., None] if masked else np.ones_like(hidden[..., :1])
    count = np.sum(weight * np.ones_like(hidden), axis=(0, 1))
    mean = np.sum(hidden * weight, axis=(0, 1)) / count
    variance = np.sum((hidden - mean) ** 2 * weight, axis=(0, 1)) / count
    epsilon = keras_bn.BatchNormalization().epsilon
    return (hidden - mean) / np.sqrt(variance + epsilon) * gamma + beta


@pytest.mark.slow
@pytest.mark.skipif(_missing("torch"), reason="torch is not installed")
@pytest.mark.parametrize(
    "masked, virtual_batch_size, renorm",
    [
        (False, None, False),
        (True, None, False),
        (True, 4, False),
        (True, None, True),
    ],
    ids=["unmasked", "masked", "masked_ghosts", "renorm_masked"],
)
def test_torch_distributed_equals_global_batch(
    masked, virtual_batch_size, renorm
):
    # Two processes of a gloo `torch.distributed` group, each training on
    # its half of the batch and summing the gradients, against one process
    # on the whole batch.
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(tmp, virtual_batch_size, masked, renorm)
        (port,) = _free_ports(1)
        env = _env(KERAS_BACKEND="torch", GLOO_SOCKET_IFNAME="lo")
        processes = [
            _run(
                ["torch", data, os.path.join(tmp, f"rank{i}.npz"),
                 str(port), str(i)],
                env,
            )
            for i in range(2)
        ]
        single = os.path.join(tmp, "single.npz")
        processes.append(_run(["torch", data, single], env))
        _wait(processes)
        expected = _load(single)
        ranks = [_load(os.path.join(tmp, f"rank{i}.npz")) for i in range(2)]
        # The first training call's outputs, one half on each rank.
        output = np.concatenate([rank.pop() for rank in ranks])
        np.testing.assert_allclose(output, expected.pop(), atol=1e-5)
        if virtual_batch_size is None and not renorm:
            np.testing.assert_allclose(
                output, _global_batch_normalization(data), atol=1e-5
            )
        for got in ranks:
            _assert_all_close(got, expected)
        assert not np.allclose(expected[4], _initial_weights(data)[4])


@pytest.mark.slow
@pytest.mark.skipif(_missing("torch"), reason="torch is not installed")
def test_torch_distributed_data_parallel_equals_global_batch():
    # The same with DistributedDataParallel around the Keras model: it
    # averages the gradients, and the layer all-reduces the statistics.
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(tmp, 4)
        (port,) = _free_ports(1)
        env = _env(KERAS_BACKEND="torch", GLOO_SOCKET_IFNAME="lo")
        processes = [
            _run(
                ["torch", data, os.path.join(tmp, f"rank{i}.npz"),
                 str(port), str(i), "1"],
                env,
            )
            for i in range(2)
        ]
        single = os.path.join(tmp, "single.npz")
        processes.append(_run(["torch", data, single], env))
        _wait(processes)
        expected = _load(single)[:-1]
        for i in range(2):
            _assert_all_close(
                _load(os.path.join(tmp, f"rank{i}.npz")), expected
            )
        assert not np.allclose(expected[4], _initial_weights(data)[4])


@pytest.mark.slow
def test_synchronized_refused_where_nothing_synchronizes():
    # The NumPy backend has no distributed engine and no training.
    script = (
        "import keras_bn\n"
        "try:\n"
        "    keras_bn.BatchNormalization(synchronized=True)\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=_env(KERAS_BACKEND="numpy"),
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Received: synchronized=True with the numpy backend" in (
        result.stdout
    ), result.stdout


def _sequence_model(layer):
    return keras.Sequential(
        [
            keras.Input((5, 3)),
            layer,
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute only"
)
@pytest.mark.parametrize(
    "make_layer",
    [
        lambda: keras_bn.BatchNormalization(synchronized=True),
        lambda: keras_bn.BatchRenormalization(
            synchronized=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0}
        ),
        lambda: keras_bn.BNLSTM(4, return_sequences=True),
        lambda: keras_bn.BNGRU(4, return_sequences=True),
    ],
    ids=["BatchNormalization", "BatchRenormalization", "BNLSTM", "BNGRU"],
)
def test_every_layer_fits_evaluates_predicts_and_saves_in_scope(make_layer):
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 1.0, (32, 5, 3)).astype("float32")
    y = rng.normal(0.0, 1.0, (32, 1)).astype("float32")
    with test_case.mirrored_strategy().scope():
        model = _sequence_model(make_layer())
        model.compile(optimizer="adam", loss="mse")
        before = [keras.ops.convert_to_numpy(w) for w in model.weights]
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        loss = model.evaluate(x, y, verbose=0)
        expected = model.predict(x, verbose=0)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            loaded = keras.saving.load_model(path)
        np.testing.assert_allclose(
            loaded.predict(x, verbose=0), expected, atol=1e-6
        )
    assert np.isfinite(loss)
    moved = [
        not np.allclose(keras.ops.convert_to_numpy(w), b)
        for w, b in zip(model.weights, before)
        if "moving" in w.name
    ]
    assert moved and all(moved), "the moving statistics did not change"
