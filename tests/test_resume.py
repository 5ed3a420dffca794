"""Resuming a `model.fit` interrupted, through `BackupAndRestore`.

A run interrupted in its third epoch and restarted in a new model from the
backup must end where an uninterrupted run ends: the same weights, moving
statistics, optimizer state and every counter keras_bn keeps
(`num_batches_tracked`, `renorm_step` and the clipping schedules it drives,
the recurrent layers' per-step update counts). The reference is the
uninterrupted run of the same model from the same initial weights, and the
counters are also checked against the number of steps taken.

Runs on whichever backend `KERAS_BACKEND` selects; CI runs it on each.
"""

import os
import tempfile

import keras
import numpy as np
from absl.testing import parameterized

import keras_bn

EPOCHS = 3
STEPS = 4  # per epoch
BATCH = 8
STOP_EPOCH = 2
STOP_BATCH = 2


class _Interrupt(Exception):
    pass


class _InterruptAt(keras.callbacks.Callback):
    """Raises before batch `STOP_BATCH` of epoch `STOP_EPOCH`."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.epoch == STOP_EPOCH and batch == STOP_BATCH:
            raise _Interrupt()


def _model(kind):
    """A model whose keras_bn layers keep every kind of counter."""
    if kind == "recurrent":
        # No noise on the initial state: a resumed run draws other random
        # numbers than an uninterrupted one, as it would for dropout.
        exact = {"max_timesteps": 4, "initial_state_noise": 0.0}
        layers = [
            keras.Input((5, 3)),
            keras_bn.BNLSTM(6, return_sequences=True, **exact),
            keras_bn.BNGRU(6, return_sequences=True, **exact),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ]
    else:
        clipping = keras_bn.schedules.paper_renorm_clipping(
            warmup_steps=2, rmax_steps=10, dmax_steps=8
        )
        layers = [
            keras.Input((5, 3)),
            keras.layers.Dense(6),
            keras_bn.BatchRenormalization(
                renorm_clipping=clipping, renorm_momentum=0.9, momentum=0.8
            ),
            keras_bn.BatchNormalization(momentum=None),
            keras_bn.BatchNormalization(virtual_batch_size=4, momentum=0.7),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ]
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def _data():
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, (STEPS * BATCH, 5, 3)).astype("float32")
    y = rng.normal(0.0, 1.0, (STEPS * BATCH, 1)).astype("float32")
    return x, y


def _state(model):
    """Every model and optimizer variable, in order, with its layer's
    position and the variable's name (unique layer names differ between
    models)."""
    state = []
    for i, layer in enumerate(model.layers):
        state += [(f"{i}/{v.name}", np.array(v)) for v in layer.weights]
    # Optimizer slots are named after the model: name them by position,
    # but for the step count.
    state += [
        ("optimizer/" + (v.name if v.name == "iteration" else str(i)),
         np.array(v))
        for i, v in enumerate(model.optimizer.variables)
    ]
    return state


class ResumeTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("normalization", "normalization"), ("recurrent", "recurrent")
    )
    def test_interrupted_fit_ends_like_an_uninterrupted_one(self, kind):
        x, y = _data()
        fit = dict(batch_size=BATCH, shuffle=False, verbose=0, epochs=EPOCHS)
        keras.utils.set_random_seed(0)
        initial = _model(kind).get_weights()

        reference = _model(kind)
        reference.set_weights(initial)
        reference.fit(x, y, **fit)

        with tempfile.TemporaryDirectory() as tmp:
            backup = os.path.join(tmp, "backup")
            interrupted = _model(kind)
            interrupted.set_weights(initial)
            with self.assertRaises(_Interrupt):
                interrupted.fit(
                    x, y, callbacks=[
                        keras.callbacks.BackupAndRestore(backup),
                        _InterruptAt(),
                    ], **fit,
                )
            # A new process would build the model afresh: so does this.
            resumed = _model(kind)
            resumed.set_weights(initial)
            epochs_run = []
            resumed.fit(
                x, y, callbacks=[
                    keras.callbacks.BackupAndRestore(backup),
                    keras.callbacks.LambdaCallback(
                        on_epoch_begin=lambda e, logs: epochs_run.append(e)
                    ),
                ], **fit,
            )
        self.assertEqual(epochs_run, [STOP_EPOCH])

        expected, actual = _state(reference), _state(resumed)
        self.assertEqual([k for k, _ in expected], [k for k, _ in actual])
        for (path, want), (_, got) in zip(expected, actual):
            np.testing.assert_allclose(
                got, want, rtol=1e-5, atol=1e-6, err_msg=path
            )
        actual = dict(actual)

        steps = EPOCHS * STEPS
        counters = {
            path: value
            for path, value in actual.items()
            if path.rsplit("/", 1)[-1]
            in ("num_batches_tracked", "renorm_step", "input_updates",
                "step_updates")
        }
        if kind == "recurrent":
            # Two recurrent layers, each with input and step update counts,
            # every row updated once per step.
            self.assertLen(counters, 4)
        else:
            self.assertLen(counters, 2)
        for path, value in counters.items():
            np.testing.assert_array_equal(value, steps, err_msg=path)
        self.assertEqual(int(actual["optimizer/iteration"]), steps)
