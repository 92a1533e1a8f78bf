"""The engine loop: one model's EngineCore behind a ZeroMQ ROUTER socket.

The same loop serves both layouts: in its own process (`python -m app`, app/engine/process.py,
an `ipc://` socket) and on a thread beside the HTTP event loop (`uvicorn app.main:app`,
app/engine/client.py, an `inproc://` socket). Engine clients (app/engine/client.py) are DEALER
sockets: they send `GenerationRequest`, `Cancel`, `Abort` and `Hello`; each gets, per flush, one
`Outputs` message with the events of all its requests, and a `Status` heartbeat every
`heartbeat_s`, from which it judges the engine alive.

The loop never waits for anything but its own work: it polls the socket without blocking
while it has rows to advance, and sleeps on the socket only when idle.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq

from app.engine.batch import Sequence
from app.engine.core import EngineCore
from app.engine.messages import (
    Abort,
    Admitted,
    Cancel,
    Chars,
    Event,
    Finished,
    GenerationRequest,
    Outputs,
    Refused,
    Scored,
    Started,
    Status,
    encoder,
    to_engine,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopTimings:
    heartbeat_s: float = 0.1  # Status to every client, and the supervisor's heartbeat file
    # A client silent this long has died: its requests are cancelled and their rows freed.
    client_ttl_s: float = 5.0
    # A retiring engine (hot reload) exits once its clients have been silent this long: each
    # one closes its socket when its last request here has finished.
    retire_quiet_s: float = 1.0
    # Each flush costs every client ~tens of µs per stream woken (one SSE event each), so
    # flush at most every flush_s_per_stream x streams (between the bounds below): a few
    # characters per event for a few streams, more per event when many run. Finishes, first
    # characters and admissions go out at the end of the iteration that produced them, and
    # only they: the other streams' characters wait for the paced flush.
    flush_s_per_stream: float = 250e-6
    max_flush_interval_s: float = 0.05
    # ...and at least this often apart: a lone stream would otherwise get an event (an HTTP
    # write, a wake-up of its reader) per decode call, hundreds of microseconds apart, and
    # that work shares the machine with the engine.
    min_flush_interval_s: float = 0.003


def started(s: Sequence) -> Started | None:
    if s.first_at is None or s.admitted_at is None:
        return None
    return Started(s.admitted_at, s.first_at, s.prefill_s)


def router_socket(ctx: zmq.Context[zmq.Socket[bytes]], address: str) -> zmq.Socket[bytes]:
    """The engine's socket, bound. No high-water mark: a client's news is never dropped; a
    stalled client stops its heartbeat and is forgotten after `client_ttl_s` instead."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    return sock


