"""Continuous-batching decode: `core` owns the batch (no threads, no I/O); `local` drives it
on a worker thread beside the HTTP event loop."""

from app.engine.core import (
    EngineCore,
    EngineObserver,
    GenerationParams,
    QueueFullError,
    Sequence,
    StepModel,
    TokenDetail,
)
from app.engine.local import Engine, EngineClosedError, Request

__all__ = ["Engine", "EngineClosedError", "EngineCore", "EngineObserver", "GenerationParams",
           "QueueFullError", "Request", "Sequence", "StepModel", "TokenDetail"]
