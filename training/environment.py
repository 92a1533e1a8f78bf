"""What the training CLI settles before Keras or TensorFlow is imported: the Keras backend, and
how loud TensorFlow's CUDA start-up may be. Both only take effect through the environment of a
process that has not imported them yet, so this module imports neither.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
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


def gpu_wanted() -> bool:
    """Whether TensorFlow may find a GPU: an NVIDIA driver's device is here and
    CUDA_VISIBLE_DEVICES does not hide them all. Judged without importing TensorFlow."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or any(Path("/dev").glob("nvidia[0-9]*"))


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up logs to what matters on this machine.

    TensorFlow's CUDA build logs "failed call to cuInit" as an ERROR on every start where there
    is no GPU to use; there it means only "no GPU", so errors are hidden as well as warnings.
    Where a GPU may be used, errors stay visible: then they matter. Only the log level is set
    (never CUDA_VISIBLE_DEVICES, which would hide a GPU this check missed), and an explicit
    TF_CPP_MIN_LOG_LEVEL wins. (TensorFlow's "Could not find cuda drivers" lines are written
    before its logging starts, whatever the level.)
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if gpu_wanted() else "3")


# TensorFlow's C++ start-up notices: written to the process's stderr before its log level
# applies (absl logging is not initialised yet), once by each of two shared libraries, so
# twice per process. They say nothing a user can act on.
_STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|oneDNN custom operations are on"
    r"|Could not find cuda drivers on your machine")


def import_tensorflow() -> None:
    """Import TensorFlow with its start-up notices filtered out of stderr (everything else it
    writes meanwhile passes through). Where a GPU may be used, the CUDA lines stay: there
    they matter. Call before anything else imports it; later imports are free."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            noise = _STARTUP_NOISE if not gpu_wanted() else re.compile(
                _STARTUP_NOISE.pattern.replace("|Could not find cuda drivers on your machine",
                                               ""))
            for line in captured.read().decode("utf-8", "replace").splitlines():
                if not noise.search(line):
                    print(line, file=sys.stderr)
