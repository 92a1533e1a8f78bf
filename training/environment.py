"""What the training CLI settles before Keras or TensorFlow is imported: the Keras backend, and
how loud TensorFlow's CUDA start-up may be. Both only take effect through the environment of a
process that has not imported them yet, so this module imports neither.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

BACKENDS = ("tensorflow", "jax")
DEFAULT_BACKEND = "tensorflow"
_INSTALL = {
    "tensorflow": "pip install 'charlstm[train]' (or tensorflow)",
    "jax": "pip install 'jax[cuda12]' on a CUDA 12 GPU host, or 'jax' for the CPU",
}


class BackendError(ValueError):
    """A Keras backend that cannot be used in this process."""


def choose_backend(requested: str | None) -> str:
    """Set KERAS_BACKEND for this process: `requested`, else $KERAS_BACKEND, else tensorflow.

    Fails with an installable hint when the backend's package is missing, rather than letting
    Keras fail later with an import error from deep inside it.
    """
    name = requested or os.environ.get("KERAS_BACKEND") or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise BackendError(f"Keras backend {name!r} is not supported here; choose one of "
                           f"{', '.join(BACKENDS)} (from --backend or $KERAS_BACKEND)")
    if "keras" in sys.modules:
        import keras

        current = keras.backend.backend()
        if current != name:
            raise BackendError(f"Keras is already loaded with the {current} backend in this "
                               f"process; {name} must be chosen before Keras is imported")
    if importlib.util.find_spec(name) is None:
        raise BackendError(f"the {name} backend needs the {name} package, which is not "
                           f"installed for {sys.executable}: {_INSTALL[name]}; or pick another "
                           f"with --backend ({', '.join(BACKENDS)})")
    os.environ["KERAS_BACKEND"] = name
    return name


def gpu_present() -> bool:
    """Whether an NVIDIA driver reports a GPU, judged without importing TensorFlow."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    gpus = Path("/proc/driver/nvidia/gpus")
    return not hidden and gpus.is_dir() and any(gpus.iterdir())


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up logs to what matters on this machine.

    TensorFlow's CUDA build logs "failed call to cuInit" as an ERROR on every start on a machine
    without a GPU (or with every GPU hidden); there it means only "no GPU", so errors are hidden
    too, and the GPU is hidden explicitly. With a GPU, errors stay visible: they then matter.
    An explicit TF_CPP_MIN_LOG_LEVEL or CUDA_VISIBLE_DEVICES always wins.
    """
    if gpu_present():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # warnings and info off
    else:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
