"""JSON schemas for KubeRay manifests from the operator's own CRDs, strict about unknown keys.

A CRD carries the OpenAPI v3 schema the Kubernetes API server applies to its objects
(`spec.versions[name].schema.openAPIV3Schema`). It leaves `additionalProperties` unset, because
the server prunes unknown fields by itself: a misspelt key would pass a plain validation and
then be dropped without a word. `manifest_schema` therefore adds `additionalProperties: false` to
every object that lists its properties, pins `apiVersion` and `kind` to the CRD's, and drops the
Kubernetes extensions (`x-kubernetes-*`, `nullable`) that a JSON-schema validator does not know;
int-or-string fields already spell out their `anyOf`.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def _strict(node):
    """A copy of an OpenAPI schema node without Kubernetes extensions, closed to unknown keys."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _strict(value) for key, value in node.items() if not key.startswith("x-kubernetes-") and key != "nullable"}
    if "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def manifest_schema(crd_path: str | Path, version: str = "v1") -> dict:
    """The strict JSON schema (draft 4) of one KubeRay kind at `version`, from its CRD file."""
    crd = yaml.safe_load(Path(crd_path).read_text())
    served = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not served:
        raise ValueError(f"{crd_path}: the CRD has no version {version!r}")
    schema = _strict(served[0]["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"enum": [f"{crd['spec']['group']}/{version}"]}
    schema["properties"]["kind"] = {"enum": [crd["spec"]["names"]["kind"]]}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return schema
