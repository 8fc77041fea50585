"""deploy/: the Kubernetes manifests validated offline against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail), and the references between them checked, since
a selector or port name that matches nothing validates fine and serves nothing."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from flux2_serving import CHECKOUT as LAUNCH_ROOT
from flux2_serving.clients.api import ROUTING_HEADER
from flux2_serving.contract import security
from flux2_serving.front import __main__ as front_main
from flux2_serving.server.gateway import ROUTING_HEADER as GATEWAY_HEADER
from flux2_serving.server.launch import bundled_server, free_ports, prepare_backends, server_env, wait_ready
from tests.support import modules_imported_by

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ("1.30", "1.37")  # a 2024 cluster and the newest schemas the package holds
NOT_RESOURCES = {"kustomization.yaml", "prometheus-adapter-values.yaml"}
DOCKERFILE = ROOT / "docker" / "serving.Dockerfile"
FRONT_DOCKERFILE = ROOT / "docker" / "front.Dockerfile"
RELEASE = re.search(r"^RELEASE := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name not in NOT_RESOURCES:
            docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _one(kind: str, name: str | None = None) -> dict:
    found = [doc for _, doc in _documents() if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_builtin_resource_validates_strictly(version):
    validated = []
    for _file, doc in _documents():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD (Prometheus Operator): checked by the test below
        kubernetes_validate.validate(doc, version, strict=True)
        validated.append(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Ingress", "PersistentVolumeClaim", "ConfigMap",
            "Secret"} <= set(validated)


def test_validation_rejects_a_misspelt_field():
    deployment = _one("Deployment", "flux2-triton")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesprobe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def _triton(deployment: dict) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")


def _containers(deployment: dict) -> dict[str, dict]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def test_replica_shape_one_gpu_probes_shm_and_explicit_model_control():
    deployment = _one("Deployment", "flux2-triton")
    triton = _triton(deployment)
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for probe in ("startupProbe", "readinessProbe"):
        assert triton[probe]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["startupProbe"]["periodSeconds"] * triton["startupProbe"]["failureThreshold"] >= 600  # engines load
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in triton["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "--model-control-mode=explicit" in triton["args"] and "--load-model=*" in triton["args"]
    # The images are the release the Makefile builds, and the pool is the image's (the plan's).
    assert {c["image"].rsplit(":", 1)[1] for c in _containers(deployment).values()} == {RELEASE}
    pool = re.search(r"^ENV CUDA_POOL_BYTES=(\d+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert f"--cuda-memory-pool-byte-size=0:{pool}" in triton["args"]


def test_both_containers_run_the_hardened_modules_with_the_admin_key_from_the_secret_as_a_file():
    deployment = _one("Deployment", "flux2-triton")
    containers = _containers(deployment)
    triton, watchdog = containers["triton"], containers["watchdog"]
    assert triton["command"] == ["python3", "-m", "flux2_serving.server.serve"]
    assert watchdog["command"][:3] == ["python3", "-m", "flux2_serving.server.watchdog"]
    assert "--once" not in watchdog["command"]
    # Liveness: one probe round, no canary (a real request would queue behind the work in progress), with
    # room after the probes' own timeout.
    liveness = triton["livenessProbe"]
    command = liveness["exec"]["command"]
    assert command[:3] == ["python3", "-m", "flux2_serving.server.watchdog"]
    assert "--once" in command and "--canary" not in command
    assert liveness["timeoutSeconds"] > float(command[command.index("--probe-timeout") + 1])

    secret = _one("Secret", "flux2-admin-key")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for container in (triton, watchdog):
        env = {e["name"]: e for e in container["env"]}
        assert "FLUX2_ADMIN_KEY" not in env  # a file: tritonserver's environment reaches every stub
        key_file = Path(env["FLUX2_ADMIN_KEY_FILE"]["value"])
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(key_file.parent))
        assert mount["readOnly"] is True
        source = volumes[mount["name"]]["secret"]
        assert source["secretName"] == secret["metadata"]["name"] == "flux2-admin-key"
        assert source["items"] == [{"key": "admin-key", "path": key_file.name}]
    assert "admin-key" in secret["stringData"]
    # The placeholder is refused by flux2_serving.server.serve, so an unedited Secret cannot open the admin APIs with
    # a key published in this repository.
    with pytest.raises(ValueError):
        security.restriction_args(secret["stringData"]["admin-key"])


def test_the_image_runs_server_serve_from_the_files_the_context_lets_in():
    dockerfile = DOCKERFILE.read_text()
    copies = re.findall(r"^COPY (.+) (\S+)$", dockerfile, re.M)
    sources = {source for sources, _ in copies for source in sources.split()}
    # The serving side only (flux2_serving/, not export/ or clients/: tests/test_structure.py checks that nothing
    # served imports them), put on the path by a .pth file that the Python-backend stub's embedded python3 reads.
    assert ("flux2_serving", "/opt/flux2/lib/flux2_serving") in copies
    assert re.search(r'^RUN python3 -c .*site\.getsitepackages\(\)\[0\].*"/opt/flux2/lib\\n"', dockerfile, re.M)
    front = {source for sources, _ in re.findall(r"^COPY (.+) (\S+)$", FRONT_DOCKERFILE.read_text(), re.M)
             for source in sources.split()}
    engines = {source.split("/")[0] if source.startswith(("flux2_serving/", "export/")) else source
               for sources, _ in re.findall(r"^COPY (.+) (\S+)$", (ROOT / "docker" / "engines.Dockerfile").read_text(),
                                            re.M) for source in sources.split()}
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    every = sources | front | engines
    assert allowed == every and all((ROOT / source).exists() for source in every), allowed ^ every
    # The CMD as /bin/sh runs it (${CUDA_POOL_BYTES} expanded, '*' not globbed), through
    # flux2_serving.server.serve --print.
    cmd = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))
    assert cmd[:2] == ["/bin/sh", "-c"] and cmd[2].startswith("exec python3 -m flux2_serving.server.serve ")
    script = cmd[2].replace("exec python3 ", f"exec {sys.executable} ", 1) + " --print"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX2_ADMIN_KEY")}
    printed = subprocess.run(["/bin/sh", "-c", script], cwd=ROOT, env={**env, "CUDA_POOL_BYTES": "123"},
                             capture_output=True, text=True, check=True).stdout.splitlines()[0].split()
    assert printed[0] == "tritonserver"
    for flag in ("--cuda-memory-pool-byte-size=0:123", "--load-model=*", "--model-control-mode=explicit",
                 "--exit-timeout-secs=60", "--http-address=127.0.0.1", "--metrics-address=0.0.0.0"):
        assert flag in printed


def test_selectors_ports_and_names_refer_to_what_exists():
    deployment = _one("Deployment", "flux2-triton")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in _triton(deployment)["ports"]}
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    service = _one("Service", "flux2-triton")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    service_ports = {p["name"] for p in service["spec"]["ports"]}

    monitor = _one("PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]

    hpa = _one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    adapter = yaml.safe_load((KUBE / "prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= served

    for name in ("flux2-http", "flux2-grpc"):
        ingress = _one("Ingress", name)
        assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$flux2_route_key"
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"] and backend["port"]["name"] in service_ports
    snippet = _one("ConfigMap")["data"]["http-snippet"]
    assert "$http_x_flux2_reference_key $flux2_route_key" in snippet  # the variable the Ingresses hash on

    claim = _one("PersistentVolumeClaim")["metadata"]["name"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == claim for v in volumes)


def test_kustomization_lists_existing_resources():
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (KUBE / resource).exists(), resource


def test_the_routing_header_is_the_one_clients_send_and_the_gateway_hashes():
    variable = "$http_" + ROUTING_HEADER.replace("-", "_")
    assert GATEWAY_HEADER == ROUTING_HEADER
    assert variable in (ROOT / "deploy" / "nginx" / "flux2-gateway.conf").read_text()
    assert variable in _one("ConfigMap")["data"]["http-snippet"]


PUBLIC_HTTP = {"/v2/health/live", "/v2/health/ready", "/v2/models/flux2_klein_kv", "/v2/models/flux2_klein_kv/ready",
               "/v2/models/flux2_klein_kv/infer"}
PUBLIC_GRPC = {f"/inference.GRPCInferenceService/{method}"
               for method in ("ModelInfer", "ModelMetadata", "ModelReady", "ServerLive", "ServerReady")}


@pytest.mark.parametrize(("name", "allowed"), [("flux2-http", PUBLIC_HTTP), ("flux2-grpc", PUBLIC_GRPC)])
def test_the_ingresses_route_exactly_the_public_allowlist(name, allowed):
    """The paths of deploy/nginx/flux2-gateway.conf's allowlist, exact: no admin API, no other model."""
    paths = [path for rule in _one("Ingress", name)["spec"]["rules"] for path in rule["http"]["paths"]]
    assert {p["path"] for p in paths} == allowed and len(paths) == len(allowed)
    assert {p["pathType"] for p in paths} == {"Exact"}
    gateway = (ROOT / "deploy" / "nginx" / "flux2-gateway.conf").read_text()
    pattern = re.search(r"location ~ (\^/v2/\S+)" if name == "flux2-http" else r"location ~ (\^/inference\S+)",
                        gateway).group(1)
    assert all(re.match(pattern, path) for path in allowed)


