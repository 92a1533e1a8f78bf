"""Hot reload, the supervisor's side: model folders -> versions -> engine processes -> the
manifest the HTTP workers follow (app/manifest.py).

A reload round starts on a change in the models folder (watchfiles), on SIGHUP, or on
POST /admin/reload. It looks at every visible model folder (names starting with "." are
exports in progress, never looked at) and, for each new or changed one:

1. checks it as start-up does (model.json valid, its graph a regular file inside the folder);
2. copies model.json and the graphs it lists into the run folder: a snapshot, which is what
   the engine loads, what workers read the vocabulary from, and what a restart after a crash
   loads again, whatever happens to the folder meanwhile;
3. starts an engine process on the snapshot at a new address (<model>.<version>.sock); it
   loads and warms the model beside the version serving, and binds its socket once warm
   (or exits 2, and says why);
4. once it is up, writes the manifest: workers send new requests there.

The version it replaced retires (SIGUSR1): it finishes the generations it is running and exits
once every worker has let go of it, at the latest after CHARLSTM_DRAIN_S. A folder that fails
a step is refused, named in the log with its reason, and the version serving keeps serving; it
is tried again once it changes.

A folder that disappears stops being served once it has been gone for REMOVE_AFTER_S (a
folder replaced by hand rather than by rename may be missing for a moment); its running
generations finish as on a reload. The default model is never removed: requests that name no
model keep being served from its snapshot until the folder is back or the service restarts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from app.artifact import (
    MAX_METADATA_BYTES,
    METADATA_FILE,
    ArtifactError,
    ModelMetadata,
    check_inside,
    copy_artifact_file,
    read_artifact_file,
    read_metadata,
)
from app.engine.client import engine_address
from app.manifest import (
    Manifest,
    Refusal,
    ReloadReport,
    ServedVersion,
    VersionInfo,
    write_manifest,
)
from app.runtime import check_graph_file

log = logging.getLogger("app.reload")

REMOVE_AFTER_S = 2.0
# A retiring engine ends what it still runs at CHARLSTM_DRAIN_S and exits; past this margin
# beyond the drain it is killed.
RETIRE_KILL_MARGIN_S = 10.0


class EngineProcess(Protocol):
    """The part of multiprocessing's Process this module uses (tests pass fakes)."""

    @property
    def name(self) -> str: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def exitcode(self) -> int | None: ...
    def is_alive(self) -> bool: ...
    def kill(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


class EngineHost(Protocol):
    """The supervisor, as this module sees it."""

    def launch_engine(self, version: Version) -> EngineProcess: ...
    def engine_exited(self, proc: EngineProcess) -> None: ...


@dataclass
class Version:
    """One model folder as loaded at one moment, and the engine process serving it."""

    name: str
    number: int
    source: Path  # the folder in the models folder
    snapshot: Path  # <run dir>/snapshots/<name>.<number>/<name>: what the engine loads
    run_dir: Path
    fingerprint: str
    created: str
    proc: EngineProcess | None = None
    started_at: float = 0.0
    retiring_since: float | None = None

    @property
    def label(self) -> str:
        return f"{self.name} version {self.number}"

    @property
    def address(self) -> str:
        return engine_address(self.run_dir, f"{self.name}.{self.number}")

    @property
    def sock_path(self) -> Path:
        """Exists once the engine has loaded and warmed the model (it binds last)."""
        return self.run_dir / f"{self.name}.{self.number}.sock"

    @property
    def reason_path(self) -> Path:
        """Where the engine writes why it could not load the model."""
        return self.run_dir / f"{self.name}.{self.number}.refused"

    def served(self) -> ServedVersion:
        return ServedVersion(name=self.name, version=self.number, address=self.address,
                             dir=self.snapshot, source=self.source, created=self.created)

    def load_error(self) -> str:
        """The engine's reason, naming the folder rather than the snapshot."""
        try:
            reason = self.reason_path.read_text(encoding="utf-8").strip()
        except OSError:
            code = self.proc.exitcode if self.proc is not None else None
            return f"its engine process exited with code {code} while loading it"
        return reason.replace(str(self.snapshot), str(self.source))

    def discard(self) -> None:
        shutil.rmtree(self.snapshot.parent, ignore_errors=True)
        self.sock_path.unlink(missing_ok=True)
        self.reason_path.unlink(missing_ok=True)


class FolderChangedError(Exception):
    """The folder changed while it was being copied; the round after this one copies it again."""


# --- the folder -----------------------------------------------------------------------------

def visible_folders(models_dir: Path) -> list[Path]:
    """Model folders as app.service.discover sees them, without its refusals: one bad folder
    refuses that folder only, and an empty models folder is not an error while serving."""
    return sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def fingerprint(folder: Path) -> str:
    """What a reload compares: model.json's bytes and the size and time of every graph. A
    folder replaced by rename, a model.json rewritten, a graph re-quantized all change it.

    It runs on the supervisor's loop, before check_folder, so it reads model.json as start-up
    does (app.artifact.read_artifact_file): refused by stat when it is not a regular file
    inside the models folder, never opened in a way that can block (a FIFO would stop the loop:
    no reload answered, no engine restarted, no SIGTERM handled), never read past
    MAX_METADATA_BYTES. A refused model.json counts by its refusal and its stat, so the
    folder is refused once, and looked at again when that file changes."""
    h = hashlib.sha256()
    path = folder / METADATA_FILE
    try:
        h.update(read_artifact_file(path, folder.parent, MAX_METADATA_BYTES))
    except FileNotFoundError:
        h.update(b"no model.json")
    except ArtifactError as exc:
        h.update(f"refused: {exc}; {_lstat_key(path)}".encode())
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.endswith(".onnx") and not entry.name.startswith("."):
            st = entry.stat()
            h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino};".encode())
    return h.hexdigest()


