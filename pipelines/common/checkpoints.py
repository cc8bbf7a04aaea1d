"""Where checkpoints come from for jobs: local paths, object storage, or the shipped default."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from model.cache import CACHE_ROOT
from model.errors import CheckpointError
from pipelines.common.storage import filesystem, is_remote

# The model trained by this project and shipped with it (see README, "Shipped model").
SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[2] / "model" / "weights" / "pifuhd-small.safetensors"
# The shipped model reads a body fitted to each photo; this one, trained alike without that input,
# meshes the photos no body can be fitted to (no landmarks: a cropped torso, a drawing).
SHIPPED_PLAIN_CHECKPOINT = SHIPPED_CHECKPOINT.with_name("pifuhd-small-plain.safetensors")
CACHE_DIR = CACHE_ROOT / "checkpoints"


def default_checkpoint() -> str:
    """The shipped checkpoint; CheckpointError if this installation has none."""
    if not SHIPPED_CHECKPOINT.is_file():
        raise CheckpointError(f"no --checkpoint given and no shipped checkpoint at {SHIPPED_CHECKPOINT}")
    return str(SHIPPED_CHECKPOINT)


def default_fallback(checkpoint: str | None, fallback: str | None) -> str | None:
    """A job's fallback checkpoint (the model for photos no body can be fitted to): the one given;
    else, where no checkpoint was given either (the shipped model), the shipped plain twin; else none."""
    if fallback is not None or checkpoint is not None:
        return fallback
    return str(SHIPPED_PLAIN_CHECKPOINT)


def fetch_checkpoint(uri: str) -> str:
    """A local path for a checkpoint URI: remote files (and sharded folders) are copied once into a local cache."""
    if not is_remote(uri):
        return uri
    fs, path = filesystem(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{uri}: no such checkpoint") from exc
    if info.get("type") == "directory":
        return _fetch_sharded(uri, fs, path)
    version = str(info.get("ETag") or info.get("etag") or info.get("size"))
    key = hashlib.sha256(f"{uri}|{version}".encode()).hexdigest()[:20]
    local = CACHE_DIR / f"{key}{Path(path).suffix}"
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(local.name + f".part-{os.getpid()}")
        fs.get_file(path, str(partial))
        os.replace(partial, local)
    return str(local)


def _fetch_sharded(uri: str, fs, path: str) -> str:
    """A sharded checkpoint folder copied into the cache: the shards its index names, then the index."""
    from model.network.checkpoint import INDEX_NAME, shard_names

    try:
        index = fs.cat_file(f"{path.rstrip('/')}/{INDEX_NAME}")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{uri}: a folder without {INDEX_NAME}, so not a sharded checkpoint") from exc
    shards = sorted(set(shard_names(Path(path) / INDEX_NAME, index)[1].values()))
    # Keyed by the index and each shard's version too: shards rewritten under the same names (by
    # another writer than save_checkpoint) are fetched again, not served stale from the cache.
    versions = []
    for shard in shards:
        try:
            info = fs.info(f"{path.rstrip('/')}/{shard}")
        except FileNotFoundError as exc:
            raise CheckpointError(f"{uri}: shard {shard} is missing") from exc
        versions.append(str(info.get("ETag") or info.get("etag") or info.get("size")))
    local = CACHE_DIR / hashlib.sha256(uri.encode() + b"|" + index + "|".join(versions).encode()).hexdigest()[:20]
    if (local / INDEX_NAME).is_file():
        return str(local)
    partial = local.with_name(local.name + f".part-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    (partial / INDEX_NAME).write_bytes(index)
    for shard in shards:
        try:
            fs.get_file(f"{path.rstrip('/')}/{shard}", str(partial / shard))
        except FileNotFoundError as exc:  # removed since it was listed: a rewrite in progress
            raise CheckpointError(f"{uri}: shard {shard} is missing") from exc
    try:
        os.replace(partial, local)
    except OSError:  # another process cached it first
        shutil.rmtree(partial, ignore_errors=True)
    return str(local)


def checkpoint_identity(path: str, metadata: dict) -> tuple[str, str]:
    """(id, version) of a local checkpoint: id is a content hash (of a sharded one's index and
    shards), version what its metadata says."""
    from model.network.checkpoint import index_of, shard_names

    index = index_of(path)
    files = [Path(path)] if index is None else [index] + [index.parent / s for s in sorted(set(shard_names(index)[1].values()))]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    version = str(metadata.get("version") or metadata.get("format") or "")
    return digest.hexdigest()[:16], version


def fallback_identity(fallback: str, sizes: tuple[int, int]) -> str:
    """The id of a fallback checkpoint (the model for photos no body can be fitted to), fetched and
    checked: a CheckpointError unless it takes no body input and the job's (coarse, fine) image sizes."""
    from model.network.checkpoint import read_checkpoint
    from pipelines.common.uris import redact

    local = fetch_checkpoint(fallback)
    _, config, metadata = read_checkpoint(local, tensors=False)
    if config.body_guided or (config.coarse_size, config.fine_size) != tuple(sizes):
        raise CheckpointError(f"fallback checkpoint {redact(fallback)}: it must take no body input and "
                              f"the same input sizes {tuple(sizes)} as the job's checkpoint")
    return checkpoint_identity(local, metadata)[0]
