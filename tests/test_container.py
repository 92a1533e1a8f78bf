"""The service as a container runs it: as PID 1 of its own PID namespace, and the `cpu` image
built from the Dockerfile and run as shipped.

- Without a container engine: `unshare --pid --fork --mount-proc python -m app` makes the
  supervisor PID 1, as `podman run` / `docker run` without `--init` and Kubernetes do. Root
  only (unshare needs CAP_SYS_ADMIN).
- With one (marker `container`): Debian's podman builds the `cpu` target on a Debian bookworm
  base made with mmdebstrap (python3, python3-venv, tini, ca-certificates: what the Dockerfile
  needs from `python:3.12-slim`, which no registry here serves) and runs it. `make podman`
  installs podman, runc and mmdebstrap as root; without them, or as another user, these tests
  are skipped and say why. The base image and the build's layers stay in podman's storage, so
  a second run rebuilds only what changed.

Timings of each run are written to test-artifacts/container.json (docs/DEPLOYMENT.md quotes
them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from httpx_sse import connect_sse

from tests.conftest import ARTIFACTS, ROOT, free_port

pytestmark = pytest.mark.slow  # builds and runs the image with podman

IS_ROOT = os.geteuid() == 0
READY_WITHIN_S = 30.0
STOP_GRACE_S = 30  # docker-compose.yml's stop_grace_period

# --- the supervisor as PID 1, no container ------------------------------------------------


@dataclass
class Namespaced:
    """`python -m app` as PID 1 of a new PID namespace, under `unshare`."""

    unshare: subprocess.Popen[str]
    url: str
    log_path: Path

    @property
    def supervisor(self) -> psutil.Process:
        (child,) = psutil.Process(self.unshare.pid).children()
        return child

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def ns_pids(proc: psutil.Process) -> list[int]:
    """The process's pid in each PID namespace it is in, outermost first."""
    status = Path(f"/proc/{proc.pid}/status").read_text()
    (line,) = [x for x in status.splitlines() if x.startswith("NSpid:")]
    return [int(p) for p in line.split()[1:]]


def wait_ready(url: str, within_s: float, alive: Callable[[], bool]) -> float:
    """Seconds until GET /ready answers 200; fails after `within_s`, or once `alive()` (asked
    every half second) is false: the service exited."""
    start = last_asked = time.monotonic()
    while time.monotonic() - start < within_s:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return time.monotonic() - start
        if time.monotonic() - last_asked > 0.5:
            last_asked = time.monotonic()
            if not alive():
                pytest.fail("the service exited before it was ready")
        time.sleep(0.05)
    pytest.fail(f"not ready within {within_s:.0f} s")


