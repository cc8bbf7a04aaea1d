"""Listing a bulk job's inputs: files, folders, globs, list files, object-store prefixes, Parquet tables.

Each input image may have sidecar files beside it (see `model.image.sidecars.find_sidecars`):
`NAME_mask.png` (person mask), `NAME_rect.txt` (`x y w h`), `NAME_keypoints.json`
(OpenPose). Sidecars are never listed as inputs themselves.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import asdict, dataclass

import pyarrow.parquet as pq

from model.errors import InputError
from model.image.sidecars import is_sidecar, match_sidecars, sidecar_index
from pipelines.common.exit_codes import UsageError
from pipelines.common.storage import IMAGE_EXTENSIONS, filesystem, full_uri
from pipelines.common.uris import UnsupportedURIError, check_uri, redact

log = logging.getLogger(__name__)

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


# The folders of an output root that the project's jobs write (`reconstruct`: meshes; `fit`: bodies).
OUTPUT_FOLDERS = ("meshes", "bodies", "manifest")


def list_inputs(specs: list[str], exclude: str | None = None) -> list[InputItem]:
    """Every input image named by `specs`, in order, without duplicates.

    A spec is an image file, a folder or prefix (recursive), a glob (`*`, `?`, `[`), a `.txt`
    list of URIs (one per line), or a `.parquet` table with a `uri` column. `exclude` is the
    job's output root: the project's own outputs there (`OUTPUT_FOLDERS`) are skipped with a
    warning saying how many; any other input inside it is a UsageError (the output folder is not
    an input folder). A spec that cannot be listed (no such file, wrong credentials) is an InputError.
    Two URIs of one object that differ only in what `redact` hides (credentials) are one input:
    the one that can be read.
    """
    items: list[InputItem] = []
    for spec in specs:
        try:
            items.extend(_list_spec(spec))
        except (InputError, UsageError):
            raise
        except Exception as exc:  # noqa: BLE001 - s3fs and botocore raise many kinds for one cause
            raise InputError(f"{redact(spec)}: cannot be listed ({type(exc).__name__}: {redact(str(exc))[:300]})") from None
    if exclude is not None:
        items = _outside_output(items, exclude)
    unique: dict[str, InputItem] = {}
    for item in items:
        key = redact(item.uri)
        kept = unique.get(key)
        if kept is None or (_refused(kept.uri) and not _refused(item.uri)):
            unique[key] = item
    return list(unique.values())


def _list_spec(spec: str) -> list[InputItem]:
    fs, path = filesystem(spec)
    lower = path.lower()
    if any(ch in path for ch in "*?["):
        return _list_glob(spec)
    if lower.endswith(".parquet") and fs.isfile(path):
        return _list_uris(_read_table(spec), spec)
    if lower.endswith(".txt") and fs.isfile(path) and not is_sidecar(path):
        return _list_uris(_read_list_file(spec), spec)
    if fs.isdir(path):
        return _list_folder(spec)
    if fs.isfile(path):
        return _list_single(spec)
    raise InputError(f"{redact(spec)}: no such file, folder or prefix")


def _outside_output(items: list[InputItem], output: str) -> list[InputItem]:
    """`items` less the project's outputs inside `output` (warned about); UsageError for any other input there."""
    fs, root = filesystem(output)
    prefix = full_uri(fs, root.rstrip("/")) + "/"
    kept, outputs, inside = [], 0, []
    for item in items:
        if not item.uri.startswith(prefix):
            kept.append(item)
        elif item.uri[len(prefix):].split("/", 1)[0] in OUTPUT_FOLDERS:
            outputs += 1
        else:
            inside.append(item.uri)
    if inside:
        raise UsageError(f"{len(inside)} inputs are inside the output folder {redact(output)} (the first: "
                         f"{redact(inside[0])}): write the outputs to a folder of their own")
    if outputs:
        log.warning("skipped %d files that are this project's outputs in %s", outputs, redact(output))
    return kept


def _refused(uri: str) -> bool:
    try:
        check_uri(uri)
    except UnsupportedURIError:
        return True
    return False
