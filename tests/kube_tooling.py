"""Tools that read the deployment files the way Docker, kustomize, Kubernetes and
Prometheus would, for tests/test_deploy_kubernetes.py (none of them runs here).

The Dockerfile is parsed into stages; the kustomizations are rendered by `render`,
a small subset of kustomize (resources, configMapGenerator with kustomize's name
hash, namespace, images and strategic-merge `patches`) that refuses a field it does
not implement, so a new field cannot be silently ignored; `allowed` evaluates the
NetworkPolicies with Kubernetes' additive semantics against concrete peers; the
lock is read as pip-compile writes it.
"""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import functools
import hashlib
import ipaddress
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.utils import canonicalize_name

from gateway import cli
from gateway.config import Settings, load_settings

#: An object of a manifest, or a part of one, as YAML loads it; and a rendered kustomization.
Doc = dict[str, Any]
Docs = tuple[Doc, ...]

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
LOCK = ROOT / "deploy" / "requirements.lock"
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
PRODUCTION = KUBERNETES / "overlays" / "production"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "kubernetes-scrape.yml"
KUSTOMIZATIONS = {"base": BASE, "production": PRODUCTION}
#: Stand-ins for the Secret's values (the real ones are never committed).
FAKE_SECRETS = {
    "OPENAI_API_KEY": "sk-test",
    "FRONTEND_API_KEY_SHA256": hashlib.sha256(b"gw_test").hexdigest(),
    "TICKET_SECRET": "t" * 43,
    "REDIS_URL": "redis://:pw@redis.test:6379/1",
}


# --- the Dockerfile and its build context ---------------------------------------------


@dataclass
class Stage:
    """One `FROM` of the Dockerfile and the instructions that follow it."""

    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.image}"
        return found[-1]

    def env(self) -> dict[str, str]:
        pairs = [item.split("=", 1) for rest in self.all("ENV") for item in shlex.split(rest)]
        return dict(pairs)


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions (continuations joined, comments dropped) grouped into stages."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, rest = (current + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        current = ""
    assert not current, "the Dockerfile ends inside a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m[1] or m[2]], words[0])
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(image, name))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            key, _, default = rest.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


@functools.cache
def dockerfile() -> tuple[Stage, ...]:
    """deploy/Dockerfile's stages, parsed once."""
    return tuple(parse_dockerfile(DOCKERFILE.read_text()))


def exec_form(rest: str) -> list[str]:
    """The argv of an exec-form instruction (`["a", "b"]`): no shell between it and the process."""
    argv = json.loads(rest)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), rest
    return argv


def installed_packages(run: str) -> set[str]:
    """The packages a RUN line installs with apt or apk."""
    packages: set[str] = set()
    for command in re.split(r"&&|;|\|\|", run):
        words = command.split()
        for manager, verb in (("apt-get", "install"), ("apt", "install"), ("apk", "add")):
            if manager in words and verb in words:
                after = words[words.index(verb) + 1 :]
                packages |= {w.split("=")[0] for w in after if not w.startswith("-")}
    return packages


def dockerfile_user() -> tuple[int, int]:
    """The final stage's `USER` as numbers, the form `runAsNonRoot` can verify."""
    match = re.fullmatch(r"(\d+):(\d+)", dockerfile()[-1].last("USER"))
    assert match, "USER must be numeric uid:gid so runAsNonRoot can verify it"
    return int(match[1]), int(match[2])


def parse_cli(argv: list[str]) -> Any:
    """`argv` through the gateway's own parser: it must be `gateway serve`."""
    args = cli.build_parser().parse_args(argv)
    assert args.func is cli.cmd_serve, argv
    return args


def healthcheck_argv() -> list[str]:
    """The final stage's HEALTHCHECK command; it must need nothing but Python."""
    match = re.fullmatch(r"((?:--\S+ )*)CMD (\[.*\])", dockerfile()[-1].last("HEALTHCHECK"))
    assert match, "HEALTHCHECK must use the exec form"
    argv = exec_form(match[2])
    assert argv[:2] == ["python", "-c"] and "/healthz" in argv[2]
    assert not {"curl", "wget"} & set(re.findall(r"\w+", argv[2]))
    return argv


async def run_healthcheck(port: int) -> int:
    """The HEALTHCHECK command's exit status against a gateway on `port`."""
    argv = [sys.executable, *healthcheck_argv()[1:]]
    process = await asyncio.create_subprocess_exec(*argv, env={"GATEWAY__SERVER__PORT": str(port)})
    return await asyncio.wait_for(process.wait(), 30)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        globs = [glob, glob[3:]] if glob.startswith("**/") else [glob]
        if any(fnmatch.fnmatchcase(p, g) for p in prefixes for g in globs):
            ignored = not negated
    return ignored


