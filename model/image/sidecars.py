"""Files given beside a photo NAME.EXT, and reading them: `NAME_mask.*` (a person mask),
`NAME_rect.txt` (`x y w h`) and `NAME_keypoints.json` (OpenPose; centre-based pixel indices).

One reader for every text sidecar (`read_text`, size-limited by the caller) and one for JSON
(`parse_json`: a file nested too deeply is an InputError, not a RecursionError)."""

from __future__ import annotations

import glob
import math
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.errors import InputError
from model.image.boxes import DEFAULT_KEYPOINT_THRESHOLD, Box, box_from_keypoints
from model.image.decode import is_bytes, read_bytes, source_name


MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


KEYPOINT_COUNTS = {25: "BODY_25", 18: "COCO-18"}


@dataclass(frozen=True)
class Sidecars:
    """Files found beside an image by `find_sidecars` (None where absent)."""

    mask: Path | None = None
    rect: Path | None = None
    keypoints: Path | None = None


_SIDECAR_SUFFIX = re.compile(r"_(mask|rect|keypoints)\.[^./]+$", re.IGNORECASE)


def sidecar_index(names) -> dict[str, dict[str, str]]:
    """{image path without extension: {lower-case sidecar suffix: name}} of the sidecar-named files
    among `names` (paths or URIs of one or more folders, spelt as the images are); built once per
    folder listing, so matching N images costs N lookups, not N x the folder."""
    index: dict[str, dict[str, str]] = {}
    for name in sorted(names):
        found = _SIDECAR_SUFFIX.search(name)
        if found:
            index.setdefault(name[: found.start()], {}).setdefault(name[found.start():].lower(), name)
    return index


def match_sidecars(image: str, index: dict[str, dict[str, str]]) -> dict[str, str | None]:
    """The sidecars of an image: {"mask", "rect", "keypoints"} -> name or None, from `sidecar_index`.

    NAME is the image's name without its extension, matched exactly; the suffix in any case:
    - mask: `NAME_mask.E`, E one of MASK_EXTENSIONS (the first found in that order);
    - rect: `NAME_rect.txt`;
    - keypoints: `NAME_keypoints.json` (OpenPose output naming).
    """
    by_suffix = index.get(os.path.splitext(image)[0], {})
    mask = next((by_suffix[f"_mask{ext}"] for ext in MASK_EXTENSIONS if f"_mask{ext}" in by_suffix), None)
    return {"mask": mask, "rect": by_suffix.get("_rect.txt"), "keypoints": by_suffix.get("_keypoints.json")}


def find_sidecars(image_path: str | os.PathLike) -> Sidecars:
    """The person-box files beside a local image (`match_sidecars`)."""
    path = Path(image_path)
    siblings = [str(p) for p in path.parent.glob(f"{glob.escape(path.stem)}_*") if p.is_file()]
    found = {k: None if v is None else Path(v) for k, v in match_sidecars(str(path), sidecar_index(siblings)).items()}
    return Sidecars(**found)


