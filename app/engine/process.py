"""An engine process: one model's EngineCore behind a ZeroMQ ROUTER socket.

The loop never waits for anything but its own work: it polls the socket without blocking
while it has rows to advance, and sleeps on the socket only when idle. HTTP workers are
DEALER sockets; each gets, per flush, one `Outputs` message with the news of all its
requests, and a `Status` heartbeat every HEARTBEAT_S, from which it judges the engine alive.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import msgspec
import numpy as np
import zmq

from app.artifact import ArtifactError
from app.continuation import states_from_bytes, states_to_bytes
from app.decode import load_served
from app.engine.core import EngineCore, GenerationParams, Sequence
from app.engine.messages import (
    Abort,
    Admission,
    Cancel,
    Delta,
    Finish,
    Hello,
    Outputs,
    Status,
    Submit,
    encoder,
    to_engine,
)
from app.lifecycle import alive_file, die_with_parent
from app.metrics import Metrics
from app.settings import Settings

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.1
# A worker silent this long has died: its requests are cancelled and their rows freed.
CLIENT_TTL_S = 5.0
# A retiring engine (hot reload) exits once its workers have been silent this long: each one
# closes its socket when its last request here has finished.
RETIRE_QUIET_S = 1.0


class _Remote(Sequence):
    """A sequence and where its news goes."""

    def __init__(self, params: GenerationParams, submitted_at: float, client: bytes,
                 rid: int) -> None:
        super().__init__(params, submitted_at)
        self.client = client
        self.rid = rid
        self.sent = 0  # ids already sent
        self.details_sent = 0


class EngineLoop:
    # Same pacing as the thread driver: each flush costs every worker ~tens of µs per stream
    # woken, so flush at most every 250 µs x streams (capped at 20 ms): one character per
    # event for a few streams, several per event when many run. Finishes and admissions go
    # out at the end of the iteration that produced them.
    FLUSH_S_PER_STREAM = 250e-6
    MAX_FLUSH_INTERVAL_S = 0.02

    def __init__(self, core: EngineCore, sock: zmq.Socket[bytes], provider: str,
                 graph: str) -> None:
        self.core = core
        self.sock = sock
        self.provider = provider
        self.graph = graph
        self.decode_graph = core.decode.files if core.decode else ""
        self.seqs: dict[tuple[bytes, int], _Remote] = {}
        self.clients: dict[bytes, float] = {}  # identity -> last heard from
        self.news: dict[bytes, dict[int, _Remote]] = {}
        self.admissions: dict[bytes, list[Admission]] = {}
        self.streams = 0
        self.cancel_seen = False
        self.urgent = False  # a finish or an admission is waiting to be sent
        self.last_flush = 0.0
        self.last_status = 0.0
        self.stopping = False
        self.alive_file: Path | None = None
        self.retiring_since: float | None = None  # see retire()
        self.retire_grace_s = 0.0

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        core = self.core
        while not self.stopping:
            busy = core.has_work
            try:
                if poller.poll(0 if busy else int(HEARTBEAT_S * 1000)):
                    self._receive()
                if self.cancel_seen:
                    self.cancel_seen = False
                    core.cancel_flagged()
                if core.has_work:
                    core.iterate()
            except Exception:
                # Dying would take every worker's requests down with it.
                core.recover()
            self._collect()
            now = time.perf_counter()
            interval = min(self.MAX_FLUSH_INTERVAL_S, self.FLUSH_S_PER_STREAM * self.streams)
            if self.urgent or now - self.last_flush >= interval:
                self._flush(now)
            if now - self.last_status >= HEARTBEAT_S:
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
                log.error("dropped a malformed message from a worker")
                continue
            self.clients[ident] = now
            if isinstance(msg, Submit):
                self._submit(ident, msg)
            elif isinstance(msg, Cancel):
                seq = self.seqs.get((ident, msg.rid))
                if seq is not None:
                    seq.cancelled = True
                    # Now, not after this batch of messages: a submission further on in it
                    # must find the row free.
                    self.core.cancel_flagged()
            elif isinstance(msg, Abort):
                for (client, _), seq in self.seqs.items():
                    if client == ident:
                        seq.cancelled, seq.abort_error = True, msg.error
                self.cancel_seen = True
            elif isinstance(msg, Hello):
                pass

    def _submit(self, ident: bytes, m: Submit) -> None:
        try:
            params = GenerationParams(
                seed_ids=np.array(m.seed_ids, np.int32), max_new=m.max_new,
                temperature=m.temperature, top_k=m.top_k, top_p=m.top_p, seed=m.seed,
                stop=[tuple(s) for s in m.stop], time_limit_s=m.time_limit_s,
                details=m.details, stream=m.stream,
                initial_states=None if m.initial_states is None else states_from_bytes(
                    m.initial_states),
                counter_start=m.counter_start, resumable=m.resumable,
                cache_scope=m.cache_scope[:64])
            _, refusal, retry = self.core.admission(params)
        except Exception as exc:  # a request that cannot even be judged fails alone
            log.exception("could not admit a request")
            refusal, retry = f"invalid generation parameters ({type(exc).__name__})", 1
            params = None
        self.admissions.setdefault(ident, []).append(Admission(m.rid, refusal, retry))
        self.urgent = True
        if refusal is not None or params is None:
            return
        seq = _Remote(params, m.submitted_at, ident, m.rid)
        self.seqs[(ident, m.rid)] = seq
        if params.stream:
            self.streams += 1
        self.core.submit(seq)

    # --- out ------------------------------------------------------------------------------
    def _collect(self) -> None:
        touched = self.core.touched
        if not touched:
            return
        self.core.touched = []
        for s in touched:
            if s.params.stream or s.done:
                r: _Remote = s  # type: ignore[assignment]  # this loop submits only _Remote
                self.news.setdefault(r.client, {})[r.rid] = r
                if s.done:
                    self.urgent = True

    def _flush(self, now: float) -> None:
        self.last_flush = now
        self.urgent = False
        for ident, adms in self.admissions.items():
            for a in adms:
                self._send(ident, encoder.encode(a))
        self.admissions = {}
        news, self.news = self.news, {}
        for ident, seqs in news.items():
            deltas = [self._delta(s) for s in seqs.values()]
            self._send(ident, encoder.encode(Outputs(deltas)))

    def _delta(self, s: _Remote) -> Delta:
        ids = s.ids[s.sent:]
        s.sent = len(s.ids)
        details = None
        if s.params.details:
            details = [(d.prob, d.top) for d in s.details[s.details_sent:]]
            s.details_sent = len(s.details)
        finish = None
        if s.done:
            finish = Finish(s.finish_reason or "error", s.error, s.sampled, s.admitted_at,
                            s.first_at, s.finished_at or time.perf_counter(), s.prefill_s)
            if s.final is not None:
                finish.final_states = states_to_bytes(s.final[0])
                finish.final_id, finish.final_counter = s.final[1], s.final[2]
            if self.seqs.pop((s.client, s.rid), None) is not None and s.params.stream:
                self.streams -= 1
        return Delta(s.rid, ids, details, finish)

    def _send(self, ident: bytes, payload: bytes) -> None:
        try:
            self.sock.send_multipart([ident, payload], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the worker is gone (unroutable): nothing to tell
            log.debug("could not send to a worker: %s", exc)

    def _heartbeat(self, now: float) -> None:
        self.last_status = now
        if self.alive_file is not None:
            # The supervisor's watchdog: a hung engine stops touching this and is restarted.
            self.alive_file.touch()
        core = self.core
        wait = core.predict_wait() if core.has_work else 0.0
        if core.observer is not None:
            core.observer.on_estimate(wait, core.chars_per_s)
        status = encoder.encode(Status(os.getpid(), self.provider, self.graph,
                                       self.decode_graph, len(core.waiting), core.active, wait,
                                       core.chars_per_s))
        for ident, seen in list(self.clients.items()):
            if now - seen > CLIENT_TTL_S:
                self._forget(ident)
            else:
                self._send(ident, status)

    # --- retirement (hot reload) -----------------------------------------------------------
    def retire(self, grace_s: float) -> None:
        """A newer version of the model serves new requests: finish what runs here (still
        admitting what a worker sends before it switches), exit when every worker has let go,
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
        quiet = all(now - seen > RETIRE_QUIET_S for seen in self.clients.values())
        return quiet and not self.seqs and not self.core.has_work

    def _forget(self, ident: bytes) -> None:
        """A worker that stopped talking: free the rows of its requests."""
        del self.clients[ident]
        gone = [seq for (client, _), seq in self.seqs.items() if client == ident]
        for seq in gone:
            seq.cancelled = True
        if gone:
            log.warning("a worker went silent; cancelling its %d request(s)", len(gone))
            self.cancel_seen = True


