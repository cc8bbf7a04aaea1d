"""`TrainConfig`: one training run of one stage, validated where it is built (no torch import, so the
command line derives its options from it; `pipelines.common.options`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import model
from model.reconstruction.config import check_sparse_resolution
from model.training.config import STAGES, BodyNoise
from pipelines.common.telemetry import check_pushgateway

OPTIMIZERS = ("rmsprop", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """One training run of one stage."""

    stage: str
    data: str  # dataset URI (pipelines.common.dataset format)
    out: str  # storage root: local folder or s3://bucket/prefix; the run lives in OUT/NAME
    name: str = ""  # run name; default "<preset>-<stage>". Same name again = resume.
    preset: str = "small"
    init: str | None = None  # checkpoint to start from (the previous stage's model)
    workers: int = 1
    cpus_per_worker: float = 1.0  # below 1 leaves CPUs for the Ray Data tasks feeding the workers
    # Decode samples (PNGs, point lists) in Ray Data tasks on the cluster's other CPUs, not in the
    # worker: for GPU workers, which would wait on one CPU's decoding. Costs object-store traffic
    # (~12 MB a decoded sample), more than it saves where the step itself takes seconds (CPU).
    parallel_decode: bool = False
    threads_per_worker: int | None = None  # torch threads; None keeps Ray's (one per reserved CPU)
    use_gpu: bool = False
    steps: int = 1000
    batch_size: int = 2
    points_per_sample: int = 4096  # subsampled from the stored points each step
    optimizer: str = "rmsprop"  # "rmsprop" (the paper) or "adam"
    lr: float = 1e-3
    lr_decay_steps: tuple[int, ...] = ()  # lr *= 0.1 at each of these steps
    checkpoint_every: int = 100
    validate_every: int = 100
    val_samples: int = 2
    val_resolution: int = 64
    use_predicted_normals: bool = False  # coarse and fine stages: feed the normal nets' output, not the ground truth
    # Share of samples composited over grey through a disturbed mask, as inference cuts people out
    # (model/training/augment.py); the others keep their rendered background.
    grey_composite: float = 0.5
    # The model's depth-feature scale (model.network.config.PIFuHDConfig.z_size); None keeps the preset's or
    # the --init checkpoint's. Changing it on an --init checkpoint keeps the network's function.
    z_size: float | None = None
    # Coarse and fine stages: train the body-guided variant (model.network.config body_channels), on the
    # synthetic data's true bodies disturbed like fitted ones (model.training.config.BodyNoise), every row
    # moved to the body's depth frame as inference has it (pipelines.common.dataset.to_body_frame). An --init
    # model without body inputs gains them with zero weights, so it starts as that model.
    body_guided: bool = False
    body_noise: BodyNoise = field(default_factory=BodyNoise)
    vgg_weights: str | None = None  # normal stage: torchvision-layout VGG19 weights enable the perceptual term
    seed: int = 0
    max_failures: int = 1
    log_every: int = 10
    pushgateway: str | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {self.stage!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be 'rmsprop' or 'adam', not {self.optimizer!r}")
        model.preset(self.preset)  # validates the name
        if not 0 <= self.grey_composite <= 1:
            raise ValueError(f"grey_composite must lie in [0, 1], not {self.grey_composite}")
        if self.z_size is not None and not self.z_size > 0:
            raise ValueError(f"z_size must be positive, not {self.z_size}")
        for name in ("steps", "batch_size", "points_per_sample", "checkpoint_every", "validate_every", "log_every", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.val_samples < 0 or self.max_failures < 0:
            raise ValueError(f"val_samples and max_failures must be >= 0, not {self.val_samples} and {self.max_failures}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, not {self.lr}")
        if any(step < 1 for step in self.lr_decay_steps):
            raise ValueError(f"lr_decay_steps must be steps >= 1, not {self.lr_decay_steps}")
        if not self.cpus_per_worker > 0 or (self.threads_per_worker is not None and self.threads_per_worker < 1):
            raise ValueError(f"cpus_per_worker must be positive and threads_per_worker >= 1, not {self.cpus_per_worker} "
                             f"and {self.threads_per_worker}")
        check_sparse_resolution(self.val_resolution)
        if self.body_guided and self.stage == "normal":
            raise ValueError("body_guided applies to the coarse and fine stages, not the normal stage")
        if self.pushgateway is not None:
            check_pushgateway(self.pushgateway)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.preset}-{self.stage}"

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        data["lr_decay_steps"] = tuple(data.get("lr_decay_steps", ()))
        if isinstance(data.get("body_noise"), dict):
            data["body_noise"] = BodyNoise(**data["body_noise"])
        return cls(**data)
