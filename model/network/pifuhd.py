"""The two-level PIFuHD network (Saito et al., CVPR 2020).

    image 512 --normal nets--> front / back normal maps
    [image 512, normals]           --coarse hourglass--> coarse features (per stack)
    [image 1024, normals upsampled] --fine hourglass--> fine features
    point -> coarse MLP(coarse feature, [body], depth) -> coarse occupancy, phi (hidden layer)
    point -> fine MLP(fine feature, phi)       -> fine occupancy

Coordinate conventions are in `model.geometry`. Sizes below are those of the
released model (coarse 512, fine 1024); other presets scale them. A body-guided model
(`PIFuHDConfig.body_channels`) also takes, per point, the signed distance to a body fitted to the
photo and the body's normal there (`model.body.field.BodyField`); the released one does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.network.config import PIFuHDConfig
from model.geometry import default_calib, in_box, project, sample_features
from model.network.hourglass import HourglassFilter
from model.network.mlp import SurfaceMLP
from model.network.normal_net import NormalNet


@dataclass
class Features:
    """Per-image results of the convolutional part; everything a point query needs.

    normal_front, normal_back: (B, 3, 512, 512) or None when the model does not use them.
    coarse: coarse feature maps (B, C, 128, 128), one per hourglass stack in training,
        only the last in eval mode.
    fine: fine feature map (B, C, 512, 512), or None when only the coarse level was encoded.
    """

    normal_front: torch.Tensor | None
    normal_back: torch.Tensor | None
    coarse: list[torch.Tensor]
    fine: torch.Tensor | None = None

    def select(self, index: int) -> "Features":
        """The features of image `index` alone (batch of 1), without copying."""
        pick = lambda t: None if t is None else t[index : index + 1]  # noqa: E731
        return Features(pick(self.normal_front), pick(self.normal_back), [pick(c) for c in self.coarse], pick(self.fine))


@dataclass
class Occupancy:
    """Query results for (B, N) points.

    coarse: probabilities, one (B, N) per coarse feature map (per stack in training).
    phi: (B, N, C) coarse hidden feature fed to the fine MLP.
    fine: (B, N) fine probabilities, or None for a coarse-only query.
    The *_logits fields hold the same before the sigmoid and the in-box mask
    (for numerically stable losses); `coarse_in_box` / `fine_in_box` are the masks.
    """

    coarse: list[torch.Tensor]
    coarse_logits: list[torch.Tensor]
    coarse_in_box: torch.Tensor
    phi: torch.Tensor
    fine: torch.Tensor | None = None
    fine_logits: torch.Tensor | None = None
    fine_in_box: torch.Tensor | None = None


class CoarseLevel(nn.Module):
    """Normal nets, coarse hourglass and coarse MLP (the released key prefix `netG.`)."""

    def __init__(self, config: PIFuHDConfig):
        super().__init__()
        self.config = config
        self.image_filter = HourglassFilter(config.coarse_filter, config.filter_in_channels)
        self.mlp = SurfaceMLP(config.coarse_mlp)
        self.netF = NormalNet(config.normal_net) if config.use_front_normal else None
        self.netB = NormalNet(config.normal_net) if config.use_back_normal else None


class PIFuHD(nn.Module):
    """Two-level pixel-aligned implicit function; the fine level owns the coarse one."""

    def __init__(self, config: PIFuHDConfig):
        super().__init__()
        self.config = config
        # Registration order and names follow the released state dict: fine filter, fine MLP, netG.
        self.image_filter = HourglassFilter(config.fine_filter, config.filter_in_channels)
        self.mlp = SurfaceMLP(config.fine_mlp)
        self.netG = CoarseLevel(config)

    @classmethod
    def from_config(cls, config: PIFuHDConfig) -> "PIFuHD":
        return cls(config)

    def with_z_size(self, z_size: float) -> "PIFuHD":
        """The same occupancy function with the depth feature z * (coarse_size // 2) / z_size at a new z_size.

        The depth is the last input column of the coarse MLP's first layer and of each skip layer
        (a body-guided model's body distance, at the same scale, comes BODY_CHANNELS before it);
        those weight columns are scaled by new / old z_size, so every output stays the same (up to
        rounding) while the depth enters at a new scale, which changes how fast training moves it.
        """
        import dataclasses

        net = PIFuHD(dataclasses.replace(self.config, z_size=float(z_size)))
        net.load_state_dict(self.state_dict())
        factor = float(z_size) / self.config.z_size
        scaled = [-1, -1 - self.config.body_channels] if self.config.body_guided else [-1]
        with torch.no_grad():
            for index, layer in enumerate(net.netG.mlp.filters):
                if index == 0 or index in net.netG.mlp.skip_layers:
                    layer.weight[:, scaled] *= factor
        return net.train(self.training)

    def with_body_guidance(self) -> "PIFuHD":
        """The same occupancy function as a body-guided model: zero weights on the new body inputs.

        The body columns enter the coarse MLP's input just before the depth column (its last), in
        the first layer and in each skip layer; from zero, training decides how much they count.
        """
        if self.config.body_guided:
            return self
        net = PIFuHD(self.config.with_body_channels())
        state = self.state_dict()
        for key, target in net.state_dict().items():
            weight = state[key]
            if weight.shape != target.shape:  # (out, in, 1) coarse MLP weight reading the MLP input
                zeros = weight.new_zeros(weight.shape[0], target.shape[1] - weight.shape[1], 1)
                state[key] = torch.cat((weight[:, :-1], zeros, weight[:, -1:]), dim=1)
        net.load_state_dict(state)
        return net.train(self.training)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part, in the released naming (tied tensors counted once)."""
        parts = {
            "netG.netF": self.netG.netF,
            "netG.netB": self.netG.netB,
            "netG.image_filter": self.netG.image_filter,
            "netG.mlp": self.netG.mlp,
            "image_filter": self.image_filter,
            "mlp": self.mlp,
        }
        return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items() if part is not None}

    # ---- images -> features -------------------------------------------------------------

    def predict_normals(self, image: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B, 3, S, S) coarse image in [-1, 1] -> (front, back) normal maps (B, 3, S, S), None if unused."""
        front = self.netG.netF(image) if self.netG.netF is not None else None
        back = self.netG.netB(image) if self.netG.netB is not None else None
        return front, back

    def with_normals(self, image: torch.Tensor, normals: tuple) -> torch.Tensor:
        """Concatenate the image with the used normal maps, upsampled to its size if needed."""
        maps = [n for n in normals if n is not None]
        if len(maps) != self.config.num_normal_maps:
            raise ValueError(f"model uses {self.config.num_normal_maps} normal maps, got {len(maps)}")
        if not maps:
            return image
        stacked = torch.cat(maps, dim=1)
        if stacked.shape[-2:] != image.shape[-2:]:
            stacked = F.interpolate(stacked, size=image.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat((image, stacked), dim=1)

    def encode_coarse(self, image: torch.Tensor, normals: tuple) -> list[torch.Tensor]:
        """Coarse feature maps, every stack in training mode, the last one in eval mode."""
        return self.netG.image_filter(self.with_normals(image, normals), last_only=not self.training)

    def encode_fine(self, image: torch.Tensor, normals: tuple) -> torch.Tensor:
        """Fine feature map of a (B, 3, H, W) image (the whole 1024 image, or a training window)."""
        return self.image_filter(self.with_normals(image, normals), last_only=True)[-1]

    def encode(
        self,
        image_512: torch.Tensor,
        image_1024: torch.Tensor | None = None,
        normals: tuple | None = None,
    ) -> Features:
        """Run the convolutional part once per image.

        image_512: (B, 3, 512, 512) in [-1, 1]; image_1024: (B, 3, 1024, 1024), or None to encode
        the coarse level only. normals: (front, back) maps at 512, or None to predict them.
        """
        if normals is None:
            normals = self.predict_normals(image_512)
        front, back = normals
        coarse = self.encode_coarse(image_512, normals)
        fine = self.encode_fine(image_1024, normals) if image_1024 is not None else None
        return Features(normal_front=front, normal_back=back, coarse=coarse, fine=fine)

    # ---- points -> occupancy ------------------------------------------------------------

    def query_levels(
        self,
        features: Features,
        points: torch.Tensor,
        calib: torch.Tensor | None = None,
        fine_calib: torch.Tensor | None = None,
        levels: str = "both",
        body: torch.Tensor | None = None,
    ) -> Occupancy:
        """Occupancies of world points (B, 3, N).

        calib (B, 4, 4) projects into the coarse image, fine_calib (default: calib) into the
        fine image. levels: "coarse", "fine" (skips the coarse MLP past phi) or "both".
        body (B, 4, N): a body-guided model's per-point body input, signed distance (world units,
        negative inside) and outward normal; required by such a model, refused by the others.
        """
        if levels not in ("coarse", "fine", "both"):
            raise ValueError(f"levels must be 'coarse', 'fine' or 'both', not {levels!r}")
        if (body is None) == self.config.body_guided:
            raise ValueError("a body-guided model needs the body input (a fitted body)" if body is None
                             else "this model takes no body input (it is not body-guided)")
        batch = points.shape[0]
        if calib is None:
            calib = default_calib(batch, points.device, points.dtype)
        xyz = project(points, calib)
        # Per-point inputs after the image feature: [body distance, body normal,] depth; the distance
        # at the depth's scale (both are lengths).
        scale = self.config.depth_scale
        per_point = [xyz[:, 2:3] * scale] if body is None else [body[:, :1] * scale, body[:, 1:], xyz[:, 2:3] * scale]
        point_inputs = torch.cat(per_point, dim=1).transpose(1, 2)
        coarse_in_box = in_box(xyz, 3)
        coarse_probs, coarse_logits, phi = [], [], None
        for feature_map in features.coarse:
            mlp_input = torch.cat((sample_features(feature_map, xyz[:, :2]), point_inputs.to(feature_map.dtype)), dim=-1)
            logits, phi = self.netG.mlp(mlp_input, keep_layer=self.config.phi_layer, stop_after_keep=levels == "fine")
            if logits is not None:
                coarse_logits.append(logits)
                coarse_probs.append(torch.sigmoid(logits) * coarse_in_box)
        result = Occupancy(coarse=coarse_probs, coarse_logits=coarse_logits, coarse_in_box=coarse_in_box, phi=phi)
        if levels == "coarse":
            return result
        if features.fine is None:
            raise ValueError("fine occupancy needs fine features: encode with image_1024")
        fine_xyz = xyz if fine_calib is None else project(points, fine_calib)
        fine_input = torch.cat((sample_features(features.fine, fine_xyz[:, :2]), phi.to(features.fine.dtype)), dim=-1)
        result.fine_logits, _ = self.mlp(fine_input)
        result.fine_in_box = in_box(fine_xyz, 2)
        result.fine = torch.sigmoid(result.fine_logits) * result.fine_in_box
        return result

    def query(
        self, features: Features, points: torch.Tensor, calib: torch.Tensor | None = None, level: str = "fine",
        body: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N) occupancy in [0, 1] of world points (B, 3, N) at the "fine" or "coarse" level;
        body (B, 4, N) as in `query_levels`."""
        if level not in ("coarse", "fine"):
            raise ValueError(f"level must be 'coarse' or 'fine', not {level!r}")
        result = self.query_levels(features, points, calib, levels=level, body=body)
        return result.fine if level == "fine" else result.coarse[-1]
