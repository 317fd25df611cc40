"""deploy/Dockerfile and deploy/kubernetes: the image's rules, the rendered manifests
against the Kubernetes API schemas, and the invariants that tie them to the gateway.

Neither docker, kubectl nor kustomize runs here: tests/kube_tooling.py parses the
Dockerfile, renders the kustomizations and evaluates the NetworkPolicies. The
ServiceMonitor is a CRD without a bundled schema: it is checked structurally. The
image's dependencies come from deploy/requirements.lock, checked against
pyproject.toml so that a new dependency fails here until it is re-locked.
"""

from __future__ import annotations

import copy
import ipaddress
import itertools
import re
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from yarl import URL

from gateway.drain import CLOSE_BUDGET_S
from gateway.server import FINAL_SHUTDOWN_S
from tests.conftest import StartGateway
from tests.kube_tooling import (
    BASE,
    DOCKERIGNORE,
    FAKE_SECRETS,
    KUSTOMIZATIONS,
    LOCK,
    PRODUCTION,
    ROOT,
    SCRAPE_CONFIG,
    Docs,
    Peer,
    all_containers,
    allowed,
    configmap_hash,
    container_port,
    dockerfile,
    dockerfile_user,
    dockerignored,
    effective_settings,
    exec_form,
    installed_packages,
    main_container,
    namespace_of,
    one,
    parse_cli,
    parse_lock,
    peer_matches,
    pod,
    pod_labels,
    pod_spec,
    prestop_seconds,
    quantity,
    relabel,
    render,
    run_healthcheck,
    selects,
    served_config,
)

#: The oldest Kubernetes the manifests target, and a newer one (schemas bundled offline).
K8S_VERSIONS = ("1.30.0", "1.34.0")
#: Seconds kept between the end of the drain and SIGKILL.
MARGIN_S = 5
BUILD_TOOLS = {"gcc", "g++", "cc", "clang", "make", "cmake", "build-essential", "git", "rustc"}


# --- the Dockerfile -------------------------------------------------------------------


