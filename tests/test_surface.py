"""model.reconstruction.surface: the sparse coarse-to-fine extraction against the dense reference.

Analytic occupancies 0.5 - sdf (clamped to [0, 1]): linear across the surface, so marching
cubes places vertices accurately and volumes can be compared with the exact ones.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from model.reconstruction.mesh_cleanup import MERGE_QUANTUM, merge_vertices
from model.reconstruction.config import allowed_resolutions
from model.reconstruction.surface import evaluate_grid, extract_surface

RES = 128
VOXEL = 2.0 / RES  # bbox [-1, 1]^3


# -- analytic shapes (sdf: (N, 3) tensor -> (N,), negative inside) ---------------------------


def sphere_sdf(p, center=(0.0, 0.0, 0.0), radius=0.61):
    return (p - torch.tensor(center)).norm(dim=1) - radius


def box_sdf(p, center=(0.0, 0.0, 0.0), half=(0.5, 0.35, 0.45)):
    q = (p - torch.tensor(center)).abs() - torch.tensor(half)
    return q.clamp_min(0).norm(dim=1) + q.max(dim=1).values.clamp_max(0)


def torus_sdf(p, major=0.5, minor=0.2):
    """Torus around the y axis."""
    ring = torch.stack([p[:, [0, 2]].norm(dim=1) - major, p[:, 1]], dim=1)
    return ring.norm(dim=1) - minor


# Plate 0.06 thick (about one coarse spacing, 2 / 32 = 0.0625): a coarse sample, y = 0.125,
# lies inside it, so the coarse level sees it.
PLATE = dict(center=(0.0, 0.1, 0.0), half=(0.5, 0.03, 0.5))


def plate_sdf(p):
    return box_sdf(p, **PLATE)


def occupancy(sdf):
    return lambda p: (0.5 - sdf(p)).clamp(0.0, 1.0)


SHAPES = {
    "sphere": (sphere_sdf, 4 / 3 * math.pi * 0.61**3, 0.005),
    "box": (box_sdf, 8 * 0.5 * 0.35 * 0.45, 0.01),
    "torus": (torus_sdf, 2 * math.pi**2 * 0.5 * 0.2**2, 0.01),
    "plate": (plate_sdf, 8 * 0.5 * 0.03 * 0.5, 0.02),
}


# -- helpers -----------------------------------------------------------------------------------


def chamfer(a: trimesh.Trimesh, b: trimesh.Trimesh, count=200_000) -> float:
    """Symmetric mean nearest-neighbour distance between `count` points sampled on each surface."""
    pa, _ = trimesh.sample.sample_surface(a, count, seed=1)
    pb, _ = trimesh.sample.sample_surface(b, count, seed=2)
    return 0.5 * (cKDTree(pb).query(pa)[0].mean() + cKDTree(pa).query(pb)[0].mean())


_cache = {}


def run(name, method, **kwargs):
    """(grid, mesh, stats) of a shape at RES, computed once per session."""
    key = (name, method, tuple(sorted(kwargs.items())))
    if key not in _cache:
        fn = occupancy(SHAPES[name][0])
        grid = evaluate_grid(fn, RES, method=method, **kwargs)
        mesh, stats = extract_surface(fn, RES, method=method, **kwargs)
        _cache[key] = grid, mesh, stats
    return _cache[key]


# -- sparse against dense ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SHAPES))
def test_sparse_signs_agree_with_dense(name):
    dense, _, _ = run(name, "dense")
    sparse, _, _ = run(name, "sparse")
    agree = (dense.signs() == sparse.signs()).mean()
    assert agree >= 0.999, f"{name}: {agree:.6f} of the signs agree"


@pytest.mark.parametrize("name", list(SHAPES))
def test_sparse_mesh_matches_dense_mesh(name):
    _, dense, _ = run(name, "dense")
    _, sparse, _ = run(name, "sparse")
    assert len(sparse.faces) > 0
    distance = chamfer(sparse, dense)
    assert distance < 0.5 * VOXEL, f"{name}: Chamfer {distance / VOXEL:.3f} voxel"


@pytest.mark.parametrize("name", list(SHAPES))
def test_closed_shapes_give_closed_outward_meshes(name):
    _, exact_volume, rel_tol = SHAPES[name]
    for method in ("sparse", "dense"):
        _, mesh, _ = run(name, method)
        assert mesh.is_watertight, f"{name} {method}: not watertight"
        assert mesh.volume > 0, f"{name} {method}: inward normals"
        assert mesh.volume == pytest.approx(exact_volume, rel=rel_tol), f"{name} {method}"


@pytest.mark.parametrize("name", list(SHAPES))
def test_sparse_queries_far_fewer_points(name):
    _, _, dense = run(name, "dense")
    grid, _, sparse = run(name, "sparse")
    assert dense["points_evaluated"] == (RES + 1) ** 3
    assert sparse["points_evaluated"] * 15 < dense["points_evaluated"], sparse["level_points"]
    assert sum(sparse["level_points"]) == sparse["points_evaluated"]
    assert grid.surface_cell_corners() <= sparse["points_evaluated"]
    assert sparse["level_resolutions"] == [32, 64, 128]
    assert not sparse["track_capped"]
    for key in ("seconds_eval", "seconds_mesh", "seconds_total", "resolution", "method"):
        assert key in sparse and key in dense


def test_band_mode_agrees_and_queries_more():
    """dilation=k: MonoPort's band (children of mixed coarse cells plus a ring)."""
    dense, _, _ = run("torus", "dense")
    band, mesh, stats = run("torus", "sparse", dilation=1)
    _, _, seeded = run("torus", "sparse")
    assert (dense.signs() == band.signs()).all()
    assert mesh.is_watertight and mesh.volume > 0
    assert seeded["points_evaluated"] < stats["points_evaluated"] < (RES + 1) ** 3 / 4


