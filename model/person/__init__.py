"""Finding people in a photo: mask, box, score, 33 body landmarks and a 3D pose, on CPU.

Two BlazePose GHUM 3D networks (Apache-2.0, shipped in `models/`, see `models/NOTICE`) run on
the LiteRT (TensorFlow Lite) interpreter of the `ai-edge-litert` package:

    image --letterbox 224--> detector --SSD anchors, weighted NMS--> detections
      each detection --hip centre + body-circle point--> rotated square ROI (image pixels)
      ROI --affine crop 256--> landmark net --> 33 landmarks (+ visibility), world landmarks (m),
                                                 a soft person mask over the ROI, 2 alignment points
      alignment points --> a second ROI --> landmark net again (`PersonFinderConfig.refine`)
      mask --inverse warp--> (H, W) mask of the whole image

Frames. Image coordinates here are continuous pixel coordinates (top-left origin, x right, y
down, pixel (i, j) covers [i, i+1] x [j, j+1]), as `model.image.boxes.Box` uses them. The ROI is a
square of side `side` pixels centred on `centre`, turned by `angle` (radians; positive turns
the crop's axes clockwise on screen, as y points down): crop point q in [0, 256]^2 maps to the
image point  centre + R(angle) @ (q / 256 - 0.5) * side,  R = [[cos, -sin], [sin, cos]].
The networks' tensor layouts (SSD anchors of 5 layers with strides 8, 16, 32, 32, 32 and two
unit anchors per cell; 12 values per box: centre, size, 4 keypoints, in 224-pixel units; 39
landmarks x (x, y, z, visibility logit, presence logit) in crop pixels; 39 world landmarks x
(x, y, z) in metres; a 256 x 256 mask logit) are those documented by MediaPipe's graph configs.
The sampling (plain bilinear crops, edge pixels repeated, heat-map refinement of the landmarks)
follows MediaPipe's, checked against `mediapipe==0.10.14` itself (static-image mode, one pass) on
synthetic renders: landmarks within 1.4-3.8 px (median) of its own at 512-1024 px, world landmarks
within 5 cm (largest difference), masks IoU 0.97. The second pass is MediaPipe's video-mode step.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.image.boxes import Box, box_from_mask

MODELS = Path(__file__).resolve().parent / "models"
DETECTOR_FILE = MODELS / "pose_detection.tflite"
LANDMARK_FILE = MODELS / "pose_landmark_full.tflite"

DETECTOR_SIZE = 224
LANDMARK_SIZE = 256
LANDMARK_COUNT = 33  # MediaPipe's order: 0 nose ... 11/12 shoulders, 23/24 hips, 27/28 ankles, 31/32 feet
LETTERBOX_FILL = (128, 128, 128)  # the detector's padding: grey, the 0 of its [-1, 1] input range
ROI_SCALE = 1.25  # the body circle's diameter x this = the ROI side (the margin the landmark net was trained with)
HIDE_THRESHOLD = 0.1  # mask probability above which a found person is painted out before the next detection round
SHOULDERS, HIPS = (11, 12), (23, 24)


@dataclass(frozen=True)
class PersonFinderConfig:
    """detection_threshold: minimum detector score (sigmoid, 0..1) of a detection kept.
    second_chance_threshold: where no one is found at detection_threshold, the best detection down
        to this score is tried once; the landmark net's presence score and the skeleton check still
        decide (a person pasted on a busy photograph scored 0.49 and was lost).
    nms_iou: detections whose face boxes overlap more than this are merged (score-weighted).
    presence_threshold: minimum landmark-net "pose present" score of a person kept.
    max_people: at most this many people are returned (detections best first).
    threads: interpreter threads (1: one core per finder, as a Ray actor holds).
    landmark_visibility: a landmark counts as seen at this visibility or above, inside the image.
    max_trunk_tilt_deg: a person's trunk (hips to shoulders) leans at most this far from the
        image's up; a skeleton lying sideways is no person to reconstruct (often not a person at all:
        the landmark net draws a small lying figure on a cat's fur).
    refine: run the landmark net a second time on the ROI of its own first answer (`PersonFinder._landmarks`)."""

    detection_threshold: float = 0.5
    second_chance_threshold: float = 0.25
    nms_iou: float = 0.3
    presence_threshold: float = 0.5
    max_people: int = 8
    threads: int = 1
    landmark_visibility: float = 0.5
    max_trunk_tilt_deg: float = 60.0
    refine: bool = True

    def __post_init__(self) -> None:
        for name in ("detection_threshold", "second_chance_threshold", "nms_iou", "presence_threshold", "landmark_visibility"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.max_people < 1:
            raise ValueError(f"max_people must be >= 1, got {self.max_people}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class Person:
    """One person found in an image of H x W pixels.

    mask_soft: (H, W) float32 in [0, 1], the landmark net's person probability (0 outside its ROI).
    mask: (H, W) bool, mask_soft > 0.5.
    box: the box around `mask` (`Box` fields x0, y0, x1, y1: continuous pixel coordinates, top-left origin).
    score: the detector's score in [0, 1].
    landmarks: (33, 3) float32: x, y in image pixels (continuous coordinates), visibility in [0, 1].
    world_landmarks: (33, 3) float32 metres, origin between the hips; x right in the image, y down,
        z away from the camera (MediaPipe's axes, turned with the ROI so they follow the image).
    problem: why these landmarks are no human skeleton to reconstruct (`skeleton_problem`), None when
        they are; `PersonFinder.find` returns only people without one.
    """

    mask_soft: np.ndarray
    mask: np.ndarray
    box: Box
    score: float
    landmarks: np.ndarray
    world_landmarks: np.ndarray
    problem: str | None = None

    @property
    def mask_area(self) -> float:
        """Fraction of the image's pixels in `mask`."""
        return float(self.mask.mean())

    def to_dict(self) -> dict:
        """JSON-ready record (no masks): box, score, landmarks, world landmarks, mask area."""
        return {
            "box": {"x0": self.box.x0, "y0": self.box.y0, "x1": self.box.x1, "y1": self.box.y1},
            "score": self.score,
            "mask_area": self.mask_area,
            "problem": self.problem,
            "landmarks": np.round(self.landmarks.astype(np.float64), 3).tolist(),
            "world_landmarks": np.round(self.world_landmarks.astype(np.float64), 4).tolist(),
        }


@dataclass(frozen=True)
class _Roi:
    """A rotated square in image pixels (see the module docstring)."""

    centre: tuple[float, float]
    side: float
    angle: float

    def crop_to_image(self) -> np.ndarray:
        """(2, 3) affine A: image point = A @ (q_x, q_y, 1) for crop pixels q in [0, LANDMARK_SIZE]."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        k = self.side / LANDMARK_SIZE
        linear = np.array([[c, -s], [s, c]]) * k
        offset = np.asarray(self.centre) - linear @ np.full(2, LANDMARK_SIZE / 2)
        return np.concatenate([linear, offset[:, None]], axis=1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))


def _anchor_centres() -> np.ndarray:
    """(2254, 2) anchor centres in [0, 1] (x, y), in the detector's output order."""
    centres = []
    # Layers sharing a stride share a grid: two unit anchors per layer per cell.
    for stride, anchors_per_cell in ((8, 2), (16, 2), (32, 6)):
        cells = math.ceil(DETECTOR_SIZE / stride)
        ys, xs = np.meshgrid((np.arange(cells) + 0.5) / cells, (np.arange(cells) + 0.5) / cells, indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(grid, anchors_per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


def _box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(4,) and (N, 4) boxes as x0, y0, x1, y1 -> (N,) intersection over union."""
    low = np.maximum(box[:2], others[:, :2])
    high = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)  # noqa: E731
    return inter / np.maximum(area(box) + area(others) - inter, 1e-12)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def weighted_nms(boxes: np.ndarray, points: np.ndarray, scores: np.ndarray, iou: float) -> list[tuple[float, np.ndarray]]:
    """Merge overlapping detections, best first.

    boxes (N, 4) x0, y0, x1, y1; points (N, K, 2); scores (N,). Each output takes the best
    remaining detection's score and the score-weighted mean of the keypoints of every remaining
    detection overlapping it by more than `iou` (these are then removed).
    Returns [(score, (K, 2) keypoints)].
    """
    order = np.argsort(-scores)
    out = []
    while order.size:
        overlap = _box_iou(boxes[order[0]], boxes[order]) > iou
        group = order[overlap]
        weights = scores[group] / scores[group].sum()
        out.append((float(scores[order[0]]), np.tensordot(weights, points[group], axes=1)))
        order = order[~overlap]
    return out


class PersonFinder:
    """Loads the two networks once; `find` runs them on one image. Construct once per process or
    Ray actor and reuse; calls on one instance are serialised by a lock (the interpreters hold state).

    images_seen counts the images `find` was called with (a real counter, read by tests and jobs).
    """

    def __init__(self, config: PersonFinderConfig = PersonFinderConfig()):
        from ai_edge_litert.interpreter import Interpreter

        self.config = config
        self.detector = Interpreter(model_path=str(DETECTOR_FILE), num_threads=config.threads)
        self.landmarker = Interpreter(model_path=str(LANDMARK_FILE), num_threads=config.threads)
        for interpreter in (self.detector, self.landmarker):
            interpreter.allocate_tensors()
        self._detector_io = self._io(self.detector, n_outputs=2)
        self._landmark_io = self._io(self.landmarker, n_outputs=5)
        self.anchors = _anchor_centres()
        self.images_seen = 0
        self._lock = threading.Lock()

    @staticmethod
    def _io(interpreter, n_outputs: int) -> tuple[int, list[int]]:
        """(input index, output indices in the model's declared order), checked against what we decode."""
        outputs = interpreter.get_output_details()
        if len(outputs) != n_outputs:
            raise RuntimeError(f"person model has {len(outputs)} outputs, expected {n_outputs}")
        return interpreter.get_input_details()[0]["index"], [o["index"] for o in outputs]

    # ---- public -----------------------------------------------------------------------------

    def find(self, rgb: np.ndarray) -> list[Person]:
        """rgb (H, W, 3) uint8, or float in [0, 1] -> the people in it, most prominent first
        (largest mask; on equal masks the box centre nearest the image centre). [] if none.
        Only plausible human skeletons count (`skeleton_problem`); `find_all` also returns the others."""
        return [p for p in self.find_all(rgb) if p.problem is None]

    def find_all(self, rgb: np.ndarray) -> list[Person]:
        """`find`, with the candidates whose landmarks are no human skeleton too (their `problem` says why).

        Detection runs in rounds: the people found are painted grey and the detector runs again,
        until a round finds no one new (the detector tends to report one dominant person and
        miss a smaller one beside it; with that person hidden it finds the other). Where no round
        finds anyone, the best weaker detection gets a second chance (`second_chance_threshold`).
        """
        image = _as_uint8(rgb)
        height, width = image.shape[:2]
        with self._lock:
            self.images_seen += 1
            people: list[Person] = []
            hidden = image
            while len(people) < self.config.max_people:
                new = []
                for score, keypoints in self._detect(hidden):
                    if len(people) + len(new) >= self.config.max_people:
                        break
                    hip = np.clip(np.round(keypoints[0]).astype(int), 0, [width - 1, height - 1])
                    if any(p.mask[hip[1], hip[0]] for p in people + new):
                        continue  # a person already found, detected again
                    person = self._landmarks(image, score, _roi_from_keypoints(keypoints))
                    if person is not None and all(_mask_iou(person.mask, p.mask) < 0.5 for p in people + new):
                        new.append(person)
                if not new:
                    break
                people += new
                hidden = hidden.copy()
                for person in new:
                    hidden[person.mask_soft > HIDE_THRESHOLD] = 128
            if not people:
                people = self._second_chance(image)
        people = apart(people)
        centre = np.array([width / 2, height / 2])
        return sorted(people, key=lambda p: (-int(p.mask.sum()), float(np.linalg.norm(np.asarray(p.box.centre) - centre))))

    def _second_chance(self, image: np.ndarray) -> list[Person]:
        """The person of the best detection at or above `second_chance_threshold`, if the landmark net finds one."""
        detections = self._detect(image, self.config.second_chance_threshold)
        if not detections:
            return []
        score, keypoints = detections[0]
        person = self._landmarks(image, score, _roi_from_keypoints(keypoints))
        return [person] if person is not None else []

    # ---- detector ---------------------------------------------------------------------------

    def _detect(self, rgb: np.ndarray, threshold: float | None = None) -> list[tuple[float, np.ndarray]]:
        """(H, W, 3) uint8 -> [(score, (4, 2) keypoints in image pixels)] scoring at least `threshold`
        (default `config.detection_threshold`), best first."""
        height, width = rgb.shape[:2]
        # Letterbox: scaled to fit and centred (continuous coordinates), plain bilinear as MediaPipe
        # feeds it; the padding is grey, the 0 of the [-1, 1] input range.
        scale = DETECTOR_SIZE / max(height, width)
        offset = (DETECTOR_SIZE - np.array([width, height]) * scale) / 2
        letterboxed = Image.fromarray(rgb).transform((DETECTOR_SIZE, DETECTOR_SIZE), Image.AFFINE,
                                      data=(1 / scale, 0, -offset[0] / scale, 0, 1 / scale, -offset[1] / scale),
                                      resample=Image.BILINEAR, fillcolor=LETTERBOX_FILL)
        tensor = np.asarray(letterboxed, dtype=np.float32)[None] / 127.5 - 1
        input_index, (boxes_index, scores_index) = self._detector_io
        self.detector.set_tensor(input_index, tensor)
        self.detector.invoke()
        raw = self.detector.get_tensor(boxes_index)[0]  # (2254, 12)
        scores = _sigmoid(self.detector.get_tensor(scores_index)[0, :, 0])
        keep = scores >= (self.config.detection_threshold if threshold is None else threshold)
        if not keep.any():
            return []
        raw, scores, anchors = raw[keep], scores[keep], self.anchors[keep]
        # Offsets are in 224-pixel units from the anchor centre (unit anchors: no size scaling).
        centres = raw[:, 0:2] / DETECTOR_SIZE + anchors
        sizes = raw[:, 2:4] / DETECTOR_SIZE
        boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
        points = raw[:, 4:12].reshape(-1, 4, 2) / DETECTOR_SIZE + anchors[:, None, :]
        merged = weighted_nms(boxes, points, scores, self.config.nms_iou)
        return [(score, (kp * DETECTOR_SIZE - offset) / scale) for score, kp in merged]

    # ---- landmarks and mask -----------------------------------------------------------------

    def _landmarks(self, rgb: np.ndarray, score: float, roi: _Roi) -> Person | None:
        """Landmarks and mask of the person in `roi` of (H, W, 3) uint8 `rgb`; None if the net
        sees no pose there or its mask is empty.

        With `config.refine`, the net runs a second time on the ROI its own alignment points give
        (MediaPipe's tracking step on a video's next frame): the detector's ROI is turned and sized
        from a face box, the net's from the whole body it found."""
        outputs = self._run_landmarker(rgb, roi)
        if outputs is not None and self.config.refine:
            # Rows 33 and 34 of the net's 39: the hip centre and a point on the body's circle, as the detector's keypoints.
            alignment = outputs[0].reshape(-1, 5)[LANDMARK_COUNT : LANDMARK_COUNT + 2, :2]
            to_image = roi.crop_to_image()
            refined_roi = _roi_from_keypoints(alignment @ to_image[:, :2].T + to_image[:, 2])
            refined = self._run_landmarker(rgb, refined_roi)
            if refined is not None:
                outputs, roi = refined, refined_roi
        if outputs is None:
            return None
        height, width = rgb.shape[:2]
        landmarks, mask_logits, heatmap, world = outputs
        crop_to_image = roi.crop_to_image()
        values = landmarks.reshape(-1, 5)[:LANDMARK_COUNT]
        xy = _refine_with_heatmap(values[:, :2], heatmap) @ crop_to_image[:, :2].T + crop_to_image[:, 2]
        image_landmarks = np.concatenate([xy, _sigmoid(values[:, 3:4])], axis=1).astype(np.float32)
        world = world.reshape(-1, 3)[:LANDMARK_COUNT].copy()
        c, s = math.cos(roi.angle), math.sin(roi.angle)
        world[:, :2] = world[:, :2] @ np.array([[c, -s], [s, c]]).T
        mask_soft = _mask_to_image(_sigmoid(mask_logits[..., 0]), roi, height, width)
        mask = mask_soft > 0.5
        box = box_from_mask(mask)
        if box is None:
            return None
        problem = skeleton_problem(image_landmarks, width, height, self.config)
        return Person(mask_soft, mask, box, score, image_landmarks, world.astype(np.float32), problem)

    def _run_landmarker(self, rgb: np.ndarray, roi: _Roi) -> tuple[np.ndarray, ...] | None:
        """The landmark net's raw (landmarks, mask logits, heat map, world landmarks) on `roi`, None
        when it sees no pose there."""
        input_index, outputs = self._landmark_io
        self.landmarker.set_tensor(input_index, _warp_crop(rgb, roi)[None])
        self.landmarker.invoke()
        landmarks, flag, mask_logits, heatmap, world = (self.landmarker.get_tensor(i)[0] for i in outputs)
        if float(np.ravel(flag)[0]) < self.config.presence_threshold:
            return None
        return landmarks, mask_logits, heatmap, world


def apart(people: list[Person], max_shared: float = 0.5) -> list[Person]:
    """Each pixel to one person: where masks overlap, the person whose mask is surest there keeps it.

    A person left with less than `1 - max_shared` of their own mask was another person (or
    several) found again, and is dropped. Landmarks and scores are kept; `mask_soft`, `mask` and
    `box` keep only the person's own pixels (a seated group's masks each reached over their
    neighbours: with `--all-people`, one crop showed three people).
    """
    if len(people) < 2:
        return people
    soft = np.stack([p.mask_soft for p in people])
    owner = soft.argmax(0)
    kept = []
    for index, person in enumerate(people):
        mine = owner == index
        own = person.mask & mine
        box = box_from_mask(own)
        if box is None or own.sum() < (1 - max_shared) * person.mask.sum():
            continue
        kept.append(Person(person.mask_soft * mine, own, box, person.score, person.landmarks, person.world_landmarks, person.problem))
    return kept


def skeleton_problem(landmarks: np.ndarray, width: int, height: int, config: PersonFinderConfig = PersonFinderConfig()) -> str | None:
    """Why (33, 3) image landmarks (x, y px, visibility) are no whole human skeleton in a W x H image, or None.

    A person to reconstruct shows both shoulders and a hip inside the image (an upper body cut at the
    waist has none: PIFuHD would invent legs below the edge), with the trunk within
    `config.max_trunk_tilt_deg` of upright.
    """
    xy, visibility = landmarks[:, :2], landmarks[:, 2]
    seen = (visibility >= config.landmark_visibility) & (xy[:, 0] >= 0) & (xy[:, 0] <= width) & (xy[:, 1] >= 0) & (xy[:, 1] <= height)
    if not seen[list(SHOULDERS)].all():
        return "no shoulders among its landmarks"
    if not seen[list(HIPS)].any():
        return "no hip in the image (only the upper body is shown)"
    hips = xy[[h for h in HIPS if seen[h]]].mean(0)
    trunk = xy[list(SHOULDERS)].mean(0) - hips
    tilt = math.degrees(math.atan2(abs(trunk[0]), -trunk[1]))  # 0 when the shoulders are straight above the hips
    if tilt > config.max_trunk_tilt_deg:
        return f"a trunk {tilt:.0f} degrees from upright (lying, or no person)"
    return None


# ---- image helpers (PIL: C loops, centre-based continuous coordinates like ours) ----------


def _as_uint8(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8, or float in [0, 1] (rounded to 8 bits, as the networks were fed) -> (H, W, 3) uint8."""
    array = np.asarray(rgb)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise ValueError(f"rgb must be (H, W, 3), got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(array)


def _roi_from_keypoints(keypoints: np.ndarray) -> _Roi:
    """(4, 2) detector keypoints in pixels -> the landmark net's ROI.

    Keypoint 0 is the hip centre, keypoint 1 a point on the circle around the whole body: the
    circle's diameter x ROI_SCALE is the side, and the hip->point direction becomes the crop's up.
    """
    hip, edge = keypoints[0], keypoints[1]
    dx, dy = edge - hip
    radius = math.hypot(dx, dy)
    # Turn so that the hip->edge vector points to the crop's -y (up): 90 deg - its on-screen angle.
    angle = math.pi / 2 - math.atan2(-dy, dx)
    angle = (angle + math.pi) % (2 * math.pi) - math.pi
    return _Roi((float(hip[0]), float(hip[1])), 2 * radius * ROI_SCALE, angle)


def _roi_bounds(roi: _Roi, width: int, height: int, clip: bool) -> tuple[int, int, int, int]:
    """Whole-pixel box (x0, y0, x1, y1) around the ROI's corners (plus a pixel for bilinear
    sampling), clipped to the image when `clip`."""
    corners = np.array([[0, 0, 1], [LANDMARK_SIZE, 0, 1], [0, LANDMARK_SIZE, 1], [LANDMARK_SIZE, LANDMARK_SIZE, 1]], float)
    spread = corners @ roi.crop_to_image().T
    x0, y0 = np.floor(spread.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(spread.max(axis=0)).astype(int) + 1
    if clip:
        x0, x1 = np.clip([x0, x1], 0, width)
        y0, y1 = np.clip([y0, y1], 0, height)
    return int(x0), int(y0), int(x1), int(y1)


def _warp_crop(rgb: np.ndarray, roi: _Roi) -> np.ndarray:
    """(H, W, 3) uint8 -> the ROI as (256, 256, 3) float32 in [0, 1]; bilinear, the image's edge
    pixels repeated outside it.

    Plain bilinear sampling, not antialiased, and edge repetition, as MediaPipe feeds the landmark
    net: an antialiased crop of a large ROI, or black outside the image, moved its landmarks by
    several crop pixels away from MediaPipe's own.
    """
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = _roi_bounds(roi, width, height, clip=False)
    cx0, cx1 = min(max(x0, 0), width - 1), max(min(x1, width), 1)
    cy0, cy1 = min(max(y0, 0), height - 1), max(min(y1, height), 1)
    cx1, cy1 = max(cx1, cx0 + 1), max(cy1, cy0 + 1)
    region = rgb[cy0:cy1, cx0:cx1]
    padded = np.pad(region, ((cy0 - y0, max(y1 - cy1, 0)), (cx0 - x0, max(x1 - cx1, 0)), (0, 0)), mode="edge")
    affine = roi.crop_to_image()
    affine[:, 2] -= (x0, y0)
    crop = Image.fromarray(padded).transform((LANDMARK_SIZE, LANDMARK_SIZE), Image.AFFINE, data=tuple(affine.ravel()),
                                             resample=Image.BILINEAR)
    return np.asarray(crop, dtype=np.float32) / 255


def _refine_with_heatmap(xy: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """(K, 2) crop-pixel landmarks and the (64, 64, >=K) heat-map logits -> refined (K, 2).

    Each landmark moves to the sigmoid-weighted mean cell position of the 7 x 7 cells around it,
    where the most confident of those cells is above 0.5.
    """
    cells = heatmap.shape[0]
    scale = LANDMARK_SIZE / cells
    out = xy.copy()
    for k, (x, y) in enumerate(xy):
        col, row = int(x / scale), int(y / scale)
        r0, r1, c0, c1 = max(row - 3, 0), min(row + 4, cells), max(col - 3, 0), min(col + 4, cells)
        if r0 >= r1 or c0 >= c1:
            continue
        confidence = _sigmoid(heatmap[r0:r1, c0:c1, k])
        if confidence.max() < 0.5:
            continue
        rows, cols = np.mgrid[r0:r1, c0:c1]
        total = confidence.sum()
        out[k] = (cols * confidence).sum() / total * scale, (rows * confidence).sum() / total * scale
    return out


def _mask_to_image(mask: np.ndarray, roi: _Roi, height: int, width: int) -> np.ndarray:
    """(256, 256) crop mask in [0, 1] -> (H, W) float32 image mask, 0 outside the ROI; only the
    ROI's bounding box of the image is sampled."""
    x0, y0, x1, y1 = _roi_bounds(roi, width, height, clip=True)
    out = np.zeros((height, width), np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    inverse = np.linalg.inv(np.vstack([roi.crop_to_image(), [0, 0, 1]]))[:2]  # image point -> crop point
    inverse[:, 2] += inverse[:, :2] @ np.array([x0, y0], float)  # from the bounding box's own pixels
    warped = Image.fromarray(np.ascontiguousarray(mask, dtype=np.float32)).transform(
        (x1 - x0, y1 - y0), Image.AFFINE, data=tuple(inverse.ravel()), resample=Image.BILINEAR, fillcolor=0.0)
    out[y0:y1, x0:x1] = np.asarray(warped)
    return out


# ---- from a photo to the network's inputs ----------------------------------------------------
