"""deploy/kubernetes: the manifests of a sharded session's servers, checked without a cluster.

Every resource is validated against the schemas of Kubernetes 1.31 that kubernetes-validate
ships, in strict mode (an unknown field fails), with the network blocked. Then the properties
the deployment rests on are checked against the server's own settings class, built from the
container's command and environment on top of the Dockerfile's ``ENV`` (so a misspelt
``PARAMSERVER_*`` variable or a port the server does not listen on is caught):

* the kustomization lists every manifest file and nothing missing;
* the StatefulSet ``ps`` (3 replicas, parallel), its headless Service (the StatefulSet's
  ``serviceName``, selecting its pods) and its PodDisruptionBudget (the same pods);
* probes on the port the server listens on (``/health``, ``/ready``), the data plane's port;
* snapshots and the journal on the volume claim template, the tokens from the Secret the
  kustomization generates (its source file ignored by git), no token in a manifest;
* the image's user, a read-only root filesystem and no privilege; a writable /tmp for numba;
* resources that hold the sessions the server admits; docs/deployment.md's URL list.

Each check is also run on a copy of the manifests broken on purpose (``MUTATIONS``) and must
fail there: none of them can pass whatever the manifests say.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import pytest
from pydantic import ValidationError

from paramserver.server.cli import build_parser, settings_from_args
from paramserver.server.settings import Settings
from tests.harness.optional import installed

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
KUSTOMIZATION = "kustomization.yaml"
DOCS = REPO / "docs" / "deployment.md"

#: The Kubernetes version the manifests must be valid for (a schema kubernetes-validate ships).
KUBERNETES_VERSION = "1.31.0"

_MISSING = [name for name in ("yaml", "kubernetes_validate") if not installed(name)]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"needs {', '.join(_MISSING)} (pip install -e '.[dev]')"
)
if not _MISSING:
    import kubernetes_validate
    import yaml

#: The server's start-up, the numba kernels and uvicorn, resident (about 190 MiB measured).
PROCESS_BYTES = 250 * 2**20

#: The fields of a kustomization this one may use (kustomize's own names).
KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "namePrefix",
    "nameSuffix",
    "labels",
    "commonAnnotations",
    "secretGenerator",
    "configMapGenerator",
    "generatorOptions",
    "images",
    "patches",
    "replicas",
    "components",
}


# --- loading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """What the Dockerfile's final stage gives a container: environment, user, command."""

    env: dict[str, str]
    uid: int
    gid: int
    cmd: list[str]


@dataclass(repr=False)
class Manifests:
    files: dict[str, list[dict[str, Any]]]  # manifest file (relative to DEPLOY) -> its documents
    kustomization: dict[str, Any]
    gitignore: list[str]
    image: Image
    docs: str

    def __repr__(self) -> str:  # pytest shows it with every failure
        return f"Manifests({sorted(self.files)})"

    def resources(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for name, documents in self.files.items():
            for document in documents:
                yield name, document

    def one(self, kind: str) -> dict[str, Any]:
        found = [doc for _, doc in self.resources() if doc.get("kind") == kind]
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]

    @property
    def statefulset(self) -> dict[str, Any]:
        return self.one("StatefulSet")

    @property
    def pod(self) -> dict[str, Any]:
        return self.statefulset["spec"]["template"]["spec"]

    @property
    def server(self) -> dict[str, Any]:
        """The container that runs ``paramserver serve``."""
        found = [c for c in self.pod["containers"] if command_of(c, self.image)[:2] == SERVE]
        assert len(found) == 1, f"expected one container running paramserver serve: {found}"
        return found[0]

    def containers(self) -> list[dict[str, Any]]:
        return [*self.pod.get("initContainers", []), *self.pod["containers"]]


SERVE = ["paramserver", "serve"]


