"""Training settings with no heavy imports: the stage names, the noise put on true bodies, the lifter's recipe."""

from __future__ import annotations

from dataclasses import dataclass

from model.data.humans import POSE_FAMILIES

STAGES = ("normal", "coarse", "fine")


@dataclass(frozen=True)
class BodyNoise:
    """The errors of a fitted body, put on the true one a body-guided model trains with (cm).

    A fitted body sits off the true one (shift; along z most: an orthographic photo fixes no depth,
    and both are centred in depth by their own box, `pipelines.common.dataset.to_body_frame`, so a limb
    misplaced in depth moves the rest), is too thick or thin (offset), and the rest is per-point
    jitter. To first order, moving a body by t changes the distance at a point with body normal n by
    -n.t, and growing it by d by -d.
    Defaults: the fitter's errors on the 23 fitted test views of the synthetic data (finder landmarks,
    depth lifter, stored mask): mean-vertex shift 0.9 / 1.8 / 4.3 cm (rms, x / y / z, both bodies
    centred by their own box); pose errors (7.5 cm per vertex once the shift is removed) are not
    modelled beyond the jitter.
    """

    shift_xy_cm: float = 1.5
    shift_z_cm: float = 4.0
    offset_cm: float = 2.0
    point_cm: float = 1.0

    def __post_init__(self) -> None:
        if min(self.shift_xy_cm, self.shift_z_cm, self.offset_cm, self.point_cm) < 0:
            raise ValueError("body noise scales must be >= 0 cm")


@dataclass(frozen=True)
class LifterRecipe:
    """How the shipped lifter is trained (`pifuhd train-lifter`): poses of the generator's families and
    as many with every joint uniform within its limits (these keep it right on poses of no family:
    trained on four families plus uniform poses, it fits a left-out family better than the finder's
    own world landmarks, see the README), fresh random views every step; and the person finder's
    landmarks on clothed renders with their true depths (`model.training.lifter.finder_pairs`), a fixed set."""

    family_poses: int = 8000  # pose i from seed family_seed + i, of family families[i % len(families)]
    uniform_poses: int = 8000  # pose i from seed uniform_seed + i
    families: tuple[str, ...] = POSE_FAMILIES  # fewer: to measure a left-out family
    family_seed: int = 100_000
    uniform_seed: int = 200_000
    # Clothed renders seen by the person finder (`finder_pairs`), in blocks of FINDER_BLOCK views, and
    # their share of each batch.
    finder_views: int = 12000
    finder_seed: int = 300_000
    finder_share: float = 0.5
    steps: int = 12_000
    batch: int = 512
    learning_rate: float = 1e-3  # Adam, cosine decay to 0
    seed: int = 0  # weights and views

    def __post_init__(self) -> None:
        if self.family_poses < 0 or self.uniform_poses < 0 or self.family_poses + self.uniform_poses == 0:
            raise ValueError("family_poses and uniform_poses must be >= 0, and not both 0")
        if not self.families or set(self.families) - set(POSE_FAMILIES):
            raise ValueError(f"families must be some of {POSE_FAMILIES}, got {self.families}")
        if self.finder_views < 0 or not 0 <= self.finder_share < 1 or (self.finder_share > 0) != (self.finder_views > 0):
            raise ValueError("finder_views must be >= 0 and finder_share in [0, 1), both zero or both positive")
        if self.steps < 1 or self.batch < 1 or not self.learning_rate > 0:
            raise ValueError("steps and batch must be positive, learning_rate > 0")
