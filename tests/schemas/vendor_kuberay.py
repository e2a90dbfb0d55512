"""Rebuild kuberay-rayjob-v1.json from KubeRay's RayJob CRD (run by hand when moving to another KubeRay version).

    git -C kuberay show v1.7.0:ray-operator/config/crd/bases/ray.io_rayjobs.yaml > ray.io_rayjobs.yaml
    python tests/schemas/vendor_kuberay.py ray.io_rayjobs.yaml v1.7.0 <commit>

Kept from the CRD: the ``v1`` openAPIV3Schema (the RayJob, whose ``spec.rayClusterSpec`` is the RayCluster CRD's
``spec``), without ``status`` and without descriptions; subtrees that occur more than once (the pod templates) are
stored once under ``$defs`` and referenced.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import yaml

MIN_SHARED = 2000  # characters: smaller repeated subtrees stay inline


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _key(node) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _count(node, counts: Counter) -> None:
    if isinstance(node, dict):
        counts[_key(node)] += 1
        for value in node.values():
            _count(value, counts)
    elif isinstance(node, list):
        for value in node:
            _count(value, counts)


def _share(node, shared: dict[str, str]):
    if isinstance(node, dict):
        key = _key(node)
        if key in shared:
            return {"$ref": f"#/$defs/{shared[key]}"}
        return {k: _share(v, shared) for k, v in node.items()}
    if isinstance(node, list):
        return [_share(v, shared) for v in node]
    return node


def main(crd_file: str, version: str, commit: str) -> None:
    crd = yaml.safe_load(Path(crd_file).read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strip(v1["schema"]["openAPIV3Schema"])
    del schema["properties"]["status"]
    counts: Counter = Counter()
    _count(schema["properties"]["spec"], counts)
    repeated = sorted((k for k, n in counts.items() if n > 1 and len(k) >= MIN_SHARED), key=len, reverse=True)
    shared: dict[str, str] = {}
    defs: dict[str, object] = {}
    for key in repeated:  # largest first: a shared subtree's own repeated parts stay inside it
        if any(key in outer for outer in shared):
            continue
        shared[key] = f"shared{len(shared)}"
    for key, name in shared.items():
        defs[name] = _share(json.loads(key), {k: n for k, n in shared.items() if k != key})
    schema = _share(schema, shared)
    out = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"KubeRay {version} ({commit}), ray-operator/config/crd/bases/ray.io_rayjobs.yaml, version v1: "
            "openAPIV3Schema without status and descriptions; repeated subtrees under $defs. Apache-2.0."
        ),
        **schema,
        "$defs": defs,
    }
    target = Path(__file__).with_name("kuberay-rayjob-v1.json")
    target.write_text(json.dumps(out, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"{target}: {target.stat().st_size} bytes, {len(defs)} shared subtrees")


if __name__ == "__main__":
    main(*sys.argv[1:])