def parse_dockerfile(text: str) -> Image:
    """The final stage's ``ENV``, ``USER`` and ``CMD`` (line continuations joined)."""
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    env: dict[str, str] = {}
    user = ""
    cmd: list[str] = []
    for line in lines[last_from + 1 :]:
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
        elif instruction.upper() == "USER":
            user = rest.strip()
        elif instruction.upper() == "CMD":
            cmd = json.loads(rest)
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"the image's USER must be numeric (runAsNonRoot checks it): {user!r}"
    return Image(env=env, uid=int(uid), gid=int(gid or uid), cmd=cmd)


def load_manifests() -> Manifests:
    files = {}
    for path in sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]):
        name = path.relative_to(DEPLOY).as_posix()
        if name != KUSTOMIZATION:
            files[name] = [d for d in yaml.safe_load_all(path.read_text("utf-8")) if d is not None]
    gitignore = DEPLOY / ".gitignore"
    return Manifests(
        files=files,
        kustomization=yaml.safe_load((DEPLOY / KUSTOMIZATION).read_text("utf-8")),
        gitignore=gitignore.read_text("utf-8").splitlines() if gitignore.exists() else [],
        image=parse_dockerfile((REPO / "Dockerfile").read_text("utf-8")),
        docs=DOCS.read_text("utf-8"),
    )


# --- what a container gets ---------------------------------------------------------------------


def command_of(container: dict[str, Any], image: Image) -> list[str]:
    """What the container runs: its command (else the image's CMD) and its args."""
    return [*container.get("command", image.cmd), *container.get("args", [])]


def environment(container: dict[str, Any], image: Image) -> dict[str, str]:
    """The container's environment: the image's, then the container's literal values (a value
    from a Secret stands as ``<from NAME>``)."""
    env = dict(image.env)
    for var in container.get("env", []):
        env[var["name"]] = var["value"] if "value" in var else f"<from {var['valueFrom']}>"
    return env


def settings_in(container: dict[str, Any], image: Image) -> Settings:
    """The server's settings in this container, parsed and validated by the server's own code
    (``paramserver serve``'s options over its ``PARAMSERVER_*`` variables)."""
    outside = {k: v for k, v in os.environ.items() if not k.startswith("PARAMSERVER_")}
    command = command_of(container, image)
    with mock.patch.dict(os.environ, {**outside, **environment(container, image)}, clear=True):
        try:
            if command[:2] == SERVE:
                return settings_from_args(build_parser().parse_args(command[1:]))
            return Settings()
        except (ValidationError, SystemExit) as exc:  # SystemExit: argparse refused the command
            raise AssertionError(
                f"{container['name']}: the server refuses {command}: {exc}"
            ) from exc


def container_port(container: dict[str, Any], name: str) -> int:
    found = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == name]
    assert len(found) == 1, f"container {container['name']} has no port named {name!r}"
    return int(found[0])


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    return int(port) if isinstance(port, int) else container_port(container, port)


def mount_holding(container: dict[str, Any], path: PurePosixPath) -> dict[str, Any] | None:
    """The volume mount ``path`` lies on (the deepest), or None (the root filesystem)."""
    holding = [
        m
        for m in container.get("volumeMounts", [])
        if path == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in path.parents
    ]
    return max(holding, key=lambda m: len(m["mountPath"]), default=None)


def volume(pod: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((v for v in pod.get("volumes", []) if v["name"] == name), None)


def quantity_bytes(quantity: str | int) -> int:
    """A Kubernetes quantity of bytes (``4Gi``, ``512Mi``, ``1G``, ``1073741824``)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6}
    units |= {"G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+)([KMGT]i|[kMGT])?", str(quantity))
    assert match, f"not a quantity of bytes: {quantity!r}"
    return int(match[1]) * units.get(match[2] or "", 1)


@contextmanager
def network_blocked() -> Iterator[None]:
    """Any connection or name lookup fails: the schemas must come from the package."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("kubernetes-validate tried to use the network")

    with (
        mock.patch.object(socket.socket, "connect", refuse),
        mock.patch.object(socket, "getaddrinfo", refuse),
        mock.patch.object(socket, "create_connection", refuse),
    ):
        yield


# --- the checks --------------------------------------------------------------------------------


def check_schemas(m: Manifests) -> None:
    """Every resource is valid Kubernetes 1.31, strictly (no unknown field), offline."""
    assert any(True for _ in m.resources()), "no manifest under deploy/kubernetes"
    with network_blocked():
        for name, resource in m.resources():
            try:
                kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(p) for p in exc.path)
                raise AssertionError(
                    f"{name}: {resource.get('kind')} at {where}: {exc.message}"
                ) from exc


