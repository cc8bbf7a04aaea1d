"""Real garment and hair geometry (MakeHuman assets) fitted to a posed, reshaped anny body.

A MakeHuman asset is an OBJ surface plus an `.mhclo` file that ties each of its vertices to the
MakeHuman base mesh `hm08`: three base-mesh vertex indices, three barycentric weights and an
offset (base-mesh units, decimetres, y up, facing +z) scaled per axis by the body's size. anny's
`topology="makehuman"` is that base mesh vertex for vertex (metres, z up, facing -y), so an asset
fitted to it follows any anny shape and pose:

    garment = sum_k w_k * body[i_k] + R(pose) @ S(shape) * offset

where S is MakeHuman's per-axis scale (distances between two named base vertices of this body
against the asset's reference) and R the rotation that the skinning gives the dominant anchor
vertex, so offsets turn with the limb they hang from.

Assets are read from a folder laid out as makehuman-assets' `base/` (`clothes/NAME/NAME.mhclo`,
`hair/NAME/NAME.mhclo`); their licence and authors come from each file's header and go into the
dataset's NOTICE (`asset_notice`). Colours are procedural (the assets' textures are not used):
plain, striped, checked or mottled fabric, one colour scheme above the waist and one below.
"""

from __future__ import annotations

import colorsys
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.cache import configure_caches

# base mesh (x, y up, z forward; dm) -> anny (x, y backward, z up; m), checked by an affine fit of
# anny's makehuman template to base.obj (residual 3e-8 m).
BASE_TO_ANNY = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]) * 0.1
KINDS = ("suit", "shoes", "hair", "hat")


@dataclass(frozen=True)
class GarmentAsset:
    """One MakeHuman asset: its surface and how each vertex follows the base mesh.

    faces (F, 3) int32 triangles; uv (V, 2) float32 (one per vertex); anchors (V, 3) int base-mesh
    vertex indices; weights (V, 3) barycentric; offsets (V, 3) base units; scales {axis: (i, j, ref)}.
    """

    name: str
    kind: str  # KINDS
    faces: np.ndarray
    uv: np.ndarray
    anchors: np.ndarray
    weights: np.ndarray
    offsets: np.ndarray
    scales: dict
    tags: tuple[str, ...]
    licence: str  # from the header: "CC0 1.0", else its licence line
    authors: tuple[str, ...]  # the header's copyright holders


def _kind(folder: str, name: str, tags: tuple[str, ...]) -> str:
    if folder == "hair":
        return "hair"
    if "shoes" in name or "shoe" in tags:
        return "shoes"
    if "hat" in tags or "fedora" in name:
        return "hat"
    return "suit"


