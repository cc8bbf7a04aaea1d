"""From an image file to the network's input tensors.

Pipeline, top to bottom:

1. **Decode** (`load_image`): any PIL-readable file (path or bytes) -> RGB float32
   (H, W, 3) in [0, 1] plus an optional alpha (H, W), EXIF orientation applied.
   `prepare_input` keeps the decoded integer pixels and converts only the crop,
   so a large photo costs 4 bytes a pixel, not 16 (`decode_image`, `_cut_square`).
2. **Person box** (`_person_region`): from, in this priority, an explicit mask
   image, the alpha channel, a rectangle (`NAME_rect.txt`), OpenPose keypoints
   (`NAME_keypoints.json`) or a found person's mask (`model.person`); see
   `find_sidecars`. A found person's mask also replaces the background under a
   rectangle or keypoints box.
3. **Crop** (`square_crop`, `_render`): a square around the box (side = margin x
   the box's larger side), background composited to 0.5 grey, resized to each
   input size, scaled to [-1, 1].
4. **Frames** (`world_to_pixel`, `pixel_to_world`): between the network's
   world frame and the user's pixel frame.

Coordinate conventions
----------------------
*Continuous pixel coordinates* (u, v) of an image W x H: top-left origin, u
right, v down, pixel (column i, row j) covers [i, i+1] x [j, j+1], so its
centre is (i + 0.5, j + 0.5). `Box` and `Crop` use these. (OpenPose keypoints
are pixel indices, i.e. centre-based: keypoint (x, y) is (x + 0.5, y + 0.5).)

*Network world frame*: normalised device coordinates over the resized square
crop of side S (S = `Crop.size`, the largest input size), with
align_corners=True: x = -1 is the centre of the first column, +1 the centre of
the last; y_ndc = -1 the first (top) row, +1 the last; world y = -y_ndc (up);
world z points toward the camera, in the same units as x.

*User frame* (`world_to_pixel`): x right, y up, z toward the camera, one unit =
one pixel of the original (EXIF-oriented) image, origin at the image's
bottom-left corner: (x, y) = (u, H - v). The centre of pixel (i, j) is
therefore (i + 0.5, H - j - 0.5), and an orthographic projection of a mesh's
(x, y) lands on the person in the photo.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from model.errors import InputError

log = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]
"""A file path, or the file's bytes (e.g. read from object storage)."""

DEFAULT_SIZES: tuple[int, ...] = (512, 1024)
DEFAULT_MARGIN = 1.2  # crop side / the person box's larger side
DEFAULT_MAX_PIXELS = 100_000_000  # decompression-bomb guard: width * height
DEFAULT_KEYPOINT_THRESHOLD = 0.2  # keypoints at or below this confidence are ignored
KEYPOINT_BODY_PAD = 0.05  # joints -> body: grow their box by this x its larger side, each side
ALPHA_BOX_THRESHOLD = 0.5  # alpha above this counts as person for the box
BACKGROUND = 0.5  # grey in [0, 1]; 0 after scaling to [-1, 1]

MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
KEYPOINT_COUNTS = {25: "BODY_25", 18: "COCO-18"}


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in continuous pixel coordinates (top-left origin, pixels)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @classmethod
    def from_xywh(cls, x: float, y: float, w: float, h: float) -> Box:
        """Pixel (x, y) is the box's top-left pixel; it spans w x h pixels."""
        return cls(x, y, x + w, y + h)

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    def intersects(self, width: int, height: int) -> bool:
        """Whether the box overlaps the image [0, width] x [0, height] with positive area."""
        return self.x0 < width and self.x1 > 0 and self.y0 < height and self.y1 > 0


@dataclass(frozen=True)
class Crop:
    """The square cut from the original image, and the size it was resized to.

    x0, y0: top-left corner of the square in continuous pixel coordinates of the
    original image (integers; may be negative or run past the image, which is
    padded with background). side: the square's side in original pixels.
    size: the side S of the resized square that defines the network frame (the
    largest input size). image_width, image_height: the original image's size.
    """

    x0: int
    y0: int
    side: int
    size: int
    image_width: int
    image_height: int

    @classmethod
    def whole_square(cls, size: int) -> Crop:
        """The crop that is a whole size x size image, as renders and stored dataset views are:
        its network frame is the view frame, [-1, 1] across the image."""
        return cls(0, 0, size, size, size, size)

    @property
    def pixels_per_unit(self) -> float:
        """Original pixels per network world unit: side * (S - 1) / (2 S)."""
        return self.side * (self.size - 1) / (2 * self.size)

    @property
    def half_pixel(self) -> float:
        """Distance, in original pixels, from the square's edge to the first resized pixel centre."""
        return self.side / (2 * self.size)


