"""Local paths and object-storage URIs (s3://, any fsspec protocol) behind one small API.

S3 endpoints and credentials come from the environment (AWS_* variables, an
instance role); they never appear in URIs we log or store: `redact` strips any
user-info a URI carries.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/key."""
    return url_to_fs(uri)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with '/'."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI of a path as listed by `fs` (listings drop the protocol)."""
    uri = fs.unstrip_protocol(path)
    return uri if is_remote(uri) else path


def redact(uri: str) -> str:
    """The URI without user-info (s3://KEY:SECRET@bucket/x -> s3://bucket/x); paths unchanged."""
    parts = urlsplit(uri)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return uri


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a whole object; on a local disk through a temporary file and rename, so a
    crash never leaves a half-written file under the final name (object stores are atomic)."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(relative_name: str, identity: str, max_length: int = 120) -> str:
    """An output path stem (may contain '/') derived from an input's name.

    Every component is reduced to [A-Za-z0-9._-]; '.', '..' and empty components are
    dropped, so the result can never leave the output root; the extension is dropped and
    a short hash of `identity` (the full input URI) is appended, so two inputs whose
    names sanitise alike never overwrite each other.
    """
    stem = os.path.splitext(relative_name.replace("\\", "/"))[0]
    components = [_UNSAFE.sub("_", c).strip("._") for c in stem.split("/")]
    components = [c[:max_length] for c in components if c] or ["input"]
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    components[-1] = f"{components[-1]}-{digest}"
    return "/".join(components[-4:])  # keep some of the folder structure, bounded depth
