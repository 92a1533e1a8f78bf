"""Serving layer: loaded models and their engines, request validation, text <-> ids, replies.

Routers stay thin: they call into `ModelService`, which raises domain errors from
app.errors; the HTTP mapping lives in one place (app/errors.py).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import ValidationError

from app.artifact import ArtifactError, ModelMetadata, check_inside, read_metadata
from app.continuation import (
    Handle,
    model_id,
    sign,
    states_from_bytes,
    states_to_bytes,
    verify,
)
from app.decode import load_served
from app.engine import (
    Engine,
    EngineClosedError,
    GenerationParams,
    QueueFullError,
    Request,
)
from app.engine.remote import RemoteEngine
from app.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    UnavailableError,
)
from app.manifest import POLL_S, ServedVersion, read_manifest
from app.metrics import Metrics, ModelObserver
from app.schemas import (
    NATIVE_NAMES,
    Alternative,
    CharDetail,
    FieldNames,
    GenerateRequest,
    GenerateResponse,
    ModelDetail,
    ModelInfo,
    StateInfo,
    Timings,
    Usage,
    shown,
)
from app.settings import Settings
from app.vocab import Vocabulary, normalize

log = logging.getLogger(__name__)

EMPTY_SEED_PRIMER = "\n"
# A new version's engine is warm before the manifest names it: its first heartbeat is due
# within a tenth of a second.
NEW_ENGINE_TIMEOUT_S = 10.0
# A replaced version's engine ends its leftovers at CHARLSTM_DRAIN_S with its own reason; the
# worker gives up on it this much later.
RETIRE_MARGIN_S = 5.0


@dataclass(frozen=True)
class ModelSpec:
    """What the HTTP side knows of a model: no onnxruntime session (that is the engine's)."""

    name: str
    dir: Path
    meta: ModelMetadata
    vocab: Vocabulary
    version: int = 1  # under `python -m app`: one more per hot reload (app/reload.py)


class EngineHandle(Protocol):
    """A model's engine as the service drives it: a thread beside the event loop
    (app.engine.local) or a process of its own (app.engine.remote)."""

    @property
    def alive(self) -> bool: ...
    @property
    def waiting(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def predicted_wait_s(self) -> float: ...
    @property
    def chars_per_s(self) -> float: ...
    @property
    def provider(self) -> str: ...
    @property
    def graph(self) -> str: ...
    @property
    def decode_graph(self) -> str | None: ...
    def start(self) -> None: ...
    async def submit(self, params: GenerationParams) -> Request: ...
    async def drain(self, grace_s: float) -> bool: ...
    def close(self) -> None: ...
    def refresh_metrics(self) -> None: ...


@dataclass
class Served:
    model: ModelSpec
    engine: EngineHandle
    observer: ModelObserver


@dataclass
class Prepared:
    served: Served
    params: GenerationParams
    seed_text: str
    lowercased: bool


def discover(models_dir: Path) -> list[Path]:
    """Model folders: visible sub-folders of the models directory, by name."""
    if not models_dir.is_dir():
        raise ArtifactError(f"{models_dir}: models directory not found")
    found = sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in found:
        check_inside(folder, models_dir)
    if not found:
        raise ArtifactError(f"{models_dir}: no model folders (export one with "
                            "`python -m training export`)")
    return found


class ModelService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, Served] = {}
        self.continuation_key = (settings.continuation_key or secrets.token_hex(32)).encode()
        self.started = False
        self.draining = False
        self.open_streams = 0  # SSE replies still being written (a drain waits for them)
        # Hot reload (engine processes only): the manifest generation served, and the
        # replaced versions still finishing their requests.
        self.generation = 0
        self.retiring: dict[EngineHandle, asyncio.Task[None]] = {}
        self._sync_lock = asyncio.Lock()

    # --- life cycle -----------------------------------------------------------------------
    def load(self) -> None:
        """Every model: with engine processes (CHARLSTM_ENGINE_DIR, set by the supervisor)
        the versions its manifest names (metadata read, engines connected); otherwise every
        model folder, loaded here (validated, graph checked, warmed up) with its engine on a
        thread. Any failure stops start-up. Loading twice is a no-op."""
        if self.models:
            return
        s = self.settings
        if s.engine_dir is not None:
            manifest = read_manifest(s.engine_dir)
            for entry in manifest.models.values():
                spec, remote = self._version(entry)
                self.models[spec.name] = Served(spec, remote, self.metrics.observer(spec.name))
            self.generation = manifest.generation
        else:
            for folder in discover(s.models_dir):
                model, decode = load_served(folder, s)
                spec = ModelSpec(model.name, folder, model.meta, model.vocab)
                observer = self.metrics.observer(spec.name)
                engine = Engine(model, observer=observer, decode=decode, **s.engine_limits())
                self.models[spec.name] = Served(spec, engine, observer)
        if self.settings.default_model not in self.models:
            raise ArtifactError(
                f"default model {self.settings.default_model!r} is not in "
                f"{self.settings.models_dir} (found: {', '.join(self.models)}); set "
                "CHARLSTM_DEFAULT_MODEL"
            )

    def start(self) -> None:
        for served in self.models.values():
            served.engine.start()
        self.started = True

    async def engines_up(self, timeout_s: float) -> bool:
        """Wait for every engine process's first heartbeat (they were started before us)."""
        ok = True
        for served in self.models.values():
            if isinstance(served.engine, RemoteEngine):
                ok &= await served.engine.wait_alive(timeout_s)
        return ok

    @property
    def dead_engines(self) -> list[str]:
        return sorted(n for n, s in self.models.items() if not s.engine.alive)

    @property
    def ready(self) -> bool:
        """Serving: started, not draining, and every model's engine alive."""
        return self.started and not self.draining and not self.dead_engines

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting (503, not ready) and give running requests up to grace_s to finish;
        past that every request ends with an error and each stream writes its final events."""
        self.draining = True
        engines = [*(s.engine for s in self.models.values()), *self.retiring]
        results = await asyncio.gather(*(e.drain(grace_s) for e in engines))
        await self.streams_closed(timeout_s=5.0)
        return all(results)

    async def streams_closed(self, timeout_s: float) -> bool:
        """Wait until every SSE reply has written its last event."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.open_streams and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return not self.open_streams

    def close(self) -> None:
        self.started = False
        for served in self.models.values():
            served.engine.close()
        for engine, task in self.retiring.items():
            task.cancel()
            engine.close()

    # --- hot reload (engine processes) ----------------------------------------------------
    async def follow(self) -> None:
        """Serve what the supervisor's manifest says, looking every POLL_S."""
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self.sync()
            except Exception:  # the next look tries again; the versions serving keep serving
                log.exception("could not follow the supervisor's manifest")

    async def sync(self) -> None:
        """Apply the manifest if it is newer than what this worker serves: a new version's
        engine is connected and answering before new requests go to it; the one it replaces
        finishes this worker's requests, then is closed. Requests already prepared keep the
        model (vocabulary, engine) they were prepared with."""
        assert self.settings.engine_dir is not None
        async with self._sync_lock:
            try:
                manifest = read_manifest(self.settings.engine_dir)
            except (OSError, ValidationError) as exc:
                log.error("cannot read the supervisor's manifest: %s", exc)
                return
            if manifest.generation <= self.generation:
                return
            if await self._apply(manifest.models):
                self.generation = manifest.generation

    async def _apply(self, versions: dict[str, ServedVersion]) -> bool:
        complete = True
        for entry in versions.values():
            old = self.models.get(entry.name)
            if old is not None and old.model.version == entry.version:
                continue
            try:
                spec, remote = self._version(entry)
            except ArtifactError as exc:
                log.error("cannot serve %s version %d: %s", entry.name, entry.version, exc)
                complete = False
                continue
            remote.start()
            if not await remote.wait_alive(NEW_ENGINE_TIMEOUT_S):
                log.error("the engine of %s version %d does not answer; trying again",
                          entry.name, entry.version)
                remote.close()
                complete = False
                continue
            observer = old.observer if old else self.metrics.observer(spec.name)
            self.models[spec.name] = Served(spec, remote, observer)
            log.info("serving %s version %d", spec.name, spec.version)
            if old is not None:
                self._retire(old.engine)
        for name in [n for n in self.models if n not in versions]:
            log.info("%s is no longer served (its folder was removed)", name)
            self._retire(self.models.pop(name).engine)
        return complete

    def _version(self, entry: ServedVersion) -> tuple[ModelSpec, RemoteEngine]:
        meta = read_metadata(entry.dir)
        spec = ModelSpec(entry.name, entry.dir, meta, meta.vocabulary(), entry.version)
        return spec, RemoteEngine(entry.name, entry.address)

    def _retire(self, engine: EngineHandle) -> None:
        async def retire() -> None:
            try:
                await engine.drain(self.settings.drain_s + RETIRE_MARGIN_S)
            finally:
                engine.close()
                self.retiring.pop(engine, None)

        self.retiring[engine] = asyncio.ensure_future(retire())

    # --- lookups --------------------------------------------------------------------------
    def get(self, name: str | None) -> Served:
        key = name or self.settings.default_model
        served = self.models.get(key)
        if served is None:
            raise ModelNotFoundError(
                f"model {key!r} not found; available: {', '.join(sorted(self.models))}")
        return served

    def info(self, served: Served) -> ModelInfo:
        m = served.model
        meta = m.meta
        val = meta.validation
        return ModelInfo(
            name=m.name, cell=meta.architecture.cell, layers=meta.architecture.layers,
            units=meta.architecture.units, embedding_dim=meta.architecture.embedding_dim,
            parameters=meta.architecture.parameters, vocab_size=len(m.vocab),
            lowercase=meta.lowercase, provider=served.engine.provider,
            graph=served.engine.graph, decode_graph=served.engine.decode_graph,
            validation_loss_nats=val.loss_nats if val else None,
            validation_bits_per_char=val.bits_per_char if val else None,
            corpus=meta.corpus.name, version=m.version, created=meta.created,
            predicted_wait_s=round(served.engine.predicted_wait_s, 3),
            chars_per_s=round(served.engine.chars_per_s, 1),
        )

    def detail(self, served: Served) -> ModelDetail:
        meta = served.model.meta
        return ModelDetail(
            **self.info(served).model_dump(), vocab=list(served.model.vocab.chars),
            states=[StateInfo(input=s.input, output=s.output, size=s.size)
                    for s in meta.onnx.states],
            training=dict(meta.training), versions=dict(meta.versions),
            active_rows=served.engine.active, waiting=served.engine.waiting,
        )

    # --- generation -----------------------------------------------------------------------
    def prepare(self, body: GenerateRequest, stream: bool = False,
                names: FieldNames = NATIVE_NAMES, scope: bytes = b"") -> Prepared:
        """Check the request against this server's limits and the model's vocabulary; messages
        name the fields as the caller does (`names`)."""
        served = self.get(body.model)
        if body.continuation is not None:
            return self._prepare_continuation(body, served, stream, names)
        s = self.settings
        vocab = served.model.vocab
        lower = served.model.meta.lowercase
        form = served.model.meta.normalization
        seed_text = normalize(body.seed_text.lower() if lower else body.seed_text, form)
        if len(seed_text) > s.max_seed_chars:
            raise InvalidRequestError(
                f"{names.seed_text} must have at most {s.max_seed_chars} characters, "
                f"got {len(seed_text)}")
        unknown = (vocab.unknown_lowercased(body.seed_text) if lower and form is None
                   else vocab.unknown(seed_text))
        if unknown:
            chars = ", ".join(repr(c) for c in unknown[:20])
            raise InvalidRequestError(
                f"{names.seed_text} has characters not in the vocabulary of model "
                f"{served.model.name!r}: {chars}")
        max_new = body.max_new_chars if body.max_new_chars is not None else s.default_new_chars
        if not 1 <= max_new <= s.max_new_chars:
            raise InvalidRequestError(
                f"{names.max_new_chars} must be in [1, {s.max_new_chars}], got {shown(max_new)}")
        primer = seed_text or (EMPTY_SEED_PRIMER if EMPTY_SEED_PRIMER in vocab.chars
                               else vocab.chars[0])
        stops = []
        for stop in body.stop or []:
            text = normalize(stop.lower() if lower else stop, form)
            if not vocab.unknown(text):  # a stop the model cannot spell can never occur
                stops.append(tuple(int(i) for i in vocab.encode(text)))
        time_limit = min(body.time_limit_s or s.time_limit_s, s.time_limit_s)
        params = GenerationParams(
            seed_ids=vocab.encode(primer), max_new=max_new, temperature=body.temperature,
            top_k=body.top_k, top_p=body.top_p,
            seed=body.seed if body.seed is not None else secrets.randbits(63),
            stop=stops, time_limit_s=time_limit, details=body.details, stream=stream,
            resumable=self._check_resumable(body, served), cache_scope=scope,
        )
        return Prepared(served, params, seed_text,
                        lower and body.seed_text.lower() != body.seed_text)

    def _check_resumable(self, body: GenerateRequest, served: Served) -> bool:
        """A handle must fit in a request body to be sent back (base64 of 4 bytes per state
        value, plus ~300 bytes of fields)."""
        if not body.resumable:
            return False
        size = 4 * sum(st.size for st in served.model.meta.onnx.states) * 4 // 3 + 300
        if size > self.settings.max_body_bytes - 1000:
            raise InvalidRequestError(
                f"model {served.model.name!r} has too large a state for a continuation handle "
                f"within this server's body limit ({size} of {self.settings.max_body_bytes} "
                "bytes, CHARLSTM_MAX_BODY_BYTES)")
        return True

    # Fields a continuation takes from its handle; sending them too would make the text
    # differ from the one longer request it stands for.
    CARRIED = ("seed_text", "temperature", "top_k", "top_p", "seed")

    def _prepare_continuation(self, body: GenerateRequest, served: Served, stream: bool,
                              names: FieldNames) -> Prepared:
        s = self.settings
        clash = [f for f in self.CARRIED if f in body.model_fields_set]
        if clash:
            raise InvalidRequestError(
                f"a continuation carries its own seed and sampling parameters; do not send "
                f"{', '.join(clash)} with it")
        meta = served.model.meta
        graph = served.engine.graph  # "unknown" until a process engine's first heartbeat
        handle = verify(body.continuation or "", self.continuation_key, served.model.name,
                        meta, [st.size for st in meta.onnx.states], s.continuation_ttl_s,
                        graph=None if graph == "unknown" else graph)
        max_new = body.max_new_chars if body.max_new_chars is not None else s.default_new_chars
        if not 1 <= max_new <= s.max_new_chars:
            raise InvalidRequestError(
                f"{names.max_new_chars} must be in [1, {s.max_new_chars}], got {shown(max_new)}")
        vocab = served.model.vocab
        texts = [normalize(t.lower() if meta.lowercase else t, meta.normalization)
                 for t in body.stop or []]
        stops = [tuple(int(i) for i in vocab.encode(t)) for t in texts if not vocab.unknown(t)]
        params = GenerationParams(
            seed_ids=np.array([handle.last_id], np.int32), max_new=max_new,
            temperature=handle.temperature, top_k=handle.top_k, top_p=handle.top_p,
            seed=handle.seed, stop=stops,
            time_limit_s=min(body.time_limit_s or s.time_limit_s, s.time_limit_s),
            details=body.details, stream=stream,
            resumable=self._check_resumable(body, served),
            initial_states=states_from_bytes(handle.states), counter_start=handle.counter)
        return Prepared(served, params, "", False)

    async def submit(self, prep: Prepared) -> Request:
        # Not `self.ready`: that is false when any engine is down, and one model's engine
        # must not take the others down with it (the engine itself refuses with 503).
        if not self.started or self.draining:
            prep.served.observer.on_rejected("unavailable")
            raise UnavailableError("the server is shutting down or not ready; retry elsewhere")
        try:
            return await prep.served.engine.submit(prep.params)
        except QueueFullError as exc:
            prep.served.observer.on_rejected("overloaded")
            raise OverloadedError(str(exc), retry_after=exc.retry_after) from None
        except EngineClosedError as exc:
            prep.served.observer.on_rejected("unavailable")
            raise UnavailableError(str(exc)) from None

    def response(self, prep: Prepared, req: Request) -> GenerateResponse:
        vocab = prep.served.model.vocab
        text = vocab.decode(req.ids)
        details = None
        if prep.params.details:
            details = [
                CharDetail(char=vocab.chars[i], prob=d.prob,
                           top=[Alternative(char=vocab.chars[t], prob=p) for t, p in d.top])
                for i, d in zip(req.ids, req.details, strict=False)
            ]
        continuation = None
        if req.final is not None:
            states, last_id, counter = req.final
            p = prep.params
            continuation = sign(Handle(
                model=prep.served.model.name, model_id=model_id(prep.served.model.meta),
                issued_at=time.time(), states=states_to_bytes(states), last_id=last_id,
                counter=counter, seed=p.seed, temperature=p.temperature, top_k=p.top_k,
                top_p=p.top_p, graph=prep.served.engine.graph), self.continuation_key)
        return GenerateResponse(
            continuation=continuation,
            model=prep.served.model.name, text=text,
            finish_reason=req.finish_reason or "cancelled",
            seed=prep.params.seed, seed_text=prep.seed_text, lowercased=prep.lowercased,
            usage=Usage(seed_chars=len(prep.seed_text), generated_chars=len(text)),
            timings=Timings(**req.timings()), error=req.error, details=details,
        )

    async def run(self, prep: Prepared) -> GenerateResponse:
        """Generate to the end; a cancelled await (client gone) cancels the request."""
        req = await self.submit(prep)
        try:
            while not req.done:
                await req.wait()
        finally:
            if not req.done:
                req.cancel()
        return self.response(prep, req)

    async def chunks(self, prep: Prepared, req: Request,
                     keepalive_s: float) -> AsyncIterator[dict[str, Any] | None]:
        """Text produced since the last chunk; None while idle (a keep-alive is due)."""
        vocab = prep.served.model.vocab
        sent = 0
        try:
            while True:
                # State first, then wait: news that arrived with the admission decision (a
                # short request may finish in that very step) is already here.
                done = req.done  # read before the ids: once set, every id is in place
                n = len(req.ids)
                if n > sent:
                    chunk: dict[str, Any] = {"text": vocab.decode(req.ids[sent:n])}
                    if prep.params.details:
                        chunk["details"] = [
                            {"char": vocab.chars[i], "prob": d.prob,
                             "top": [{"char": vocab.chars[t], "prob": p} for t, p in d.top]}
                            for i, d in zip(req.ids[sent:n], req.details[sent:n], strict=False)
                        ]
                    sent = n
                    yield chunk
                if done:
                    return
                if not await req.wait(keepalive_s):
                    yield None
        finally:
            if not req.done:
                req.cancel()
