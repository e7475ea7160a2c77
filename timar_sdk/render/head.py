"""The default preview head: a procedurally built, stylised 3D bust that needs no licensed asset.

Parts: skull and face (one lofted surface with a mouth slit and hair colouring), a jaw (the
lower face, skinned to a hinge just in front of the ears), eyeballs with iris and pupil, upper
eyelids, brows, ears, teeth, a dark mouth cavity, neck and shoulders.

Coordinates are metres, y up, the face looking down +z (FLAME's convention), the eyes at
y = 0. The motion vector (docs/DESIGN.md section 1) drives it:

- neck/global pose 53..55 (axis-angle) rotates the head about a pivot at the top of the neck;
  the neck bends with it, the shoulders stay;
- jaw pose 50..52 (axis-angle) rotates the jaw, lower lip, lower teeth and chin about the jaw
  hinge (x = opening, as in FLAME), calibrated so FLAME's range looks right: the rig turns
  by JAW_SCALE (0.75) times the FLAME angle, and the lips stay sealed over the first few
  hundredths of a radian (LIP_SEAL; more while exp[5] presses them), so 0..0.03 rad is a
  closed mouth, 0.1 rad lips apart, 0.3..0.35 rad wide open;
- the leading expression coefficients drive stylised blend shapes, the mouth shapes of the
  speech-driven training data (docs/TRAINING_DATA.md): exp[0] lips apart, exp[1] spread /
  smile (mouth corners out and up), exp[2] brows raised, exp[3] brows lowered and drawn
  together (frown), exp[4] lip rounding (lips forward, mouth narrower and rounder), exp[5]
  lip closure / press (lips thinner, held together), exp[6] lower lip tucked under the upper
  teeth (f, v). They are an approximation for previews, not FLAME's expression basis (use
  ``--flame`` for that); coefficients 7..49 are not shown by this head.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from timar_sdk.render.raster import Camera, axis_angle_to_matrix, vertex_normals

# Landmarks of the rest head (metres).
MOUTH_Y = -0.058  # the line where the lips meet
MOUTH_HALF = 0.024  # half width of the mouth slit
JAW_HINGE = np.array([0.0, -0.030, -0.006])  # the axis through both jaw joints runs along x
NECK_PIVOT = np.array([0.0, -0.075, -0.020])
EYE_Y = 0.002
EYE_X = 0.0325
EYE_R = 0.0125

N_EXPRESSIONS = 7
JAW_SCALE = 0.75  # rig jaw rotation per radian of FLAME jaw opening
LIP_SEAL = 0.03  # rig radians of jaw opening the closed lips absorb before they part

# Parts (for weights, colours and tests).
SKIN, BROW, EYE, LID, TEETH, MOUTH, EAR, NECK, TORSO, TONGUE = range(10)


@dataclass(frozen=True)
class HeadStyle:
    skin: tuple = (0.86, 0.64, 0.52)
    lips: tuple = (0.70, 0.42, 0.40)
    hair: tuple = (0.20, 0.13, 0.09)
    brows: tuple = (0.16, 0.10, 0.07)
    iris: tuple = (0.30, 0.20, 0.10)
    shirt: tuple = (0.20, 0.36, 0.58)


AGENT_STYLE = HeadStyle()
USER_STYLE = HeadStyle(skin=(0.74, 0.53, 0.40), lips=(0.58, 0.35, 0.31), hair=(0.08, 0.07, 0.07),
                       brows=(0.07, 0.06, 0.06), iris=(0.12, 0.22, 0.30), shirt=(0.55, 0.30, 0.22))


def _smoothstep(e0, e1, x):
    t = np.clip((np.asarray(x, dtype=np.float64) - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _pchip(xq, xp, fp):
    """Monotone cubic (Fritsch-Carlson) interpolation; xp increasing."""
    xp = np.asarray(xp, dtype=np.float64)
    fp = np.asarray(fp, dtype=np.float64)
    h = np.diff(xp)
    delta = np.diff(fp) / h
    d = np.zeros_like(fp)
    for k in range(1, len(fp) - 1):
        if delta[k - 1] * delta[k] > 0:
            w1 = 2 * h[k] + h[k - 1]
            w2 = h[k] + 2 * h[k - 1]
            d[k] = (w1 + w2) / (w1 / delta[k - 1] + w2 / delta[k])
    d[0], d[-1] = delta[0], delta[-1]
    xq = np.asarray(xq, dtype=np.float64)
    k = np.clip(np.searchsorted(xp, xq) - 1, 0, len(xp) - 2)
    t = (xq - xp[k]) / h[k]
    h00 = (1 + 2 * t) * (1 - t) ** 2
    h10 = t * (1 - t) ** 2
    h01 = t * t * (3 - 2 * t)
    h11 = t * t * (t - 1)
    return h00 * fp[k] + h10 * h[k] * d[k] + h01 * fp[k + 1] + h11 * h[k] * d[k + 1]


# Side profile of the head, from the crown (u = 0) to the bottom of the chin (u = 1): height y,
# half width W, front depth Zf, back depth Zb (negative), squareness of the front half.
_PROFILE = np.array([
    # u     y       W      Zf      Zb     p_front
    [0.00, 0.127, 0.000, -0.010, -0.010, 2.2],
    [0.05, 0.1255, 0.026, 0.016, -0.040, 2.2],
    [0.12, 0.118, 0.050, 0.043, -0.074, 2.2],
    [0.20, 0.100, 0.067, 0.066, -0.096, 2.3],
    [0.28, 0.070, 0.076, 0.082, -0.106, 2.5],
    [0.36, 0.033, 0.078, 0.089, -0.104, 2.7],
    [0.44, 0.004, 0.077, 0.090, -0.096, 2.8],
    [0.52, -0.026, 0.073, 0.091, -0.086, 2.6],
    [0.60, -0.055, 0.065, 0.092, -0.072, 2.3],
    [0.68, -0.080, 0.057, 0.089, -0.060, 2.0],
    [0.76, -0.099, 0.048, 0.083, -0.050, 1.8],
    [0.84, -0.112, 0.036, 0.072, -0.042, 1.7],
    [0.92, -0.119, 0.020, 0.048, -0.032, 1.7],
    [1.00, -0.122, 0.000, 0.008, 0.008, 1.7],
])


def _profile(u):
    cols = [_pchip(u, _PROFILE[:, 0], _PROFILE[:, c]) for c in range(1, 6)]
    return cols  # y, W, Zf, Zb, p


def _gauss2(x, y, cx, cy, sx, sy):
    return np.exp(-((x - cx) / sx) ** 2 - ((y - cy) / sy) ** 2)


def _face_relief(x, y):
    """Forward (z) displacement of the front of the face: nose, sockets, lips, chin..."""
    ax = np.abs(x)
    dz = np.zeros_like(x)
    # eye sockets (wide and shallow), brow ridge, cheekbones
    dz -= 0.013 * _gauss2(ax, y, EYE_X, EYE_Y, 0.019, 0.011)
    dz += 0.004 * np.exp(-((y - 0.020) / 0.008) ** 2) * np.exp(-(x / 0.048) ** 4)
    dz += 0.005 * _gauss2(ax, y, 0.046, -0.028, 0.016, 0.016)
    # nose: a ridge from the bridge to the tip, then the base; alae on the sides
    yb = np.clip(y, -0.060, 0.030)
    height = _pchip(yb, [-0.060, -0.050, -0.042, -0.033, -0.020, 0.000, 0.014, 0.030],
                    [0.000, 0.000, 0.009, 0.020, 0.017, 0.010, 0.004, 0.000])
    half = _pchip(yb, [-0.060, -0.045, -0.035, -0.020, 0.000, 0.030],
                  [0.006, 0.009, 0.011, 0.008, 0.007, 0.007])
    q = np.clip(1.0 - (x / half) ** 2, 0.0, None)
    dz += height * q ** 1.5
    dz += 0.0065 * _gauss2(ax, y, 0.012, -0.039, 0.0065, 0.0055)
    # philtrum and lips: bulges above and below the slit, a groove at the slit
    lip_w = np.clip(1.0 - (x / 0.028) ** 2, 0.0, None) ** 0.6
    dy = y - MOUTH_Y
    lip = (0.0032 * np.exp(-((dy - 0.0045) / 0.0035) ** 2)
           + 0.0038 * np.exp(-((dy + 0.0055) / 0.0042) ** 2)
           - 0.0020 * np.exp(-(dy / 0.0020) ** 2))
    dz += lip * lip_w
    # corners of the mouth sink in a little
    dz -= 0.003 * _gauss2(ax, y, MOUTH_HALF + 0.002, MOUTH_Y, 0.006, 0.007)
    # labiomental fold and chin
    dz -= 0.003 * _gauss2(x, y, 0.0, -0.081, 0.02, 0.006)
    dz += 0.006 * _gauss2(x, y, 0.0, -0.100, 0.020, 0.012)
    return dz


def _hairline(a):
    """Height of the hairline around the head (a = azimuth, 0 = front)."""
    return _pchip(np.abs(a), [0.0, 0.6, 1.0, 1.35, 1.75, 2.3, np.pi],
                  [0.066, 0.060, 0.042, 0.022, -0.030, -0.060, -0.066])


def _surface(u, a):
    """Points of the head surface (no hair volume) for row parameters u and azimuths a."""
    y, w, zf, zb, p = _profile(u)
    s, c = np.sin(a), np.cos(a)
    pf = np.where(c > 0, p, 2.2)
    x = w * np.sign(s) * np.abs(s) ** (2.0 / pf)
    z = np.where(c > 0, zf, -zb) * np.sign(c) * np.abs(c) ** (2.0 / pf)
    front = np.clip(c, 0.0, 1.0) ** 0.5
    z = z + _face_relief(x, y) * front
    return np.stack([x, y, z], axis=-1)


def _front_z(x, y):
    """z of the face surface at (x, y) (front half), by dense sampling of one section."""
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    ud = np.linspace(0.0, 1.0, 4001)
    yd = _profile(ud)[0]
    out = np.empty(len(x))
    for k in range(len(x)):
        u = np.interp(-y[k], -yd, ud)
        aa = np.linspace(-1.45, 1.45, 1201)
        pts = _surface(np.full_like(aa, u), aa)
        out[k] = np.interp(x[k], pts[:, 0], pts[:, 2])
    return out


def _grid_faces(rows, cols, wrap=True, skip=None):
    """Two triangles per quad of a rows x cols vertex grid (row-major)."""
    faces = []
    cmax = cols if wrap else cols - 1
    for r in range(rows - 1):
        for c in range(cmax):
            if skip is not None and skip(r, c):
                continue
            a = r * cols + c
            b = r * cols + (c + 1) % cols
            d = (r + 1) * cols + c
            e = (r + 1) * cols + (c + 1) % cols
            faces += [[a, d, b], [b, d, e]]
    return np.asarray(faces, dtype=np.int64).reshape(-1, 3)


def _orient_outward(verts, faces, center):
    """Flip a closed-ish part's winding if most of its normals point towards ``center``."""
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    n = np.cross(v1 - v0, v2 - v0)
    c = (v0 + v1 + v2) / 3.0 - center
    if np.sum(np.einsum("ij,ij->i", n, c)) < 0:
        faces = faces[:, ::-1].copy()
    return faces


