"""From an image file to the network's input tensors.

Pipeline, top to bottom:

1. **Decode** (`model.image.decode`): any PIL-readable file (path or bytes) -> RGB
   and an optional alpha, EXIF orientation applied. `prepare_input` keeps the
   decoded integer pixels and converts only the crop, so a large photo costs 4
   bytes a pixel, not 16 (`_cut_square`).
2. **Person box** (`_person_region`): from, in this priority, an explicit mask
   image, the alpha channel, a rectangle (`NAME_rect.txt`), OpenPose keypoints
   (`NAME_keypoints.json`) or a found person's mask (`model.person`); see
   `model.image.sidecars`. A found person's mask also replaces the background
   under a rectangle or keypoints box.
3. **Crop** (`model.geometry.square_crop`, `_render`): a square around the box
   (side = margin x the box's larger side), background composited to 0.5 grey,
   resized to each input size, scaled to [-1, 1].
4. **Frames** (`model.geometry.world_to_pixel`, `pixel_to_world`): between the
   network's world frame and the user's pixel frame.

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

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from model.errors import InputError
from model.geometry import Crop, square_crop
from model.image.boxes import ALPHA_BOX_THRESHOLD, DEFAULT_KEYPOINT_THRESHOLD, Box, alpha_is_mask, box_from_mask
from model.image.decode import DEFAULT_MAX_PIXELS, DecodedImage, ImageSource, decode_image, load_mask, open_image, source_name, unit_scale
from model.image.sidecars import find_sidecars, sidecar_box

log = logging.getLogger(__name__)


DEFAULT_SIZES: tuple[int, ...] = (512, 1024)
DEFAULT_MARGIN = 1.2  # crop side / the person box's larger side
BACKGROUND = 0.5  # grey in [0, 1]; 0 after scaling to [-1, 1]


# --------------------------------------------------------------------------- types


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
        body-guided models (`model.reconstruction.body_guidance`); None when none was fitted.
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


# ---------------------------------------------------------------------- person box


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
    replace the background (bool, float32 in [0, 1], or the decoded alpha, see `unit_scale`), or
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
        box = box_from_mask(image.alpha > ALPHA_BOX_THRESHOLD * unit_scale(image.alpha))
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


def _cut_square(plane: np.ndarray | None, crop: Crop, fill: float) -> np.ndarray:
    """(H, W) decoded plane -> (side, side) float32 copy of the square in [0, 1], `fill` outside the image.

    Only the square is converted to float (see `unit_scale`). plane None stands for an
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
            scale = unit_scale(plane)
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
