"""The model shipped in the repository: loads, is the default, and reconstructs a person."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

import model
from model.reconstruction.preprocess import prepare_image_file
from model.reconstruction.reconstruct import ReconstructionConfig, reconstruct
from pipelines.common.checkpoints import SHIPPED_CHECKPOINT, default_checkpoint

EXAMPLE = SHIPPED_CHECKPOINT.parents[2] / "examples" / "synthetic_person.png"  # a held-out test view


@pytest.fixture(scope="module")
def shipped():
    return model.load_checkpoint(default_checkpoint())


def test_shipped_checkpoint_is_small_and_documented(shipped):
    assert SHIPPED_CHECKPOINT.stat().st_size < 40 * 2**20
    meta = shipped.checkpoint_metadata
    assert meta["preset"] == "small" and [s["stage"] for s in meta["stages"]] == ["normal", "coarse", "fine"]
    assert "train_small.sh" in meta["recipe"]
    assert all(s["steps"] > 0 for s in meta["stages"])


def test_example_photo_becomes_a_person_shaped_mesh(shipped):
    from model.reconstruction.body_guidance import with_fitted_body
    from model.person import PersonFinder

    assert shipped.config.body_guided  # the shipped default reads a body fitted to the photo
    prepared = prepare_image_file(EXAMPLE, sizes=(shipped.config.coarse_size, shipped.config.fine_size))
    (person,) = PersonFinder().find(np.asarray(Image.open(EXAMPLE).convert("RGB")))
    prepared, _ = with_fitted_body(prepared, person.landmarks, person.world_landmarks, person.mask)
    result = reconstruct(shipped, prepared, ReconstructionConfig(resolution=128))
    assert len(result.mesh.faces) > 1000
    # Project the mesh (pixel frame, y up) onto the photo and compare with the person's alpha.
    alpha = np.asarray(Image.open(EXAMPLE))[..., 3] > 127
    height, width = alpha.shape
    x = np.clip(result.mesh.vertices[:, 0].astype(int), 0, width - 1)
    y = np.clip((height - result.mesh.vertices[:, 1]).astype(int), 0, height - 1)
    # Most vertices sit on the silhouette's rim: allow them a few pixels (1 % of the image) of slack.
    on_person = binary_dilation(alpha, iterations=5)[y, x].mean()
    rows, cols = np.nonzero(alpha)
    assert on_person > 0.8, on_person
    extent = result.mesh.bounds[1, :2] - result.mesh.bounds[0, :2]
    assert 0.6 < extent[1] / (rows.max() - rows.min()) < 1.4  # as tall as the person
    assert extent[1] > 1.5 * extent[0]  # taller than wide, like a standing person
    # Not a blob: the mesh is about as deep as a person, not as deep as it is wide or tall. Depth
    # as `evaluate`'s depth_ratio takes it (2nd-98th percentile), over the height: the truth of this
    # view is 0.23, the shipped model gives 0.27 (v3 with the first lifter 0.30), the plain model 0.44.
    depth = np.percentile(result.mesh.vertices[:, 2], 98) - np.percentile(result.mesh.vertices[:, 2], 2)
    assert depth < 0.37 * extent[1], depth / extent[1]
