"""Continuous-batching decode. `messages`: the request and its events; `core`: the batch (no
threads, no I/O) with `batch`, `admission` and `cache` beside it; `loop`: the core behind a
ZeroMQ socket; `client`: the HTTP side of that socket; `process`: the engine process."""
