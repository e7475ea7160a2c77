"""A small vectorised numpy rasteriser: perspective camera, z-buffer, Gouraud-shaded Lambert +
Blinn-Phong lighting. Headless, CPU only, no OpenGL.

Every triangle is expanded into the pixels of its screen bounding box in one vectorised step
(no Python loop over triangles), barycentric coordinates decide coverage, ``np.minimum.at``
resolves depth, and the winning fragments interpolate the per-vertex lit colours.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def axis_angle_to_matrix(aa: np.ndarray) -> np.ndarray:
    """Rodrigues' formula. ``aa``: (..., 3) axis-angle (radians) -> (..., 3, 3) rotation matrix."""
    aa = np.asarray(aa, dtype=np.float64)
    theta = np.linalg.norm(aa, axis=-1, keepdims=True)
    small = theta < 1e-12
    axis = aa / np.where(small, 1.0, theta)
    x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
    zero = np.zeros_like(x)
    k = np.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=-1).reshape(aa.shape[:-1] + (3, 3))
    th = theta[..., None]
    eye = np.broadcast_to(np.eye(3), k.shape)
    r = eye + np.sin(th) * k + (1.0 - np.cos(th)) * (k @ k)
    return np.where(small[..., None], eye, r)


def vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (faces wound counter-clockwise seen from outside)."""
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    fn = np.cross(v1 - v0, v2 - v0)
    n = len(verts)
    flat = faces.ravel()
    out = np.empty((n, 3), dtype=np.float64)
    for c in range(3):
        out[:, c] = np.bincount(flat, weights=np.repeat(fn[:, c], 3), minlength=n)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norm, 1e-20)).astype(np.float32)


@dataclass
class Camera:
    """Pinhole camera on the +z axis looking down -z at ``target`` (world y up, x right)."""

    target: tuple[float, float, float] = (0.0, 0.0, 0.0)
    distance: float = 1.0
    fov_y_deg: float = 22.0

    def project(self, verts: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """World points (V, 3) -> pixel coordinates (V, 2) (x right, y down; pixel centres at
        +0.5) and positive depth (V,)."""
        tx, ty, tz = self.target
        f = 0.5 * height / np.tan(np.radians(self.fov_y_deg) / 2.0)
        depth = (self.distance + tz) - verts[:, 2]
        inv = f / np.maximum(depth, 1e-6)
        xy = np.empty((len(verts), 2), dtype=np.float32)
        xy[:, 0] = 0.5 * width + (verts[:, 0] - tx) * inv
        xy[:, 1] = 0.5 * height - (verts[:, 1] - ty) * inv
        return xy, depth.astype(np.float32)


@dataclass
class Lights:
    """Directions point from the surface towards the light, in camera/world space."""

    ambient: float = 0.30
    sky: float = 0.10
    dirs: tuple = ((-0.45, 0.55, 0.70), (0.65, 0.05, 0.55), (0.0, 0.55, -0.85), (0.0, -0.6, 0.8))
    intensities: tuple = (0.72, 0.28, 0.22, 0.12)
    shininess: float = 24.0
    _unit: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        d = np.asarray(self.dirs, dtype=np.float32)
        self._unit = d / np.linalg.norm(d, axis=1, keepdims=True)

    def shade(self, normals: np.ndarray, albedo: np.ndarray, spec: np.ndarray) -> np.ndarray:
        """Per-vertex colour (V, 3) in [0, 1]: Lambert diffuse + hemispheric ambient +
        Blinn-Phong specular from the first (key) light, viewer along +z."""
        ndl = np.clip(normals @ self._unit.T, 0.0, None)  # (V, L)
        diffuse = ndl @ np.asarray(self.intensities, dtype=np.float32)
        diffuse += self.ambient + self.sky * normals[:, 1]
        half = self._unit[0] + np.array([0.0, 0.0, 1.0], dtype=np.float32)
        half /= np.linalg.norm(half)
        spec_term = np.clip(normals @ half, 0.0, None) ** self.shininess
        col = albedo * diffuse[:, None] + (spec * spec_term * self.intensities[0])[:, None]
        return np.clip(col, 0.0, 1.0).astype(np.float32)


def gradient_background(width: int, height: int, top=(0.30, 0.34, 0.40),
                        bottom=(0.12, 0.13, 0.16)) -> np.ndarray:
    """A vertical gradient (H, W, 3) float32 in [0, 1] with a soft vignette."""
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    img = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    img = np.broadcast_to(img, (height, width, 3)).copy()
    xx = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    yy = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    img *= (1.0 - 0.25 * np.clip(xx ** 2 + yy ** 2 - 0.3, 0.0, None))[:, :, None]
    return img


def rasterize(xy: np.ndarray, depth: np.ndarray, faces: np.ndarray, colors: np.ndarray,
              background: np.ndarray, zbuffer: np.ndarray | None = None,
              cull_backfaces: bool = True, backface_scale: float = 0.25,
              return_zbuffer: bool = False):
    """Draw triangles over a copy of ``background`` (H, W, 3) float32 and return the image.

    xy: (V, 2) pixel coordinates; depth: (V,) positive distances; faces: (F, 3) int vertex
    indices wound counter-clockwise seen from outside; colors: (V, 3) per-vertex colours,
    interpolated across each triangle (Gouraud). Front faces appear clockwise on screen because
    screen y points down. ``zbuffer`` (H*W,) is the depth already in ``background`` (inf where
    empty), so static geometry can be drawn once and reused. With ``cull_backfaces=False``
    back faces are drawn too, darkened by ``backface_scale`` (they are the inside of the
    surface, e.g. seen through an open mouth). With ``return_zbuffer`` returns (image, zbuffer).
    """
    height, width = background.shape[:2]
    out = background.reshape(-1, 3).copy()
    zbuf = (np.full(width * height, np.inf, dtype=np.float32) if zbuffer is None
            else zbuffer.astype(np.float32, copy=True))

    def done():
        img = out.reshape(height, width, 3)
        return (img, zbuf) if return_zbuffer else img

    tri = xy[faces]  # (F, 3, 2)
    x0, y0 = tri[:, 0, 0], tri[:, 0, 1]
    x1, y1 = tri[:, 1, 0], tri[:, 1, 1]
    x2, y2 = tri[:, 2, 0], tri[:, 2, 1]
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    front = area < 0
    keep = np.abs(area) > 1e-9
    if cull_backfaces:
        keep &= front
    bx0 = np.clip(np.ceil(tri[:, :, 0].min(axis=1) - 0.5), 0, width).astype(np.int32)
    bx1 = np.clip(np.floor(tri[:, :, 0].max(axis=1) - 0.5), -1, width - 1).astype(np.int32)
    by0 = np.clip(np.ceil(tri[:, :, 1].min(axis=1) - 0.5), 0, height).astype(np.int32)
    by1 = np.clip(np.floor(tri[:, :, 1].max(axis=1) - 0.5), -1, height - 1).astype(np.int32)
    keep &= (bx1 >= bx0) & (by1 >= by0) & (depth[faces].min(axis=1) > 0)
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return done()
    faces = faces[idx]
    x0, y0, x1, y1, x2, y2 = x0[idx], y0[idx], x1[idx], y1[idx], x2[idx], y2[idx]
    inv_area = (1.0 / area[idx]).astype(np.float32)
    bx0, by0 = bx0[idx], by0[idx]
    bw = bx1[idx] - bx0 + 1
    bh = by1[idx] - by0 + 1
    # Barycentric b_k = A_k * px + B_k * py + C_k, evaluated relative to the pixel centre of
    # the bbox origin: b_k = O_k + A_k * i + B_k * j; b2 = 1 - b0 - b1.
    ox = bx0.astype(np.float32) + 0.5
    oy = by0.astype(np.float32) + 0.5
    coef = []
    for (xa, ya, xb, yb) in ((x1, y1, x2, y2), (x2, y2, x0, y0)):
        a = -(yb - ya) * inv_area
        b = (xb - xa) * inv_area
        o = ((xb - xa) * (oy - ya) - (yb - ya) * (ox - xa)) * inv_area
        coef.append((o, a, b))
    # Expand every triangle's bbox into fragments (triangle t, column i, row j).
    n = bw * bh
    t = np.repeat(np.arange(len(n), dtype=np.int32), n)
    start = (np.cumsum(n) - n).astype(np.int32)
    local = np.arange(t.size, dtype=np.int32)
    local -= start[t]
    w_t = bw[t]
    j = local // w_t
    i = local - j * w_t
    i_f = i.astype(np.float32)
    j_f = j.astype(np.float32)
    (o0, a0, c0), (o1, a1, c1) = coef
    b0 = o0[t] + a0[t] * i_f + c0[t] * j_f
    b1 = o1[t] + a1[t] * i_f + c1[t] * j_f
    eps = np.float32(-1e-5)
    inside = (b0 >= eps) & (b1 >= eps) & (b0 + b1 <= 1.0 - eps)
    sel = np.flatnonzero(inside)
    t = t[sel]
    b0, b1 = b0[sel], b1[sel]
    b2 = 1.0 - b0 - b1
    pix = (by0[t] + j[sel]) * width + bx0[t] + i[sel]
    fd = depth[faces]
    z = b0 * fd[t, 0] + b1 * fd[t, 1] + b2 * fd[t, 2]
    np.minimum.at(zbuf, pix, z)
    win = np.flatnonzero(z <= zbuf[pix])
    t, pix = t[win], pix[win]
    b0, b1, b2 = b0[win, None], b1[win, None], b2[win, None]
    ft = faces[t]
    col = b0 * colors[ft[:, 0]] + b1 * colors[ft[:, 1]] + b2 * colors[ft[:, 2]]
    if not cull_backfaces:
        scale = np.where(front[idx], np.float32(1.0), np.float32(backface_scale))
        col *= scale[t, None]
    out[pix] = col
    return done()


def to_uint8(img: np.ndarray) -> np.ndarray:
    out = np.clip(img, 0.0, 1.0)
    out *= 255.0
    out += 0.5
    return out.astype(np.uint8)


def smooth_edges(img: np.ndarray, threshold: float = 0.06, strength: float = 0.6) -> np.ndarray:
    """Cheap anti-aliasing: where the luminance jumps between neighbouring pixels, blend the
    pixel towards its 3x3 neighbourhood mean. img: (H, W, 3) float32 in [0, 1]."""
    luma = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    edge = np.zeros(luma.shape, dtype=bool)
    dx = np.abs(np.diff(luma, axis=1)) > threshold
    dy = np.abs(np.diff(luma, axis=0)) > threshold
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    ys, xs = np.nonzero(edge[1:-1, 1:-1])
    if ys.size == 0:
        return img
    ys += 1
    xs += 1
    acc = np.zeros((ys.size, 3), dtype=np.float32)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            acc += img[ys + oy, xs + ox]
    out = img.copy()
    out[ys, xs] = (1.0 - strength) * img[ys, xs] + strength * (acc / 9.0)
    return out