def _lstat_key(path: Path) -> str:
    try:
        st = path.lstat()
    except OSError as exc:
        return type(exc).__name__
    return f"{st.st_mode}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def model_files(meta: ModelMetadata) -> list[str]:
    """The files a model is served from: model.json, its graphs, its decode graphs."""
    names = [METADATA_FILE, *meta.graph_files(), *(d.file for d in meta.decode_graphs)]
    return list(dict.fromkeys(names))


def check_folder(folder: Path, models_dir: Path) -> ModelMetadata:
    """The start-up checks (app.supervisor.main): the engine's own load does the rest."""
    check_inside(folder, models_dir)
    meta = read_metadata(folder)
    check_graph_file(folder, meta.onnx.file)
    return meta


def take_snapshot(folder: Path, meta: ModelMetadata, dest: Path) -> None:
    """Copy the model's files (not whatever else the folder holds) into dest. A listed file
    that is missing is left out: the engine names it if it is the graph it serves."""
    dest.mkdir(parents=True)
    for name in model_files(meta):
        src = folder / name
        try:
            copy_artifact_file(src, dest / name, folder.parent)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ArtifactError(f"{src}: cannot be copied: {exc}") from None
    shutil.copystat(folder, dest)  # its time is /v1/models' `created`


# --- rounds ---------------------------------------------------------------------------------

@dataclass
class _Round:
    requesters: list[bytes] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