def is_sidecar(path: str | os.PathLike) -> bool:
    """Whether a file is named like a sidecar (so a folder scan can skip it)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith("_rect.txt") or name.endswith("_keypoints.json"):
        return True
    return path.stem.lower().endswith("_mask") and path.suffix.lower() in MASK_EXTENSIONS


def read_text(source: str | os.PathLike | bytes, name: str) -> str:
    try:
        return read_bytes(source, name).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: not UTF-8 text ({e})") from e


def parse_rect(source: str | os.PathLike | bytes, name: str | None = None) -> Box:
    """Parse a rect file (path, or its content as bytes) -> the person's Box.

    One rectangle per non-empty line, `x y w h` (pixels, top-left origin;
    pixel (x, y) is the top-left pixel; separators spaces, tabs or commas;
    lines starting with # are ignored). With several lines, the largest
    rectangle is used. InputError for anything else, or w, h <= 0.
    """
    name = source_name(source, name, default="<rect bytes>")
    boxes = []
    for number, line in enumerate(read_text(source, name).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.replace(",", " ").split()
        if len(fields) != 4:
            raise InputError(f"{name}: line {number}: expected 4 values `x y w h`, got {len(fields)}")
        try:
            x, y, w, h = (float(f) for f in fields)
        except ValueError as e:
            raise InputError(f"{name}: line {number}: not a number ({e})") from e
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise InputError(f"{name}: line {number}: non-finite value")
        if w <= 0 or h <= 0:
            raise InputError(f"{name}: line {number}: width and height must be positive, got {w} x {h}")
        boxes.append(Box.from_xywh(x, y, w, h))
    if not boxes:
        raise InputError(f"{name}: no rectangle in the file")
    return max(boxes, key=lambda b: b.width * b.height)


def parse_json(source: str | os.PathLike | bytes, name: str) -> object:
    """A JSON sidecar (path or bytes) -> its document; InputError when it is not JSON or nested too deeply."""
    try:
        return json.loads(read_text(source, name))
    except json.JSONDecodeError as e:
        raise InputError(f"{name}: not valid JSON ({e})") from e
    except RecursionError as e:
        raise InputError(f"{name}: JSON nested too deeply") from e


def parse_openpose_people(source: str | os.PathLike | bytes, name: str | None = None) -> list[np.ndarray]:
    """Parse an OpenPose JSON file (path or bytes) -> every person's (K, 3) x, y, confidence.

    Format: {"people": [{"pose_keypoints_2d": [x0, y0, c0, x1, y1, c1, ...]}]}
    with 25 (BODY_25) or 18 (COCO-18) keypoints per person, in pixel indices.
    InputError for invalid JSON, a missing or empty "people" list, or a malformed person.
    """
    name = source_name(source, name, default="<keypoints bytes>")
    document = parse_json(source, name)
    people = document.get("people") if isinstance(document, dict) else None
    if not isinstance(people, list):
        raise InputError(f"{name}: no \"people\" list")
    if not people:
        raise InputError(f"{name}: no person detected (\"people\" is empty)")
    return [_person_keypoints(person, f"{name}: person {index}") for index, person in enumerate(people)]


def parse_keypoints(
    source: str | os.PathLike | bytes,
    name: str | None = None,
    *,
    threshold: float = DEFAULT_KEYPOINT_THRESHOLD,
) -> np.ndarray:
    """Parse an OpenPose JSON file (path or bytes) -> (K, 2) confident keypoints.

    See `parse_openpose_people` for the format. Keypoints with confidence > threshold
    are kept; of the people with at least two, the largest (by the larger side of
    their keypoints' box) is returned.
    """
    name = source_name(source, name, default="<keypoints bytes>")
    candidates = []
    for points in parse_openpose_people(source, name):
        confident = points[points[:, 2] > threshold, :2]
        if len(confident) >= 2 and np.ptp(confident, axis=0).max() > 0:
            candidates.append(confident)
    if not candidates:
        raise InputError(f"{name}: no person with at least 2 confident keypoints (confidence > {threshold})")
    return max(candidates, key=lambda p: float(np.ptp(p, axis=0).max()))


def _person_keypoints(person: object, where: str) -> np.ndarray:
    """One person's entry -> (K, 3) float64 of x, y, confidence."""
    values = None
    if isinstance(person, dict):
        values = person.get("pose_keypoints_2d", person.get("pose_keypoints"))
    if not isinstance(values, list):
        raise InputError(f"{where}: no \"pose_keypoints_2d\" list")
    counts = " or ".join(f"{3 * k} ({label})" for k, label in KEYPOINT_COUNTS.items())
    if len(values) % 3 or len(values) // 3 not in KEYPOINT_COUNTS:
        raise InputError(f"{where}: {len(values)} keypoint values, expected {counts}")
    try:
        points = np.asarray(values, dtype=np.float64).reshape(-1, 3)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: keypoint values are not numbers ({e})") from e
    if not np.isfinite(points).all():
        raise InputError(f"{where}: non-finite keypoint values")
    return points


def _as_rect(rect: object, name: str) -> Box:
    """A Box, an (x, y, w, h) sequence, or a rect file (path or bytes) -> Box."""
    if isinstance(rect, Box):
        box = rect
    elif isinstance(rect, (str, os.PathLike)) or is_bytes(rect):
        return parse_rect(rect, source_name(rect, None, default=f"rect for {name}"))
    else:
        values = [float(v) for v in rect]  # type: ignore[union-attr]
        if len(values) != 4:
            raise InputError(f"{name}: rect must be (x, y, w, h), got {len(values)} values")
        box = Box.from_xywh(*values)
    if not (box.width > 0 and box.height > 0):
        raise InputError(f"{name}: rect width and height must be positive, got {box.width} x {box.height}")
    return box


def _as_keypoints(keypoints: object, name: str, threshold: float) -> np.ndarray:
    """A keypoints file (path or bytes) or a (K, 2) / (K, 3) array -> (K, 2) confident points."""
    if isinstance(keypoints, (str, os.PathLike)) or is_bytes(keypoints):
        kp_name = source_name(keypoints, None, default=f"keypoints for {name}")
        return parse_keypoints(keypoints, kp_name, threshold=threshold)
    points = np.asarray(keypoints, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] not in (2, 3):
        raise InputError(f"{name}: keypoints must be (K, 2) or (K, 3), got shape {points.shape}")
    if points.shape[1] == 3:
        points = points[points[:, 2] > threshold, :2]
    if len(points) < 2 or np.ptp(points, axis=0).max() <= 0:
        raise InputError(f"{name}: fewer than 2 distinct confident keypoints (confidence > {threshold})")
    return points


def sidecar_box(rect: object, keypoints: object, name: str, threshold: float = DEFAULT_KEYPOINT_THRESHOLD) -> Box | None:
    """The person box a rect (first) or keypoints source gives, or None when neither is given."""
    if rect is not None:
        return _as_rect(rect, name)
    if keypoints is not None:
        return box_from_keypoints(_as_keypoints(keypoints, name, threshold))
    return None
