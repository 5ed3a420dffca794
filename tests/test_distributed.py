"""Distributed training: MultiWorkerMirroredStrategy and JAX DataParallel.

Each case runs `tests/distributed_worker.py` in fresh processes (a strategy
or a device count must be set before the framework starts) and compares
the trained weights, moving statistics included, with a single-device run
on the whole global batch.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest

import keras_bn
from tests import test_case

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TIMEOUT = 240
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _data(tmp, virtual_batch_size, global_batch=16):
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
        virtual_batch_size=virtual_batch_size or 0,
    )
    return path


def _run(args, env, timeout=TIMEOUT):
    return subprocess.Popen(
        [sys.executable, WORKER, *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    ), timeout


def _wait(processes):
    outputs = []
    try:
        for process, timeout in processes:
            out, _ = process.communicate(timeout=timeout)
            outputs.append(out)
            assert process.returncode == 0, out[-3000:]
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outputs


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
            for a, b in zip(got, expected):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_jax_data_parallel_uses_global_batch():
    pytest.importorskip("jax")
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(tmp, None)
        out = os.path.join(tmp, "jax.npz")
        single = os.path.join(tmp, "single.npz")
        env = _env(
            KERAS_BACKEND="jax",
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAX_PLATFORMS="cpu",
        )
        _wait([
            _run(["jax", data, out], env),
            _run(["jax", data, single], _env(
                KERAS_BACKEND="jax", JAX_PLATFORMS="cpu"
            )),
        ])
        got, expected = _load(out), _load(single)
        assert int(got.pop()) == 4
        assert int(expected.pop()) == 1
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
        # The reference run's statistics are those of the global batch, so
        # they differ from any shard's: check that they moved at all.
        with np.load(data, allow_pickle=True) as f:
            initial = list(f["weights"])
        assert not np.allclose(expected[4], initial[4])


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
