"""The person finder (model/person) and its use in bulk jobs, on the project's own synthetic renders
composited onto procedural backgrounds (real renders, real networks, real local Ray and S3)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import s3fs
from PIL import Image

from model.errors import InputError
from model.data.humans import POSE_FAMILIES, make_subject
from model.body.anny import load_body_model
from model.person import PersonFinder, PersonFinderConfig
from model.reconstruction.people import PersonOptions, prepare_people
from model.image.decode import load_image
from model.reconstruction.reconstruct import ReconstructionConfig
from model.render import Renderer, View
from model.data.scenes import procedural_background, random_lighting
from pipelines.jobs.bulk import BulkConfig, initial_rows, run_bulk
from pipelines.jobs.bulk_stages import InputPreparer
from pipelines.common.formats import read_manifest
from pipelines.common.inputs import list_inputs
from tests.helpers import write_tiny_checkpoint

RESOLUTION = 64


@pytest.fixture(scope="module")
def finder() -> PersonFinder:
    return PersonFinder()


@pytest.fixture(scope="module")
def renders() -> list[tuple[np.ndarray, np.ndarray]]:
    """Eight synthetic people (every pose family, random yaw all round), each (rgb uint8 (512, 512, 3)
    on black, alpha float32 (512, 512) in [0, 1])."""
    load_body_model()
    renderer = Renderer(512)
    rng = np.random.default_rng(5)
    out = []
    try:
        for index in range(8):
            subject = make_subject(f"finder-{index}", 300 + index, family=POSE_FAMILIES[index % len(POSE_FAMILIES)])
            view = View(float(rng.uniform(0, 360)), float(rng.uniform(-5, 5)))
            image = renderer.render(subject.parts, view, random_lighting(rng), None)
            out.append((image.rgb, image.mask.astype(np.float32) / 255))
    finally:
        renderer.release()
    return out


def composite(rng: np.random.Generator, shape: tuple[int, int], people: list[tuple[np.ndarray, np.ndarray, float, float, float]]):
    """Paste renders onto a procedural background of (H, W).

    people: (rgb, alpha, height fraction of the image, centre x fraction, top y fraction).
    Returns (uint8 (H, W, 3) photo, [(H, W) bool ground-truth mask per person]).
    """
    height, width = shape
    photo = procedural_background(rng, max(shape))[:height, :width].astype(np.float32) / 255
    masks = []
    for rgb, alpha, fraction, centre_x, top_y in people:
        side = int(round(fraction * height))
        scaled_rgb = np.asarray(Image.fromarray(rgb).resize((side, side), Image.BILINEAR), np.float32) / 255
        scaled_alpha = np.asarray(Image.fromarray(alpha).resize((side, side), Image.BILINEAR))[..., None]
        x, y = int(centre_x * width - side / 2), int(top_y * height)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + side, width), min(y + side, height)
        src = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
        a = scaled_alpha[src]
        photo[y0:y1, x0:x1] = scaled_rgb[src] * a + photo[y0:y1, x0:x1] * (1 - a)
        mask = np.zeros(shape, bool)
        mask[y0:y1, x0:x1] = a[..., 0] > 0.5
        masks.append(mask)
    return (np.clip(photo, 0, 1) * 255 + 0.5).astype(np.uint8), masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def mask_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], float)


def jpeg(photo: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


# ---- the finder ------------------------------------------------------------------------------


def test_masks_and_boxes_match_the_renderer(finder, renders):
    rng = np.random.default_rng(11)
    shapes = [(640, 480), (480, 640), (512, 512), (900, 700)]
    ious, box_errors = [], []
    for index, (rgb, alpha) in enumerate(renders):
        shape = shapes[index % len(shapes)]
        photo, [truth] = composite(rng, shape, [(rgb, alpha, rng.uniform(0.65, 0.9), rng.uniform(0.35, 0.65), rng.uniform(0.02, 0.1))])
        people = finder.find(photo if index % 2 else photo.astype(np.float32) / 255)  # uint8 and float input
        assert len(people) == 1, (index, [p.score for p in people])
        person = people[0]
        assert person.mask_soft.shape == shape and person.mask.dtype == bool and 0.5 <= person.score <= 1
        ious.append(iou(person.mask, truth))
        box = np.array([person.box.x0, person.box.y0, person.box.x1, person.box.y1])
        box_errors.append(np.abs(box - mask_box(truth)).max() / max(shape))
        # Landmarks: in pixels, on the person (the body's joints lie inside its box, grown by 5 %).
        assert person.landmarks.shape == (33, 3) and person.world_landmarks.shape == (33, 3)
        low, high = mask_box(truth)[:2], mask_box(truth)[2:]
        grow = 0.05 * (high - low).max()
        inside = ((person.landmarks[:, :2] >= low - grow) & (person.landmarks[:, :2] <= high + grow)).all(axis=1)
        assert inside.mean() >= 0.9, (index, inside.mean())
        assert 0 <= person.landmarks[:, 2].min() and person.landmarks[:, 2].max() <= 1
        # World landmarks: metres, origin between the hips, a body's size.
        hips = person.world_landmarks[[23, 24]].mean(axis=0)
        assert np.abs(hips).max() < 0.05, hips
        extent = np.ptp(person.world_landmarks, axis=0).max()
        assert 0.7 < extent < 2.2, extent
    assert np.mean(ious) >= 0.9 and min(ious) >= 0.8, ious
    assert max(box_errors) <= 0.03, box_errors


def test_a_turned_photo_gives_the_turned_person(finder, renders):
    """The rotated-ROI conventions: a person lying on their side (the photo turned 90 degrees) is
    found with the same mask and landmarks, turned; and is a candidate only, not a person to reconstruct."""
    rng = np.random.default_rng(3)
    photo, [truth] = composite(rng, (480, 640), [(*renders[0], 0.9, 0.5, 0.05)])
    upright = finder.find(photo)[0]
    turned_photo = np.ascontiguousarray(np.rot90(photo))  # counter-clockwise: (x, y) -> (y, W - x)
    assert finder.find(turned_photo) == []
    (turned,) = finder.find_all(turned_photo)
    assert "degrees from upright" in turned.problem
    assert iou(turned.mask, np.rot90(truth)) > 0.85
    expected = np.stack([upright.landmarks[:, 1], photo.shape[1] - upright.landmarks[:, 0]], axis=1)
    moved = np.linalg.norm(turned.landmarks[:, :2] - expected, axis=1)
    assert np.median(moved) < 0.02 * max(photo.shape), moved


def test_a_weak_detection_gets_a_second_chance(renders):
    """Where no detection reaches the detector threshold, the best one down to the second-chance
    threshold is looked at by the landmark net (a person over a busy photograph scored 0.49)."""
    rng = np.random.default_rng(6)
    photo, [truth] = composite(rng, (640, 480), [(*renders[3], 0.85, 0.5, 0.05)])
    [person] = PersonFinder(PersonFinderConfig(detection_threshold=0.999)).find(photo)
    assert person.score < 0.999 and iou(person.mask, truth) > 0.85
    assert PersonFinder(PersonFinderConfig(detection_threshold=0.999, second_chance_threshold=0.999)).find(photo) == []


def test_no_person_gives_nothing(finder):
    rng = np.random.default_rng(2)
    for size in (256, 640):
        assert finder.find(procedural_background(rng, size)) == []
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        finder.find(np.zeros((10, 10), np.uint8))


def test_a_cat_and_an_upper_body_are_no_person(finder):
    """scikit-image's cat: the landmark net draws a face on it and a small figure lying on its fur;
    its astronaut is cut at the waist. Neither is a person to reconstruct, and the error says why."""
    import skimage.data

    for photo, why in ((skimage.data.chelsea(), "no shoulders"), (skimage.data.astronaut(), "only the upper body")):
        assert finder.find(photo) == []
        assert any(why in p.problem for p in finder.find_all(photo))
        encoded = io.BytesIO()
        Image.fromarray(photo).save(encoded, format="PNG")
        with pytest.raises(InputError, match=why):
            prepare_people(load_image(encoded.getvalue(), "photo.png"), finder, PersonOptions(), name="photo.png")


def test_two_people_most_prominent_first(finder, renders):
    rng = np.random.default_rng(4)
    (rgb_a, alpha_a), (rgb_b, alpha_b) = renders[0], renders[2]
    photo, truths = composite(rng, (600, 900), [(rgb_a, alpha_a, 0.9, 0.27, 0.05), (rgb_b, alpha_b, 0.7, 0.73, 0.25)])
    people = finder.find(photo)
    assert len(people) == 2
    assert people[0].mask.sum() > people[1].mask.sum()  # the bigger person first
    for person, truth in zip(people, truths):
        assert iou(person.mask, truth) > 0.85


def test_people_side_by_side_and_overlapping_are_counted_and_kept_apart(finder, renders):
    """Groups of 2-4 touching or overlapping people: as many people as were pasted, each mask its own
    person's pixels (truth: each person's mask less those pasted over it)."""
    for case, (count, gap) in enumerate([(2, 0.3), (3, 0.28), (3, 0.22), (4, 0.2), (4, 0.16)]):
        rng = np.random.default_rng(10 + case)
        xs = 0.5 + (np.arange(count) - (count - 1) / 2) * gap
        photo, truths = composite(rng, (600, 1000), [(*renders[(case + i) % 8], 0.9, x, 0.05) for i, x in enumerate(xs)])
        visible = [t & ~np.any(truths[i + 1:], axis=0) if i + 1 < count else t for i, t in enumerate(truths)]
        people = finder.find(photo)
        assert len(people) == count, (count, gap, len(people))
        for truth in visible:
            # 0.79 for the most hidden of four people 16 % of the width apart (0.81 before the finder's
            # second landmark pass), 0.86-0.98 for the rest
            assert max(iou(p.mask, truth) for p in people) > 0.75, (count, gap)
        owned = np.sum([p.mask for p in people], axis=0)
        assert owned.max() == 1  # no pixel belongs to two people


def test_configs_are_validated():
    with pytest.raises(ValueError, match="detection_threshold"):
        PersonFinderConfig(detection_threshold=1.5)
    with pytest.raises(ValueError, match="max_people"):
        PersonFinderConfig(max_people=0)
    with pytest.raises(ValueError, match="person mode"):
        PersonOptions(mode="always")
    with pytest.raises(ValueError, match="min_score"):
        PersonOptions(min_score=-0.1)


def test_prepare_people_modes(finder, renders):
    rng = np.random.default_rng(8)
    photo, [truth] = composite(rng, (640, 480), [(*renders[1], 0.85, 0.5, 0.05)])
    image = load_image(jpeg(photo), "photo.jpg")
    kwargs = {"name": "photo.jpg", "sizes": (128, 256)}
    [found] = prepare_people(image, finder, PersonOptions(), **kwargs)
    assert found.prepared.box_source == "person" and found.prepared.mask_source == "person"
    assert found.persons_found == 1 and found.index == 0 and iou(found.person.mask, truth) > 0.85
    # A rect fixes the crop; the finder's mask still replaces the background.
    [boxed] = prepare_people(image, finder, PersonOptions(), rect=(10, 10, 400, 600), **kwargs)
    assert boxed.prepared.box_source == "rect" and boxed.prepared.mask_source == "person"
    # sidecar: the finder never runs, so no box means the old error; off: the whole image.
    seen = finder.images_seen
    with pytest.raises(InputError, match="no person box"):
        prepare_people(image, finder, PersonOptions(mode="sidecar"), **kwargs)
    [whole] = prepare_people(image, finder, PersonOptions(mode="off"), **kwargs)
    assert whole.person is None and whole.prepared.person_box.width == 480 and whole.prepared.mask_source is None
    assert finder.images_seen == seen
    with pytest.raises(InputError, match="no person found"):
        prepare_people(load_image(jpeg(procedural_background(rng, 320)), "empty.jpg"), finder, PersonOptions(), **kwargs)
    with pytest.raises(InputError, match="no person found"):  # a score no detection reaches
        prepare_people(image, finder, PersonOptions(min_score=1.0), **kwargs)


# ---- bulk jobs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("person-ckpt") / "tiny.safetensors"))


def _config(inputs, output, checkpoint, **kwargs) -> BulkConfig:
    return BulkConfig(inputs=tuple(inputs), output=output, checkpoint=checkpoint,
                      reconstruction=ReconstructionConfig(resolution=RESOLUTION), **kwargs)


def test_sidecar_mask_never_runs_the_finder(tmp_path, renders, checkpoint):
    rng = np.random.default_rng(6)
    photo, [truth] = composite(rng, (512, 384), [(*renders[3], 0.85, 0.5, 0.05)])
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "masked.jpg").write_bytes(jpeg(photo))
    Image.fromarray(truth.astype(np.uint8) * 255).save(folder / "masked_mask.png")
    (folder / "plain.jpg").write_bytes(jpeg(photo))
    config = _config([str(folder)], str(tmp_path / "out"), checkpoint)
    records = {r["item"]["name"]: r for r in initial_rows(list_inputs([str(folder)]), config, "run", "ckpt")}
    preparer = InputPreparer(sizes=(128, 256), overwrite=False, max_pixels=config.max_pixels, person=config.person,
                             mesh_format="obj")
    [(masked, _)] = preparer.prepare(records["masked.jpg"])
    assert masked["status"] == "pending" and masked["persons_found"] is None
    assert preparer.finder.images_seen == 0  # the mask was used; the finder never ran
    [(plain, _)] = preparer.prepare(records["plain.jpg"])
    assert plain["persons_found"] == 1 and plain["person_score"] >= 0.5
    assert preparer.finder.images_seen == 1


def test_no_person_fails_and_all_people_reconstructs_each(tmp_path, renders, checkpoint):
    rng = np.random.default_rng(9)
    folder = tmp_path / "in"
    folder.mkdir()
    two, truths = composite(rng, (600, 900), [(*renders[0], 0.9, 0.27, 0.05), (*renders[4], 0.75, 0.73, 0.2)])
    (folder / "two.jpg").write_bytes(jpeg(two))
    (folder / "street.jpg").write_bytes(jpeg(procedural_background(rng, 400)))
    out = tmp_path / "out"

    summary = run_bulk(_config([str(folder)], str(out), checkpoint), in_process=True, progress=False)
    assert (summary.ok, summary.failed) == (1, 1)
    rows = {r["input_uri"].rsplit("/", 1)[1]: r for r in read_manifest(str(out)).to_dict("records")}
    assert rows["street.jpg"]["status"] == "failed" and "no person found" in rows["street.jpg"]["error_message"]
    assert rows["two.jpg"]["persons_found"] == 2 and rows["two.jpg"]["person_index"] == 0  # the most prominent one
    single_mask = rows["two.jpg"]["mesh_uri"].rsplit(".", 1)[0] + "_person.png"
    assert iou(np.asarray(Image.open(single_mask)) > 127, truths[0]) > 0.85

    every = run_bulk(_config([str(folder / "two.jpg")], str(tmp_path / "every"), checkpoint,
                             person=PersonOptions(all_people=True)), in_process=True, progress=False)
    assert (every.ok, every.failed) == (2, 0)
    manifest = read_manifest(str(tmp_path / "every"))
    assert sorted(manifest["person_index"]) == [0, 1] and set(manifest["persons_found"]) == {2}
    for row in manifest.to_dict("records"):
        base = row["mesh_uri"].rsplit(".", 1)[0]
        assert base.endswith(f"_p{row['person_index']}")
        document = json.loads(open(base + "_person.json").read())
        assert document["persons_found"] == 2 and len(document["landmarks"]) == 33 and len(document["world_landmarks"]) == 33
        mask = np.asarray(Image.open(base + "_person.png")) > 127
        assert iou(mask, truths[row["person_index"]]) > 0.85
        assert row["person_mask_area"] == pytest.approx(mask.mean(), abs=0.01)
    # Again: every person's outputs exist, so both are skipped.
    again = run_bulk(_config([str(folder / "two.jpg")], str(tmp_path / "every"), checkpoint,
                             person=PersonOptions(all_people=True)), in_process=True, progress=False)
    assert (again.ok, again.skipped) == (0, 2)


def test_ray_bulk_over_plain_jpegs_on_s3(ray_local, s3_bucket, renders, checkpoint):
    rng = np.random.default_rng(12)
    fs = s3fs.S3FileSystem()
    truths = {}
    for index in (5, 6):
        photo, [truth] = composite(rng, (640, 480), [(*renders[index], 0.85, 0.5, 0.04)])
        fs.pipe_file(f"{s3_bucket}/photos/person{index}.jpg", jpeg(photo))
        truths[f"person{index}.jpg"] = truth
    fs.pipe_file(f"{s3_bucket}/photos/empty.jpg", jpeg(procedural_background(rng, 320)))
    out = f"s3://{s3_bucket}/out"
    summary = run_bulk(_config([f"s3://{s3_bucket}/photos"], out, checkpoint), progress=False)
    assert (summary.ok, summary.failed) == (2, 1)
    for row in read_manifest(out).to_dict("records"):
        name = row["input_uri"].rsplit("/", 1)[1]
        if name == "empty.jpg":
            assert row["status"] == "failed" and "no person found" in row["error_message"]
            continue
        assert row["status"] == "ok" and row["persons_found"] == 1 and row["person_score"] >= 0.5
        base = row["mesh_uri"].rsplit(".", 1)[0]
        mask = np.asarray(Image.open(io.BytesIO(fs.cat_file(base + "_person.png")))) > 127
        assert iou(mask, truths[name]) > 0.85 and row["person_mask_area"] == pytest.approx(mask.mean(), abs=0.01)
        assert json.loads(fs.cat_file(base + "_person.json"))["score"] == pytest.approx(row["person_score"])
        # The preview's input panel carries the mask outline (pure green pixels).
        preview = np.asarray(Image.open(io.BytesIO(fs.cat_file(row["preview_uri"]))))[:, :256]
        assert ((preview == (0, 255, 0)).all(axis=2)).sum() > 100


def test_command_line_person_options():
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["reconstruct", "in/", "-o", "out/"])
    config = args.config(args)
    assert (config.person, config.prepare_actors) == (PersonOptions("auto", False, 0.25), 1)
    args = build_parser().parse_args(["reconstruct", "in/", "-o", "out/", "--person", "sidecar", "--all-people",
                                      "--min-person-score", "0.8", "--prepare-actors", "2"])
    config = args.config(args)
    assert (config.person, config.prepare_actors) == (PersonOptions("sidecar", True, 0.8), 2)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reconstruct", "in/", "-o", "out/", "--person", "maybe"])
