"""How a training run uses this machine: the settings that change characters per second but not
the model, measured by `python -m bench.training` (bench/results/training-*.json).

Threads and the Keras backend only take effect in a process that has not imported TensorFlow or
JAX yet, so `apply_threads` runs before those imports; this module imports neither.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

JitCompile = Literal["auto", "on", "off"]
Precision = Literal["float32", "mixed_bfloat16"]
Pipeline = Literal["tf.data", "arrays"]
JIT_CHOICES: tuple[JitCompile, ...] = ("auto", "on", "off")
PRECISIONS: tuple[Precision, ...] = ("float32", "mixed_bfloat16")
PIPELINES: tuple[Pipeline, ...] = ("tf.data", "arrays")


@dataclass(frozen=True)
class Speed:
    """What `train` runs with besides the model and its optimizer.

    threads: 0 leaves the backend's own choice (a thread per core), n caps its intra-op pool at
    n (TensorFlow: TF_NUM_INTRAOP_THREADS, one inter-op thread; JAX: XLA_FLAGS). fixed_window:
    the training graph is built for windows of exactly seq_len characters (the recurrent loop
    has a known length) instead of any length. pipeline: how batches reach `fit` on TensorFlow
    (JAX always takes arrays).
    """

    threads: int = 0
    jit_compile: JitCompile = "auto"
    precision: Precision = "float32"
    fixed_window: bool = False
    pipeline: Pipeline = "tf.data"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self, backend: str) -> str:
        return (f"backend {backend}, threads {self.threads or 'all'}, jit_compile "
                f"{self.jit_compile}, {self.precision}, "
                f"{'fixed' if self.fixed_window else 'any'} window length, "
                f"{self.pipeline if backend == 'tensorflow' else 'arrays'} input")


def apply_threads(backend: str, threads: int) -> None:
    """Set the thread environment for `backend`; call before it is imported."""
    if threads <= 0:
        return
    if backend == "tensorflow":
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    else:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
            f"intra_op_parallelism_threads={threads}").strip()


def keras_jit(jit: JitCompile) -> bool | str:
    """`Model.compile`'s jit_compile: "auto" (Keras decides: no XLA on a CPU), True, False."""
    return "auto" if jit == "auto" else jit == "on"


# Today's settings: Keras's own. A GPU host keeps them (cuDNN's LSTM needs none of these).
KERAS_DEFAULT = Speed()
# The fastest configuration on a CPU-only host at equal or better validation loss after equal
# wall time, from bench/results/training-sweep-vm-20261206.md: Keras's own settings. Nothing
# measured there was faster beyond the noise of the shared 2-core machine, except a larger
# batch or window or JAX, which all lost validation loss at equal time; jit_compile was slower.
CPU_DEFAULT = Speed()
CPU_SOURCE = "bench/results/training-sweep-vm-20261206.md"


def chosen_speed(gpu: bool, **given: Any) -> tuple[Speed, str]:
    """The defaults for this host with the options given (None: not given) over them, and
    where the defaults came from, to be printed."""
    base, source = (KERAS_DEFAULT, "Keras's defaults (a GPU host)") if gpu else (
        CPU_DEFAULT, f"the fastest on a CPU in {CPU_SOURCE}")
    overrides = {k: v for k, v in given.items() if v is not None}
    if overrides:
        source += ", with " + ", ".join(f"{k}={v}" for k, v in overrides.items())
    return replace(base, **overrides), source
