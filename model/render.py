"""Orthographic renders of a subject in the network's frame, headless through EGL (moderngl).

Camera and frames (see model/geometry.py). A view is the subject rotated by `yaw` about +y
and then by `pitch` about +x, scaled by `units_per_cm` (0.01: the box [-1, 1]^3 spans 200 cm,
so a centred 180 cm person spans y in [-0.9, 0.9]). The result is the *view frame*, which is
the network's world frame: x right, y up, z toward the camera; with calib diag(1, -1, 1, 1)
image row 0 is y = +1 and column 0 is x = -1. Pixel centres follow align_corners=True: pixel
i of an S-pixel row sits at x = -1 + 2 i / (S - 1). OpenGL puts pixel centres at
-1 + (2 i + 1) / S in NDC, so the projection scales x and y by (S - 1) / S to land exactly.

A `Part` is one coloured closed mesh in the canonical frame (cm); a subject is a list of them.

Passes (one program, two colour targets):
- front: depth cleared to 1, LESS: RGB shaded with 2nd-order spherical-harmonics (SH)
  irradiance on the albedo (alpha = mask), and the camera-space normal of the nearest surface;
- back: depth cleared to 0, GREATER: the normal of the farthest surface (mostly facing away).
Depth is -z / depth_half_range, independent of the image window, so nothing near the box clips.

The same call, `moderngl.create_standalone_context(backend="egl")`, gets Mesa's llvmpipe on a
CPU machine and the NVIDIA EGL driver on a GPU node.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass

import numpy as np

UNITS_PER_CM = 0.01  # box units per centimetre: 180 cm -> 1.8 units, [-0.9, 0.9] when centred


@dataclass
class Part:
    """One closed triangle mesh: vertices (V, 3) float32 cm, faces (F, 3) int32, colors (V, 3) float32 in [0, 1].

    `uv` (V, 2) float32 and `texture` (H, W, 3) uint8 are set for textured scans only; `normals`
    (V, 3) unit vertex normals where the caller has them already (else the renderer computes them).
    """

    name: str
    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    uv: np.ndarray | None = None
    texture: np.ndarray | None = None
    normals: np.ndarray | None = None


# ---- cameras ----------------------------------------------------------------------------------


def view_rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """(3, 3): the yaw about +y, then the pitch about +x (degrees)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("yx", [yaw_deg, pitch_deg], degrees=True).as_matrix()