def check_kustomization(m: Manifests) -> None:
    """The kustomization lists every manifest file, each of which exists, and only known fields."""
    k = m.kustomization
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    unknown = set(k) - KUSTOMIZATION_FIELDS
    assert not unknown, f"fields kustomize does not know: {sorted(unknown)}"
    listed = list(k.get("resources", []))
    assert len(listed) == len(set(listed)), f"a resource listed twice: {listed}"
    missing = [r for r in listed if r not in m.files]
    assert not missing, f"kustomization.yaml lists files that do not exist: {missing}"
    unlisted = sorted(set(m.files) - set(listed))
    assert not unlisted, f"manifests kustomization.yaml does not list: {unlisted}"
    images = {entry["name"] for entry in k.get("images", [])}
    for container in m.containers():
        name = container["image"].rsplit(":", 1)[0]
        assert not images or name in images, f"the images entry misses {container['image']}"


def check_statefulset(m: Manifests) -> None:
    """A StatefulSet ``ps`` of 3 shards started in parallel, whose selector is its pods' labels."""
    sts = m.statefulset
    spec = sts["spec"]
    assert sts["metadata"]["name"] == "ps"
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    selector = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items(), f"{selector} does not select {labels}"
    for container in m.containers():
        assert container["image"] == "paramserver:latest", container["image"]


def check_headless_service(m: Manifests) -> None:
    """The StatefulSet's ``serviceName`` is a headless Service that selects its pods and
    publishes each server port under its own number (DNS gives the pod's IP: no port mapping)."""
    service = m.one("Service")
    sts = m.statefulset
    assert service["metadata"]["name"] == sts["spec"]["serviceName"]
    assert service["spec"].get("clusterIP") == "None", "the Service must be headless"
    selector = service["spec"].get("selector") or {}
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items(), f"{selector} does not select {labels}"
    for port in service["spec"]["ports"]:
        target = resolve_port(m.server, port.get("targetPort", port["port"]))
        assert port["port"] == target, f"service port {port['name']} maps {port['port']}:{target}"


def check_ports_and_probes(m: Manifests) -> None:
    """The server listens on all interfaces, on the container port ``http``; liveness and the
    startup probe ask ``/health`` there, readiness ``/ready``, over http (no TLS configured)."""
    settings = settings_in(m.server, m.image)
    assert settings.host == "0.0.0.0", f"the server listens on {settings.host} only"
    assert container_port(m.server, "http") == settings.port
    scheme = "HTTPS" if settings.ssl_certfile is not None else "HTTP"
    expected = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    for probe, path in expected.items():
        get = m.server[probe]["httpGet"]
        assert get["path"] == path, f"{probe} asks {get['path']}, not {path}"
        port = resolve_port(m.server, get["port"])
        assert port == settings.port, f"{probe} asks port {port}; the server is on {settings.port}"
        assert get.get("scheme", "HTTP") == scheme, f"{probe} speaks {get.get('scheme', 'HTTP')}"
    startup = m.server["startupProbe"]
    allowed = startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10)
    assert allowed >= 300, f"the startup probe gives a recovery {allowed} s, not 5 minutes"


