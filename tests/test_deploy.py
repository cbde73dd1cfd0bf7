"""Checks of deploy/: the Kubernetes manifests against the API schemas, and the
ports, image, settings and metric names that the manifests, the compose file,
the Prometheus and Grafana configs and the Dockerfile must agree on.

Needs neither network, docker nor a cluster: the manifests are rendered by
`kubectl kustomize` (scripts/ensure-test-tools.sh installs kubectl).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from dworkers import devcerts

pytestmark = pytest.mark.unit

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "dev", K8S / "overlays" / "production",
                  K8S / "overlays" / "operators", K8S / "overlays" / "secure"]
# Custom resources of operators (Prometheus Operator, KEDA, cert-manager): no schema in kubernetes_validate.
OPERATOR_GROUPS = {"monitoring.coreos.com", "keda.sh", "cert-manager.io"}

# The services' contract.
GRPC_PORTS = {"master": 7100, "frontend": 7000}
METRICS_PORTS = {"master": 9100, "worker": 9101, "frontend": 9102, "dashboard": 9103}
HTTP_PORTS = {"dashboard": 8080}  # the web dashboard; it talks to frontends only (no ZooKeeper)
ROLES = set(METRICS_PORTS)
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
IMAGE = f"dworkers:{VERSION}"  # Kubernetes runs a version, never `latest`
COMPOSE_IMAGE = IMAGE  # compose builds it locally, tagged with the version too
HEALTH_SERVICES = {"master": "dworkers.v1.Master", "frontend": "dworkers.v1.Frontend"}
METRICS = {
    # counters
    "dworkers_works_accepted_total", "dworkers_works_started_total",
    "dworkers_works_completed_total", "dworkers_works_failed_total",
    "dworkers_works_timed_out_total", "dworkers_failovers_total",
    "dworkers_executions_total", "dworkers_grpc_requests_total",
    # gauges
    "dworkers_pending_works", "dworkers_in_progress_works", "dworkers_worker_slots",
    "dworkers_worker_processes",
    "dworkers_pending_works_without_worker", "dworkers_oldest_pending_seconds",
    "dworkers_master_active", "dworkers_master_epoch", "dworkers_recovery_seconds",
    "dworkers_master_shard", "dworkers_master_shard_slots",
}
HISTOGRAMS = {
    "dworkers_journal_append_seconds", "dworkers_journal_events_per_append",
    "dworkers_execution_seconds", "dworkers_grpc_request_seconds", "dworkers_queue_wait_seconds",
}

# Oldest Kubernetes the manifests target, and the newest the schemas know.
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]


# --- loading ------------------------------------------------------------------

def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def kubectl() -> str:
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("kubectl is needed to render the manifests: run scripts/ensure-test-tools.sh")
    return found


def find(docs: list[dict], kind: str, name: str) -> int:
    hits = [i for i, d in enumerate(docs) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def render(directory: Path) -> list[dict]:
    """The resources a kustomization builds, as `kubectl kustomize` renders them."""
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def config_map(docs: list[dict], name: str) -> str:
    """The generated name (with its content hash) of a ConfigMap from a generator."""
    (found,) = [d["metadata"]["name"] for d in docs
                if d["kind"] == "ConfigMap" and d["metadata"]["name"].rsplit("-", 1)[0] == name]
    return found


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def role_of(container: dict) -> str | None:
    """The dworkers role a container runs, None for other images."""
    if not container["image"].split(":")[0].endswith("dworkers"):
        return None
    return (container.get("command") or container.get("args"))[0]


def dworkers_containers(docs: list[dict]) -> dict[str, tuple[dict, dict]]:
    """role -> (workload, container)."""
    found = {}
    for workload in workloads(docs):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            role = role_of(container)
            if role is not None:
                assert role not in found, f"two workloads run {role}"
                found[role] = (workload, container)
    return found


def ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def seconds(duration: str) -> int:
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, f"unparsed duration {duration!r}"
    return int(parts[1] or 0) * 60 + int(parts[2] or 0)


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def rendered(request) -> list[dict]:
    return render(request.param)


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(K8S / "base")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


# --- Kubernetes ---------------------------------------------------------------

@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_files_exist_and_parse(directory):
    spec = kustomization(directory)
    assert spec["kind"] == "Kustomization"
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            assert (path / "kustomization.yaml").is_file(), f"{entry}: no kustomization.yaml"
        else:
            docs = load_docs(path)
            assert docs, f"{entry} is empty"
            for doc in docs:
                assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{entry}: not a resource"
    for entry in spec.get("patches", []):
        # `patches` takes one document per file.
        (patch,) = load_docs(directory / entry["path"])
        assert patch["metadata"]["name"], entry
    if directory.name == "base":
        listed = {directory / r for r in spec["resources"]}
        orphans = set(directory.glob("*.yaml")) - listed - {directory / "kustomization.yaml"}
        assert not orphans, f"not in kustomization.yaml: {sorted(p.name for p in orphans)}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_kubernetes_schemas(rendered, version):
    errors = []
    for doc in rendered:
        if doc["apiVersion"].split("/")[0] in OPERATOR_GROUPS:
            continue  # test_operator_resources
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not errors, "\n".join(errors)


def test_namespace_is_created(base):
    namespace = kustomization(K8S / "base")["namespace"]
    assert namespace == "dworkers"
    find(base, "Namespace", namespace)


def test_pods_are_scraped_hardened_and_bounded(rendered):
    for workload in workloads(rendered):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]
        notes = pod["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/scrape") == "true", name
        assert notes.get("prometheus.io/path") == "/metrics", name
        spec = pod["spec"]
        assert int(notes["prometheus.io/port"]) in [
            ports(c).get("metrics") for c in spec["containers"]], f"{name}: scrape port"
        # Service links put DWORKERS_<SERVICE>_PORT=tcp://... into the environment.
        assert spec.get("enableServiceLinks") is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in spec["containers"]:
            where = f"{name}/{container['name']}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{where} {bound}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where


def test_dworkers_workloads_follow_the_contract(rendered):
    by_role = dworkers_containers(rendered)
    assert set(by_role) == ROLES
    images = {i["name"] for i in kustomization(K8S / "base")["images"]}
    for role, (workload, container) in by_role.items():
        assert container["image"] == IMAGE and container["image"].split(":")[0] in images
        found = ports(container)
        assert found.get("metrics") == METRICS_PORTS[role], role
        assert found.get("grpc") == GRPC_PORTS.get(role), role
        notes = workload["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/port"] == str(METRICS_PORTS[role]), role
        assert {"configMapRef": {"name": config_map(rendered, "dworkers-config")}} in container["envFrom"], role
        if role in HEALTH_SERVICES and "DWORKERS_TLS_CERT" in env(container):
            # gRPC probes cannot speak TLS: the health check with the process's own files
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["exec"]["command"] == ["dworkers", "healthcheck"], (role, probe)
                assert "grpc" not in container[probe], (role, probe)
        elif role in HEALTH_SERVICES:
            ready, live = container["readinessProbe"], container["livenessProbe"]
            # a master is ready as a backend, standby or active (see test_a_drain_can_evict_the_active_master)
            assert ready["grpc"] == {"port": GRPC_PORTS[role], "service": "" if role == "master" else
                                     HEALTH_SERVICES[role]}
            assert live["grpc"]["port"] == GRPC_PORTS[role]
            assert live["grpc"].get("service", "") == "", role
        elif role in HTTP_PORTS:
            assert found.get("http") == HTTP_PORTS[role], role
            scheme = "HTTPS" if "DWORKERS_HTTPS_CERT" in env(container) else "HTTP"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = container[probe]["httpGet"]
                assert (get["path"], get["port"], get.get("scheme", "HTTP")) == ("/healthz", "http", scheme), probe
        else:
            for probe in ("readinessProbe", "livenessProbe"):
                assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    master = by_role["master"][1]
    names = [e["name"] for e in master["env"]]
    assert env(master)["DWORKERS_ADVERTISE"] == f"$(POD_IP):{GRPC_PORTS['master']}"
    # $(POD_IP) only expands if POD_IP is defined earlier in the list.
    assert names.index("POD_IP") < names.index("DWORKERS_ADVERTISE")
    pod_ip = master["env"][names.index("POD_IP")]["valueFrom"]["fieldRef"]["fieldPath"]
    assert pod_ip == "status.podIP"
    worker = by_role["worker"][0]["spec"]
    assert "replicas" not in worker, "the HorizontalPodAutoscaler owns the worker count"
    # SIGKILL must not cut a worker's shutdown grace short.
    grace = float(env(by_role["worker"][1])["DWORKERS_SHUTDOWN_GRACE"])
    assert worker["template"]["spec"]["terminationGracePeriodSeconds"] > grace


def secret_mounted_at(workload: dict, container: dict):
    """path -> the name of the Secret the container reads that file from."""
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in pod["volumes"]}

    def secret_of(path: str) -> str:
        directory = path.rsplit("/", 1)[0]
        assert directory in mounts, path
        return volumes[mounts[directory]]
    return secret_of


def test_the_secure_overlay_locks_every_hop():
    docs = render(K8S / "overlays" / "secure")
    by_role = dworkers_containers(docs)
    certificates = {d["spec"]["secretName"]: d for d in docs if d["kind"] == "Certificate"}
    (issuer,) = [d for d in docs if d["kind"] == "Issuer"]
    master_names = certificates["dworkers-master-tls"]["spec"]["dnsNames"]
    frontend_names = certificates["dworkers-frontend-tls"]["spec"]["dnsNames"]
    for role, (workload, container) in by_role.items():
        settings = env(container)
        if role in HTTP_PORTS:  # the dashboard: HTTPS with its own certificate, TLS to frontends, no ZooKeeper
            secret_of = secret_mounted_at(workload, container)
            files = ("DWORKERS_HTTPS_CERT", "DWORKERS_HTTPS_KEY", "DWORKERS_TLS_CA")
            assert {secret_of(settings[k]) for k in files} == {"dworkers-dashboard-tls"}
            assert "server auth" in certificates["dworkers-dashboard-tls"]["spec"]["usages"]
            assert settings["DWORKERS_TLS_SERVER_NAME"] in frontend_names
            assert not any(k.startswith("DWORKERS_ZK") for k in settings), role
            continue
        secret_of = secret_mounted_at(workload, container)
        tls_secret = secret_of(settings["DWORKERS_TLS_CERT"])
        assert {secret_of(settings[k]) for k in ("DWORKERS_TLS_KEY", "DWORKERS_TLS_CA")} == {tls_secret}
        certificate = certificates[tls_secret]["spec"]  # each role its own, from the CA's Issuer
        assert certificate["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "Issuer"}
        assert certificate["commonName"] == f"dworkers-{role}"
        assert "client auth" in certificate["usages"]
        assert ("server auth" in certificate["usages"]) == (role in GRPC_PORTS), role
        assert secret_of(settings["DWORKERS_ZK_AUTH_FILE"]) == "dworkers-zookeeper"
        # masters write in ZooKeeper; the others get only the read-only user's key
        key = settings["DWORKERS_ZK_AUTH_FILE"].rsplit("/", 1)[1]
        assert key == ("auth" if role == "master" else "reader"), role
        if role == "master":
            assert settings["DWORKERS_ZK_READERS_FILE"].endswith("/reader")
        else:
            (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"]
                         if v.get("secret", {}).get("secretName") == "dworkers-zookeeper"]
            assert volume["secret"]["items"] == [{"key": "reader", "path": "reader"}], role
        if role in GRPC_PORTS:
            assert secret_of(settings["DWORKERS_ACCESS_FILE"]) == "dworkers-access"
        if role != "master":  # masters advertise pod IPs: their certificate carries this name
            assert settings["DWORKERS_TLS_SERVER_NAME"] in master_names
    assert env(by_role["master"][1])["DWORKERS_TLS_CLIENT_AUTH"] == "require"
    assert env(by_role["frontend"][1])["DWORKERS_TLS_CLIENT_AUTH"] in ("none", "require")
    assert issuer["spec"]["ca"]["secretName"] == "dworkers-ca"


def test_services_and_budgets_select_pods(rendered):
    templates = [w["spec"]["template"]["metadata"]["labels"] for w in workloads(rendered)]

    def selects(selector: dict) -> bool:
        return any(selector.items() <= labels.items() for labels in templates)

    for doc in rendered:
        if doc["kind"] == "Service":
            assert selects(doc["spec"]["selector"]), f"Service {doc['metadata']['name']}"
        if doc["kind"] == "PodDisruptionBudget":
            assert selects(doc["spec"]["selector"]["matchLabels"]), doc["metadata"]["name"]
        if doc["kind"] == "HorizontalPodAutoscaler":
            target = doc["spec"]["scaleTargetRef"]
            find(rendered, target["kind"], target["name"])
    by_role = dworkers_containers(rendered)
    for role, port in GRPC_PORTS.items():
        service = rendered[find(rendered, "Service", f"dworkers-{role}")]
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == port and service_port["appProtocol"] == "grpc"
        assert service_port["targetPort"] in ("grpc", port)
        labels = by_role[role][0]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), role
    for role in ROLES:
        budgets = [d for d in rendered if d["kind"] == "PodDisruptionBudget"
                   and d["spec"]["selector"]["matchLabels"].items()
                   <= by_role[role][0]["spec"]["template"]["metadata"]["labels"].items()]
        assert len(budgets) == 1, f"{role}: PodDisruptionBudget"


def test_config_points_at_the_bundled_zookeeper(base):
    (generator,) = [g for g in kustomization(K8S / "base")["configMapGenerator"]
                    if g["name"] == "dworkers-config"]
    config = dict(literal.split("=", 1) for literal in generator["literals"])
    assert config["DWORKERS_ROOT"].startswith("/")
    host, port = config["DWORKERS_ZK"].split(":")
    service = base[find(base, "Service", host)]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]


def test_zookeeper_ensemble_lists_every_replica(rendered):
    sts = rendered[find(rendered, "StatefulSet", "zookeeper")]
    spec = sts["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    assert container["image"].startswith("zookeeper:3.8")
    servers = env(container)["ZOO_SERVERS"].split()
    expected = [f"server.{i + 1}={sts['metadata']['name']}-{i}.{spec['serviceName']}:2888:3888;2181"
                for i in range(spec["replicas"])]
    assert servers == expected
    headless = rendered[find(rendered, "Service", spec["serviceName"])]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] in [
        m["name"] for m in container["volumeMounts"]]
    budget = rendered[find(rendered, "PodDisruptionBudget", "zookeeper")]
    assert budget["spec"]["maxUnavailable"] == 1


def secret_ref(container: dict, name: str) -> dict | None:
    """The secretKeyRef an env var of a container takes its value from."""
    for item in container.get("env", []):
        if item["name"] == name:
            return item.get("valueFrom", {}).get("secretKeyRef")
    return None


def test_the_dev_overlay_journals_to_its_own_postgresql_with_a_volume():
    docs = render(K8S / "overlays" / "dev")
    master = dworkers_containers(docs)["master"][1]
    assert env(master)["DWORKERS_JOURNAL"].startswith("postgresql://dworkers@postgresql:5432/")
    assert ":" not in env(master)["DWORKERS_JOURNAL"].split("//", 1)[1].split("@")[0], "no password in the URL"
    secret = secret_ref(master, "PGPASSWORD")
    find(docs, "Secret", secret["name"])
    sts = docs[find(docs, "StatefulSet", "postgresql")]
    (database,) = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "postgresql"]
    assert database["image"].startswith("postgres:")
    assert secret_ref(database, "POSTGRES_PASSWORD") == secret
    mounts = {m["name"]: m["mountPath"] for m in database["volumeMounts"]}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert env(database)["PGDATA"].startswith(mounts[claim["metadata"]["name"]] + "/")
    service = docs[find(docs, "Service", "postgresql")]
    assert [p["port"] for p in service["spec"]["ports"]] == [5432]
    assert all(d["metadata"].get("namespace") == "dworkers" for d in docs if d["kind"] != "Namespace")


def test_the_production_overlay_reads_the_journal_from_a_secret_and_runs_no_database():
    docs = render(K8S / "overlays" / "production")
    master = dworkers_containers(docs)["master"][1]
    assert secret_ref(master, "DWORKERS_JOURNAL") == {"name": "dworkers-journal", "key": "url"}
    assert secret_ref(master, "PGPASSWORD") == {"name": "dworkers-journal", "key": "password"}
    assert not [d for d in workloads(docs) if d["metadata"]["name"] == "postgresql"]


def test_compose_masters_journal_to_postgresql(compose):
    database = compose["services"]["postgresql"]
    assert database["image"].startswith("postgres:")
    for name, role in compose_roles(compose).items():
        if role != "master":
            continue
        svc = compose["services"][name]
        assert svc["environment"]["DWORKERS_JOURNAL"] == (
            f"postgresql://{database['environment']['POSTGRES_USER']}@postgresql:5432/"
            f"{database['environment']['POSTGRES_DB']}")
        assert svc["environment"]["PGPASSWORD"] == database["environment"]["POSTGRES_PASSWORD"]
        assert svc["depends_on"]["postgresql"]["condition"] == "service_healthy"


# --- Docker Compose and Prometheus ----------------------------------------------

def compose_roles(compose: dict) -> dict[str, str]:
    """service name -> dworkers role."""
    return {name: svc["command"][0] for name, svc in compose["services"].items()
            if "build" in svc or svc.get("image", "").startswith("dworkers")}


def test_compose_runs_every_role_from_one_image(compose):
    roles = compose_roles(compose)
    assert sorted(roles.values()) == ["dashboard", "frontend", "master", "master", "worker"]
    for name, role in roles.items():
        svc = compose["services"][name]
        assert svc["image"] == COMPOSE_IMAGE, name
        context = (DEPLOY / svc["build"]["context"]).resolve()
        assert context == ROOT and (context / svc["build"]["dockerfile"]).is_file(), name
        if role in HTTP_PORTS:
            assert svc["command"][svc["command"].index("--frontend") + 1] == "frontend:7000"
        else:
            assert svc["environment"]["DWORKERS_ZK"] == "zookeeper:2181"
    assert compose["services"]["zookeeper"]["image"] == "zookeeper:3.8"
    for name in (n for n, r in roles.items() if r == "master"):
        advertise = compose["services"][name]["environment"]["DWORKERS_ADVERTISE"]
        assert advertise == f"{name}:{GRPC_PORTS['master']}"
    (worker,) = [compose["services"][n] for n, r in roles.items() if r == "worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert int(worker["environment"]["DWORKERS_CONCURRENCY"]) >= 1
    grace = float(worker["environment"]["DWORKERS_SHUTDOWN_GRACE"])
    assert seconds(worker["stop_grace_period"]) > grace


def test_compose_ports_and_grace_periods_match_kubernetes(compose, base):
    by_role = dworkers_containers(base)
    for name, role in compose_roles(compose).items():
        svc = compose["services"][name]
        exposed = {int(p) for p in svc.get("expose", [])}
        published = {int(p.split(":")[-1]) for p in svc.get("ports", [])}
        assert exposed | published == set(ports(by_role[role][1]).values()), name
        grace = by_role[role][0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert seconds(svc["stop_grace_period"]) == grace, name
    # published on this machine's loopback only, unless someone means otherwise
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    assert "127.0.0.1:7000:7000" in compose["services"]["frontend"]["ports"]


def test_prometheus_scrapes_every_compose_service(compose):
    mount = next(v for v in compose["services"]["prometheus"]["volumes"] if "prometheus.yml" in v)
    config = yaml.safe_load((DEPLOY / mount.split(":")[0]).read_text())
    targets = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets |= {(h, int(p)) for h, p in (t.split(":") for t in static["targets"])}
        for dns in job.get("dns_sd_configs", []):
            targets |= {(name, dns["port"]) for name in dns["names"]}
    for name, role in compose_roles(compose).items():
        assert (name, METRICS_PORTS[role]) in targets, name
    unknown = {host for host, _ in targets} - set(compose["services"])
    assert not unknown, f"scrape targets with no compose service: {unknown}"


# --- Grafana --------------------------------------------------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right",
                "and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are neither
    functions (followed by a parenthesis) nor keywords."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    words = re.findall(r"(?<![\w.$])([A-Za-z_:][\w:]*)(?!\w)(?!\s*\()", expr)
    return set(words) - PROMQL_WORDS


def test_metric_names_parser():
    expr = ('histogram_quantile(0.99, sum by (le, kind) (rate(dworkers_x_bucket{a="b"}[5m])))'
            " / ignoring (kind) sum(up and on (instance) (dworkers_y == 1))")
    assert metric_names(expr) == {"dworkers_x_bucket", "up", "dworkers_y"}


def test_grafana_dashboard_uses_dworkers_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "dworkers-dashboard.json").read_text())
    assert dashboard["schemaVersion"] >= 36
    # file-provisionable: no import-time inputs, the data source is a variable
    assert "__inputs" not in dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["includeAll"] and variables["instance"]["multi"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            selectors = re.findall(r"\bdworkers_[a-z_]+(\{[^}]*\})?", expr)
            assert all('instance=~"$instance"' in sel for sel in selectors), f"not scoped to $instance: {expr}"
            names = metric_names(expr)
            assert names and all(n.startswith("dworkers_") for n in names), expr
            for counter in (n for n in names if n.endswith("_total")):
                rated = re.search(rf"\b(rate|increase)\(\s*{counter}\b", expr)
                assert rated, f"counter outside rate(): {expr}"
            used |= names
    histogram_series = {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
    unknown = used - METRICS - histogram_series
    assert not unknown, f"not metrics of dworkers: {unknown}"
    assert METRICS <= used, f"not on the dashboard: {METRICS - used}"
    assert {h + "_bucket" for h in HISTOGRAMS} <= used


# --- Dockerfile -----------------------------------------------------------------

def dockerfile_stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """ARG defaults before the first FROM, and the (INSTRUCTION, rest) of each stage."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    args, stages = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
        elif keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args, stages