@pytest.fixture(scope="module")
def one_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the bundled shakespeare alone: one engine starts faster."""
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(ROOT / "models" / "shakespeare", models / "shakespeare")
    return models


@contextlib.contextmanager
def started_as_pid_1(models: Path, log_path: Path) -> Iterator[Namespaced]:
    if not IS_ROOT or shutil.which("unshare") is None:
        pytest.skip("needs root and util-linux's unshare to start the service in a new PID "
                    "namespace")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CHARLSTM_MODELS_DIR": str(models),
           "CHARLSTM_DEFAULT_MODEL": "shakespeare", "CHARLSTM_HOST": "127.0.0.1",
           "CHARLSTM_PORT": str(port), "CHARLSTM_HTTP_WORKERS": "2", "CHARLSTM_DRAIN_S": "10"}
    with log_path.open("w") as log:
        # --kill-child: should the test die, the namespace goes with unshare.
        proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                                 sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ns = Namespaced(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        try:
            wait_ready(ns.url, 60, alive=lambda: proc.poll() is None)
        except BaseException:
            print(ns.log()[-3000:])
            raise
        yield ns
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def as_pid_1(one_model: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Namespaced]:
    with started_as_pid_1(one_model, tmp_path_factory.mktemp("pid1") / "server.log") as ns:
        yield ns


@pytest.fixture
def stopped_as_pid_1(one_model: Path, tmp_path: Path) -> Iterator[Namespaced]:
    """One for a test that stops it."""
    with started_as_pid_1(one_model, tmp_path / "server.log") as ns:
        yield ns


def stream_events(url: str, body: dict[str, object]) -> list[tuple[str, dict[str, Any]]]:
    with httpx.Client(base_url=url, timeout=60) as c, connect_sse(
            c, "POST", "/generate", json={**body, "stream": True}) as es:
        return [(ev.event, ev.json()) for ev in es.iter_sse()]


def test_the_service_serves_as_pid_1_of_its_pid_namespace(as_pid_1: Namespaced) -> None:
    """Before the fix every engine and worker saw getppid() == 1 and ended itself: start-up
    failed with "its engine process exited with code 0 while loading it"."""
    assert ns_pids(as_pid_1.supervisor)[-1] == 1
    reply = httpx.post(f"{as_pid_1.url}/generate", timeout=30,
                       json={"seed_text": "ROMEO:\n", "max_new_chars": 50, "seed": 1})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["generated_chars"] == 50


def test_pid_1_reaps_orphaned_processes(as_pid_1: Namespaced) -> None:
    """An orphan inside the namespace is handed to PID 1 (the supervisor), which must wait
    for it: nothing else ever will, and it would stay a zombie."""
    if shutil.which("nsenter") is None:
        pytest.skip("needs util-linux's nsenter")
    sup = as_pid_1.supervisor
    # The shell exits at once; its `sleep` is orphaned inside the namespace.
    subprocess.run(["nsenter", "--target", str(sup.pid), "--pid", "sh", "-c",
                    "sleep 0.5 & exit 0"], check=True, timeout=10)
    deadline = time.monotonic() + 5
    orphans: list[psutil.Process] = []
    while not orphans and time.monotonic() < deadline:
        orphans = [p for p in sup.children() if p.name() == "sleep"]
        time.sleep(0.02)
    assert orphans, "the orphan was not handed to the supervisor"
    (orphan,) = orphans
    deadline = time.monotonic() + 5
    while psutil.pid_exists(orphan.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(orphan.pid), f"left as a {orphan.status()} process"
    assert httpx.get(f"{as_pid_1.url}/ready", timeout=5).status_code == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_pid_1_drains_on_a_stop_signal_and_leaves_nothing_behind(
        stopped_as_pid_1: Namespaced, sig: signal.Signals) -> None:
    as_pid_1 = stopped_as_pid_1
    sup = as_pid_1.supervisor
    # A signal the supervisor catches reaches it as PID 1; SIGHUP asks for a reload.
    os.kill(sup.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "SIGHUP: looking for new" not in as_pid_1.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "SIGHUP: looking for new" in as_pid_1.log()
    assert httpx.get(f"{as_pid_1.url}/ready", timeout=5).status_code == 200
    everything = [sup, *sup.children(recursive=True)]
    result: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    reader = threading.Thread(target=lambda: result.update(events=stream_events(
        as_pid_1.url, {"seed_text": "A", "max_new_chars": 2000})))
    reader.start()
    time.sleep(0.3)
    os.kill(sup.pid, sig)
    reader.join(60)
    assert as_pid_1.unshare.wait(60) == 0, as_pid_1.log()[-3000:]
    _, alive = psutil.wait_procs(everything, timeout=10)
    assert not alive, f"left running: {alive}"
    assert result["events"][-1][0] == "done"
    assert result["events"][-1][1]["finish_reason"] == "length"
    assert "Traceback" not in as_pid_1.log()


# --- the cpu image, built and run with podman ---------------------------------------------

BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "tini", "ca-certificates",
                 "passwd")
DEBIAN_MIRROR = os.environ.get("CHARLSTM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
IMAGE = "localhost/charlstm-ci:cpu"
# Whichever container test runs first builds the image: from nothing, a few minutes.
BUILD_TIMEOUT_S = 900
SUITE = "bookworm"
TIMINGS: dict[str, Any] = {}


def base_image_tag() -> str:
    """Named after what goes into it, so a change of packages makes a new one."""
    digest = hashlib.sha256(" ".join((SUITE, DEBIAN_MIRROR, *BASE_PACKAGES)).encode())
    return f"localhost/charlstm-ci/debian-python:{SUITE}-{digest.hexdigest()[:12]}"


class Podman:
    """The podman CLI with this test's engine settings: runc (crun fails on hybrid cgroups),
    cgroupfs (no systemd), and no ulimits of its own, so containers keep this process's:
    podman's default nofile of 2^20 needs CAP_SYS_RESOURCE, which a sandbox running the
    tests may lack, and there even setting nproc to the current limit is refused."""

    def __init__(self, conf_dir: Path) -> None:
        conf = conf_dir / "containers.conf"
        conf.write_text(
            "[containers]\n"
            "default_ulimits = []\n"
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 120,
                 **kw: Any) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            pytest.fail(f"podman {' '.join(args)} exited {proc.returncode}:\n"
                        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def has_image(self, name: str) -> bool:
        return self("image", "exists", name, check=False).returncode == 0


def ca_bundle() -> Path | None:
    """The CA bundle this machine's pip trusts, if one is configured: behind a
    TLS-intercepting proxy the build needs it (the Dockerfile's `ca` secret)."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        path = os.environ.get(var)
        if path and Path(path).is_file():
            return Path(path)
    return None


def make_base_image(podman: Podman, tag: str, work: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap not found (`make podman` installs it as root): it makes the "
                    "Debian base image")
    tarball = work / "base.tar"
    subprocess.run(
        ["mmdebstrap", "--quiet", "--variant=apt", "--mode=root", "--format=tar",
         f"--include={','.join(BASE_PACKAGES)}", '--aptopt=Apt::Install-Recommends "false"',
         *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale")),
         '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
         SUITE, str(tarball), DEBIAN_MIRROR],
        check=True, timeout=600, capture_output=True, text=True)
    podman("import", "--quiet", str(tarball), tag, timeout=300)
    tarball.unlink()


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    if not IS_ROOT:
        pytest.skip("the container tests run rootful podman: run them as root")
    missing = [t for t in ("podman", "runc") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found: `make podman` installs Debian's podman, "
                    "runc and mmdebstrap (as root)")
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("image")
    base = base_image_tag()
    start = time.monotonic()
    if not podman.has_image(base):
        make_base_image(podman, base, work)
    TIMINGS["base_image_s"] = round(time.monotonic() - start, 1)
    old = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    secret = ca_bundle()
    build_args = [f"--build-arg={v}={os.environ[v]}"
                  for v in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL") if os.environ.get(v)]
    start = time.monotonic()
    # --format docker: the OCI format has no HEALTHCHECK, podman would drop it.
    # --network host: no CNI set-up needed for pip to reach the index.
    podman("build", "--format", "docker", "--network", "host", "--target", "cpu",
           "--build-arg", f"PYTHON_IMAGE={base}", *build_args,
           *(["--secret", f"id=ca,src={secret}"] if secret else []),
           "--tag", IMAGE, str(ROOT), timeout=900)
    TIMINGS["build_s"] = round(time.monotonic() - start, 1)
    new = podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    if old and old != new:  # the previous build, now untagged
        podman("rmi", old, check=False)
    TIMINGS["image_mb"] = round(int(podman("image", "inspect", "--format", "{{.Size}}",
                                           IMAGE).stdout) / 1e6)
    yield IMAGE
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "container.json").write_text(json.dumps(
        {"engine": podman("--version").stdout.strip(), "base": base, **TIMINGS}, indent=2))


@dataclass
class Container:
    name: str
    url: str
    ready_s: float


@contextlib.contextmanager
def run_container(podman: Podman, image: str, *options: str,
                  command: tuple[str, ...] = ()) -> Iterator[Container]:
    """The image as shipped (no --init), hardened as deploy/k8s runs it, on a free port of
    the host's network; removed on leaving."""
    port = free_port()
    name = f"charlstm-ci-{os.getpid()}-{port}"
    start = time.monotonic()
    podman("run", "--detach", "--name", name, "--network", "host",
           "--env", f"CHARLSTM_PORT={port}", "--env", "CHARLSTM_DRAIN_S=20",
           "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges", *options, image, *command)

    def running() -> bool:
        state = podman("inspect", "--format", "{{.State.Running}}", name, check=False)
        return state.stdout.strip() == "true"

    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, READY_WITHIN_S, alive=running)
        except BaseException:
            print(podman("logs", name, check=False).stderr[-3000:])
            raise
        yield Container(name, url, time.monotonic() - start)
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture(scope="module")
def shipped(podman: Podman, image: str) -> Iterator[Container]:
    with run_container(podman, image) as container:
        TIMINGS["start_to_ready_s"] = round(container.ready_s, 2)
        yield container


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_image_has_its_healthcheck_and_no_tensorflow(podman: Podman, image: str) -> None:
    (inspected,) = json.loads(podman("image", "inspect", image).stdout)
    # Kept only in the docker image format (podman's own default, OCI, drops it).
    assert inspected["Healthcheck"]["Test"] == ["CMD", "python", "-m", "app.probe"]
    assert inspected["Config"]["Entrypoint"] == ["tini", "-s", "--"]
    found = podman("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c",
                   "import importlib.util as u; print(u.find_spec('tensorflow') is None, "
                   "u.find_spec('onnxruntime') is not None)")
    assert found.stdout.split() == ["True", "True"]


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_image_serves_json_sse_and_openai(shipped: Container) -> None:
    with httpx.Client(base_url=shipped.url, timeout=30) as c:
        reply = c.post("/generate", json={"seed_text": "ROMEO:\n", "max_new_chars": 80,
                                          "seed": 7, "temperature": 0.5})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["generated_chars"] == 80
        assert c.post("/generate", json={"seed_text": "ROMEO:\n", "max_new_chars": 80,
                                         "seed": 7, "temperature": 0.5}).json() \
            ["text"] == reply.json()["text"]
        completion = c.post("/v1/completions", json={"model": "shakespeare",
                                                     "prompt": "KING:", "max_tokens": 20})
        assert completion.status_code == 200, completion.text
        assert len(completion.json()["choices"][0]["text"]) == 20
        assert {m["name"] for m in c.get("/models").json()["models"]} >= {"shakespeare",
                                                                            "nietzsche"}
    events = stream_events(shipped.url, {"seed_text": "To be", "max_new_chars": 200})
    assert events[-1][0] == "done"
    assert "".join(str(d.get("text", "")) for e, d in events if e != "done") == \
        events[-1][1]["text"]


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_image_health_check_follows_the_port_and_runs_as_non_root(podman: Podman,
                                                                  shipped: Container) -> None:
    # The container listens on a port other than the image's 8000 (-e CHARLSTM_PORT).
    assert not shipped.url.endswith(":8000")
    check = podman("healthcheck", "run", shipped.name, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert podman("exec", shipped.name, "id", "-u").stdout.strip() == "10001"
    logs = podman("logs", shipped.name).stdout + podman("logs", shipped.name).stderr
    assert "Traceback" not in logs
    assert "telemetry" not in logs.lower()


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_image_stop_drains_streams_in_flight_and_exits_0(podman: Podman,
                                                         shipped: Container) -> None:
    """`podman stop` (SIGTERM, then SIGKILL after the grace period): every stream running
    finishes, /ready turns 503 at once, and the container exits 0 well within the grace."""
    n, chars = 16, 3000
    results: list[list[tuple[str, dict[str, Any]]]] = []
    started = threading.Barrier(n + 1)

    def stream(i: int) -> None:
        with httpx.Client(base_url=shipped.url, timeout=60) as c, connect_sse(
                c, "POST", "/generate", json={"seed_text": "A", "max_new_chars": chars,
                                              "seed": i, "stream": True}) as es:
            events = es.iter_sse()
            first = next(events)
            started.wait(30)
            results.append([(first.event, first.json()),
                            *((ev.event, ev.json()) for ev in events)])

    readers = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for r in readers:
        r.start()
    started.wait(30)  # every stream is running
    not_ready_after: list[float] = []

    def watch_ready(t0: float) -> None:
        while time.monotonic() - t0 < 10:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{shipped.url}/ready", timeout=1).status_code == 503:
                    not_ready_after.append(time.monotonic() - t0)
                    return
            time.sleep(0.01)

    start = time.monotonic()
    watcher = threading.Thread(target=watch_ready, args=(start,))
    watcher.start()
    podman("stop", "--time", str(STOP_GRACE_S), shipped.name, timeout=STOP_GRACE_S + 30)
    stopped_s = time.monotonic() - start
    for r in [*readers, watcher]:
        r.join(30)
    TIMINGS.update(drain_streams=n, drain_chars=chars, stop_s=round(stopped_s, 2),
                   ready_503_after_s=round(not_ready_after[0], 2) if not_ready_after else None)
    exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", shipped.name).stdout
    assert int(exit_code) == 0, podman("logs", shipped.name).stderr[-3000:]
    assert stopped_s < STOP_GRACE_S
    assert len(results) == n
    for events in results:
        assert events[-1][0] == "done"
        assert events[-1][1]["finish_reason"] == "length"
        assert events[-1][1]["usage"]["generated_chars"] == chars
    assert not_ready_after, "/ready never turned 503 while draining"


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_image_serves_with_the_supervisor_as_pid_1(podman: Podman, image: str) -> None:
    """No tini (an image run with another entrypoint, a platform that replaces it): the
    supervisor is PID 1 of the container."""
    with run_container(podman, image, "--entrypoint", "python",
                       command=("-m", "app")) as container:
        TIMINGS["start_to_ready_pid1_s"] = round(container.ready_s, 2)
        cmdline = podman("exec", container.name, "cat", "/proc/1/cmdline").stdout
        assert cmdline.split("\0")[:3] == ["python", "-m", "app"]
        reply = httpx.post(f"{container.url}/generate", timeout=30,
                           json={"seed_text": "KING:", "max_new_chars": 40})
        assert reply.status_code == 200, reply.text
        podman("stop", "--time", str(STOP_GRACE_S), container.name, timeout=STOP_GRACE_S + 30)
        assert podman("inspect", "--format", "{{.State.ExitCode}}",
                      container.name).stdout.strip() == "0"