def check_data_plane(m: Manifests) -> None:
    """The data plane is on, on the container port ``data-plane``, which the Service lists."""
    settings = settings_in(m.server, m.image)
    address = settings.data_plane_address()
    assert address is not None, "the data plane is off"
    assert address[1] == container_port(m.server, "data-plane"), f"data plane on {address[1]}"
    ports = {p["name"]: p["port"] for p in m.one("Service")["spec"]["ports"]}
    assert ports.get("data-plane") == address[1], f"the Service's ports: {ports}"


def check_state_on_the_volume(m: Manifests) -> None:
    """Snapshots and the journal (``<snapshot-dir>/journal``) are on a volume claim template,
    one volume per shard."""
    settings = settings_in(m.server, m.image)
    assert settings.snapshot_dir is not None, "no snapshot directory: sessions die with the pod"
    assert settings.durability == "journal"
    claims = {t["metadata"]["name"]: t for t in m.statefulset["spec"]["volumeClaimTemplates"]}
    snapshot_dir = PurePosixPath(str(settings.snapshot_dir))
    for path in (snapshot_dir, snapshot_dir / "journal"):
        mount = mount_holding(m.server, path)
        assert mount is not None and mount["name"] in claims, f"{path} is not on a claim"
        assert not mount.get("readOnly", False), f"{path} is mounted read-only"
    claim = claims[mount["name"]]["spec"]
    assert set(claim["accessModes"]) <= {"ReadWriteOnce", "ReadWriteOncePod"}
    assert quantity_bytes(claim["resources"]["requests"]["storage"]) >= 4 * (
        settings.max_total_bytes or 0
    ), "the volume cannot hold 4 snapshots of the sessions the server admits"


def check_settings(m: Manifests) -> None:
    """Every ``PARAMSERVER_*`` variable is a setting of the server (no misspelt one ignored),
    they validate together, and no token is written in a manifest."""
    for container in m.containers():
        for var in container.get("env", []):
            name = var["name"]
            if name.startswith("PARAMSERVER_"):
                field = name.removeprefix("PARAMSERVER_").lower()
                assert field in Settings.model_fields, f"{name} is no setting of the server"
            if name == "PARAMSERVER_TOKENS":
                assert "value" not in var, "a token written in the manifest"
        settings_in(container, m.image)  # validates
    for name, resource in m.resources():
        if resource.get("kind") == "Secret":
            assert not resource.get("data") and not resource.get("stringData"), (
                f"{name} holds secret values: generate the Secret from the operator's file"
            )


def check_tokens(m: Manifests) -> None:
    """The tokens file is a key of a Secret the kustomization generates (or lists), mounted
    read-only where ``PARAMSERVER_TOKENS_FILE`` points, in the server and in the init container
    that checks it; the generator's source file is kept out of git."""
    secrets: dict[str, set[str]] = {}
    sources: list[str] = []
    for generator in m.kustomization.get("secretGenerator", []):
        keys = secrets.setdefault(generator["name"], set())
        for entry in generator.get("files", []):
            key, _, source = entry.partition("=") if "=" in entry else ("", "", entry)
            keys.add(key or PurePosixPath(source).name)
            sources.append(source)
    for _, resource in m.resources():
        if resource.get("kind") == "Secret":
            secrets[resource["metadata"]["name"]] = set(resource.get("data", {}))
    server_file = settings_in(m.server, m.image).tokens_file
    assert server_file is not None, "the server has no tokens file"
    readers = [c for c in m.containers() if settings_in(c, m.image).tokens_file is not None]
    assert len(readers) >= 2, "no init container checks the tokens"
    for container in readers:
        path = PurePosixPath(str(settings_in(container, m.image).tokens_file))
        assert path == PurePosixPath(str(server_file)), f"{container['name']} reads {path}"
        mount = mount_holding(container, path)
        assert mount is not None and mount.get("readOnly"), f"{path}: no read-only mount"
        assert "subPath" not in mount, "a subPath mount never sees a changed Secret"
        source = (volume(m.pod, mount["name"]) or {}).get("secret")
        assert source is not None, f"{path} is not on a Secret volume"
        name = source["secretName"]
        assert name in secrets, f"the Secret {name} is neither generated nor listed"
        relative = path.relative_to(mount["mountPath"]).as_posix()
        items = {i["path"]: i["key"] for i in source.get("items", [])}
        key = items.get(relative, relative if not items else None)
        assert key in secrets[name], f"{path} would be key {key!r}; {name} has {secrets[name]}"
    ignored = {line.strip().lstrip("/") for line in m.gitignore if line.strip()}
    for source in sources:
        assert source in ignored, f"the generator's file {source} is not in .gitignore"