def _serve_print(environ: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX2_ADMIN_KEY")}
    return subprocess.run([sys.executable, "-m", "flux2_serving.server.serve", "--print", "--model-repository=/models"],
                          cwd=ROOT, env={**env, **environ}, capture_output=True, text=True, check=True)


@pytest.mark.parametrize("key_from", ["env", "file", "none"])
def test_serve_print_masks_the_key_and_restricts_exactly_the_admin_apis(key_from, tmp_path):
    key = "k3y-" + "a" * 40
    (tmp_path / "key").write_text(key + "\n")
    environ = {"env": {"FLUX2_ADMIN_KEY": key}, "file": {"FLUX2_ADMIN_KEY_FILE": str(tmp_path / "key")},
               "none": {}}[key_from]
    run = _serve_print(environ)
    printed, gate = (line.split() for line in run.stdout.splitlines())
    assert key not in run.stdout + run.stderr
    assert ("closed to everyone" in run.stderr) == (key_from == "none")
    assert printed[0] == "tritonserver" and printed[-1] == "--model-repository=/models"
    for option in ("--http-restricted-api", "--grpc-restricted-protocol"):
        (value,) = [arg.split("=", 1)[1] for arg in printed if arg.startswith(option + "=")]
        apis, restriction = value.split(":", 1)
        assert set(apis.split(",")) == set(security.RESTRICTED_APIS)
        assert restriction == f"{security.ADMIN_HEADER}=***"
    # The gate on the public ports of every interface; tritonserver's HTTP and gRPC on loopback behind it.
    for listener in ("http", "grpc"):
        assert f"--{listener}-address=127.0.0.1" in printed
    assert "--metrics-address=0.0.0.0" in printed
    assert gate[1:3] == ["-m", "flux2_serving.server.gate"]
    assert "--http-listen=0.0.0.0:8000" in gate and "--grpc-listen=0.0.0.0:8001" in gate
    assert "--http-port=18000" in printed and "--http-upstream=127.0.0.1:18000" in gate
    # The Python backend never reads it (flux2_serving/contract/security.py).
    assert "stub-timeout-seconds" not in printed


def _post(url: str, headers: dict, body: bytes = b"{}") -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json",
                                                                              **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no_gate"])
def test_serve_starts_tritonserver_with_the_admin_apis_behind_the_key(triton_server, tmp_path, gate):
    """python -m flux2_serving.server.serve for real (the container's entry point) on the bundled tritonserver:
    the repository index answers only with the key. With the gate (default) it stays the parent of
    tritonserver and the gate, and the gate refuses a nested body; with --no-gate it becomes tritonserver."""
    key = security.unknowable_key()
    ports, upstream = free_ports(), free_ports()
    backends = prepare_backends(LAUNCH_ROOT / "build" / "tritonserver" / "backends")
    env = {k: v for k, v in server_env().items() if not k.startswith("FLUX2_ADMIN_KEY")}
    env.update(PATH=f"{bundled_server() / 'bin'}:{env['PATH']}", FLUX2_ADMIN_KEY=key,
               FLUX2_UPSTREAM_HTTP_PORT=str(upstream["http"]), FLUX2_UPSTREAM_GRPC_PORT=str(upstream["grpc"]))
    command = [sys.executable, "-m", "flux2_serving.server.serve", "--address=127.0.0.1",
               f"--model-repository={triton_server['repository']}", f"--backend-directory={backends}",
               f"--http-port={ports['http']}", f"--grpc-port={ports['grpc']}", f"--metrics-port={ports['metrics']}",
               "--model-control-mode=explicit", *([] if gate else ["--no-gate"])]  # nothing loaded: ready at once
    with open(tmp_path / "serve.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_ready(f"127.0.0.1:{ports['http']}", process, timeout=120)
        exe = Path(f"/proc/{process.pid}/exe").resolve().name
        assert (exe == "tritonserver") != gate  # --no-gate: exec'd, signals reach it
        index = f"http://127.0.0.1:{ports['http']}/v2/repository/index"
        assert _post(index, {}) == 403
        assert _post(index, {security.ADMIN_HEADER: "guess"}) == 403
        assert _post(index, security.admin_headers(key)) == 200
        if gate:
            assert _post(index, security.admin_headers(key), b"[" * 200_000) == 400
            assert _post(index, security.admin_headers(key)) == 200  # still serving
    except BaseException:
        print((tmp_path / "serve.log").read_text()[-3000:])
        raise
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_the_front_deployment_service_and_secret_fit_together():
    deployment, service = _one("Deployment", "flux2-front"), _one("Service", "flux2-front")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in container["ports"]}
    # Its arguments parse with the front's own parser, and Triton's gRPC is the Triton Service's port.
    args = front_main.parser().parse_args(container["args"])
    triton = _one("Service", "flux2-triton")
    assert args.triton_grpc == f"{triton['metadata']['name']}:" + str(
        next(p["port"] for p in triton["spec"]["ports"] if p["name"] == "grpc"))
    # API keys on, from the Secret's file; the published placeholder is refused at start.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    secret = _one("Secret", "flux2-front-api-keys")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert args.api_keys_file == f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"
    with pytest.raises(ValueError, match="whitespace"):
        front_main.api_keys(None, {front_main.KEYS_VARIABLE: secret["stringData"]["api-keys"]})
    assert front_main.api_keys(None, {front_main.KEYS_VARIABLE: "k1, k2"}) == {"k1", "k2"}


def test_the_front_image_pins_what_the_tests_run_with_and_imports_no_torch():
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    front = dict(line.split("==") for line in (ROOT / "docker" / "requirements-front.txt").read_text().splitlines()
                 if "==" in line and not line.startswith("#"))
    pins = {name.split("[")[0]: version for name, version in pins.items()}
    assert front and all(pins[name.split("[")[0]] == version for name, version in front.items()), front
    dockerfile = FRONT_DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["python3", "-m", "flux2_serving.front"', dockerfile, re.M)
    assert modules_imported_by("flux2_serving.front.app", ("torch", "diffusers", "transformers", "onnx")) == []


def test_the_image_refuses_a_streamed_tier_without_tensorrt_in_one_line(tmp_path, monkeypatch, capsys):
    """The 32gb-fp8 tier runs TensorRT inside the Python-backend stub (runtime tensorrt_streamed); the serving image
    has no tensorrt Python package, so its entry point refuses such a repository before starting anything."""
    from flux2_serving.server import serve

    repository = tmp_path / "models"
    for name, runtime in (("text_encoder", "tensorrt_streamed"), ("vae_decoder", "onnxruntime")):
        (repository / name).mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(f'parameters {{ key: "runtime" value: {{ string_value: '
                                                         f'"{runtime}" }} }}\n')
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails, whether or not it is installed
    monkeypatch.setattr(serve.subprocess, "Popen", lambda *a, **k: pytest.fail("started something"))
    monkeypatch.setattr(serve.os, "execvpe", lambda *a, **k: pytest.fail("exec'd tritonserver"))
    assert serve.main([f"--model-repository={repository}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("flux2_serving.server.serve: text_encoder stream their weights") and len(lines) <= 2
    assert serve.streamed_without_tensorrt([f"--model-repository={tmp_path / 'none'}"]) is None