class EngineLoop:
    def __init__(self, core: EngineCore, sock: zmq.Socket[bytes], provider: str, graph: str,
                 timings: LoopTimings | None = None) -> None:
        self.core = core
        self.sock = sock
        self.provider = provider
        self.graph = graph
        self.t = timings or LoopTimings()
        self.decode_graph = core.decode.files if core.decode else ""
        self.seqs: dict[tuple[bytes, int], Sequence] = {}
        self.clients: dict[bytes, float] = {}  # identity -> last heard from
        # News to send, by (client, rid): `urgent` at the end of this iteration (finishes,
        # first characters), `paced` at the next paced flush (more characters).
        self.urgent: dict[tuple[bytes, int], Sequence] = {}
        self.paced: dict[tuple[bytes, int], Sequence] = {}
        self.out: dict[bytes, list[Event]] = {}  # admissions and refusals, ahead of any news
        self.streams = 0
        self.cancel_seen = False
        self.last_flush = 0.0
        self.last_status = 0.0
        self.stopping = False
        self.alive_file: Path | None = None  # touched at every heartbeat (the supervisor's)
        self.retiring_since: float | None = None  # see retire()
        self.retire_grace_s = 0.0

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        core = self.core
        while not self.stopping:
            try:
                if poller.poll(0 if core.has_work else int(self.t.heartbeat_s * 1000)):
                    self._receive()
                if self.cancel_seen:
                    self.cancel_seen = False
                    core.cancel_flagged()
                if core.has_work:
                    core.iterate()
            except Exception:
                # Dying would take every client's requests down with it.
                core.recover()
            self._collect()
            now = time.perf_counter()
            interval = min(self.t.max_flush_interval_s, max(
                self.t.min_flush_interval_s, self.t.flush_s_per_stream * self.streams))
            if now - self.last_flush >= interval:
                self._flush(now)
            elif self.urgent or self.out:
                self._flush(now, everything=False)
            if now - self.last_status >= self.t.heartbeat_s:
                self._heartbeat(now)
            if self.retiring_since is not None and self._retired(now):
                break
        core.abort_all("cancelled", None)
        self._collect()
        self._flush(time.perf_counter())

    # --- in -------------------------------------------------------------------------------
    def _receive(self) -> None:
        now = time.perf_counter()
        while True:
            try:
                ident, payload = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = to_engine.decode(payload)
            except msgspec.DecodeError:
                log.error("dropped a malformed message from a client")
                continue
            self.clients[ident] = now
            if isinstance(msg, GenerationRequest):
                self._submit(ident, msg)
            elif isinstance(msg, Cancel):
                seq = self.seqs.get((ident, msg.rid))
                if seq is not None:
                    seq.cancel()
                    # Now, not after this batch of messages: a submission further on in it
                    # must find the row free.
                    self.core.cancel_flagged()
            elif isinstance(msg, Abort):
                for (client, _), seq in self.seqs.items():
                    if client == ident:
                        seq.cancel(msg.error)
                self.cancel_seen = True

    def _submit(self, ident: bytes, req: GenerationRequest) -> None:
        out = self.out.setdefault(ident, [])
        try:
            req.check()
            decision = self.core.admission(req)
        except Exception as exc:  # a request that cannot even be judged fails alone
            out.append(Refused(req.rid, "invalid", f"invalid generation parameters: {exc}"))
            return
        if decision.refusal is not None:
            out.append(Refused(req.rid, "overloaded", decision.refusal, decision.retry_after))
            return
        out.append(Admitted(req.rid))
        seq = Sequence(req, ident)
        self.seqs[(ident, req.rid)] = seq
        if req.stream:
            self.streams += 1
        self.core.submit(seq)

    # --- out ------------------------------------------------------------------------------
    def _collect(self) -> None:
        touched = self.core.touched
        if not touched:
            return
        self.core.touched = []
        for s in touched:
            root = s.parent or s  # a request with n choices is read as one, by its rid
            if root.req.stream or s.done:
                key = (s.client, s.req.rid)
                # A finish, and a stream's first characters, go out at the end of this
                # iteration: time to first character does not wait for the pacing. Only
                # those: the other streams' characters wait for the paced flush, so a busy
                # engine (requests ending every iteration) does not send every stream an
                # event per iteration.
                if s.done or s.sent == 0:
                    self.urgent[key] = root
                    self.paced.pop(key, None)
                elif key not in self.urgent:
                    self.paced[key] = root

    def _flush(self, now: float, everything: bool = True) -> None:
        """Send each client its news: the admissions, refusals and urgent news always, the
        other streams' characters when `everything` (the pacing interval has passed)."""
        out, self.out = self.out, {}
        news = self.urgent
        self.urgent = {}
        if everything:
            self.last_flush = now
            news.update(self.paced)
            self.paced = {}
        for (ident, _), root in news.items():
            events = self._events(root)
            if events:
                out.setdefault(ident, []).extend(events)
        for ident, events in out.items():
            self._send(ident, encoder.encode(Outputs(events)))

    def _events(self, root: Sequence) -> list[Event]:
        """A request's news: its scores once its prefill is done, then each choice's
        characters and finish (one choice unless it asked for n)."""
        events: list[Event] = []
        score = root.req.score
        if (score is not None and not root.scored_sent
                and root.prefilled >= len(root.seed)):
            root.scored_sent = True
            events.append(Scored(root.req.rid, score.start, root.score_lp,
                                 root.score_top if score.top else None))
        for s in root.children or [root]:
            events += self._choice_events(s)
        if root.family_done:
            if not root.children and isinstance(events[-1] if events else None, Finished):
                # It ended before fanning out (cancelled, failed, or scored only): every
                # choice ends the same way.
                last = events[-1]
                events += [msgspec.structs.replace(last, index=i) for i in range(1, root.req.n)]
            if self.seqs.pop((root.client, root.req.rid), None) is not None and root.req.stream:
                self.streams -= 1
        return events

    @staticmethod
    def _choice_events(s: Sequence) -> list[Event]:
        events: list[Event] = []
        n = len(s.ids)
        if n > s.sent:
            details = s.details[s.sent:n] if s.req.details else None
            events.append(Chars(s.req.rid, s.ids[s.sent:n], details,
                                started(s) if s.sent == 0 else None, s.index))
            s.sent = n
        if s.done and not s.finish_sent:
            s.finish_sent = True
            events.append(Finished(
                s.req.rid, s.finish_reason or "error", s.error, s.sampled, s.submitted_at,
                started(s), s.finished_at or time.perf_counter(), s.prefill_s, s.final,
                s.index))
        return events

    def _send(self, ident: bytes, payload: bytes) -> None:
        try:
            self.sock.send_multipart([ident, payload], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the client is gone (unroutable): nothing to tell
            log.debug("could not send to a client: %s", exc)

    def _heartbeat(self, now: float) -> None:
        self.last_status = now
        if self.alive_file is not None:
            # The supervisor's watchdog: a hung engine stops touching this and is restarted.
            self.alive_file.touch()
        core = self.core
        wait = core.policy.predict_wait() if core.has_work else 0.0
        if core.observer is not None:
            core.observer.on_estimate(wait, core.policy.chars_per_s)
        status = encoder.encode(Status(os.getpid(), self.provider, self.graph,
                                       self.decode_graph, len(core.waiting), core.active, wait,
                                       core.policy.chars_per_s))
        for ident, seen in list(self.clients.items()):
            if now - seen > self.t.client_ttl_s:
                self._forget(ident)
            else:
                self._send(ident, status)

    # --- retirement (hot reload) -----------------------------------------------------------
    def retire(self, grace_s: float) -> None:
        """A newer version of the model serves new requests: finish what runs here (still
        admitting what a client sends before it switches), exit when every client has let go,
        and at the latest after grace_s (CHARLSTM_DRAIN_S), ending the rest with an error."""
        if self.retiring_since is None:
            self.retiring_since = time.perf_counter()
            self.retire_grace_s = grace_s

    def _retired(self, now: float) -> bool:
        assert self.retiring_since is not None
        if now - self.retiring_since >= self.retire_grace_s:
            if self.seqs:
                log.warning("retiring: ending %d generation(s) still running after %g s",
                            len(self.seqs), self.retire_grace_s)
                self.core.abort_all("error", (
                    f"a new version of the model was loaded and this generation did not "
                    f"finish within the drain time ({self.retire_grace_s:g} s)"))
            return True
        quiet = all(now - seen > self.t.retire_quiet_s for seen in self.clients.values())
        return quiet and not self.seqs and not self.core.has_work

    def _forget(self, ident: bytes) -> None:
        """A client that stopped talking: free the rows of its requests."""
        del self.clients[ident]
        gone = [seq for (client, _), seq in self.seqs.items() if client == ident]
        for seq in gone:
            seq.cancel()
        if gone:
            log.warning("a client went silent; cancelling its %d request(s)", len(gone))
            self.cancel_seen = True
