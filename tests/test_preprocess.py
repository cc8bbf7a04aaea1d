"""model/image (decoding, person boxes, sidecars), model/reconstruction/preprocess.py (crops) and the crop frames of model/geometry.py; files generated in tmp_path."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from model.errors import InputError
from model.image.boxes import Box
from model.geometry import Crop, pixel_to_world, world_to_pixel
from model.image.sidecars import find_sidecars, is_sidecar, parse_keypoints, parse_rect
from model.image.decode import load_image, load_mask
from model.reconstruction.preprocess import prepare_image_file, prepare_input

SMALL = (32, 64)  # input sizes for most tests: fast, same code path as (512, 1024)
RED = (230, 20, 20)
BACKDROP = (20, 220, 40)


# ------------------------------------------------------------------------ helpers


def figure_mask(width: int = 120, height: int = 200) -> Image.Image:
    """A person-like silhouette (head, torso, legs) in mode L: 255 = person."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    draw.ellipse((50, 20, 70, 44), fill=255)  # head: rows 20..44
    draw.rectangle((42, 45, 78, 120), fill=255)  # torso
    draw.rectangle((44, 121, 58, 180), fill=255)  # legs: down to row 180
    draw.rectangle((62, 121, 76, 180), fill=255)
    return mask


def photo(width: int = 120, height: int = 200) -> Image.Image:
    """An RGB 'photo': red figure over a green backdrop."""
    image = Image.new("RGB", (width, height), BACKDROP)
    image.paste(Image.new("RGB", (width, height), RED), mask=figure_mask(width, height))
    return image


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG made of a valid signature and IHDR claiming width x height, then IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def check_tensors(prepared, sizes=SMALL) -> None:
    assert set(prepared.images) == set(sizes)
    for size, image in prepared.images.items():
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert torch.isfinite(image).all()
        assert image.min() >= -1 and image.max() <= 1
    big = max(sizes)
    assert prepared.mask.shape == (1, big, big) and prepared.mask.dtype == torch.float32
    assert prepared.mask.min() >= 0 and prepared.mask.max() <= 1
    assert prepared.crop.size == big