def parse_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """A pip-compile / `uv pip compile` lock: name -> (pinned version, sha256 hashes)."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if not line:
            continue
        words = line.split()
        match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^]]*\])?==([^;\s]+)", words[0])
        assert match, f"not a `name==version` pin: {line}"
        hashes = [w.removeprefix("--hash=sha256:") for w in words[1:] if w.startswith("--hash=")]
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), line
        assert len(hashes) == len([w for w in words[1:] if w.startswith("--")]), line
        name = canonicalize_name(match[1])
        assert name not in entries, f"{name} pinned twice"
        entries[name] = (match[3], hashes)
    return entries


# --- rendering the kustomizations -----------------------------------------------------

SUPPORTED = {"apiVersion", "kind", "resources", "configMapGenerator", "namespace", "images"}
SUPPORTED |= {"patches", "generatorOptions"}
CLUSTER_SCOPED = {"Namespace"}
#: Strategic merge: these lists merge item by item on the key; all others are replaced.
LIST_MERGE_KEYS = {"containers": "name", "env": "name", "volumes": "name"}


def configmap_hash(name: str, data: dict[str, str]) -> str:
    """kustomize's suffix: sha256 of the ConfigMap as Go's sorted JSON, first 10 hex
    digits with 0, 1, 3, a, e mapped to g, h, k, m, t."""
    encoded = json.dumps(
        {"kind": "ConfigMap", "name": name, "data": data},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        encoded = encoded.replace(char, escape)  # Go's json escapes HTML characters
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def strategic_merge(target: Any, patch: Any) -> Any:
    """kustomize's strategic merge of `patch` into `target` (LIST_MERGE_KEYS lists merge by key)."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            assert not key.startswith("$"), f"patch directive {key} is not implemented"
            if value is None:
                merged.pop(key, None)
            elif key in LIST_MERGE_KEYS and isinstance(merged.get(key), list):
                merge_key = LIST_MERGE_KEYS[key]
                items = list(merged[key])
                for item in value:
                    names = [existing[merge_key] for existing in items]
                    if item[merge_key] in names:
                        index = names.index(item[merge_key])
                        items[index] = strategic_merge(items[index], item)
                    else:
                        items.append(item)
                merged[key] = items
            else:
                merged[key] = strategic_merge(merged.get(key), value)
        return merged
    return copy.deepcopy(patch)


def pod_spec(doc: Doc) -> Doc | None:
    """The pod template's spec of a workload, or None for any other object."""
    return doc.get("spec", {}).get("template", {}).get("spec")


def all_containers(spec: Doc) -> list[Doc]:
    """Init containers count for every rule a container must follow."""
    return spec.get("containers", []) + spec.get("initContainers", [])


def rename_configmap_references(docs: list[Doc], renames: dict[str, str]) -> None:
    """Point volumes, `envFrom` and `env` at the hashed ConfigMap names, as kustomize does."""
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        refs = [v["configMap"] for v in spec.get("volumes", []) if "configMap" in v]
        for container in all_containers(spec):
            refs += [e["configMapRef"] for e in container.get("envFrom", []) if "configMapRef" in e]
            sources = [e.get("valueFrom", {}) for e in container.get("env", [])]
            refs += [s["configMapKeyRef"] for s in sources if "configMapKeyRef" in s]
        for ref in refs:
            ref["name"] = renames.get(ref["name"], ref["name"])


def set_image(container: Doc, images: list[Doc]) -> None:
    """kustomize's `images` transformer on one container."""
    name, _, digest = container["image"].partition("@")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    for image in images:
        if image["name"] == name:
            name = image.get("newName", name)
            tag, digest = image.get("newTag", tag), image.get("digest", digest)
    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


@functools.cache
def render(directory: Path) -> Docs:
    """What `kustomize build directory` outputs, for the fields in SUPPORTED."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= SUPPORTED, f"not implemented: {set(kustomization) - SUPPORTED}"
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            docs += copy.deepcopy(list(render(path.resolve())))
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]

    options = kustomization.get("generatorOptions", {})
    renames = {}
    for generator in kustomization.get("configMapGenerator", []):
        assert set(generator) <= {"name", "files", "options"}, generator
        data = {}
        for entry in generator["files"]:
            key, _, file = entry.rpartition("=")
            data[key or Path(file).name] = (directory / file).read_text()
        name = generator["name"]
        if not {**options, **generator.get("options", {})}.get("disableNameSuffixHash"):
            renames[name] = f"{name}-{configmap_hash(name, data)}"
        metadata = {"name": renames.get(name, name)}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    rename_configmap_references(docs, renames)

    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"only file patches are implemented: {entry}"
        patch = yaml.safe_load((directory / entry["path"]).read_text())
        key = (patch["kind"], patch["metadata"]["name"])
        targets = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == key]
        assert len(targets) == 1, f"patch {entry['path']} matches {len(targets)} objects"
        docs[targets[0]] = strategic_merge(docs[targets[0]], patch)

    for doc in docs:
        spec = pod_spec(doc)
        for container in all_containers(spec) if spec else []:
            set_image(container, kustomization.get("images", []))
        if "namespace" in kustomization and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = kustomization["namespace"]
    return tuple(docs)


# --- reading the rendered objects -----------------------------------------------------


def one(docs: Docs, kind: str) -> Doc:
    """The only object of `kind`: two would make every check on it ambiguous."""
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def main_container(docs: Docs) -> Doc:
    """The Deployment's `gateway` container."""
    containers = pod_spec(one(docs, "Deployment"))["containers"]
    return next(c for c in containers if c["name"] == "gateway")