def test_dockerfile_builds_a_slim_non_root_image():
    args, stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build"
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], rest.split()[0])
             for stage in stages for kw, rest in stage if kw == "FROM"]
    assert bases[0] == bases[-1]
    # the public base pinned by digest: a rebuild gets the same Python and Debian
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", bases[0]), bases[0]
    build, final = stages[0], stages[-1]
    # the package's build generates the gRPC code (setup.py), in the build stage only
    assert any("pip install --no-deps ." in rest for kw, rest in build if kw == "RUN")
    final_text = " ".join(rest for _, rest in final)
    assert "grpcio-tools" not in final_text and "protoc" not in final_text
    (entrypoint,) = [rest for kw, rest in final if kw == "ENTRYPOINT"]
    # tini as PID 1: SIGTERM reaches dworkers, and orphaned job processes are reaped
    assert json.loads(entrypoint) == ["tini", "--", "dworkers"]
    users = [rest.split(":")[0] for kw, rest in final if kw == "USER"]
    assert users and users[-1] not in ("root", "0")
    exposed = {int(p) for kw, rest in final if kw == "EXPOSE" for p in rest.split()}
    assert exposed == set(GRPC_PORTS.values()) | set(METRICS_PORTS.values()) | set(HTTP_PORTS.values())


def test_dockerfile_copies_what_the_package_needs():
    _, stages = dockerfile_stages()
    sources = [rest.split()[:-1] for stage in stages for kw, rest in stage
               if kw == "COPY" and not rest.startswith("--from")]
    sources = {s.rstrip("/") for group in sources for s in group}
    assert {"pyproject.toml", "setup.py", "protos", "services"} <= sources
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for source in sources:
        assert (ROOT / source).exists(), source
        assert f"!{source}" in ignore, f"Dockerfile.dockerignore leaves out {source}"
    if tomllib is None:
        return
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # Files that the package metadata reads at build time must be copied too.
    readme, license_ = project.get("readme"), project.get("license")
    for needed in (readme.get("file") if isinstance(readme, dict) else readme,
                   license_.get("file") if isinstance(license_, dict) else None):
        assert needed is None or needed in sources, f"pyproject.toml needs {needed}; COPY it"


