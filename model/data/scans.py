"""Real scans (OBJ + MTL + texture, PLY with vertex colours, GLB/glTF) as subjects.

Folders as RenderPeople (`rp_name_OBJ/rp_name.obj`, `.mtl`, `tex/*.jpg`) or THuman
(`0000/0000.obj`, `material0.mtl`, `material0.jpeg`) ship them: every mesh file found is one
subject, whatever the layout. Files may sit on any fsspec filesystem (local path, s3://...);
remote ones are copied with their folder's materials and textures to a scratch directory first.

Normalisation follows PIFu: the scan is assumed y-up (OBJ and glTF convention; `up_axis="z"`
for z-up files) and facing +z, scaled so its bounding box is `height_cm` (180) tall, and its
bounding box centred at the origin. That is the canonical frame of model/data/humans.py. The body
under the clothes, which the body-guided model reads, is fitted by the jobs (`model.data.scan_bodies`).

A scan that cannot be used raises `ScanError` whose message starts with the reason:
"unreadable", "empty", "no faces", "degenerate" or "open surface".
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.errors import PifuhdError
from model.render import Part
from model.data.humans import Subject

MESH_EXTENSIONS = (".obj", ".ply", ".glb", ".gltf")
# Files a mesh may reference: materials, textures, glTF buffers.
SIDECAR_EXTENSIONS = (".mtl", ".png", ".jpg", ".jpeg", ".bmp", ".tga", ".tif", ".tiff", ".webp", ".bin")


class ScanError(PifuhdError):
    """A scan that cannot become training data; the message says why."""


UP_AXES = ("y", "z")


@dataclass(frozen=True)
class ScanConfig:
    """How scans are read and normalised."""

    height_cm: float = 180.0
    up_axis: str = "y"  # "y" (OBJ, glTF, RenderPeople, THuman) or "z"
    max_texture_size: int = 2048  # larger textures are downscaled: they are rendered at most at 1024
    fit_body: bool = True  # fit anny to a front render (model.data.scan_bodies), so rows carry the body under the clothes

    def __post_init__(self) -> None:
        if self.up_axis not in UP_AXES:
            raise ValueError(f"up_axis must be one of {UP_AXES}, not {self.up_axis!r}")


@dataclass(frozen=True)
class ScanRef:
    """One scan found on a filesystem: a stable subject id and the mesh file's URI."""

    subject_id: str
    uri: str


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def subject_id_for(uri: str, root: str) -> str:
    """A readable, unique id: the path below `root` with separators as '-', plus a short hash of the URI."""
    rel = uri[len(root) :].strip("/") if uri.startswith(root) and uri != root else Path(uri).name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.splitext(rel)[0]).strip("-")[-60:]
    return f"{stem or 'scan'}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}"


def find_scans(uris: list[str]) -> list[ScanRef]:
    """Every mesh file under the given files or folders (recursively), sorted, as ScanRefs."""
    import fsspec

    found: dict[str, ScanRef] = {}
    for uri in uris:
        fs, path = fsspec.core.url_to_fs(uri)
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if not fs.exists(path):
            raise ScanError(f"unreadable: {uri} does not exist")
        files = [path] if fs.isfile(path) else sorted(fs.find(path))
        root = path if not fs.isfile(path) else os.path.dirname(path)
        for f in files:
            if f.lower().endswith(MESH_EXTENSIONS) and not os.path.basename(f).startswith("."):
                full = prefix + f
                found[full] = ScanRef(subject_id_for(f, root), full)
    return sorted(found.values(), key=lambda r: r.subject_id)


def fetch(uri: str, workdir: str) -> str:
    """A local path for the mesh at `uri`: remote meshes are copied with their folder's sidecars."""
    if not _is_remote(uri):
        return uri[len("file://") :] if uri.startswith("file://") else uri
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    folder = os.path.dirname(path)
    local_mesh = os.path.join(workdir, os.path.basename(path))
    os.makedirs(workdir, exist_ok=True)
    fs.get(path, local_mesh)
    for f in fs.find(folder, maxdepth=2):
        if f.lower().endswith(SIDECAR_EXTENSIONS):
            target = os.path.join(workdir, os.path.relpath(f, folder))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.get(f, target)
    return local_mesh


def _part_from_trimesh(mesh, name: str, config: ScanConfig) -> Part:
    """A Part (raw coordinates) with per-vertex colours, or UVs and a texture where the mesh has them."""
    import trimesh

    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    colors = np.full((len(vertices), 3), 0.7)
    uv = texture = None
    visual = getattr(mesh, "visual", None)
    if isinstance(visual, trimesh.visual.texture.TextureVisuals):
        material = visual.material
        image = getattr(material, "image", None)
        if image is None and hasattr(material, "baseColorTexture"):
            image = material.baseColorTexture
        if visual.uv is not None and len(visual.uv) == len(vertices) and image is not None:
            image = image.convert("RGB")
            if max(image.size) > config.max_texture_size:
                ratio = config.max_texture_size / max(image.size)
                image = image.resize((max(1, int(image.size[0] * ratio)), max(1, int(image.size[1] * ratio))))
            uv = np.asarray(visual.uv, dtype=np.float32)
            texture = np.asarray(image, dtype=np.uint8)
        else:
            main = getattr(material, "main_color", None)
            if main is not None:
                colors[:] = np.asarray(main[:3], dtype=np.float64) / 255
    elif visual is not None and getattr(visual, "kind", None) == "vertex":
        colors = np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3] / 255
    elif visual is not None and getattr(visual, "kind", None) == "face":
        # Face colours: give each vertex the colour of one face that uses it.
        fc = np.asarray(visual.face_colors, dtype=np.float64)[:, :3] / 255
        colors[faces.reshape(-1)] = np.repeat(fc, 3, axis=0)
    return Part(name, vertices, faces, colors.astype(np.float32), uv, texture)


