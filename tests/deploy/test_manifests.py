"""The deployment files against what they deploy: the Kubernetes manifests in deploy/kubernetes/ and
the Containerfile. No cluster and no server: each check reads the files, `chatrpc <command> --help`
and the metric registries.

- Every built-in resource validates against the pinned Kubernetes version's schemas
  (kubernetes-validate, strict: an unknown field is an error).
- kubernetes-validate has no schema for custom resources (KEDA's ScaledObject, the Inference
  Extension's InferencePool, Gateway API's HTTPRoute, the Prometheus Operator's PodMonitor): it
  raises SchemaNotFoundError for them. They are checked here for their apiVersion and kind, a name,
  the fields these manifests rely on, and that what those fields name exists (a Deployment, a
  Service, pods with the selected labels). Their field types and enums are not checked.
- Every flag a manifest or the Containerfile passes to chatrpc is in that command's --help, and
  every chatrpc metric a manifest names is one the service or the adapter exports.
- Ports, probes and grace periods agree with the flags beside them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from chatrpc.v1 import chat_pb2

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "deploy" / "kubernetes"
CONTAINERFILE = REPO / "Containerfile"
# The oldest minor release still in the large providers' standard support when these were written.
# Everything the manifests use is older (gRPC probes are GA since 1.27).
KUBERNETES_VERSION = "1.33"
CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatCompletions"].full_name
HEALTH_PATHS = {"/health/ready", "/health/live"}

# Custom resources: (apiVersion, kind) -> the fields the manifests rely on, each a path that must
# hold a non-empty value.
CUSTOM_RESOURCES: dict[tuple[str, str], tuple[tuple[str | int, ...], ...]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): (
        ("spec", "scaleTargetRef", "name"),
        ("spec", "triggers", 0, "type"),
        ("spec", "triggers", 0, "metadata", "query"),
        ("spec", "triggers", 0, "metadata", "threshold"),
    ),
    ("inference.networking.k8s.io/v1", "InferencePool"): (
        ("spec", "selector", "matchLabels"),
        ("spec", "targetPorts", 0, "number"),
        ("spec", "endpointPickerRef", "name"),
        ("spec", "endpointPickerRef", "port", "number"),
    ),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): (
        ("spec", "parentRefs", 0, "name"),
        ("spec", "rules", 0, "backendRefs", 0, "name"),
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): (
        ("spec", "selector", "matchLabels"),
        ("spec", "podMetricsEndpoints", 0, "port"),
    ),
}

FOLDERS = sorted(path.parent for path in MANIFESTS.glob("*/kustomization.yaml"))


def manifest_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("*.yaml") if path.name != "kustomization.yaml")


def documents(folder: Path) -> list[dict]:
    return [doc for path in manifest_files(folder) for doc in yaml.safe_load_all(path.read_text()) if doc]


ALL_DOCUMENTS = [
    pytest.param(doc, id=f"{folder.name}/{doc['kind']}/{doc['metadata']['name']}")
    for folder in FOLDERS
    for doc in documents(folder)
]


def dig(value: object, path: tuple[str | int, ...]) -> object:
    for key in path:
        if isinstance(key, int):
            value = value[key] if isinstance(value, list) and len(value) > key else None
        else:
            value = value.get(key) if isinstance(value, dict) else None
    return value


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[dict], kind: str, name: str) -> dict:
    found = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    assert found, f"no {kind} named {name!r} in the folder"
    return found[0]


# --- The image and what each container runs -------------------------------------------------------


def containerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Containerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    lines = (line.strip() for line in text.splitlines())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]


def final_stage() -> list[tuple[str, str]]:
    instructions = containerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def image_setting(name: str) -> list[str]:
    """The final stage's ENTRYPOINT or CMD, which must be in exec (JSON) form."""
    values = [arguments for instruction, arguments in final_stage() if instruction == name]
    assert values, f"the Containerfile has no {name}"
    return json.loads(values[-1])


def is_chatrpc_image(image: str) -> bool:
    return image.rsplit("/", 1)[-1].split(":")[0].split("@")[0] == "chatrpc"


