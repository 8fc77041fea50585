"""deploy/: the Kubernetes manifests validated offline against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail), and the references between them checked, since
a selector or port name that matches nothing validates fine and serves nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ("1.30", "1.37")  # a 2024 cluster and the newest schemas the package holds
NOT_RESOURCES = {"kustomization.yaml", "prometheus-adapter-values.yaml"}


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
    import kubernetes_validate

    validated = []
    for file, doc in _documents():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD (Prometheus Operator): checked by the test below
        kubernetes_validate.validate(doc, version, strict=True)
        validated.append(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Ingress", "PersistentVolumeClaim", "ConfigMap"} <= set(validated)


def test_validation_rejects_a_misspelt_field():
    import kubernetes_validate

    deployment = _one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesprobe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def _triton(deployment: dict) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")


def test_replica_shape_one_gpu_probes_shm_and_explicit_model_control():
    deployment = _one("Deployment")
    triton = _triton(deployment)
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for probe in ("startupProbe", "readinessProbe"):
        assert triton[probe]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["startupProbe"]["periodSeconds"] * triton["startupProbe"]["failureThreshold"] >= 600  # engines load
    liveness = triton["livenessProbe"]["exec"]["command"]
    assert "/opt/flux2/watchdog.py" in liveness and "--once" in liveness
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in triton["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "--model-control-mode=explicit" in triton["args"] and "--load-model=*" in triton["args"]
    watchdog = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "watchdog")
    assert "/opt/flux2/watchdog.py" in watchdog["command"]
    # The image puts the watchdog where the manifests run it, and the pool is the image's (the plan's).
    dockerfile = (ROOT / "docker" / "serving.Dockerfile").read_text()
    assert re.search(r"^COPY .*watchdog\.py /opt/flux2/watchdog\.py$", dockerfile, re.M)
    pool = re.search(r"^ENV CUDA_POOL_BYTES=(\d+)$", dockerfile, re.M).group(1)
    assert f"--cuda-memory-pool-byte-size=0:{pool}" in triton["args"]


def test_selectors_ports_and_names_refer_to_what_exists():
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in _triton(deployment)["ports"]}
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    service = _one("Service")
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
    from clients.api import ROUTING_HEADER
    from server.gateway import ROUTING_HEADER as GATEWAY_HEADER

    variable = "$http_" + ROUTING_HEADER.replace("-", "_")
    assert GATEWAY_HEADER == ROUTING_HEADER
    assert variable in (ROOT / "deploy" / "nginx" / "flux2-gateway.conf").read_text()
    assert variable in _one("ConfigMap")["data"]["http-snippet"]