def _read_obj(path: Path, vertex_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(faces (F, 3) int32 fan-triangulated, uv (V, 2) float32: the first texture coordinate each vertex has)."""
    texcoords, faces, uv_of = [], [], {}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("vt "):
            texcoords.append([float(t) for t in line.split()[1:3]])
        elif line.startswith("f "):
            corners = [c.split("/") for c in line.split()[1:]]
            idx = [int(c[0]) - 1 for c in corners]
            for c, i in zip(corners, idx):
                if len(c) > 1 and c[1]:
                    uv_of.setdefault(i, int(c[1]) - 1)
            faces += [(idx[0], idx[k], idx[k + 1]) for k in range(1, len(idx) - 1)]
    uv = np.zeros((vertex_count, 2), np.float32)
    if texcoords and uv_of:
        keys = np.fromiter(uv_of.keys(), int)
        uv[keys] = np.asarray(texcoords, np.float32)[np.fromiter(uv_of.values(), int)]
    return np.asarray(faces, np.int32).reshape(-1, 3), uv


def read_asset(mhclo: str | Path, folder: str = "clothes") -> GarmentAsset:
    """Parse one `.mhclo` and the OBJ it names. Raises ValueError naming the file when it does not fit hm08."""
    path = Path(mhclo)
    header, tags, scales, rows, name, obj = [], [], {}, [], path.stem, None
    in_verts = False
    for line in path.read_text(errors="replace").splitlines():
        words = line.split()
        if not words:
            continue
        if line.startswith("#"):
            header.append(line.lstrip("# ").strip())
            continue
        if re.fullmatch(r"-?[\d.eE+-]+", words[0]) and in_verts:
            if len(words) == 9:
                rows.append([float(w) for w in words])
            elif len(words) == 1:  # a vertex that sits exactly on one base vertex
                rows.append([float(words[0])] * 3 + [1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
            continue
        key = words[0]
        if key == "verts":
            in_verts = True
        elif key == "delete_verts":
            in_verts = False
        elif key == "basemesh" and words[1] != "hm08":
            raise ValueError(f"{path}: made for base mesh {words[1]}, not hm08")
        elif key == "name":
            name = words[1]
        elif key == "tag":
            tags.append(" ".join(words[1:]).lower())
        elif key == "obj_file":
            obj = path.parent / words[1]
        elif key in ("x_scale", "y_scale", "z_scale"):
            scales[key[0]] = (int(words[1]), int(words[2]), float(words[3]))
    if obj is None or not rows:
        raise ValueError(f"{path}: no obj_file or no vertex fitting data")
    data = np.asarray(rows)
    faces, uv = _read_obj(obj, len(data))
    if len(faces) == 0 or faces.max() >= len(data):
        raise ValueError(f"{path}: {obj.name} does not match its fitting data ({len(data)} vertices)")
    # MakeHuman's system assets say "This asset was explicitly released as CC0 in september 2020".
    licence = "CC0 1.0" if any("CC0" in h for h in header) else next((h for h in header if "licen" in h.lower()), "unknown")
    authors = tuple(h.removeprefix("Copyright (C)").strip() for h in header if h.startswith("Copyright"))
    return GarmentAsset(
        name=name, kind=_kind(folder, name, tuple(tags)), faces=faces, uv=uv,
        anchors=data[:, :3].astype(np.int64), weights=data[:, 3:6], offsets=data[:, 6:9], scales=scales,
        tags=tuple(tags), licence=licence, authors=authors,
    )


@functools.lru_cache(maxsize=4)
def read_assets(root: str) -> tuple[GarmentAsset, ...]:
    """Every asset under `root/clothes/*/` and `root/hair/*/` (one `.mhclo` per folder, the folder's own name first)."""
    found = []
    for folder in ("clothes", "hair"):
        for d in sorted((Path(root) / folder).glob("*/")):
            files = sorted(d.glob("*.mhclo"), key=lambda p: p.stem != d.name)
            if files:
                found.append(read_asset(files[0], folder))
    if not found:
        raise FileNotFoundError(f"no MakeHuman assets (clothes/*/*.mhclo, hair/*/*.mhclo) under {root}")
    return tuple(found)


def vertex_rotations(weights: np.ndarray, bones: np.ndarray, rest_bone_poses: np.ndarray, bone_poses: np.ndarray) -> np.ndarray:
    """(V, 3, 3) linear part of each vertex's skinning transform.

    weights, bones (V, K): skinning weights and bone indices; *_bone_poses (B, 4, 4) rest and posed.
    """
    per_bone = bone_poses[:, :3, :3] @ np.linalg.inv(rest_bone_poses[:, :3, :3])
    return np.einsum("vk,vkij->vij", weights, per_bone[bones])


def fit_asset(asset: GarmentAsset, rest: np.ndarray, posed: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """(V, 3) the asset's vertices on a body (anny makehuman topology, metres, anny frame).

    rest, posed (19158, 3): the body's rest-pose and posed vertices; rotations (19158, 3, 3) from
    `vertex_rotations`.
    """
    size = np.ones(3)
    axis_of = {"x": 0, "y": 1, "z": 2}
    rest_base = rest @ np.linalg.inv(BASE_TO_ANNY).T  # the body in base-mesh units and axes
    for axis, (i, j, reference) in asset.scales.items():
        a = axis_of[axis]
        size[a] = abs(rest_base[i, a] - rest_base[j, a]) / reference
    offsets = (asset.offsets * size) @ BASE_TO_ANNY.T
    anchored = np.einsum("vk,vkc->vc", asset.weights, posed[asset.anchors])
    dominant = asset.anchors[np.arange(len(asset.anchors)), np.abs(asset.weights).argmax(1)]
    return anchored + np.einsum("vij,vj->vi", rotations[dominant], offsets)


# ---- choosing an outfit ------------------------------------------------------------------------


def _colour(rng: np.random.Generator, saturation=(0.1, 0.8), value=(0.12, 0.9)) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value)))