def expect_input_error(match_name: str, cause: str, fn, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert match_name in message, message
    assert cause.lower() in message.lower(), message
    return message


def sample_world(image: torch.Tensor, world_xy: np.ndarray) -> np.ndarray:
    """Sample (3, S, S) at world (x, y) points with align_corners=True -> (N, 3)."""
    grid = torch.tensor(np.stack([world_xy[:, 0], -world_xy[:, 1]], axis=-1), dtype=torch.float32)
    out = F.grid_sample(image[None], grid[None, None], mode="bilinear", align_corners=True)
    return out[0, :, 0].T.numpy()


# ------------------------------------------------------------------ person boxes


def test_rgba_figure_with_default_sizes(tmp_path):
    image = photo().convert("RGBA")
    image.putalpha(figure_mask())
    prepared = prepare_image_file(save(image, tmp_path / "person.png"))

    check_tensors(prepared, sizes=(512, 1024))
    assert prepared.box_source == "alpha" and prepared.has_segmentation
    assert prepared.person_box == Box(42, 20, 79, 181)
    assert prepared.original_size == (200, 120) and prepared.rgb.shape == (200, 120, 3)
    assert prepared.crop.side == int(np.ceil(1.2 * 161))
    assert torch.all(prepared.images[1024][:, prepared.mask[0] == 0] == 0)  # background exactly grey
    assert torch.all(prepared.images[512][:, :40, :40] == 0)
    # the person (red) fills the centre of the crop
    centre = prepared.images[1024][:, 512, 512]
    assert centre[0] > 0.7 and centre[1] < -0.7 and centre[2] < -0.7


def test_separate_mask_overrides_alpha_and_blanks_background(tmp_path):
    image = save(photo(), tmp_path / "a.jpg", quality=95)
    save(figure_mask(), tmp_path / "a_mask.png")
    prepared = prepare_image_file(image, sizes=SMALL)

    check_tensors(prepared)
    assert prepared.box_source == "mask"
    assert prepared.person_box == Box(42, 20, 79, 181)
    out = prepared.images[64]
    assert torch.all(out[:, prepared.mask[0] == 0] == 0)
    # the green backdrop is gone: no strongly green pixel left
    assert not torch.any((out[1] > 0.5) & (out[0] < -0.5))


def test_mask_array_and_bytes_sources():
    data = io.BytesIO()
    photo().save(data, format="PNG")
    mask = np.asarray(figure_mask()) > 0
    prepared = prepare_input(data.getvalue(), name="s3://bucket/p.png", mask=mask, sizes=SMALL)
    assert prepared.name == "s3://bucket/p.png" and prepared.box_source == "mask"
    mask_bytes = io.BytesIO()
    figure_mask().convert("RGB").save(mask_bytes, format="PNG")
    again = prepare_input(data.getvalue(), name="p.png", mask=mask_bytes.getvalue(), sizes=SMALL)
    assert again.crop == prepared.crop


def test_rect_keeps_photo_background_and_pads_grey(tmp_path):
    image = save(photo(), tmp_path / "r.png")
    (tmp_path / "r_rect.txt").write_text("40 10 40 190\n")  # runs to the bottom edge
    prepared = prepare_image_file(image, sizes=SMALL)

    check_tensors(prepared)
    assert prepared.box_source == "rect" and not prepared.has_segmentation
    assert prepared.person_box == Box(40, 10, 80, 200)
    crop = prepared.crop
    assert crop.y0 + crop.side > 200  # the square runs past the image bottom
    out = prepared.images[64]
    # inside the image the green backdrop is kept ...
    assert torch.any((out[1] > 0.5) & (out[0] < -0.5))
    # ... and the rows below the image are grey
    assert torch.all(out[:, -1, :] == 0)
    assert prepared.mask[0, -1].max() == 0 and prepared.mask[0, 32, 32] == 1


def test_keypoints_body25_largest_person(tmp_path):
    image = save(photo(), tmp_path / "k.png")
    joints = np.zeros((25, 3))
    joints[:, 0] = np.linspace(45, 75, 25)
    joints[:, 1] = np.linspace(30, 175, 25)
    joints[:, 2] = 0.9
    joints[3] = (500, 900, 0.1)  # unconfident outlier: ignored
    small = np.zeros((18, 3))
    small[:, :2] = (5, 5)
    small[0] = (9, 12, 0.8)
    small[1] = (5, 5, 0.8)
    people = [{"pose_keypoints_2d": small.ravel().tolist()}, {"pose_keypoints_2d": joints.ravel().tolist()}]
    (tmp_path / "k_keypoints.json").write_text(json.dumps({"version": 1.3, "people": people}))
    prepared = prepare_image_file(image, sizes=SMALL)

    check_tensors(prepared)
    assert prepared.box_source == "keypoints"
    box = prepared.person_box
    # the body box is larger than the joints' box (joints lie inside the body)
    assert box.x0 < 45.5 and box.x1 > 75.5 and box.y0 < 30.5 and box.y1 > 175.5
    assert box.height < 1.2 * 145
    crop = prepared.crop
    assert crop.x0 <= box.x0 and crop.y0 <= box.y0
    assert crop.x0 + crop.side >= box.x1 and crop.y0 + crop.side >= box.y1


def test_priority_mask_then_alpha_then_rect_then_keypoints(tmp_path):
    rgba = photo().convert("RGBA")
    rgba.putalpha(figure_mask())
    path = save(rgba, tmp_path / "p.png")
    joints = [[30, 20, 0.9], [80, 180, 0.9]] + [[0, 0, 0.0]] * 16
    keypoints = json.dumps({"people": [{"pose_keypoints_2d": sum(joints, [])}]}).encode()
    kwargs = dict(sizes=SMALL, rect=(0, 0, 10, 10), keypoints=b"not even json")
    mask_file = save(figure_mask(), tmp_path / "m.png")
    assert prepare_input(path, mask=mask_file, **kwargs).box_source == "mask"
    assert prepare_input(path, **kwargs).box_source == "alpha"  # lower sources are never read
    opaque = save(photo().convert("RGBA"), tmp_path / "opaque.png")  # alpha all 255 = no alpha
    assert prepare_input(opaque, **kwargs).box_source == "rect"
    assert prepare_input(opaque, keypoints=keypoints, sizes=SMALL).box_source == "keypoints"


# ------------------------------------------------------------------------ decoding


def test_sixteen_bit_greyscale(tmp_path):
    ramp = (np.arange(60 * 40, dtype=np.uint32).reshape(60, 40) * 27).astype(np.uint16)
    ramp[0, 0] = 65535
    path = save(Image.fromarray(ramp), tmp_path / "grey16.png")
    decoded = load_image(path)
    assert decoded.rgb.shape == (60, 40, 3) and decoded.rgb.dtype == np.float32 and decoded.alpha is None
    np.testing.assert_allclose(decoded.rgb[..., 1], ramp / 65535.0, atol=1e-6)
    assert decoded.rgb.max() == 1.0
    check_tensors(prepare_input(path, rect=(5, 5, 30, 50), sizes=SMALL))


def test_palette_with_transparency(tmp_path):
    palette_image = photo().quantize(colors=4)
    background_index = palette_image.getpixel((0, 0))
    path = save(palette_image, tmp_path / "pal.png", transparency=background_index)
    assert Image.open(path).mode == "P"
    decoded = load_image(path)
    assert decoded.alpha is not None
    assert decoded.alpha[0, 0] == 0 and decoded.alpha[100, 60] == 1
    prepared = prepare_input(path, sizes=SMALL)
    assert prepared.box_source == "alpha" and prepared.person_box == Box(42, 20, 79, 181)


@pytest.mark.parametrize(
    ("mode", "alpha"),
    [("L", False), ("LA", True), ("CMYK", False), ("1", False), ("I", False), ("RGBA", True)],
)
def test_modes_decode_to_rgb_in_unit_range(tmp_path, mode, alpha):
    image = photo().convert("RGBA") if mode == "RGBA" else photo().convert(mode)
    suffix = "tiff" if mode in ("CMYK", "I") else "png"
    decoded = load_image(save(image, tmp_path / f"img.{suffix}"))
    assert decoded.rgb.shape == (200, 120, 3) and decoded.rgb.dtype == np.float32
    assert 0 <= decoded.rgb.min() and decoded.rgb.max() <= 1
    assert (decoded.alpha is not None) == alpha


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95)
    rgb = load_image(path).rgb
    assert rgb.shape == (40, 20, 3)  # portrait once oriented
    assert rgb[5, 10, 0] > 0.8 and rgb[5, 10, 2] < 0.2  # stored left -> displayed top
    assert rgb[35, 10, 2] > 0.8 and rgb[35, 10, 0] < 0.2