class DecodedImage(NamedTuple):
    """rgb: (H, W, 3), alpha: (H, W) or None; from `load_image` float32 in [0, 1],
    from `decode_image` as decoded (uint8 / uint16 scaled by their maximum, see `_unit_scale`)."""

    rgb: np.ndarray
    alpha: np.ndarray | None


@dataclass(frozen=True)
class Sidecars:
    """Files found beside an image by `find_sidecars` (None where absent)."""

    mask: Path | None = None
    rect: Path | None = None
    keypoints: Path | None = None


@dataclass(frozen=True)
class PreparedImage:
    """Everything the network and the later stages need from one photo.

    images: input side S -> (3, S, S) float32 RGB in [-1, 1]; background 0.
    mask: (1, S, S) float32 in [0, 1] at S = crop.size: the person mask when
        mask_source is set, else the part of the crop inside the image.
    crop: the square and the frame it defines (see `world_to_pixel`).
    rgb: the original image, (H, W, 3) as decoded (uint8 / uint16, or float32 in [0, 1]).
    person_box: the person's box in continuous pixel coordinates.
    box_source: where the box came from: "mask", "alpha", "rect", "keypoints" or "person"
        (a found person's mask, `model.person`).
    mask_source: where the mask that replaced the background came from: "mask", "alpha",
        "person", or None (the photo's background is kept).
    body: the body fitted to the photo, (vertices (V, 3) in the network frame, faces (F, 3)), for
        body-guided models (`model.body.guidance`); None when none was fitted.
    """

    name: str
    images: dict[int, torch.Tensor]
    mask: torch.Tensor
    crop: Crop
    rgb: np.ndarray
    person_box: Box
    box_source: str
    mask_source: str | None
    body: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def original_size(self) -> tuple[int, int]:
        """(height, width) of the original image in pixels, as rgb.shape[:2]."""
        return self.crop.image_height, self.crop.image_width

    @property
    def has_segmentation(self) -> bool:
        return self.mask_source is not None


# ------------------------------------------------------------------------ decoding


def _is_bytes(source: object) -> bool:
    return isinstance(source, (bytes, bytearray, memoryview))


def source_name(source: object, name: str | None, default: str = "<bytes>") -> str:
    if name is not None:
        return name
    return default if _is_bytes(source) else os.fspath(source)  # type: ignore[arg-type]


def _read_bytes(source: ImageSource, name: str) -> bytes:
    """The file's content; InputError if unreadable or empty."""
    if _is_bytes(source):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise InputError(f"{name}: cannot read file ({e.strerror or e})") from e
    if not data:
        raise InputError(f"{name}: empty file (0 bytes)")
    return data