def fabric(rng: np.random.Generator, uv: np.ndarray, base: np.ndarray) -> np.ndarray:
    """(V, 3) per-vertex colours of a procedural fabric over texture coordinates uv (V, 2):
    plain, stripes, checks or mottled, around the colour `base` (3,)."""
    pattern = rng.choice(["plain", "stripes", "checks", "mottled"], p=[0.4, 0.25, 0.2, 0.15])
    period = rng.uniform(0.01, 0.06)
    second = _colour(rng)
    if pattern == "stripes":
        angle = rng.uniform(0, np.pi)
        t = uv @ np.array([np.cos(angle), np.sin(angle)])
        mask = (np.sin(t * 2 * np.pi / period) > rng.uniform(-0.5, 0.5))[:, None]
    elif pattern == "checks":
        mask = ((np.floor(uv[:, 0] / period) + np.floor(uv[:, 1] / period)) % 2 == 1)[:, None]
    elif pattern == "mottled":
        waves = sum(np.sin(uv @ rng.normal(size=2) * 2 * np.pi / period + rng.uniform(0, 6.3)) for _ in range(4))
        return np.clip(base * (1 + 0.12 * waves)[:, None], 0, 1)
    else:
        return np.tile(base, (len(uv), 1))
    return np.where(mask, second, base)


HAIR_COLOURS = np.array([[0.05, 0.04, 0.03], [0.25, 0.15, 0.08], [0.55, 0.4, 0.2], [0.75, 0.6, 0.4], [0.4, 0.4, 0.4]])


def choose_outfit(rng: np.random.Generator, assets: tuple[GarmentAsset, ...], gender: float, hat_probability: float = 0.15) -> list[GarmentAsset]:
    """A suit (mostly of the body's gender), shoes, hair (mostly short on men, longer on women), sometimes a hat."""
    male = gender > 0.5

    def pick(kind: str, prefer) -> GarmentAsset | None:
        pool = [a for a in assets if a.kind == kind]
        if not pool:
            return None
        preferred = [a for a in pool if prefer(a)]
        source = preferred if preferred and rng.random() < 0.85 else pool  # mostly the preferred ones
        return source[rng.integers(len(source))]

    chosen = [
        pick("suit", lambda a: ("male" in a.tags) == male and ("female" in a.tags) != male),
        pick("shoes", lambda a: True),
        pick("hair", lambda a: ("short" in a.name or "afro" in a.name) == male),
    ]
    if rng.random() < hat_probability:
        chosen.append(pick("hat", lambda a: True))
    return [a for a in chosen if a is not None]


def asset_notice(assets) -> str:
    """Markdown lines crediting each asset (name, kind, licence, authors), for a dataset's NOTICE."""
    lines = ["MakeHuman assets (github.com/makehumancommunity/makehuman-assets, base/clothes and base/hair):", ""]
    for a in sorted(assets, key=lambda a: a.name):
        lines.append(f"- {a.name} ({a.kind}): {a.licence}; {', '.join(a.authors) or 'authors not stated'}")
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=1)
def load_makehuman_body():
    """anny in the makehuman topology (hm08, 19,158 vertices with MakeHuman's helper geometry), float32, once per process."""
    configure_caches()
    import anny
    import torch

    return anny.Anny(topology="makehuman").to(torch.float32).eval()


def fitted_assets(assets: list[GarmentAsset], phenotype: dict, pose: dict | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each asset on the body of `phenotype` in `pose` (anny's inputs; None = rest pose).

    Returns (rest-pose vertices, posed vertices) per asset, (V, 3) metres in anny's frame; the posed
    ones share the frame of anny's posed `vertices` output.
    """
    import torch

    body = load_makehuman_body()
    with torch.no_grad():
        out = body(pose_parameters=pose, phenotype_kwargs=phenotype) if pose else body(phenotype_kwargs=phenotype)
    rest = out["rest_vertices"][0].numpy().astype(np.float64)
    posed = out["vertices"][0].numpy().astype(np.float64)
    weights = body.vertex_bone_weights.cpu().numpy().astype(np.float64)
    bones = body.vertex_bone_indices.cpu().numpy()
    rotations = vertex_rotations(weights, bones, out["rest_bone_poses"][0].numpy().astype(np.float64),
                                 out["bone_poses"][0].numpy().astype(np.float64))
    identity = np.broadcast_to(np.eye(3), rotations.shape)
    return ([fit_asset(a, rest, rest, identity) for a in assets], [fit_asset(a, rest, posed, rotations) for a in assets])
