"""Training data on any filesystem: its layout, writer helpers and reader (schema: `pipelines.common.formats`).

Layout under a dataset URI (a local folder or s3://bucket/prefix):

    dataset.json                  the card: counts, splits, generator settings (see `write_card`)
    shards/{split}/part-*.parquet one row per (subject, view), DATASET_SCHEMA; split = train|val|test
    meshes/{subject_id}.ply       the ground-truth mesh per subject, canonical frame (cm, y up,
                                  facing +z, centred, 180 cm), vertex colours; a row's
                                  `view_from_canonical` maps it into that row's view frame
    failures.parquet              subjects that could not be made: subject_id, source, reason

A subject lives in exactly one split (a hash of its id and the split seed), never split by view.
A subject is finished when its rows are in a shard; jobs skip finished subjects on a re-run.

Every row is in the network's frame (model/geometry.py): points (N, 3) in the view frame
(box units, 0.01 per cm), `calib` = diag(1, -1, 1, 1) maps them to image coordinates; images
are PNGs (RGB image, L mask, RGB normals encoded (n + 1) / 2 * 255 with 128 outside the mask).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import time
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.common import storage
from pipelines.common.formats import DATASET_FAILURE_SCHEMA, DATASET_SCHEMA_VERSION, SPLITS
from pipelines.common.storage import join  # noqa: F401 - part of this module's API (fmt.join)
from model.errors import InputError
from pipelines.common.uris import check_uri, redact

if TYPE_CHECKING:
    import ray


# ---- locations ------------------------------------------------------------------------------


def normalise_uri(uri: str) -> str:
    """Absolute local paths (workers may run elsewhere), URIs as given, no trailing slash."""
    check_uri(uri)
    if "://" in uri:
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def list_shards(uri: str, split: str | None = None) -> list[str]:
    """Sorted shard URIs of one split or all."""
    root = join(normalise_uri(uri), "shards", *([split] if split else []))
    return storage.list_files(root, ".parquet")


# ---- splits -----------------------------------------------------------------------------------


def subject_split(subject_id: str, seed: int, val_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """train / val / test from a hash of (seed, subject id): stable across runs, machines and counts."""
    digest = hashlib.sha256(f"{seed}:{subject_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


# ---- writing ----------------------------------------------------------------------------------


def ply_bytes(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray) -> bytes:
    """Binary little-endian PLY: float32 xyz + uint8 rgb per vertex, int32 triangles."""
    v = np.asarray(vertices, dtype="<f4")
    c = np.clip(np.rint(np.asarray(colors) * 255), 0, 255).astype(np.uint8)
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment pifuhd-ray ground truth, canonical frame, cm\n"
        f"element vertex {len(v)}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    ).encode()
    vdata = np.zeros(len(v), dtype=[("xyz", "<f4", 3), ("rgb", "u1", 3)])
    vdata["xyz"], vdata["rgb"] = v, c
    fdata = np.zeros(len(faces), dtype=[("n", "u1"), ("idx", "<i4", 3)])
    fdata["n"], fdata["idx"] = 3, faces
    return header + vdata.tobytes() + fdata.tobytes()


def finished_subjects(uri: str) -> set[str]:
    """Subject ids that already have rows in a shard (only the subject_id column is read)."""
    done: set[str] = set()
    for shard in list_shards(uri):
        done.update(storage.read_parquet(shard, columns=["subject_id"]).column(0).to_pylist())
    return done


def shard_counts(uri: str) -> dict:
    """Subjects and rows per split, read from the shards' subject_id column."""
    counts = {s: {"subjects": set(), "rows": 0, "shards": 0} for s in SPLITS}
    for shard in list_shards(uri):
        split = shard.rstrip("/").split("/")[-2]
        ids = storage.read_parquet(shard, columns=["subject_id"]).column(0).to_pylist()
        c = counts.setdefault(split, {"subjects": set(), "rows": 0, "shards": 0})
        c["subjects"].update(ids)
        c["rows"] += len(ids)
        c["shards"] += 1
    return {s: {"subjects": sorted(c["subjects"]), "rows": c["rows"], "shards": c["shards"]} for s, c in counts.items()}