class Reloader:
    """The versions of every model and their engine processes, for the supervisor's loop:
    `tick` advances rounds, promotions and retirements without ever blocking on an engine."""

    def __init__(self, host: EngineHost, models_dir: Path, run_dir: Path, default_model: str,
                 drain_s: float, start_timeout_s: float = 300.0) -> None:
        self.host = host
        self.models_dir = models_dir
        self.run_dir = run_dir
        self.default_model = default_model
        self.drain_s = drain_s
        self.start_timeout_s = start_timeout_s  # CHARLSTM_ENGINE_START_TIMEOUT_S
        self.current: dict[str, Version] = {}  # serving: in the manifest
        self.loading: dict[str, Version] = {}  # engines loading a new version
        self.retiring: list[Version] = []
        self.refused: dict[str, tuple[str, Refusal]] = {}  # name -> (fingerprint, why)
        self.missing_since: dict[str, float] = {}
        self.generation = 0
        self.wanted = threading.Event()  # set by the folder watcher and by SIGHUP
        self.requesters: list[bytes] = []  # waiting for the next round's report
        self.round: _Round | None = None
        self.recheck_at: float | None = None

    # --- start-up -------------------------------------------------------------------------
    def start(self, folders: list[Path]) -> None:
        """Version 1 of every folder (already checked by the caller); the engines start."""
        for folder in folders:
            fp = fingerprint(folder)
            try:
                version = self._prepare(folder, check_folder(folder, self.models_dir), fp, 1)
            except FolderChangedError:
                raise ArtifactError(f"{folder}: changed while the service was starting; "
                                    "start it again") from None
            self._launch(version)
            self.current[version.name] = version

    def restart(self, version: Version) -> None:
        """The same version again (its engine died): same snapshot, same address."""
        self._launch(version)

    def publish(self) -> None:
        self.generation += 1
        write_manifest(self.run_dir, Manifest(
            generation=self.generation,
            models={n: v.served() for n, v in sorted(self.current.items())}))

    # --- requests -------------------------------------------------------------------------
    def request(self, requester: bytes) -> None:
        """A reload asked for over the control socket; answered when its round ends."""
        self.requesters.append(requester)

    def tick(self, now: float) -> list[tuple[bytes, ReloadReport]]:
        """Advance everything by one look; returns the reports due to requesters.

        A round lasts until every engine it started has loaded or failed, and every folder
        found missing has been looked for again after REMOVE_AFTER_S. Changes and requests
        that come meanwhile wait for the next round: it looks at the folder again."""
        if self.round is None and (self.wanted.is_set() or self.requesters):
            self.wanted.clear()
            self.round = _Round(requesters=self.requesters)
            self.requesters = []
            self._scan(now)
        elif self.round is not None and self.recheck_at is not None and now >= self.recheck_at:
            self.recheck_at = None
            self._scan(now)
        for version in list(self.loading.values()):
            self._check_loading(version, now)
        self._reap(now)
        if self.round is not None and not self.loading and self.recheck_at is None:
            done, self.round = self.round, None
            report = self.report(done)
            return [(r, report) for r in done.requesters]
        return []

    def report(self, done: _Round | None = None) -> ReloadReport:
        return ReloadReport(
            models=[VersionInfo(name=v.name, version=v.number, created=v.created,
                                folder=str(v.source)) for _, v in sorted(self.current.items())],
            loaded=done.loaded if done else [], removed=done.removed if done else [],
            refused=[r for _, (_, r) in sorted(self.refused.items())])

    # --- one round ------------------------------------------------------------------------
    def _scan(self, now: float) -> None:
        try:
            folders = visible_folders(self.models_dir)
        except OSError as exc:
            log.error("reload: cannot read the models folder %s (%s); serving what is loaded",
                      self.models_dir, exc)
            return
        present = {f.name for f in folders}
        for folder in folders:
            self.missing_since.pop(folder.name, None)
            self._consider(folder)
        for name in list(self.refused):
            if name not in present:
                del self.refused[name]
        for name in sorted(set(self.current) - present):
            self._missing(name, now)

    def _consider(self, folder: Path) -> None:
        name = folder.name
        try:
            fp = fingerprint(folder)
        except OSError as exc:
            self._refuse(name, folder, f"{folder}: cannot be read: {exc}", None)
            return
        loading = self.loading.get(name)
        if loading is not None:  # looked at again within its round (a removal's second look)
            if loading.fingerprint != fp:
                self.wanted.set()  # changed while loading: the next round looks again
            return
        current = self.current.get(name)
        if current is not None and current.fingerprint == fp:
            self.refused.pop(name, None)  # put back as it was
            return
        earlier = self.refused.get(name)
        if earlier is not None and earlier[0] == fp:
            return  # refused before and unchanged: the log said why
        try:
            meta = check_folder(folder, self.models_dir)
            number = max([v.number for v in self._versions_of(name)], default=0) + 1
            version = self._prepare(folder, meta, fp, number)
        except ArtifactError as exc:
            self._refuse(name, folder, str(exc), fp)
            return
        except FolderChangedError:
            log.info("reload: %s changed while it was being copied; looking again", folder)
            self.wanted.set()
            return
        log.info("reload: loading %s from %s beside %s", version.label, folder,
                 current.label if current else "nothing (a new model)")
        self._launch(version)
        self.loading[name] = version

    def _prepare(self, folder: Path, meta: ModelMetadata, fp: str, number: int) -> Version:
        snapshot = self.run_dir / "snapshots" / f"{folder.name}.{number}" / folder.name
        shutil.rmtree(snapshot.parent, ignore_errors=True)
        version = Version(name=folder.name, number=number, source=folder, snapshot=snapshot,
                          run_dir=self.run_dir, fingerprint=fp, created=meta.created)
        try:
            take_snapshot(folder, meta, snapshot)
            changed = fingerprint(folder) != fp
        except BaseException:
            version.discard()
            raise
        if changed:
            version.discard()
            raise FolderChangedError
        return version

    def _launch(self, version: Version) -> None:
        version.sock_path.unlink(missing_ok=True)
        version.reason_path.unlink(missing_ok=True)
        version.started_at = time.monotonic()
        version.proc = self.host.launch_engine(version)

    def _check_loading(self, version: Version, now: float) -> None:
        proc = version.proc
        assert proc is not None
        if version.sock_path.exists():
            del self.loading[version.name]
            self._promote(version)
        elif not proc.is_alive():
            del self.loading[version.name]
            self.host.engine_exited(proc)
            self._refuse(version.name, version.source, version.load_error(), version.fingerprint)
            version.discard()
        elif now - version.started_at > self.start_timeout_s:
            proc.kill()
            del self.loading[version.name]
            self._refuse(version.name, version.source, f"its engine did not load it within "
                         f"{self.start_timeout_s:.0f} s", version.fingerprint)
            version.discard()

    def _promote(self, version: Version) -> None:
        old = self.current.get(version.name)
        self.current[version.name] = version
        self.refused.pop(version.name, None)
        self.publish()
        if self.round is not None:
            self.round.loaded.append(version.name)
        pid = version.proc.pid if version.proc else None
        log.info("reload: %s serves %s (created %s, engine pid %s)%s", version.source,
                 version.label, version.created or "unknown", pid,
                 f"; {old.label} finishes its running generations" if old else "")
        if old is not None:
            self._retire(old)

    def _refuse(self, name: str, folder: Path, reason: str, fp: str | None) -> None:
        current = self.current.get(name)
        still = (f"{current.label} keeps serving" if current is not None
                 else "the model is not served")
        log.error("reload: model folder %s refused: %s; %s", folder, reason, still)
        refusal = Refusal(name=name, folder=str(folder), reason=reason)
        if fp is not None:
            self.refused[name] = (fp, refusal)

    def _missing(self, name: str, now: float) -> None:
        version = self.current[name]
        if name == self.default_model:
            if name not in self.missing_since:
                self.missing_since[name] = now
                log.warning("reload: the folder of the default model %s is gone; %s keeps "
                            "serving until it is back or the service restarts", name,
                            version.label)
            return
        since = self.missing_since.setdefault(name, now)
        if now - since < REMOVE_AFTER_S:
            self.recheck_at = min(self.recheck_at or float("inf"), since + REMOVE_AFTER_S)
            return
        del self.current[name]
        del self.missing_since[name]
        self.publish()
        if self.round is not None:
            self.round.removed.append(name)
        log.info("reload: %s was removed; %s is no longer served and finishes its running "
                 "generations", version.source, version.label)
        self._retire(version)

    # --- retirement -----------------------------------------------------------------------
    def _retire(self, version: Version) -> None:
        version.retiring_since = time.monotonic()
        self.retiring.append(version)
        proc = version.proc
        if proc is not None and proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGUSR1)

    def _reap(self, now: float) -> None:
        for version in list(self.retiring):
            proc = version.proc
            assert proc is not None
            assert version.retiring_since is not None
            if proc.is_alive():
                if now - version.retiring_since > self.drain_s + RETIRE_KILL_MARGIN_S:
                    log.error("reload: the engine of %s did not exit after its drain; killing "
                              "it", version.label)
                    proc.kill()
                continue
            self.retiring.remove(version)
            self.host.engine_exited(proc)
            version.discard()
            log.info("reload: %s retired (engine exit code %s)", version.label, proc.exitcode)

    def _versions_of(self, name: str) -> list[Version]:
        return [v for v in [*self.current.values(), *self.loading.values(), *self.retiring]
                if v.name == name]

    def all_processes(self) -> list[EngineProcess]:
        return [v.proc for v in [*self.current.values(), *self.loading.values(),
                                 *self.retiring] if v.proc is not None]