# --- drains, rollouts, network policies, operators ---------------------------------


def test_a_drain_can_evict_the_active_master_and_a_rollout_never_takes_both_down(base):
    """The standby is ready (readiness is being a backend, not leading), so the
    budget of one unavailable lets the active master be evicted; a rollout
    adds a ready backend before it removes one."""
    master = base[find(base, "Deployment", "dworkers-master")]
    budget = base[find(base, "PodDisruptionBudget", "dworkers-master")]["spec"]
    assert master["spec"]["replicas"] >= 2
    assert budget.get("maxUnavailable") == 1 and "minAvailable" not in budget
    (container,) = master["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    rolling = master["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] == 1


def test_the_image_is_a_version_that_matches_the_package(base):
    (entry,) = kustomization(K8S / "base")["images"]
    assert entry["newTag"] == VERSION and entry["newTag"] != "latest"


def _allowed(policies: list[dict], labels: dict, port) -> list[dict]:
    """The ingress rules of the policies selecting a pod with `labels` that open `port` (to someone)."""
    rules = []
    for policy in policies:
        selector = policy["spec"]["podSelector"]
        if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
            continue
        for rule in policy["spec"].get("ingress", []):
            if any(p["port"] == port for p in rule.get("ports", [])):
                rules.append(rule)
    return rules