def update_failures(uri: str, failed: list[dict], succeeded: set[str]) -> int:
    """Merge this run's failures into failures.parquet (latest reason per subject; subjects that
    now succeeded are dropped). Returns the number of failed subjects recorded."""
    path = join(normalise_uri(uri), "failures.parquet")
    table = {}
    if storage.exists(path):
        for row in storage.read_parquet(path).to_pylist():
            table[row["subject_id"]] = row
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for row in failed:
        table[row["subject_id"]] = {"subject_id": row["subject_id"], "source": row.get("source", ""), "reason": row["reason"], "time": stamp}
    for sid in succeeded:
        table.pop(sid, None)
    rows = sorted(table.values(), key=lambda r: r["subject_id"])
    if rows or storage.exists(path):
        storage.write_parquet_atomic(path, pa.Table.from_pylist(rows, schema=DATASET_FAILURE_SCHEMA))
    return len(rows)


def read_failures(uri: str) -> list[dict]:
    path = join(normalise_uri(uri), "failures.parquet")
    return storage.read_parquet(path).to_pylist() if storage.exists(path) else []


def read_card(uri: str) -> dict | None:
    path = join(normalise_uri(uri), "dataset.json")
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def write_card(uri: str, kind: str, settings: dict, split_seed: int, fractions: dict, failed: int) -> dict:
    """Recount the shards and write dataset.json; earlier runs' settings are kept under "runs"."""
    previous = read_card(uri) or {}
    counts = shard_counts(uri)
    card = {
        "schema_version": DATASET_SCHEMA_VERSION,
        "kind": kind,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "frame": {
            "units_per_cm": settings.get("units_per_cm"),
            "calib": [[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
            "points": "view frame = network world frame: x right, y up, z toward the camera, box [-1, 1]^3",
            "meshes": "canonical frame: cm, y up, facing +z, bounding box centred, 180 cm rest height",
        },
        "counts": {
            "subjects": sum(len(c["subjects"]) for c in counts.values()),
            "rows": sum(c["rows"] for c in counts.values()),
            "failed": failed,
            "by_split": {s: {"subjects": len(c["subjects"]), "rows": c["rows"], "shards": c["shards"]} for s, c in counts.items()},
        },
        "splits": {"by": "subject", "seed": split_seed, "fractions": fractions, "subjects": {s: c["subjects"] for s, c in counts.items()}},
        "generator": settings,
        "runs": (previous.get("runs", []) + [{"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "generator": settings}])[-20:],
    }
    storage.write_bytes_atomic(join(normalise_uri(uri), "dataset.json"), json.dumps(card, indent=2).encode())
    return card


def merge_datasets(sources: list[str], out: str) -> dict:
    """Copy the shards and meshes of several datasets into one (`pifuhd data merge`): a training mix.

    Each row keeps the split its own dataset gave it; shards are renamed by their source, so one
    source's shards never overwrite another's. Raises ValueError before anything is written when a
    source is no dataset or two sources hold the same subject id. The card names every source and its
    generator; the sources' NOTICE.md files (asset credits) are joined into the mix's. Returns the card.
    """
    out = normalise_uri(out)
    if len({normalise_uri(source) for source in sources}) < len(sources):
        raise ValueError("a dataset is given twice")
    cards = {}
    owner: dict[str, str] = {}
    for source in sources:
        source = normalise_uri(source)
        card = read_card(source)
        if card is None:
            raise ValueError(f"{source}: not a dataset (no dataset.json)")
        cards[source] = card
        for subjects in card["splits"]["subjects"].values():
            for subject in subjects:
                if owner.setdefault(subject, source) != source:
                    raise ValueError(f"subject {subject} is in both {owner[subject]} and {source}")
    notices = []
    for source in cards:
        tag = hashlib.sha1(source.encode()).hexdigest()[:8]
        for shard in list_shards(source):
            split, name = shard.rstrip("/").split("/")[-2:]
            storage.write_bytes_atomic(join(out, "shards", split, f"{tag}-{name}"), storage.read_bytes(shard))
        for mesh in storage.list_files(join(source, "meshes")):
            storage.write_bytes_atomic(join(out, "meshes", mesh.rsplit("/", 1)[1]), storage.read_bytes(mesh))
        if storage.exists(join(source, "NOTICE.md")):
            notices.append(storage.read_bytes(join(source, "NOTICE.md")).decode())
    if notices:
        storage.write_bytes_atomic(join(out, "NOTICE.md"), "\n".join(notices).encode())
    first = next(iter(cards.values()))
    settings = {"sources": [{"uri": redact(uri), "kind": card["kind"], "counts": card["counts"], "generator": card["generator"]}
                            for uri, card in cards.items()],
                "units_per_cm": first["frame"]["units_per_cm"]}
    return write_card(out, "merged", settings, first["splits"]["seed"], first["splits"]["fractions"],
                      sum(card["counts"]["failed"] for card in cards.values()))


# ---- reading ----------------------------------------------------------------------------------


def decode_png(data: bytes) -> np.ndarray:
    """A stored PNG as its array: (S, S, 3|4) uint8 images and normal maps, (S, S) masks."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def _list_column(table: pa.Table, name: str, width: int, dtype) -> np.ndarray:
    """A list column of equal-length lists -> (rows, length / width, width) without Python loops."""
    column = table.column(name).combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return flat.reshape(len(table), -1, width)


def decode_table(table: pa.Table) -> dict[str, np.ndarray]:
    """Shard rows -> a batch of training samples (the one decoding function of the reader).

    Returns, for B rows:
      image_{S}         (B, 3, S, S) float32 in [-1, 1]   S = 512, and 1024 where stored
      mask_{S}          (B, 1, S, S) float32 in [0, 1]
      normal_front_{S}  (B, 3, S, S) float32 in [-1, 1], 0 outside the mask (likewise normal_back_{S})
      points            (B, 3, N) float32, view frame;  labels (B, N) float32, 1 inside
      surface_points, surface_normals (B, 3, M) float32
      body_sdf (B, N), body_normals (B, 3, N) float32 where every row has them (synthetic data)
      calib, view_from_canonical (B, 4, 4) float32
      subject_id, split (B,) str;  view (B,) int64;  yaw_deg, pitch_deg, units_per_cm (B,) float32
    """
    out: dict[str, np.ndarray] = {}
    sizes = [512] + ([1024] if table.column("image_1024").null_count < len(table) else [])
    for s in sizes:
        masks = np.stack([decode_png(b) for b in table.column(f"mask_{s}").to_pylist()]).astype(np.float32) / 255
        out[f"mask_{s}"] = masks[:, None]
        images = np.stack([decode_png(b)[..., :3] for b in table.column(f"image_{s}").to_pylist()])
        out[f"image_{s}"] = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        for kind in ("normal_front", "normal_back"):
            n = np.stack([decode_png(b)[..., :3] for b in table.column(f"{kind}_{s}").to_pylist()])
            n = n.transpose(0, 3, 1, 2).astype(np.float32) * (2.0 / 255) - 1.0
            out[f"{kind}_{s}"] = n * (masks[:, None] > 0)
    out["points"] = _list_column(table, "points", 3, np.float32).transpose(0, 2, 1).copy()
    out["labels"] = _list_column(table, "labels", 1, np.float32)[..., 0]
    out["surface_points"] = _list_column(table, "surface_points", 3, np.float32).transpose(0, 2, 1).copy()
    out["surface_normals"] = _list_column(table, "surface_normals", 3, np.float32).transpose(0, 2, 1).copy()
    if "body_sdf" in table.column_names and table.column("body_sdf").null_count == 0:
        out["body_sdf"] = _list_column(table, "body_sdf", 1, np.float32)[..., 0]
        out["body_normals"] = _list_column(table, "body_normals", 3, np.float32).transpose(0, 2, 1).copy()
    out["calib"] = _list_column(table, "calib", 16, np.float32).reshape(-1, 4, 4)
    out["view_from_canonical"] = _list_column(table, "view_from_canonical", 16, np.float32).reshape(-1, 4, 4)
    out["subject_id"] = np.array(table.column("subject_id").to_pylist(), dtype=object)
    out["split"] = np.array(table.column("split").to_pylist(), dtype=object)
    out["view"] = table.column("view").to_numpy().astype(np.int64)
    out["yaw_deg"] = table.column("yaw_deg").to_numpy().astype(np.float32)
    out["pitch_deg"] = table.column("pitch_deg").to_numpy().astype(np.float32)
    out["units_per_cm"] = table.column("units_per_cm").to_numpy().astype(np.float32)
    return out


@functools.lru_cache(maxsize=4096)
def _body_hull(uri: str) -> np.ndarray:
    """(H, 3) float64: the convex hull's vertices of a stored body (canonical cm): the same extremes
    as the body's own under any rotation, at a tenth of the vertices."""
    import trimesh

    body = trimesh.load(io.BytesIO(storage.read_bytes(uri)), file_type="ply", force="mesh", process=False)
    return np.asarray(body.convex_hull.vertices, dtype=np.float64)


def to_body_frame(decoded: dict[str, np.ndarray], uri: str) -> dict[str, np.ndarray]:
    """A decoded batch (`decode_table`) moved along depth so that each row's body is centred in
    depth by its own box: the frame a body-guided model reads a fitted body in at inference, where
    an orthographic photo fixes no depth (`model.reconstruction.body_guidance.body_in_network_frame`). Stored rows
    centre the clothed subject instead; the two differ by up to several cm (a skirt, a raised arm).
    Moves points and surface_points and folds the shift into view_from_canonical; the body's distances
    and normals do not change. Adds body_depth_centre (B,) float32, view units, the shift taken off.
    Reads each subject's `meshes/{subject_id}_body.ply` under the dataset `uri` (cached)."""
    out = dict(decoded)
    root = normalise_uri(uri)
    centres = np.zeros(len(decoded["subject_id"]), np.float32)
    for i, subject in enumerate(decoded["subject_id"]):
        hull = _body_hull(join(root, "meshes", f"{subject}_body.ply"))
        depth = hull @ decoded["view_from_canonical"][i, 2, :3].astype(np.float64) + decoded["view_from_canonical"][i, 2, 3]
        centres[i] = (depth.max() + depth.min()) / 2
    for key in ("points", "surface_points"):
        out[key] = decoded[key].copy()
        out[key][:, 2] -= centres[:, None]
    out["view_from_canonical"] = decoded["view_from_canonical"].copy()
    out["view_from_canonical"][:, 2, 3] -= centres
    out["body_depth_centre"] = centres
    return out


def open_shards(uri: str, split: str = "train", seed: int | None = None) -> "ray.data.Dataset":  # noqa: F821
    """A Ray Dataset of the raw shard rows of one split (PNG bytes, point lists): small to move,
    decoded where it is consumed with `decode_table` (training workers do this).

    seed: the shards in an order drawn from it, not sorted: a merged dataset's shards are grouped by
    source, and a run that read them in order met one source after another (the last 30 of 400 steps
    on statues only: the loss tripled and the validation Chamfer went from 1.8 to 5.7 cm)."""
    import ray

    shards = list_shards(uri, split)
    if seed is not None:
        shards = [shards[i] for i in np.random.default_rng(seed).permutation(len(shards))]
    if not shards:
        raise InputError(f"no shards for split {split!r} under {redact(normalise_uri(uri))}/shards/{split}")
    for shard in shards:  # a torn shard is named here, not deep inside a worker's read task
        try:
            storage.read_parquet_metadata(shard)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{redact(shard)}: not a readable Parquet shard ({exc}); remove it, or make its subjects "
                             "again with `pifuhd data`") from None
    filesystem, _ = storage.pyarrow_filesystem(shards[0])
    return ray.data.read_parquet([storage.filesystem(s)[1] for s in shards], filesystem=filesystem)


def open_dataset(uri: str, split: str = "train", batch_size: int = 8) -> "ray.data.Dataset":  # noqa: F821
    """A Ray Dataset of decoded training samples of one split (see `decode_table` for the fields).

    Shards are read lazily and decoded in parallel by Ray Data; iterate it with
    `iter_torch_batches` or hand it to Ray Train.
    """
    return open_shards(uri, split).map_batches(decode_table, batch_format="pyarrow", batch_size=batch_size)


def iter_batches(uri: str, split: str = "train", batch_size: int = 16) -> Iterator[dict[str, np.ndarray]]:
    """Plain-Python iterator over decoded batches of `batch_size` rows (see `decode_table`), in
    shard order across shard boundaries; only the last batch may be smaller."""
    pending: list[pa.RecordBatch] = []
    for shard in list_shards(uri, split):
        fs, path = storage.filesystem(shard)
        with fs.open(path, "rb") as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                pending.append(record_batch)
                table = pa.Table.from_batches(pending)
                while len(table) >= batch_size:
                    yield decode_table(table.slice(0, batch_size))
                    table = table.slice(batch_size)
                pending = table.to_batches()
    if pending and sum(b.num_rows for b in pending):
        yield decode_table(pa.Table.from_batches(pending))


def iter_samples(uri: str, split: str = "train", rows_per_batch: int = 16) -> Iterator[dict]:
    """Plain-Python iterator over decoded samples (one dict per row, shapes without the batch axis)."""
    for decoded in iter_batches(uri, split, rows_per_batch):
        for i in range(len(decoded["view"])):
            yield {k: v[i] for k, v in decoded.items()}