def _column_angles(n_front=61, n_back=35):
    """Azimuths: dense over the face, sparse at the back, symmetric, with a column at 0."""
    front_lim = 1.35
    front = np.linspace(-front_lim, front_lim, n_front)
    back = np.linspace(front_lim, 2 * np.pi - front_lim, n_back + 2)[1:-1]
    a = np.concatenate([front, back])
    return np.where(a > np.pi, a - 2 * np.pi, a)


def _row_params(mouth_u):
    """Row parameters u: about 3 mm apart over the face, 7 mm elsewhere, two rows at the mouth."""
    ud = np.linspace(0.0, 1.0, 20001)
    y, w, zf, _, _ = _profile(ud)
    ds = np.sqrt(np.diff(y) ** 2 + np.maximum(np.abs(np.diff(zf)), np.abs(np.diff(w))) ** 2)
    ym = 0.5 * (y[1:] + y[:-1])
    spacing = np.where((ym < 0.040) & (ym > -0.112), 0.003, 0.0075)
    spacing = np.where((ym < 0.075) & (ym >= 0.040), 0.0045, spacing)
    cost = np.concatenate([[0.0], np.cumsum(ds / spacing)])
    n = int(np.ceil(cost[-1]))
    u = np.interp(np.linspace(0.0, cost[-1], n + 1), cost, ud)
    k = int(np.argmin(np.abs(u - mouth_u)))
    u[k] = mouth_u
    u = np.concatenate([u[:k + 1], [mouth_u], u[k + 1:]])
    return u, k