@pytest.mark.parametrize(
    ("width", "height", "rect"),
    [(2000, 30, (900, 2, 40, 26)), (30, 1500, (2, 100, 26, 900)), (3, 5, (1, 1, 1, 3))],
)
def test_extreme_aspect_and_tiny_images(tmp_path, width, height, rect):
    path = save(Image.new("RGB", (width, height), RED), tmp_path / "odd.png")
    prepared = prepare_input(path, rect=rect, sizes=SMALL)
    check_tensors(prepared)
    assert prepared.crop.side == int(np.ceil(1.2 * max(rect[2:])))


def test_tiny_rgba(tmp_path):
    tiny = Image.new("RGBA", (2, 3), (0, 0, 0, 0))
    tiny.putpixel((1, 1), (255, 0, 0, 255))
    prepared = prepare_input(save(tiny, tmp_path / "tiny.png"), sizes=SMALL)
    check_tensors(prepared)
    assert prepared.crop.side == 2 and prepared.images[64].abs().max() > 0.9


# -------------------------------------------------------------------------- errors


def test_decoding_errors_name_the_file_and_cause(tmp_path):
    data = io.BytesIO()
    photo().save(data, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    expect_input_error("truncated.png", "truncated", load_image, truncated)

    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n")
    expect_input_error("notes.png", "not an image", load_image, text)

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    expect_input_error("empty.png", "empty", load_image, empty)
    expect_input_error("from-s3.jpg", "empty", load_image, b"", name="from-s3.jpg")

    expect_input_error("missing.png", "cannot read", load_image, tmp_path / "missing.png")

    garbled = bytearray(data.getvalue())
    start = garbled.find(b"IDAT") + 4
    garbled[start + 2 : start + 22] = bytes(b ^ 0x5A for b in garbled[start + 2 : start + 22])
    expect_input_error("garbled.png", "corrupt image data", load_image, bytes(garbled), name="garbled.png")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(100_000, 100_000))  # 10 gigapixels: PIL's own guard
    expect_input_error("huge.png", "decompression bomb", load_image, huge)
    large = tmp_path / "large.png"
    large.write_bytes(png_header(12_000, 10_000))  # 120 MP: above our 100 MP default
    expect_input_error("large.png", "too many pixels", load_image, large)
    small = save(photo(), tmp_path / "small.png")
    expect_input_error("small.png", "limit of 1000", load_image, small, max_pixels=1000)
    expect_input_error("small.png", "limit of 1000", prepare_input, small, rect=(0, 0, 5, 5), max_pixels=1000)