def test_tracking_follows_a_fin_the_coarse_grid_misses():
    """A fin 0.024 thick between coarse samples (y = 0, 0.0625) on a sphere: found by walking
    along the surface from where it meets the sphere, not by the coarse grid."""

    def sdf(p):
        fin = box_sdf(p, center=(0.6, 0.03, 0.0), half=(0.3, 0.012, 0.2))
        return torch.minimum(sphere_sdf(p, radius=0.5), fin)

    fn = occupancy(sdf)
    dense = evaluate_grid(fn, RES, method="dense")
    sparse = evaluate_grid(fn, RES)
    assert (dense.signs() == sparse.signs()).all()
    assert max(sparse.stats["level_track_rounds"]) > 2  # the walk along the fin
    # Rounds rescan only the blocks near new samples: the mixed cells kept must equal a full rescan.
    full, missing = sparse.level.scan(sparse.level.candidate_blocks())
    assert len(missing) == 0
    assert sorted(map(tuple, full)) == sorted(map(tuple, sparse.mixed_cells))
    mesh, _ = extract_surface(fn, RES)
    assert mesh.is_watertight and len(mesh.split(only_watertight=False)) == 1
    assert mesh.bounds[1, 0] == pytest.approx(0.9, abs=VOXEL)


def test_surface_cut_by_the_box_matches_dense():
    """A sphere crossing the box's upper faces: the padding past the last sample must not leak."""
    fn = occupancy(lambda p: sphere_sdf(p, center=(0.8, 0.9, -0.1), radius=0.5))
    bbox = ((-1.0, -1.0, -0.5), (1.0, 1.0, 0.5))
    dense = evaluate_grid(fn, 64, bbox, method="dense")
    sparse = evaluate_grid(fn, 64, bbox)
    assert (dense.signs() == sparse.signs()).all()
    mesh_d, _ = extract_surface(fn, 64, bbox, method="dense")
    mesh_s, _ = extract_surface(fn, 64, bbox)
    assert len(mesh_s.faces) == len(mesh_d.faces)
    assert np.allclose(np.sort(mesh_s.vertices, axis=0), np.sort(mesh_d.vertices, axis=0), atol=1e-9)
    assert np.all(mesh_s.bounds[0] >= [-1, -1, -0.5]) and np.all(mesh_s.bounds[1] <= [1, 1, 0.5])


def test_threshold_and_single_level():
    """sdf itself with threshold 0 (inside = -sdf > 0), resolution equal to the coarse one."""
    fn = lambda p: -sphere_sdf(p, radius=0.5)  # noqa: E731
    mesh, stats = extract_surface(fn, 32, threshold=0.0)
    reference, _ = extract_surface(fn, 32, threshold=0.0, method="dense")
    assert stats["level_resolutions"] == [32]
    assert len(mesh.faces) == len(reference.faces) and mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.125, rel=0.03)


# -- edge cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 1.0])
@pytest.mark.parametrize("method", ["sparse", "dense"])
def test_nothing_or_everything_inside_gives_an_empty_mesh(value, method):
    fn = lambda p: torch.full((len(p),), value)  # noqa: E731
    mesh, stats = extract_surface(fn, 64, method=method)
    assert isinstance(mesh, trimesh.Trimesh) and len(mesh.faces) == 0 and len(mesh.vertices) == 0
    if method == "sparse":
        assert stats["points_evaluated"] == 33**3  # the coarse level only
        grid = evaluate_grid(fn, 64)
        assert (grid.signs() == (value > 0.5)).all()