def effective_argv(container: dict) -> list[str]:
    """What the container runs, by Kubernetes' rule: `command` replaces the image's ENTRYPOINT
    (and drops its CMD), `args` replaces its CMD."""
    if not is_chatrpc_image(container["image"]):
        return [*container.get("command", []), *container.get("args", [])]
    if "command" in container:
        return [*container["command"], *container.get("args", [])]
    return [*image_setting("ENTRYPOINT"), *container.get("args", image_setting("CMD"))]


def chatrpc_command(argv: list[str]) -> tuple[str, dict[str, str | None]] | None:
    """(subcommand, {flag: value or None}) when argv runs chatrpc, directly or under tini, else None."""
    if argv and Path(argv[0]).name == "tini" and "--" in argv:
        argv = argv[argv.index("--") + 1 :]
    if not argv or Path(argv[0]).name != "chatrpc":
        return None
    subcommand, *rest = argv[1:]
    flags: dict[str, str | None] = {}
    for i, word in enumerate(rest):
        if word.startswith("--"):
            flag, has_value, value = word.partition("=")
            if not has_value:
                follows = rest[i + 1] if i + 1 < len(rest) else None
                value = follows if follows is not None and not follows.startswith("--") else None
            flags[flag] = value
        else:
            assert i > 0 and rest[i - 1].startswith("--") and "=" not in rest[i - 1], (
                f"{word!r} in `chatrpc {subcommand}` is neither a flag nor a flag's value"
            )
    return subcommand, flags


def chatrpc_containers(docs: list[dict]) -> Iterator[tuple[dict, dict, str, dict[str, str | None]]]:
    """(pod spec, container, subcommand, flags) for every container of a Deployment that runs chatrpc."""
    for spec in (doc["spec"]["template"]["spec"] for doc in of_kind(docs, "Deployment")):
        for container in spec["containers"]:
            command = chatrpc_command(effective_argv(container))
            if is_chatrpc_image(container["image"]):
                assert command is not None, f"container {container['name']} has the chatrpc image but runs no chatrpc"
            if command is not None:
                yield spec, container, *command


def int_flag(flags: dict[str, str | None], flag: str, default: int) -> int:
    value = flags.get(flag)
    return default if value is None else int(value)


def grpc_port(subcommand: str, flags: dict[str, str | None]) -> int:
    return int_flag(flags, "--grpc-port" if subcommand == "serve" else "--port", 50051)


def rest_port(flags: dict[str, str | None]) -> int:
    return int_flag(flags, "--port", 8000)