def test_box_errors_name_the_file_and_cause(tmp_path):
    image = save(photo(), tmp_path / "pic.png")
    expect_input_error("pic.png", "no person box", prepare_image_file, image)

    save(Image.new("L", (120, 200), 0), tmp_path / "pic_mask.png")
    expect_input_error("pic_mask.png", "all zero", prepare_image_file, image)

    save(Image.new("L", (50, 50), 255), tmp_path / "wrong_mask.png")
    expect_input_error("wrong_mask.png", "50x50", prepare_input, image, mask=tmp_path / "wrong_mask.png")

    transparent = save(Image.new("RGBA", (20, 20), (9, 9, 9, 0)), tmp_path / "clear.png")
    expect_input_error("clear.png", "transparent", prepare_input, transparent)

    expect_input_error("pic.png", "outside", prepare_input, image, rect=(500, 500, 10, 10))


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("10 20 30", "expected 4 values"),
        ("10 20 30 40 50", "expected 4 values"),
        ("10 20 -30 40", "positive"),
        ("10 20 30 0", "positive"),
        ("a b c d", "not a number"),
        ("\n# nothing\n", "no rectangle"),
    ],
)
def test_malformed_rect(tmp_path, text, cause):
    path = tmp_path / "x_rect.txt"
    path.write_text(text)
    expect_input_error("x_rect.txt", cause, parse_rect, path)
    save(photo(), tmp_path / "x.png")
    expect_input_error("x_rect.txt", cause, prepare_image_file, tmp_path / "x.png")


def test_rect_parsing():
    assert parse_rect(b"10, 20, 30, 40\n") == Box(10, 20, 40, 60)
    assert parse_rect(b"0 0 5 5\n10 20 30 40\n") == Box(10, 20, 40, 60)  # the largest


@pytest.mark.parametrize(
    ("document", "cause"),
    [
        ("{not json", "not valid json"),
        ("[]", "no \"people\""),
        ('{"people": []}', "no person"),
        ('{"people": [{"pose_keypoints_2d": [1, 2, 0.9, 3, 4]}]}', "5 keypoint values"),
        ('{"people": [{"pose_keypoints_2d": ' + json.dumps([1, 2, 0.9] * 24) + "}]}", "72 keypoint values"),
        ('{"people": [{"pose_keypoints_2d": ' + json.dumps([1, 2, 0.1] * 25) + "}]}", "confident"),
        ('{"people": [{"face_keypoints_2d": []}]}', "pose_keypoints_2d"),
        ('{"people": [{"pose_keypoints_2d": ' + json.dumps(["a", 2, 0.9] * 18) + "}]}", "not numbers"),
    ],
)
def test_malformed_keypoints(tmp_path, document, cause):
    path = tmp_path / "y_keypoints.json"
    path.write_text(document)
    expect_input_error("y_keypoints.json", cause, parse_keypoints, path)
    save(photo(), tmp_path / "y.png")
    expect_input_error("y_keypoints.json", cause, prepare_image_file, tmp_path / "y.png")


