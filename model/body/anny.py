"""The anny body model as this project uses it: one closed mesh, built once per process.

Frames. anny works in metres with Z up and the body facing -Y; `ANNY_TO_CANONICAL` turns that into
the project's canonical frame (y up, facing +z). Phenotype values run 0..1 (`ADULT_AGE` and
`CHILD_AGE` bound anny's "age"); `JOINT_LIMITS` bounds the joints the generator poses and the
fitter fits.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.cache import configure_caches


TOPOLOGY = "anny-noeyes-notongue"  # one closed part: eyes and tongue would sit inside the head


# anny's "age" phenotype runs 0..1 over MakeHuman's anchors 1, 11, 25, 90 years at 0, 0.1875, 0.5, 1.
ADULT_AGE = (0.36, 0.85)  # about 18 to 67 years


CHILD_AGE = (0.12, 0.34)  # about 7 to 17 years


def body_model_cached() -> bool:
    """Whether anny's blend-shape cache for this project's configuration is probably built already."""
    configure_caches()
    return any(Path(os.environ["ANNY_CACHE_DIR"]).glob("v*/build_compact_model_data_*.safetensors"))


@dataclass
class BodyModel:
    """anny in float32 plus what the generator derives once from its rig."""

    anny: object
    faces: np.ndarray  # (F, 3) int64 triangles
    bone_labels: list[str]
    dominant_bone: np.ndarray  # (V,) index of the bone with the largest skinning weight
    adjacency: object  # (V, V) scipy sparse row-normalised vertex adjacency, for smoothing
    collisions: object  # anny.utils.collision.SelfInterpenetrationModule


@functools.lru_cache(maxsize=1)
def load_body_model() -> BodyModel:
    """The anny model (float32, one closed part), built once per process and cached."""
    configure_caches()
    import warp

    # anny's skinning runs on warp, whose banner and module-load lines are INFO: keep warnings only.
    warp.config.log_level = max(warp.config.log_level, warp.LOG_WARNING)
    import anny
    import scipy.sparse as sp
    import torch
    from anny.utils.collision import SelfInterpenetrationModule

    model = anny.Anny(topology=TOPOLOGY).to(torch.float32).eval()
    faces = model.get_triangular_faces().cpu().numpy().astype(np.int64)
    weights = model.vertex_bone_weights.cpu().numpy()
    indices = model.vertex_bone_indices.cpu().numpy()
    dominant = indices[np.arange(len(indices)), weights.argmax(1)]
    n = len(weights)
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    adj = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    adj.data[:] = 1.0
    adj = sp.diags(1.0 / np.maximum(adj.sum(1).A1, 1)) @ adj
    return BodyModel(
        anny=model,
        faces=faces,
        bone_labels=list(model.bone_labels),
        dominant_bone=dominant,
        adjacency=adj.tocsr(),
        collisions=SelfInterpenetrationModule(model),
    )


# Joint limits in radians for anny's "local-ref" parameterisation (rotation vectors in the
# rest frame's world axes, X = the body's left, Y = backward, Z = up), for the left side; the
# right side mirrors as (x, -y, -z). Values outside are clipped so no family breaks a joint.
JOINT_LIMITS = {
    "upperleg01": ((-2.0, 0.5), (-0.6, 0.3), (-0.5, 0.5)),  # flexion is -x, abduction -y
    "lowerleg01": ((0.0, 2.4), (0.0, 0.0), (-0.2, 0.2)),  # knee bends +x only
    "foot": ((-0.7, 0.5), (-0.2, 0.2), (-0.3, 0.3)),
    "upperarm01": ((-2.8, 0.9), (-2.2, 1.0), (-0.9, 0.9)),  # raising forward -x, sideways -y
    "lowerarm01": ((0.0, 1.9), (0.0, 0.0), (0.0, 0.0)),  # elbow flexion about its own axis (rest is bent ~45 deg)
    "spine03": ((-0.3, 0.7), (-0.25, 0.25), (-0.4, 0.4)),
    "spine01": ((-0.2, 0.4), (-0.2, 0.2), (-0.3, 0.3)),
    "neck01": ((-0.4, 0.5), (-0.3, 0.3), (-0.6, 0.6)),
}


# anny (x left, y back, z up) -> canonical (x right-of-camera, y up, z forward): rotation of -90 deg about x.
ANNY_TO_CANONICAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