def test_invalid_arguments_raise_clear_errors():
    fn = occupancy(sphere_sdf)
    with pytest.raises(ValueError, match=r"coarse_resolution \* 2\^k.*32, 64, 128, 256, 512, 1024"):
        extract_surface(fn, 100)
    with pytest.raises(ValueError, match="allowed: 24, 48, 96"):
        extract_surface(fn, 100, coarse_resolution=24)
    with pytest.raises(ValueError, match="method"):
        extract_surface(fn, 64, method="octree")
    with pytest.raises(ValueError, match="dilation"):
        extract_surface(fn, 64, dilation=-1)
    with pytest.raises(ValueError, match="bbox"):
        extract_surface(fn, 64, bbox=((1, 1, 1), (-1, -1, -1)))
    with pytest.raises(ValueError, match="returned"):
        extract_surface(lambda p: torch.zeros(3), 32)
    assert allowed_resolutions(17 - 1)[:4] == [16, 32, 64, 128]
    # Any resolution works densely.
    mesh, _ = extract_surface(fn, 40, method="dense")
    assert mesh.is_watertight


@pytest.mark.parametrize("method", ["sparse", "dense"])
def test_occupancy_fn_never_sees_more_than_batch_points(method):
    sizes = []
    base = occupancy(torus_sdf)

    def fn(points):
        assert points.dtype == torch.float32 and points.shape[1] == 3
        sizes.append(len(points))
        return base(points)

    mesh, stats = extract_surface(fn, 64, method=method, batch_points=3000)
    assert max(sizes) <= 3000
    assert sum(sizes) == stats["points_evaluated"] and len(sizes) == stats["calls"]
    assert mesh.is_watertight


def test_points_are_the_grid_samples():
    """Queried points are b_min + index * (b_max - b_min) / resolution, both ends included."""
    seen = []

    def fn(points):
        seen.append(points.clone())
        return occupancy(sphere_sdf)(points)

    bbox = ((-1.0, -2.0, 0.0), (1.0, 2.0, 3.0))
    extract_surface(fn, 8, bbox, method="dense")
    points = torch.cat(seen).numpy().astype(np.float64)
    assert len(points) == 9**3
    for axis in range(3):
        lo, hi = bbox[0][axis], bbox[1][axis]
        assert np.allclose(np.unique(points[:, axis]), lo + np.arange(9) * (hi - lo) / 8, atol=1e-6)
    assert np.allclose(points[1], [-1.0, -2.0, 3.0 / 8], atol=1e-6)  # x-major: the last axis varies fastest


def test_largest_component_keeps_the_bigger_sphere():
    def sdf(p):
        return torch.minimum(sphere_sdf(p, (-0.4, 0, 0), 0.35), sphere_sdf(p, (0.5, 0, 0), 0.2))

    both, _ = extract_surface(occupancy(sdf), 64)
    big, _ = extract_surface(occupancy(sdf), 64, largest_component=True)
    assert len(both.split(only_watertight=False)) == 2
    assert big.is_watertight
    assert big.volume == pytest.approx(4 / 3 * math.pi * 0.35**3, rel=0.02)
    assert big.bounds[1, 0] < 0.0


def test_merge_vertices_joins_copies_and_drops_faces_that_collapse():
    # Two triangles sharing the edge (1,0,0)-(0,1,0), written twice as two blocks would (copies
    # off by float rounding); a third triangle collapses once its two copies of (5,5,5) merge;
    # a vertex one quantum away from a copy stays apart.
    vertices = np.array([
        [0, 0, 0], [1, 0, 0], [0, 1, 0],                       # triangle A
        [1 + 1e-13, 0, 0], [1, 1, 0], [0, 1 - 1e-13, 0],       # triangle B, with copies of A's edge
        [5, 5, 5], [5, 5, 5 + 1e-12], [6, 5, 5],               # degenerate after merging
        [0, 0, 2 * MERGE_QUANTUM], [0, 0, 9], [0, 9, 0],       # near (0,0,0) but not equal at the quantum
    ], dtype=np.float64)
    faces = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])
    merged_vertices, merged_faces = merge_vertices(vertices, faces)
    assert len(merged_faces) == 3  # the collapsed triangle is gone
    assert len(merged_vertices) == 7  # A's 3, B's new corner, the last triangle's 3: (5,5,5) and (6,5,5) unused
    triangles = {tuple(map(tuple, np.round(merged_vertices[f], 9))) for f in merged_faces}
    assert ((0, 0, 0), (1, 0, 0), (0, 1, 0)) in triangles
    assert ((1, 0, 0), (1, 1, 0), (0, 1, 0)) in triangles  # B uses A's first copies
    shared = set(merged_faces[0]) & set(merged_faces[1])
    assert len(shared) == 2