# --- the watcher ----------------------------------------------------------------------------

def hidden_path(models_dir: Path) -> Callable[[object, str], bool]:
    """watchfiles filter: False for anything under a name starting with "." (an export being
    written, a temporary file), so only what is published wakes the reloader."""
    root = models_dir.resolve()

    def visible(change: object, path: str) -> bool:
        try:
            parts = Path(path).resolve().relative_to(root).parts
        except ValueError:
            return True
        return not any(p.startswith(".") for p in parts)

    return visible


class FolderWatcher:
    """A thread that sets `wanted` when something visible in the models folder changes.
    watchfiles waits until changes pause for 50 ms (up to 1.6 s) and hands them over as one
    batch, so an export's renames and a `cp -r` wake the reloader once, not per file."""

    def __init__(self, models_dir: Path, wanted: threading.Event) -> None:
        self.models_dir = models_dir
        self.wanted = wanted
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="models-watcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def _run(self) -> None:
        import watchfiles

        logging.getLogger("watchfiles").setLevel(logging.WARNING)  # this logs what counts
        root = self.models_dir.resolve()
        try:
            for changes in watchfiles.watch(root,
                                            watch_filter=hidden_path(self.models_dir),
                                            stop_event=self.stop_event, raise_interrupt=False,
                                            rust_timeout=1000):
                paths = sorted({os.path.relpath(p, root) for _, p in changes})
                log.info("models folder changed: %s", ", ".join(paths[:10]) +
                         (f" and {len(paths) - 10} more" if len(paths) > 10 else ""))
                self.wanted.set()
        except Exception:
            log.exception("watching %s failed; reload with SIGHUP or POST /admin/reload",
                          self.models_dir)
