"""Listing a bulk job's inputs: files, folders, globs, list files, object-store prefixes, Parquet tables.

Each input image may have sidecar files beside it (see `model.reconstruction.preprocess.find_sidecars`):
`NAME_mask.png` (person mask), `NAME_rect.txt` (`x y w h`), `NAME_keypoints.json`
(OpenPose). Sidecars are never listed as inputs themselves.
"""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass

import pyarrow.parquet as pq

from model.errors import InputError
from model.reconstruction.preprocess import is_sidecar, match_sidecars, sidecar_index
from pipelines.storage import IMAGE_EXTENSIONS, filesystem, full_uri
from pipelines.uris import UnsupportedURIError

URI_COLUMNS = ("uri", "input_uri", "path", "image")


@dataclass(frozen=True)
class InputItem:
    """One image to reconstruct. name: its path relative to the listed root (output naming)."""

    uri: str
    name: str
    mask_uri: str = ""
    rect_uri: str = ""
    keypoints_uri: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS) and not is_sidecar(path)


def _with_sidecars(uri: str, name: str, siblings: dict) -> InputItem:
    """Attach the sidecars found among `siblings` (`sidecar_index` of the full URIs in its folder)."""
    found = match_sidecars(uri, siblings)
    return InputItem(uri=uri, name=name, **{f"{kind}_uri": found[kind] or "" for kind in ("mask", "rect", "keypoints")})


def _list_folder(spec: str) -> list[InputItem]:
    fs, root = filesystem(spec)
    paths = sorted(fs.find(root))
    uris = sidecar_index(full_uri(fs, p) for p in paths)
    return [
        _with_sidecars(full_uri(fs, p), posixpath.relpath(p, root), uris)
        for p in paths
        if _is_image(p)
    ]


class _Siblings:
    """The sidecars (`sidecar_index` of full URIs) in a folder, each folder listed once (a list of N
    inputs in one folder costs one listing, not N)."""

    def __init__(self):
        self.folders: dict[tuple[int, str], dict] = {}

    def of(self, fs, path: str) -> dict:
        folder = posixpath.dirname(path)
        key = (id(fs), folder)
        if key not in self.folders:
            try:
                self.folders[key] = sidecar_index(full_uri(fs, p) for p in fs.ls(folder, detail=False)) if folder else {}
            except OSError:  # FileNotFoundError, NotADirectoryError, permissions: no sidecars
                self.folders[key] = {}
        return self.folders[key]


def _list_glob(spec: str) -> list[InputItem]:
    fs, pattern = filesystem(spec)
    siblings = _Siblings()
    paths = sorted(p for p in fs.glob(pattern) if fs.isfile(p))
    return [_with_sidecars(full_uri(fs, path), posixpath.basename(path), siblings.of(fs, path)) for path in paths]


def _list_single(spec: str) -> list[InputItem]:
    fs, path = filesystem(spec)
    # The canonical URI (absolute for local paths), so it matches the listed siblings.
    return [_with_sidecars(full_uri(fs, path), posixpath.basename(path), _Siblings().of(fs, path))]


def _list_uris(uris: list[str], source: str) -> list[InputItem]:
    """Explicit URIs (from a list file or table): every one is an input, even a bad one."""
    items = []
    siblings = _Siblings()
    for uri in uris:
        try:
            fs, path = filesystem(uri)
        except UnsupportedURIError:  # listed as it is: its read fails, so it is a failed row
            items.append(InputItem(uri=uri, name=posixpath.basename(uri.split("?", 1)[0]) or "input"))
            continue
        items.append(_with_sidecars(full_uri(fs, path), posixpath.basename(path) or uri, siblings.of(fs, path)))
    if not items:
        raise InputError(f"{source}: lists no inputs")
    return items


def _read_list_file(spec: str) -> list[str]:
    fs, path = filesystem(spec)
    lines = fs.cat_file(path).decode("utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _read_table(spec: str) -> list[str]:
    fs, path = filesystem(spec)
    table = pq.read_table(path, filesystem=fs)
    column = next((c for c in URI_COLUMNS if c in table.column_names), None)
    if column is None:
        raise InputError(f"{spec}: a Parquet table of inputs needs one of the columns {URI_COLUMNS}")
    return [u for u in table.column(column).to_pylist() if u]


def list_inputs(specs: list[str], exclude: str | None = None) -> list[InputItem]:
    """Every input image named by `specs`, in order, without duplicates, none under `exclude`.

    A spec is an image file, a folder or prefix (recursive), a glob (`*`, `?`, `[`), a `.txt`
    list of URIs (one per line), or a `.parquet` table with a `uri` column. `exclude` is the
    job's output root: an output inside an input folder is never read back as input.
    """
    items: list[InputItem] = []
    for spec in specs:
        fs, path = filesystem(spec)
        lower = path.lower()
        if any(ch in path for ch in "*?["):
            found = _list_glob(spec)
        elif lower.endswith(".parquet") and fs.isfile(path):
            found = _list_uris(_read_table(spec), spec)
        elif lower.endswith(".txt") and fs.isfile(path) and not is_sidecar(path):
            found = _list_uris(_read_list_file(spec), spec)
        elif fs.isdir(path):
            found = _list_folder(spec)
        elif fs.isfile(path):
            found = _list_single(spec)
        else:
            raise InputError(f"{spec}: no such file, folder or prefix")
        items.extend(found)
    if exclude is not None:
        fs, root = filesystem(exclude)
        prefix = full_uri(fs, root.rstrip("/")) + "/"
        items = [item for item in items if not item.uri.startswith(prefix)]
    unique = {}
    for item in items:
        unique.setdefault(item.uri, item)
    return list(unique.values())
