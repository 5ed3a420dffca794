"""Smoke test of an installed keras_bn, run by `.ci/run` in a fresh venv.

Every public layer trains in a tiny model, saves to a `.keras` file and
loads back with equal predictions, on the backend `KERAS_BACKEND` names.
Run it from outside the checkout, so that `import keras_bn` finds the
installed wheel: it stops if the package comes from the checkout.
"""

import os
import sys
import tempfile

import keras
import numpy as np

import keras_bn

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sequence_model(layer):
    return keras.Sequential([
        keras.Input((5, 3)),
        layer,
        keras.layers.Flatten(),
        keras.layers.Dense(1),
    ])


def dense_model(layer):
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8),
        layer,
        keras.layers.Dense(1),
    ])


LAYERS = {
    "BatchNormalization": lambda: dense_model(
        keras_bn.BatchNormalization(virtual_batch_size=8)
    ),
    "BatchRenormalization": lambda: dense_model(
        keras_bn.BatchRenormalization(
            renorm_clipping={"rmax": 2.0, "dmax": 1.0}
        )
    ),
    "BNLSTM": lambda: sequence_model(
        keras_bn.BNLSTM(4, return_sequences=True)
    ),
    "BNGRU": lambda: sequence_model(
        keras_bn.BNGRU(4, return_sequences=True)
    ),
    "FrozenBatchNormalization": lambda: dense_model(
        keras_bn.FrozenBatchNormalization(trainable_affine=True)
    ),
}


def main():
    location = os.path.realpath(keras_bn.__file__)
    if location.startswith(os.path.realpath(CHECKOUT) + os.sep):
        sys.exit(f"keras_bn was imported from the checkout ({location}), "
                 "not from the installed package: run this script from "
                 "another directory")
    print(f"keras_bn {keras_bn.__version__} from {location}, "
          f"Keras {keras.__version__} on {keras.backend.backend()}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in LAYERS.items():
            model = make()
            shape = model.input_shape[1:]
            x = rng.normal(1.0, 2.0, (32, *shape)).astype("float32")
            y = rng.normal(0.0, 1.0, (32, 1)).astype("float32")
            model.compile(optimizer="adam", loss="mse")
            history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
            loss = history.history["loss"][-1]
            assert np.isfinite(loss), f"{name}: loss {loss}"
            expected = model.predict(x, verbose=0)
            path = os.path.join(tmp, f"{name}.keras")
            model.save(path)
            loaded = keras.saving.load_model(path)
            got = loaded.predict(x, verbose=0)
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6,
                                       err_msg=name)
            print(f"{name}: fit (loss {loss:.4f}), saved, loaded, "
                  "predictions equal")


if __name__ == "__main__":
    main()