def open_image(source: ImageSource, name: str, max_pixels: int) -> Image.Image:
    """Decode the first frame, fully loaded, EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded.
    PIL refuses on its own above 2 x Image.MAX_IMAGE_PIXELS, whatever max_pixels.
    """
    data = _read_bytes(source, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise InputError(f"{name}: too many pixels, possible decompression bomb ({e})") from e
        except UnidentifiedImageError as e:
            raise InputError(f"{name}: not an image, or an unsupported/corrupt format") from e
        except MemoryError:
            raise
        except Exception as e:  # PIL plugins raise many types on a corrupt header
            raise InputError(f"{name}: corrupt image header ({type(e).__name__}: {e})") from e

    width, height = image.size
    if width * height > max_pixels:
        raise InputError(
            f"{name}: too many pixels, possible decompression bomb: {width}x{height} = "
            f"{width * height} pixels exceeds the limit of {max_pixels}"
        )
    if width == 0 or height == 0:
        raise InputError(f"{name}: image has no pixels ({width}x{height})")
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as e:  # truncated data, bad CRC, bad compression stream, ...
        cause = "truncated image" if "truncated" in str(e).lower() else "corrupt image data"
        raise InputError(f"{name}: {cause} ({type(e).__name__}: {e})") from e
    return _apply_exif_orientation(image, name)


def _apply_exif_orientation(image: Image.Image, name: str) -> Image.Image:
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no second copy of a large photo
        return image
    except MemoryError:
        raise
    except Exception as e:  # unreadable EXIF must not lose an otherwise good photo
        log.warning("%s: ignoring unreadable EXIF orientation (%s)", name, e)
        return image


def decode_image(image: Image.Image) -> DecodedImage:
    """Any PIL mode -> (H, W, 3) RGB and the alpha, if any, without a float copy of 8- and 16-bit data.

    8-bit modes give uint8 (PIL converts palette, colour-key transparency, CMYK, ... to
    L, LA, RGB or RGBA first), I;16* uint16; mode I float32 divided by 65535 when it fits in
    16 bits, else by its maximum; mode F float32 clipped to [0, 1]. Channels are views of one
    array (a large photo is held once, at its own bit depth).
    """
    mode = image.mode
    if mode.startswith("I;16"):
        return DecodedImage(_grey_to_rgb(np.asarray(image).astype(np.uint16)), None)
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        scale = max(65535.0, float(values.max()))
        return DecodedImage(_grey_to_rgb(np.clip(values / scale, 0, 1).astype(np.float32)), None)
    if mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
        return DecodedImage(_grey_to_rgb(grey), None)

    has_transparency = "transparency" in image.info
    if mode in ("PA", "RGBa", "La") or (has_transparency and mode in ("1", "L", "P", "RGB")):
        image = image.convert("RGBA")
    elif mode == "1":
        image = image.convert("L")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, ...

    values = np.asarray(image)
    if image.mode == "L":
        return DecodedImage(_grey_to_rgb(values), None)
    if image.mode == "LA":
        return DecodedImage(_grey_to_rgb(values[..., 0]), values[..., 1])
    if image.mode == "RGBA":
        return DecodedImage(values[..., :3], values[..., 3])
    return DecodedImage(values, None)


def _unit_scale(values: np.ndarray) -> float:
    """What a decoded array is divided by to lie in [0, 1]: its integer maximum, else 1."""
    return float(np.iinfo(values.dtype).max) if values.dtype.kind in "ui" else 1.0


def as_float(values: np.ndarray) -> np.ndarray:
    """A decoded array as float32 in [0, 1] (a contiguous copy)."""
    out = np.array(values, dtype=np.float32)
    scale = _unit_scale(values)
    if scale != 1.0:
        out /= scale
    return out


def _to_float(image: Image.Image) -> DecodedImage:
    """Any PIL mode -> (H, W, 3) float32 RGB in [0, 1] and the alpha, if any (see `decode_image`)."""
    rgb, alpha = decode_image(image)
    return DecodedImage(as_float(rgb), None if alpha is None else as_float(alpha))


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 3), a read-only view (no copy)."""
    return np.broadcast_to(grey[..., None], (*grey.shape, 3))


def load_image(
    source: ImageSource, name: str | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decode an image file (path or bytes) of any size and mode.

    Returns rgb (H, W, 3) float32 in [0, 1] and alpha (H, W) float32 in [0, 1]
    (RGBA, LA, palette or colour-key transparency) or None; EXIF orientation is
    applied, so H, W are those of the image as displayed. `name` is used in
    error messages (default: the path, or "<bytes>").

    Raises InputError naming the file and the cause: unreadable, empty, not an
    image, too many pixels (more than max_pixels, checked before decoding),
    truncated or corrupt.
    """
    name = source_name(source, name)
    return _to_float(open_image(source, name, max_pixels))