def check_security(m: Manifests) -> None:
    """Every container runs as the image's user (not root), with a read-only root filesystem,
    no privilege escalation, no capability and the runtime's seccomp profile."""
    pod_context = m.pod.get("securityContext", {})
    assert pod_context.get("fsGroup") == m.image.gid, "the volume would not be the user's"
    assert m.pod.get("automountServiceAccountToken") is False
    for container in m.containers():
        context = {**pod_context, **container.get("securityContext", {})}
        name = container["name"]
        assert context.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        assert context.get("runAsUser") == m.image.uid, f"{name}: not the image's uid"
        assert context.get("runAsGroup", m.image.gid) == m.image.gid, f"{name}: another gid"
        assert context.get("readOnlyRootFilesystem") is True, f"{name}: writable root filesystem"
        assert context.get("allowPrivilegeEscalation") is False, f"{name}: privilege escalation"
        assert not context.get("privileged"), f"{name}: privileged"
        capabilities = context.get("capabilities", {})
        assert capabilities.get("drop") == ["ALL"] and not capabilities.get("add"), name
        assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault", name


def check_scratch(m: Manifests) -> None:
    """With the root filesystem read-only, the server's /tmp is an emptyDir and numba's cache
    directory (the image's or the pod's ``NUMBA_CACHE_DIR``) is on a writable volume. (The init
    container only reads.)"""
    mount = mount_holding(m.server, PurePosixPath("/tmp"))
    assert mount is not None and mount["mountPath"] == "/tmp", "no volume on /tmp"
    assert "emptyDir" in (volume(m.pod, mount["name"]) or {}), "/tmp is not an emptyDir"
    assert not mount.get("readOnly"), "/tmp is read-only"
    cache = environment(m.server, m.image).get("NUMBA_CACHE_DIR")
    if cache is not None:
        mount = mount_holding(m.server, PurePosixPath(cache))
        assert mount is not None and not mount.get("readOnly"), f"{cache} is not writable"


def check_disruption_budget(m: Manifests) -> None:
    """The budget covers exactly the StatefulSet's pods and lets one shard go at a time."""
    budget = m.one("PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"] == m.statefulset["spec"]["selector"]["matchLabels"]
    assert budget.get("maxUnavailable") == 1 and "minAvailable" not in budget, budget


def check_resources(m: Manifests) -> None:
    """Every container has requests and limits; the server's memory holds twice the sessions it
    admits (``max_total_bytes``: their state and a snapshot's copy), its process and its
    remembered answers; memory requests equal limits; the scratch volume is bounded."""
    for container in m.containers():
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{container['name']}"
    settings = settings_in(m.server, m.image)
    assert settings.max_total_bytes is not None, "no max_total_bytes: memory is unbounded"
    resources = m.server["resources"]
    limit = quantity_bytes(resources["limits"]["memory"])
    assert quantity_bytes(resources["requests"]["memory"]) == limit
    needed = PROCESS_BYTES + 2 * settings.max_total_bytes + settings.idempotency_max_bytes
    assert limit > needed, f"a memory limit of {limit} bytes is under {needed}"
    for v in m.pod.get("volumes", []):
        if "emptyDir" in v:
            assert "sizeLimit" in v["emptyDir"], f"the emptyDir {v['name']} is unbounded"