def container_port(container: dict, port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    numbers = [entry["containerPort"] for entry in container.get("ports", []) if entry.get("name") == port]
    assert numbers, f"container {container['name']} has no port named {port!r}"
    return numbers[0]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def selected_pods(docs: list[dict], selector: dict[str, str]) -> list[dict]:
    """The Deployments whose pods a label selector picks."""
    return [
        doc
        for doc in of_kind(docs, "Deployment")
        if labels_match(selector, doc["spec"]["template"]["metadata"]["labels"])
    ]


@functools.cache
def help_flags(subcommand: str) -> frozenset[str]:
    """Every flag that `chatrpc <subcommand> --help` prints."""
    environment = {**os.environ, "COLUMNS": "1000"}  # no wrapping inside the usage lines
    result = subprocess.run(
        [sys.executable, "-m", "chatrpc", subcommand, "--help"],
        capture_output=True, text=True, check=True, cwd=REPO, env=environment, timeout=60,
    )  # fmt: skip
    return frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", result.stdout))


@functools.cache
def exported_metrics() -> frozenset[str]:
    """The series names the service and the adapter export (a counter's `_total`, a histogram's
    `_bucket`, `_sum` and `_count` included), from their own registries."""
    from prometheus_client import REGISTRY

    import adapters.rest.metrics  # noqa: F401 - registers the adapter's metrics in the default registry
    from service.metrics import ServiceMetrics

    class NoModels:
        def all(self) -> list:
            return []

    suffixes = {
        "counter": ("", "_total"),
        "histogram": ("", "_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
    }
    names = set()
    for registry in (ServiceMetrics(NoModels()).registry, REGISTRY):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return frozenset(name for name in names if name.startswith("chatrpc_"))


def strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


# --- The checks ------------------------------------------------------------------------------------


def test_there_are_manifests() -> None:
    assert {folder.name for folder in FOLDERS} >= {"mesh", "gateway"}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_kustomization_lists_every_manifest(folder: Path) -> None:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [path.name for path in manifest_files(folder)]


@pytest.mark.parametrize("doc", ALL_DOCUMENTS)
def test_resource_is_valid(doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        return
    except kubernetes_validate.ValidationError as error:
        # Reported outside the handler: jsonschema's own report quotes the whole schema.
        problem = f"{'.'.join(str(part) for part in error.path)}: {error.message}"
    except kubernetes_validate.SchemaNotFoundError:
        problem = None
    if problem is not None:
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {KUBERNETES_VERSION}): {problem}")
    required = CUSTOM_RESOURCES.get((doc["apiVersion"], doc["kind"]))
    assert required is not None, f"{doc['apiVersion']} {doc['kind']}: no schema, and not a custom resource known here"
    assert doc["metadata"]["name"]
    for path in required:
        assert dig(doc, path) not in (None, "", [], {}), f"{doc['kind']} lacks {'.'.join(map(str, path))}"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_chatrpc_flags_exist(folder: Path) -> None:
    found = list(chatrpc_containers(documents(folder)))
    assert found
    for _, container, subcommand, flags in found:
        unknown = set(flags) - help_flags(subcommand)
        assert not unknown, f"{container['name']}: `chatrpc {subcommand}` has no {sorted(unknown)}"


def test_containerfile_command_flags_exist() -> None:
    command = chatrpc_command([*image_setting("ENTRYPOINT"), *image_setting("CMD")])
    assert command is not None, "the image's entrypoint and command do not run chatrpc"
    subcommand, flags = command
    assert set(flags) <= help_flags(subcommand), (
        f"`chatrpc {subcommand}` has no {sorted(set(flags) - help_flags(subcommand))}"
    )


def test_containerfile_runs_as_a_numeric_non_root_user() -> None:
    users = [arguments for instruction, arguments in final_stage() if instruction == "USER"]
    assert users, "the image runs as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "runAsNonRoot can check only a numeric, non-zero USER"


def test_containerfile_exposes_the_default_ports() -> None:
    exposed = {
        int(port.split("/")[0])
        for instruction, arguments in final_stage()
        if instruction == "EXPOSE"
        for port in arguments.split()
    }
    assert exposed == {8000, 50051, 9464}


def test_ignore_files_agree() -> None:
    assert (REPO / ".dockerignore").read_text() == (REPO / ".containerignore").read_text()


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_metric_names_exist(folder: Path) -> None:
    named_here = {
        match for text in strings(documents(folder)) for match in re.findall(r"chatrpc_[a-z0-9_]*[a-z0-9]", text)
    }
    assert named_here, "the manifests name no chatrpc metric"
    assert named_here <= exported_metrics(), f"not exported: {sorted(named_here - exported_metrics())}"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_probes_match_the_server(folder: Path) -> None:
    for _, container, subcommand, flags in chatrpc_containers(documents(folder)):
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            if "grpc" in probe:
                assert subcommand in ("grpc", "serve"), f"{container['name']}: a gRPC probe on `chatrpc {subcommand}`"
                assert probe["grpc"]["port"] == grpc_port(subcommand, flags), (
                    f"{container['name']} {kind}: not the gRPC port"
                )
                service = probe["grpc"].get("service", "")
                # "" is the server up; the chat service's name is its models loaded and not draining.
                assert service in ("", CHAT_SERVICE), f"{container['name']} {kind}: unknown health service {service!r}"
                if kind == "readinessProbe":
                    assert service == CHAT_SERVICE, f"{container['name']}: ready must mean the chat service serves"
            else:
                http = probe["httpGet"]
                assert subcommand in ("rest", "serve"), f"{container['name']}: an HTTP probe on `chatrpc {subcommand}`"
                assert http["path"] in HEALTH_PATHS, f"{container['name']} {kind}: {http['path']}"
                assert container_port(container, http["port"]) == rest_port(flags), (
                    f"{container['name']} {kind}: not the REST port"
                )
                if kind == "readinessProbe":
                    assert http["path"] == "/health/ready"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_streams_can_drain(folder: Path) -> None:
    """Kubernetes kills a pod terminationGracePeriodSeconds after it starts stopping it, preStop
    included: the service's --grace must fit after the preStop sleep."""
    for spec, container, _, flags in chatrpc_containers(documents(folder)):
        pre_stop = dig(container, ("lifecycle", "preStop", "exec", "command")) or []
        assert pre_stop[:1] == ["sleep"], f"{container['name']}: no preStop sleep before SIGTERM"
        grace = float(flags.get("--grace") or 5.0)
        assert spec["terminationGracePeriodSeconds"] > int(pre_stop[1]) + grace, container["name"]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_references_resolve(folder: Path) -> None:
    docs = documents(folder)
    for doc in of_kind(docs, "Service") + of_kind(docs, "PodDisruptionBudget") + of_kind(docs, "PodMonitor"):
        selector = doc["spec"]["selector"]
        selector = selector.get("matchLabels", selector) if doc["kind"] != "Service" else selector
        assert selected_pods(docs, selector), f"{doc['kind']} {doc['metadata']['name']} selects no pods"
    for doc in of_kind(docs, "ScaledObject"):
        named(docs, "Deployment", doc["spec"]["scaleTargetRef"]["name"])
    for doc in of_kind(docs, "HTTPRoute"):
        for backend in doc["spec"]["rules"][0]["backendRefs"]:
            named(docs, backend["kind"], backend["name"])


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_adapter_upstream_is_the_headless_service(folder: Path) -> None:
    docs = documents(folder)
    for _, container, subcommand, flags in chatrpc_containers(docs):
        upstream = flags.get("--upstream")
        if subcommand != "rest" or upstream is None:
            continue
        match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", upstream)
        assert match, f"{container['name']}: --upstream {upstream} is not dns:///SERVICE:PORT"
        service = named(docs, "Service", match[1])
        assert service["spec"].get("clusterIP") == "None", "a ClusterIP would hide the replicas from the adapter"
        assert int(match[2]) in [port["port"] for port in service["spec"]["ports"]]
        backends = [
            command
            for deployment in selected_pods(docs, service["spec"]["selector"])
            for candidate in deployment["spec"]["template"]["spec"]["containers"]
            if (command := chatrpc_command(effective_argv(candidate))) is not None
        ]
        assert backends and all(grpc_port(*command) == int(match[2]) for command in backends), upstream


def test_inference_pool_and_its_picker_agree() -> None:
    docs = documents(MANIFESTS / "gateway")
    (pool,) = of_kind(docs, "InferencePool")
    spec = pool["spec"]
    servers = [
        command
        for deployment in selected_pods(docs, spec["selector"]["matchLabels"])
        for container in deployment["spec"]["template"]["spec"]["containers"]
        if (command := chatrpc_command(effective_argv(container))) is not None
    ]
    assert servers and all(subcommand == "serve" for subcommand, _ in servers), "the pool's pods must run chatrpc serve"
    # The pool's target port is where the pods speak OpenAI HTTP.
    for _, flags in servers:
        assert [port["number"] for port in spec["targetPorts"]] == [rest_port(flags)]

    picker_service = named(docs, "Service", spec["endpointPickerRef"]["name"])
    assert spec["endpointPickerRef"]["port"]["number"] in [port["port"] for port in picker_service["spec"]["ports"]]
    (picker,) = selected_pods(docs, picker_service["spec"]["selector"])
    (epp,) = picker["spec"]["template"]["spec"]["containers"]
    args = dict(arg.removeprefix("--").partition("=")[::2] for arg in epp["args"])
    assert args["pool-name"] == pool["metadata"]["name"]
    # The picker reads the engine's metrics where the service serves them, not on the target port.
    for _, flags in servers:
        assert int(args["model-server-metrics-port"]) == int_flag(flags, "--metrics-port", 9464)
    for signal in ("total-queued-requests-metric", "total-running-requests-metric", "kv-cache-usage-percentage-metric"):
        assert args[signal].split("{")[0] in exported_metrics(), signal
