"""What a reconstruction is asked for: the typed settings of the mesh and of the person policy.

Plain dataclasses with no heavy imports, so that the command line derives its options from them
(`pipelines.common.options`) without loading torch. Each validates itself when built.
"""

from __future__ import annotations

from dataclasses import dataclass

MESH_FORMATS = ("obj", "ply", "glb")
COLOR_MODES = ("image", "normal", "none")
PRECISIONS = ("auto", "fp32", "bf16")
METHODS = ("sparse", "dense")
PERSON_MODES = ("auto", "sidecar", "off")


def allowed_resolutions(coarse_resolution=32, up_to=2048):
    """Resolutions the sparse method accepts: coarse_resolution * 2^k, k >= 0, up to `up_to`."""
    out, res = [], int(coarse_resolution)
    while res <= up_to:
        out.append(res)
        res *= 2
    return out


def check_sparse_resolution(resolution, coarse_resolution=32):
    """ValueError unless the sparse method can extract at `resolution` cells per axis."""
    if coarse_resolution < 2 or coarse_resolution % 2:
        raise ValueError(f"coarse_resolution must be an even number of cells >= 2, got {coarse_resolution}")
    ratio = resolution // coarse_resolution
    if ratio < 1 or resolution % coarse_resolution or ratio & (ratio - 1):
        raise ValueError(
            f"sparse resolution must be coarse_resolution * 2^k = {coarse_resolution} * 2^k cells per axis "
            f"(allowed: {', '.join(map(str, allowed_resolutions(coarse_resolution)))}); got {resolution}. "
            f"Pick one of those, pass another coarse_resolution, or use method='dense'."
        )


@dataclass(frozen=True)
class ReconstructionConfig:
    """How to turn features into a mesh."""

    resolution: int = 256  # grid cells per axis over the [-1, 1]^3 box
    method: str = "sparse"  # "sparse" (coarse to fine near the surface) or "dense"
    # The occupancy level of the surface. None: the checkpoint's own (`surface_level`), 0.5 for one
    # that names none (the released pifuhd.pt).
    threshold: float | None = None
    # None: follow the surface from level to level (fewest queries: 0.42 M at 512 for a human).
    # k >= 0: also evaluate a ring of k fine cells around the surface band at each level, which
    # catches small separate pieces near the surface (noisy networks) for ~2.4x the queries.
    dilation: int | None = None
    batch_points: int = 100_000  # query batch: bounds memory (about 10 KiB per point at full size)
    largest_component: bool = True
    color: str = "image"  # vertex colours: "image", "normal" (as the official output) or "none"
    # Network arithmetic. "bf16" autocasts to bfloat16: about 2x faster on CPUs with avx512_bf16 or
    # AMX and on GPUs; on the shipped model's field the mesh moves 0.03 voxel at 256 and 0.06 at 512
    # (benchmarks/image_to_mesh.py). "auto": bf16 where the device computes it natively, else fp32.
    precision: str = "auto"
    # Points outside the person mask (when the photo has one: given, alpha or the person finder's)
    # are outside the mesh and never queried: the single view's visual hull (`occupancy_function`).
    carve: bool = True
    # Taubin smoothing steps on the extracted mesh (trimesh.smoothing.filter_taubin: no shrinkage);
    # 0 keeps the marching-cubes surface as the network gives it. None: the checkpoint's own
    # (`smooth_iterations` in its metadata), 0 for one that names none (the released pifuhd.pt).
    smooth_iterations: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.method == "sparse":
            check_sparse_resolution(self.resolution)
        elif self.resolution < 2:
            raise ValueError(f"resolution must be at least 2 cells, got {self.resolution}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {self.threshold}")
        if self.dilation is not None and self.dilation < 0:
            raise ValueError(f"dilation must be None or >= 0 cells, got {self.dilation}")
        if self.smooth_iterations is not None and self.smooth_iterations < 0:
            raise ValueError(f"smooth_iterations must be >= 0, got {self.smooth_iterations}")
        if self.batch_points < 1:
            raise ValueError(f"batch_points must be positive, got {self.batch_points}")
        if self.color not in COLOR_MODES:
            raise ValueError(f"color must be one of {COLOR_MODES}, not {self.color!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")


@dataclass(frozen=True)
class PersonOptions:
    """How `prepare_people` finds the person in each photo.

    mode: "auto" (a mask or alpha when given, else the finder; a rect or keypoints still fix the
        crop and the finder's mask replaces the background), "sidecar" (the given mask, alpha,
        rect or keypoints only; the finder never runs) or "off" (the whole image is the crop,
        its background kept; sidecars and alpha are ignored).
    all_people: every person found becomes its own input (else the most prominent one only).
    min_score: people whose detection score is below this are not counted as found. The finder
        reports people down to its detector threshold (0.5), and where it finds no one there, the
        best weaker one down to 0.25 (`model.person.PersonFinderConfig.second_chance_threshold`;
        a person pasted over a busy photograph scored 0.49, `benchmarks/prepare.py`).
    """

    mode: str = "auto"
    all_people: bool = False
    min_score: float = 0.25

    def __post_init__(self) -> None:
        if self.mode not in PERSON_MODES:
            raise ValueError(f"person mode must be one of {PERSON_MODES}, not {self.mode!r}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score}")