def check_lifecycle(m: Manifests) -> None:
    """The server gets time for its 30 s of requests in flight and its final snapshots, and no
    Service variable can reach its ``PARAMSERVER_*`` settings."""
    assert m.pod.get("terminationGracePeriodSeconds", 30) >= 60
    assert m.pod.get("enableServiceLinks") is False


def check_docs(m: Manifests) -> None:
    """docs/deployment.md names the shards as the manifests make them, in shard order."""
    sts = m.statefulset
    name, service = sts["metadata"]["name"], sts["spec"]["serviceName"]
    port = settings_in(m.server, m.image).port
    urls = ",".join(f"http://{name}-{i}.{service}:{port}" for i in range(sts["spec"]["replicas"]))
    assert f"PARAMSERVER_URLS={urls}" in m.docs or f"value: {urls}" in m.docs, urls
    assert f"{name}-0.{service}.<namespace>.svc.cluster.local:{port}" in m.docs
    assert "kubectl apply -k deploy/kubernetes" in m.docs


CHECKS: list[Callable[[Manifests], None]] = [
    check_schemas,
    check_kustomization,
    check_statefulset,
    check_headless_service,
    check_ports_and_probes,
    check_data_plane,
    check_state_on_the_volume,
    check_settings,
    check_tokens,
    check_security,
    check_scratch,
    check_disruption_budget,
    check_resources,
    check_lifecycle,
    check_docs,
]


@pytest.fixture(scope="module")
def manifests() -> Manifests:
    return load_manifests()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_manifests(manifests: Manifests, check: Callable[[Manifests], None]) -> None:
    check(manifests)


# --- each check fails on manifests broken on purpose ----------------------------------------------


def env(m: Manifests, name: str, value: str, container: str = "paramserver") -> None:
    """Set (or add) a variable of a container."""
    target = next(c for c in m.containers() if c["name"] == container)
    variables = target.setdefault("env", [])
    variables[:] = [v for v in variables if v["name"] != name] + [{"name": name, "value": value}]


def put(obj: Any, path: str, value: Any) -> None:
    """``obj["a"]["b"][0]["c"] = value`` for the path "a b 0 c" (keys separated by spaces, as
    label keys hold dots); ``...`` as the value deletes the key."""
    *parents, last = path.split(" ")
    for key in parents:
        obj = obj[int(key)] if key.isdigit() else obj[key]
    key_or_index: Any = int(last) if last.isdigit() else last
    if value is ...:
        del obj[key_or_index]
    else:
        obj[key_or_index] = value


def sts(m: Manifests, path: str, value: Any) -> None:
    put(m.statefulset, path, value)


def pod(m: Manifests, path: str, value: Any) -> None:
    put(m.pod, path, value)


def server(m: Manifests, path: str, value: Any) -> None:
    put(m.server, path, value)


def service(m: Manifests, path: str, value: Any) -> None:
    put(m.one("Service"), path, value)


def budget(m: Manifests, path: str, value: Any) -> None:
    put(m.one("PodDisruptionBudget"), path, value)


def tokens_volume(m: Manifests, path: str, value: Any) -> None:
    put(volume(m.pod, "tokens"), path, value)


def min_available(m: Manifests, count: int) -> None:
    budget(m, "spec maxUnavailable", ...)
    budget(m, "spec minAvailable", count)


def drop_env(m: Manifests, name: str) -> None:
    m.server["env"] = [v for v in m.server["env"] if v["name"] != name]


def memory(m: Manifests, quantity: str) -> None:
    server(m, "resources requests memory", quantity)
    server(m, "resources limits memory", quantity)


def image_user(m: Manifests, uid: int) -> None:
    m.image = Image(env=m.image.env, uid=uid, gid=uid, cmd=m.image.cmd)


INSTANCE = "app.kubernetes.io/instance"

Mutation = tuple[Callable[[Manifests], None], str, Callable[[Manifests], None]]

