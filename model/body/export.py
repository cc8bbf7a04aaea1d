"""A fitted body as files: the mesh (OBJ, PLY, GLB), `NAME_body.json` and a rigged GLB.

All in the pixel frame of the reconstructed mesh (`model.body.posing`), so body and reconstruction
overlay. The rigged GLB (glTF 2.0) carries anny's 104-bone skeleton as a node tree and each
vertex's four heaviest skinning weights (renormalised; anny stores up to nine); its bind pose is
the fitted pose, so rotating a joint node re-poses the body from there.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from model.body.fit import BodyFit

MESH_FORMATS = ("obj", "ply", "glb")
INFLUENCES = 4  # glTF's JOINTS_0 / WEIGHTS_0 hold four per vertex


def mesh_bytes(vertices: np.ndarray, faces: np.ndarray, mesh_format: str) -> bytes:
    """A plain triangle mesh (V, 3) pixel frame, (F, 3) as file bytes."""
    import trimesh

    if mesh_format not in MESH_FORMATS:
        raise ValueError(f"mesh format must be one of {MESH_FORMATS}, not {mesh_format!r}")
    data = trimesh.Trimesh(vertices, faces, process=False).export(file_type=mesh_format)
    return data.encode() if isinstance(data, str) else data


def body_json(fit: BodyFit, extra: dict | None = None) -> str:
    """`NAME_body.json`: the parameters that reproduce the body (`BodyParameters.from_json` reads
    it back) plus the fit's quality and any `extra` fields (e.g. the input's content hash)."""
    document = json.loads(fit.params.to_json())
    document["quality"] = {
        "mask_iou": fit.mask_iou,
        "landmark_error_px": fit.landmark_error_px,
        "landmark_error": fit.landmark_error,
        "low_quality": fit.low_quality,
        "note": fit.quality_note,
        "seconds": fit.seconds,
        "steps": fit.steps,
        "world_source": fit.world_source,
    }
    document.update(extra or {})
    return json.dumps(document, indent=1)


def _column_major(matrix: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(matrix, dtype=np.float64).T.reshape(-1)]


def rigged_glb(fit: BodyFit) -> bytes:
    """The fitted body with anny's skeleton and skin weights as a binary glTF 2.0 file."""
    import torch

    from model.body.posing import PHENOTYPE_LABELS, PosedAnny
    from model.body.anny import load_body_model

    body = load_body_model()
    model = body.anny
    params = fit.params
    posed = PosedAnny(body)
    phenotype = torch.tensor([[params.phenotype[k] for k in PHENOTYPE_LABELS]], dtype=torch.float32)
    with torch.no_grad():
        rest = posed.rest(phenotype)
        angles = torch.tensor(params.angle_array(), dtype=torch.float32)
        skinning, _ = posed.transforms(rest, angles)
        bone_poses = (skinning @ rest["rest_bone_poses"])[0].double().numpy()  # (J, 4, 4) anny frame, posed
    # The similarity anny -> pixel frame (module docstring of model.body.posing), as one root node.
    to_pixel = np.eye(4)
    to_pixel[:3, :3] = params.scale * np.asarray(params.rotation)
    to_pixel[:3, 3] = (params.root_pixel[0], params.image_size[1] - params.root_pixel[1], params.depth)
    parents = list(model.bone_parents)
    labels = body.bone_labels

    nodes = [{"name": "anny", "matrix": _column_major(to_pixel), "children": [1 + j for j, p in enumerate(parents) if p < 0]}]
    for j, label in enumerate(labels):
        local = bone_poses[j] if parents[j] < 0 else np.linalg.inv(bone_poses[parents[j]]) @ bone_poses[j]
        node = {"name": label, "matrix": _column_major(local)}
        children = [1 + c for c, p in enumerate(parents) if p == j]
        if children:
            node["children"] = children
        nodes.append(node)
    mesh_node = len(nodes)
    nodes.append({"name": "body", "mesh": 0, "skin": 0})
    inverse_bind = np.stack([np.linalg.inv(to_pixel @ pose) for pose in bone_poses])

    weights = model.vertex_bone_weights.cpu().numpy()
    indices = model.vertex_bone_indices.cpu().numpy()
    top = np.argsort(-weights, axis=1)[:, :INFLUENCES]
    joint_ids = np.take_along_axis(indices, top, 1).astype(np.uint16)
    joint_weights = np.take_along_axis(weights, top, 1).astype(np.float32)
    joint_weights /= joint_weights.sum(1, keepdims=True)
    joint_ids[joint_weights == 0] = 0

    positions = fit.vertices.astype(np.float32)
    triangles = fit.faces.astype(np.uint32).reshape(-1)
    blobs = [positions, triangles, joint_ids, joint_weights, inverse_bind.transpose(0, 2, 1).astype(np.float32)]
    binary, views = b"", []
    for blob in blobs:
        data = np.ascontiguousarray(blob).tobytes()
        views.append({"buffer": 0, "byteOffset": len(binary), "byteLength": len(data)})
        binary += data + b"\0" * (-len(data) % 4)
    views[0]["target"], views[1]["target"], views[2]["target"], views[3]["target"] = 34962, 34963, 34962, 34962
    accessors = [
        {"bufferView": 0, "componentType": 5126, "count": len(positions), "type": "VEC3",
         "min": positions.min(0).tolist(), "max": positions.max(0).tolist()},
        {"bufferView": 1, "componentType": 5125, "count": len(triangles), "type": "SCALAR"},
        {"bufferView": 2, "componentType": 5123, "count": len(positions), "type": "VEC4"},
        {"bufferView": 3, "componentType": 5126, "count": len(positions), "type": "VEC4"},
        {"bufferView": 4, "componentType": 5126, "count": len(labels), "type": "MAT4"},
    ]
    document = {
        "asset": {"version": "2.0", "generator": "pifuhd-ray model.body (anny, Apache-2.0 / CC0)"},
        "scene": 0,
        "scenes": [{"nodes": [0, mesh_node]}],
        "nodes": nodes,
        "meshes": [{"name": "anny", "primitives": [{"attributes": {"POSITION": 0, "JOINTS_0": 2, "WEIGHTS_0": 3}, "indices": 1}]}],
        "skins": [{"name": "anny", "skeleton": 0, "joints": list(range(1, 1 + len(labels))), "inverseBindMatrices": 4}],
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": len(binary)}],
    }
    text = json.dumps(document, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    total = 12 + 8 + len(text) + 8 + len(binary)
    return b"".join([
        struct.pack("<4sII", b"glTF", 2, total),
        struct.pack("<I4s", len(text), b"JSON"), text,
        struct.pack("<I4s", len(binary), b"BIN\0"), binary,
    ])
