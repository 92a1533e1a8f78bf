"""Serving layer: the models served and their engine clients, a request's checks and its one
`GenerationRequest`, and the stream of events it produces.

Routes stay thin: `prepare` (422s) -> `open` (429 / 503, before any byte of the reply) ->
read the events (app/replies.py formats them as JSON or server-sent events). Domain errors come
from app/errors.py, which maps them to HTTP in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from app.artifact import ArtifactError, ModelMetadata, check_inside, read_metadata
from app.continuation import Handle, model_id, open_handle, sign, verify
from app.decode import load_served
from app.engine.client import (
    EngineClient,
    EngineUnavailableError,
    RefusedError,
    ThreadEngine,
    make_client,
)
from app.engine.core import EngineCore
from app.engine.messages import (
    SAMPLING_FIELDS,
    Admitted,
    Chars,
    Detail,
    Event,
    Finished,
    GenerationRequest,
    Sampling,
)
from app.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    ServiceError,
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
from app.tracing import RequestTrace, Tracing
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


@dataclass
class Served:
    model: ModelSpec
    engine: EngineClient
    observer: ModelObserver


@dataclass
class Job:
    """A checked request: its model and the one GenerationRequest the engine runs."""

    served: Served
    request: GenerationRequest
    seed_text: str  # as the model sees it
    lowercased: bool


class Reply:
    """What a request's events add up to: the ids and details so far, and how it finished."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.ids: list[int] = []
        self.details: list[Detail] = []
        self.finished: Finished | None = None

    def add(self, event: Event | None) -> tuple[list[int], list[Detail] | None] | None:
        """Take one event; the new (ids, details) when it brought characters."""
        if isinstance(event, Chars):
            self.ids.extend(event.ids)
            if event.details is not None:
                self.details.extend(event.details)
            return event.ids, event.details
        if isinstance(event, Finished):
            self.finished = event
        return None

    def char_details(self, ids: list[int], details: list[Detail]) -> list[CharDetail]:
        chars = self.job.served.model.vocab.chars
        return [CharDetail(char=chars[i], prob=p,
                           top=[Alternative(char=chars[t], prob=q) for t, q in top])
                for i, (p, top) in zip(ids, details, strict=False)]


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


