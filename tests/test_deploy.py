"""The deployment files, checked offline: cluster.yaml and cluster-gcp.yaml against Ray's own cluster-config
validation; the Kubernetes manifests in deploy/k8s against Kubernetes' OpenAPI schemas (kubernetes-validate) and
KubeRay's CRD schema (tests/schemas, vendored); every name and value they share with each other, the Dockerfile and
the code; the README's commands against the files they name."""

from __future__ import annotations

import configparser
import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from components.config import load_pipeline_config
from components.driver import check_resources
from nas.config import ConfigError, config_parser

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
CLUSTERS = ["cluster.yaml", "cluster-gcp.yaml"]
SETUP = configparser.ConfigParser()
SETUP.read(ROOT / "setup.cfg")
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]  # KubeRay 1.7's oldest supported, the newest


# ----------------------------------------------------------------------------------------------------------- helpers


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _resources() -> list[dict[str, Any]]:
    """Every object kustomization.yaml applies, in its order."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in _documents(K8S / name)]


def _secrets() -> dict[str, dict[str, str]]:
    """The Secrets the user creates from secrets.example.yaml: name -> data."""
    return {doc["metadata"]["name"]: doc["stringData"] for doc in _documents(K8S / "secrets.example.yaml")}


def _find(kind: str, name: str) -> dict[str, Any]:
    (found,) = [doc for doc in _resources() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def _rayjob() -> dict[str, Any]:
    (job,) = [doc for doc in _resources() if doc["kind"] == "RayJob"]
    return job


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod the manifests start, Ray's included."""
    specs = []
    for doc in _resources():
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "StatefulSet"):
            specs.append((where, doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "RayJob":
            cluster = doc["spec"]["rayClusterSpec"]
            specs.append((f"{where} head", cluster["headGroupSpec"]["template"]["spec"]))
            for group in cluster["workerGroupSpecs"]:
                specs.append((f"{where} {group['groupName']}", group["template"]["spec"]))
    return specs


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def _environment(container: dict[str, Any]) -> dict[str, str | None]:
    """The container's variables: their values where the manifests give them (ConfigMaps), None for Secrets."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= _find("ConfigMap", source["configMapRef"]["name"])["data"]
        else:
            env |= dict.fromkeys(_secrets()[source["secretRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = _find("ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            env[var["name"]] = None
    return env


def _service_for(url: str) -> dict[str, Any]:
    """The Service a ``scheme://name:port`` URL reaches, checked to lead to a container listening on that port."""
    parsed = urlparse(url)
    service = _find("Service", parsed.hostname)
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == parsed.port]
    pods = [
        doc["spec"]["template"]
        for doc in _resources()
        if doc["kind"] in ("Deployment", "StatefulSet")
        and service["spec"]["selector"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(pods) == 1, f"{url}: the Service selects {len(pods)} workloads"
    listening = {p["containerPort"] for c in pods[0]["spec"]["containers"] for p in c.get("ports", [])}
    assert port["targetPort"] in listening, f"{url}: nothing listens on {port['targetPort']}"
    return service


def _strict(schema: Any) -> Any:
    """A CRD schema as the API server applies it: fields it does not list are not kept (here: refused)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


RAYJOB_SCHEMA = _strict(json.loads((ROOT / "tests" / "schemas" / "kuberay-rayjob-v1.json").read_text()))
RAYJOB = jsonschema.Draft202012Validator(RAYJOB_SCHEMA)  # built once: checking a schema this size takes seconds
RAYCLUSTER_SCHEMA = {  # the RayCluster CRD's spec is the RayJob's spec.rayClusterSpec (the same Go type)
    "$defs": RAYJOB_SCHEMA["$defs"],
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {"type": "object"},
        "spec": RAYJOB_SCHEMA["properties"]["spec"]["properties"]["rayClusterSpec"],
    },
}


def _mlflow_server() -> dict[str, Any]:
    """The MLflow server's container."""
    (container,) = _find("Deployment", "raydarts-mlflow")["spec"]["template"]["spec"]["containers"]
    return container


def _entrypoint() -> tuple[list[str], Any]:
    """The RayJob's entrypoint: (its words, the pipeline config it resolves to, checked by the pipeline's parser)."""
    words = shlex.split(_rayjob()["spec"]["entrypoint"])
    args = config_parser("full.py", "", "quick").parse_args(words[2:])
    return words, load_pipeline_config(args.config, args.overrides)


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _docker_arg(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", _dockerfile(), re.M)
    return value


# ------------------------------------------------------------------------------------------- the Ray cluster launcher


@pytest.mark.parametrize("name", CLUSTERS)
def test_cluster_configs_pass_rays_own_validation(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / name).read_text())
    validate_config(copy.deepcopy(config))  # ray-schema.json, as `ray up` checks the file
    prepared = prepare_config(copy.deepcopy(config))  # merged with the provider's defaults, as `ray up` does
    validate_config(prepared)
    nodes = prepared["available_node_types"]
    head, workers = nodes[prepared["head_node_type"]], [n for k, n in nodes.items() if k != prepared["head_node_type"]]
    assert "GPU" not in head["resources"] and head["max_workers"] == 0
    assert [w["min_workers"] for w in workers] == [1] and workers[0]["max_workers"] == prepared["max_workers"]


@pytest.mark.parametrize("name", CLUSTERS)
def test_cluster_nodes_install_this_checkout_and_share_the_ray_token(name: str) -> None:
    config = yaml.safe_load((ROOT / name).read_text())
    remote = next(k for k, v in config["file_mounts"].items() if v == ".")  # this checkout on every node
    assert any(
        f"cd {remote} && " in c and re.search(r"pip install( --user)? -e \.$", c) for c in config["setup_commands"]
    )
    assert "pip install -e ." in (ROOT / "README.md").read_text()  # the README's install step
    assert config["rsync_filter"] == [".gitignore"] and ".venv/" in (ROOT / ".gitignore").read_text()
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in commands)
    assert "ray start --head" not in " ".join(config["setup_commands"])  # the launcher starts Ray, nothing else


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _commands(text: str) -> list[list[str]]:
    """The shell commands of a text's bash blocks (continuation lines joined, comments dropped), split into words."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line, comments=True))
    return commands


def _check_pipeline_command(words: list[str]) -> str:
    """``... python pipelines/full.py --config P --set k=v ...``: the script exists, the preset and overrides load."""
    script = words.index("pipelines/full.py")
    assert (ROOT / words[script]).is_file()
    args = config_parser("full.py", "", "quick").parse_args(words[script + 1 :])
    assert (ROOT / "nas" / "presets" / f"{args.config}.yaml").is_file(), args.config
    load_pipeline_config(args.config, args.overrides)
    return args.config


def test_the_readmes_cluster_commands_name_what_exists() -> None:
    commands = _commands(_section("On a Ray cluster: `ray up`"))
    ups = [c[2] for c in commands if c[:2] == ["ray", "up"]]
    downs = [c[2] for c in commands if c[:2] == ["ray", "down"]]
    assert "cluster.yaml" in ups and sorted(ups) == sorted(downs)
    assert all((ROOT / name).is_file() for name in ups)
    submits = [c for c in commands if "submit" in c and "pipelines/full.py" in c]
    assert submits and {_check_pipeline_command(c) for c in submits} == {"cifar10"}
    for name in CLUSTERS:  # the commands each file's header comment shows
        header = "\n".join(line[1:] for line in (ROOT / name).read_text().splitlines() if line.startswith("#"))
        words = shlex.split(header.split("ray job submit", 1)[1].split("ray down")[0].replace("\\\n", " "))
        assert _check_pipeline_command(words) == "cifar10"
        assert f"ray up {name}" in header and f"ray down {name}" in header


def test_the_readmes_kubernetes_commands_name_what_exists() -> None:
    commands = _commands(_section("On Kubernetes: KubeRay"))
    applied = [c[c.index("-k") + 1] for c in commands if c[:2] == ["kubectl", "apply"] and "-k" in c]
    assert applied == ["deploy/k8s"]
    files = [c[c.index("-f") + 1] for c in commands if c[:2] == ["kubectl", "apply"] and "-f" in c]
    assert files == ["~/raydarts-secrets.yaml"]  # the filled-in copy of secrets.example.yaml, outside the repository
    assert any(c[:2] == ["cp", "deploy/k8s/secrets.example.yaml"] and c[2] == files[0] for c in commands)
    builds = [c for c in commands if c[:2] == ["docker", "build"]]
    assert builds and all(c[-1] == "." for c in builds)


# -------------------------------------------------------------------------------------------- the Kubernetes manifests


def test_the_manifests_parse_and_kustomize_lists_them() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert listed == on_disk
    kinds = sorted(doc["kind"] for doc in _resources())
    assert kinds == sorted(
        ["ConfigMap", "ConfigMap", "Service", "StatefulSet", "PersistentVolumeClaim", "Service", "Deployment"]
        + ["Service", "Deployment", "RayJob"]
    )
    for doc in [*_resources(), *_documents(K8S / "secrets.example.yaml")]:
        assert "namespace" not in doc["metadata"]  # kustomization.yaml's namespace applies to all


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_against_the_kubernetes_schemas(version: str) -> None:
    core = [doc for doc in [*_resources(), *_documents(K8S / "secrets.example.yaml")] if doc["kind"] != "RayJob"]
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)
    broken = copy.deepcopy(_find("Deployment", "raydarts-mlflow"))
    broken["spec"]["template"]["spec"]["containers"][0]["envFromm"] = []
    with pytest.raises(kubernetes_validate.ValidationError, match="envFromm"):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_rayjob_and_its_raycluster_validate_against_kuberays_crd_schema() -> None:
    job = _rayjob()
    RAYJOB.validate(job)
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "raydarts"}}
    jsonschema.Draft202012Validator(RAYCLUSTER_SCHEMA).validate(cluster | {"spec": job["spec"]["rayClusterSpec"]})
    for path, value in [
        (("rayClusterSpec", "workerGroupSpecs", 0, "maxReplica"), 4),  # a misspelled field
        (("rayClusterSpec", "authOptions", "mode"), "password"),  # not one of the enum
        (("rayClusterSpec", "headGroupSpec", "rayStartParams", "num-gpus"), 0),  # params are strings
    ]:
        broken = copy.deepcopy(job)
        node = broken["spec"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            RAYJOB.validate(broken)
    # Ray's pods pass Kubernetes' own PodSpec schema too
    for where, spec in _pod_specs():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": spec}
        assert kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True), where


def test_every_secret_and_configmap_reference_resolves() -> None:
    secrets = _secrets()
    configmaps = {doc["metadata"]["name"]: doc["data"] for doc in _resources() if doc["kind"] == "ConfigMap"}
    used: set[str] = set()
    for where, spec in _pod_specs():
        for container in _containers(spec):
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, where
                    used.add(source["secretRef"]["name"])
                else:
                    assert source["configMapRef"]["name"] in configmaps, where
            for var in container.get("env", []):
                ref = var.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["key"] in secrets[ref["secretKeyRef"]["name"]], (where, var)
                    used.add(ref["secretKeyRef"]["name"])
                elif "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in configmaps[ref["configMapKeyRef"]["name"]], (where, var)
            env = _environment(container)
            for arg in [*container.get("command", []), *container.get("args", [])]:
                for name in re.findall(r"\$\((\w+)\)", arg):  # Kubernetes expands $(NAME) from the environment
                    assert name in env, (where, name)
            for volume in spec.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    _find("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    auth = _rayjob()["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token" and "auth_token" in secrets[auth["secretName"]]  # the key KubeRay reads
    assert used | {auth["secretName"]} == set(secrets)  # no Secret the user creates for nothing


def test_the_services_the_code_and_the_server_reach_exist() -> None:
    env = _find("ConfigMap", "raydarts-env")["data"]
    mlflow = _service_for(env["MLFLOW_TRACKING_URI"])
    _service_for(env["AWS_ENDPOINT_URL"])
    server = _mlflow_server()
    args = dict(a.removeprefix("--").split("=", 1) for a in server["args"] if "=" in a)
    backend = args["backend-store-uri"]
    assert backend.startswith("postgresql://")
    _service_for("postgresql://" + backend.split("@", 1)[1].split("/")[0])
    assert int(args["port"]) == mlflow["spec"]["ports"][0]["targetPort"] and "--serve-artifacts" in server["args"]
    assert _environment(server)["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"]
    # the Host header of the tracking URI is one the server admits (tests/test_mlflow_server.py asks a real server)
    allowed = _environment(server)["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert any(
        re.fullmatch(a.replace(".", r"\.").replace("*", ".*"), urlparse(env["MLFLOW_TRACKING_URI"]).netloc)
        for a in allowed
    )


def test_the_rayjob_runs_the_pipeline_with_what_the_cluster_provides() -> None:
    words, config = _entrypoint()
    assert words[:2] == ["python", "/app/pipelines/full.py"]
    assert re.search(r"^WORKDIR /app$", _dockerfile(), re.M) and "COPY pipelines ./pipelines" in _dockerfile()
    assert (ROOT / "pipelines" / "full.py").is_file()
    assert config.name == "cifar10" and (ROOT / "nas" / "presets" / "cifar10.yaml").is_file()
    # MLflow: the config leaves it to MLFLOW_TRACKING_URI, which the head (where the driver runs) has
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert config.mlflow.tracking_uri is None and _environment(head)["MLFLOW_TRACKING_URI"].startswith("http://")
    # storage: an s3:// URI in the bucket the MLflow server's init container creates, on the in-cluster S3 API
    storage = urlparse(config.ray.storage_path)
    artifacts = urlparse(_environment(_mlflow_server())["MLFLOW_ARTIFACTS_DESTINATION"])
    assert storage.scheme == artifacts.scheme == "s3" and storage.netloc == artifacts.netloc
    assert storage.path.strip("/") != artifacts.path.strip("/")
    assert config.data.root.startswith("/home/ray/")  # a folder the image's user owns
    # resources: the head holds no GPU; each search or retrain worker fits one GPU pod; the pipeline's own preflight
    # passes on the cluster as it starts (minReplicas), and the autoscaler can run every search at once
    assert config.ray.use_gpu and head["resources"]["limits"].get("nvidia.com/gpu") is None
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    pod_gpus, pod_cpus = float(limits["nvidia.com/gpu"]), float(limits["cpu"])
    assert pod_gpus >= config.ray.gpus_per_worker and pod_cpus >= config.ray.cpus_per_worker
    head_cpus = float(head["resources"]["limits"]["cpu"])
    check_resources(config, head_cpus + group["minReplicas"] * pod_cpus, group["minReplicas"] * pod_gpus, sweep=True)
    with pytest.raises(ConfigError, match="but the cluster has"):  # what autoscaling from zero pods would meet
        check_resources(config, head_cpus, 0.0, sweep=True)
    searches = len(config.sweep.seeds) * len(config.sweep.xi)
    assert group["maxReplicas"] * pod_gpus >= searches * config.ray.num_workers * config.ray.gpus_per_worker
    # the image: the Dockerfile's, at the project's version, with the Ray version KubeRay is told
    images = {c["image"] for _, spec in _pod_specs() for c in _containers(spec) if "raydarts" in c["image"]}
    assert images == {"raydarts"}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": "raydarts", "newTag": SETUP["metadata"]["version"]}]
    assert cluster["rayVersion"] == _docker_arg("RAY_VERSION")


def test_the_dockerfile_installs_the_project_the_readmes_way() -> None:
    text = _dockerfile()
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["python:3.11-slim"]
    assert re.search(r"pip install -e \"?\.(\[kubeflow\])?", text)  # the README's step, with the Kubeflow steps' kfp
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
    packages = {p.split(".")[0] for p in SETUP["options.packages.find"]["include"].split()}
    assert copied == packages
    requires = {re.split(r"[<>=\[]", r)[0]: r for r in SETUP["options"]["install_requires"].split("\n") if r}
    for name in ("torch", "torchvision"):  # the image's torch pins are setup.cfg's
        assert f'"{requires[name]}"' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "data", "runs", "mlflow.db"} <= set(ignored)
