"""The procedural MODEST-format dataset: rendered rooms, people-like figures on the floor, exact masks and depth.

Each background is a room (floor, walls, ceiling) with clutter standing in it (boxes, pillars, panels, plinths,
cabinets, tables), seen by a pinhole camera with random height, pitch, yaw, field of view and room size. Every
pixel is a ray; its first hit with a plane or a box gives the exact depth and the 3D point the surface's look is
read from, so perspective is right. About a third of the rooms are galleries (tiles or planks, framed pictures,
doors, ceiling lights); the rest wear textures with the statistics of photographs on every surface: 1/f colour
noise, stripes, camouflage-like blobs, dead leaves (overlapping shapes), tiles, near-plain colours, each at
several scales. Lighting varies from flat to contrasty (lamps, a window's directional light), with colour casts;
some rooms are dark, some bright, some low-texture.

Figures: people of varied build and pose (arms down, out, raised, waving; legs apart; side-on), with skirts,
dresses, coats, bags and hats, their clothes textured from the same distribution as the rooms; optionally
(`objects=`) generic cut-outs instead (blobs, polygons, furniture-like silhouettes). Each is stood on a random
visible floor point, clear of the clutter: its image height and position follow from projecting its feet and
head, and its pixels take the depth of a vertical plane through its feet. Some figures are cut by the frame's
edge (bg_fg_mask is the visible part); in some samples the clothes are re-dressed in a patch of the same room
(camouflage: only the comparison with bg tells the figure apart).

Depth convention: z-depth in metres (distance along the camera's optical axis, as in most depth maps),
stored as 8-bit grayscale JPEG with 0 m -> 0 and `MAX_DEPTH` m -> 255 (brighter = farther, as in MODEST).
A figure is a flat vertical plane facing the camera, so its depth is its feet's z-depth at the feet and,
with the camera pitched down, up to ~0.5 m nearer at the head (exact per pixel; no body roundness).

Layout and numbering follow MODEST: per (bg, fg) pair, placements 01..P at random standing points, then
P+1..2P the same figure mirrored at P other random points (so no sample's mirror twin stands in its place).
Masks are the cut-out's alpha >= 128 (0/255); bbox.txt holds the visible part of each pasted box.
Every room, figure and pair draws from its own numpy Generator seeded by (seed, kind, index), and workers
(a Pool over (bg, fg) pairs, each process rendering a room once) return bytes that the parent writes in a
fixed order, so the output is byte-identical whatever the worker count. A folder is written into
`<out>.partial/` (a progress log records finished pairs, so a re-run resumes) and renamed at the end; a zip
is streamed into `<out>.partial` and renamed (a re-run restarts it).

Run (a full-size MODEST twin, 400,000 samples at 224 px):
    python -c "from lib.synthetic import make_synthetic_dataset as m; m('data/synthetic')"
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing
import os
import shutil
import struct
import zipfile
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from .errors import UserError

try:  # faster JPEG encoding; optional (requirements.txt), OpenCV writes the same kind of JPEG without it
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

MAX_DEPTH = 20.0  # metres of z-depth that map to 255 in the depth JPEGs (farther is clipped)
VERSION = 2  # bump when the generator's output changes; part of dataset.json
JPEG_QUALITY = 90  # bg and bg_fg
TARGET_QUALITY = 95  # masks and depth maps: targets, so less JPEG ringing at the figure's edges
FG_HEIGHT = 108  # height of the fg/ cut-outs at size 224 (MODEST); scaled proportionally for other sizes
FIGURE_HEIGHT_M = (1.5, 1.9)  # real height range of the figures, metres
OBJECT_HEIGHT_M = (0.4, 1.6)  # real height range of the generic cut-outs (objects=...), metres
EDGE_FRACTION = 0.2  # placements that may stand partly outside the frame (cut by its left, right or top edge)
CAMOUFLAGE = 0.25  # samples whose clothes are re-dressed in a patch of their own room
FOLDERS = ("bg", "fg", "fg_mask", "bg_fg", "bg_fg_mask", "bg_fg_depth_map")
_ARG_KEYS = ("version", "size", "backgrounds", "foregrounds", "placements", "seed", "objects", "max_depth")
_GAMMA = 2.2
MUSEUM_FRACTION = 0.3  # rooms that keep the gallery look (tiles/planks, pictures, doors); the rest wear textures
_TABLE = 4096  # size of the per-room random table used as a hash for tiles, planks and pictures


# ----------------------------------------------------------------------------------------------------------
# Camera and room geometry
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Camera:
    """A pinhole camera: world x right, y up (floor at y=0), z into the room; image v grows downwards."""

    size: int
    focal: float  # pixels
    origin: np.ndarray  # (3,) world position
    rotation: np.ndarray  # (3, 3) camera -> world; columns are the camera's right, up and forward axes

    @classmethod
    def make(cls, size, fov_deg, origin, pitch_deg, yaw_deg) -> Camera:
        """Camera of square image `size` with field of view `fov_deg`, tilted down by pitch, turned right by yaw."""
        p, y = math.radians(pitch_deg), math.radians(yaw_deg)
        pitch = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
        yaw = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
        focal = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
        return cls(size, focal, np.asarray(origin, dtype=np.float64), yaw @ pitch)

    def make_rays(self, u, v) -> np.ndarray:
        """World directions through image points (u, v) (pixel centres at .5), scaled so camera-z is 1."""
        c = 0.5 * self.size
        d_cam = np.stack([(u - c) / self.focal, (c - v) / self.focal, np.ones_like(u)], axis=-1)  # (..., 3)
        return d_cam @ self.rotation.T  # (..., 3); a ray's hit parameter t is then the hit's z-depth

    def project(self, points) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image coordinates (u, v) and z-depth of world points (..., 3)."""
        c_pts = (np.asarray(points) - self.origin) @ self.rotation  # (..., 3) camera coordinates
        z = c_pts[..., 2]
        c = 0.5 * self.size
        return c + self.focal * c_pts[..., 0] / z, c - self.focal * c_pts[..., 1] / z, z


FLOOR, CEILING, LEFT, RIGHT, FAR, NEAR = range(6)
_NORMALS = np.array([[0, 1, 0], [0, -1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, -1], [0, 0, 1]], dtype=np.float64)


@dataclass
class Room:
    """A rendered room: image, exact depth, and what is needed to stand figures in it."""

    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 z-depth, metres
    surface: np.ndarray  # (H, W) uint8 surface id at each pixel centre (FLOOR, CEILING, LEFT, ...)
    camera: Camera
    dims: tuple[float, float, float]  # width (x), length (z), height (y), metres
    look: dict  # lights, exposure, vignetting: reused to light the figures
    boxes: list  # clutter: axis-aligned boxes {"lo", "hi", "tex"} standing in the room (surface ids 6, 7, ...)
    depth_u8: np.ndarray | None = None  # encode_depth(depth), filled in when the room is used for samples


