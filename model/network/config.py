"""Typed description of a PIFuHD model size, and the named presets.

One `PIFuHDConfig` fully determines the network's shapes; every module is
built from it and nothing else. The `full` preset is the released
architecture (387 M parameters); the smaller ones keep the same structure
with narrower layers (and optionally smaller inputs) for CPU training and tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


# Per-point body inputs of a body-guided model: signed distance, then the normal's x, y, z.
BODY_CHANNELS = 4


@dataclass(frozen=True)
class NormalNetConfig:
    """pix2pixHD global generator predicting a 3-channel normal map from RGB."""

    base_width: int = 64  # "ngf": channels after the first 7x7 conv
    num_downsamplings: int = 4  # stride-2 convs; width doubles at each
    num_res_blocks: int = 9  # residual blocks at the bottleneck


@dataclass(frozen=True)
class HourglassConfig:
    """Stacked-hourglass image filter.

    The stem is a 7x7 stride-2 conv to width/4 channels, conv-blocks to width/2,
    width/2 and width; then `num_stacks` hourglasses of `depth` levels at `width`
    channels, each stack emitting `out_channels` features. `stem_pool` adds a
    2x2 average pool after the first conv-block (the coarse level's extra /2).
    """

    num_stacks: int
    depth: int
    out_channels: int
    stem_pool: bool
    width: int = 256
    norm_groups: int = 32  # GroupNorm groups in every conv-block

    @property
    def stride(self) -> int:
        """Input pixels per output feature pixel along one axis."""
        return 4 if self.stem_pool else 2


@dataclass(frozen=True)
class MLPConfig:
    """Per-point MLP of 1x1 convolutions.

    `widths[0]` is the input width, `widths[-1]` the output (1 occupancy).
    Layers listed in `skip_layers` take concat(previous activation, MLP input),
    so their input width is widths[l] + widths[0].
    """

    widths: tuple[int, ...]
    skip_layers: tuple[int, ...]

    def layer_shapes(self) -> list[tuple[int, int]]:
        """(in, out) channel counts of each layer."""
        shapes = []
        for layer in range(len(self.widths) - 1):
            extra = self.widths[0] if layer in self.skip_layers else 0
            shapes.append((self.widths[layer] + extra, self.widths[layer + 1]))
        return shapes


@dataclass(frozen=True)
class PIFuHDConfig:
    """Everything that fixes the shapes of a two-level PIFuHD network."""

    normal_net: NormalNetConfig = field(default_factory=NormalNetConfig)
    use_front_normal: bool = True
    use_back_normal: bool = True
    coarse_filter: HourglassConfig = field(
        default_factory=lambda: HourglassConfig(num_stacks=4, depth=2, out_channels=256, stem_pool=True)
    )
    coarse_mlp: MLPConfig = field(
        default_factory=lambda: MLPConfig(widths=(257, 1024, 512, 256, 128, 1), skip_layers=(2, 3, 4))
    )
    # phi, the coarse feature handed to the fine MLP, is the activation after this coarse layer.
    phi_layer: int = 2
    fine_filter: HourglassConfig = field(
        default_factory=lambda: HourglassConfig(num_stacks=1, depth=4, out_channels=16, stem_pool=False)
    )
    fine_mlp: MLPConfig = field(
        default_factory=lambda: MLPConfig(widths=(272, 512, 256, 128, 1), skip_layers=(1, 2))
    )
    coarse_size: int = 512  # input side of the coarse level and of the normal nets (pixels)
    fine_size: int = 1024  # input side of the fine level (pixels)
    # The depth feature is z * (coarse_size // 2) / z_size: z in the same units as x, y.
    z_size: float = 200.0
    # 0: the released architecture. BODY_CHANNELS: body-guided (ICON's idea on the anny body): the
    # coarse MLP also reads, per point, the signed distance to a body fitted to the photo (at the
    # depth feature's scale) and the body's outward normal there, between the image feature and depth.
    body_channels: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_normal_maps(self) -> int:
        return int(self.use_front_normal) + int(self.use_back_normal)

    @property
    def filter_in_channels(self) -> int:
        return 3 + 3 * self.num_normal_maps

    @property
    def phi_channels(self) -> int:
        return self.coarse_mlp.widths[self.phi_layer + 1]

    @property
    def body_guided(self) -> bool:
        return self.body_channels > 0

    def with_body_channels(self) -> "PIFuHDConfig":
        """The same sizes with the body-guided coarse MLP (BODY_CHANNELS more inputs)."""
        if self.body_guided:
            return self
        widths = (self.coarse_mlp.widths[0] + BODY_CHANNELS,) + self.coarse_mlp.widths[1:]
        return dataclasses.replace(
            self, body_channels=BODY_CHANNELS, coarse_mlp=dataclasses.replace(self.coarse_mlp, widths=widths)
        )

    @property
    def depth_scale(self) -> float:
        """Multiplier turning z into the coarse MLP's depth feature (1.28 for the release)."""
        return (self.coarse_size // 2) / self.z_size

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency."""
        if self.body_channels not in (0, BODY_CHANNELS):
            raise ValueError(f"body_channels must be 0 or {BODY_CHANNELS}, not {self.body_channels}")
        if self.coarse_mlp.widths[0] != self.coarse_filter.out_channels + self.body_channels + 1:
            raise ValueError(
                f"coarse MLP input {self.coarse_mlp.widths[0]} != coarse features "
                f"{self.coarse_filter.out_channels} + {self.body_channels} body + 1 depth feature"
            )
        if not 0 <= self.phi_layer < len(self.coarse_mlp.widths) - 2:
            raise ValueError(f"phi_layer {self.phi_layer} is not a hidden layer of the coarse MLP")
        if self.fine_mlp.widths[0] != self.fine_filter.out_channels + self.phi_channels:
            raise ValueError(
                f"fine MLP input {self.fine_mlp.widths[0]} != fine features "
                f"{self.fine_filter.out_channels} + phi {self.phi_channels}"
            )
        for mlp in (self.coarse_mlp, self.fine_mlp):
            if mlp.widths[-1] != 1:
                raise ValueError(f"MLP {mlp.widths} must end in 1 output")
            if 0 in mlp.skip_layers:
                raise ValueError("layer 0 already sees the MLP input; it cannot be a skip layer")
        for hg in (self.coarse_filter, self.fine_filter):
            # The narrowest normalised tensor is the stem's first conv-block branch, width / 8.
            if hg.width % 8 or (hg.width // 8) % hg.norm_groups:
                raise ValueError(
                    f"hourglass width {hg.width}: width / 8 must be divisible by {hg.norm_groups} norm groups"
                )
        if self.fine_size % self.coarse_size:
            raise ValueError(f"fine_size {self.fine_size} must be a multiple of coarse_size {self.coarse_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PIFuHDConfig":
        """Inverse of `to_dict`; unknown keys raise TypeError naming them."""
        data = dict(data)
        nested = {
            "normal_net": NormalNetConfig,
            "coarse_filter": HourglassConfig,
            "fine_filter": HourglassConfig,
            "coarse_mlp": MLPConfig,
            "fine_mlp": MLPConfig,
        }
        for key, kind in nested.items():
            if key in data:
                value = dict(data[key])
                for name in ("widths", "skip_layers"):
                    if name in value:
                        value[name] = tuple(value[name])
                data[key] = kind(**value)
        return cls(**data)


# The narrow presets' depth feature is 5.12 z (the release's 1.28 z): a body's +-0.15 of depth
# then spans +-0.77, as wide as the image features, and training finds the depth sooner (one-view
# overfit, small preset: IoU 0.61 after 100 steps against 0.45 at the release's scale).
SMALL_Z_SIZE = 25.0


def _preset_full() -> PIFuHDConfig:
    return PIFuHDConfig()


def _preset_small() -> PIFuHDConfig:
    """13 M parameters (11 M in the normal nets) at 256/512 input: trains on a CPU."""
    return PIFuHDConfig(
        normal_net=NormalNetConfig(base_width=16, num_downsamplings=4, num_res_blocks=4),
        coarse_filter=HourglassConfig(num_stacks=2, depth=2, out_channels=64, stem_pool=True, width=128, norm_groups=8),
        coarse_mlp=MLPConfig(widths=(65, 256, 128, 64, 32, 1), skip_layers=(2, 3, 4)),
        fine_filter=HourglassConfig(num_stacks=1, depth=2, out_channels=8, stem_pool=False, width=64, norm_groups=4),
        fine_mlp=MLPConfig(widths=(72, 64, 32, 16, 1), skip_layers=(1, 2)),
        coarse_size=256,
        fine_size=512,
        z_size=SMALL_Z_SIZE,
    )


def _preset_tiny() -> PIFuHDConfig:
    """0.46 M parameters at 128/256 input: for tests."""
    return PIFuHDConfig(
        normal_net=NormalNetConfig(base_width=4, num_downsamplings=3, num_res_blocks=2),
        coarse_filter=HourglassConfig(num_stacks=2, depth=1, out_channels=16, stem_pool=True, width=64, norm_groups=4),
        coarse_mlp=MLPConfig(widths=(17, 64, 32, 16, 8, 1), skip_layers=(2, 3, 4)),
        fine_filter=HourglassConfig(num_stacks=1, depth=1, out_channels=4, stem_pool=False, width=32, norm_groups=2),
        fine_mlp=MLPConfig(widths=(20, 16, 8, 4, 1), skip_layers=(1, 2)),
        coarse_size=128,
        fine_size=256,
        z_size=SMALL_Z_SIZE / 2,
    )


PRESETS = {"full": _preset_full, "small": _preset_small, "tiny": _preset_tiny}


def preset(name: str) -> PIFuHDConfig:
    """The named preset's config; ValueError lists the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()