MUTATIONS: list[Mutation] = [
    (check_schemas, "unknown field", lambda m: server(m, "livenessProbes", {})),
    (check_schemas, "port as a string", lambda m: server(m, "ports 0 containerPort", "8000")),
    (check_schemas, "no selector", lambda m: sts(m, "spec selector", ...)),
    (check_kustomization, "unlisted file", lambda m: m.files.update({"x.yaml": []})),
    (check_kustomization, "listed, missing", lambda m: m.kustomization["resources"].append("y")),
    (check_kustomization, "unknown field", lambda m: m.kustomization.update({"resource": []})),
    (check_statefulset, "one by one", lambda m: sts(m, "spec podManagementPolicy", "OrderedReady")),
    (check_statefulset, "5 shards", lambda m: sts(m, "spec replicas", 5)),
    (
        check_statefulset,
        "pods unselected",
        lambda m: sts(m, f"spec template metadata labels {INSTANCE}", "x"),
    ),
    (check_headless_service, "serviceName", lambda m: sts(m, "spec serviceName", "shards")),
    (check_headless_service, "cluster IP", lambda m: service(m, "spec clusterIP", ...)),
    (check_headless_service, "other pods", lambda m: service(m, f"spec selector {INSTANCE}", "x")),
    (check_headless_service, "port mapped", lambda m: service(m, "spec ports 0 port", 80)),
    (check_ports_and_probes, "server on 9000", lambda m: env(m, "PARAMSERVER_PORT", "9000")),
    (
        check_ports_and_probes,
        "--port 9000",
        lambda m: m.server["command"].extend(["--port", "9000"]),
    ),
    (check_ports_and_probes, "loopback", lambda m: server(m, "command 3", "127.0.0.1")),
    (
        check_ports_and_probes,
        "ready: /health",
        lambda m: server(m, "readinessProbe httpGet path", "/health"),
    ),
    (
        check_ports_and_probes,
        "live: /ready",
        lambda m: server(m, "livenessProbe httpGet path", "/ready"),
    ),
    (check_ports_and_probes, "probe port", lambda m: server(m, "startupProbe httpGet port", 8001)),
    (
        check_ports_and_probes,
        "https",
        lambda m: server(m, "readinessProbe httpGet scheme", "HTTPS"),
    ),
    (
        check_ports_and_probes,
        "short start",
        lambda m: server(m, "startupProbe failureThreshold", 3),
    ),
    (check_data_plane, "moved", lambda m: env(m, "PARAMSERVER_DATA_PLANE_PORT", "8002")),
    (check_data_plane, "off", lambda m: env(m, "PARAMSERVER_DATA_PLANE", "false")),
    (check_data_plane, "not in the Service", lambda m: service(m, "spec ports 1", ...)),
    (check_state_on_the_volume, "on /tmp", lambda m: env(m, "PARAMSERVER_SNAPSHOT_DIR", "/tmp/s")),
    (check_state_on_the_volume, "moved", lambda m: server(m, "volumeMounts 0 mountPath", "/var")),
    (
        check_state_on_the_volume,
        "no journal",
        lambda m: env(m, "PARAMSERVER_DURABILITY", "snapshot"),
    ),
    (
        check_state_on_the_volume,
        "small",
        lambda m: sts(m, "spec volumeClaimTemplates 0 spec resources requests storage", "1Gi"),
    ),
    (check_settings, "misspelt", lambda m: env(m, "PARAMSERVER_DURABILTY", "journal")),
    (check_settings, "token written", lambda m: env(m, "PARAMSERVER_TOKENS", "s3cret")),
    (check_settings, "invalid value", lambda m: env(m, "PARAMSERVER_JOURNAL_FSYNC", "never")),
    (
        check_settings,
        "Secret with a value",
        lambda m: m.files.update({"s.yaml": [{"kind": "Secret", "stringData": {"tokens": "x"}}]}),
    ),
    (check_tokens, "other secret", lambda m: tokens_volume(m, "secret secretName", "x")),
    (check_tokens, "other key", lambda m: tokens_volume(m, "secret items 0 key", "tok")),
    (check_tokens, "other file", lambda m: env(m, "PARAMSERVER_TOKENS_FILE", "/etc/paramserver/t")),
    (
        check_tokens,
        "init checks another",
        lambda m: env(m, "PARAMSERVER_TOKENS_FILE", "/x", "check-tokens"),
    ),
    (check_tokens, "no init check", lambda m: pod(m, "initContainers", [])),
    (check_tokens, "not ignored", lambda m: m.gitignore.clear()),
    (
        check_tokens,
        "generated key",
        lambda m: put(m.kustomization, "secretGenerator 0 files 0", "t=tokens"),
    ),
    (check_tokens, "writable", lambda m: server(m, "volumeMounts 1 readOnly", False)),
    (
        check_security,
        "writable root",
        lambda m: server(m, "securityContext readOnlyRootFilesystem", False),
    ),
    (check_security, "root allowed", lambda m: pod(m, "securityContext runAsNonRoot", False)),
    (check_security, "root", lambda m: pod(m, "securityContext runAsUser", 0)),
    (check_security, "another user", lambda m: image_user(m, 10002)),
    (check_security, "fsGroup", lambda m: pod(m, "securityContext fsGroup", 0)),
    (
        check_security,
        "escalation",
        lambda m: server(m, "securityContext allowPrivilegeEscalation", True),
    ),
    (
        check_security,
        "capabilities",
        lambda m: server(m, "securityContext capabilities drop", ["NET_RAW"]),
    ),
    (
        check_security,
        "seccomp",
        lambda m: pod(m, "securityContext seccompProfile type", "Unconfined"),
    ),
    (check_security, "service account", lambda m: pod(m, "automountServiceAccountToken", True)),
    (
        check_security,
        "init container",
        lambda m: pod(m, "initContainers 0 securityContext readOnlyRootFilesystem", False),
    ),
    (check_scratch, "no /tmp", lambda m: server(m, "volumeMounts 2", ...)),
    (check_scratch, "numba cache read-only", lambda m: env(m, "NUMBA_CACHE_DIR", "/opt/numba")),
    (
        check_disruption_budget,
        "other pods",
        lambda m: budget(m, f"spec selector matchLabels {INSTANCE}", "x"),
    ),
    (check_disruption_budget, "minAvailable", lambda m: min_available(m, 3)),
    (check_resources, "no limits", lambda m: server(m, "resources limits", ...)),
    (check_resources, "small limit", lambda m: memory(m, "2Gi")),
    (
        check_resources,
        "request below limit",
        lambda m: server(m, "resources requests memory", "1Gi"),
    ),
    (check_resources, "no max_total_bytes", lambda m: drop_env(m, "PARAMSERVER_MAX_TOTAL_BYTES")),
    (check_resources, "unbounded scratch", lambda m: put(volume(m.pod, "tmp"), "emptyDir", {})),
    (check_lifecycle, "30 s to stop", lambda m: pod(m, "terminationGracePeriodSeconds", 30)),
    (check_lifecycle, "service links", lambda m: pod(m, "enableServiceLinks", True)),
    (check_docs, "4 shards", lambda m: sts(m, "spec replicas", 4)),
    (check_docs, "renamed", lambda m: sts(m, "spec serviceName", "shards")),
]


@pytest.mark.parametrize(
    ("check", "mutate"),
    [(check, mutate) for check, _, mutate in MUTATIONS],
    ids=[f"{check.__name__.removeprefix('check_')}: {what}" for check, what, _ in MUTATIONS],
)
def test_each_check_fails_on_broken_manifests(
    manifests: Manifests,
    check: Callable[[Manifests], None],
    mutate: Callable[[Manifests], None],
) -> None:
    broken = copy.deepcopy(manifests)
    mutate(broken)
    with pytest.raises(AssertionError):
        check(broken)


def test_every_check_has_a_mutation() -> None:
    assert {check for check, _, _ in MUTATIONS} == set(CHECKS)