def read_mesh_parts(path: str, config: ScanConfig = ScanConfig()) -> list[Part]:
    """The triangle meshes of a file (a glTF scene may hold several), in the file's coordinates."""
    import trimesh

    try:
        loaded = trimesh.load(path, process=False, maintain_order=True)
    except Exception as exc:  # noqa: BLE001 - any parser failure means the same thing to the user
        raise ScanError(f"unreadable: {type(exc).__name__}: {exc}".strip()) from exc
    if isinstance(loaded, trimesh.Scene):
        if not loaded.geometry:
            raise ScanError("empty: the file holds no geometry")
        geoms = loaded.dump()  # world transforms of the scene graph applied
        geoms = geoms if isinstance(geoms, list) else [geoms]
    else:
        geoms = [loaded]
    meshes = [g for g in geoms if isinstance(g, trimesh.Trimesh)]
    if not meshes:
        counts = [len(getattr(g, "vertices", [])) for g in geoms]
        if sum(counts) == 0:
            raise ScanError("empty: no vertices")
        raise ScanError(f"no faces: {sum(counts)} vertices without faces (a point cloud?)")
    parts = [_part_from_trimesh(m, f"scan{i}", config) for i, m in enumerate(meshes)]
    if sum(len(p.vertices) for p in parts) == 0:
        raise ScanError("empty: no vertices")
    if sum(len(p.faces) for p in parts) == 0:
        raise ScanError(f"no faces: {sum(len(p.vertices) for p in parts)} vertices without faces (a point cloud?)")
    return [p for p in parts if len(p.faces)]


def normalise(parts: list[Part], config: ScanConfig = ScanConfig()) -> list[Part]:
    """Parts moved to the canonical frame: y up, bounding box `height_cm` tall and centred at 0."""
    allv = np.concatenate([p.vertices for p in parts])
    if not np.isfinite(allv).all():
        raise ScanError("degenerate: non-finite vertex coordinates")
    if config.up_axis == "z":  # z-up (x, y, z) -> y-up (x, z, -y)
        rot = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])
        allv = allv @ rot.T
    lo, hi = allv.min(0), allv.max(0)
    extent = hi - lo
    if extent[1] <= 1e-9 * max(extent.max(), 1e-30) or (extent <= 0).any():
        raise ScanError(f"degenerate: flat bounding box (extent {extent.round(6).tolist()})")
    area = 0.0
    for p in parts:
        t = p.vertices[p.faces]
        area += np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1).sum() / 2
    if area <= 1e-12 * extent.max() ** 2:
        raise ScanError("degenerate: every face has zero area")
    scale = config.height_cm / extent[1]
    centre = (lo + hi) / 2
    out, start = [], 0
    for p in parts:
        v = allv[start : start + len(p.vertices)]
        start += len(p.vertices)
        out.append(Part(p.name, ((v - centre) * scale).astype(np.float32), p.faces.astype(np.int32), p.colors, p.uv, p.texture))
    return out


def check_labels(parts: list[Part], rng: np.random.Generator, count: int = 2000) -> float:
    """Share of points just inside the surface (1 cm along -normal) that the winding number calls inside.

    A closed (or nearly closed) scan gives close to 1; an open sheet or a scan without a
    volume gives far less, and raises ScanError("open surface: ...").
    """
    from model.data.sampling import surface_samples_parts
    from model.meshes import winding_inside

    mesh = [(np.concatenate([p.vertices for p in parts]).astype(np.float64), _merged_faces(parts))]
    points, normals = surface_samples_parts(mesh, count, rng)
    inward = winding_inside(mesh, points - normals * 1.0)
    outward = winding_inside(mesh, points + normals * 1.0)
    # Faces may be oriented either way in a scan: take the better of the two sides.
    score = max(inward.mean() - outward.mean(), outward.mean() - inward.mean())
    if score < 0.5:
        raise ScanError(f"open surface: winding numbers do not separate inside from outside (score {score:.2f})")
    return float(score)


def _merged_faces(parts: list[Part]) -> np.ndarray:
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts])[:-1]
    return np.concatenate([p.faces.astype(np.int64) + o for p, o in zip(parts, offsets)])


def load_scan(ref: ScanRef, workdir: str, config: ScanConfig = ScanConfig(), check: bool = True) -> Subject:
    """The scan as a Subject in the canonical frame; raises ScanError with the reason when unusable.

    The Subject's `info["label_union"]` is True: scans are labelled by the winding number of all
    their pieces together (a scan's pieces are rarely closed on their own).
    """
    try:
        local = fetch(ref.uri, workdir)
    except ScanError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ScanError(f"unreadable: cannot fetch {ref.uri}: {type(exc).__name__}: {exc}") from exc
    if os.path.getsize(local) == 0:
        raise ScanError("empty: the file has 0 bytes")
    parts = normalise(read_mesh_parts(local, config), config)
    info = {"source": ref.uri, "label_union": True, "vertices": int(sum(len(p.vertices) for p in parts)),
            "faces": int(sum(len(p.faces) for p in parts)), "textured": any(p.texture is not None for p in parts)}
    if check:
        seed = int(hashlib.sha1(ref.uri.encode()).hexdigest()[:8], 16)
        info["label_score"] = check_labels(parts, np.random.default_rng(seed))
    return Subject(subject_id=ref.subject_id, parts=parts, info=info)