def _trace(camera: Camera, dims, rays, boxes=()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First hit of each ray of an (H, W, 3) image grid with the room planes and the clutter boxes.

    Returns (t = z-depth, surface id, face): ids 0..5 are the room's planes, 6 + i the i-th box; `face`
    indexes `_NORMALS` (the hit's normal).
    """
    width, length, height = dims
    o = camera.origin
    planes = ((1, 0.0), (1, height), (0, 0.0), (0, width), (2, length), (2, 0.0))  # (axis, value) per id
    t = np.full(rays.shape[:-1], np.inf)
    surface = np.zeros(rays.shape[:-1], dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        for sid, (axis, value) in enumerate(planes):
            t_plane = (value - o[axis]) / rays[..., axis]
            better = (t_plane > 1e-9) & (t_plane < t)
            t = np.where(better, t_plane, t)
            surface[better] = sid
        face = surface.copy()
        for i, box in enumerate(boxes):  # slab test on the rays that can reach the box's projection
            sl = _box_window(camera, box, rays.shape[1])
            r = rays[sl]
            t_in, t_out = np.full(r.shape[:-1], -np.inf), np.full(r.shape[:-1], np.inf)
            axis = np.zeros(r.shape[:-1], np.int64)
            for a in range(3):
                ta, tb = (box["lo"][a] - o[a]) / r[..., a], (box["hi"][a] - o[a]) / r[..., a]
                near = np.minimum(ta, tb)
                later = near > t_in
                t_in = np.where(later, near, t_in)
                axis[later] = a
                t_out = np.minimum(t_out, np.maximum(ta, tb))
            better = (t_in > 1e-9) & (t_in <= t_out) & (t_in < t[sl])
            t[sl] = np.where(better, t_in, t[sl])
            surface[sl][better] = 6 + i
            # entering along +axis means hitting the face whose normal points along -axis
            positive = np.take_along_axis(r, axis[..., None], -1)[..., 0] > 0
            face[sl][better] = _BOX_FACES[axis[better], positive[better].astype(int)]
    return t, surface, face


def _box_window(camera: Camera, box, grid) -> tuple[slice, slice]:
    """Rows and columns of a grid x grid ray image that can see the box (all of it when a corner is behind)."""
    corners = np.array(
        [[box[k][0], box[m][1], box[n][2]] for k in ("lo", "hi") for m in ("lo", "hi") for n in ("lo", "hi")]
    )
    u, v, z = camera.project(corners)
    if (z < 0.05).any():
        return slice(None), slice(None)
    k = grid / camera.size
    c0, c1 = max(int(u.min() * k) - 1, 0), max(int(math.ceil(u.max() * k)) + 1, 0)
    r0, r1 = max(int(v.min() * k) - 1, 0), max(int(math.ceil(v.max() * k)) + 1, 0)
    return slice(r0, r1), slice(c0, c1)


# face id (into _NORMALS) of a box face hit along axis (0 x, 1 y, 2 z) by a ray going - (col 0) or + (col 1)
_BOX_FACES = np.array([[LEFT, RIGHT], [FLOOR, CEILING], [NEAR, FAR]], dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Room appearance
# ----------------------------------------------------------------------------------------------------------

_WALL_PALETTE = (
    np.array(  # twelve colours, in two rows of six like the palettes below
        [[236, 232, 222], [225, 220, 205], [200, 200, 196], [214, 205, 186], [170, 60, 55], [52, 70, 110]]
        + [[60, 100, 80], [196, 160, 90], [120, 120, 125], [240, 240, 240], [150, 110, 90], [90, 120, 140]]
    )
    / 255.0
)
_WOOD_PALETTE = (
    np.array([[176, 128, 78], [140, 92, 52], [110, 70, 42], [196, 160, 112], [150, 140, 128], [88, 56, 38]]) / 255.0
)
_STONE_PALETTE = (
    np.array(
        [[230, 226, 218], [60, 58, 56], [180, 170, 150], [150, 150, 150], [200, 190, 180], [120, 100, 80], [40, 50, 60]]
    )
    / 255.0
)


def _jitter(rng, color, amount=0.06) -> np.ndarray:
    """A colour with a little random variation, kept in [0, 1]."""
    return np.clip(np.asarray(color) * rng.uniform(1 - amount, 1 + amount, 3), 0, 1)


def _random_color(rng, sat=(0.3, 0.9), val=(0.3, 0.95)) -> np.ndarray:
    """A random saturated colour (RGB in [0, 1])."""
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val)))


def _make_painting(rng) -> dict:
    """Parameters of one procedural painting."""
    kind = int(rng.integers(3))
    colors = [_random_color(rng) for _ in range(6)]
    p = {"kind": kind, "colors": colors}
    if kind == 0:  # landscape
        p.update(
            horizon=rng.uniform(0.35, 0.7),
            amp=rng.uniform(0.02, 0.1),
            freq=rng.uniform(0.5, 2.5),
            phase=rng.random(),
            sun=(rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.3), rng.uniform(0.04, 0.1)),
        )
    elif kind == 1:  # abstract blobs
        p.update(blobs=[(rng.random(), rng.random(), rng.uniform(0.1, 0.35)) for _ in range(4)])
    else:  # colour fields
        p.update(cuts=np.sort(rng.uniform(0.1, 0.9, 3)), vertical=bool(rng.random() < 0.5))
    return p


def _paint(p, s, q) -> np.ndarray:
    """Colours (n, 3) of painting `p` at local coordinates s (across) and q (down) in [0, 1]."""
    c = p["colors"]
    s, q = s[:, None], q[:, None]
    if p["kind"] == 0:
        hor = p["horizon"] + p["amp"] * np.sin(2 * np.pi * (s * p["freq"] + p["phase"]))
        sky = c[0] + (c[1] - c[0]) * np.clip(q / hor, 0, 1)
        ground = c[2] + (c[3] - c[2]) * np.clip((q - hor) / (1 - hor), 0, 1)
        col = np.where(q < hor, sky, ground)
        sx, sy, r = p["sun"]
        return np.where((s - sx) ** 2 + (q - sy) ** 2 < r * r, c[4], col)
    if p["kind"] == 1:
        col = np.broadcast_to(c[5], (len(s), 3)).copy()
        for (bx, by, r), bc in zip(p["blobs"], c[:4]):
            w = np.exp(-((s - bx) ** 2 + (q - by) ** 2) / (r * r))
            col = col * (1 - w) + bc * w
        return col
    x = s[:, 0] if p["vertical"] else q[:, 0]
    return np.asarray(c)[np.searchsorted(p["cuts"], x)]


def _make_wall_items(rng, length, height, wainscot) -> list[dict]:
    """Pictures and doors along one wall of `length` metres: non-overlapping rectangles in (a, y)."""
    items, a = [], rng.uniform(0.3, 1.5)
    while True:
        if rng.random() < 0.12:
            w = rng.uniform(0.9, 1.4)
            item = {
                "kind": "door",
                "a0": a,
                "a1": a + w,
                "y0": 0.0,
                "y1": min(rng.uniform(2.0, 2.4), height - 0.3),
                "color": _jitter(rng, _WOOD_PALETTE[rng.integers(len(_WOOD_PALETTE))], 0.15),
            }
        else:
            w = rng.uniform(0.4, 2.2)
            h = rng.uniform(0.35, min(1.6, height - 1.4))
            bottom = max(wainscot + 0.15, rng.uniform(1.6, 1.9) - h / 2)
            item = {
                "kind": "picture",
                "a0": a,
                "a1": a + w,
                "y0": bottom,
                "y1": min(bottom + h, height - 0.2),
                "frame": rng.uniform(0.03, 0.1),
                "mat": rng.uniform(0.0, 0.08),
                "frame_color": _jitter(
                    rng,
                    [(0.75, 0.6, 0.25), (0.1, 0.08, 0.07), (0.45, 0.3, 0.18), (0.9, 0.9, 0.88)][rng.integers(4)],
                    0.1,
                ),
                "painting": _make_painting(rng),
            }
        if item["a1"] > length - 0.3:
            break
        if rng.random() < 0.8:
            items.append(item)
        a = item["a1"] + rng.uniform(0.3, 2.0)
    return items


def _make_look(rng, dims, n) -> dict:
    """All random appearance parameters of a room (textures, pictures, lights)."""
    width, length, height = dims
    look: dict = {"table": rng.random(_TABLE)}
    kind = ("tiles", "planks", "stone")[rng.integers(3)]
    if kind == "tiles":
        c1 = _jitter(rng, _STONE_PALETTE[rng.integers(len(_STONE_PALETTE))])
        c2 = c1 if rng.random() < 0.5 else _jitter(rng, _STONE_PALETTE[rng.integers(len(_STONE_PALETTE))])
        floor = {
            "kind": kind,
            "c1": c1,
            "c2": c2,
            "tile": rng.uniform(0.3, 1.0),
            "grout": rng.uniform(0.005, 0.02),
            "grout_color": _jitter(rng, [0.5, 0.5, 0.48]),
            "vary": rng.uniform(0.02, 0.12),
            "diagonal": bool(rng.random() < 0.25),
        }
    elif kind == "planks":
        floor = {
            "kind": kind,
            "c1": _jitter(rng, _WOOD_PALETTE[rng.integers(len(_WOOD_PALETTE))], 0.1),
            "plank": rng.uniform(0.1, 0.25),
            "length": rng.uniform(0.8, 2.5),
            "along_z": bool(rng.random() < 0.6),
            "seam": rng.uniform(0.002, 0.006),
            "vary": rng.uniform(0.08, 0.25),
            "grain": rng.uniform(8, 30),
        }
    else:
        floor = {
            "kind": kind,
            "c1": _jitter(rng, _STONE_PALETTE[rng.integers(len(_STONE_PALETTE))]),
            "slab": rng.uniform(1.0, 3.0),
            "vary": rng.uniform(0.03, 0.1),
            "seam": rng.uniform(0.003, 0.01),
        }
    look["floor"] = floor
    wall = _jitter(rng, _WALL_PALETTE[rng.integers(len(_WALL_PALETTE))])
    look["walls"] = [wall, wall, wall if rng.random() < 0.6 else _random_color(rng, (0.2, 0.7), (0.3, 0.8)), wall]
    look["wainscot"] = rng.uniform(0.8, 1.1) if rng.random() < 0.4 else 0.0
    look["wainscot_color"] = _jitter(rng, _WOOD_PALETTE[rng.integers(len(_WOOD_PALETTE))], 0.1)
    look["baseboard"] = rng.uniform(0.06, 0.15)
    look["baseboard_color"] = _jitter(rng, [(0.95, 0.95, 0.93), (0.2, 0.18, 0.17), (0.45, 0.32, 0.2)][rng.integers(3)])
    look["ceiling"] = _jitter(rng, [0.93, 0.92, 0.9], 0.05)
    look["items"] = {
        LEFT: _make_wall_items(rng, length, height, look["wainscot"]),
        RIGHT: _make_wall_items(rng, length, height, look["wainscot"]),
        FAR: _make_wall_items(rng, width, height, look["wainscot"]),
    }
    nx, nz = int(rng.integers(1, 4)), int(rng.integers(2, 6))
    xs = (np.arange(nx) + 0.5) / nx * width
    zs = (np.arange(nz) + 0.5) / nz * length
    lights = np.array([[x, height - 0.02, z] for z in zs for x in xs])
    lights[:, [0, 2]] += rng.uniform(-0.3, 0.3, (len(lights), 2))
    look["lights"] = lights
    look["light_shape"] = ("disc", "panel", "strip")[rng.integers(3)]
    look["light_size"] = rng.uniform(0.15, 0.35)
    warm = rng.uniform(0, 1)
    look["light_color"] = np.array([1.0, 0.93 + 0.07 * (1 - warm), 0.8 + 0.2 * (1 - warm)])
    look["ambient"] = rng.uniform(0.03, 0.8)  # flat (high) to contrasty (low) lighting
    look["r0"] = rng.uniform(2.0, 4.0)  # distance (m) at which a light's irradiance halves
    look["power"] = float(np.exp(rng.uniform(np.log(0.3), np.log(3.0))))  # weak to strong lamps
    look["sun"] = None
    if rng.random() < 0.4:  # light through a window: one strong direction, one side of everything lit
        a = rng.uniform(0, 2 * np.pi)
        d = np.array([math.cos(a), -rng.uniform(0.2, 1.2), math.sin(a)])
        look["sun"] = (d / np.linalg.norm(d), rng.uniform(0.5, 3.0))
    look["haze"] = rng.uniform(30, 80)  # metres
    look["vignette"] = rng.uniform(0.0, 0.3)
    look["noise"] = rng.uniform(0.5, 4) / 255
    look["mottle"] = rng.normal(0, rng.uniform(0.01, 0.05), (5, 5))
    mood = rng.random()  # exposure after auto-exposure: some rooms dark, some bright
    look["gain"] = float(
        rng.uniform(0.03, 0.15) if mood < 0.15 else rng.uniform(1.8, 3.5) if mood < 0.3 else np.exp(rng.normal(0, 0.4))
    )
    look["light_color"] = look["light_color"] * np.exp(rng.normal(0, 0.1, 3))  # a colour cast
    _make_room_textures(rng, look, n)
    return look


def _make_room_textures(rng, look, n) -> None:
    """Decide which surfaces wear photo-statistics textures: all of them in most rooms, some in the museums."""
    museum = bool(rng.random() < MUSEUM_FRACTION)
    low = rng.random() < 0.15  # a low-texture room: mostly plain surfaces

    def texture(scale=(0.8, 6.0)):
        return _make_surface_texture(rng, n, "plain" if low and rng.random() < 0.8 else None, scale)

    textures: dict = {}
    walls = (LEFT, RIGHT, FAR, NEAR)
    if museum:
        if rng.random() < 0.3:
            textures.update(dict.fromkeys(walls, texture()))
    else:
        textures[FLOOR] = texture((0.5, 6.0))
        shared = texture()
        for wall in walls:
            textures[wall] = shared if rng.random() < 0.6 else texture()
        if rng.random() < 0.6:
            textures[CEILING] = texture()
        if rng.random() < 0.7:  # no pictures or doors: not a gallery
            look["items"] = {}
            look["wainscot"] = 0.0
        if rng.random() < 0.5:
            look["baseboard"] = 0.0
    look["museum"] = museum
    look["textures"] = textures
    look["fixtures"] = museum or bool(rng.random() < 0.4)  # lamps visible on the ceiling


def _make_clutter(rng, dims, origin, museum, n) -> list[dict]:
    """Boxes, pillars, panels, plinths, cabinets and tables standing in the room (axis-aligned, textured)."""
    width, length, height = dims
    kinds = ("plinth",) if museum else ("box", "pillar", "panel", "plinth", "cabinet", "table")
    count = int(rng.integers(0, 4) if museum else rng.integers(0, 8))
    z_min = origin[2] + 1.2  # nothing right in front of the lens
    boxes: list[dict] = []
    pool = [_make_surface_texture(rng, n, scale=(0.2, 2.0)) for _ in range(min(count, 3))]  # materials repeat
    for _ in range(count):
        kind = kinds[rng.integers(len(kinds))]
        tex = pool[rng.integers(len(pool))]
        w, d, h = {
            "box": (rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.2)),
            "pillar": (rng.uniform(0.25, 0.8), rng.uniform(0.25, 0.8), height),
            "panel": (rng.uniform(0.8, 3.0), rng.uniform(0.04, 0.15), rng.uniform(1.2, min(2.8, height))),
            "plinth": (rng.uniform(0.4, 1.0), rng.uniform(0.4, 1.0), rng.uniform(0.5, 1.3)),
            "cabinet": (rng.uniform(0.8, 2.5), rng.uniform(0.35, 0.6), rng.uniform(0.8, min(2.2, height))),
            "table": (rng.uniform(0.8, 2.0), rng.uniform(0.6, 1.2), rng.uniform(0.7, 0.8)),
        }[kind]
        if rng.random() < 0.5 and kind in ("panel", "cabinet"):  # turned along the room's length
            w, d = d, w
        if w > width - 0.2 or z_min + d > length - 0.1:
            continue
        x0, z0 = rng.uniform(0, width - w), rng.uniform(z_min, length - d)
        if kind == "cabinet":  # against a side wall
            x0 = 0.0 if rng.random() < 0.5 else width - w
        if kind != "table":
            boxes.append({"lo": np.array([x0, 0.0, z0]), "hi": np.array([x0 + w, h, z0 + d]), "tex": tex})
            continue
        top, leg = rng.uniform(0.03, 0.08), rng.uniform(0.04, 0.08)
        boxes.append({"lo": np.array([x0, h - top, z0]), "hi": np.array([x0 + w, h, z0 + d]), "tex": tex})
        for lx in (x0, x0 + w - leg):
            for lz in (z0, z0 + d - leg):
                boxes.append({"lo": np.array([lx, 0.0, lz]), "hi": np.array([lx + leg, h - top, lz + leg]), "tex": tex})
    return boxes


def _surface_coords(p, face) -> tuple[np.ndarray, np.ndarray]:
    """Texture coordinates (metres) in the plane of each hit: (x, z) on floors, (z, y) on x-walls, (x, y) else."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    horizontal = (face == FLOOR) | (face == CEILING)
    x_wall = (face == LEFT) | (face == RIGHT)
    return np.where(x_wall, z, x), np.where(horizontal, z, y)


def _line_coverage(dist, width, footprint) -> np.ndarray:
    """Fraction of a pixel of `footprint` metres covered by a line of `width` at `dist` from its centre line."""
    return (
        np.clip(np.minimum(dist + footprint / 2, width / 2) - np.maximum(dist - footprint / 2, -width / 2), 0, None)
        / footprint
    )


def _grid_dist(x, period) -> np.ndarray:
    """Distance (same units as x) to the nearest multiple of `period`."""
    f = np.mod(x, period)
    return np.minimum(f, period - f)


def _hash(table, *ints) -> np.ndarray:
    """A per-cell random value in [0, 1) for integer cell coordinates."""
    h = np.zeros_like(ints[0], dtype=np.int64)
    for k, i in zip((73856093, 19349663, 83492791), ints):
        h ^= i.astype(np.int64) * k
    return table[h % _TABLE]


# ----------------------------------------------------------------------------------------------------------
# Textures with the statistics of photographs (shared by rooms, clutter, clothes and objects)
# ----------------------------------------------------------------------------------------------------------

_TEX = 128  # texels per side of a texture tile (periodic, so it repeats without seams)
_TEXTURE_KINDS = ("noise", "stripes", "blobs", "leaves", "grid", "plain", "mix")
_TEXTURE_P = (0.22, 0.12, 0.14, 0.18, 0.09, 0.13, 0.12)


def _fractal_noise(rng, n, beta) -> np.ndarray:
    """(n, n) periodic noise with power ~ 1/f^beta (photographs: beta ~ 2), zero mean, unit std."""
    fy, fx = np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None, :]
    r = np.sqrt(fx * fx + fy * fy)
    r[0, 0] = 1
    spec = (rng.normal(size=r.shape) + 1j * rng.normal(size=r.shape)) * r ** (-beta / 2)
    spec[0, 0] = 0
    out = np.fft.irfft2(spec, s=(n, n))
    return ((out - out.mean()) / (out.std() + 1e-9)).astype(np.float32)


def _natural_color(rng) -> np.ndarray:
    """A colour as photographs have them: mostly muted, sometimes vivid, dark to bright (RGB in [0, 1])."""
    vivid = rng.random() < 0.25
    return np.array(
        colorsys.hsv_to_rgb(
            rng.random(), rng.uniform(0.4, 0.95) if vivid else rng.uniform(0, 0.45), rng.uniform(0.08, 0.95)
        )
    )


def _make_palette(rng, k) -> np.ndarray:
    """k colours (k, 3): unrelated, or shades of one colour (as one material's)."""
    if rng.random() < 0.5:
        return np.stack([_natural_color(rng) for _ in range(k)])
    base = _natural_color(rng)
    return np.clip(base * rng.uniform(0.45, 1.5, (k, 1)) + rng.normal(0, 0.04, (k, 3)), 0, 1)


def _ramp(values, palette) -> np.ndarray:
    """Map values in [0, 1] (n, n) through a piecewise-linear colour ramp -> (n, n, 3)."""
    pos = np.linspace(0, 1, len(palette))
    return np.stack([np.interp(values, pos, palette[:, c]) for c in range(3)], axis=-1)


def make_texture(rng, kind=None, n=_TEX) -> np.ndarray:
    """A random periodic texture tile (n, n, 3) float32 sRGB in [0, 1]: 1/f colour noise, stripes, blobs,
    dead leaves (overlapping shapes, the classic model of photo statistics), tiles, a near-plain colour, or a
    mix of two of these across soft blob edges or hard straight ones."""
    kind = kind or _TEXTURE_KINDS[rng.choice(len(_TEXTURE_KINDS), p=_TEXTURE_P)]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    if kind == "noise":
        v = _fractal_noise(rng, n, rng.uniform(1.4, 3.2))
        img = _ramp(np.clip(0.5 + v * rng.uniform(0.12, 0.3), 0, 1), _make_palette(rng, int(rng.integers(2, 5))))
    elif kind == "stripes":
        kx, ky = int(rng.integers(-6, 7)), int(rng.integers(1, 9))
        phase = 2 * np.pi * (kx * xx + ky * yy) + rng.uniform(0, 2.5) * _fractal_noise(rng, n, 3.0)
        wave = np.sin(phase)
        wave = np.clip(wave * rng.uniform(1, 12), -1, 1) * 0.5 + 0.5  # soft to hard edges
        img = _ramp(wave, _make_palette(rng, 2))
    elif kind == "blobs":  # camouflage-like regions from thresholded noise
        pal = _make_palette(rng, int(rng.integers(2, 5)))
        img = np.broadcast_to(pal[0], (n, n, 3)).copy()
        for c in pal[1:]:
            v = _fractal_noise(rng, n, rng.uniform(2.5, 4.0))
            w = np.clip((v - rng.uniform(-0.3, 0.8)) * rng.uniform(2, 10), 0, 1)[..., None]
            img = img * (1 - w) + c * w
    elif kind == "leaves":  # dead leaves: occluding discs and boxes with power-law sizes
        img = np.zeros((n, n, 3), np.float32)
        img[:] = _natural_color(rng)
        pal = _make_palette(rng, 6)
        for _ in range(int(rng.integers(40, 160))):
            r = int(n * 0.5 * rng.uniform(0.03, 1) ** 2.5) + 1
            cx, cy = int(rng.integers(n)), int(rng.integers(n))
            col = tuple(float(c) for c in np.clip(pal[rng.integers(6)] * rng.uniform(0.7, 1.3), 0, 1))
            disc = rng.random() < 0.5
            # drawn again one tile over where it crosses the border, so the tile stays periodic
            for dx in {0, n * (cx - r < 0), -n * (cx + r >= n)}:
                for dy in {0, n * (cy - r < 0), -n * (cy + r >= n)}:
                    if disc:
                        cv2.circle(img, (cx + dx, cy + dy), r, col, -1, cv2.LINE_AA)
                    else:
                        cv2.rectangle(img, (cx + dx - r, cy + dy - r // 2), (cx + dx + r, cy + dy + r // 2), col, -1)
    elif kind == "grid":
        cells = int(2 ** rng.integers(1, 5))
        pal = _make_palette(rng, 3)
        ci = (np.floor(xx * cells) + 7 * np.floor(yy * cells)).astype(int)
        pick = rng.integers(3, size=cells * cells * 8)[ci % (cells * cells * 8)]
        img = pal[pick] * rng.uniform(0.85, 1.15, cells * cells * 8)[ci % (cells * cells * 8)][..., None]
        fx, fy = np.mod(xx * cells, 1), np.mod(yy * cells, 1)
        line = (np.minimum(np.minimum(fx, 1 - fx), np.minimum(fy, 1 - fy)) < rng.uniform(0.01, 0.08))[..., None]
        img = np.where(line, _natural_color(rng), img)
    elif kind == "mix":  # two textures, split by blob outlines or by straight (periodic) edges
        first, second = (make_texture(rng, _TEXTURE_KINDS[rng.integers(6)], n) for _ in range(2))
        if rng.random() < 0.5:
            split = _fractal_noise(rng, n, rng.uniform(2.5, 4.0)) * rng.uniform(2, 20)
        else:
            split = np.sin(
                2 * np.pi * (int(rng.integers(0, 3)) * xx + int(rng.integers(1, 4)) * yy) + rng.uniform(0, 6.3)
            )
            split = split * 50
        w = np.clip(split + 0.5, 0, 1)[..., None]
        img = first * w + second * (1 - w)
    else:  # near-plain: the low-texture surfaces of real rooms
        img = np.broadcast_to(_natural_color(rng), (n, n, 3)).copy()
    # texture at several scales: a slow 1/f modulation of brightness over the whole tile
    mod = 1 + rng.uniform(0.02, 0.25) * _fractal_noise(rng, n, 3.0)[..., None]
    return np.clip(img * mod, 0, 1).astype(np.float32)


def _make_mips(tile) -> list[np.ndarray]:
    """The tile and its halvings down to 1 x 1 (so distant texture averages instead of aliasing)."""
    levels = [tile]
    while levels[-1].shape[0] > 1:
        levels.append(cv2.resize(levels[-1], None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))
    return levels


def _sample_tile(img, s, t) -> np.ndarray:
    """Bilinear, wrapped lookup of (m, m, 3) `img` at texel coordinates (s, t) (n,) -> (n, 3)."""
    m, n = img.shape[0], len(s)
    rows = -(-n // 4096)  # cv2.remap wants maps under 32767 a side
    maps = np.zeros((2, rows * 4096), np.float32)
    maps[0, :n], maps[1, :n] = np.mod(s - 0.5, m), np.mod(t - 0.5, m)  # wrapped first: float32 keeps its precision
    out = cv2.remap(
        img, maps[0].reshape(rows, 4096), maps[1].reshape(rows, 4096), cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP
    )
    return out.reshape(-1, 3)[:n]


def _sample_texture(tex, s, t, fp) -> np.ndarray:
    """Colours (n, 3) of surface texture `tex` at surface coordinates (s, t) metres, footprint fp metres per sample."""
    levels, scale = tex["mips"], tex["scale"]
    texels = levels[0].shape[0] / scale  # texels per metre at level 0
    lod = np.clip(np.rint(np.log2(np.maximum(fp * texels, 1e-6))), 0, len(levels) - 1).astype(int)
    out = np.empty((len(s), 3), np.float32)
    for level in np.unique(lod):
        sel = lod == level
        k = texels / 2**level
        out[sel] = _sample_tile(levels[level], s[sel] * k, t[sel] * k)
    # a second, much coarser lookup of the same tile breaks the repetition over large surfaces
    coarse = levels[min(4, len(levels) - 1)]
    k = texels / 2 ** min(4, len(levels) - 1) / tex["coarse"]
    big = _sample_tile(coarse, s * k + 0.37 * coarse.shape[0], t * k).mean(1, keepdims=True)
    return np.clip(out * (1 + tex["coarse_amp"] * (big / max(tex["mean"], 1e-3) - 1)), 0, 1)


def _make_surface_texture(rng, n, kind=None, scale=(0.4, 4.0)) -> dict:
    """A texture as laid on a surface: the (n, n) tile, its mips, metres per tile, and a coarse modulation."""
    tile = make_texture(rng, kind, n)
    return {
        "mips": _make_mips(tile),
        "scale": float(np.exp(rng.uniform(*np.log(scale)))),
        "coarse": float(rng.uniform(3, 9)),
        "coarse_amp": float(rng.uniform(0, 0.5)),
        "mean": float(tile.mean()),
    }


def _floor_albedo(f, table, x, z, fp) -> np.ndarray:
    """Floor colours (n, 3) at floor points (x, z); `fp` is the pixel footprint in metres (for anti-aliasing)."""
    if f["kind"] == "tiles":
        if f["diagonal"]:
            x, z = (x + z) / math.sqrt(2), (x - z) / math.sqrt(2)
        s = f["tile"]
        i, j = np.floor(x / s), np.floor(z / s)
        fade = np.clip(1 - fp / s, 0, 1)[:, None]
        checker = (np.mod(i + j, 2) == 1)[:, None]
        base = np.where(checker, f["c1"], f["c2"])
        mean = (f["c1"] + f["c2"]) / 2
        base = mean + (base - mean) * fade
        base = base * (1 + f["vary"] * (_hash(table, i, j) - 0.5) * fade[:, 0])[:, None]
        grout = np.maximum(
            _line_coverage(_grid_dist(x, s), f["grout"], fp), _line_coverage(_grid_dist(z, s), f["grout"], fp)
        )
        grout = np.where(fp > s, 2 * f["grout"] / s, grout)[:, None]
        return base * (1 - grout) + f["grout_color"] * grout
    if f["kind"] == "planks":
        a, b = (z, x) if f["along_z"] else (x, z)
        w, length = f["plank"], f["length"]
        row = np.floor(b / w)
        a_off = a + _hash(table, row) * length
        idx = np.floor(a_off / length)
        fade = np.clip(1 - fp / w, 0, 1)
        tone = 1 + f["vary"] * (_hash(table, row, idx) - 0.5) * fade
        grain_fade = np.clip(1 - fp * f["grain"], 0, 1)
        grain = 1 + 0.06 * np.sin(2 * np.pi * (b * f["grain"] + 0.15 * np.sin(a * 3 + row))) * grain_fade
        seam = np.maximum(
            _line_coverage(_grid_dist(b, w), f["seam"], fp), _line_coverage(_grid_dist(a_off, length), f["seam"], fp)
        )
        seam = np.where(fp > w, f["seam"] / w, seam)
        return f["c1"] * (tone * grain * (1 - 0.6 * seam))[:, None]
    s = f["slab"]
    i, j = np.floor(x / s), np.floor(z / s)
    veins = 1 + 0.05 * np.sin(3.1 * x + 2.3 * np.sin(1.7 * z)) * np.sin(2.7 * z + 1.3 * np.sin(2.1 * x))
    seam = np.maximum(_line_coverage(_grid_dist(x, s), f["seam"], fp), _line_coverage(_grid_dist(z, s), f["seam"], fp))
    tone = (1 + f["vary"] * (_hash(table, i, j) - 0.5)) * veins * (1 - 0.4 * seam)
    return f["c1"] * tone[:, None]


def _wall_albedo(look, wall, a, y) -> np.ndarray:
    """Wall colours (n, 3) of wall `wall` at (a = along the wall, y = height)."""
    col = np.broadcast_to(look["walls"][wall - LEFT], (len(a), 3)).copy()
    if look["wainscot"] > 0:
        low = y < look["wainscot"]
        col[low] = look["wainscot_color"] * (1 - 0.15 * (_grid_dist(a[low], 0.6) < 0.02))[:, None]
        col[np.abs(y - look["wainscot"]) < 0.02] = look["wainscot_color"] * 0.7
    col[y < look["baseboard"]] = look["baseboard_color"]
    for it in look["items"].get(wall, ()):
        inside = (a >= it["a0"]) & (a < it["a1"]) & (y >= it["y0"]) & (y < it["y1"])
        if not inside.any():
            continue
        ia, iy = a[inside], y[inside]
        edge = np.minimum(np.minimum(ia - it["a0"], it["a1"] - ia), np.minimum(iy - it["y0"], it["y1"] - iy))
        if it["kind"] == "door":
            c = np.broadcast_to(it["color"], (len(ia), 3)).copy()
            c[edge < 0.06] *= 0.75
            w, h = it["a1"] - it["a0"], it["y1"] - it["y0"]
            s, q = (ia - it["a0"]) / w, (iy - it["y0"]) / h
            panel = (np.abs(s - 0.5) < 0.32) & (((q > 0.08) & (q < 0.45)) | ((q > 0.55) & (q < 0.92)))
            c[panel] *= 0.88
            knob = (np.abs(s - 0.85) * w < 0.03) & (np.abs(q - 0.5) * h < 0.03)
            c[knob] = (0.8, 0.7, 0.35)
        else:
            fw = it["frame"]
            c = np.broadcast_to(it["frame_color"], (len(ia), 3)).copy()
            c *= (1 - 0.3 * np.clip(1 - edge / fw, 0, 1))[:, None] if fw > 0 else 1
            inner = edge >= fw
            c[inner & (edge < fw + it["mat"])] = (0.95, 0.94, 0.9)
            art = edge >= fw + it["mat"]
            m = fw + it["mat"]
            w, h = it["a1"] - it["a0"] - 2 * m, it["y1"] - it["y0"] - 2 * m
            if art.any() and w > 0 and h > 0:
                c[art] = _paint(it["painting"], (ia[art] - it["a0"] - m) / w, (it["y1"] - m - iy[art]) / h)
        col[inside] = c
    return col


def _ceiling_emission(look, x, z) -> np.ndarray:
    """Emitted radiance factor (n,) of the light fixtures on the ceiling at (x, z)."""
    e = np.zeros(len(x))
    r = look["light_size"]
    for lx, _, lz in look["lights"]:
        dx, dz = np.abs(x - lx), np.abs(z - lz)
        if look["light_shape"] == "disc":
            inside = dx * dx + dz * dz < r * r
        elif look["light_shape"] == "panel":
            inside = (dx < 1.5 * r) & (dz < 1.5 * r)
        else:
            inside = (dx < 0.4 * r) & (dz < 4 * r)
        e[inside] = 1.0
    return e


def _irradiance(look, points, normals) -> np.ndarray:
    """Light (n,) arriving at world points with the given unit normals: ambient + falloff-weighted lights."""
    px, py, pz = points.T
    nx, ny, nz = normals.T
    e = np.zeros(len(points), dtype=points.dtype)
    inv_r02 = 1.0 / look["r0"] ** 2
    for lx, ly, lz in look["lights"]:
        dx, dy, dz = lx - px, ly - py, lz - pz
        dist2 = dx * dx + dy * dy + dz * dz
        cos = (dx * nx + dy * ny + dz * nz) / np.sqrt(dist2)
        e += np.maximum(cos, 0) / (1 + dist2 * inv_r02)
    e = look["ambient"] + look["power"] * e
    if look["sun"] is not None:
        d, strength = look["sun"]
        e += strength * np.maximum(-(nx * d[0] + ny * d[1] + nz * d[2]), 0)
    return e.astype(points.dtype)


def _irradiance_at(look, point, normal) -> float:
    """`_irradiance` at one point (a figure's chest), without the per-array overhead."""
    d = look["lights"] - point  # (L, 3)
    dist2 = (d * d).sum(1)
    cos = np.maximum(d @ normal, 0) / np.sqrt(dist2)
    e = look["ambient"] + look["power"] * float((cos / (1 + dist2 / look["r0"] ** 2)).sum())
    if look["sun"] is not None:
        e += look["sun"][1] * max(-float(normal @ look["sun"][0]), 0.0)
    return e


def _shade_rays(look, camera, dims, boxes, rays, t, surface, face, fp) -> np.ndarray:
    """Linear radiance (n, 3) of the room surfaces hit by `rays` at parameter t."""
    width, length, height = dims
    p = (camera.origin + t[:, None] * rays).astype(np.float32)  # (n, 3) hit points
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    albedo = np.empty((len(t), 3), np.float32)
    for sid in np.unique(surface):
        on = surface == sid
        tex = look["textures"].get(sid) if sid < 6 else boxes[sid - 6]["tex"]
        if tex is not None:
            albedo[on] = _sample_texture(tex, *_surface_coords(p[on], face[on]), fp[on])
        elif sid == FLOOR:
            albedo[on] = _floor_albedo(look["floor"], look["table"], x[on], z[on], fp[on])
        elif sid == CEILING:
            albedo[on] = look["ceiling"]
        else:
            albedo[on] = _wall_albedo(look, sid, z[on] if sid in (LEFT, RIGHT) else x[on], y[on])
    ceiling = surface == CEILING
    light = _irradiance(look, p, _NORMALS.astype(np.float32)[face])
    if ceiling.any() and look["fixtures"]:
        glow = np.zeros(ceiling.sum())
        for lx, _, lz in look["lights"]:
            glow += 0.6 * np.exp(-((x[ceiling] - lx) ** 2 + (z[ceiling] - lz) ** 2) / 1.5)
        light[ceiling] += glow
    # ambient occlusion: darker near the room's edges and corners
    edge = np.full(len(t), np.inf, np.float32)
    for sid, dist in enumerate((y, height - y, x, width - x, length - z, z)):
        edge = np.where(surface == sid, edge, np.minimum(edge, dist))
    light *= 1 - 0.35 * np.exp(-edge / 0.35)
    radiance = albedo**_GAMMA * light[:, None] * look["light_color"]
    if ceiling.any() and look["fixtures"]:
        emit = _ceiling_emission(look, x[ceiling], z[ceiling])
        radiance[ceiling] = np.where(emit[:, None] > 0, 4.0 * look["light_color"], radiance[ceiling])
    return radiance


def _tone(x):
    """Linear light -> [0, 1): identity in the shadows, a soft shoulder instead of clipping the highlights."""
    x = np.maximum(x, 0)
    return x / (1 + x**3) ** (1 / 3)


def _pixel_grid(size, scale=1) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates (u, v) of pixel centres of a size x size image rendered at `scale` samples per pixel."""
    c = (np.arange(size * scale) + 0.5) / scale
    return np.meshgrid(c, c)  # (S*scale, S*scale) each


def make_room(rng, size) -> Room:
    """Render one random room (image, exact z-depth, surface ids, camera) at `size` x `size` pixels."""
    dims = (rng.uniform(5.0, 14.0), rng.uniform(7.0, 18.0), rng.uniform(2.8, 5.0))  # width, length, height
    camera = Camera.make(
        size,
        fov_deg=rng.uniform(50, 72),
        origin=(rng.uniform(0.3, 0.7) * dims[0], rng.uniform(1.2, 1.8), rng.uniform(0.2, 1.0)),
        pitch_deg=rng.uniform(-2, 14),
        yaw_deg=rng.uniform(-25, 25),
    )
    n = _TEX if size > 96 else _TEX // 2  # texels per tile: small images cannot show more
    look = _make_look(rng, dims, n)
    boxes = _make_clutter(rng, dims, camera.origin, look["museum"], n)
    # exact depth and surface ids at the pixel centres
    u, v = _pixel_grid(size)
    t, surface, _ = _trace(camera, dims, camera.make_rays(u, v), boxes)
    if (surface == FLOOR).mean() < 0.1:  # the clutter hides the floor: no room left to stand anyone
        boxes = []
        t, surface, _ = _trace(camera, dims, camera.make_rays(u, v))
    # colour: 2 x 2 samples per pixel, lit in linear light, averaged, then to sRGB
    scale = 2
    u2, v2 = _pixel_grid(size, scale)
    rays = camera.make_rays(u2, v2)  # (S, S, 3)
    t2, surface2, face2 = (a.ravel() for a in _trace(camera, dims, rays, boxes))
    rays = rays.reshape(-1, 3)  # (n, 3)
    norm = np.linalg.norm(rays, axis=1)
    cos_in = np.abs((rays * _NORMALS[face2]).sum(1)) / norm
    fp = t2 * norm / (camera.focal * scale * np.maximum(cos_in, 0.05))  # metres per sample on the surface
    radiance = _shade_rays(look, camera, dims, boxes, rays, t2, surface2, face2, fp)
    haze = np.exp(-t2 * norm / look["haze"])[:, None]
    radiance = radiance * haze + 0.15 * (1 - haze)
    radiance = cv2.resize(
        radiance.reshape(size * scale, size * scale, 3).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA
    )
    lum = radiance.mean(2)
    look["exposure"] = look["gain"] * 0.22 / max(float(np.median(lum[surface != CEILING])), 1e-6)
    r2 = ((u - size / 2) ** 2 + (v - size / 2) ** 2) / (size * size / 2)
    look["vignette_map"] = (1 - look["vignette"] * r2).astype(np.float32)
    mottle = cv2.resize(look["mottle"].astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    img = _tone(radiance * look["exposure"] * (look["vignette_map"] * (1 + mottle))[..., None])
    img = img ** (1 / _GAMMA) + rng.normal(0, look["noise"], img.shape)
    rgb = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return Room(rgb, t.astype(np.float32), surface, camera, dims, look, boxes)


def render_room(rng, size) -> tuple[np.ndarray, np.ndarray]:
    """Render a random room: (H, W, 3) uint8 RGB and (H, W) float32 z-depth in metres."""
    room = make_room(rng, size)
    return room.rgb, room.depth


def encode_depth(depth_m) -> np.ndarray:
    """Depth in metres -> uint8 (0 m -> 0, MAX_DEPTH and beyond -> 255; brighter = farther)."""
    return np.clip(np.rint(np.asarray(depth_m, dtype=np.float64) * (255.0 / MAX_DEPTH)), 0, 255).astype(np.uint8)


def decode_depth(depth_u8) -> np.ndarray:
    """uint8 depth map (as stored) -> float32 metres."""
    return np.asarray(depth_u8, dtype=np.float32) * np.float32(MAX_DEPTH / 255.0)


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------

_SKIN = (
    np.array([[255, 224, 196], [241, 194, 150], [224, 172, 120], [198, 134, 90], [141, 85, 52], [92, 56, 36]]) / 255.0
)
_HAIR = np.array([[22, 18, 16], [60, 40, 25], [110, 72, 40], [205, 175, 115], [165, 165, 160], [145, 62, 30]]) / 255.0


class _Canvas:
    """A supersampled drawing surface for figures, in units of the figure's height (y: 0 at the top of the head,
    1 at the soles; raised hands or a hat reach up to y = top < 0)."""

    def __init__(self, height, scale, half_width, light, top=0.0):
        self.top = top
        self.px = height * scale / (1 - top)  # canvas pixels per unit of figure height
        self.half_width = half_width
        self.rgb = np.zeros((height * scale, int(2 * half_width * self.px), 3), np.float32)
        self.cover = np.zeros(self.rgb.shape[:2], bool)
        self.shade = np.zeros(self.rgb.shape[:2], np.float32)  # the lighting of each sample (camouflage reuses it)
        self.cloth = np.zeros(self.rgb.shape[:2], bool)  # clothes and bags: what camouflage may re-dress
        self.light = light  # (3,) unit vector towards the light (x right, y down, z towards the viewer)

    def _grid(self, x0, x1, y0, y1):
        """Slices and normalised coordinates of the canvas pixels inside a box."""
        c0 = max(int((x0 + self.half_width) * self.px), 0)
        c1 = min(int(math.ceil((x1 + self.half_width) * self.px)), self.rgb.shape[1])
        r0 = max(int((y0 - self.top) * self.px), 0)
        r1 = min(int(math.ceil((y1 - self.top) * self.px)), self.rgb.shape[0])
        xs = (np.arange(c0, max(c1, c0)) + 0.5) / self.px - self.half_width
        ys = (np.arange(r0, max(r1, r0)) + 0.5) / self.px + self.top
        x, y = np.meshgrid(xs, ys)
        return (slice(r0, max(r1, r0)), slice(c0, max(c1, c0))), x, y

    def _fill(self, sl, x, y, inside, nx, ny, color):
        """Paint `inside` with `color` (a (3,) colour, or a clothes texture: a function of x, y), shaded by the
        normal (nx, ny)."""
        if not inside.any():
            return
        nz = np.sqrt(np.clip(1 - nx * nx - ny * ny, 0, 1))
        shade = 0.45 + 0.75 * np.clip(nx * self.light[0] + ny * self.light[1] + nz * self.light[2], 0, 1)
        col = color(x[inside], y[inside]) if callable(color) else np.broadcast_to(color, (inside.sum(), 3))
        self.rgb[sl][inside] = col * shade[inside][:, None]
        self.shade[sl][inside] = shade[inside]
        self.cloth[sl][inside] = callable(color)
        self.cover[sl] |= inside

    def ellipse(self, cx, cy, rx, ry, color, clip_y=None):
        """Fill an ellipse (optionally only its part above y = clip_y)."""
        sl, x, y = self._grid(cx - rx, cx + rx, cy - ry, cy + ry)
        nx, ny = (x - cx) / rx, (y - cy) / ry
        inside = nx * nx + ny * ny <= 1
        if clip_y is not None:
            inside &= y <= clip_y
        self._fill(sl, x, y, inside, nx, ny, color)

    def limb(self, p0, p1, r0, r1, color):
        """Fill a tapered capsule from p0 (radius r0) to p1 (radius r1)."""
        (x0, y0), (x1, y1) = p0, p1
        r = max(r0, r1)
        sl, x, y = self._grid(min(x0, x1) - r, max(x0, x1) + r, min(y0, y1) - r, max(y0, y1) + r)
        dx, dy = x1 - x0, y1 - y0
        length2 = max(dx * dx + dy * dy, 1e-12)
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / length2, 0, 1)
        rad = r0 + (r1 - r0) * t
        ox, oy = x - (x0 + t * dx), y - (y0 + t * dy)
        inside = ox * ox + oy * oy <= rad * rad
        self._fill(sl, x, y, inside, ox / rad, oy / rad * 0.3, color)

    def trapezoid(self, y0, y1, w0, w1, color, round_top=0.0, cx=0.0):
        """Fill a trapezoid centred on x = cx from half-width w0 at y0 to w1 at y1, top corners rounded."""
        w = max(w0, w1)
        sl, x, y = self._grid(cx - w, cx + w, y0, y1)
        x = x - cx
        f = (y - y0) / (y1 - y0)
        half = w0 + (w1 - w0) * f
        inside = np.abs(x) <= half
        if round_top > 0:
            cy = y0 + round_top
            rx = np.clip(np.abs(x), 0, half - round_top)
            corner = (y < cy) & (np.abs(x) > half - round_top)
            inside &= ~corner | ((np.abs(x) - rx) ** 2 + (y - cy) ** 2 <= round_top**2)
        self._fill(sl, x + cx, y, inside, x / np.maximum(half, 1e-6), np.zeros_like(x), color)

    def polygon(self, points, color):
        """Fill a polygon given as (k, 2) canvas coordinates (flat-shaded)."""
        pts = np.asarray(points, np.float64)
        sl, x, y = self._grid(pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max())
        if x.size == 0:
            return
        inside = np.zeros(x.shape, np.uint8)
        cols = (pts[:, 0] + self.half_width) * self.px - sl[1].start - 0.5
        rows = (pts[:, 1] - self.top) * self.px - sl[0].start - 0.5
        cv2.fillPoly(inside, [np.round(np.stack([cols, rows], 1) * 16).astype(np.int32)], 1, shift=4)
        self._fill(sl, x, y, inside.astype(bool), np.zeros_like(x), np.zeros_like(x), color)

    def to_rgba(self, height) -> tuple[np.ndarray, float]:
        """Average down to `height` rows, crop to the drawn columns: (straight-alpha RGBA + shade/2 + clothes,
        uint8; where x = 0 (the feet's line) falls, as a fraction of the width)."""
        a = self.cover.astype(np.float32)[..., None]
        extra = np.stack([self.shade / 2, self.cloth], axis=-1)
        premult = np.concatenate([self.rgb * a, a, extra * a], axis=2)
        w = int(round(self.rgb.shape[1] * height / self.rgb.shape[0]))
        small = _resize_area(premult, w, height)
        alpha = small[..., 3]
        cols = np.nonzero(alpha.max(0) > 0.5 / 255)[0]
        small, alpha = small[:, cols[0] : cols[-1] + 1], alpha[:, cols[0] : cols[-1] + 1]
        straight = small / np.maximum(alpha, 1e-6)[..., None]
        straight[..., 3] = alpha
        anchor = (self.half_width * self.px * w / self.rgb.shape[1] - cols[0]) / len(cols)
        return np.clip(np.rint(np.clip(straight, 0, 1) * 255), 0, 255).astype(np.uint8), float(anchor)


def _resize_area(img, width, height) -> np.ndarray:
    """cv2.resize with INTER_AREA for any number of channels (OpenCV takes at most 4 at a time)."""
    parts = [
        cv2.resize(img[..., i : i + 4], (width, height), interpolation=cv2.INTER_AREA)
        for i in range(0, img.shape[2], 4)
    ]
    return np.concatenate([p.reshape(height, width, -1) for p in parts], axis=2)


def _make_cloth(rng) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A clothes texture from the same distribution as the rooms' surfaces: a function (x, y) -> colours (n, 3)."""
    tile = make_texture(rng, "plain" if rng.random() < 0.3 else None, 64)
    k = tile.shape[0] / rng.uniform(0.08, 0.6)  # texels per unit of figure height
    return lambda x, y: _sample_tile(tile, x * k, y * k)


_ARM_POSES = ("hang", "hang", "hang", "hang", "open", "open", "hip", "raised", "out", "wave")


# Per pose: the upper arm's range of angles, the forearm's, and whether the forearm's is relative to the upper arm.
_ARM_RANGES = {
    "hang": ((3, 10), (-4, 6), True),
    "open": ((12, 35), (-5, 15), True),
    "hip": ((30, 45), (-50, -30), False),
    "raised": ((130, 175), (-15, 10), True),
    "out": ((75, 100), (-10, 30), True),
    "wave": ((50, 95), (150, 180), False),
    "swing": ((-35, 35), (0, 30), True),  # seen side-on: forward or back
}


def _arm_angles(rng, pose) -> tuple[float, float]:
    """Upper-arm and forearm angles (degrees from hanging straight down, positive away from the body)."""
    upper, forearm, relative = _ARM_RANGES[pose]
    a1 = rng.uniform(*upper)  # drawn before the forearm: the order keeps the generated data as it was
    return a1, (a1 if relative else 0.0) + rng.uniform(*forearm)


def _draw_figure(rng, height) -> tuple[np.ndarray, float, float]:
    """Draw one person-like figure `height` pixels tall (raised hands and hats included).

    Returns ((h, w, 6) uint8: straight-alpha RGBA, shade/2, clothes; the body's height / the drawn height;
    where the feet's line falls across the width, 0..1: an arm held out moves it off the middle).
    """
    scale = max(2, int(math.ceil(320 / height)))  # supersampling: ~320 canvas rows
    light = np.array([rng.uniform(-0.6, 0.6), -0.45, 0.75])
    skin = _jitter(rng, _SKIN[rng.integers(len(_SKIN))], 0.05)
    hair = _jitter(rng, _HAIR[rng.integers(len(_HAIR))], 0.1)
    top, bottom, coat, bag = _make_cloth(rng), _make_cloth(rng), _make_cloth(rng), _make_cloth(rng)
    shoe_colors = [(0.1, 0.09, 0.08), (0.35, 0.22, 0.12), (0.9, 0.9, 0.9), (0.5, 0.1, 0.1)]
    shoes = _jitter(rng, shoe_colors[rng.integers(4)], 0.1)
    sleeves = ("short", "long", "none", "long")[rng.integers(4)]
    lower = ("trousers", "trousers", "shorts", "skirt", "dress")[rng.integers(5)]
    hair_style = ("short", "short", "long", "bald", "bun")[rng.integers(5)]
    has_coat, bag_kind = rng.random() < 0.25, ("none", "none", "hand", "shoulder", "back")[rng.integers(5)]
    hat = rng.uniform(0.03, 0.06) if rng.random() < 0.15 else 0.0
    side_on = rng.random() < 0.2
    build = rng.uniform(0.8, 1.35)  # slim to broad

    head_ry = rng.uniform(0.058, 0.066)
    head_rx = head_ry * rng.uniform(0.74, 0.84)
    head_cy = head_ry * 1.04
    shoulder_y = rng.uniform(0.165, 0.185)
    hip_y = rng.uniform(0.48, 0.52)
    shoulder_w = rng.uniform(0.095, 0.125) * build * (0.55 if side_on else 1)  # half widths
    hip_w = rng.uniform(0.075, 0.105) * build * (0.75 if side_on else 1)
    arm_r = rng.uniform(0.026, 0.034) * min(build, 1.15)
    leg_r = rng.uniform(0.04, 0.055) * min(build, 1.15)
    spread = rng.uniform(-0.005, 0.04) if rng.random() < 0.6 else rng.uniform(0.04, 0.13)  # legs apart
    stride = rng.uniform(-0.12, 0.12) if side_on else 0.0  # walking, seen from the side

    arms = []
    for side in (-1, 1):
        pose = "swing" if side_on else _ARM_POSES[rng.integers(len(_ARM_POSES))]
        a1, a2 = (math.radians(a) for a in _arm_angles(rng, pose))
        upper, fore = rng.uniform(0.16, 0.18), rng.uniform(0.14, 0.16)
        shoulder = (side * (shoulder_w - arm_r * 0.8), shoulder_y + arm_r)
        elbow = (shoulder[0] + side * upper * math.sin(a1), shoulder[1] + upper * math.cos(a1))
        wrist = (elbow[0] + side * fore * math.sin(a2), elbow[1] + fore * math.cos(a2))
        arms.append((shoulder, elbow, wrist))
    top_y = min(0.0, -hat, *(w[1] - 2 * arm_r for _, _, w in arms))  # raised hands, a hat: above the head
    canvas = _Canvas(height, scale, half_width=0.7, light=light / np.linalg.norm(light), top=top_y)

    if hair_style == "long":  # behind the head and shoulders
        canvas.trapezoid(head_cy - 0.01, rng.uniform(0.2, 0.3), head_rx * 1.15, head_rx * 1.3, hair, round_top=head_rx)
    if bag_kind == "back":  # a backpack, seen behind the shoulders
        bx = -shoulder_w * 1.1 if side_on else 0.0
        canvas.limb((bx, shoulder_y + 0.04), (bx, shoulder_y + 0.22), 0.08 * build, 0.09 * build, bag)
    # legs (and shoes, soles exactly at y = 1)
    shoe_ry = 0.022
    ankle_y = 1 - shoe_ry * 1.3
    for side in (-1, 1):
        hip = (side * hip_w * 0.5, hip_y - 0.02)
        ankle = (side * (hip_w * 0.5 + spread) + side * stride, ankle_y)
        knee_y = (hip[1] + ankle_y) / 2
        legs = bottom if lower == "trousers" else skin
        canvas.limb(hip, ankle, leg_r, leg_r * 0.6, legs)
        if lower == "shorts":
            knee = ((hip[0] + ankle[0]) / 2, knee_y + 0.02)
            canvas.limb(hip, knee, leg_r * 1.05, leg_r * 0.85, bottom)
        toe = side * 0.008 if not side_on else 0.02
        canvas.ellipse(ankle[0] + toe, 1 - shoe_ry, rng.uniform(0.032, 0.042), shoe_ry, shoes)
    if lower in ("skirt", "dress"):
        hem = rng.uniform(0.62, 0.85)
        canvas.trapezoid(
            hip_y - 0.05, hem, hip_w * 1.05, hip_w * rng.uniform(1.3, 2.0), top if lower == "dress" else bottom
        )
    canvas.trapezoid(shoulder_y, hip_y, shoulder_w, hip_w, top, round_top=arm_r * 1.4)
    if lower in ("trousers", "shorts"):
        canvas.trapezoid(hip_y - 0.04, hip_y + 0.01, hip_w * 1.01, hip_w * 1.03, bottom)
    if has_coat:  # over the torso, to the knees or below
        hem = rng.uniform(0.6, 0.88)
        canvas.trapezoid(
            shoulder_y, hem, shoulder_w * 1.06, hip_w * rng.uniform(1.15, 1.5), coat, round_top=arm_r * 1.4
        )
        if not side_on and rng.random() < 0.5:  # open: the top shows down the middle
            canvas.trapezoid(shoulder_y + 0.03, hem, 0.012, 0.03, top)
    sleeve = coat if has_coat else top
    for shoulder, elbow, wrist in arms:
        upper_color = skin if sleeves == "none" and not has_coat else sleeve
        fore_color = sleeve if sleeves == "long" or has_coat else skin
        canvas.limb(shoulder, elbow, arm_r, arm_r * 0.85, upper_color)
        if sleeves == "short" and not has_coat:
            mid = ((shoulder[0] + elbow[0]) / 2, (shoulder[1] + elbow[1]) / 2)
            canvas.limb(shoulder, mid, arm_r * 1.1, arm_r, sleeve)
        canvas.limb(elbow, wrist, arm_r * 0.85, arm_r * 0.7, fore_color)
        canvas.ellipse(wrist[0], wrist[1] + arm_r * 0.6, arm_r * 0.75, arm_r * 1.0, skin)
    if bag_kind == "hand":  # hanging from the lower wrist
        wx, wy = max((w for _, _, w in arms), key=lambda w: w[1])
        if wy > hip_y - 0.1:
            bw, bh = rng.uniform(0.04, 0.08), rng.uniform(0.06, 0.12)
            canvas.limb((wx, wy + 0.03 + bw), (wx, wy + 0.03 + bh), bw, bw, bag)
    elif bag_kind == "shoulder":  # a strap across the body, the bag at the hip
        side = 1 if rng.random() < 0.5 else -1
        bx = side * (hip_w + rng.uniform(0.02, 0.05))
        canvas.limb((-side * shoulder_w * 0.7, shoulder_y + 0.01), (bx, hip_y - 0.03), 0.008, 0.008, bag)
        canvas.limb((bx, hip_y - 0.02), (bx, hip_y + rng.uniform(0.02, 0.08)), 0.05, 0.05, bag)
    # neck, head, hair, hat
    canvas.limb((0, head_cy + head_ry * 0.6), (0, shoulder_y + 0.01), head_rx * 0.45, head_rx * 0.5, skin * 0.9)
    canvas.ellipse(0, head_cy, head_rx, head_ry, skin)
    if hair_style != "bald":
        canvas.ellipse(
            0,
            head_cy - head_ry * 0.04,
            head_rx * 1.08,
            head_ry * 1.04,
            hair,
            clip_y=head_cy - head_ry * (0.25 if hair_style != "long" else 0.4),
        )
    else:
        canvas.ellipse(0, head_cy, head_rx, head_ry, skin * 0.95, clip_y=head_cy - head_ry * 0.3)
    eyes = (1,) if side_on else (-1, 1)
    for side in eyes:  # eyes and brows: just enough to read as a face
        eye_x = side * head_rx * (0.55 if side_on else 0.38)
        canvas.ellipse(eye_x, head_cy + head_ry * 0.05, head_rx * 0.14, head_ry * 0.07, (0.12, 0.09, 0.08))
        canvas.ellipse(eye_x, head_cy - head_ry * 0.14, head_rx * 0.2, head_ry * 0.04, hair * 0.8)
    canvas.ellipse(0, head_cy + head_ry * 0.5, head_rx * 0.25, head_ry * 0.05, skin * 0.7)
    if hair_style == "bun":
        canvas.ellipse(0, head_ry * 0.3, head_rx * 0.45, head_ry * 0.3, hair)
    if hat:
        canvas.trapezoid(-hat, head_ry * 0.5, head_rx * 0.9, head_rx * 1.05, bag, round_top=head_rx * 0.3)
        canvas.limb((-head_rx * 1.5, head_ry * 0.45), (head_rx * 1.5, head_ry * 0.45), 0.01, 0.01, bag)
    rgba, anchor = canvas.to_rgba(height)
    return rgba, 1 / (1 - top_y), anchor


def _draw_object(rng, height) -> tuple[np.ndarray, float]:
    """Draw one generic cut-out (not a person) `height` pixels tall, standing on its lowest row.

    Blobs, polygons and furniture-like silhouettes (chair, table, lamp, plant), textured like everything else.
    Returns ((h, w, 6) uint8: straight-alpha RGBA, shade/2, clothes (= all of it: camouflage may re-dress it);
    where its base's centre line falls across the width, 0..1).
    """
    scale = max(2, int(math.ceil(320 / height)))  # supersampling: ~320 canvas rows
    light = np.array([rng.uniform(-0.6, 0.6), -0.45, 0.75])
    canvas = _Canvas(height, scale, half_width=0.7, light=light / np.linalg.norm(light))
    a, b = _make_cloth(rng), _make_cloth(rng)
    kind = ("blob", "polygon", "chair", "table", "lamp", "plant")[rng.integers(6)]
    if kind == "blob":
        canvas.ellipse(0, 0.55, rng.uniform(0.15, 0.5), 0.45, a)
        for _ in range(int(rng.integers(2, 6))):
            r = rng.uniform(0.08, 0.25)
            canvas.ellipse(rng.uniform(-0.3, 0.3), rng.uniform(r, 1 - r), r * rng.uniform(0.7, 1.5), r, a)
    elif kind == "polygon":
        k = int(rng.integers(3, 10))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = rng.uniform(0.5, 1.0, k)
        pts = np.stack([np.cos(ang) * rad * rng.uniform(0.3, 0.6), np.sin(ang) * rad], 1)
        pts[:, 1] = (pts[:, 1] - pts[:, 1].min()) / np.ptp(pts[:, 1])  # from the top row to the bottom row
        canvas.polygon(pts, a)
    elif kind == "chair":
        w, seat, r = rng.uniform(0.2, 0.35), rng.uniform(0.45, 0.6), rng.uniform(0.015, 0.03)
        canvas.limb((-w, 0.02), (-w, 1 - r), r, r, a)  # back leg and backrest
        canvas.limb((w, seat), (w, 1 - r), r, r, a)
        canvas.limb((-w, seat), (w, seat), r * 2, r * 2, b)
        canvas.trapezoid(0.02, seat * 0.6, 0.04, 0.04, b, cx=-w + 0.02)
    elif kind == "table":
        w, r = rng.uniform(0.4, 0.65), rng.uniform(0.015, 0.04)
        canvas.limb((-w, 0.03), (w, 0.03), 0.03, 0.03, a)
        for x in (-w * 0.85, w * 0.85):
            canvas.limb((x, 0.05), (x, 1 - r), r, r, b)
    elif kind == "lamp":
        shade_w = rng.uniform(0.1, 0.25)
        canvas.trapezoid(0.0, rng.uniform(0.15, 0.3), shade_w * 0.6, shade_w, a)
        canvas.limb((0, 0.2), (0, 0.97), 0.015, 0.015, b)
        canvas.ellipse(0, 0.98, rng.uniform(0.08, 0.15), 0.02, b)
    else:
        pot = rng.uniform(0.25, 0.45)
        canvas.trapezoid(1 - pot, 1.0, rng.uniform(0.1, 0.2), rng.uniform(0.07, 0.14), b)
        for _ in range(int(rng.integers(5, 12))):
            ang = rng.uniform(-1.2, 1.2)
            length = rng.uniform(0.3, 1 - pot)
            tip = (math.sin(ang) * length * 0.6, 1 - pot - math.cos(ang) * length)
            canvas.limb((0, 1 - pot), (tip[0], max(tip[1], 0.02)), 0.03, 0.01, a)
    out, anchor = canvas.to_rgba(height)
    rows = np.nonzero(out[..., 3].max(1) > 0)[0]  # stand it on its lowest drawn row
    out = np.roll(out, height - 1 - rows[-1], axis=0)
    out[..., 4] = np.where(out[..., 3] > 0, out[..., 4], 0)
    out[..., 5] = np.where(out[..., 3] > 0, 255, 0)
    return out, anchor


def make_figure(rng, height) -> np.ndarray:
    """A random person-like cut-out exactly `height` pixels tall: (h, w, 4) uint8 RGBA, straight alpha."""
    if height < 8:
        raise ValueError(f"figure height must be >= 8 pixels, got {height}")
    return _draw_figure(rng, int(height))[0][..., :4]


def make_object(rng, height) -> np.ndarray:
    """A random generic cut-out (blob, polygon, furniture-like) `height` pixels tall: (h, w, 4) uint8 RGBA."""
    if height < 8:
        raise ValueError(f"object height must be >= 8 pixels, got {height}")
    return _draw_object(rng, int(height))[0][..., :4]


def paste_figure(bg_rgb, fg_rgba, x, y, flip=False, clip=False) -> tuple[np.ndarray, np.ndarray]:
    """Alpha-composite an RGBA cut-out on a copy of `bg_rgb` with its top-left corner at (x, y).

    Returns (bg_fg RGB uint8, mask (H, W) uint8: 255 where the cut-out's alpha >= 128, else 0).
    Raises ValueError unless the cut-out lies fully inside the image; with `clip`, a cut-out partly outside
    is cut by the frame (the mask is its visible part) and only one wholly outside raises.
    """
    bg_rgb, fg_rgba = np.asarray(bg_rgb), np.asarray(fg_rgba)
    if bg_rgb.ndim != 3 or bg_rgb.shape[2] != 3 or bg_rgb.dtype != np.uint8:
        raise ValueError(f"bg_rgb must be (H, W, 3) uint8, got {bg_rgb.shape} {bg_rgb.dtype}")
    if fg_rgba.ndim != 3 or fg_rgba.shape[2] != 4 or fg_rgba.dtype != np.uint8:
        raise ValueError(f"fg_rgba must be (h, w, 4) uint8, got {fg_rgba.shape} {fg_rgba.dtype}")
    big_h, big_w = bg_rgb.shape[:2]
    h, w = fg_rgba.shape[:2]
    x, y = int(x), int(y)
    fg = fg_rgba[:, ::-1] if flip else fg_rgba
    if clip:
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, big_w), min(y + h, big_h)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"a {w}x{h} cut-out at ({x}, {y}) lies wholly outside a {big_w}x{big_h} image")
        fg, x, y, h, w = fg[y0 - y : y1 - y, x0 - x : x1 - x], x0, y0, y1 - y0, x1 - x0
    if x < 0 or y < 0 or x + w > big_w or y + h > big_h:
        raise ValueError(f"a {w}x{h} cut-out at ({x}, {y}) does not fit fully inside a {big_w}x{big_h} image")
    alpha = fg[..., 3:].astype(np.uint16)  # (h, w, 1)
    bg_fg = bg_rgb.copy()
    region = bg_fg[y : y + h, x : x + w]
    region[:] = ((fg[..., :3] * alpha + region * (255 - alpha) + 127) // 255).astype(np.uint8)
    mask = np.zeros((big_h, big_w), np.uint8)
    mask[y : y + h, x : x + w] = np.where(fg[..., 3] >= 128, 255, 0).astype(np.uint8)
    return bg_fg, mask


# ----------------------------------------------------------------------------------------------------------
# Standing figures in rooms
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Placement:
    """Where a figure stands: pasted box (x, y, w, h) in pixels and its feet on the floor (world, metres)."""

    x: int
    y: int
    w: int
    h: int
    feet: np.ndarray  # (3,)


def _min_figure_height(size) -> int:
    """Smallest figure (pixels) worth pasting: far-away specks are not people."""
    return max(12, round(0.2 * size))


def _visible_box(p: Placement, size) -> tuple[int, int, int, int]:
    """The part (x0, y0, x1, y1) of a placement's box inside a size x size frame."""
    return max(p.x, 0), max(p.y, 0), min(p.x + p.w, size), min(p.y + p.h, size)


def place_figures(rng, room: Room, height_m, aspect, count, tries=10000, edge=None, anchor=0.5) -> list[Placement]:
    """Stand a figure (real height `height_m`, width/height `aspect`) on `count` random visible floor points.

    The feet's line is at `anchor` (a fraction of the box's width from its left side).
    Points are drawn uniformly over the floor's pixels and kept when the figure stays clear of the walls and
    the clutter, is not hidden behind clutter, and is at least `_min_figure_height` pixels tall. It lies fully
    inside the image, except that a share `edge` (default EDGE_FRACTION) of the placements may be cut by the
    frame's left, right or top edge (at least half of the figure's width and height stay inside).
    In a crowded room, after half the tries, smaller and frame-cut figures are taken, and figures that walls
    or clutter partly hide (only their feet must be clear): `_make_pair` depth-tests each pixel, so what a
    nearer surface hides is not pasted and not in the mask.
    """
    cam, size = room.camera, room.camera.size
    width, length, _ = room.dims
    edge = EDGE_FRACTION if edge is None else edge
    floor = np.flatnonzero(room.surface.ravel() == FLOOR)
    margin = aspect * height_m / 2 + 0.1  # the figure's half-width plus a little, metres
    h_min = max(6, round(_min_figure_height(size) * min(1.0, height_m / FIGURE_HEIGHT_M[0])))  # short objects: less
    placements: list[Placement] = []
    cut_ok = rng.random() < edge
    strict = True
    for attempt in range(tries):
        if attempt == tries // 2:  # a crowded room: relax rather than fail (see the docstring)
            h_min, edge, cut_ok, margin, strict = max(4, h_min // 2), 1.0, True, 0.15, False
        if len(placements) == count:
            return placements
        i = floor[rng.integers(len(floor))]
        u, v = i % size + rng.random(), i // size + rng.random()
        ray = cam.make_rays(np.float64(u), np.float64(v))
        if ray[1] >= 0:
            continue
        feet = cam.origin + (-cam.origin[1] / ray[1]) * ray
        if not (margin <= feet[0] <= width - margin and margin <= feet[2] <= length - margin):
            continue
        if any(
            b["lo"][0] - margin <= feet[0] <= b["hi"][0] + margin
            and b["lo"][2] - margin <= feet[2] <= b["hi"][2] + margin
            for b in room.boxes
        ):
            continue
        (u_f, u_h), (v_f, v_h), _ = cam.project(np.stack([feet, feet + (0, height_m, 0)]))
        h = int(round(v_f - v_h))
        w = max(1, int(round(h * aspect)))
        x, y = int(round((u_f + u_h) / 2 - anchor * w)), int(round(v_f)) - h
        p = Placement(x, y, w, h, feet)
        x0, y0, x1, y1 = _visible_box(p, size)
        inside = x >= 0 and y >= 0 and x + w <= size and y + h <= size
        if inside:  # a slot allowed to be cut mostly waits for a cut figure (they are rarer)
            ok = h >= h_min and not (cut_ok and rng.random() < 0.8)
        else:
            ok = cut_ok and y + h <= size and 2 * (x1 - x0) >= w and 2 * (y1 - y0) >= h and y1 - y0 >= h_min
        if ok and room.boxes and strict:  # hidden behind clutter: something nearer than the figure inside its box
            depth = _figure_depth(cam, p)[y0 - y : y1 - y, x0 - x : x1 - x]
            ok = not (room.depth[y0:y1, x0:x1] < depth - 0.1).any()
        if ok:
            placements.append(p)
            cut_ok = rng.random() < edge
    if len(placements) == count:
        return placements
    raise RuntimeError(f"could not stand {count} figures in this room after {tries} tries")


def _figure_depth(cam: Camera, p: Placement) -> np.ndarray:
    """Exact z-depth (h, w) of the pasted box's pixels on the vertical plane through the feet, facing the camera."""
    n = p.feet - cam.origin
    n[1] = 0
    n /= np.linalg.norm(n)
    m = cam.rotation.T @ n  # the plane normal in camera coordinates
    c = 0.5 * cam.size
    us = (np.arange(p.x, p.x + p.w) + 0.5 - c) / cam.focal
    vs = (c - np.arange(p.y, p.y + p.h) - 0.5) / cam.focal
    denom = m[0] * us[None, :] + m[1] * vs[:, None] + m[2]  # (h, w) ray . n
    return (float(n @ (p.feet - cam.origin)) / denom).astype(np.float32)


def _light_figure(room: Room, p: Placement, rgba) -> np.ndarray:
    """Light a straight-alpha cut-out as the room would at its position (same lights, exposure, vignetting)."""
    look, cam = room.look, room.camera
    normal = cam.origin - p.feet
    normal[1] = 0
    normal /= np.linalg.norm(normal)
    light = _irradiance_at(look, p.feet + (0, 1.0, 0), normal)
    cy, cx = p.y + p.h // 2, p.x + p.w // 2
    cy, cx = min(max(cy, 0), cam.size - 1), min(max(cx, 0), cam.size - 1)
    gain = light * look["exposure"] * 2.2 * look["vignette_map"][cy, cx] * look["light_color"]  # (3,)
    ramp = ((np.arange(256) / 255) ** _GAMMA)[:, None]  # (256, 1)
    lut = np.clip(np.rint(255 * _tone(ramp * gain) ** (1 / _GAMMA)), 0, 255).astype(np.uint8)  # (256, 3)
    out = rgba.copy()
    out[..., :3] = cv2.LUT(np.ascontiguousarray(rgba[..., :3]), lut[None])
    return out


def _camouflage(rng, room: Room, rgba, extra) -> np.ndarray:
    """Re-dress the clothes of a lit cut-out in the room's own look: a patch of `bg` from elsewhere in the frame,
    shaded as the clothes were (so only the comparison with `bg` tells the figure from the room)."""
    h, w = rgba.shape[:2]
    size = room.camera.size
    side = int(rng.integers(max(2, size // 4), size + 1))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    patch = cv2.resize(room.rgb[y0 : y0 + side, x0 : x0 + side], (w, h), interpolation=cv2.INTER_AREA)  # (h, w, 3)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    cloth = extra[..., 1:2].astype(np.float32) / 255  # (h, w, 1)
    shade = extra[..., 0].astype(np.float32) * (2 / 255)
    on = cloth[..., 0] > 0.5
    rel = shade / max(float(shade[on].mean()) if on.any() else 1.0, 1e-3)  # relative shading: keep its level
    dressed = np.clip(patch * rel[..., None], 0, 255)
    out = rgba.copy()
    out[..., :3] = np.rint(rgba[..., :3] * (1 - cloth) + dressed * cloth).astype(np.uint8)
    return out


def _premultiply(rgba) -> np.ndarray:
    """Straight-alpha RGBA(+extra channels) uint8 -> premultiplied (so that resizing does not darken the edges)."""
    out = rgba.copy()
    other = [c for c in range(rgba.shape[2]) if c != 3]
    out[..., other] = (rgba[..., other].astype(np.uint16) * rgba[..., 3:4] + 127) // 255
    return out


def _resize_figure(premult, height, width) -> np.ndarray:
    """Resize a premultiplied RGBA(+extra channels) figure to (height, width); straight alpha, uint8."""
    small = _resize_area(premult, width, height)
    alpha = small[..., 3:4].astype(np.uint16)
    out = small.copy()
    other = [c for c in range(small.shape[2]) if c != 3]
    values = small[..., other].astype(np.uint16)
    out[..., other] = np.where(alpha > 0, np.minimum((values * 255 + alpha // 2) // np.maximum(alpha, 1), 255), 0)
    return out


# ----------------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------------


def _make_rng(seed, *key) -> np.random.Generator:
    """A generator seeded from (seed, key): independent of order, process and worker count."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def encode_jpeg(img) -> bytes:
    """RGB (H, W, 3) uint8 -> JPEG bytes (JPEG_QUALITY); gray (H, W) -> JPEG bytes (TARGET_QUALITY)."""
    if simplejpeg is None:
        bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        quality = TARGET_QUALITY if img.ndim == 2 else JPEG_QUALITY
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        return buf.tobytes()
    if img.ndim == 2:
        return simplejpeg.encode_jpeg(np.ascontiguousarray(img[..., None]), TARGET_QUALITY, colorspace="GRAY")
    return simplejpeg.encode_jpeg(np.ascontiguousarray(img), JPEG_QUALITY, colorspace="RGB")


def encode_png(img) -> bytes:
    """RGBA (H, W, 4) or gray (H, W) uint8 -> PNG bytes."""
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def fg_height(size) -> int:
    """Height of the fg/ cut-outs at image `size` (108 at 224, as in MODEST); tools.build sizes its cut-outs by it too."""
    return max(8, round(FG_HEIGHT * size / 224))


def _make_fg(args) -> tuple[dict, bytes, bytes]:
    """Figure `f` (a person, or with probability `objects` a generic cut-out): its master (premultiplied, `size`
    tall, with shade and clothes channels), real height, and fg/ and fg_mask/ PNG bytes."""
    seed, f, size, objects = args
    rng = _make_rng(seed, 1, f)
    if _make_rng(seed, 3, f).random() < objects:
        height_m = float(rng.uniform(*OBJECT_HEIGHT_M))
        drawn, anchor = _draw_object(rng, size)
    else:
        height_m = float(rng.uniform(*FIGURE_HEIGHT_M))
        drawn, body_share, anchor = _draw_figure(rng, size)
        height_m /= body_share  # raised hands or a hat make the box taller than the body
    master = _premultiply(drawn)
    h = fg_height(size)
    cutout = _resize_figure(master, h, max(1, round(h * drawn.shape[1] / drawn.shape[0])))[..., :4]
    mask = np.where(cutout[..., 3] >= 128, 255, 0).astype(np.uint8)
    fig = {"master": master, "height_m": height_m, "aspect": drawn.shape[1] / drawn.shape[0], "anchor": anchor}
    return fig, encode_png(cutout), encode_png(mask)


_WORKER: dict = {}  # per-process state: figures, arguments, the latest room


def _init_worker(figures, seed, size, placements) -> None:
    """Pool initializer: keep the figures and arguments for `_make_pair`."""
    _WORKER.clear()
    _WORKER.update(figures=figures, seed=seed, size=size, placements=placements, room=(None, None))


def _get_room(b) -> tuple[Room, bytes]:
    """Room `b` and its bg JPEG, rendered once per process and background."""
    key, cached = _WORKER["room"]
    if key != b:
        room = make_room(_make_rng(_WORKER["seed"], 0, b), _WORKER["size"])
        room.depth_u8 = encode_depth(room.depth)  # (H, W) uint8
        cached = (room, encode_jpeg(room.rgb))
        _WORKER["room"] = (b, cached)
    return cached


def _make_pair(task) -> tuple[tuple[int, int], bytes | None, list]:
    """All 2P samples of (bg b, fg f): ((b, f), bg JPEG if f == 0, [(k, bbox, bg_fg, mask, depth JPEGs), ...]).

    Placements 1..P stand the figure at P random points; P+1..2P stand its mirror image at P other random
    points, so that a sample and its mirrored twin are not the same picture flipped in place.
    """
    b, f = task
    room, bg_jpeg = _get_room(b)
    fig = _WORKER["figures"][f]
    count = _WORKER["placements"]
    size = room.camera.size
    rng = _make_rng(_WORKER["seed"], 2, b, f)
    samples = []
    places = [
        p
        for anchor in (fig["anchor"], 1 - fig["anchor"])  # the mirror image has its feet's line mirrored too
        for p in place_figures(rng, room, fig["height_m"], fig["aspect"], count, anchor=anchor)
    ]
    for i, p in enumerate(places):
        cut = _resize_figure(fig["master"], p.h, p.w)  # (h, w, 6)
        if i >= count:
            cut = cut[:, ::-1]
        rgba = _light_figure(room, p, cut[..., :4])
        if rng.random() < CAMOUFLAGE:
            rgba = _camouflage(rng, room, rgba, cut[..., 4:])
        x0, y0, x1, y1 = _visible_box(p, size)
        fig_depth = _figure_depth(room.camera, p)[y0 - p.y : y1 - p.y, x0 - p.x : x1 - p.x]
        hidden = fig_depth > room.depth[y0:y1, x0:x1] + 0.05  # behind a wall or clutter (crowded rooms only)
        if hidden.any():
            rgba[y0 - p.y : y1 - p.y, x0 - p.x : x1 - p.x, 3][hidden] = 0
        bg_fg, mask = paste_figure(room.rgb, rgba, p.x, p.y, clip=True)
        depth = room.depth_u8.copy()
        box = depth[y0:y1, x0:x1]
        inside = mask[y0:y1, x0:x1] > 0
        box[inside] = encode_depth(fig_depth)[inside]
        bbox = (x0, y0, x1 - x0, y1 - y0)  # the visible part of the pasted box
        samples.append((i + 1, bbox, encode_jpeg(bg_fg), encode_jpeg(mask), encode_jpeg(depth)))
    return (b, f), (bg_jpeg if f == 0 else None), samples


def _sample_name(b, f, k) -> str:
    """bg001_fg001_01 for 0-based bg b, fg f and 1-based placement number k."""
    return f"bg{b + 1:03d}_fg{f + 1:03d}_{k:02d}"


def _check_args(size, backgrounds, foregrounds, placements, seed, workers, objects=0.0) -> None:
    """Raise UserError for arguments the MODEST layout cannot hold."""

    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    for name, value, low, high in (
        ("size", size, 32, 4096),
        ("backgrounds", backgrounds, 1, 999),
        ("foregrounds", foregrounds, 1, 999),
        ("placements", placements, 1, 49),
    ):
        if not is_int(value) or not low <= value <= high:
            raise UserError(f"synthetic dataset: {name} must be an integer in [{low}, {high}], got {value!r}")
    if not is_int(seed) or seed < 0:
        raise UserError(f"synthetic dataset: seed must be a non-negative integer, got {seed!r}")
    if isinstance(objects, bool) or not isinstance(objects, (int, float, np.number)) or not 0 <= objects <= 1:
        raise UserError(f"synthetic dataset: objects must be a fraction in [0, 1], got {objects!r}")
    if workers is not None and (not is_int(workers) or workers < 1):
        raise UserError(f"synthetic dataset: workers must be None or an integer >= 1, got {workers!r}")


def _read_zip_first_member(path: Path) -> bytes | None:
    """The bytes of the first (stored) member of a zip, read from its local header; None if unreadable."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                return None
            (method,), (csize,) = struct.unpack("<H", head[8:10]), struct.unpack("<I", head[18:22])
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            name = fh.read(name_len)
            fh.seek(extra_len, os.SEEK_CUR)
            if method != zipfile.ZIP_STORED or name != b"dataset.json":
                return None
            return fh.read(csize)
    except OSError:
        return None


def _read_meta(out: Path, as_zip: bool) -> dict | None:
    """The dataset.json of a finished dataset at `out`, or None."""
    try:
        raw = _read_zip_first_member(out) if as_zip else (out / "dataset.json").read_bytes()
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None


def _same_args(a: dict | None, b: dict) -> bool:
    """Whether two dataset.json dicts were made with the same generator arguments."""
    return a is not None and all(a.get(k) == b[k] for k in _ARG_KEYS)


class _FolderWriter:
    """Writes the tree into `<out>.partial/`; resumes an interrupted run pair by pair; renames into place."""

    def __init__(self, out: Path, meta: dict, per_pair: int):
        self.out, self.partial = out, out.with_name(out.name + ".partial")
        self.root = str(self.partial)
        self.log_path = self.partial / ".progress"
        self.per_pair = per_pair
        self.bbox: dict[str, str] = {}
        if self.partial.exists() and not _same_args(_read_meta(self.partial, False), meta):
            shutil.rmtree(self.partial)
        if self.partial.exists():
            self._load_log()
        else:
            self.partial.mkdir(parents=True)
            (self.partial / "dataset.json").write_text(_meta_text(meta))
        for folder in FOLDERS:
            (self.partial / folder).mkdir(exist_ok=True)
        self.log = open(self.log_path, "a", encoding="utf-8")

    def _load_log(self) -> None:
        """Keep the pairs whose every bbox line reached the progress log; rewrite the log without the rest."""
        try:
            text = self.log_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        lines = [ln for ln in text.split("\n")[:-1] if ln.count("\t") == 4]  # the last piece lacks its newline
        groups: dict[str, dict[str, str]] = {}
        for ln in lines:
            name = ln.split("\t", 1)[0]
            groups.setdefault(name[:11], {})[name] = ln
        for group in groups.values():
            if len(group) == self.per_pair:
                self.bbox.update(group)
        tmp = self.log_path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in self.bbox.values()), encoding="utf-8")
        os.replace(tmp, self.log_path)

    def done_pairs(self) -> set[str]:
        """Names 'bgXXX_fgYYY' of the pairs already written."""
        return {name[:11] for name in self.bbox}

    def write(self, name: str, data: bytes) -> None:
        """Write one file (path relative to the dataset root)."""
        fd = os.open(os.path.join(self.root, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def record(self, lines: list[str]) -> None:
        """Mark one pair as done (its files are written): append its bbox lines to the progress log."""
        self.log.write("".join(ln + "\n" for ln in lines))
        self.log.flush()
        for ln in lines:
            self.bbox[ln.split("\t", 1)[0]] = ln

    def finish(self, texts: dict[str, bytes]) -> Path:
        """Write the index files and rename the tree into place."""
        self.log.close()
        for name, data in texts.items():
            self.write(name, data)
        self.log_path.unlink()
        if self.out.is_dir():
            self.out.rmdir()  # empty (checked before we started)
        os.replace(self.partial, self.out)
        return self.out

    def close(self) -> None:
        """Close the log (after an error); the partial tree stays for the next run to resume."""
        self.log.close()


class _ZipWriter:
    """Streams the tree into `<out>.partial` (a STORED zip), renamed into place at the end; restarts if interrupted."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.partial = out, out.with_name(out.name + ".partial")
        self.bbox: dict[str, str] = {}
        self.zip = zipfile.ZipFile(self.partial, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.write("dataset.json", _meta_text(meta).encode())  # first member: read back to detect a finished zip

    def done_pairs(self) -> set[str]:
        """Nothing is resumed in a zip."""
        return set()

    def write(self, name: str, data: bytes) -> None:
        """Add one member with a fixed timestamp (so equal arguments give byte-identical zips)."""
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.create_system = 3
        info.external_attr = 0o644 << 16
        self.zip.writestr(info, data)

    def record(self, lines: list[str]) -> None:
        """Remember one pair's bbox lines."""
        for ln in lines:
            self.bbox[ln.split("\t", 1)[0]] = ln

    def finish(self, texts: dict[str, bytes]) -> Path:
        """Add the index files, close, rename into place."""
        for name, data in texts.items():
            self.write(name, data)
        self.zip.close()
        os.replace(self.partial, self.out)
        return self.out

    def close(self) -> None:
        """Drop the unfinished zip."""
        self.zip.close()
        self.partial.unlink(missing_ok=True)


def _meta_text(meta: dict) -> str:
    """dataset.json text."""
    return json.dumps(meta, indent=2) + "\n"


def _make_meta(size, backgrounds, foregrounds, placements, seed, objects) -> dict:
    """What dataset.json records: the generator's arguments and conventions."""
    return {
        "format": "modest",
        "generator": "lib.synthetic",
        "version": VERSION,
        "size": size,
        "backgrounds": backgrounds,
        "foregrounds": foregrounds,
        "placements": placements,
        "seed": seed,
        "objects": objects,
        "samples": backgrounds * foregrounds * 2 * placements,
        "max_depth": MAX_DEPTH,
        "depth": "z-depth (along the optical axis) in metres; 0..max_depth -> 0..255, brighter = farther",
        "fg_height": fg_height(size),
    }


def _map_tasks(fn, tasks, workers, initializer=None, initargs=()):
    """Yield fn(task) in task order, in this process (workers == 1) or in a Pool."""
    if workers == 1 or len(tasks) <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, tasks)
        return
    chunksize = max(1, min(8, len(tasks) // (workers * 8)))
    with multiprocessing.get_context().Pool(workers, initializer, initargs) as pool:
        yield from pool.imap(fn, tasks, chunksize=chunksize)


def make_synthetic_dataset(
    out,
    *,
    size=224,
    backgrounds=100,
    foregrounds=100,
    placements=20,
    seed=0,
    objects=0.0,
    as_zip=False,
    workers=None,
    progress=True,
) -> Path:
    """Write a MODEST-format synthetic dataset to folder `out` (or, with as_zip, to the zip file `out` — add .zip
    if missing); return its path.

    Same arguments give byte-identical files whatever `workers` is. An interrupted folder run resumes
    from `<out>.partial/`; an interrupted zip run restarts. A finished dataset with the same arguments is
    returned at once, untouched. `objects` is the fraction of foregrounds that are generic cut-outs (blobs,
    polygons, furniture-like shapes) instead of people.
    """
    _check_args(size, backgrounds, foregrounds, placements, seed, workers, objects)
    out = Path(out)
    if as_zip and out.suffix.lower() != ".zip":
        out = out.with_name(out.name + ".zip")
    meta = _make_meta(int(size), int(backgrounds), int(foregrounds), int(placements), int(seed), float(objects))
    if out.exists():
        if _same_args(_read_meta(out, as_zip), meta):
            return out
        if not (out.is_dir() and not as_zip and not any(out.iterdir())):
            raise UserError(
                f"{out} already exists and is not a synthetic dataset made with these arguments; "
                "remove it or choose another path"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers or os.cpu_count() or 1, backgrounds * foregrounds))
    per_pair = 2 * placements
    writer = _ZipWriter(out, meta) if as_zip else _FolderWriter(out, meta, per_pair)
    try:
        figures = []
        with closing(
            _map_tasks(_make_fg, [(seed, f, size, float(objects)) for f in range(foregrounds)], workers)
        ) as results:
            for f, (fig, png, mask_png) in enumerate(results):
                figures.append(fig)
                writer.write(f"fg/fg{f + 1:03d}.png", png)
                writer.write(f"fg_mask/fg{f + 1:03d}_mask.png", mask_png)
        done = writer.done_pairs()
        tasks = [
            (b, f) for b in range(backgrounds) for f in range(foregrounds) if f"bg{b + 1:03d}_fg{f + 1:03d}" not in done
        ]
        bar = tqdm(
            total=meta["samples"],
            initial=len(done) * per_pair,
            unit="sample",
            desc="synthetic",
            disable=not progress,
            dynamic_ncols=True,
        )
        results = _map_tasks(_make_pair, tasks, workers, _init_worker, (figures, seed, size, placements))
        with bar, closing(results):
            for (b, f), bg_jpeg, samples in results:
                if bg_jpeg is not None:
                    writer.write(f"bg/bg{b + 1:03d}.jpeg", bg_jpeg)
                lines = []
                for k, (x, y, w, h), bg_fg, mask, depth in samples:
                    name = _sample_name(b, f, k)
                    writer.write(f"bg_fg/{name}.jpeg", bg_fg)
                    writer.write(f"bg_fg_mask/{name}_mask.jpeg", mask)
                    writer.write(f"bg_fg_depth_map/{name}_depth_map.jpeg", depth)
                    lines.append(f"{name}.jpeg\t{x}\t{y}\t{w}\t{h}")
                writer.record(lines)
                bar.update(len(samples))
        names = [
            _sample_name(b, f, k)
            for b in range(backgrounds)
            for f in range(foregrounds)
            for k in range(1, per_pair + 1)
        ]
        file_map = "".join(f"{n[:5]}\t{n}\t{n}_mask\t{n}_depth_map\n" for n in names)
        bbox = "".join(writer.bbox[f"{n}.jpeg"] + "\n" for n in names)
        texts = {"file_map.txt": file_map.encode(), "bbox.txt": bbox.encode()}
        if not as_zip:
            texts["dataset.json"] = _meta_text(meta).encode()
    except BaseException:
        writer.close()
        _WORKER.clear()
        raise
    _WORKER.clear()
    return writer.finish(texts)
