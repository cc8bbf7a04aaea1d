"""Local paths and object-storage URIs (the schemes of `pipelines.common.uris`) behind one small API.

S3 endpoints and credentials come from the environment (AWS_* variables, an
instance role); they never appear in URIs we log or store (`pipelines.common.uris.redact`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
import uuid

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
import pyarrow.parquet as pq

from pipelines.common.uris import check_uri, redact

log = logging.getLogger(__name__)

_LOCAL = LocalFileSystem()

TEMPORARY_MARK = ".tmp-"  # write_bytes_atomic's temporaries: FINAL_NAME.tmp-<8 hex>
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/key.

    UnsupportedURIError for a scheme outside the allow-list. No URL chaining: a `::` in
    a file name is part of the name.
    """
    scheme = check_uri(uri)
    if scheme == "s3":
        # No listing cache: other processes (Ray workers, other jobs) add objects while we list.
        fs = fsspec.filesystem("s3", use_listings_cache=False)
        return fs, fs._strip_protocol(uri)
    # Local paths by hand: fsspec's path handling costs ~100 us a call (a 100,000-line list file).
    path = uri[len("file://"):] if scheme == "file" else uri
    return _LOCAL, os.path.abspath(os.path.expanduser(path))


def is_remote(uri: str) -> bool:
    return check_uri(uri) == "s3"


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with '/'."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI of a path as listed by `fs` (listings drop the protocol)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def pyarrow_filesystem(uri: str):
    """(pyarrow filesystem, path) for the libraries that take one (Ray Data's readers, Ray Train's
    storage): the same filesystem as `filesystem`, wrapped (local paths natively)."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return handle.read()


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Sorted URIs of the files below a folder (recursively) whose names end with `suffix`; [] if
    the folder does not exist."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(full_uri(fs, f) for f in fs.find(path) if f.endswith(suffix))


def read_parquet(uri: str, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """One Parquet file (or the given columns of it), read as `schema` when given."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns, schema=schema)


def read_parquet_metadata(uri: str) -> pq.FileMetaData:
    """A Parquet file's footer (row count, schema) without its data; OSError or ArrowException if torn."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a whole object; on a local disk through a temporary file and rename, so a
    crash never leaves a half-written file under the final name (object stores are atomic)."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex[:8]}"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:  # a full disk, a signal: leave no temporary behind
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def remove_quietly(uris: list[str]) -> None:
    """Delete what exists of `uris`, best effort (cleaning up after a failure must not hide it)."""
    for uri in uris:
        try:
            fs, path = filesystem(uri)
            fs.rm_file(path)
        except Exception:  # noqa: BLE001 - absent, or the store is down: nothing more to do
            pass


def remove_stale_temporaries(root: str, max_age_s: float = 3600.0) -> int:
    """Delete the temporaries of `write_bytes_atomic` older than `max_age_s` under a local root
    (a process killed mid-write leaves them; younger ones may belong to a running job).
    Object stores have none. Returns how many were removed."""
    if is_remote(root):
        return 0
    _, path = filesystem(root)
    removed, deadline = 0, time.time() - max_age_s
    for folder, _, names in os.walk(path):
        for name in names:
            if TEMPORARY_MARK in name:
                temporary = os.path.join(folder, name)
                try:
                    if os.stat(temporary).st_mtime < deadline:
                        os.remove(temporary)
                        removed += 1
                except FileNotFoundError:  # another job renamed or removed it meanwhile
                    pass
    return removed


def parquet_bytes(table: pa.Table, **options) -> bytes:
    """A table as Parquet file bytes; `options` go to `pyarrow.parquet.write_table`."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    return buffer.getvalue()


def write_parquet_atomic(uri: str, table: pa.Table, **options) -> None:
    """Write a Parquet file whole (`write_bytes_atomic`): a crash leaves no truncated part."""
    write_bytes_atomic(uri, parquet_bytes(table, **options))


def read_parquet_parts(uri: str, schema: pa.Schema | None = None) -> list[pa.Table]:
    """Every `*.parquet` part in a folder, in name order; an unreadable part is skipped with a
    warning that names it (one torn file never hides the others)."""
    fs, path = filesystem(uri)
    tables = []
    for part in sorted(full_uri(fs, p) for p in fs.glob(path.rstrip("/") + "/*.parquet")):
        try:
            tables.append(read_parquet(part, schema=schema))
        except (OSError, pa.ArrowException) as exc:
            log.warning("skipping unreadable Parquet part %s: %s", redact(part), redact(str(exc)))
    return tables


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(relative_name: str, identity: str, max_length: int = 120) -> str:
    """An output path stem (may contain '/') derived from an input's name.

    Every component is reduced to [A-Za-z0-9._-]; '.', '..' and empty components are
    dropped, so the result can never leave the output root; the extension is dropped and
    a hash of `identity` (the full canonical input URI) is appended, so two inputs whose
    names sanitise or truncate alike never overwrite each other.
    """
    stem = os.path.splitext(relative_name.replace("\\", "/"))[0]
    components = [_UNSAFE.sub("_", c).strip("._") for c in stem.split("/")]
    components = [c[:max_length] for c in components if c] or ["input"]
    # 128 bits of the whole canonical URI: no collision among billions of inputs.
    digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    components[-1] = f"{components[-1]}-{digest}"
    return "/".join(components[-4:])  # keep some of the folder structure, bounded depth
