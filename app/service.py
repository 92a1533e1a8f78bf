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
import math
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from app.artifact import ArtifactError, ModelMetadata, check_inside, read_metadata
from app.constraints import ConstraintCompiler, ConstraintError, ConstraintSpec
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
    Scored,
    Scoring,
    TopLogprobs,
    choice_seed,
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
    CharScore,
    FieldNames,
    GenerateRequest,
    GenerateResponse,
    ModelDetail,
    ModelInfo,
    ScoredAlternative,
    ScoreRequest,
    ScoreResponse,
    StateInfo,
    StructuredOutputs,
    Timings,
    Usage,
    shown,
)
from app.settings import Settings
from app.support import NEUTRAL_FIELDS, check_neutral
from app.tracing import RequestTrace, Tracing
from app.vocab import Vocabulary, normalize

log = logging.getLogger(__name__)

EMPTY_SEED_PRIMER = "\n"
NEUTRAL_NAMES = {f.name for f in NEUTRAL_FIELDS if not f.v1_only}
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


@dataclass(frozen=True)
class PendingConstraint:
    """A request's constraint, compiled in `open` on a worker thread (it may take a while)."""

    spec: ConstraintSpec
    banned: frozenset[str]  # characters logit_bias bans: the constraint must do without
    max_new_field: str  # what the caller calls max_new_chars, for the 422


@dataclass
class Job:
    """A checked request: its model and the one GenerationRequest the engine runs."""

    served: Served
    request: GenerationRequest
    seed_text: str  # as the model sees it
    lowercased: bool
    constraint: PendingConstraint | None = None
    n: int = 1  # choices returned: request.n, or fewer with best_of (the best of request.n)
    details: bool = False  # the caller asked for details (best_of asks the engine anyway)
    # Where the caller's own text starts in the seed ids: the primer of an empty seed, or a
    # /score context, comes before it.
    text_start: int = 0


class Choices:
    """The replies of one job, one per choice sampled, filled from its events in order."""

    def __init__(self, job: Job, base: int = 0) -> None:
        self.job = job
        self.base = base
        self.replies = [Reply(job, i) for i in range(job.request.n)]
        for r in self.replies:
            r.slot = base + r.index
        self.scored: Scored | None = None

    def add(self, event: Event | None) -> tuple[Reply, list[int], list[Detail] | None] | None:
        """Take one event; (the choice, its new ids, details) when it brought characters."""
        if isinstance(event, Scored):
            self.scored = event
            for r in self.replies:
                r.scored = event
            return None
        if isinstance(event, Chars | Finished):
            reply = self.replies[event.index]
            new = reply.add(event)
            return (reply, *new) if new is not None else None
        return None

    def returned(self) -> list[Reply]:
        """The choices the caller gets: all, or with best_of the n with the highest mean
        log-probability, best first (renumbered 0..n-1)."""
        if self.job.n == len(self.replies):
            return self.replies
        best = sorted(self.replies, key=lambda r: -r.logprob_mean)[:self.job.n]
        for rank, r in enumerate(best):
            r.slot = self.base + rank
        return best


class Reply:
    """What one choice's events add up to: the ids and details so far, and how it finished;
    the request's scores when it asked for them."""

    def __init__(self, job: Job, index: int = 0) -> None:
        self.job = job
        self.index = index  # the choice within its job
        self.slot = index  # the choice within the HTTP reply (prompt lists: job * n + index)
        self.ids: list[int] = []
        self.details: list[Detail] = []
        self.finished: Finished | None = None
        self.scored: Scored | None = None

    def add(self, event: Event | None) -> tuple[list[int], list[Detail] | None] | None:
        """Take one event; the new (ids, details) when it brought characters."""
        if isinstance(event, Chars):
            self.ids.extend(event.ids)
            if event.details is not None:
                self.details.extend(event.details)
            return event.ids, event.details
        if isinstance(event, Finished):
            self.finished = event
        elif isinstance(event, Scored):
            self.scored = event
        return None

    @property
    def logprob_mean(self) -> float:
        """Mean log-probability per generated character under the model (best_of's rank)."""
        if not self.details:
            return -math.inf
        return sum(math.log(max(d[0], 1e-45)) for d in self.details) / len(self.details)

    def char_details(self, ids: list[int], details: list[Detail]) -> list[CharDetail]:
        chars = self.job.served.model.vocab.chars
        return [CharDetail(char=chars[i], prob=p,
                           top=[Alternative(char=chars[t], prob=q) for t, q in top],
                           constrained_prob=c)
                for i, (p, top, c) in zip(ids, details, strict=False)]


