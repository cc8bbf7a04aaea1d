"""Real MakeHuman garments on the anny body (model/data/garments.py), read from ../shared/real/makehuman."""

from pathlib import Path

import numpy as np
import pytest

from model.data import garments
from model.data.humans import HumanConfig, make_subject
from model.meshes import winding_inside

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "real" / "makehuman"


@pytest.fixture(scope="module")
def assets():
    if not ASSETS.is_dir():
        pytest.fail(f"MakeHuman assets missing: {ASSETS} (shared/ must sit beside the repository)")
    return garments.read_assets(str(ASSETS))


def test_every_asset_parses_with_its_licence(assets):
    kinds = {a.kind for a in assets}
    assert kinds == set(garments.KINDS)
    for a in assets:
        assert len(a.anchors) == len(a.uv) and a.faces.max() < len(a.anchors), a.name
        assert a.anchors.max() < 19158 and set(a.scales) == {"x", "y", "z"}, a.name
        assert "CC0" in a.licence, a.name
    notice = garments.asset_notice(assets)
    assert "male_casualsuit01 (suit)" in notice and "Data Collection AB" in notice


def test_a_bad_asset_is_named(tmp_path):
    (tmp_path / "broken.mhclo").write_text("basemesh hm08\nname broken\nobj_file missing.obj\nverts 0\n1 2 3 0.3 0.3 0.4 0 0 0\n")
    with pytest.raises(FileNotFoundError):
        garments.read_asset(tmp_path / "broken.mhclo")
    (tmp_path / "other.mhclo").write_text("basemesh hm07\n")
    with pytest.raises(ValueError, match="hm07"):
        garments.read_asset(tmp_path / "other.mhclo")


def _distance_to(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    import igl

    squared = igl.point_mesh_squared_distance(np.ascontiguousarray(points, np.float64), np.ascontiguousarray(vertices, np.float64),
                                              np.ascontiguousarray(faces, np.int64))[0]
    return np.sqrt(squared)


def test_garments_follow_the_posed_body(body_model, assets):
    config = HumanConfig(garments=str(ASSETS))
    subject = make_subject("dressed", 7, config, family="walk")
    again = make_subject("dressed", 7, config, family="walk")
    assert [p.name for p in subject.parts] == [p.name for p in again.parts]
    assert all(np.array_equal(p.vertices, q.vertices) for p, q in zip(subject.parts, again.parts))
    names = subject.info["garments"]
    assert subject.info["label_union"] and len(subject.parts) == 1 + len(names)
    kinds = {a.name: a.kind for a in assets}
    assert {"suit", "shoes", "hair"} <= {kinds[n] for n in names}
    body = subject.body
    for part in subject.parts[1:]:
        distance = _distance_to(part.vertices[::7], body.vertices, body.faces)
        # Garments hug the posed body (a suit within a few cm), not the rest pose the assets were made on.
        limit = {"suit": 6.0, "shoes": 6.0, "hair": 15.0, "hat": 20.0}[kinds[part.name]]
        assert np.percentile(distance, 95) < limit, (part.name, np.percentile(distance, 95))
    assert subject.info["garment_inside_share"] <= config.max_garment_inside
    height = np.ptp(np.concatenate([p.vertices for p in subject.parts])[:, 1])
    assert 150 < height < 185  # 180 cm in the dressed rest pose; a stride is a little shorter


def test_the_clothing_layer_is_labelled_inside(body_model):
    subject = make_subject("layer", 3, HumanConfig(garments=str(ASSETS)), family="stand")
    suit = next(p for p in subject.parts[1:] if p.name in subject.info["garments"][:1])
    merged = subject.merged()
    from model.meshes import vertex_normals

    normals = vertex_normals(suit.vertices.astype(np.float64), suit.faces)
    gap = _distance_to(suit.vertices, subject.body.vertices, subject.body.faces) > 1.0  # cloth 1 cm off the skin
    just_inside = suit.vertices[gap] - 0.5 * normals[gap]
    outside = suit.vertices[gap] + 2.0 * normals[gap]
    parts = [(merged.vertices, merged.faces)]
    assert winding_inside(parts, just_inside).mean() > 0.9
    assert winding_inside(parts, outside).mean() < 0.1


def test_garments_that_fit_no_pose_refuse_the_subject(body_model):
    """This draw's suit lies 30 % inside the body in every pose, the rest pose too: no subject, a reason."""
    from model.data.humans import GarmentFitError
    from pipelines.jobs.data import subject_seeds

    with pytest.raises(GarmentFitError, match="female_casualsuit01.*inside the body in every pose"):
        make_subject("misfit", subject_seeds(11, 10)[0], HumanConfig(garments=str(ASSETS)))