def sampling_from(body: BaseModel, seed: int) -> Sampling:
    """The body's sampling fields, by name (a new one needs no copying code here)."""
    values = {f: getattr(body, f) for f in SAMPLING_FIELDS if f != "seed"}
    return Sampling(**values, seed=seed)


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
        self.retiring: dict[EngineClient, asyncio.Task[None]] = {}
        self._sync_lock = asyncio.Lock()
        self.tracing: Tracing | None = None  # set by create_app when traces are configured

    # --- life cycle -----------------------------------------------------------------------
    def load(self) -> None:
        """Every model, and its engine client (not yet started): with engine processes
        (CHARLSTM_ENGINE_DIR, set by the supervisor) the versions its manifest names;
        otherwise every model folder, loaded here (validated, graph checked, warmed up) with
        its engine loop on a thread. Any failure stops start-up. Loading twice is a no-op."""
        if self.models:
            return
        s = self.settings
        if s.engine_dir is not None:
            manifest = read_manifest(s.engine_dir)
            for entry in manifest.models.values():
                spec = self._spec(entry)
                client = make_client(spec.name, entry.address, s.client_timings())
                self.models[spec.name] = Served(spec, client, self.metrics.observer(spec.name))
            self.generation = manifest.generation
        else:
            for folder in discover(s.models_dir):
                model, decode = load_served(folder, s)
                spec = ModelSpec(model.name, folder, model.meta, model.vocab)
                observer = self.metrics.observer(spec.name)
                core = EngineCore(model, observer=observer, decode=decode, **s.engine_limits())
                thread = ThreadEngine(core, model.provider, model.graph_file, s.loop_timings())
                client = make_client(spec.name, thread.address, s.client_timings(), thread)
                self.models[spec.name] = Served(spec, client, observer)
        if s.default_model not in self.models:
            raise ArtifactError(
                f"default model {s.default_model!r} is not in {s.models_dir} (found: "
                f"{', '.join(self.models)}); set CHARLSTM_DEFAULT_MODEL")

    def start(self) -> None:
        for served in self.models.values():
            served.engine.start()
        self.started = True

    async def engines_up(self, timeout_s: float) -> bool:
        """Wait for every engine's first heartbeat."""
        results = await asyncio.gather(*(s.engine.wait_alive(timeout_s)
                                         for s in self.models.values()))
        return all(results)

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
                spec = self._spec(entry)
            except ArtifactError as exc:
                log.error("cannot serve %s version %d: %s", entry.name, entry.version, exc)
                complete = False
                continue
            client = make_client(spec.name, entry.address, self.settings.client_timings())
            client.start()
            if not await client.wait_alive(NEW_ENGINE_TIMEOUT_S):
                log.error("the engine of %s version %d does not answer; trying again",
                          entry.name, entry.version)
                client.close()
                complete = False
                continue
            observer = old.observer if old else self.metrics.observer(spec.name)
            self.models[spec.name] = Served(spec, client, observer)
            log.info("serving %s version %d", spec.name, spec.version)
            if old is not None:
                self._retire(old.engine)
        for name in [n for n in self.models if n not in versions]:
            log.info("%s is no longer served (its folder was removed)", name)
            self._retire(self.models.pop(name).engine)
        return complete

    @staticmethod
    def _spec(entry: ServedVersion) -> ModelSpec:
        meta = read_metadata(entry.dir)
        return ModelSpec(entry.name, entry.dir, meta, meta.vocabulary(), entry.version)

    def _retire(self, engine: EngineClient) -> None:
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

    # --- a request --------------------------------------------------------------------------
    def prepare(self, body: GenerateRequest, stream: bool = False,
                names: FieldNames = NATIVE_NAMES, scope: bytes = b"") -> Job:
        """Check the request against this server's limits and the model's vocabulary, and
        build its GenerationRequest; messages name the fields as the caller does (`names`)."""
        if body.continuation is not None:
            return self._prepare_continuation(body, stream, names, scope)
        served = self.get(body.model)
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
        primer = seed_text or (EMPTY_SEED_PRIMER if EMPTY_SEED_PRIMER in vocab.chars
                               else vocab.chars[0])
        request = GenerationRequest(
            seed_ids=vocab.encode(primer).tolist(), max_new=self._max_new(body, names),
            sampling=sampling_from(body, body.seed if body.seed is not None
                                   else secrets.randbits(63)),
            stop=self._stops(body, served), time_limit_s=self._time_limit(body),
            details=body.details, stream=stream, resumable=self._check_resumable(body, served),
            cache_scope=scope)
        return Job(served, request, seed_text, lower and body.seed_text.lower() != body.seed_text)

    def _max_new(self, body: GenerateRequest, names: FieldNames) -> int:
        s = self.settings
        max_new = body.max_new_chars if body.max_new_chars is not None else s.default_new_chars
        if not 1 <= max_new <= s.max_new_chars:
            raise InvalidRequestError(
                f"{names.max_new_chars} must be in [1, {s.max_new_chars}], got {shown(max_new)}")
        return max_new

    @staticmethod
    def _stops(body: GenerateRequest, served: Served) -> list[list[int]]:
        """Stop strings as the model spells them: lowercased and normalised as seeds are."""
        vocab, meta = served.model.vocab, served.model.meta
        texts = [normalize(t.lower() if meta.lowercase else t, meta.normalization)
                 for t in body.stop or []]
        # A stop the model cannot spell can never occur.
        return [vocab.encode(t).tolist() for t in texts if not vocab.unknown(t)]

    def _time_limit(self, body: GenerateRequest) -> float:
        limit = self.settings.time_limit_s
        return min(body.time_limit_s or limit, limit)

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
    CARRIED = ("seed_text", *SAMPLING_FIELDS)

    def _prepare_continuation(self, body: GenerateRequest, stream: bool, names: FieldNames,
                              scope: bytes) -> Job:
        s = self.settings
        clash = [f for f in self.CARRIED if f in body.model_fields_set]
        if clash:
            raise InvalidRequestError(
                f"a continuation carries its own seed and sampling parameters; do not send "
                f"{', '.join(clash)} with it")
        token = body.continuation or ""
        handle = open_handle(token, self.continuation_key, scope=scope)
        # The handle names its model: a request that names none continues that one.
        owner = handle.model
        if body.model is not None and body.model != owner:
            raise InvalidRequestError(
                f"continuation belongs to model {owner!r}, but the request names model "
                f"{body.model!r}; send it without `model`, or with model {owner!r}")
        served = self.get(owner)
        meta = served.model.meta
        graph = served.engine.graph  # "unknown" until a process engine's first heartbeat
        handle = verify(token, self.continuation_key, served.model.name, meta,
                        [st.size for st in meta.onnx.states], s.continuation_ttl_s,
                        scope=scope, graph=None if graph == "unknown" else graph,
                        handle=handle)
        request = GenerationRequest(
            seed_ids=[handle.last_id], max_new=self._max_new(body, names),
            sampling=handle.sampling, stop=self._stops(body, served),
            time_limit_s=self._time_limit(body), details=body.details, stream=stream,
            resumable=self._check_resumable(body, served), initial_states=handle.states,
            counter_start=handle.counter, cache_scope=scope)
        return Job(served, request, "", False)

    async def open(self, job: Job, idle_s: float | None = None
                   ) -> AsyncGenerator[Event | None, None]:
        """The request's events, once it is admitted: raises OverloadedError (429) or
        UnavailableError (503) before any byte of the reply is written."""
        events = self.generate(job, idle_s)
        try:
            await anext(events)  # Admitted
        except BaseException:
            await events.aclose()
            raise
        return events

    async def generate(self, job: Job, idle_s: float | None = None
                       ) -> AsyncGenerator[Event | None, None]:
        """Admitted, then Chars as they come (None after idle_s without any), then Finished.
        Leaving early (the reader stopped, the client went away) cancels the request."""
        observer = job.served.observer
        # Not `self.ready`: that is false when any engine is down, and one model's engine
        # must not take the others down with it (the engine itself refuses with 503).
        if not self.started or self.draining:
            observer.on_rejected("unavailable")
            raise UnavailableError("the server is shutting down or not ready; retry elsewhere")
        trace = self.tracing.begin() if self.tracing is not None else None
        if trace is not None:
            req = job.request
            trace.start(job.served.model.name, len(req.seed_ids), req.max_new, req.cache_scope)
        events = job.served.engine.generate(job.request, idle_s)
        try:
            async for event in events:
                if trace is not None:
                    self._traced(trace, job, event)
                yield event
        except RefusedError as exc:
            if trace is not None:
                trace.answered(refused=exc.kind)
            raise self._refusal(exc, observer) from None
        except EngineUnavailableError as exc:
            observer.on_rejected("unavailable")
            raise UnavailableError(str(exc)) from None
        finally:
            await events.aclose()

    @staticmethod
    def _traced(trace: RequestTrace, job: Job, event: Event | None) -> None:
        if isinstance(event, Admitted):
            trace.answered()
        elif isinstance(event, Finished):
            status = job.served.engine.status
            trace.finished(event, status.pid if status is not None else None)

    @staticmethod
    def _refusal(exc: RefusedError, observer: ModelObserver) -> ServiceError:
        if exc.kind == "overloaded":
            observer.on_rejected("overloaded")
            return OverloadedError(exc.message, retry_after=exc.retry_after)
        if exc.kind == "invalid":
            return InvalidRequestError(exc.message)
        observer.on_rejected("unavailable")
        return UnavailableError(exc.message)

    async def collect(self, job: Job, events: AsyncGenerator[Event | None, None]) -> Reply:
        """Read the events to the end (a cancelled await cancels the request)."""
        reply = Reply(job)
        async with contextlib.aclosing(events):
            async for event in events:
                reply.add(event)
        return reply

    def summary(self, reply: Reply) -> GenerateResponse:
        """The JSON reply, also the SSE `done` event's data."""
        job = reply.job
        vocab = job.served.model.vocab
        text = vocab.decode(reply.ids)
        f = reply.finished or Finished(job.request.rid, "cancelled", None, len(reply.ids),
                                       job.request.submitted_at, None, time.perf_counter(), 0.0)
        continuation = None
        if f.final is not None:
            continuation = sign(Handle(
                model=job.served.model.name, model_id=model_id(job.served.model.meta),
                issued_at=time.time(), states=f.final.states, last_id=f.final.last_id,
                counter=f.final.counter, sampling=job.request.sampling,
                graph=job.served.engine.graph), self.continuation_key,
                scope=job.request.cache_scope)
        return GenerateResponse(
            continuation=continuation, model=job.served.model.name, text=text,
            finish_reason=f.reason,
            seed=job.request.sampling.seed, seed_text=job.seed_text,
            lowercased=job.lowercased,
            usage=Usage(seed_chars=len(job.seed_text), generated_chars=len(text)),
            timings=Timings(**f.timings()), error=f.error,
            details=(reply.char_details(reply.ids, reply.details) if job.request.details
                     else None),
        )