def pod_labels(docs: Docs) -> dict[str, str]:
    """The labels the Deployment's pods carry: what selectors must match."""
    return one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """An equality selector; an empty one selects nothing here (it would select every pod)."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_port(container: Doc, port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of a container port."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def served_config(docs: Docs) -> str:
    """config.yaml as the pod sees it: the ConfigMap mounted where `--config` points."""
    container = main_container(docs)
    config = Path(parse_cli(container["args"]).config)
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == config.parent)
    volumes = pod_spec(one(docs, "Deployment"))["volumes"]
    volume = next(v for v in volumes if v["name"] == mount["name"])
    configmap = one(docs, "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    return configmap["data"][config.name]


def pod_environment(docs: Docs) -> dict[str, str]:
    """The main container's environment, with FAKE_SECRETS for the Secret's values."""
    env = {}
    for entry in main_container(docs).get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            env[entry["name"]] = FAKE_SECRETS[entry["valueFrom"]["secretKeyRef"]["key"]]
    return env


def effective_settings(docs: Docs, tmp_path: Path) -> Settings:
    """The gateway's own loader on the mounted file with the container's environment only."""
    path = tmp_path / "config.yaml"
    path.write_text(served_config(docs))
    return load_settings(path, env=pod_environment(docs))


def prestop_seconds(container: Doc) -> float:
    """How long the preStop hook pauses (a `sleep` action or a `sleep` command)."""
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in {"/bin/sleep", "sleep"} and len(command) == 2, command
    return float(command[1])


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (`250m`, `128Mi`) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi)?", str(value))
    assert match, value
    return float(match[1]) * units.get(match[2] or "", 1)


def relabel(labels: dict[str, str], rules: list[Doc]) -> dict[str, str] | None:
    """Prometheus relabelling (keep and replace), enough for kubernetes-scrape.yml."""
    for rule in rules:
        value = ";".join(labels.get(name, "") for name in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep" and not match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$(\d+)", r"\\g<\1>", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(replacement)
        assert action in {"keep", "replace"}, action
    return labels


# --- evaluating the NetworkPolicies ---------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A pod (namespace and labels) or, with namespace None, an address outside the cluster."""

    ip: str
    namespace: str | None = None
    labels: tuple[tuple[str, str], ...] = ()


def pod(namespace: str, ip: str, **labels: str) -> Peer:
    """A pod in `namespace` with `labels`."""
    return Peer(ip, namespace, tuple(labels.items()))


def namespace_of(doc: Doc) -> str:
    """An object's namespace, `default` when it names none."""
    return doc["metadata"].get("namespace", "default")


def matches(selector: Doc, labels: dict[str, str]) -> bool:
    """A LabelSelector; {} selects everything."""
    assert set(selector) <= {"matchLabels"}, f"not implemented: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def peer_matches(rule_peer: Doc, peer: Peer, policy_namespace: str) -> bool:
    """Whether a `from`/`to` entry of a policy in `policy_namespace` admits `peer`."""
    if "ipBlock" in rule_peer:
        address = ipaddress.ip_address(peer.ip)
        block = rule_peer["ipBlock"]
        inside = [ipaddress.ip_network(c) for c in [block["cidr"], *block.get("except", [])]]
        return (
            address.version == inside[0].version
            and address in inside[0]
            and not any(address in net for net in inside[1:] if net.version == address.version)
        )
    if peer.namespace is None:
        return False  # pod and namespace selectors never match outside the cluster
    if "namespaceSelector" in rule_peer:
        namespace_labels = {"kubernetes.io/metadata.name": peer.namespace}
        if not matches(rule_peer["namespaceSelector"], namespace_labels):
            return False
    elif peer.namespace != policy_namespace:
        return False
    return matches(rule_peer.get("podSelector", {}), dict(peer.labels))


def allowed(docs: Docs, direction: str, peer: Peer, port: int, protocol: str = "TCP") -> bool:
    """Whether the policies selecting the gateway's pod let this connection through:
    no policy of that type selecting the pod allows all; otherwise any rule must."""
    gateway_pod = main_container(docs)
    policies = [
        doc
        for doc in docs
        if doc["kind"] == "NetworkPolicy" and matches(doc["spec"]["podSelector"], pod_labels(docs))
    ]
    policy_type = {"ingress": "Ingress", "egress": "Egress"}[direction]
    relevant = [p for p in policies if policy_type in p["spec"]["policyTypes"]]
    if not relevant:
        return True
    for policy in relevant:
        for rule in policy["spec"].get(direction, []):
            peers = rule.get("from" if direction == "ingress" else "to")
            if peers is not None and not any(
                peer_matches(p, peer, namespace_of(policy)) for p in peers
            ):
                continue
            ports = rule.get("ports")
            if ports is None:
                return True
            for entry in ports:
                number = entry["port"]
                if isinstance(number, str):  # a named port of the destination: the gateway's
                    assert direction == "ingress", "egress to a named port of another pod"
                    number = container_port(gateway_pod, number)
                if number == port and entry.get("protocol", "TCP") == protocol:
                    return True
    return False
