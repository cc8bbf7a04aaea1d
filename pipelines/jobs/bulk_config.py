"""`BulkConfig`: one bulk reconstruction job, validated where it is built (no torch import, so the
command line derives its options from it; `pipelines.common.options`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.body.fit import FitConfig
from model.reconstruction.config import MESH_FORMATS, PersonOptions, ReconstructionConfig
from pipelines.common.telemetry import check_port, check_pushgateway
from pipelines.common.uris import check_uri


@dataclass(frozen=True)
class BulkConfig:
    """One bulk reconstruction job."""

    inputs: tuple[str, ...]
    output: str
    checkpoint: str
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    person: PersonOptions = field(default_factory=PersonOptions)
    mesh_format: str = "obj"
    # Fit the anny body to each person (model.body) and write it as BASE_body.FORMAT beside the
    # mesh; a body-guided checkpoint reads it, so for one this is always on. Where no body can be
    # fitted, the mesh is still made (`body_error` says why) unless the network needs the body.
    body: bool = False
    fit: FitConfig = field(default_factory=FitConfig)  # the body fitter's settings
    # A body-guided checkpoint cannot mesh a photo without a fitted body (no landmarks: a cropped
    # torso, a drawing): such inputs go to this checkpoint (one without body inputs) instead of failing.
    fallback_checkpoint: str | None = None
    overwrite: bool = False
    batch_size: int = 1  # images per model call (normal nets and filters run batched)
    model_actors: int = 1  # size of the model actor pool
    finish_actors: int = 1  # size of the CPU meshing actor pool (marching cubes, colours, writing)
    prepare_actors: int = 1  # size of the CPU prepare actor pool (each holds a person finder)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    max_pixels: int = 100_000_000  # decompression-bomb guard
    # A manifest part is written every `manifest_flush_rows` rows or `manifest_flush_seconds`,
    # whichever comes first: few parts for a big job, little lost if the driver dies.
    manifest_flush_rows: int = 10_000
    manifest_flush_seconds: float = 60.0
    # A manifest part the store refuses is tried again after each of these waits; then the job stops
    # taking inputs and keeps its rows (`ManifestWriter`).
    manifest_retry_delays_s: tuple[float, ...] = (1.0, 4.0, 16.0)
    metrics_port: int | None = None
    pushgateway: str | None = None
    crash_attempts: int = 2  # runs alone an input gets after its worker died with it in flight
    # The pipeline is stopped when no row has moved through any stage for this long (a worker stuck
    # restarting, a node that never comes back); what did not come back is then run alone.
    stall_timeout_s: float = 900.0
    # Ray memory reservations in MiB (scheduling: Ray never packs more onto a node than it has).
    # prepare: a photo at max_pixels decodes to 4 bytes a pixel, plus float32 crops.
    prepare_memory_mb: int = 1536
    model_memory_mb: int = 2048
    finish_memory_mb: int = 1024

    def __post_init__(self) -> None:
        if self.mesh_format not in MESH_FORMATS:
            raise ValueError(f"mesh format must be one of {MESH_FORMATS}, not {self.mesh_format!r}")
        if min(self.prepare_actors, self.model_actors, self.finish_actors) < 1:
            raise ValueError(f"actor pools need at least one actor, got prepare {self.prepare_actors}, "
                             f"model {self.model_actors}, finish {self.finish_actors}")
        check_uri(self.output)
        check_uri(self.checkpoint)
        if self.fallback_checkpoint is not None:
            check_uri(self.fallback_checkpoint)
        if self.manifest_flush_rows < 1 or not self.manifest_flush_seconds > 0:
            raise ValueError("manifest_flush_rows must be at least 1 and manifest_flush_seconds positive")
        if self.crash_attempts < 1:
            raise ValueError(f"crash_attempts must be at least 1, not {self.crash_attempts}")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be positive, not {self.stall_timeout_s}")
        if self.metrics_port is not None:
            check_port(self.metrics_port)
        if self.pushgateway is not None:
            check_pushgateway(self.pushgateway)
        for name in ("prepare_memory_mb", "model_memory_mb", "finish_memory_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")
