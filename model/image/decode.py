"""Image files (a path or bytes) -> pixels: RGB and an optional alpha, EXIF orientation applied.

`load_image` gives float32 (H, W, 3) in [0, 1]; `open_image` + `decode_image` keep 8-bit photos
as uint8, so a large photo costs 4 bytes a pixel until its crop is converted (`as_float`). Every
decoder refuses more than `max_pixels` pixels (a decompression bomb) with an InputError naming the file.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.errors import InputError

log = logging.getLogger(__name__)


ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]
"""A file path, or the file's bytes (e.g. read from object storage)."""


DEFAULT_MAX_PIXELS = 100_000_000  # decompression-bomb guard: width * height


class DecodedImage(NamedTuple):
    """rgb: (H, W, 3), alpha: (H, W) or None; from `load_image` float32 in [0, 1],
    from `decode_image` as decoded (uint8 / uint16 scaled by their maximum, see `unit_scale`)."""

    rgb: np.ndarray
    alpha: np.ndarray | None


def is_bytes(source: object) -> bool:
    return isinstance(source, (bytes, bytearray, memoryview))


def source_name(source: object, name: str | None, default: str = "<bytes>") -> str:
    if name is not None:
        return name
    return default if is_bytes(source) else os.fspath(source)  # type: ignore[arg-type]


def read_bytes(source: ImageSource, name: str) -> bytes:
    """The file's content; InputError if unreadable or empty."""
    if is_bytes(source):
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
    data = read_bytes(source, name)
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


def unit_scale(values: np.ndarray) -> float:
    """What a decoded array is divided by to lie in [0, 1]: its integer maximum, else 1."""
    return float(np.iinfo(values.dtype).max) if values.dtype.kind in "ui" else 1.0


def as_float(values: np.ndarray) -> np.ndarray:
    """A decoded array as float32 in [0, 1] (a contiguous copy)."""
    out = np.array(values, dtype=np.float32)
    scale = unit_scale(values)
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