def constraint_spec(so: StructuredOutputs) -> ConstraintSpec:
    if so.regex is not None:
        return ConstraintSpec.of("regex", so.regex)
    if so.choice is not None:
        return ConstraintSpec.of("choice", so.choice)
    if so.json_ is not None:
        return ConstraintSpec.of("json", so.json_)
    return ConstraintSpec.of("json_object", None)


def _positions(found: list[int], most: int = 5) -> str:
    more = f" and {len(found) - most} more" if len(found) > most else ""
    return ", ".join(map(str, found[:most])) + more


def unknown_at(text: str, unknown: list[str]) -> str:
    """'{' at 3, 17; '1' at 5: characters and their positions (0-based) in `text`."""
    at: dict[str, list[int]] = {c: [] for c in unknown}
    for pos, c in enumerate(text):
        if c in at:
            at[c].append(pos)
    parts = [f"{c!r} at {_positions(p)}" if p else repr(c) for c, p in list(at.items())[:20]]
    more = f"; and {len(unknown) - 20} more" if len(unknown) > 20 else ""
    return "; ".join(parts) + more


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


def sampling_from(body: BaseModel, seed: int, **checked: Any) -> Sampling:
    """The body's sampling fields, by name (a new one needs no copying code here), but those
    the service has translated (`checked`: logit_bias as ids)."""
    values = {f: getattr(body, f) for f in SAMPLING_FIELDS if f != "seed" and f not in checked}
    return Sampling(**values, **checked, seed=seed)