def test_keypoint_parsing_coco18_threshold():
    values = np.zeros((18, 3))
    values[:, :2] = np.arange(36).reshape(18, 2)
    values[:, 2] = np.where(np.arange(18) % 2, 0.9, 0.2)  # 0.2 itself is not above the threshold
    points = parse_keypoints(json.dumps({"people": [{"pose_keypoints_2d": values.ravel().tolist()}]}).encode())
    np.testing.assert_array_equal(points, values[1::2, :2])


# ------------------------------------------------------------------------ sidecars


def test_find_sidecars_naming(tmp_path):
    image = tmp_path / "IMG_0001.jpg"
    assert find_sidecars(image).mask is None and find_sidecars(image).rect is None
    (tmp_path / "IMG_0001_mask.PNG").write_bytes(b"x")
    (tmp_path / "IMG_0001_rect.txt").write_text("1 2 3 4")
    (tmp_path / "IMG_0001_keypoints.json").write_text("{}")
    (tmp_path / "IMG_0002_mask.png").write_bytes(b"x")
    found = find_sidecars(image)
    assert found.mask == tmp_path / "IMG_0001_mask.PNG"
    assert found.rect == tmp_path / "IMG_0001_rect.txt"
    assert found.keypoints == tmp_path / "IMG_0001_keypoints.json"
    assert is_sidecar(found.mask) and is_sidecar(found.rect) and is_sidecar(found.keypoints)
    assert not is_sidecar(image) and not is_sidecar(tmp_path / "mask.png")


def test_load_mask_any_mode_nonzero_is_person(tmp_path):
    values = np.zeros((10, 12), dtype=np.uint8)
    values[2:5, 3:9] = 1  # a 0/1 mask (nonzero, not 255)
    assert load_mask(save(Image.fromarray(values), tmp_path / "m.png")).sum() == 18
    palette = Image.fromarray(values * 255).convert("P")
    assert load_mask(save(palette, tmp_path / "p.png")).sum() == 18


# -------------------------------------------------------------------------- frames


def test_frame_round_trip_and_conventions():
    crop = Crop(x0=-37, y0=12, side=301, size=1024, image_width=250, image_height=400)
    rng = np.random.default_rng(0)
    world = rng.uniform(-1.2, 1.2, size=(200, 3))
    np.testing.assert_allclose(pixel_to_world(world_to_pixel(world, crop), crop), world, atol=1e-12)
    pixels = rng.uniform(0, 400, size=(50, 3))
    np.testing.assert_allclose(world_to_pixel(pixel_to_world(pixels, crop), crop), pixels, atol=1e-9)

    step = crop.side / crop.size  # original pixels per resized pixel
    corners = world_to_pixel(np.array([[-1, 1, 0], [1, -1, 0], [0, 0, 1]]), crop)
    # top-left ndc corner = centre of the first resized pixel; world y up -> small v -> large y
    np.testing.assert_allclose(corners[0, :2], [-37 + step / 2, 400 - (12 + step / 2)])
    np.testing.assert_allclose(corners[1, :2], [-37 + 301 - step / 2, 400 - (12 + 301 - step / 2)])
    np.testing.assert_allclose(corners[2, 2], crop.pixels_per_unit)  # z: same units as x
    assert world_to_pixel(torch.zeros(4, 3), crop).shape == (4, 3)