def load_mask(
    source: ImageSource, name: str | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode a mask image of any mode -> (H, W) bool, True = person.

    A pixel is person when any colour channel is nonzero (and, if the file has
    alpha, the alpha is nonzero too). EXIF orientation is applied.
    """
    name = source_name(source, name)
    rgb, alpha = decode_image(open_image(source, name, max_pixels))
    person = rgb.max(axis=2) > 0
    if alpha is not None:
        person &= alpha > 0
    return person


# ---------------------------------------------------------------------- person box


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
        return _read_bytes(source, name).decode("utf-8-sig")
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


def parse_openpose_people(source: str | os.PathLike | bytes, name: str | None = None) -> list[np.ndarray]:
    """Parse an OpenPose JSON file (path or bytes) -> every person's (K, 3) x, y, confidence.

    Format: {"people": [{"pose_keypoints_2d": [x0, y0, c0, x1, y1, c1, ...]}]}
    with 25 (BODY_25) or 18 (COCO-18) keypoints per person, in pixel indices.
    InputError for invalid JSON, a missing or empty "people" list, or a malformed person.
    """
    name = source_name(source, name, default="<keypoints bytes>")
    try:
        document = json.loads(read_text(source, name))
    except json.JSONDecodeError as e:
        raise InputError(f"{name}: not valid JSON ({e})") from e
    except RecursionError as e:
        raise InputError(f"{name}: JSON nested too deeply") from e
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


def box_from_mask(mask: np.ndarray) -> Box | None:
    """(H, W) bool -> the box around its True pixels, or None if there are none."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return Box(float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def box_from_keypoints(points: np.ndarray, pad: float = KEYPOINT_BODY_PAD) -> Box:
    """(K, 2) keypoints (pixel indices) -> an estimate of the whole body's box.

    Joints lie inside the body (eyes below the top of the head, ankles above
    the soles, wrists short of the fingertips), so their box is grown by
    pad x its larger side on every side.
    """
    centres = np.asarray(points, dtype=np.float64)[:, :2] + 0.5
    low, high = centres.min(axis=0), centres.max(axis=0)
    grow = pad * float((high - low).max())
    return Box(low[0] - grow, low[1] - grow, high[0] + grow, high[1] + grow)


def _as_rect(rect: object, name: str) -> Box:
    """A Box, an (x, y, w, h) sequence, or a rect file (path or bytes) -> Box."""
    if isinstance(rect, Box):
        box = rect
    elif isinstance(rect, (str, os.PathLike)) or _is_bytes(rect):
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
    if isinstance(keypoints, (str, os.PathLike)) or _is_bytes(keypoints):
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


def alpha_is_mask(image: DecodedImage) -> bool:
    """Whether the image's alpha channel marks a person (it exists and is not fully opaque)."""
    return image.alpha is not None and float(image.alpha.min()) < _unit_scale(image.alpha)


def sidecar_box(rect: object, keypoints: object, name: str, threshold: float = DEFAULT_KEYPOINT_THRESHOLD) -> Box | None:
    """The person box a rect (first) or keypoints source gives, or None when neither is given."""
    if rect is not None:
        return _as_rect(rect, name)
    if keypoints is not None:
        return box_from_keypoints(_as_keypoints(keypoints, name, threshold))
    return None


def _person_region(
    image: DecodedImage,
    name: str,
    mask: object,
    rect: object,
    keypoints: object,
    person_mask: np.ndarray | None,
    threshold: float,
    max_pixels: int,
) -> tuple[Box, np.ndarray | None, str, str | None]:
    """Pick the person box and mask from the highest-priority source given.

    Returns (box, weight, box_source, mask_source): weight is the (H, W) person mask used to
    replace the background (bool, float32 in [0, 1], or the decoded alpha, see `_unit_scale`), or
    None to keep it. Priority: a mask, the alpha (not when fully opaque), then the box of a rect,
    keypoints or the found person's mask (in that order) with the found person's mask, if any, as
    the weight. Lower priority sources are not read.
    """
    height, width = image.rgb.shape[:2]
    if mask is not None:
        if isinstance(mask, np.ndarray):
            mask_name, person = f"mask for {name}", mask != 0
        else:
            mask_name = source_name(mask, None, default=f"mask for {name}")
            person = load_mask(mask, mask_name, max_pixels=max_pixels)
        if person.shape != (height, width):
            raise InputError(
                f"{mask_name}: mask is {person.shape[1]}x{person.shape[0]} but image {name} "
                f"is {width}x{height}"
            )
        box = box_from_mask(person)
        if box is None:
            raise InputError(f"{mask_name}: mask for {name} is empty (all zero): no person")
        return box, person, "mask", "mask"

    if alpha_is_mask(image):
        box = box_from_mask(image.alpha > ALPHA_BOX_THRESHOLD * _unit_scale(image.alpha))
        if box is None:
            raise InputError(f"{name}: alpha channel is (almost) fully transparent: no person")
        return box, image.alpha, "alpha", "alpha"

    if person_mask is not None and person_mask.shape != (height, width):
        raise ValueError(f"{name}: person_mask is {person_mask.shape}, the image is {(height, width)}")
    mask_source = None if person_mask is None else "person"
    box = sidecar_box(rect, keypoints, name, threshold)
    if box is not None:
        return box, person_mask, "rect" if rect is not None else "keypoints", mask_source
    if person_mask is not None:
        box = box_from_mask(person_mask > 0.5)
        if box is None:
            raise InputError(f"{name}: the found person's mask is empty: no person")
        return box, person_mask, "person", mask_source

    alpha_note = "a fully opaque alpha channel" if image.alpha is not None else "no alpha channel"
    raise InputError(
        f"{name}: no person box: the image has {alpha_note} and no mask, rect or keypoints "
        f"was given (e.g. NAME_mask.png, NAME_rect.txt or NAME_keypoints.json beside it)"
    )


# --------------------------------------------------------------------------- crop


def square_crop(box: Box, *, margin: float, image_width: int, image_height: int, size: int) -> Crop:
    """The square of side ceil(margin x the box's larger side), centred on the box.

    Corners are rounded to whole pixels; the square may run past the image.
    """
    side = max(1, math.ceil(margin * max(box.width, box.height) - 1e-9))
    cx, cy = box.centre
    x0 = math.floor(cx - side / 2 + 0.5)
    y0 = math.floor(cy - side / 2 + 0.5)
    return Crop(x0, y0, side, size, image_width, image_height)


def _cut_square(plane: np.ndarray | None, crop: Crop, fill: float) -> np.ndarray:
    """(H, W) decoded plane -> (side, side) float32 copy of the square in [0, 1], `fill` outside the image.

    Only the square is converted to float (see `_unit_scale`). plane None stands for an
    all-ones image (the "inside the image" mask).
    """
    canvas = np.full((crop.side, crop.side), fill, dtype=np.float32)
    x_lo, x_hi = max(crop.x0, 0), min(crop.x0 + crop.side, crop.image_width)
    y_lo, y_hi = max(crop.y0, 0), min(crop.y0 + crop.side, crop.image_height)
    if x_lo < x_hi and y_lo < y_hi:
        inside = canvas[y_lo - crop.y0 : y_hi - crop.y0, x_lo - crop.x0 : x_hi - crop.x0]
        if plane is None:
            inside[...] = 1.0
        else:
            inside[...] = plane[y_lo:y_hi, x_lo:x_hi]
            scale = _unit_scale(plane)
            if scale != 1.0:
                inside /= scale
    return canvas


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, L, L) images -> (B, C, size, size): bilinear, pixel-area aligned
    (align_corners=False), antialiased when shrinking; unchanged when already that size."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=images.shape[-1] > size)