class ModelService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, Served] = {}
        self.continuation_key = (settings.continuation_key or secrets.token_hex(32)).encode()
        self.started = False
        self.draining = False
        # Set when the process is told to stop before it serves: start-up stops waiting.
        self.stop_starting = asyncio.Event()
        self.open_streams = 0  # SSE replies still being written (a drain waits for them)
        # Hot reload (engine processes only): the manifest generation served, and the
        # replaced versions still finishing their requests.
        self.generation = 0
        self.retiring: dict[EngineClient, asyncio.Task[None]] = {}
        self._sync_lock = asyncio.Lock()
        self.constraints = ConstraintCompiler()
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
        """Wait for every engine's first heartbeat; False at once if `stop_starting` is set
        meanwhile (a SIGTERM before serving: the engines may never come, as when the
        supervisor was killed, and there is nothing to drain)."""
        up: asyncio.Future[list[bool]] = asyncio.ensure_future(asyncio.gather(
            *(s.engine.wait_alive(timeout_s) for s in self.models.values())))
        stop: asyncio.Future[bool] = asyncio.ensure_future(self.stop_starting.wait())
        try:
            await asyncio.wait((up, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not up.done():
                up.cancel()
        return up.done() and not up.cancelled() and all(up.result())

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
        self.constraints.close()

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
    def model_text(self, served: Served, text: str, field: str) -> str:
        """`text` as the model sees it (lowercased, normalised as its corpus was), or a 422
        naming the characters it lacks and where they are."""
        vocab = served.model.vocab
        lower = served.model.meta.lowercase
        form = served.model.meta.normalization
        seen = normalize(text.lower() if lower else text, form)
        unknown = (vocab.unknown_lowercased(text) if lower and form is None
                   else vocab.unknown(seen))
        if unknown:
            # Positions in what the caller sent; a character that only appears after
            # normalisation is named without one.
            where = text if any(c in text for c in unknown) else seen
            raise InvalidRequestError(
                f"{field} has characters not in the vocabulary of model "
                f"{served.model.name!r}: {unknown_at(where, unknown)}")
        return seen

    @staticmethod
    def text_from_ids(served: Served, ids: list[int], field: str) -> str:
        """Token ids (a token is a character; the ids are the model's own) as text, or a 422
        naming the ids outside the vocabulary and their positions."""
        size = len(served.model.vocab)
        bad: dict[int, list[int]] = {}
        for pos, i in enumerate(ids):
            if not 0 <= i < size:
                bad.setdefault(i, []).append(pos)
        if bad:
            shown_ids = "; ".join(f"{i} at {_positions(p)}" for i, p in list(bad.items())[:20])
            raise InvalidRequestError(
                f"{field} has token ids outside the vocabulary of model {served.model.name!r} "
                f"(ids 0 to {size - 1}, one per character; GET /tokenizer_info lists them): "
                f"{shown_ids}")
        return served.model.vocab.decode(ids)

    def prepare(self, body: GenerateRequest, stream: bool = False,
                names: FieldNames = NATIVE_NAMES, scope: bytes = b"",
                prompt_ids: list[int] | None = None, score_top: int | None = None,
                min_new: int = 1) -> Job:
        """Check the request against this server's limits and the model's vocabulary, and
        build its GenerationRequest; messages name the fields as the caller does (`names`).
        `prompt_ids`: the seed as the model's own ids (used as they are). `score_top`: score
        the seed in prefill (echo), with that many alternatives per character. `min_new`: 0
        lets a request generate nothing (/v1's max_tokens 0)."""
        check_neutral(body.model_dump(include=NEUTRAL_NAMES))
        if body.continuation is not None:
            if body.structured_outputs is not None:
                raise InvalidRequestError(
                    "a continuation goes on as the request it continues; do not send "
                    "structured_outputs with it")
            return self._prepare_continuation(body, stream, names, scope)
        served = self.get(body.model)
        s = self.settings
        vocab = served.model.vocab
        if prompt_ids is not None:
            seed_text = self.text_from_ids(served, prompt_ids, names.seed_text)
        else:
            seed_text = self.model_text(served, body.seed_text, names.seed_text)
        if len(seed_text) > s.max_seed_chars:
            raise InvalidRequestError(
                f"{names.seed_text} must have at most {s.max_seed_chars} characters, "
                f"got {len(seed_text)}")
        primer = seed_text or self.primer(served)
        n, rows = self._choices(body, stream)
        bias, banned = self._logit_bias(body, served, names)
        request = GenerationRequest(
            seed_ids=vocab.encode(primer).tolist(),
            max_new=self._max_new(body, names, low=min_new),
            sampling=sampling_from(body, body.seed if body.seed is not None
                                   else secrets.randbits(63), logit_bias=bias),
            stop=self._stops(body, served), time_limit_s=self._time_limit(body),
            details=body.details or rows > n, stream=stream,
            resumable=self._check_resumable(body, served), cache_scope=scope,
            score=Scoring(start=1, top=score_top) if score_top is not None else None, n=rows)
        lowered = (prompt_ids is None and served.model.meta.lowercase
                   and body.seed_text.lower() != body.seed_text)
        return Job(served, request, seed_text, lowered, n=n, details=body.details,
                   text_start=0 if seed_text else len(primer),
                   constraint=self._constraint(body, banned, names))

    @staticmethod
    def _logit_bias(body: GenerateRequest, served: Served, names: FieldNames
                    ) -> tuple[tuple[tuple[int, float], ...], frozenset[str]]:
        """logit_bias as (id, bias) pairs, and the characters it bans (-100)."""
        if not body.logit_bias:
            return (), frozenset()
        chars = served.model.vocab.chars
        index = {c: i for i, c in enumerate(chars)}
        pairs: dict[int, float] = {}
        unknown: list[str] = []
        for key, value in body.logit_bias.items():
            if names.bias_by_id and key.isascii() and key.isdigit():
                i = int(key) if len(key) < 12 else len(chars)
                if i >= len(chars):
                    unknown.append(f"id {key[:12]}")
                    continue
            elif key in index:
                i = index[key]
            else:
                unknown.append(repr(key[:20]))
                continue
            pairs[i] = float(value)
        if unknown:
            what = f"token ids in [0, {len(chars)}) or characters" if names.bias_by_id \
                else "characters"
            raise InvalidRequestError(
                f"logit_bias keys must be {what} of model {served.model.name!r}'s vocabulary; "
                f"unknown: {', '.join(unknown[:20])}")
        banned = frozenset(chars[i] for i, b in pairs.items() if b <= -100)
        if len(banned) == len(chars):
            raise InvalidRequestError("logit_bias bans every character of the vocabulary")
        return tuple(sorted(pairs.items())), banned

    def _constraint(self, body: GenerateRequest, banned: frozenset[str], names: FieldNames
                    ) -> PendingConstraint | None:
        so = body.structured_outputs
        if so is None:
            return None
        if body.resumable:
            raise InvalidRequestError(
                "resumable cannot be combined with structured_outputs: a continuation would "
                "need the constraint's state")
        try:
            return PendingConstraint(constraint_spec(so), banned, names.max_new_chars)
        except ConstraintError as exc:
            raise InvalidRequestError(f"structured_outputs: {exc}") from None

    async def _compile(self, job: Job) -> None:
        """Compile the job's constraint (cached by key, else on a worker thread with a
        deadline): 422 when it cannot be used or needs more characters than allowed."""
        pending = job.constraint
        if pending is None or job.request.constraint is not None:
            return
        try:
            compiled = await self.constraints.compile(
                pending.spec, job.served.model.vocab.chars, pending.banned)
        except ConstraintError as exc:
            raise InvalidRequestError(f"structured_outputs: {exc}") from None
        if compiled.shortest > job.request.max_new:
            raise InvalidRequestError(
                f"structured_outputs: the shortest text the constraint accepts has "
                f"{compiled.shortest} characters, more than {pending.max_new_field} "
                f"({job.request.max_new})")
        job.request.constraint = compiled.constraint

    @staticmethod
    def primer(served: Served) -> str:
        """What an empty seed starts from: a newline (the start of a passage), or the first
        character of a vocabulary without one. Context, never scored nor echoed."""
        chars = served.model.vocab.chars
        return EMPTY_SEED_PRIMER if EMPTY_SEED_PRIMER in chars else chars[0]

    def _choices(self, body: GenerateRequest, stream: bool) -> tuple[int, int]:
        """(choices returned, rows sampled): n, and best_of when it asks for more."""
        s = self.settings
        bound = min(s.max_n, s.max_batch)
        n, best_of = body.n, body.best_of
        rows = n if best_of is None else best_of
        for name, v in (("n", n), ("best_of", rows)):
            if v > bound:
                raise InvalidRequestError(
                    f"{name} must be at most {bound} on this server (CHARLSTM_MAX_N, and "
                    f"CHARLSTM_MAX_BATCH rows), got {shown(v)}")
        if rows < n:
            raise InvalidRequestError(f"best_of must be at least n ({n}), got {rows}")
        if rows > n and stream:
            raise InvalidRequestError(
                "best_of cannot be streamed: the best choices are known only when all have "
                "finished; send stream false, or best_of equal to n")
        return n, rows

    def _max_new(self, body: GenerateRequest, names: FieldNames, low: int = 1) -> int:
        s = self.settings
        max_new = body.max_new_chars if body.max_new_chars is not None else s.default_new_chars
        if not low <= max_new <= s.max_new_chars:
            raise InvalidRequestError(
                f"{names.max_new_chars} must be in [{low}, {s.max_new_chars}], got "
                f"{shown(max_new)}")
        return max_new

    def prepare_score(self, body: ScoreRequest, scope: bytes = b"") -> Job:
        """/score: the text after its context (or the primer) as a seed scored in prefill
        from its first character on, and nothing generated."""
        served = self.get(body.model)
        text = self.model_text(served, body.text, "text")
        context = self.model_text(served, body.context, "context")
        prefix = context or self.primer(served)
        if len(prefix) + len(text) > self.settings.max_seed_chars:
            raise InvalidRequestError(
                f"context and text must have at most {self.settings.max_seed_chars} "
                f"characters together, got {len(prefix) + len(text)}")
        vocab = served.model.vocab
        request = GenerationRequest(
            seed_ids=vocab.encode(prefix + text).tolist(), max_new=0,
            time_limit_s=self.settings.time_limit_s, cache_scope=scope,
            score=Scoring(start=len(prefix), top=body.top))
        return Job(served, request, context + text, False, text_start=len(prefix))

    def score_summary(self, job: Job, choices: Choices) -> ScoreResponse:
        reply = choices.replies[0]
        f = reply.finished
        if f is None or f.error is not None or choices.scored is None:
            raise UnavailableError(f"could not score the text: "
                                   f"{f.error if f is not None else 'cancelled'}")
        chars = job.served.model.vocab.chars
        scored = choices.scored
        text = job.seed_text[len(job.seed_text) - len(scored.logprobs):]
        tops: list[TopLogprobs | None] = (list(scored.top) if scored.top is not None
                                          else [None] * len(text))
        total = math.fsum(scored.logprobs)
        mean = -total / len(text)
        return ScoreResponse(
            model=job.served.model.name, text=text,
            context=job.seed_text[:len(job.seed_text) - len(text)], chars=len(text),
            total_logprob=total, mean_nats=mean, bits_per_char=mean / math.log(2),
            perplexity=math.exp(mean),
            logprobs=[CharScore(char=c, logprob=lp, top=None if top is None else [
                ScoredAlternative(char=chars[t], logprob=v) for t, v in top])
                for c, lp, top in zip(text, scored.logprobs, tops, strict=True)],
            timings=Timings(**f.timings()))

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
        await self._compile(job)  # 422 here, before the engine sees the request
        events = self.generate(job, idle_s)
        try:
            await anext(events)  # Admitted
        except BaseException:
            await events.aclose()
            raise
        return events

    async def open_all(self, jobs: list[Job], idle_s: float | None = None
                       ) -> list[tuple[Job, AsyncGenerator[Event | None, None]]]:
        """Every job's events once all are admitted, in order, so each admission sees the
        rows of the jobs before it; when one is refused, those admitted are cancelled and
        the refusal is the reply (a reply is all its choices or none)."""
        opened: list[tuple[Job, AsyncGenerator[Event | None, None]]] = []
        try:
            for job in jobs:
                opened.append((job, await self.open(job, idle_s)))
        except BaseException:
            for _, events in opened:
                await events.aclose()
            raise
        return opened

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

    async def collect(self, job: Job, events: AsyncGenerator[Event | None, None]) -> Choices:
        """Read the events to the end (a cancelled await cancels the request)."""
        choices = Choices(job)
        async with contextlib.aclosing(events):
            async for event in events:
                choices.add(event)
        return choices

    def summary(self, reply: Reply) -> GenerateResponse:
        """The JSON reply (of one choice), also the SSE `done` event's data."""
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
            seed=choice_seed(job.request.sampling.seed, reply.index), seed_text=job.seed_text,
            lowercased=job.lowercased,
            usage=Usage(seed_chars=len(job.seed_text), generated_chars=len(text)),
            timings=Timings(**f.timings()), error=f.error,
            details=(reply.char_details(reply.ids, reply.details) if job.details
                     else None),
            index=reply.slot,
            logprob_mean=reply.logprob_mean if job.request.n > job.n else None,
        )