@dataclass(frozen=True)
class View:
    """One orthographic view: the subject turned by yaw about +y then pitch about +x (degrees)."""

    yaw_deg: float
    pitch_deg: float = 0.0
    units_per_cm: float = UNITS_PER_CM

    def world_from_canonical(self) -> np.ndarray:
        """(4, 4) float64: canonical frame (cm, y up, facing +z) -> view frame (box units)."""
        m = np.eye(4)
        m[:3, :3] = view_rotation(self.yaw_deg, self.pitch_deg) * self.units_per_cm
        return m

    def apply(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) canonical cm -> (N, 3) view frame."""
        m = self.world_from_canonical()
        return points @ m[:3, :3].T + m[:3, 3]

    def rotate(self, normals: np.ndarray) -> np.ndarray:
        """(N, 3) directions canonical -> view frame (unit length kept)."""
        return normals @ view_rotation(self.yaw_deg, self.pitch_deg).T


def network_calib() -> np.ndarray:
    """(4, 4) float32 orthographic calib of every view: diag(1, -1, 1, 1), points are already in the view frame."""
    return np.diag([1.0, -1.0, 1.0, 1.0]).astype(np.float32)


# ---- lighting ---------------------------------------------------------------------------------


def sh_basis(d: np.ndarray) -> np.ndarray:
    """(N, 3) unit directions -> (N, 9) real SH basis Y_00, Y_1-1, Y_10, Y_11, Y_2-2, Y_2-1, Y_20, Y_21, Y_22."""
    x, y, z = d.T
    return np.stack(
        [
            0.282095 * np.ones_like(x),
            0.488603 * y,
            0.488603 * z,
            0.488603 * x,
            1.092548 * x * y,
            1.092548 * y * z,
            0.315392 * (3 * z * z - 1),
            1.092548 * x * z,
            0.546274 * (x * x - y * y),
        ],
        1,
    )


def studio_lighting() -> np.ndarray:
    """(9, 3) SH radiance: one soft key light from the upper front plus ambient; the fixed lighting of
    renders that are read rather than learnt from (test bodies, a scan's front view for its body fit)."""
    lighting = np.zeros((9, 3), np.float32)
    lighting += sh_basis(np.array([[0.3, 0.5, 0.8]]))[0][:, None] * np.pi * 0.8
    lighting[0] += 0.4 * np.sqrt(4 * np.pi)
    return lighting


# ---- backgrounds ------------------------------------------------------------------------------


# ---- the renderer -----------------------------------------------------------------------------

_VERTEX_SHADER = """
#version 330
uniform float xy_scale;   // (S - 1) / S: align_corners pixel centres
uniform float z_scale;    // 1 / depth_half_range
in vec3 in_pos;
in vec3 in_normal;
in vec3 in_color;
in vec2 in_uv;
out vec3 v_normal;
out vec3 v_color;
out vec2 v_uv;
void main() {
    v_normal = in_normal;
    v_color = in_color;
    v_uv = in_uv;
    // z toward the camera is nearer: NDC depth grows away from the camera. y is negated so
    // that framebuffer row 0 (GL's first row in memory) is the image's top row, y = +1.
    gl_Position = vec4(in_pos.x * xy_scale, -in_pos.y * xy_scale, -in_pos.z * z_scale, 1.0);
}
"""

_FRAGMENT_SHADER = """
#version 330
uniform vec3 sh[9];
uniform bool use_texture;
uniform sampler2D albedo_map;
in vec3 v_normal;
in vec3 v_color;
in vec2 v_uv;
layout(location = 0) out vec4 out_color;
layout(location = 1) out vec4 out_normal;
void main() {
    vec3 n = normalize(v_normal);
    const float c1 = 0.429043, c2 = 0.511664, c3 = 0.743125, c4 = 0.886227, c5 = 0.247708;
    vec3 e = c1 * sh[8] * (n.x * n.x - n.y * n.y) + c3 * sh[6] * n.z * n.z + c4 * sh[0] - c5 * sh[6]
           + 2.0 * c1 * (sh[4] * n.x * n.y + sh[7] * n.x * n.z + sh[5] * n.y * n.z)
           + 2.0 * c2 * (sh[3] * n.x + sh[1] * n.y + sh[2] * n.z);
    vec3 albedo = use_texture ? texture(albedo_map, v_uv).rgb : v_color;
    out_color = vec4(clamp(albedo * max(e, vec3(0.0)) / 3.14159265, 0.0, 1.0), 1.0);
    out_normal = vec4(n * 0.5 + 0.5, 1.0);
}
"""


# The background: one full-screen triangle strip (no vertex buffer) copying a texture texel for texel.
_QUAD_VERTEX_SHADER = """
#version 330
void main() {
    vec2 corner = vec2(float(gl_VertexID & 1), float((gl_VertexID >> 1) & 1));
    gl_Position = vec4(corner * 2.0 - 1.0, 0.0, 1.0);
}
"""

_QUAD_FRAGMENT_SHADER = """
#version 330
uniform sampler2D background;
layout(location = 0) out vec4 out_color;
layout(location = 1) out vec4 out_normal;
void main() {
    out_color = vec4(texelFetch(background, ivec2(gl_FragCoord.xy), 0).rgb, 0.0);  // alpha 0: not the person
    out_normal = vec4(vec3(128.0 / 255.0), 0.0);
}
"""


@dataclass
class RenderOutput:
    """One view at S pixels, all uint8 as stored: rgb (S, S, 3) composited over the background,
    mask (S, S) 0..255, normal_front / normal_back (S, S, 3) camera-space unit normals encoded as
    (n + 1) / 2 * 255, 128 (the zero vector) outside the mask. See `decode_normals`."""

    rgb: np.ndarray
    mask: np.ndarray
    normal_front: np.ndarray
    normal_back: np.ndarray

    def downsample(self) -> "RenderOutput":
        """Half resolution by 2x2 means (the mask becomes fractional at edges, as do normals).

        Pixel centres of the half image sit a quarter of its pixel inward of the
        align_corners grid at the borders (at most 1/4 pixel): negligible for training.
        """

        def half(a):
            a = a.astype(np.uint16)
            return ((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4).astype(np.uint8)

        return RenderOutput(half(self.rgb), half(self.mask), half(self.normal_front), half(self.normal_back))


def decode_normals(encoded: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 normals in [-1, 1] (not renormalised: edge pixels are shorter)."""
    return encoded.astype(np.float32) * (2.0 / 255) - 1.0


def _egl_context():
    import moderngl

    return moderngl.create_standalone_context(backend="egl", require=330)


class Renderer:
    """An EGL context with the program and render targets for one image size; reuse it across views."""

    def __init__(self, size: int = 1024, depth_half_range: float = 2.0):
        self.size = size
        self.depth_half_range = depth_half_range
        self.ctx = _egl_context()
        with self.ctx:
            self._build(size)

    def _build(self, size: int) -> None:
        self.program = self.ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        self.color = self.ctx.texture((size, size), 4, dtype="f1")
        # Normals leave the GPU as 8 bits per channel, (n + 1) / 2, as they are stored: 4x less read-back.
        self.normal = self.ctx.texture((size, size), 4, dtype="f1")
        self.depth = self.ctx.depth_texture((size, size))
        self.fbo = self.ctx.framebuffer(color_attachments=[self.color, self.normal], depth_attachment=self.depth)
        self.blank = self.ctx.texture((1, 1), 3, data=bytes([255, 255, 255]))
        self.background = self.ctx.texture((size, size), 3, dtype="f1")
        self.quad_program = self.ctx.program(vertex_shader=_QUAD_VERTEX_SHADER, fragment_shader=_QUAD_FRAGMENT_SHADER)
        self.quad_program["background"].value = 1
        self.quad = self.ctx.vertex_array(self.quad_program, [])

    @property
    def device(self) -> str:
        with self.ctx:
            return self.ctx.info.get("GL_RENDERER", "unknown")

    def _draw(self, meshes) -> None:
        for vao, texture in meshes:
            self.program["use_texture"].value = texture is not self.blank
            texture.use(0)
            vao.render()

    def render(self, parts, view: View, lighting: np.ndarray, background: np.ndarray | None = None) -> RenderOutput:
        """Render canonical-frame parts (model.data.humans.Part, cm) in `view`.

        lighting: (9, 3) SH radiance coefficients in the view frame; background: (S, S, 3) uint8
        or None for black.
        """
        # Several contexts may live in one process: make this one current for every GL call.
        with self.ctx:
            return self._render(parts, view, lighting, background)

    def _render(self, parts, view: View, lighting: np.ndarray, background: np.ndarray | None) -> RenderOutput:
        from model.meshes import vertex_normals

        ctx, s = self.ctx, self.size
        self.program["xy_scale"].value = (s - 1) / s
        self.program["z_scale"].value = 1.0 / self.depth_half_range
        self.program["sh"].write(np.ascontiguousarray(lighting, dtype=np.float32).tobytes())
        self.program["albedo_map"].value = 0

        resources, meshes = [], []
        for part in parts:
            v = view.apply(part.vertices.astype(np.float64))
            if part.normals is None:
                n = vertex_normals(v, part.faces.astype(np.int64))
            else:
                n = view.rotate(part.normals.astype(np.float64))
            uv = part.uv if part.uv is not None else np.zeros((len(v), 2))
            data = np.concatenate([v, n, part.colors, uv], 1).astype(np.float32)
            vbo = ctx.buffer(data.tobytes())
            ibo = ctx.buffer(part.faces.astype(np.int32).tobytes())
            vao = ctx.vertex_array(self.program, [(vbo, "3f 3f 3f 2f", "in_pos", "in_normal", "in_color", "in_uv")], ibo)
            texture = self.blank
            if part.texture is not None:
                # Texture rows go bottom-up in GL, as UV v does: flip the image once.
                tex = np.ascontiguousarray(part.texture[::-1, :, :3], dtype=np.uint8)
                texture = ctx.texture((tex.shape[1], tex.shape[0]), 3, data=tex.tobytes())
                texture.build_mipmaps()
                resources.append(texture)
            resources += [vbo, ibo, vao]
            meshes.append((vao, texture))

        bg = background if background is not None else np.zeros((s, s, 3), np.uint8)
        # The projection flips y, so framebuffer rows are image rows: texel (x, y) -> fragment (x, y).
        self.background.write(np.ascontiguousarray(bg, dtype=np.uint8).tobytes())
        grey = 128 / 255  # the zero normal, encoded exactly as 128
        try:
            self.fbo.use()
            ctx.viewport = (0, 0, s, s)
            ctx.disable(ctx.CULL_FACE)
            # Front pass: background first (alpha 0, normals 128), then the nearest surfaces.
            ctx.disable(ctx.DEPTH_TEST)
            self.fbo.clear(grey, grey, grey, 0.0, depth=1.0)
            self.background.use(1)
            self.quad.render(self.ctx.TRIANGLE_STRIP, vertices=4)
            ctx.enable(ctx.DEPTH_TEST)
            ctx.depth_func = "<"
            self._draw(meshes)
            rgba = self._read(0, 4)
            front = self._read(1, 3)
            # Back pass: the farthest surfaces.
            ctx.depth_func = ">"
            self.fbo.clear(grey, grey, grey, 0.0, depth=0.0)
            self._draw(meshes)
            back = self._read(1, 3)
        finally:
            for r in resources:
                r.release()

        # No multisampling: the full-size mask is binary.
        mask = np.where(rgba[..., 3] > 127, np.uint8(255), np.uint8(0))
        return RenderOutput(rgb=np.ascontiguousarray(rgba[..., :3]), mask=mask, normal_front=front, normal_back=back)

    def _read(self, attachment: int, components: int) -> np.ndarray:
        """(S, S, components) uint8 of a colour target; row 0 is the image's top row (y flipped in the projection)."""
        raw = self.fbo.read(components=components, attachment=attachment, alignment=1)
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.size, self.size, components)

    def release(self) -> None:
        with self.ctx:
            for obj in (self.fbo, self.color, self.normal, self.depth, self.blank, self.background, self.quad, self.quad_program, self.program):
                obj.release()
        self.ctx.release()


@functools.lru_cache(maxsize=2)
def get_renderer(size: int = 1024) -> Renderer:
    """One renderer per process and size (EGL contexts are costly to create)."""
    return Renderer(size)


# ---- encoding ---------------------------------------------------------------------------------


def png_bytes(array: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes. Level 1: 3-4x faster than PIL's default for ~10 % more bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def configure_llvmpipe_threads(threads: int) -> None:
    """Mesa's CPU rasteriser starts one thread per core; a worker holding one CPU should use one."""
    os.environ.setdefault("LP_NUM_THREADS", str(max(0, threads)))
