"""Hot reload (issue 14): a new or re-exported model folder is served without a restart, beside
the version running until its generations end; a bad folder is refused and changes nothing."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest
from httpx_sse import connect_sse

from app.artifact import publish_folder
from app.main import create_app
from app.manifest import read_manifest
from app.reload import REMOVE_AFTER_S, Reloader, Version, hidden_path, visible_folders
from app.settings import Settings
from tests.conftest import Server, start_server, stop_server
from tests.test_processes import engine_pid

T = TypeVar("T")
NEW_CREATED = "2031-01-01T00:00:00+00:00"


def publish(models: Path, name: str, source: Path,
            mutate: Callable[[Path], None] | None = None, **changes: Any) -> Path:
    """A copy of `source` published as models/name the way `training export` publishes: built
    in a hidden folder, then renamed into place; `changes` are written into its model.json."""
    work = models / f".{name}.{uuid.uuid4().hex[:6]}"
    shutil.copytree(source, work)
    if changes:
        meta = json.loads((work / "model.json").read_text())
        meta.update(changes)
        (work / "model.json").write_text(json.dumps(meta))
    if mutate is not None:
        mutate(work)
    publish_folder(work, models / name)
    return models / name


def truncate_graph(folder: Path) -> None:
    onnx = folder / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])


def wait_for(what: Callable[[], T | None], timeout_s: float = 60, message: str = "") -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out: {message}")


def version_of(srv: Server, name: str = "tiny") -> dict[str, Any] | None:
    reply = httpx.get(f"{srv.url}/models/{name}", timeout=30)
    return reply.json() if reply.status_code == 200 else None


@pytest.fixture
def models(tiny_models: Path, tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(tiny_models, target)
    return target


@pytest.fixture
def source(tiny_models: Path) -> Path:
    return tiny_models / "tiny"


# --- real servers -----------------------------------------------------------------------------

@pytest.mark.slow  # real server processes
def test_a_running_stream_finishes_on_the_old_version_while_new_requests_get_the_new(
        models: Path, source: Path, tmp_path: Path) -> None:
    srv = start_server(models, tmp_path / "server.log", max_new_chars="1000000", drain_s="60")
    try:
        with srv.client() as c:
            probe = c.post("/generate", json={"seed_text": "A", "max_new_chars": 3000}).json()
        rate = 3000 / (probe["timings"]["decode_ms"] / 1000)
        length = int(rate * 20)  # about 20 s of decoding: a reload takes a few
        old_pid = engine_pid(srv)
        events: list[tuple[str, dict[str, Any]]] = []
        started = threading.Event()

        def read() -> None:
            with httpx.Client(base_url=srv.url, timeout=120) as client, connect_sse(
                    client, "POST", "/generate",
                    json={"seed_text": "A", "max_new_chars": length, "stream": True}) as es:
                for ev in es.iter_sse():
                    events.append((ev.event, ev.json()))
                    started.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(30)
        # Version 2 lowercases seeds: a reply says which version's metadata served it.
        publish(models, "tiny", source, created=NEW_CREATED, lowercase=True)
        info = wait_for(lambda: (v := version_of(srv)) and v["version"] == 2 and v,
                        message="version 2 never served")
        assert reader.is_alive(), "the stream ended before the reload; make it longer"
        assert info["created"] == NEW_CREATED
        assert psutil.pid_exists(old_pid)  # still running the stream
        with srv.client() as c:
            reply = c.post("/generate", json={"seed_text": "A", "max_new_chars": 20}).json()
        assert reply["lowercased"] is True
        assert reply["seed_text"] == "a"
        assert reply["finish_reason"] == "length"
        assert engine_pid(srv) != old_pid

        reader.join(120)
        assert not reader.is_alive()
        assert events[-1][0] == "done", events[-3:]
        summary = events[-1][1]
        assert summary["finish_reason"] == "length"
        assert summary["usage"]["generated_chars"] == length
        assert summary["lowercased"] is False  # prepared, and finished, with version 1
        # Its last stream done, the old engine exits.
        psutil.Process(old_pid).wait(15)
        wait_for(lambda: "tiny version 1 retired" in srv.log(), 15, "no retirement logged")
    finally:
        stop_server(srv)
    assert "Traceback" not in srv.log()


@pytest.mark.slow  # real server processes
def test_a_corrupt_or_invalid_folder_is_refused_by_name_and_the_old_version_keeps_serving(
        models: Path, source: Path, tmp_path: Path) -> None:
    srv = start_server(models, tmp_path / "server.log")
    try:
        created = version_of(srv)["created"]  # type: ignore[index]
        publish(models, "tiny", source, truncate_graph, created=NEW_CREATED)
        line = wait_for(lambda: next((ln for ln in srv.log().splitlines()
                                      if "refused" in ln), None), message="no refusal logged")
        assert f"model folder {models / 'tiny'} refused" in line
        assert f"{models / 'tiny' / 'model.onnx'}: onnxruntime cannot load it" in line
        assert "tiny version 1 keeps serving" in line
        info = version_of(srv)
        assert info is not None
        assert (info["version"], info["created"]) == (1, created)
        with srv.client() as c:
            reply = c.post("/generate", json={"seed_text": "A", "max_new_chars": 30})
        assert reply.json()["finish_reason"] == "length"

        # A new folder with an invalid model.json: refused before any engine starts.
        vocab = json.loads((source / "model.json").read_text())["vocab"]
        publish(models, "broken", source, vocab=[vocab[0], *vocab])
        wait_for(lambda: f"model folder {models / 'broken'} refused" in srv.log(),
                 message="the invalid folder was not refused")
        assert "the model is not served" in srv.log()
        assert version_of(srv, "broken") is None

        # Fixed, the folder is tried again and served.
        publish(models, "tiny", source, created="2032-01-01T00:00:00+00:00")
        info = wait_for(lambda: (v := version_of(srv)) and v["version"] == 2 and v,
                        message="the fixed folder was not served")
        assert info["created"].startswith("2032")
    finally:
        stop_server(srv)


@pytest.mark.slow  # real server processes
def test_sighup_and_the_admin_endpoint_reload_and_removed_folders_stop_being_served(
        models: Path, source: Path, tmp_path: Path) -> None:
    srv = start_server(models, tmp_path / "server.log", watch_models="false",
                       admin_local="true")
    try:
        publish(models, "tiny", source, created=NEW_CREATED)
        time.sleep(1.5)
        assert version_of(srv)["version"] == 1  # type: ignore[index]  # not watching
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: (v := version_of(srv)) and v["version"] == 2,
                 message="SIGHUP did not reload")

        publish(models, "other", source)
        with srv.client() as c:
            report = c.post("/admin/reload").json()
            assert report["loaded"] == ["other"]
            assert {(m["name"], m["version"]) for m in report["models"]} == {
                ("tiny", 2), ("other", 1)}
            assert report["refused"] == []
            # This worker (the only one) serves it before it answers.
            assert c.post("/generate", json={"model": "other", "seed_text": "A",
                                             "max_new_chars": 10}).status_code == 200

            shutil.rmtree(models / "other")
            began = time.monotonic()
            report = c.post("/admin/reload").json()
            assert report["removed"] == ["other"]
            assert time.monotonic() - began >= REMOVE_AFTER_S  # looked twice
            assert c.get("/models/other").status_code == 404

            # The default model is never removed: requests naming no model keep working.
            shutil.rmtree(models / "tiny")
            report = c.post("/admin/reload").json()
            assert [m["name"] for m in report["models"]] == ["tiny"]
            assert c.post("/generate", json={"seed_text": "A", "max_new_chars": 10}
                          ).status_code == 200
    finally:
        stop_server(srv)
    assert "the folder of the default model tiny is gone" in srv.log()
    assert "SIGHUP: looking for new and changed model folders" in srv.log()


# --- the admin endpoint's guard, in process ---------------------------------------------------

def admin_reload(settings: Settings, client: tuple[str, int],
                 headers: dict[str, str] | None = None) -> httpx.Response:
    app = create_app(settings)

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            return await c.post("/admin/reload", headers=headers)

    return asyncio.run(post())


def test_without_api_keys_the_admin_endpoint_is_refused_unless_opted_in(
        tiny_models: Path) -> None:
    closed = Settings(models_dir=tiny_models, default_model="tiny")
    for host in ("127.0.0.1", "10.1.2.3"):
        refused = admin_reload(closed, (host, 40000))
        assert refused.status_code == 403, host
        assert "CHARLSTM_ADMIN_LOCAL" in refused.json()["error"]["message"]
    settings = Settings(models_dir=tiny_models, default_model="tiny", admin_local=True)
    remote = admin_reload(settings, ("10.1.2.3", 40000))
    assert remote.status_code == 403
    assert "CHARLSTM_API_KEYS" in remote.json()["error"]["message"]
    for host in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.0.6"):
        local = admin_reload(settings, (host, 40000))
        # Past the guard: this process runs its engines on threads, which cannot reload.
        assert local.status_code == 501, host
        assert "restart it" in local.json()["error"]["message"]
    # A loopback peer forwarding someone is a proxy, whoever it forwards.
    for header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):
        value = "for=203.0.113.5" if header == "Forwarded" else "203.0.113.5"
        assert admin_reload(settings, ("127.0.0.6", 40000), {header: value}
                            ).status_code == 403, header
    # A trusted proxy is never local, even forwarding nobody (nginx's plain proxy_pass).
    behind = settings.model_copy(update={"trusted_proxies": ["127.0.0.0/29"]})
    assert admin_reload(behind, ("127.0.0.6", 40000)).status_code == 403
    assert admin_reload(behind, ("127.0.0.9", 40000)).status_code == 501


def test_with_api_keys_the_admin_endpoint_needs_a_key_from_anywhere(tiny_models: Path) -> None:
    settings = Settings(models_dir=tiny_models, default_model="tiny", api_keys=["k1"])
    assert admin_reload(settings, ("127.0.0.1", 40000)).status_code == 401
    wrong = admin_reload(settings, ("10.1.2.3", 40000), {"Authorization": "Bearer k2"})
    assert wrong.status_code == 401
    ok = admin_reload(settings, ("10.1.2.3", 40000), {"Authorization": "Bearer k1"})
    assert ok.status_code == 501


# --- the reloader's bookkeeping, with fake engine processes -----------------------------------

class FakeProcess:
    def __init__(self, name: str) -> None:
        self.name = name
        self.pid: int | None = None  # never signalled
        self.exitcode: int | None = None
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive

    def exit(self, code: int) -> None:
        self.alive, self.exitcode = False, code

    def kill(self) -> None:
        self.exit(-9)

    def join(self, timeout: float | None = None) -> None:
        pass


class FakeHost:
    def __init__(self) -> None:
        self.launched: list[tuple[Version, FakeProcess]] = []

    def launch_engine(self, version: Version) -> FakeProcess:
        proc = FakeProcess(f"engine-{version.name}")
        self.launched.append((version, proc))
        return proc

    def engine_exited(self, proc: Any) -> None:
        pass

    def up(self, i: int = -1) -> None:
        """The engine bound its socket: loaded and warm."""
        self.launched[i][0].sock_path.touch()

    def fail(self, reason: str, i: int = -1) -> None:
        version, proc = self.launched[i]
        version.reason_path.write_text(reason.replace("{snapshot}", str(version.snapshot)))
        proc.exit(2)


@pytest.fixture
def reloader(models: Path, tmp_path: Path) -> tuple[Reloader, FakeHost]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    host = FakeHost()
    r = Reloader(host, models, run_dir, default_model="tiny", drain_s=1.0)
    r.start([models / "tiny"])
    host.up()
    r.publish()
    return r, host


def ticks(r: Reloader, until: Callable[[], bool], now: float = 0.0) -> float:
    for _ in range(100):
        r.tick(now)
        if until():
            return now
        now += 0.5
    raise AssertionError("never happened")


def test_an_unchanged_folder_starts_nothing_and_a_changed_one_a_new_version(
        reloader: tuple[Reloader, FakeHost], models: Path, source: Path) -> None:
    r, host = reloader
    r.wanted.set()
    assert r.tick(0.0) == []
    assert len(host.launched) == 1
    publish(models, "tiny", source, created=NEW_CREATED)
    r.request(b"caller")
    assert r.tick(0.0) == []  # loading: the round is open
    version = host.launched[-1][0]
    assert (version.name, version.number, version.address.endswith("tiny.2.sock")) == (
        "tiny", 2, True)
    assert (version.snapshot / "model.json").read_text() == (models / "tiny" /
                                                             "model.json").read_text()
    assert read_manifest(r.run_dir).models["tiny"].version == 1
    host.up()
    [(who, report)] = r.tick(0.5)
    assert who == b"caller"
    assert report.loaded == ["tiny"]
    manifest = read_manifest(r.run_dir)
    assert manifest.models["tiny"].version == 2
    assert manifest.models["tiny"].created == NEW_CREATED
    assert [v.number for v in r.retiring] == [1]
    host.launched[0][1].exit(0)  # the old engine let go
    r.tick(1.0)
    assert r.retiring == []
    assert not host.launched[0][0].snapshot.exists()


def test_a_refused_folder_is_named_with_its_reason_and_not_retried_until_it_changes(
        reloader: tuple[Reloader, FakeHost], models: Path, source: Path) -> None:
    r, host = reloader
    publish(models, "tiny", source, truncate_graph, created=NEW_CREATED)
    r.wanted.set()
    r.tick(0.0)
    host.fail("{snapshot}/model.onnx: onnxruntime cannot load it")
    r.request(b"caller")
    [(_, report)] = r.tick(0.5) or r.tick(1.0)
    [refusal] = report.refused
    assert refusal.reason == f"{models / 'tiny' / 'model.onnx'}: onnxruntime cannot load it"
    assert [(m.name, m.version) for m in report.models] == [("tiny", 1)]
    assert read_manifest(r.run_dir).generation == 1  # untouched
    r.wanted.set()
    r.tick(2.0)
    assert len(host.launched) == 2  # the same bytes again: not retried
    publish(models, "tiny", source, created="2032")
    r.wanted.set()
    r.tick(3.0)
    assert len(host.launched) == 3
    assert host.launched[-1][0].number == 2  # a refused attempt does not use up a number


def test_a_removed_folder_goes_after_a_grace_and_the_default_model_stays(
        reloader: tuple[Reloader, FakeHost], models: Path, source: Path) -> None:
    r, host = reloader
    publish(models, "other", source)
    r.wanted.set()
    r.tick(0.0)
    host.up()
    r.tick(0.1)
    assert set(r.current) == {"tiny", "other"}
    shutil.rmtree(models / "other")
    shutil.rmtree(models / "tiny")
    r.request(b"caller")
    assert r.tick(10.0) == []  # missing once: looked at again after the grace
    assert "other" in r.current
    now = ticks(r, lambda: "other" not in r.current, 10.0)
    assert now >= 10.0 + REMOVE_AFTER_S
    assert set(r.current) == {"tiny"}  # the default model stays
    assert set(read_manifest(r.run_dir).models) == {"tiny"}


def test_a_folder_back_within_the_grace_is_not_removed(
        reloader: tuple[Reloader, FakeHost], models: Path, source: Path) -> None:
    r, host = reloader
    publish(models, "other", source)
    r.wanted.set()
    r.tick(0.0)
    host.up()
    r.tick(0.1)
    aside = models / ".other.aside"
    (models / "other").rename(aside)
    r.wanted.set()
    r.tick(1.0)
    aside.rename(models / "other")
    ticks(r, lambda: r.round is None, 1.5)
    assert r.current["other"].number == 1
    assert len(host.launched) == 2


def test_hidden_folders_and_files_are_never_looked_at(models: Path, source: Path) -> None:
    shutil.copytree(source, models / ".tiny.export-in-progress")
    assert [f.name for f in visible_folders(models)] == ["tiny"]
    visible = hidden_path(models)
    assert visible(None, str(models / "tiny" / "model.json"))
    assert not visible(None, str(models / ".tiny.abc" / "model.onnx"))
    assert not visible(None, str(models / "tiny" / ".model.json.1234.tmp"))


def test_publish_folder_replaces_a_model_in_renames_and_leaves_nothing_behind(
        models: Path, source: Path) -> None:
    before = (models / "tiny" / "model.json").read_text()
    publish(models, "tiny", source, created=NEW_CREATED)
    assert json.loads((models / "tiny" / "model.json").read_text())["created"] == NEW_CREATED
    assert sorted(p.name for p in models.iterdir()) == ["tiny"]
    # A work folder that cannot be moved in leaves the old model in place.
    with pytest.raises(FileNotFoundError):
        publish_folder(models / ".tiny.gone", models / "tiny")
    assert sorted(p.name for p in models.iterdir()) == ["tiny"]
    assert (models / "tiny" / "model.json").read_text() != before
    with pytest.raises(ValueError, match="hidden folder"):
        publish_folder(models / "visible", models / "tiny")