def test_mask_bounding_box_maps_to_its_pixels():
    mask = np.zeros((200, 300), dtype=bool)
    mask[40:170, 100:160] = True  # rows 40..169, columns 100..159
    image = io.BytesIO()
    Image.new("RGB", (300, 200), RED).save(image, format="PNG")
    prepared = prepare_input(image.getvalue(), name="m.png", mask=mask, sizes=(128, 256))
    crop, size = prepared.crop, 256
    rows, cols = np.nonzero(prepared.mask[0].numpy() > 0.5)
    to_ndc = lambda k: 2 * k / (size - 1) - 1  # noqa: E731  align_corners=True
    corners = np.array(
        [[to_ndc(cols.min()), -to_ndc(rows.min()), 0], [to_ndc(cols.max()), -to_ndc(rows.max()), 0]]
    )
    (left, top, _), (right, bottom, _) = world_to_pixel(corners, crop)
    tolerance = crop.side / size  # one resized pixel, in original pixels
    # user frame: x = u, y = H - v; the mask spans u in [100, 160], v in [40, 170]
    assert abs(left - 100) <= tolerance and abs(right - 160) <= tolerance
    assert abs(top - (200 - 40)) <= tolerance and abs(bottom - (200 - 170)) <= tolerance


def test_pixel_centres_sample_their_own_colour():
    """End to end: a pixel's centre, mapped to world, samples that pixel in the crop."""
    blocks = np.kron(np.random.default_rng(1).uniform(0, 1, (8, 6, 3)), np.ones((25, 25, 1)))
    image = Image.fromarray((blocks * 255).round().astype(np.uint8))  # 150 x 200, 25 px blocks
    data = io.BytesIO()
    image.save(data, format="PNG")
    prepared = prepare_input(data.getvalue(), name="b.png", rect=(0, 0, 150, 200), sizes=(256, 512))
    height = 200
    centres_ij = np.array([[12, 12], [137, 187], [62, 112], [87, 37]])  # block centres (column, row)
    user = np.stack([centres_ij[:, 0] + 0.5, height - centres_ij[:, 1] - 0.5, np.zeros(4)], axis=1)
    world = pixel_to_world(user, prepared.crop)
    sampled = (sample_world(prepared.images[512], world[:, :2]) + 1) / 2
    expected = blocks[centres_ij[:, 1], centres_ij[:, 0]]
    np.testing.assert_allclose(sampled, expected, atol=0.02)


def test_one_sidecar_rule_for_local_files_and_uris(tmp_path):
    from model.image.sidecars import match_sidecars, sidecar_index
    from pipelines.common.inputs import list_inputs

    siblings = ["s3://b/in/photo.jpg", "s3://b/in/photo_mask.PNG", "s3://b/in/photo_Rect.TXT", "s3://b/in/photo2_keypoints.json"]
    assert match_sidecars("s3://b/in/photo.jpg", sidecar_index(siblings)) == {"mask": "s3://b/in/photo_mask.PNG", "rect": "s3://b/in/photo_Rect.TXT", "keypoints": None}
    for name in ("photo.jpg", "photo_mask.PNG", "photo_KEYPOINTS.json"):
        (tmp_path / name).write_bytes(b"x")
    (item,) = list_inputs([str(tmp_path)])  # the sidecars are no inputs of their own
    assert item.mask_uri.endswith("photo_mask.PNG") and item.keypoints_uri.endswith("photo_KEYPOINTS.json") and not item.rect_uri
    assert find_sidecars(tmp_path / "photo.jpg").keypoints == tmp_path / "photo_KEYPOINTS.json"


def test_an_alpha_that_outlines_nobody_is_not_a_mask():
    """A photo saved with a few transparent pixels (PIFu's sample has 45) is an opaque photo: the
    person finder, not the alpha, says where the person is; a real cut-out still counts."""
    from model.image.boxes import alpha_is_mask
    from model.image.decode import DecodedImage

    rgb = np.zeros((400, 300, 3), np.uint8)
    almost_opaque = np.full((400, 300), 255, np.uint8)
    almost_opaque.reshape(-1)[:45] = 0
    cut_out = np.zeros((400, 300), np.uint8)
    cut_out[60:380, 100:200] = 255
    assert not alpha_is_mask(DecodedImage(rgb, almost_opaque))
    assert not alpha_is_mask(DecodedImage(rgb, None))
    assert alpha_is_mask(DecodedImage(rgb, cut_out))
    assert alpha_is_mask(DecodedImage(rgb, np.zeros((400, 300), np.uint8)))  # all transparent: a mask of nobody