def main(model_dir: Path, address: str, settings: Settings,
         reason_file: Path | None = None) -> None:
    """Entry point of the engine process for one model (started by app.supervisor).
    reason_file: where to write why the model cannot be loaded (else stderr)."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop_ref: list[EngineLoop] = []
    retire_asked: list[bool] = []

    def stop(sig: int, frame: FrameType | None) -> None:
        if not loop_ref:  # still loading the model: nothing to finish
            raise SystemExit(0)
        for loop in loop_ref:
            loop.stopping = True

    def retire(sig: int, frame: FrameType | None) -> None:
        retire_asked.append(True)
        for loop in loop_ref:
            loop.retire(settings.drain_s)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, retire)
    die_with_parent()
    # Ctrl-C and a terminal's hangup reach the whole process group: the supervisor decides
    # when engines stop, and what a SIGHUP means (a reload).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        model, decode = load_served(model_dir, settings)
    except ArtifactError as exc:
        # The supervisor sees the exit code and stops start-up (or refuses a reload); this
        # is the reason.
        if reason_file is not None:
            reason_file.write_text(str(exc), encoding="utf-8")
        else:
            print(f"error: cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    observer = Metrics().observer(model.name)
    core = EngineCore(model, observer=observer, decode=decode, **settings.engine_limits())
    core.calibrate()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    # No high-water mark: a worker's news is never dropped; a stalled worker stops its
    # heartbeat and is forgotten after CLIENT_TTL_S instead.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    loop = EngineLoop(core, sock, model.provider, model.graph_file)
    loop.alive_file = alive_file(address)
    loop_ref.append(loop)
    if retire_asked:
        loop.retire(settings.drain_s)
    log.info("engine for %s ready on %s (pid %d, %s)", model.name, address, os.getpid(),
             core.graph_files)
    try:
        loop.run()
    finally:
        sock.close()
        ctx.term()
