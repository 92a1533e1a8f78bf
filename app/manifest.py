"""What the supervisor tells its HTTP workers: which engine process serves each model.

`manifest.json` in the run folder maps each model to its current version: the engine's
ZeroMQ address and the snapshot of the model folder that engine loaded. The supervisor
replaces the file atomically (write a temporary file, then rename) whenever a version changes
(hot reload); workers read it at start-up and poll it every POLL_S.

A file rather than a ZeroMQ PUB socket because this is state, not events: a worker that starts
late or is restarted reads the current state at once, a busy worker cannot miss a message (PUB
drops what a subscriber has not yet joined for), and there is nothing to reconnect. Reading
one small file twice a second costs nothing measurable.

The admin endpoint asks the supervisor for a reload over a second socket (CONTROL_SOCKET) and
gets a `ReloadReport` back.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import zmq
import zmq.asyncio
from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FILE = "manifest.json"
CONTROL_SOCKET = "control.sock"
POLL_S = 0.5  # how often a worker looks for a new manifest
RELOAD_REQUEST = b"reload"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServedVersion(_Frozen):
    name: str
    version: int = Field(ge=1, description="1 at start-up, then one more per reload")
    address: str = Field(description="ZeroMQ endpoint of the engine process")
    dir: Path = Field(description="the snapshot of the model folder the engine loaded")
    source: Path = Field(description="the folder in the models folder it was copied from")
    created: str = Field(description="model.json's `created` (when it was exported)")


class Manifest(_Frozen):
    generation: int = Field(ge=1, description="one more at every write")
    models: dict[str, ServedVersion]


class Refusal(_Frozen):
    name: str
    folder: str
    reason: str


class VersionInfo(_Frozen):
    name: str
    version: int
    created: str
    folder: str


class ReloadReport(_Frozen):
    """The answer to a reload request: the models served once the reload round ended."""

    models: list[VersionInfo]
    loaded: list[str] = Field(description="models loaded (new, or a new version) in this round")
    removed: list[str] = Field(description="models no longer served (their folder is gone)")
    refused: list[Refusal] = Field(description="folders refused, this round or before and "
                                   "unchanged since; the models they would replace keep serving")

    def without_paths(self, models_dir: Path, run_dir: Path | None) -> ReloadReport:
        """The report for a caller: folders relative to the models folder, and no absolute
        server path in any reason (the supervisor's log keeps them whole)."""
        def folder(path: str) -> str:
            for root in _roots(models_dir):
                if path.startswith(root + os.sep):
                    return path[len(root) + 1:]
            return Path(path).name

        def reason(text: str) -> str:
            for root in _roots(models_dir):
                text = text.replace(root + os.sep, "")
            if run_dir is not None:
                for root in _roots(run_dir):
                    text = text.replace(root + os.sep, "")
            # Whatever other absolute path remains (a link's target): its last part only.
            return _ABSOLUTE_DIRS.sub("", text)

        return self.model_copy(update={
            "models": [m.model_copy(update={"folder": folder(m.folder)}) for m in self.models],
            "refused": [r.model_copy(update={"folder": folder(r.folder),
                                             "reason": reason(r.reason)})
                        for r in self.refused]})


# "/a/b/" of "/a/b/c", not preceded by a path or word character.
_ABSOLUTE_DIRS = re.compile(r"(?<![\w.~/-])/(?:[^/\s'\"]+/)+")


def _roots(path: Path) -> list[str]:
    return sorted({str(path), str(path.resolve()), os.path.abspath(path)}, key=len,
                  reverse=True)


def manifest_path(run_dir: Path) -> Path:
    return run_dir / MANIFEST_FILE


def control_address(run_dir: Path) -> str:
    return f"ipc://{run_dir / CONTROL_SOCKET}"


def write_manifest(run_dir: Path, manifest: Manifest) -> None:
    """Readers see the old file or the new one, never a part of either."""
    tmp = run_dir / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(manifest.model_dump_json(indent=1), encoding="utf-8")
    os.replace(tmp, manifest_path(run_dir))


def read_manifest(run_dir: Path) -> Manifest:
    return Manifest.model_validate_json(manifest_path(run_dir).read_bytes())


async def request_reload(run_dir: Path, timeout_s: float) -> ReloadReport | None:
    """Ask the supervisor for a reload round; its report, or None if none came in time."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(control_address(run_dir))
        await sock.send(RELOAD_REQUEST)
        if not await sock.poll(int(timeout_s * 1000)):
            return None
        return ReloadReport.model_validate_json(await sock.recv())
    finally:
        sock.close()