def _sphere_grid(n_rings_angles, n_lon):
    """Unit sphere with its pole on +z: rings at the given polar angles (first 0, last pi)."""
    th = np.asarray(n_rings_angles, dtype=np.float64)
    ph = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    T, P = np.meshgrid(th[1:-1], ph, indexing="ij")
    ring = np.stack([np.sin(T) * np.cos(P), np.sin(T) * np.sin(P), np.cos(T)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0.0, 0.0, 1.0]], ring, [[0.0, 0.0, -1.0]]])
    faces = []
    nr = len(th) - 2
    for c in range(n_lon):
        faces.append([0, 1 + c, 1 + (c + 1) % n_lon])
    for r in range(nr - 1):
        for c in range(n_lon):
            a = 1 + r * n_lon + c
            b = 1 + r * n_lon + (c + 1) % n_lon
            d = 1 + (r + 1) * n_lon + c
            e = 1 + (r + 1) * n_lon + (c + 1) % n_lon
            faces += [[a, d, b], [b, d, e]]
    last = len(verts) - 1
    base = 1 + (nr - 1) * n_lon
    for c in range(n_lon):
        faces.append([base + c, last, base + (c + 1) % n_lon])
    polar = np.concatenate([[th[0]], np.repeat(th[1:-1], n_lon), [th[-1]]])
    return verts, np.asarray(faces, dtype=np.int64), polar


