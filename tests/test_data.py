"""Training data: synthetic people, winding-number labels, the EGL renderer (model/)."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from PIL import Image, ImageDraw

from model.data.humans import HELD_OUT_FAMILIES, POSE_FAMILIES, HumanConfig, make_subject
from model.render import Renderer, View, decode_normals
from model.data.scenes import procedural_background, random_lighting
from model.data.sampling import SamplingConfig, label_views, sample_query_points
from model.meshes import winding_inside


@pytest.fixture(scope="module")
def renderer():
    r = Renderer(512)
    yield r
    r.release()


# ---- synthetic people -------------------------------------------------------------------------


def test_subject_is_deterministic_closed_and_180cm(body_model):
    a = make_subject("a", 11, family="stand")
    b = make_subject("a", 11, family="stand")
    c = make_subject("a", 12, family="stand")
    for pa, pb in zip(a.parts, b.parts, strict=True):
        np.testing.assert_array_equal(pa.vertices, pb.vertices)
        np.testing.assert_array_equal(pa.faces, pb.faces)
        np.testing.assert_array_equal(pa.colors, pb.colors)
    assert not np.array_equal(a.parts[0].vertices, c.parts[0].vertices)
    assert a.info == b.info

    verts = np.concatenate([p.vertices for p in a.parts])
    height = np.ptp(verts[:, 1])
    assert 172 < height < 184, height  # standing: close to the 180 cm rest height
    np.testing.assert_allclose((verts.min(0) + verts.max(0)) / 2, 0, atol=1e-3)  # centred
    for part in a.parts:
        mesh = trimesh.Trimesh(part.vertices, part.faces, process=False)
        assert mesh.is_watertight and mesh.is_winding_consistent
        assert mesh.volume > 0  # outward-facing
        assert part.colors.shape == (len(part.vertices), 3) and 0 <= part.colors.min() and part.colors.max() <= 1


def test_garments_keep_the_body_closed_and_skirt_is_a_closed_part(body_model):
    subject = make_subject("skirted", 3, HumanConfig(skirt_probability=1.0), family="stand")
    names = [p.name for p in subject.parts]
    assert names == ["body", "skirt"]
    body, skirt = subject.parts
    # Garments move vertices along normals only: the body keeps anny's connectivity exactly.
    np.testing.assert_array_equal(body.faces, body_model.faces)
    for part in subject.parts:
        mesh = trimesh.Trimesh(part.vertices, part.faces, process=False)
        assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    # The skirt hangs around the hips: between the knees and the chest.
    assert skirt.vertices[:, 1].max() < body.vertices[:, 1].max() - 40
    assert skirt.vertices[:, 1].min() > body.vertices[:, 1].min() + 20
    assert subject.info["family"] == "stand" and subject.info["skirt"]


def test_pose_families_differ(body_model):
    shapes = {}
    for family in POSE_FAMILIES:
        s = make_subject("same-body", 5, family=family)
        assert s.info["family"] == family
        shapes[family] = np.concatenate([p.vertices for p in s.parts])[: len(body_model.faces) // 2]
    for i, f in enumerate(POSE_FAMILIES):
        for g in POSE_FAMILIES[i + 1 :]:
            moved = np.linalg.norm(shapes[f] - shapes[g], axis=1)
            assert np.percentile(moved, 90) > 5.0, (f, g)  # cm: a real difference in pose
    assert np.ptp(shapes["crouch"][:, 1]) < np.ptp(shapes["stand"][:, 1]) - 15


def test_held_out_family_is_drawn_only_when_asked(body_model):
    subject = make_subject("held-out", 5, HumanConfig(families=HELD_OUT_FAMILIES))
    assert subject.info["family"] == "lunge" and not subject.info["skirt"]
    assert "lunge" not in HumanConfig().families
    stand = make_subject("held-out", 5, family="stand").parts[0].vertices
    lunge = subject.parts[0].vertices
    assert np.ptp(lunge[:, 2]) > np.ptp(stand[:, 2]) + 20  # cm: a thigh forward, a leg back
    with pytest.raises(ValueError, match="families must be some of"):
        HumanConfig(families=("sit",))


# ---- labels -----------------------------------------------------------------------------------


def test_winding_labels_sphere_and_box():
    rng = np.random.default_rng(0)
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    box = trimesh.creation.box(extents=(0.4, 0.8, 0.3))
    q = rng.uniform(-1, 1, (20000, 3))
    r = np.linalg.norm(q, axis=1)
    clear = np.abs(r - 0.5) > 0.01  # the icosphere's facets sit within 1 % of the radius
    got = winding_inside([(sphere.vertices, sphere.faces)], q)
    np.testing.assert_array_equal(got[clear], (r < 0.5)[clear])
    in_box = (np.abs(q) < np.array([0.2, 0.4, 0.15])).all(1)
    np.testing.assert_array_equal(winding_inside([(box.vertices, box.faces)], q), in_box)
    # Inverted faces (a common scan defect) label the same.
    np.testing.assert_array_equal(winding_inside([(box.vertices, box.faces[:, ::-1])], q), in_box)


def test_winding_labels_union_of_overlapping_meshes():
    rng = np.random.default_rng(1)
    a = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    b = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    b.apply_translation([0.4, 0, 0])
    q = rng.uniform(-1, 1, (20000, 3))
    ra, rb = np.linalg.norm(q, axis=1), np.linalg.norm(q - [0.4, 0, 0], axis=1)
    clear = (np.abs(ra - 0.4) > 0.01) & (np.abs(rb - 0.4) > 0.01)
    truth = (ra < 0.4) | (rb < 0.4)
    got = winding_inside([(a.vertices, a.faces), (b.vertices, b.faces)], q)
    np.testing.assert_array_equal(got[clear], truth[clear])
    # The overlap (winding number 2 for the concatenated meshes) is inside too.
    both = trimesh.util.concatenate([a, b])
    np.testing.assert_array_equal(winding_inside([(both.vertices, both.faces)], q)[clear], truth[clear])


def test_view_points_agree_with_the_mesh(body_model):
    subject = make_subject("labels", 21, family="stand")
    parts = [(p.vertices, p.faces) for p in subject.parts]
    views = [View(30, 3), View(210, -2)]
    config = SamplingConfig(num_points=17000, num_surface_points=2000)
    out = label_views(parts, [v.world_from_canonical() for v in views], config, np.random.default_rng(0))
    for view, vp in zip(views, out):
        assert vp.points.shape == (17000, 3) and vp.points.dtype == np.float32
        assert vp.labels.shape == (17000,) and vp.labels.dtype == np.uint8
        assert 0.15 < vp.labels.mean() < 0.6
        # Uniform points fill the box; near points stay within a few sigma of it.
        assert np.abs(vp.points).max() < 1.0 + 6 * config.sigma
        # Surface points in this view's frame: 2 cm inward is inside, 2 cm outward is outside.
        view_parts = [(view.apply(v), f) for v, f in parts]
        d = 2.0 * view.units_per_cm
        inward = winding_inside(view_parts, vp.surface - d * vp.surface_normals)
        outward = winding_inside(view_parts, vp.surface + d * vp.surface_normals)
        assert inward.mean() > 0.93 and outward.mean() < 0.07
        # The centre of mass of a standing person (in the pelvis) is inside, far corners outside.
        body = trimesh.Trimesh(subject.parts[0].vertices, subject.parts[0].faces, process=False)
        centre = view.apply(np.asarray(body.center_mass)[None])
        assert winding_inside(view_parts, np.concatenate([centre, [[0.95, 0.95, 0.95], [-0.95, -0.9, 0.9]]])).tolist() == [True, False, False]


def test_ray_points_sample_depth_inside_the_silhouette():
    """Ray points keep a surface point's x, y and spread in z: the depth supervision."""
    box = trimesh.creation.box(extents=(0.4, 1.2, 0.3))
    parts = [(np.asarray(box.vertices), np.asarray(box.faces))]
    rng = np.random.default_rng(1)
    only_rays = SamplingConfig(num_points=4000, near_share=0.0, ray_share=1.0, ray_depth=0.4)
    points = sample_query_points(parts, only_rays, rng)
    assert (np.abs(points[:, 0]) <= 0.2 + 1e-9).all() and (np.abs(points[:, 1]) <= 0.6 + 1e-9).all()
    inside = winding_inside(parts, points)
    # The box is 0.3 deep and rays span 0.8: most ray points fall in front of it or behind.
    assert 0.1 < inside.mean() < 0.5
    # Rays through the front and back faces are outside exactly beyond the box's depth.
    through_faces = (np.abs(points[:, 0]) < 0.19) & (np.abs(points[:, 1]) < 0.59)
    np.testing.assert_array_equal(inside[through_faces], np.abs(points[through_faces, 2]) < 0.15)
    assert np.abs(points[:, 2]).max() > 0.4
    pifu = SamplingConfig.pifu()
    assert pifu.ray_share == 0 and abs(pifu.near_share - 16 / 17) < 1e-12
    with pytest.raises(ValueError, match="near_share"):
        SamplingConfig(near_share=0.9, ray_share=0.2)