def test_network_policies_deny_by_default_and_open_only_what_each_role_serves(rendered):
    policies = [d for d in rendered if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"], "no default deny"
    for workload in workloads(rendered):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        name = workload["metadata"]["name"]
        metrics = [p for c in workload["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])
                   if p["name"] == "metrics"]
        assert metrics and all(_allowed(policies, labels, "metrics") or _allowed(policies, labels, p["containerPort"])
                               for p in metrics), f"{name}: Prometheus cannot scrape it"
    master = {"app.kubernetes.io/name": "dworkers", "app.kubernetes.io/component": "master"}
    (rule,) = _allowed(policies, master, "grpc")
    (peers,) = rule["from"]
    components = next(e["values"] for e in peers["podSelector"]["matchExpressions"]
                      if e["key"] == "app.kubernetes.io/component")
    assert sorted(components) == ["frontend", "worker"], "only frontends and workers reach a master"
    frontend = {"app.kubernetes.io/name": "dworkers", "app.kubernetes.io/component": "frontend"}
    assert any("from" not in r for r in _allowed(policies, frontend, "grpc")), "clients cannot reach the frontends"


@pytest.fixture(scope="module")
def operators() -> list[dict]:
    return render(K8S / "overlays" / "operators")


def test_operator_resources_watch_the_metrics_that_exist(operators, tmp_path):
    kinds = {d["kind"]: d for d in operators if d["apiVersion"].split("/")[0] in OPERATOR_GROUPS}
    assert set(kinds) == {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
    assert not [d for d in operators if d["kind"] == "HorizontalPodAutoscaler"], "KEDA owns the worker count"
    # the ServiceMonitor selects a Service that selects every dworkers pod, on its `metrics` port
    monitor = kinds["ServiceMonitor"]["spec"]
    service = next(d for d in operators if d["kind"] == "Service" and all(
        d["metadata"].get("labels", {}).get(k) == v for k, v in monitor["selector"]["matchLabels"].items()))
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "dworkers"}
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]
    # the alerting rules load in Prometheus, and name only metrics dworkers serves
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": kinds["PrometheusRule"]["spec"]["groups"]}))
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian's prometheus package) is installed by `make test`"
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    alerts = {r["alert"]: r["expr"] for g in kinds["PrometheusRule"]["spec"]["groups"] for r in g["rules"]}
    assert {"DworkersNoActiveMaster", "DworkersFailovers", "DworkersOldestPendingWork", "DworkersJournalSlow",
            "DworkersWorkersGone"} <= set(alerts)
    scaled = kinds["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "dworkers-worker"
    queries = [*alerts.values(), *(t["metadata"]["query"] for t in scaled["triggers"])]
    named = {m for q in queries for m in re.findall(r"\bdworkers_[a-z_]+", q)}
    known = METRICS | {f"{h}_bucket" for h in HISTOGRAMS}
    assert named <= known, f"unknown metrics: {sorted(named - known)}"


def test_the_lock_pins_every_dependency_and_the_generator():
    """`make setup` and the image install with `-c constraints.txt`: every
    runtime and development dependency (and the code generator) is pinned there."""
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[re.sub(r"[-_.]+", "-", name).lower()] = version
    wanted = [*project["project"]["dependencies"], *project["project"]["optional-dependencies"]["dev"],
              *project["build-system"]["requires"]]
    for requirement in wanted:
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~ ]", requirement)[0]).lower()
        if name == "setuptools":
            continue  # pip's own build tooling
        assert name in pinned, f"{requirement} is not pinned in constraints.txt"
    tools = next(r for r in project["build-system"]["requires"] if r.startswith("grpcio-tools"))
    assert tools == f"grpcio-tools=={pinned['grpcio-tools']}", "the generator's pin differs from the lock"


def test_the_secure_compose_file_gives_every_service_tls_and_its_secrets(compose, tmp_path):
    secure = yaml.safe_load((DEPLOY / "docker-compose.secure.yml").read_text())
    roles = compose_roles(compose)
    assert set(secure["services"]) == set(roles)
    declared = secure["secrets"]
    for name, role in roles.items():
        svc = secure["services"][name]
        environment = svc["environment"]
        mounted = {s["target"]: s["source"] for s in svc["secrets"]}
        if role in HTTP_PORTS:  # the dashboard: HTTPS, TLS to the frontend, no ZooKeeper, no access file
            for key in ("DWORKERS_HTTPS_CERT", "DWORKERS_HTTPS_KEY", "DWORKERS_TLS_CA"):
                assert mounted[environment[key].removeprefix("/run/secrets/")] in declared, (name, key)
            assert environment["DWORKERS_TLS_SERVER_NAME"] == "frontend"
            assert set(mounted.values()) == {"tls-cert", "tls-key", "tls-ca"}, name
            continue
        for key in ("DWORKERS_TLS_CERT", "DWORKERS_TLS_KEY", "DWORKERS_TLS_CA", "DWORKERS_ZK_AUTH_FILE"):
            target = environment[key].removeprefix("/run/secrets/")
            assert mounted[target] in declared, (name, key)
        assert all(s["uid"] == "10001" for s in svc["secrets"]), name  # readable by the image's user
        if role in GRPC_PORTS:
            assert environment["DWORKERS_ACCESS_FILE"].removeprefix("/run/secrets/") in mounted, name
        zk_secret = mounted[environment["DWORKERS_ZK_AUTH_FILE"].removeprefix("/run/secrets/")]
        assert zk_secret == ("zk-auth" if role == "master" else "zk-reader"), name  # the others only read
        if role != "master":
            assert "zk-auth" not in mounted.values(), name
        if role == "master":
            assert environment["DWORKERS_TLS_CLIENT_AUTH"] == "require"
            # masters advertise their service name: the certificate must carry it
            assert compose["services"][name]["environment"]["DWORKERS_ADVERTISE"].startswith(name + ":")
    # The files are the ones `dworkers dev-certs` writes (as the file's header says to run it).
    written = {p.name for p in devcerts.make(tmp_path, hosts=["master-1", "master-2", "frontend", "localhost"])}
    made_by_hand = {"access", "zk-auth", "zk-reader"}
    for secret in declared.values():
        name = Path(secret["file"]).name
        assert name in written or name in made_by_hand, name
    assert "deploy/secrets/" in (ROOT / ".gitignore").read_text().split()