def test_dockerfile_has_a_builder_and_a_pinned_slim_final_stage() -> None:
    stages = dockerfile()
    builder, final = stages[0], stages[-1]
    assert len(stages) >= 2 and builder.name == "builder"
    pinned = re.compile(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?")
    for stage in stages:
        assert pinned.fullmatch(stage.image), f"not a pinned python:3.11.x-slim: {stage.image}"
    # The venv's interpreter is a symlink into the base image: both must be the same.
    assert final.image == builder.image


def test_the_builder_installs_the_project_into_opt_venv() -> None:
    builder = dockerfile()[0]
    runs = " && ".join(builder.all("RUN"))
    assert "python -m venv /opt/venv" in runs
    assert "/opt/venv/bin" in builder.env()["PATH"].split(":")
    assert re.search(r"pip install (--[\w-]+ )*\.( |$)", runs), "the project is not installed"


def test_the_final_stage_copies_the_venv_and_installs_no_build_tools() -> None:
    final = dockerfile()[-1]
    assert "--from=builder /opt/venv /opt/venv" in final.all("COPY")
    for run in final.all("RUN"):
        assert "pip install" not in run, "dependencies belong in the builder stage"
        packages = installed_packages(run)
        assert not packages & BUILD_TOOLS, packages
        assert not [p for p in packages if p.endswith("-dev")], packages
    assert installed_packages("apt-get update && apt-get install -y --no-install-recommends gcc")
    env = final.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    uid, gid = dockerfile_user()
    assert uid >= 1000 and gid >= 1000
    runs = " ".join(dockerfile()[-1].all("RUN"))
    assert f"--uid {uid}" in runs and f"--gid {gid}" in runs, "the user has no passwd entry"


def test_entrypoint_and_cmd_are_the_real_cli() -> None:
    final = dockerfile()[-1]
    entrypoint = exec_form(final.last("ENTRYPOINT"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["gateway"] and "gateway" in scripts
    assert parse_cli(exec_form(final.last("CMD"))).config == "/etc/gateway/config.yaml"


async def test_the_healthcheck_passes_on_a_live_gateway_and_fails_without_one(
    start_gateway: StartGateway,
) -> None:
    server = await start_gateway()
    assert await run_healthcheck(server.port) == 0
    await server.close()
    assert await run_healthcheck(server.port) != 0


def test_the_dockerignore_sends_what_the_build_copies_and_nothing_local() -> None:
    lines = DOCKERIGNORE.read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for rest in dockerfile()[0].all("COPY"):
        for source in rest.split()[:-1]:
            assert (ROOT / source).exists(), source
            assert not dockerignored(source, patterns), f"{source} is not in the build context"
    package = [p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("*")]
    for path in package:
        if "__pycache__" not in path:
            assert not dockerignored(path, patterns), path
    for path in [".venv/bin/python", ".git/HEAD", "tests/conftest.py", "gateway/__pycache__/a.pyc"]:
        assert dockerignored(path, patterns), path


def test_the_parser_reads_a_lock() -> None:
    lock = parse_lock(
        "# header\nRedis==5.0.1 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via x\n"
    )
    assert lock == {"redis": ("5.0.1", ["a" * 64])}
    with pytest.raises(AssertionError):
        parse_lock("redis>=5\n")


def test_the_builder_installs_dependencies_only_from_the_hash_lock() -> None:
    builder = dockerfile()[0]
    runs = builder.all("RUN")
    copies = [rest.split() for rest in builder.all("COPY")]
    (lock_copy,) = [c for c in copies if c[0] == LOCK.relative_to(ROOT).as_posix()]
    lock_in_image = lock_copy[1]
    installs = [
        command.split()
        for run in runs
        for command in re.split(r"&&|;|\|\|", run)
        if "pip" in command.split() and "install" in command.split()
    ]
    assert installs, "no pip install in the builder"
    for words in installs:
        # Either the locked dependencies with their hashes, or the project alone.
        if "-r" in words:
            assert words[words.index("-r") + 1] == lock_in_image, words
            assert "--require-hashes" in words, words
        else:
            assert words[-1] == "." and "--no-deps" in words, f"unlocked install: {words}"
            assert "--no-build-isolation" in words, "the build backend would come unpinned"
    # The lock is installed before the project, and nothing else reaches pip.
    assert any("-r" in w for w in installs[:1]), "the lock must be installed first"


def test_every_dependency_is_pinned_with_hashes_in_the_lock() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lock = parse_lock(LOCK.read_text())
    # The image: CPython 3.11 on Linux (x86_64; the lock's hashes cover every wheel).
    environment = {"python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux"}
    environment |= {"platform_machine": "x86_64", "os_name": "posix"}
    wanted = project["project"]["dependencies"] + project["build-system"]["requires"]
    for line in wanted:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{name} is not in {LOCK.name}: re-lock (see deploy/Dockerfile)"
        version, hashes = lock[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name}=={version} in the lock does not satisfy {line}: re-lock"
        )
        assert hashes, f"{name} has no hash"
    for version, hashes in lock.values():
        assert hashes and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version)
    # The lock's header says how to regenerate it, with the same inputs.
    header = " ".join(
        itertools.takewhile(lambda line: line.startswith("#"), LOCK.read_text().splitlines())
    )
    assert "--generate-hashes" in header and "pyproject.toml" in header


# --- the kustomizations ---------------------------------------------------------------


def test_the_configmap_hash_is_kustomizes() -> None:
    # The vectors of kubectl's / kustomize's own hasher tests.
    assert configmap_hash("", {}) == "42745tchd9"
    assert configmap_hash("", {"one": ""}) == "9g67k2htb6"
    assert configmap_hash("", {"two": "2", "one": "", "three": "3"}) == "f5h7t85m9b"


def test_the_renderer_applies_the_overlay() -> None:
    base, production = render(BASE), render(PRODUCTION)
    assert len(production) == len(base) + 1  # the Namespace
    assert {d["metadata"].get("namespace") for d in production if d["kind"] != "Namespace"} == {
        yaml.safe_load((PRODUCTION / "kustomization.yaml").read_text())["namespace"]
    }
    base_env = [e["name"] for e in main_container(render(BASE))["env"]]
    production_env = [e["name"] for e in main_container(render(PRODUCTION))["env"]]
    assert production_env[: len(base_env)] == base_env and len(production_env) > len(base_env)


# --- schemas --------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", sorted(KUSTOMIZATIONS))
def test_every_manifest_is_valid_for_kubernetes(overlay: str, version: str) -> None:
    docs = render(KUSTOMIZATIONS[overlay])
    kinds = [doc["kind"] for doc in docs]
    expected = {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceMonitor"}
    assert expected | {"HorizontalPodAutoscaler", "NetworkPolicy"} <= set(kinds)
    names = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(set(names)) == len(names)
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD: test_the_servicemonitor_scrapes_the_metrics_port
        used = kubernetes_validate.validate(doc, version, strict=True)
        assert used == version.rsplit(".", 1)[0], f"schema {used} used for {version}"
    example = yaml.safe_load((BASE / "secret.example.yaml").read_text())
    kubernetes_validate.validate(example, version, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    deployment = copy.deepcopy(one(render(BASE), "Deployment"))
    pod_spec(deployment)["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


# --- invariants across the files ------------------------------------------------------


@pytest.fixture(params=sorted(KUSTOMIZATIONS))
def docs(request: pytest.FixtureRequest) -> Docs:
    return render(KUSTOMIZATIONS[request.param])


def test_the_configmap_loads_with_the_gateways_config_loader(docs: Docs, tmp_path: Path) -> None:
    settings = effective_settings(docs, tmp_path)
    assert settings.server.host == "0.0.0.0" and not settings.auth.anonymous
    assert settings.auth.ticket_secret is not None, "replicas must share the ticket secret"
    assert settings.server.metrics_port not in (None, settings.server.port)
    # The file holds no secret: each one comes from the environment.
    text = served_config(docs)
    assert not [value for value in FAKE_SECRETS.values() if value in text]
    assert re.search(r"api_key: \$\{\w+\}", text) and re.search(r"sha256: \$\{\w+\}", text)


def test_the_command_matches_the_image(docs: Docs) -> None:
    container = main_container(docs)
    image_cmd = parse_cli(exec_form(dockerfile()[-1].last("CMD")))
    assert parse_cli(container["args"]).config == image_cmd.config
    assert "command" not in container, "the image's ENTRYPOINT must stay `gateway`"


def test_termination_grace_outlasts_prestop_and_drain(docs: Docs, tmp_path: Path) -> None:
    settings = effective_settings(docs, tmp_path)
    pause = prestop_seconds(main_container(docs))
    assert pause >= 3, "endpoints need a few seconds to drop the pod"
    drain = settings.server.shutdown_grace_s + CLOSE_BUDGET_S + FINAL_SHUTDOWN_S
    grace = pod_spec(one(docs, "Deployment"))["terminationGracePeriodSeconds"]
    assert grace >= pause + drain + MARGIN_S, (grace, pause, drain)


def test_probes_and_ports_match_the_config(docs: Docs, tmp_path: Path) -> None:
    settings = effective_settings(docs, tmp_path)
    container = main_container(docs)
    paths = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in paths.items():
        if probe == "startupProbe" and probe not in container:
            continue
        http = container[probe]["httpGet"]
        assert http["path"] == path, probe
        assert container_port(container, http["port"]) == settings.server.port, probe
    ports = {p["containerPort"] for p in container["ports"]}
    assert ports == {settings.server.port, settings.server.metrics_port}
    exposed = {int(p) for rest in dockerfile()[-1].all("EXPOSE") for p in rest.split()}
    assert exposed == ports


def test_the_pod_is_annotated_for_scraping_the_metrics_port(docs: Docs, tmp_path: Path) -> None:
    settings = effective_settings(docs, tmp_path)
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(settings.server.metrics_port)
    assert container_port(main_container(docs), "metrics") == settings.server.metrics_port


def test_the_kubernetes_scrape_job_keeps_the_pod_and_targets_its_metrics_port(
    docs: Docs, tmp_path: Path
) -> None:
    settings = effective_settings(docs, tmp_path)
    template = one(docs, "Deployment")["spec"]["template"]["metadata"]
    meta = {"__address__": f"10.1.2.3:{settings.server.port}", "__metrics_path__": "/metrics"}
    for kind, source in (("label", template["labels"]), ("annotation", template["annotations"])):
        for name, value in source.items():
            meta[f"__meta_kubernetes_pod_{kind}_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"] = value
    (job,) = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    target = relabel(dict(meta), job["relabel_configs"])
    assert target is not None, "the scrape job drops the gateway's pods"
    assert target["__address__"] == f"10.1.2.3:{settings.server.metrics_port}"
    assert target["__metrics_path__"] == "/metrics"
    unlabelled = {k: v for k, v in meta.items() if "app_kubernetes_io_name" not in k}
    assert relabel(unlabelled, job["relabel_configs"]) is None


def test_service_pdb_and_hpa_target_the_deployment(docs: Docs) -> None:
    deployment, labels = one(docs, "Deployment"), pod_labels(docs)
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    service = one(docs, "Service")
    assert selects(service["spec"]["selector"], labels)
    for port in service["spec"]["ports"]:
        container_port(main_container(docs), port["targetPort"])  # names a container port
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    # A PDB that allows no eviction at the HPA's minimum would block every node drain.
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable", 0) >= 1 or pdb["minAvailable"] < hpa["minReplicas"]
    # Utilization is relative to the request: without one the HPA cannot scale.
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert quantity(main_container(docs)["resources"]["requests"]["cpu"]) > 0


def test_the_servicemonitor_scrapes_the_metrics_port(docs: Docs) -> None:
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"].get("namespace") == service["metadata"].get("namespace")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["targetPort"] == "metrics" and endpoint["path"] == "/metrics"
    # The alerts use job="gateway": the operator names the job after the Service.
    assert service["metadata"]["name"] == "gateway" and "jobLabel" not in monitor["spec"]


def test_the_pod_is_locked_down(docs: Docs) -> None:
    spec = pod_spec(one(docs, "Deployment"))
    uid, gid = dockerfile_user()
    assert spec["automountServiceAccountToken"] is False
    context = spec["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in all_containers(spec):
        own = container["securityContext"]
        assert own["allowPrivilegeEscalation"] is False
        assert own["readOnlyRootFilesystem"] is True
        assert own["capabilities"] == {"drop": ["ALL"]}
        assert own.get("runAsUser", uid) == uid and own.get("runAsNonRoot", True) is True
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        tmp = next(v for v in spec["volumes"] if v["name"] == mounts["/tmp"]["name"])
        assert "emptyDir" in tmp, "a read-only root needs a writable /tmp"
        assert all(m.get("readOnly") for m in mounts.values() if m["mountPath"] != "/tmp")
    assert {key for v in spec["volumes"] for key in v} <= {"name", "configMap", "emptyDir"}


def test_rollouts_and_spreading_keep_capacity(docs: Docs) -> None:
    deployment = one(docs, "Deployment")
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert (rolling["maxUnavailable"], rolling["maxSurge"]) == (0, 1)
    spec = pod_spec(deployment)
    spreads = {
        c["topologyKey"]
        for c in spec.get("topologySpreadConstraints", [])
        if selects(c["labelSelector"]["matchLabels"], pod_labels(docs))
    }
    anti = spec.get("affinity", {}).get("podAntiAffinity")
    assert "kubernetes.io/hostname" in spreads or anti, "replicas may share one node"
    for container in all_containers(spec):
        resources = container["resources"]
        for kind in ("cpu", "memory"):
            request, limit = resources["requests"][kind], resources["limits"][kind]
            assert 0 < quantity(request) <= quantity(limit), (kind, request, limit)


def test_secrets_are_referenced_but_never_rendered(docs: Docs) -> None:
    assert not [doc for doc in docs if doc["kind"] == "Secret"]
    example = yaml.safe_load((BASE / "secret.example.yaml").read_text())
    for directory in KUSTOMIZATIONS.values():
        resources = yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]
        assert "secret.example.yaml" not in resources
    refs = [
        entry["valueFrom"]["secretKeyRef"]
        for entry in main_container(docs)["env"]
        if "secretKeyRef" in entry.get("valueFrom", {})
    ]
    assert refs
    for ref in refs:
        assert ref["name"] == example["metadata"]["name"]
        assert ref["key"] in example["stringData"] and ref["key"] in FAKE_SECRETS
        assert ref.get("optional") is not True, "a missing secret must stop the pod"


def test_the_base_image_is_a_placeholder_and_production_pins_one() -> None:
    assert main_container(render(BASE))["image"] == "gateway"
    image = main_container(render(PRODUCTION))["image"]
    repository, _, tag = image.partition("@")[0].rpartition(":")
    assert "/" in repository and tag and tag != "latest", image


def test_production_shares_logs_and_limits_through_redis(tmp_path: Path) -> None:
    docs = render(PRODUCTION)
    settings = effective_settings(docs, tmp_path)
    assert settings.streams.backend == "redis" and settings.rate_limit.backend == "redis"
    assert settings.redis.url == FAKE_SECRETS["REDIS_URL"]
    assert one(docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 3
    namespace = one(docs, "Namespace")
    assert namespace["metadata"]["name"] == one(docs, "Deployment")["metadata"]["namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --- the NetworkPolicy ----------------------------------------------------------------

INGRESS_NAMESPACE = "ingress-nginx"
MONITORING_NAMESPACE = "monitoring"


def test_the_policy_evaluator_follows_kubernetes_semantics() -> None:
    docs = render(BASE)
    assert allowed(
        tuple(d for d in docs if d["kind"] != "NetworkPolicy"), "ingress", Peer("1.2.3.4"), 1
    )
    block = {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}
    assert peer_matches(block, Peer("8.8.8.8"), "default")
    assert not peer_matches(block, Peer("10.1.2.3"), "default")
    assert not peer_matches(block, Peer("2001:db8::1"), "default")
    same_namespace = {"podSelector": {"matchLabels": {"app": "x"}}}
    assert peer_matches(same_namespace, pod("a", "10.0.0.1", app="x"), "a")
    assert not peer_matches(same_namespace, pod("b", "10.0.0.1", app="x"), "a")


def test_the_network_policy_admits_only_the_ingress_controller_and_prometheus(
    docs: Docs, tmp_path: Path
) -> None:
    settings = effective_settings(docs, tmp_path)
    app, metrics = settings.server.port, settings.server.metrics_port
    own = namespace_of(one(docs, "Deployment"))
    controller = pod(INGRESS_NAMESPACE, "10.2.0.7", **{"app.kubernetes.io/name": "ingress-nginx"})
    prometheus = pod(MONITORING_NAMESPACE, "10.2.0.8", **{"app.kubernetes.io/name": "prometheus"})
    assert allowed(docs, "ingress", controller, app)
    assert allowed(docs, "ingress", prometheus, metrics)
    # Each only to its own port.
    assert not allowed(docs, "ingress", controller, metrics)
    assert not allowed(docs, "ingress", prometheus, app)
    strangers = [
        pod(own, "10.2.0.9", **{"app.kubernetes.io/name": "something-else"}),
        pod(own, "10.2.0.10", **{"app.kubernetes.io/name": "gateway"}),  # another replica
        pod(INGRESS_NAMESPACE, "10.2.0.11", app="not-the-controller"),
        pod(MONITORING_NAMESPACE, "10.2.0.12", **{"app.kubernetes.io/name": "grafana"}),
        pod("default", "10.2.0.13", **{"app.kubernetes.io/name": "ingress-nginx"}),
        Peer("203.0.113.5"),  # the internet, straight to the pod
    ]
    for stranger in strangers:
        for port in (app, metrics):
            assert not allowed(docs, "ingress", stranger, port), (stranger, port)
    # Every ingress rule names its ports and its sources: no "from anywhere" rule.
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("ports") and rule.get("from"), rule
            assert not [p for p in rule["from"] if "ipBlock" in p], rule


def test_the_network_policy_lets_out_only_dns_redis_and_https(docs: Docs, tmp_path: Path) -> None:
    settings = effective_settings(docs, tmp_path)
    own = namespace_of(one(docs, "Deployment"))
    redis_port = URL(settings.redis.url).port
    upstream = URL(settings.models[0].base_url)
    assert upstream.scheme == "https" and upstream.port == 443
    dns = pod("kube-system", "10.96.0.10", **{"k8s-app": "kube-dns"})
    redis = pod(own, "10.2.1.4", **{"app.kubernetes.io/name": "redis"})
    api = Peer("162.159.140.245")  # a public address, as api.openai.com resolves to
    assert allowed(docs, "egress", dns, 53, "UDP") and allowed(docs, "egress", dns, 53, "TCP")
    assert allowed(docs, "egress", redis, redis_port)
    assert allowed(docs, "egress", api, upstream.port)
    assert allowed(docs, "egress", Peer("2606:4700::6810:1"), 443)
    denied = [
        (Peer("8.8.8.8"), 53, "UDP"),  # DNS only through the cluster's resolver
        (pod(own, "10.2.1.5", **{"app.kubernetes.io/name": "postgres"}), redis_port, "TCP"),
        (pod("other", "10.3.0.4", **{"app.kubernetes.io/name": "redis"}), redis_port, "TCP"),
        (redis, 443, "TCP"),
        (dns, 443, "TCP"),
        (api, 80, "TCP"),  # plain HTTP, SSH, anything but 443
        (api, 22, "TCP"),
        (api, 443, "UDP"),
        (Peer(str(ipaddress.ip_address("169.254.169.254"))), 443, "TCP"),  # cloud metadata
        (Peer("169.254.169.254"), 80, "TCP"),
        (Peer("fd00::1"), 443, "TCP"),
    ]
    # No in-cluster address is reachable on 443: pods, Services and nodes of any
    # of the usual cluster CIDRs.
    for address in ("10.0.0.1", "10.96.0.1", "172.20.0.1", "192.168.1.1", "100.64.0.1"):
        denied.append((pod("kube-system", address, component="kube-apiserver"), 443, "TCP"))
        denied.append((Peer(address), 443, "TCP"))
    for peer, port, protocol in denied:
        assert not allowed(docs, "egress", peer, port, protocol), (peer, port, protocol)
    # The policies select the gateway and are in its namespace.
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert {namespace_of(p) for p in policies} == {own}
    for policy in policies:
        assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(docs))
        for rule in policy["spec"].get("egress", []):
            assert rule.get("ports") and rule.get("to"), rule