# ---- rendering --------------------------------------------------------------------------------


def _silhouette(parts, view: View, size: int, supersample: int = 4) -> np.ndarray:
    """Independent mask: PIL rasterises every projected triangle at 4x and averages 4x4 blocks.

    Pixel i's centre is at x = -1 + 2 i / (S - 1) (align_corners); in the fine grid its 4x4 block
    spans [4 i, 4 i + 4), whose centre 4 i + 1.5 (PIL pixel centres at integer + 0.5) is the target.
    """
    fine = Image.new("L", (size * supersample, size * supersample), 0)
    draw = ImageDraw.Draw(fine)
    for part in parts:
        v = view.apply(part.vertices.astype(np.float64))
        col = (v[:, 0] + 1) / 2 * (size - 1)
        row = (1 - v[:, 1]) / 2 * (size - 1)
        fx, fy = col * supersample + supersample / 2, row * supersample + supersample / 2
        for tri in part.faces:
            draw.polygon([(fx[k], fy[k]) for k in tri], fill=255)
    a = np.asarray(fine, dtype=np.float32) / 255
    a = a.reshape(size, supersample, size, supersample).mean((1, 3))
    return a > 0.5


def test_render_matches_projection_and_normals(body_model, renderer):
    subject = make_subject("render", 2, family="gesture")
    rng = np.random.default_rng(0)
    background = procedural_background(rng, 512)
    for view in (View(0, 0), View(120, 4)):
        out = renderer.render(subject.parts, view, random_lighting(rng), background)
        assert out.rgb.shape == (512, 512, 3) and out.rgb.dtype == np.uint8
        mask = out.mask > 127
        expected = _silhouette(subject.parts, view, 512)
        iou = (mask & expected).sum() / (mask | expected).sum()
        assert iou > 0.95, iou
        front, back = decode_normals(out.normal_front), decode_normals(out.normal_back)
        assert (front[mask][:, 2] > 0).mean() > 0.95  # the nearest surface faces the camera
        assert (back[mask][:, 2] < 0).mean() > 0.95  # the farthest faces away
        np.testing.assert_array_equal(out.rgb[~mask], background[~mask])
        assert (out.normal_front[~mask] == 128).all()
        # A 180 cm person scaled by 0.01 units per cm spans y ~ [-0.9, 0.9]: rows ~ 13 .. 498.
        rows = np.flatnonzero(mask.any(1))
        assert rows[0] < 60 and rows[-1] > 450
        half = out.downsample()
        assert half.rgb.shape == (256, 256, 3) and half.mask.shape == (256, 256)


def test_render_is_deterministic(body_model, renderer):
    subject = make_subject("det", 4)
    images = []
    for _ in range(2):
        rng = np.random.default_rng(9)
        out = renderer.render(subject.parts, View(45, 2), random_lighting(rng), procedural_background(rng, 512))
        images.append(out)
    for k in ("rgb", "mask", "normal_front", "normal_back"):
        np.testing.assert_array_equal(getattr(images[0], k), getattr(images[1], k))


def test_backgrounds_from_a_folder(tmp_path):
    from model.data.scenes import image_background

    for i, size in enumerate([(300, 200), (640, 480)]):
        Image.new("RGB", size, (10 * i, 200, 30)).save(tmp_path / f"bg{i}.jpg")
    bg = image_background(np.random.default_rng(0), 256, str(tmp_path))
    assert bg.shape == (256, 256, 3) and bg.dtype == np.uint8
    assert abs(int(bg[..., 1].mean()) - 200) < 10
    procedural = procedural_background(np.random.default_rng(3), 256)
    assert procedural.shape == (256, 256, 3) and procedural.std() > 1  # not a flat colour