class _Builder:
    def __init__(self):
        self.parts = []

    def add(self, verts, faces, albedo, spec, part, jaw=0.0, head=1.0, lower=None):
        verts = np.asarray(verts, dtype=np.float64)
        n = len(verts)
        albedo = np.broadcast_to(np.asarray(albedo, dtype=np.float64), (n, 3))
        self.parts.append(dict(
            verts=verts, faces=np.asarray(faces, dtype=np.int64), albedo=albedo,
            spec=np.broadcast_to(np.asarray(spec, dtype=np.float64), (n,)),
            part=np.full(n, part), jaw=np.broadcast_to(np.asarray(jaw, dtype=np.float64), (n,)),
            head=np.broadcast_to(np.asarray(head, dtype=np.float64), (n,)),
            lower=np.zeros(n, bool) if lower is None else np.asarray(lower, bool)))

    def build(self):
        out = {}
        offset = 0
        faces = []
        for p in self.parts:
            faces.append(p["faces"] + offset)
            offset += len(p["verts"])
        out["faces"] = np.concatenate(faces).astype(np.int64)
        for key in ("verts", "albedo", "spec", "part", "jaw", "head", "lower"):
            out[key] = np.concatenate([p[key] for p in self.parts])
        return out


class ProceduralHead:
    """The stylised default head. ``pose(frame)`` gives deformed vertices and lit colours."""

    two_sided = False

    def __init__(self, style: HeadStyle = AGENT_STYLE):
        self.style = style
        mesh = self._build(style)
        self.faces = mesh["faces"]
        self.rest = mesh["verts"].astype(np.float64)
        self.albedo = mesh["albedo"].astype(np.float32)
        self.spec = mesh["spec"].astype(np.float32)
        self.part = mesh["part"]
        self.jaw_weight = mesh["jaw"].astype(np.float64)
        self.head_weight = mesh["head"].astype(np.float64)
        self.lower = mesh["lower"]
        self.blendshapes = self._blendshapes()
        # How much each vertex takes part in the lip seal: the lower lip near its edge.
        v = self.rest
        self.seal_weight = (((self.part == SKIN) & self.lower & (v[:, 2] > 0.0))
                            * _smoothstep(MOUTH_Y - 0.016, MOUTH_Y - 0.002, v[:, 1])
                            * (1.0 - _smoothstep(MOUTH_HALF, MOUTH_HALF + 0.012, np.abs(v[:, 0]))))
        self.static_vertices = ((self.head_weight == 0) & (self.jaw_weight == 0)
                                & ~np.any(self.blendshapes != 0, axis=(0, 2)))
        self.camera = Camera(target=(0.0, -0.055, 0.0), distance=1.15, fov_y_deg=20.0)

    # ----------------------------------------------------------------------------- build
    def _build(self, st: HeadStyle):
        b = _Builder()
        ud = np.linspace(0.0, 1.0, 20001)
        yd = _profile(ud)[0]
        mouth_u = float(np.interp(-MOUTH_Y, -yd, ud))
        u, km = _row_params(mouth_u)
        a = _column_angles()
        nr, nc = len(u), len(a)
        U, A = np.meshgrid(u, a, indexing="ij")
        pts = _surface(U, A)  # (nr, nc, 3)
        x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
        row = np.arange(nr)[:, None] * np.ones((1, nc), int)
        lower = row > km
        # The slit between row km (upper lip edge) and km + 1 (lower lip edge).
        xm = pts[km, :, 0]
        inslit_col = np.abs(xm) < MOUTH_HALF
        inslit = (1.0 - _smoothstep(0.55 * MOUTH_HALF, MOUTH_HALF, np.abs(xm)))[None, :]
        inslit = inslit * np.cos(A).clip(0, 1)
        edge = (row == km) | (row == km + 1)
        # Roll the lip edges inwards (towards the mouth), so an open mouth shows lip thickness.
        z = z - 0.0065 * inslit * edge
        y = y - 0.0004 * inslit * np.where(row == km, 1.0, np.where(row == km + 1, -1.0, 0.0))
        # Hair: colour and a little volume above the hairline.
        hl = _hairline(A)
        soft = 0.009 + 0.008 * np.exp(-((np.abs(A) - 1.6) / 0.3) ** 2)  # behind the ears
        hair = _smoothstep(-soft, soft, y - hl) * (U < 0.9)
        radial = np.stack([x, np.zeros_like(x), z], -1)
        radial /= np.maximum(np.linalg.norm(radial, axis=-1, keepdims=True), 1e-9)
        up = np.clip((y - 0.04) / 0.09, 0.0, 1.0)[..., None]
        hair_dir = radial * (1 - up) + np.array([0.0, 1.0, 0.0]) * up
        hair_dir /= np.linalg.norm(hair_dir, axis=-1, keepdims=True)
        vol = 0.0055 * _smoothstep(0.0, 0.012, y - hl)[..., None] * (U < 0.9)[..., None]
        pts = np.stack([x, y, z], -1) + hair_dir * vol
        # Colours: skin, lips, hair; slightly warmer cheeks.
        alb = np.broadcast_to(np.asarray(st.skin), pts.shape).copy()
        dy = y - MOUTH_Y
        lip_w = np.clip(1.0 - (x / 0.027) ** 2, 0.0, None)
        lipmask = (_smoothstep(0.0100, 0.0075, dy) * _smoothstep(-0.0120, -0.0095, dy)
                   * _smoothstep(0.0, 0.15, lip_w) * (np.cos(A) > 0))
        alb = alb * (1 - lipmask[..., None]) + np.asarray(st.lips) * lipmask[..., None]
        cheek = 0.5 * _gauss2(np.abs(x), y, 0.045, -0.030, 0.014, 0.014) * (np.cos(A) > 0)
        blush = 0.12 * cheek[..., None]
        alb = alb * (1 - blush) + np.array([0.85, 0.40, 0.38]) * blush
        alb = alb * (1 - hair[..., None]) + np.asarray(st.hair) * hair[..., None]
        spec = 0.10 + 0.15 * lipmask - 0.04 * hair
        # Jaw weights: below a line from the mouth back to the jaw hinge, in front of the hinge.
        zh, yh = JAW_HINGE[2], JAW_HINGE[1]
        slope = (yh - MOUTH_Y) / (zh - 0.080)
        line_y = MOUTH_Y + slope * (z - 0.080)
        w_smooth = _smoothstep(0.008, -0.012, y - line_y) * _smoothstep(zh - 0.022, zh + 0.006, z)
        w_smooth *= _smoothstep(-0.03, -0.01, yh - y + 0.03)  # nothing above the hinge
        w_sharp = lower.astype(np.float64)
        jaw = w_smooth * (1 - inslit) + w_sharp * inslit
        # Pole rows at the crown and under the chin are rings of equal points; fine for shading.
        def skip(r, c):
            return r == km and inslit_col[c]

        faces = _grid_faces(nr, nc, wrap=True, skip=skip)
        # Outside the slit the two mouth rows are one: weld them so shading stays continuous.
        weld = np.arange(nr * nc)
        cols = np.flatnonzero(~inslit_col)
        weld[(km + 1) * nc + cols] = km * nc + cols
        faces = weld[faces]
        faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2])
                      & (faces[:, 0] != faces[:, 2])]
        faces = _orient_outward(pts.reshape(-1, 3), faces, np.array([0.0, 0.0, 0.0]))
        b.add(pts.reshape(-1, 3), faces, alb.reshape(-1, 3), spec.reshape(-1), SKIN,
              jaw=jaw.reshape(-1), lower=lower.reshape(-1))

        # Eyes: pole forward, crisp rings for pupil, iris and sclera.
        rings = [0.0, 0.10, 0.17, 0.19, 0.30, 0.37, 0.41, 0.6, 0.9, 1.25, 1.7, 2.3, np.pi]
        sv, sf, _ = _sphere_grid(rings, 24)
        th = np.arccos(np.clip(sv[:, 2], -1, 1))
        iris = np.asarray(st.iris)
        sclera = np.array([0.93, 0.91, 0.88])
        col = np.where((th <= 0.175)[:, None], np.array([0.03, 0.03, 0.03]),
                       np.where((th <= 0.305)[:, None], iris * 1.25,
                                np.where((th <= 0.385)[:, None], iris * 0.75, sclera)))
        for sx in (-1.0, 1.0):
            c = np.array([sx * EYE_X, EYE_Y, _front_z(sx * EYE_X, EYE_Y)[0] + 0.0085 - EYE_R])
            if sx < 0:
                self._eye_left = c
            else:
                self._eye_right = c
            b.add(sv * EYE_R + c, sf, col, 0.8, EYE)
            # Upper eyelid: a shell slightly larger than the eyeball covering its top,
            # with a dark lash line at its edge.
            for upper in (True, False):
                lv, lf, lcol = self._eyelid(c, st, upper)
                b.add(lv, lf, lcol, 0.12, LID)

        # Brows: ribbons lifted just off the skin.
        for sx in (-1.0, 1.0):
            t = np.linspace(0.0, 1.0, 12)
            bx = sx * (0.012 + 0.041 * t)
            by = 0.0205 + 0.0075 * np.sin(np.pi * t ** 0.8) - 0.003 * t
            h = 0.0060 * (1 - t) + 0.0025 * t
            rows = []
            for off in (0.5, 0.0, -0.5):
                yy = by + off * h
                zz = _front_z(bx, yy) + 0.0010 + 0.0006 * (off == 0.0)
                rows.append(np.stack([bx, yy, zz], -1))
            bv = np.concatenate(rows)
            bf = _grid_faces(3, len(t), wrap=False)
            if sx < 0:
                bf = bf[:, ::-1]
            bf = self._face_towards(bv, bf, np.array([0.0, 0.0, 1.0]))
            b.add(bv, bf, st.brows, 0.05, BROW)

        # Ears: flattened ellipsoids angled back, inner part darker.
        ev, ef, _ = _sphere_grid(np.linspace(0, np.pi, 10), 16)
        for sx in (-1.0, 1.0):
            loc = ev * np.array([0.0085, 0.029, 0.019])
            ang = sx * 0.35
            ca, sa = np.cos(ang), np.sin(ang)
            rot = np.array([[ca, 0, sa], [0, 1, 0], [-sa, 0, ca]])
            # pole axis (+z) of the sphere grid becomes the ear's outward x
            swap = np.array([[0, 0, sx], [0, 1, 0], [-sx, 0, 0]], dtype=np.float64)
            v = loc @ swap.T @ rot.T + np.array([sx * 0.071, -0.012, -0.014])
            inner = np.clip(ev[:, 2], 0, 1) * (1 - np.abs(ev[:, 1]))
            colr = np.asarray(st.skin) * (1 - 0.35 * inner[:, None]) * np.array([1.0, 0.93, 0.92])
            b.add(v, _orient_outward(v, ef, v.mean(0)), colr, 0.08, EAR)

        # Mouth cavity: an ellipsoid seen from the inside, dark; lower half follows the jaw.
        mz = _front_z(0.0, MOUTH_Y)[0]
        mv, mf, _ = _sphere_grid(np.linspace(0, np.pi, 14), 20)
        cav_c = np.array([0.0, MOUTH_Y - 0.004, mz - 0.027])
        v = mv * np.array([0.024, 0.017, 0.021]) + cav_c
        mf = _orient_outward(v, mf, cav_c)[:, ::-1]  # inward facing
        below = v[:, 1] < cav_c[1]
        jaw_m = _smoothstep(cav_c[1] + 0.004, cav_c[1] - 0.004, v[:, 1])
        shade = 0.55 + 0.45 * _smoothstep(cav_c[2] - 0.02, cav_c[2] + 0.02, v[:, 2])
        b.add(v, mf, np.array([0.36, 0.10, 0.11]) * shade[:, None], 0.05, MOUTH, jaw=jaw_m,
              lower=below)
        # Tongue: a flattened ellipsoid on the floor of the mouth.
        tv, tf, _ = _sphere_grid(np.linspace(0, np.pi, 10), 16)
        v = tv * np.array([0.017, 0.006, 0.018]) + np.array([0.0, MOUTH_Y - 0.013, mz - 0.026])
        b.add(v, _orient_outward(v, tf, v.mean(0)), np.array([0.72, 0.36, 0.36]), 0.25, TONGUE,
              jaw=1.0, lower=np.ones(len(v), bool))
        # Teeth: two curved strips behind the lips.
        for upper in (True, False):
            xs = np.linspace(-0.0205, 0.0205, 15)
            if upper:
                ys = np.array([MOUTH_Y + 0.0085, MOUTH_Y - 0.0015])
            else:
                ys = np.array([MOUTH_Y + 0.0005, MOUTH_Y - 0.0075])
            zs = mz - 0.0085 - 38.0 * xs ** 2
            v = np.stack([np.tile(xs, 2), np.repeat(ys, len(xs)), np.tile(zs, 2)], -1)
            f = self._face_towards(v, _grid_faces(2, len(xs), wrap=False),
                                   np.array([0.0, 0.0, 1.0]))
            edge = np.abs(np.repeat(ys, len(xs)) - MOUTH_Y) < 0.002
            colr = np.where(edge[:, None], np.array([0.92, 0.90, 0.84]),
                            np.array([0.82, 0.79, 0.72]))
            b.add(v, f, colr, 0.5, TEETH, jaw=0.0 if upper else 1.0,
                  lower=np.full(len(v), not upper))

        # Neck: an open elliptic cylinder that bends with the head.
        ny = np.linspace(-0.050, -0.200, 14)
        na = np.linspace(0, 2 * np.pi, 28, endpoint=False)
        NY, NA = np.meshgrid(ny, na, indexing="ij")
        top = _smoothstep(-0.085, -0.050, NY)
        nz = -0.020 - 0.012 * top + 0.055 * (1 - 0.2 * top) * np.cos(NA)
        v = np.stack([0.053 * np.sin(NA), NY, nz], -1).reshape(-1, 3)
        f = _orient_outward(v, _grid_faces(len(ny), len(na)), np.array([0.0, -0.13, -0.020]))
        hw = _smoothstep(-0.170, -0.090, v[:, 1])
        throat = np.clip(v[:, 2] + 0.02, 0, None) / 0.055
        shade = 1.0 - 0.15 * _smoothstep(-0.10, -0.13, v[:, 1]) * throat
        b.add(v, f, np.asarray(st.skin)[None] * shade[:, None], 0.06, NECK, head=hw)

        # Shoulders: lofted sections, closed over the top around the neck.
        ty = np.array([-0.150, -0.157, -0.166, -0.178, -0.192, -0.208, -0.228, -0.260, -0.320,
                       -0.400])
        tw = np.array([0.035, 0.075, 0.110, 0.138, 0.158, 0.172, 0.180, 0.184, 0.185, 0.185])
        td = np.array([0.035, 0.052, 0.063, 0.071, 0.077, 0.081, 0.084, 0.086, 0.087, 0.087])
        ta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        TY, TA = np.meshgrid(ty, ta, indexing="ij")
        pw = 3.2
        sx_ = np.sign(np.sin(TA)) * np.abs(np.sin(TA)) ** (2 / pw)
        sz_ = np.sign(np.cos(TA)) * np.abs(np.cos(TA)) ** (2 / pw)
        v = np.stack([tw[:, None] * sx_, TY, -0.025 + td[:, None] * sz_], -1).reshape(-1, 3)
        f = _grid_faces(len(ty), len(ta))
        f = _orient_outward(v, f, np.array([0.0, -0.30, -0.025]))
        collar = _smoothstep(-0.164, -0.156, v[:, 1])
        colr = np.asarray(st.shirt)[None] * (1 - 0.3 * collar[:, None])
        b.add(v, f, colr, 0.04, TORSO, head=0.0)
        return b.build()

    @staticmethod
    def _face_towards(v, f, direction):
        n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
        flip = n @ direction < 0
        f = f.copy()
        f[flip] = f[flip][:, ::-1]
        return f

    @staticmethod
    def _eyelid(center, st, upper=True):
        """A shell slightly larger than the eyeball covering its top (or bottom), with a
        lash line at its edge. Latitude beta about the x axis (0 = forward), longitude gamma."""
        if upper:
            beta = np.concatenate([[0.30, 0.36, 0.44], np.linspace(0.6, 1.8, 6)])
        else:
            beta = -np.concatenate([[0.44, 0.50, 0.58], np.linspace(0.75, 1.8, 5)])
        gamma = np.linspace(-1.25, 1.25, 15)
        B, G = np.meshgrid(beta, gamma, indexing="ij")
        r = EYE_R * (1.06 if upper else 1.05)
        v = np.stack([r * np.cos(B) * np.sin(G), r * np.sin(B), r * np.cos(B) * np.cos(G)], -1)
        v = v.reshape(-1, 3) + center
        f = _orient_outward(v, _grid_faces(len(beta), len(gamma), wrap=False), center)
        col = np.broadcast_to(np.asarray(st.skin) * (0.92 if upper else 0.95), (len(v), 3)).copy()
        edge = np.repeat(np.arange(len(beta)) < (2 if upper else 1), len(gamma))
        col[edge] = np.asarray(st.brows) * 0.6 if upper else np.asarray(st.skin) * 0.75
        return v, f, col

    def _blendshapes(self) -> np.ndarray:
        """(N_EXPRESSIONS, V, 3) displacement per unit coefficient."""
        v = self.rest
        x, y, z = v[:, 0], v[:, 1], v[:, 2]
        ax = np.abs(x)
        sgn = np.sign(x)
        face = np.isin(self.part, (SKIN, BROW, LID)) & (z > 0.0)
        lips_region = np.isin(self.part, (SKIN,)) & (z > 0.0)
        d = np.zeros((N_EXPRESSIONS, len(v), 3))
        # 0: mouth open / stretch: lips part (lower lip down more), mouth a little narrower
        g = _gauss2(x, y, 0.0, MOUTH_Y, 0.022, 0.012) * lips_region
        d[0, :, 1] = np.where(self.lower, -0.0060, 0.0022) * g
        d[0, :, 0] = -0.0025 * sgn * _gauss2(ax, y, MOUTH_HALF, MOUTH_Y, 0.010, 0.010) * lips_region
        # 1: smile: corners out, up and back; cheeks up
        g = _gauss2(ax, y, MOUTH_HALF, MOUTH_Y, 0.011, 0.011) * lips_region
        d[1, :, 0] = 0.0055 * sgn * g
        d[1, :, 1] = 0.0045 * g + 0.0025 * _gauss2(ax, y, 0.045, -0.030, 0.014, 0.014) * lips_region
        d[1, :, 2] = -0.0020 * g
        # 2: brows raised
        g = _gauss2(ax, y, 0.032, 0.026, 0.026, 0.016) * face
        g = np.where(self.part == BROW, 1.0, g)
        d[2, :, 1] = 0.0055 * g
        # 3: frown: inner brows down and together
        g = _gauss2(ax, y, 0.016, 0.022, 0.016, 0.012) * face
        g = np.where(self.part == BROW, np.exp(-((ax - 0.012) / 0.022) ** 2), g)
        d[3, :, 1] = -0.0045 * g
        d[3, :, 0] = -0.0022 * sgn * g
        # 4: rounding: lips forward, mouth narrower, a small round opening in the middle
        g = _gauss2(x, y, 0.0, MOUTH_Y, 0.020, 0.014) * lips_region
        d[4, :, 2] = 0.0075 * g
        d[4, :, 0] = -0.0075 * sgn * _gauss2(ax, y, MOUTH_HALF, MOUTH_Y, 0.012, 0.012) * lips_region
        d[4, :, 1] = (np.where(self.lower, -0.0012, 0.0010)
                      * _gauss2(x, y, 0.0, MOUTH_Y, 0.010, 0.006) * lips_region)
        # 5: closure / press: the lip band thins towards the slit and rolls in a little
        band = _gauss2(x, y, 0.0, MOUTH_Y, 0.030, 0.011) * lips_region
        d[5, :, 1] = -0.30 * (y - MOUTH_Y) * band
        d[5, :, 2] = -0.0015 * band
        # 6: lower lip tucked under the upper teeth (f, v): up and back
        g = _gauss2(x, y, 0.0, MOUTH_Y - 0.004, 0.024, 0.007) * lips_region * self.lower
        d[6, :, 1] = 0.0015 * g
        d[6, :, 2] = -0.0045 * g
        # teeth, cavity and tongue never move with blend shapes
        return d.astype(np.float64)

    # ------------------------------------------------------------------------------ pose
    def pose(self, frame: np.ndarray) -> np.ndarray:
        """Deformed vertices (V, 3) for one 56-float motion frame."""
        frame = np.asarray(frame, dtype=np.float64)
        exp = np.clip(frame[:N_EXPRESSIONS], -3.0, 3.0)
        # Negative lip opening, smile, closure and tuck would push the lips through each
        # other: damp them.
        exp = np.where((exp < 0) & np.isin(np.arange(N_EXPRESSIONS), (0, 1, 5, 6)), 0.35 * exp, exp)
        v = self.rest + np.tensordot(exp, self.blendshapes, axes=1)
        jaw = frame[50:53].copy()
        jaw[0] = JAW_SCALE * np.clip(jaw[0], -0.05, 0.7)
        # Lip seal: the lower lip edge turns by less than the jaw, by up to `seal` radians
        # (soft: about the whole angle while it is small), so a nearly closed jaw keeps the
        # lips together; pressing the lips (exp 5) holds them longer.
        seal = LIP_SEAL * (1.0 + max(exp[5], 0.0))
        lip = jaw.copy()
        lip[0] = jaw[0] - seal * np.tanh(max(jaw[0], 0.0) / seal)
        r, r_lip = axis_angle_to_matrix(jaw), axis_angle_to_matrix(lip)
        turned = (v - JAW_HINGE) @ r.T + JAW_HINGE
        turned_lip = (v - JAW_HINGE) @ r_lip.T + JAW_HINGE
        s = self.seal_weight[:, None]
        turned = turned + s * (turned_lip - turned)
        w = self.jaw_weight[:, None]
        v = v + w * (turned - v)
        r = axis_angle_to_matrix(frame[53:56])
        w = self.head_weight[:, None]
        v = v + w * (((v - NECK_PIVOT) @ r.T + NECK_PIVOT) - v)
        return v

    def normals(self, verts: np.ndarray) -> np.ndarray:
        return vertex_normals(verts, self.faces)