def _resize(canvas: np.ndarray, size: int) -> torch.Tensor:
    """(L, L) -> (size, size), bilinear, antialiased when shrinking.

    Pixel-area aligned (align_corners=False): resized pixel k's centre is at
    (k + 0.5) * L / size in the square's continuous coordinates.
    """
    tensor = torch.from_numpy(canvas)[None, None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0]


def _render(
    rgb: np.ndarray, weight: np.ndarray | None, crop: Crop, sizes: Sequence[int]
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Cut, composite, resize and scale; memory O(side^2), not O(H W).

    On the square, each channel becomes w * rgb + (1 - w) * 0.5, where w is the
    person mask (weight), or 1 inside the image when there is none, and 0
    outside the image. The result is resized to each size, scaled to [-1, 1],
    and set to exactly 0 where the resized w is 0.
    Returns ({S: (3, S, S)}, the resized w as (1, crop.size, crop.size)).
    """
    w_square = _cut_square(weight, crop, 0.0)
    w_resized = {size: _resize(w_square, size) for size in sizes}

    channels: dict[int, list[torch.Tensor]] = {size: [] for size in sizes}
    for c in range(3):
        square = _cut_square(rgb[..., c], crop, BACKGROUND)
        square = w_square * square + (1 - w_square) * BACKGROUND
        for size in sizes:
            channels[size].append(_resize(square, size))

    images = {}
    for size in sizes:
        image = (torch.stack(channels[size]) * 2 - 1).clamp_(-1, 1)
        images[size] = torch.where(w_resized[size] > 0, image, torch.zeros(()))
    mask = w_resized[crop.size].clamp(0, 1)[None]
    return images, mask


# ------------------------------------------------------------------------- frames


def world_to_pixel(points: np.ndarray, crop: Crop) -> np.ndarray:
    """Network world points (..., 3) -> user-frame points (..., 3), float64.

    User frame: x right, y up, z toward the camera, one unit = one original
    pixel, origin at the original image's bottom-left corner; pixel (i, j)
    (column, row from the top) has its centre at (i + 0.5, H - j - 0.5).
    With s = crop.pixels_per_unit and h = crop.half_pixel:
        x = x0 + h + (x_w + 1) s,   y = H - (y0 + h + (1 - y_w) s),   z = z_w s.
    Accepts anything np.asarray takes (e.g. a CPU tensor).
    """
    points = np.asarray(points, dtype=np.float64)
    s, h = crop.pixels_per_unit, crop.half_pixel
    u = crop.x0 + h + (points[..., 0] + 1) * s
    v = crop.y0 + h + (1 - points[..., 1]) * s  # y_ndc = -y_w
    return np.stack([u, crop.image_height - v, points[..., 2] * s], axis=-1)


def pixel_to_world(points: np.ndarray, crop: Crop) -> np.ndarray:
    """Inverse of `world_to_pixel`: user-frame (..., 3) -> network world (..., 3), float64."""
    points = np.asarray(points, dtype=np.float64)
    s, h = crop.pixels_per_unit, crop.half_pixel
    u = points[..., 0]
    v = crop.image_height - points[..., 1]
    x_w = (u - crop.x0 - h) / s - 1
    y_w = 1 - (v - crop.y0 - h) / s
    return np.stack([x_w, y_w, points[..., 2] / s], axis=-1)


# -------------------------------------------------------------------- entry points


def _check_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in sizes)
    if not sizes or any(s < 2 for s in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes must be distinct integers >= 2, got {sizes}")
    return sizes


def prepare_input(
    image_source: ImageSource | DecodedImage,
    *,
    name: str | None = None,
    mask: ImageSource | np.ndarray | None = None,
    rect: Box | Sequence[float] | ImageSource | None = None,
    keypoints: np.ndarray | ImageSource | None = None,
    person_mask: np.ndarray | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    margin: float = DEFAULT_MARGIN,
    keypoint_threshold: float = DEFAULT_KEYPOINT_THRESHOLD,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedImage:
    """Decode an image and turn it into the network's inputs.

    image_source: path, bytes, or an image already decoded by `load_image`.
    name: for messages (default: the path).
    Person box, first given source wins (the others are not read):
      mask: a mask image (path/bytes, any mode, nonzero = person) or an (H, W) array;
      the image's alpha channel (unless fully opaque);
      rect: a Box, an (x, y, w, h) sequence in pixels, or a rect file (path/bytes);
      keypoints: a (K, 2) / (K, 3) array in pixel indices, or an OpenPose JSON (path/bytes);
      person_mask: an (H, W) float mask in [0, 1] of a found person (`model.person`): its box.
    The crop side is margin x the box's larger side. With a mask/alpha, or a
    person_mask under a rect/keypoints box, the background becomes 0 (grey); with
    a rect/keypoints alone the photo's background is kept and only the padding
    outside the image is 0.

    Raises InputError (bad file, no usable person box), ValueError (bad sizes/margin).
    """
    sizes = _check_sizes(sizes)
    if not margin > 0:
        raise ValueError(f"margin must be positive, got {margin}")
    if isinstance(image_source, DecodedImage):
        name, image = name or "<image>", image_source
    else:
        name = source_name(image_source, name)
        image = decode_image(open_image(image_source, name, max_pixels))
    height, width = image.rgb.shape[:2]

    box, weight, box_source, mask_source = _person_region(
        image, name, mask, rect, keypoints, person_mask, keypoint_threshold, max_pixels
    )
    if not box.intersects(width, height):
        raise InputError(f"{name}: the person box ({box_source}) lies outside the {width}x{height} image")

    crop = square_crop(box, margin=margin, image_width=width, image_height=height, size=max(sizes))
    images, crop_mask = _render(image.rgb, weight, crop, sizes)
    return PreparedImage(
        name=name,
        images=images,
        mask=crop_mask,
        crop=crop,
        rgb=image.rgb,
        person_box=box,
        box_source=box_source,
        mask_source=mask_source,
    )


def prepare_image_file(
    path: str | os.PathLike,
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    margin: float = DEFAULT_MARGIN,
    keypoint_threshold: float = DEFAULT_KEYPOINT_THRESHOLD,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedImage:
    """`prepare_input` for a file on disk, with its sidecars found by `find_sidecars`."""
    sidecars = find_sidecars(path)
    return prepare_input(
        path,
        name=os.fspath(path),
        mask=sidecars.mask,
        rect=sidecars.rect,
        keypoints=sidecars.keypoints,
        sizes=sizes,
        margin=margin,
        keypoint_threshold=keypoint_threshold,
        max_pixels=max_pixels,
    )
