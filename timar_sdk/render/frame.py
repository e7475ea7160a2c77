"""One head, one frame: pose a rig with a motion frame and rasterise it."""
from __future__ import annotations

import numpy as np

from timar_sdk.layout import MOTION_DIM
from timar_sdk.render.raster import (
    Lights,
    gradient_background,
    rasterize,
    smooth_edges,
    to_uint8,
    vertex_normals,
)


class Renderer:
    """Renders one rig (a :class:`~timar_sdk.render.head.ProceduralHead` or
    :class:`~timar_sdk.render.flame.FlameHead`) at a fixed square size.

    Geometry that no motion can move (the procedural head's shoulders) is rasterised once into
    a cached background and depth buffer; each frame draws only what moves.
    """

    def __init__(self, rig, size: int = 512, lights: Lights | None = None,
                 background: np.ndarray | None = None, antialias: bool = True):
        self.rig = rig
        self.antialias = antialias
        self.size = int(size)
        self.lights = lights or Lights()
        bg = gradient_background(self.size, self.size) if background is None else background
        faces = rig.faces
        static_v = getattr(rig, "static_vertices", None)
        if static_v is not None and static_v.any():
            static_f = static_v[faces].all(axis=1)
        else:
            static_f = np.zeros(len(faces), bool)
        self._dyn_faces = faces[~static_f]
        if static_f.any():
            verts = rig.rest
            normals = vertex_normals(verts, faces)  # all faces: seams shade like the rest
            colors = self.lights.shade(normals, rig.albedo, rig.spec)
            xy, depth = rig.camera.project(verts, self.size, self.size)
            bg, zbuf = rasterize(xy, depth, faces[static_f], colors, bg,
                                 cull_backfaces=not rig.two_sided, return_zbuffer=True)
        else:
            zbuf = None
        self.background = bg.astype(np.float32)
        self._zbuffer = zbuf

    def render_float(self, frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame, dtype=np.float64).reshape(-1)
        if frame.shape[0] != MOTION_DIM:
            raise ValueError(f"a motion frame has {MOTION_DIM} values, got {frame.shape[0]}")
        rig = self.rig
        verts = rig.pose(frame)
        normals = vertex_normals(verts, rig.faces)
        colors = self.lights.shade(normals, rig.albedo, rig.spec)
        xy, depth = rig.camera.project(verts, self.size, self.size)
        img = rasterize(xy, depth, self._dyn_faces, colors, self.background, self._zbuffer,
                        cull_backfaces=not rig.two_sided)
        return smooth_edges(img) if self.antialias else img

    def render(self, frame: np.ndarray) -> np.ndarray:
        """(size, size, 3) uint8 RGB image of one 56-float motion frame."""
        return to_uint8(self.render_float(frame))


_DEFAULT: dict = {}


def render_frame(motion_frame, size: int = 512, mesh=None) -> np.ndarray:
    """Render one 56-float motion frame to an (size, size, 3) uint8 RGB image.

    ``mesh``: a rig (:class:`ProceduralHead`, :class:`FlameHead`) or a :class:`Renderer`;
    default: the procedural head. Renderers are cached per (rig, size), so calling this in a
    loop is cheap after the first frame.
    """
    if isinstance(mesh, Renderer):
        return mesh.render(motion_frame)
    if mesh is None:
        if "head" not in _DEFAULT:
            from timar_sdk.render.head import ProceduralHead
            _DEFAULT["head"] = ProceduralHead()
        mesh = _DEFAULT["head"]
    key = (id(mesh), int(size))
    r = _DEFAULT.get(key)
    if r is None or r.rig is not mesh:
        if len(_DEFAULT) > 8:  # keep the cache small; the default head stays
            for k in [k for k in _DEFAULT if k != "head"]:
                del _DEFAULT[k]
        r = _DEFAULT[key] = Renderer(mesh, size)
    return r.render(motion_frame)
