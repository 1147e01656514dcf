"""Procedural face images with known identities: the project's default, offline data set.

Real face sets are large, licensed and cannot ship with the code, yet every part of the
pipeline (training, `.bin` evaluation, export, the demo) needs faces with identity labels.
This module draws them: an identity is a set of persistent parameters (head and feature
geometry, colours, hair, beard, moles, skin texture); every image adds nuisance (pose,
scale, illumination, expression, occluders, blur, noise, JPEG quality) scaled by one
`difficulty` number. Faces sit near the ArcFace 112x112 alignment template (eyes about
(38, 52) and (74, 52), nose (56, 72), mouth corners (41, 92) and (71, 92)).

Rendering is vectorised numpy with signed-distance shapes clipped to their bounding boxes.
The static head of an identity is drawn once on an oversampled canvas in template
coordinates (the "face frame"); expressions and occluders are small cached patches pasted
onto it; each image then samples the canvas through its pose with one gather and adds
light, background, blur and noise with a few whole-image operations. That keeps
generation at well over 500 images/s on one core.

Every random draw comes from `numpy.random.SeedSequence(seed, spawn_key=...)` keyed by
(purpose, split, identity, image): results do not depend on generation order or on the
number of worker processes. The caches are per process and not thread-safe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from unitsface.data.bins import save_bin
from unitsface.data.images import decode, encode_jpeg
from unitsface.data.recordio import write_face_dataset
from unitsface.errors import UnitsfaceError, run_script
from unitsface.io import atomic_open

GENERATOR_VERSION = 2  # 2: a held-out identity set (`heldout/`) beside val.bin; train/val bytes unchanged
DEFAULT_DIFFICULTY = 1.0
TRAIN_SPLIT, VAL_SPLIT, HELDOUT_SPLIT = 0, 1, 2  # render streams: disjoint identities
HELDOUT_FOLDER = "heldout"
_IDENTITY, _NUISANCE, _PAIRS = 0, 1, 2  # purposes in the seed-sequence spawn keys

TEMPLATE = 112.0  # side of the alignment template; all geometry is in its units
_MID = 56.0  # face centre line
_PIVOT = (56.0, 70.0)  # roll/scale pivot, between eyes and mouth
_MARGIN = 16.0  # the identity canvas covers [-_MARGIN, TEMPLATE + _MARGIN] in both axes
_OVERSAMPLE = 1.5  # canvas samples per output pixel
_DEPTH_SHIFT = 9.0  # template units a feature at full depth moves for yaw (pitch) = 1

SdfFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
RGB = tuple[float, float, float]


@dataclass(frozen=True)
class IdentityParams:
    """Persistent appearance of one identity. Lengths in template units, colours RGB in [0, 1]."""

    face_w: float  # half width of the face outline
    face_h: float  # half height
    face_cy: float  # vertical centre
    jaw_taper: float  # how much the outline narrows towards the chin
    skin: RGB
    texture: float  # strength of the skin texture
    texture_seed: int
    blush: float
    hair: RGB
    hairline: float  # v of the hairline on the centre line
    temple_drop: float  # how far the hairline falls at the temples
    parting: float  # asymmetric tilt of the hairline
    hair_volume: float  # how far hair stands out from the face outline
    hair_top: float  # no hair above this v (balding)
    hair_bottom: float  # hair length: no hair below this v
    ear_size: float
    ear_y: float
    eye_dx: float  # half of the distance between the eye centres
    eye_y: float
    eye_rx: float
    eye_ry: float
    eye_tilt: float  # radians, outer corner up when positive
    iris: RGB
    iris_r: float
    brow_gap: float
    brow_thick: float
    brow_len: float  # half length
    brow_arch: float
    brow_slant: float
    brow: RGB
    nose_y: float  # v of the nostrils
    nose_w: float
    nostril: float
    nose_shade: float
    mouth_y: float
    mouth_w: float  # half width
    lip_upper: float
    lip_lower: float
    lips: RGB
    beard: float  # opacity of a full beard, 0 = none
    moustache: float
    sideburn: float
    moles: tuple[tuple[float, float, float], ...]  # (u, v, radius)


@dataclass(frozen=True)
class NuisanceParams:
    """Per-image variation. `difficulty=0` in `sample_nuisance` gives the neutral values."""

    roll: float  # radians
    yaw: float  # pseudo-3D shift of deep features, about +-1 at the extremes
    pitch: float
    scale: float
    shift: tuple[float, float]  # template units
    gain: float  # overall brightness of the face
    cast: RGB  # white-balance multipliers
    shade_x: float  # directional light across the face
    shade_y: float
    smile: float
    mouth_open: float
    eye_open: float  # 1 = as drawn on the identity canvas, 0 = closed
    background: tuple[RGB, RGB]
    background_angle: float
    background_texture: float
    background_offset: tuple[float, float]  # in [0, 1): where the texture bank is cropped
    occluder: str  # "none", "mask", "glasses", "sunglasses" or "cap"
    occluder_color: RGB
    blur: int  # passes of a [1, 2, 1] filter at 112 px (Gaussian sigma = sqrt(passes / 2) pixels)
    noise: float  # Gaussian noise sigma in 0..255 units
    noise_offset: tuple[float, float]
    jpeg_quality: int


# ----------------------------------------------------------------------------- sampling

_SKIN_LIGHT, _SKIN_DARK = np.array([0.97, 0.82, 0.71]), np.array([0.33, 0.21, 0.15])
_HAIR = np.array([[0.07, 0.06, 0.05], [0.22, 0.14, 0.08], [0.42, 0.28, 0.15], [0.82, 0.67, 0.42],
                  [0.55, 0.22, 0.09], [0.58, 0.57, 0.55], [0.86, 0.85, 0.82]])
_HAIR_P = np.array([0.3, 0.25, 0.17, 0.1, 0.06, 0.08, 0.04])
_IRIS = np.array([[0.30, 0.18, 0.10], [0.14, 0.09, 0.06], [0.30, 0.45, 0.62], [0.32, 0.45, 0.30],
                  [0.48, 0.50, 0.52], [0.50, 0.38, 0.20]])
_OCCLUDER_COLORS: tuple[RGB, ...] = ((0.62, 0.78, 0.92), (0.93, 0.93, 0.93), (0.1, 0.1, 0.12), (0.15, 0.25, 0.5),
                                      (0.7, 0.15, 0.15), (0.55, 0.55, 0.5), (0.75, 0.62, 0.42))
_OCCLUDERS = (("mask", 0.10), ("glasses", 0.12), ("sunglasses", 0.05), ("cap", 0.05))  # probability per difficulty


def _rgb(values: np.ndarray) -> RGB:
    r, g, b = (float(x) for x in np.clip(values, 0.0, 1.0))
    return r, g, b


def sample_identity(rng: np.random.Generator) -> IdentityParams:
    """Draw one identity. The ranges keep all faces near the alignment template."""
    u = rng.uniform
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * u() ** 1.3 + rng.normal(0, 0.025, 3)
    hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)] * u(0.8, 1.2) + rng.normal(0, 0.03, 3)
    bald = u() < 0.08
    face_w, face_h = u(34.0, 41.0), u(42.0, 50.0)
    beard = u(0.45, 0.95) if u() < 0.22 else 0.0
    n_moles = min(int(rng.poisson(1.0)), 4)
    moles = tuple((_MID + u(-0.75, 0.75) * face_w, u(32.0, 104.0), u(0.6, 1.5)) for _ in range(n_moles))
    return IdentityParams(
        face_w=face_w, face_h=face_h, face_cy=u(60.0, 66.0), jaw_taper=u(0.15, 0.5),
        skin=_rgb(skin), texture=u(0.03, 0.1), texture_seed=int(rng.integers(2**31)), blush=u(0.0, 0.12),
        hair=_rgb(hair), hairline=u(15.0, 33.0), temple_drop=u(2.0, 12.0), parting=u(-5.0, 5.0),
        hair_volume=0.5 if bald else u(1.0, 9.0), hair_top=u(38.0, 48.0) if bald else -TEMPLATE,
        hair_bottom=u(45.0, 125.0), ear_size=u(6.0, 9.5), ear_y=u(57.0, 66.0),
        eye_dx=u(15.5, 19.5), eye_y=u(49.0, 55.0), eye_rx=u(5.2, 7.5), eye_ry=u(2.2, 3.6),
        eye_tilt=rng.normal(0.0, 0.08), iris=_rgb(_IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 0.03, 3)),
        iris_r=u(2.2, 3.0), brow_gap=u(5.5, 10.0), brow_thick=u(1.2, 3.6), brow_len=u(7.0, 11.0),
        brow_arch=u(0.3, 3.0), brow_slant=rng.normal(0.0, 0.12), brow=_rgb(hair * u(0.45, 0.9)),
        nose_y=u(70.0, 76.0), nose_w=u(5.0, 8.5), nostril=u(1.1, 2.0), nose_shade=u(0.08, 0.22),
        mouth_y=u(89.0, 96.0), mouth_w=u(11.0, 17.0), lip_upper=u(1.3, 3.4), lip_lower=u(1.8, 4.4),
        lips=_rgb(skin * u(0.55, 0.85) + np.array([0.12, -0.02, -0.01]) * u(0.5, 1.5)),
        beard=beard, moustache=u(0.5, 0.95) if beard or u() < 0.08 else 0.0, sideburn=u(0.0, 1.0),
        moles=moles)


def sample_nuisance(rng: np.random.Generator, difficulty: float = DEFAULT_DIFFICULTY) -> NuisanceParams:
    """Draw per-image variation scaled by `difficulty` (0 = none, 1 = the tuned default).

    All values come from two fixed-size draws (fast, and the same stream rendered at two
    difficulties gives the same image with more or less nuisance).
    """
    if not (math.isfinite(difficulty) and difficulty >= 0.0):
        raise UnitsfaceError(f"difficulty must be a finite number >= 0, got {difficulty!r}")
    uniform, normal = iter(rng.random(23).tolist()), iter(rng.standard_normal(12).tolist())

    def u(low: float = 0.0, high: float = 1.0) -> float:
        return low + (high - low) * next(uniform)

    def n(sigma: float) -> float:
        return sigma * next(normal) * difficulty

    d, mix = difficulty, min(difficulty, 1.0)
    level = u(0.2, 0.8)  # muted backgrounds: a grey level plus some colour
    r0, g0, b0, r1, g1, b1 = (min(1.0, max(0.0, 0.5 + (level + u(-0.3, 0.3) - 0.5) * mix)) for _ in range(6))
    draw, occluder = u(), "none"
    pick = draw / min(d, 0.8 / sum(p for _, p in _OCCLUDERS)) if d > 0 else 1.0  # at most 80% occluded
    for kind, p in _OCCLUDERS:
        if pick < p:
            occluder = kind
            break
        pick -= p
    closed, squint = u() < 0.1, u(0.0, 0.35)
    blur_draw, passes = u(), 1 + int(u() * 4)
    return NuisanceParams(
        roll=n(math.radians(5.0)), yaw=min(1.0, max(-1.0, n(0.35))), pitch=min(0.8, max(-0.8, n(0.22))),
        scale=math.exp(n(0.05)), shift=(n(1.5), n(1.5)), gain=math.exp(n(0.18)),
        cast=(1.0 + n(0.05), 1.0 + n(0.05), 1.0 + n(0.05)), shade_x=n(0.35), shade_y=n(0.15),
        smile=u(-0.3, 1.0) * d, mouth_open=max(0.0, u(-1.2, 1.0)) * d,
        eye_open=max(0.0, 1.0 - d * (0.9 if closed else squint)),
        background=((r0, g0, b0), (r1, g1, b1)), background_angle=u(0.0, 2.0 * math.pi),
        background_texture=u(0.0, 0.3) * mix, background_offset=(u(), u()), occluder=occluder,
        occluder_color=_OCCLUDER_COLORS[min(int(u() * len(_OCCLUDER_COLORS)), len(_OCCLUDER_COLORS) - 1)],
        blur=passes if blur_draw < 0.35 * d else 0,
        noise=u(0.0, 6.0) * d, noise_offset=(u(), u()),
        jpeg_quality=max(10, min(95, int(round(95.0 - 50.0 * min(d, 1.6) * u())))))


def _generator(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def identity_params(seed: int, split: int, identity: int) -> IdentityParams:
    """The identity `identity` of `split` (TRAIN_SPLIT or VAL_SPLIT) for a seed."""
    return sample_identity(_generator(seed, _IDENTITY, split, identity))


def nuisance_params(seed: int, split: int, identity: int, image: int,
                    difficulty: float = DEFAULT_DIFFICULTY) -> NuisanceParams:
    """The nuisance of image `image` of one identity; independent of any other image."""
    return sample_nuisance(_generator(seed, _NUISANCE, split, identity, image), difficulty)


# ----------------------------------------------------------------------------- drawing primitives

Box = tuple[float, float, float, float]  # (u0, u1, v0, v1) in template units


@lru_cache(maxsize=8)
def _canvas_grid(size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Face-frame coordinates (fu, fv) of the canvas pixels for an output size, and pixels per unit."""
    per_unit = _OVERSAMPLE * size / TEMPLATE
    n = int(round((TEMPLATE + 2 * _MARGIN) * per_unit))
    axis = (-_MARGIN + (np.arange(n, dtype=np.float32) + 0.5) / per_unit).astype(np.float32)
    fu, fv = np.meshgrid(axis, axis)
    return fu, fv, per_unit


class _Layer:
    """A planar premultiplied RGBA float32 canvas (4, n, n) in the face frame, 0..255.

    Premultiplied colour makes every paint the plain "over" operator and lets the pose warp
    and the background composite skip any division by alpha. Planes rather than interleaved
    channels keep numpy's inner loops long (broadcasting over a last axis of 3 is slow).
    """

    def __init__(self, rgba: np.ndarray, size: int) -> None:
        self.rgba = rgba
        self.fu, self.fv, self.per_unit = _canvas_grid(size)

    def window(self, box: Box) -> tuple[slice, slice]:
        u0, u1, v0, v1 = ((x + _MARGIN) * self.per_unit - 0.5 for x in box)
        n = self.rgba.shape[1]
        return (slice(max(0, int(v0) - 1), min(n, int(math.ceil(v1)) + 2)),
                slice(max(0, int(u0) - 1), min(n, int(math.ceil(u1)) + 2)))

    def coverage(self, rows: slice, cols: slice, sdf: SdfFn, soft: float = 0.0) -> np.ndarray:
        """Anti-aliased coverage in [0, 1] of the shape sdf < 0, softened by `soft` units."""
        dist = sdf(self.fu[rows, cols], self.fv[rows, cols])
        return np.clip(0.5 - dist / (1.0 / self.per_unit + soft), 0.0, 1.0)

    def blend(self, rows: slice, cols: slice, cov: np.ndarray, color: np.ndarray | Sequence[float],
              shade: np.ndarray | None = None) -> None:
        """Paint `color` (RGB in [0, 1]), optionally times a `shade` field of the window, over it."""
        win = self.rgba[:, rows, cols]
        target = np.asarray(color, np.float32).reshape(3, 1, 1) * 255.0
        if shade is not None:
            target = target * shade
        win[:3] += cov * (target - win[:3])
        win[3] += cov * (255.0 - win[3])

    def scale(self, rows: slice, cols: slice, cov: np.ndarray, amount: float) -> None:
        """Multiply the colour by (1 - amount) where covered (negative amounts lighten)."""
        self.rgba[:3, rows, cols] *= 1.0 - amount * cov


def _paint(layer: _Layer, box: Box, sdf: SdfFn, color: np.ndarray | Sequence[float], opacity: float = 1.0,
           soft: float = 0.0, shade: np.ndarray | None = None) -> None:
    """Paint `color` where sdf < 0; `shade` is a whole-layer brightness field, cut to the window."""
    rows, cols = layer.window(box)
    if rows.start < rows.stop and cols.start < cols.stop:
        layer.blend(rows, cols, opacity * layer.coverage(rows, cols, sdf, soft), color,
                    None if shade is None else shade[rows, cols])


def _darken(layer: _Layer, box: Box, sdf: SdfFn, amount: float, soft: float = 0.0) -> None:
    rows, cols = layer.window(box)
    if rows.start < rows.stop and cols.start < cols.stop:
        layer.scale(rows, cols, layer.coverage(rows, cols, sdf, soft), amount)


def _ellipse(cu: float, cv: float, a: float, b: float, angle: float = 0.0) -> SdfFn:
    """Approximate signed distance to an ellipse (exact on the axes); enough for soft edges."""
    c, s = math.cos(angle), math.sin(angle)

    def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        x, y = u - cu, v - cv
        if angle:
            x, y = c * x + s * y, c * y - s * x
        return (np.sqrt((x / a) ** 2 + (y / b) ** 2) - 1.0) * min(a, b)

    return sdf


def _segment(p: tuple[float, float], q: tuple[float, float], width: float) -> SdfFn:
    (pu, pv), (qu, qv) = p, q
    du, dv = qu - pu, qv - pv
    length2 = max(du * du + dv * dv, 1e-9)

    def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        t = np.clip(((u - pu) * du + (v - pv) * dv) / length2, 0.0, 1.0)
        return np.hypot(u - pu - t * du, v - pv - t * dv) - width / 2

    return sdf


def _intersect(*sdfs: SdfFn) -> SdfFn:
    def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.maximum.reduce([f(u, v) for f in sdfs])

    return sdf


def _box_around(cu: float, cv: float, ru: float, rv: float) -> Box:
    return cu - ru, cu + ru, cv - rv, cv + rv


def _face_sdf(idp: IdentityParams) -> SdfFn:
    """The face outline (forehead to chin), narrowing towards the chin by `jaw_taper`."""

    def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        y = (v - idp.face_cy) / idp.face_h
        half = idp.face_w * (1.0 - idp.jaw_taper * np.clip(y, 0.0, 1.0) ** 2)
        return (np.sqrt(((u - _MID) / half) ** 2 + y * y) - 1.0) * idp.face_w

    return sdf


def _smooth_noise(rng: np.random.Generator, cells: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Smooth noise of about unit amplitude: a small random field resized bicubically."""
    small = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((shape[1], shape[0]), Image.BICUBIC))


# (cells across one canvas) of the shared texture banks an identity crops its textures from
_TEXTURES = {"blotch": (6, 6), "pores": (28, 28), "speckle": (40, 40), "strands": (8, 50), "locks": (12, 12)}


@lru_cache(maxsize=4)
def _texture_banks(n: int) -> dict[str, np.ndarray]:
    """Fixed smooth-noise fields twice the canvas size, drawn once per process.

    An identity's textures are crops of these at identity-seeded offsets: as distinct as
    freshly drawn noise for our purpose, at no per-identity cost.
    """
    rng = np.random.default_rng(0x5EED)  # fixed: the banks belong to the generator, not to the seed
    return {name: _smooth_noise(rng, (2 * rows, 2 * cols), (2 * n, 2 * n)) for name, (rows, cols) in _TEXTURES.items()}


def _texture(rng: np.random.Generator, name: str, n: int) -> np.ndarray:
    """An n x n crop of a texture bank at a random offset."""
    y, x = rng.integers(0, n, 2)
    return _texture_banks(n)[name][y:y + n, x:x + n]


# ----------------------------------------------------------------------------- identity canvas

def _draw_skin(layer: _Layer, idp: IdentityParams, rng: np.random.Generator) -> None:
    n = layer.rgba.shape[1]
    skin = np.asarray(idp.skin, np.float32)
    face, w, cy, h = _face_sdf(idp), idp.face_w, idp.face_cy, idp.face_h
    neck_top = cy + 0.4 * h
    _paint(layer, (_MID - w, _MID + w, neck_top, TEMPLATE + _MARGIN),
           lambda u, v: np.maximum(np.abs(u - _MID) - 0.62 * w, neck_top - v), skin * 0.72)
    for side in (-1.0, 1.0):
        ear_u = _MID + side * (w - 1.0)
        box = _box_around(ear_u, idp.ear_y, idp.ear_size, 2 * idp.ear_size)
        _paint(layer, box, _ellipse(ear_u, idp.ear_y, 0.55 * idp.ear_size, idp.ear_size), skin * 0.88)
        _darken(layer, box, _ellipse(ear_u + side * 0.8, idp.ear_y, 0.25 * idp.ear_size, 0.6 * idp.ear_size),
                0.2, soft=1.0)
    texture = idp.texture * (_texture(rng, "blotch", n) + 0.5 * _texture(rng, "pores", n))
    rim = np.clip(-face(layer.fu, layer.fv) / 9.0, 0.0, 1.0)  # darker towards the outline: a hint of roundness
    _paint(layer, (_MID - w, _MID + w, cy - h, cy + h), face, skin, shade=(1.0 + texture) * (0.8 + 0.2 * rim))


def _draw_static_features(layer: _Layer, idp: IdentityParams) -> None:
    """Eye sockets, open eyes, brows, cheeks, nose, chin shadow and moles."""
    for side in (-1.0, 1.0):
        cu, cv = _MID + side * idp.eye_dx, idp.eye_y
        _darken(layer, _box_around(cu, cv, 16, 12), _ellipse(cu, cv - 1.0, idp.eye_rx + 2.0, idp.eye_ry + 3.0),
                0.14, soft=3.0)
        _paint(layer, _box_around(cu, cv + 14, 14, 12), _ellipse(cu + side * 2.0, cv + 15.0, 7.0, 5.0),
               (0.85, 0.35, 0.35), opacity=idp.blush, soft=5.0)
        box = _box_around(cu, cv, idp.eye_rx + 2, idp.eye_ry + 2)
        sclera = _ellipse(cu, cv, idp.eye_rx, idp.eye_ry, -side * idp.eye_tilt)
        _paint(layer, box, sclera, (0.93, 0.91, 0.88))
        _paint(layer, box, _intersect(sclera, _ellipse(cu, cv, idp.iris_r, idp.iris_r)), idp.iris)
        _paint(layer, box, _intersect(sclera, _ellipse(cu, cv, 0.45 * idp.iris_r, 0.45 * idp.iris_r)), (0.03,) * 3)
        glint = 0.3 * idp.iris_r
        _paint(layer, box, _ellipse(cu - glint, cv - glint, 0.5, 0.5), (1.0, 1.0, 1.0), opacity=0.8)
        _paint(layer, box, lambda u, v, f=sclera, cv=cv: np.maximum(np.abs(f(u, v)) - 0.55, v - cv),
               np.asarray(idp.skin) * 0.3)
        _draw_brow(layer, idp, side)
        nostril_u = _MID + side * idp.nose_w * 0.5
        _darken(layer, _box_around(_MID + side * idp.nose_w, idp.nose_y - 1, 6, 6),
                _ellipse(_MID + side * idp.nose_w * 0.9, idp.nose_y - 1.0, 2.2, 3.0), 0.12, soft=1.5)
        _darken(layer, _box_around(nostril_u, idp.nose_y, 4, 4),
                _ellipse(nostril_u, idp.nose_y, 1.4 * idp.nostril, 0.8 * idp.nostril), 0.55)
    bridge = _segment((_MID - 3.5, idp.eye_y), (_MID - 2.5, idp.nose_y - 4.0), 2.0)
    _darken(layer, (_MID - 8, _MID + 2, idp.eye_y - 4, idp.nose_y), bridge, idp.nose_shade, soft=2.0)
    _darken(layer, _box_around(_MID, idp.nose_y - 3, 6, 5), _ellipse(_MID, idp.nose_y - 3.5, 3.0, 2.5),
            -0.08, soft=2.0)
    _darken(layer, _box_around(_MID, idp.mouth_y + idp.lip_lower + 4, 10, 5),
            _ellipse(_MID, idp.mouth_y + idp.lip_lower + 3.5, 6.0, 1.5), 0.1, soft=2.0)
    for mu, mv, mr in idp.moles:
        _darken(layer, _box_around(mu, mv, mr + 2, mr + 2), _ellipse(mu, mv, mr, mr), 0.5)


def _draw_brow(layer: _Layer, idp: IdentityParams, side: float) -> None:
    cu, cv = _MID + side * (idp.eye_dx + 1.0), idp.eye_y - idp.brow_gap
    c, s = math.cos(side * idp.brow_slant), math.sin(side * idp.brow_slant)

    def brow(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        x, y = (u - cu) * side, v - cv
        x, y = c * x - s * y, c * y + s * x
        t = np.clip(x / idp.brow_len, -1.0, 1.0)
        centre = -idp.brow_arch * (1.0 - t * t)
        return np.maximum(np.abs(y - centre) - idp.brow_thick * (0.6 - 0.3 * t), np.abs(x) - idp.brow_len)

    box = _box_around(cu, cv - 1, idp.brow_len + 2, idp.brow_arch + idp.brow_thick + 3)
    _paint(layer, box, brow, idp.brow, opacity=0.92)


def _draw_hair(layer: _Layer, idp: IdentityParams, rng: np.random.Generator) -> None:
    n = layer.rgba.shape[1]
    face, w = _face_sdf(idp), idp.face_w
    speckle = 1.0 + 0.2 * _texture(rng, "speckle", n)
    if idp.beard:
        top = idp.eye_y + 8.0 * idp.sideburn

        def beard(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            return np.maximum(face(u, v), top + (1.0 - ((u - _MID) / w) ** 2) * (idp.mouth_y - 4.0 - top) - v)

        _paint(layer, (_MID - w - 2, _MID + w + 2, idp.eye_y, TEMPLATE), beard, idp.hair, idp.beard, 1.5, speckle)
    if idp.moustache:
        ends = (_MID - idp.mouth_w + 1, idp.mouth_y - 2.5), (_MID + idp.mouth_w - 1, idp.mouth_y - 2.5)
        _paint(layer, _box_around(_MID, idp.mouth_y - 4, idp.mouth_w + 3, 4), _segment(*ends, 3.0), idp.hair,
               idp.moustache, 1.0, speckle)

    streaks = 1.0 + 0.18 * _texture(rng, "strands", n) + 0.1 * _texture(rng, "locks", n)
    outer_w, outer_cy = w + idp.hair_volume, idp.face_cy - 2.0
    outer_h = idp.face_h + 0.6 * idp.hair_volume + 2.0

    def hair_sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        across = (u - _MID) / w
        line = idp.hairline + idp.temple_drop * across**2 + idp.parting * across
        crown = (np.sqrt(((u - _MID) / outer_w) ** 2 + ((v - outer_cy) / outer_h) ** 2) - 1.0) * outer_w
        outer = np.where(v < outer_cy, crown, np.abs(u - _MID) - outer_w)
        bounds = np.maximum(np.maximum(outer, v - idp.hair_bottom), idp.hair_top - v)
        return np.maximum(bounds, -np.maximum(face(u, v), line - v))

    _paint(layer, (_MID - outer_w, _MID + outer_w, outer_cy - outer_h, idp.hair_bottom), hair_sdf, idp.hair,
           shade=streaks)


class _IdentityArt:
    """One identity drawn at one output size: the static head and its cached variants.

    `canvas` is the premultiplied RGBA uint8 head with open eyes and no mouth. Expressions
    are patches that replace a window of it (eyes at an openness level, the mouth at a
    smile/opening level); occluders are premultiplied sprites composited over it. Both are
    drawn on first use on the float canvas (then restored), so an identity costs a few
    milliseconds once and each image only pastes a few small arrays.
    """

    def __init__(self, idp: IdentityParams, size: int) -> None:
        self.idp = idp
        self.layer = _Layer(np.zeros((4,) + _canvas_grid(size)[0].shape, np.float32), size)
        rng = np.random.default_rng(idp.texture_seed)
        _draw_skin(self.layer, idp, rng)
        _draw_static_features(self.layer, idp)
        _draw_hair(self.layer, idp, rng)
        self.layer.rgba[:, [0, -1]] = 0.0  # pose samples outside the canvas clamp to its border: keep it empty
        self.layer.rgba[:, :, [0, -1]] = 0.0
        self.canvas = _to_uint8(self.layer.rgba)
        self.work = self.canvas.copy()  # each image pastes into this and restores it afterwards
        self._patches: dict[tuple, tuple[slice, slice, np.ndarray]] = {}

    def patch(self, key: tuple) -> tuple[slice, slice, np.ndarray]:
        """(rows, cols, patch) for ("eyes", openness), ("mouth", smile, opening) or ("occluder", kind).

        Expression patches are the finished window; occluder patches are sprites drawn on an
        empty window, to be composited with the "over" operator.
        """
        if key not in self._patches:
            idp, layer = self.idp, self.layer
            kind, *values = key
            box = {"eyes": _eyes_box, "mouth": _mouth_box, "occluder": _occluder_box}[kind](idp, *values)
            rows, cols = layer.window(box)
            saved = layer.rgba[:, rows, cols].copy()
            if kind == "occluder":
                layer.rgba[:, rows, cols] = 0.0
            {"eyes": _draw_eyelids, "mouth": _draw_mouth, "occluder": _draw_occluder}[kind](layer, idp, *values)
            self._patches[key] = rows, cols, _to_uint8(layer.rgba[:, rows, cols])
            layer.rgba[:, rows, cols] = saved
        return self._patches[key]

    def sample(self, nu: NuisanceParams, index: np.ndarray) -> np.ndarray:
        """The canvas with this image's expression and occluder, gathered at `index`: (4, ...) uint8."""
        eyes = _nearest(EYE_LEVELS, nu.eye_open)
        mouth = ("mouth", _nearest(SMILE_LEVELS, nu.smile), _nearest(OPEN_LEVELS, nu.mouth_open))
        changed = []
        try:
            for key in [("eyes", eyes), mouth] if eyes < 1.0 else [mouth]:
                rows, cols, patch = self.patch(key)
                changed.append((rows, cols))
                self.work[:, rows, cols] = patch
            if nu.occluder != "none":
                rows, cols, sprite = self.patch(("occluder", nu.occluder))
                changed.append((rows, cols))
                under = self.work[:, rows, cols]
                keep = 1.0 - sprite[3] / np.float32(255.0)
                tint = np.asarray(nu.occluder_color, np.float32).reshape(3, 1, 1)
                under[:3] = sprite[:3] * tint + under[:3] * keep + 0.5
                under[3] = sprite[3] + under[3] * keep + 0.5
            n = self.work.shape[1]
            return np.take(self.work.reshape(4, n * n), index, axis=1)
        finally:
            for rows, cols in changed:
                self.work[:, rows, cols] = self.canvas[:, rows, cols]


def _to_uint8(rgba: np.ndarray) -> np.ndarray:
    return np.clip(rgba + 0.5, 0, 255).astype(np.uint8)


@lru_cache(maxsize=4)
def _identity_art(idp: IdentityParams, size: int) -> _IdentityArt:
    return _IdentityArt(idp, size)


# ----------------------------------------------------------------------------- expressions and occluders

# Expression levels an image's values snap to, so that each identity draws a dozen patches at most.
EYE_LEVELS = (0.1, 0.5, 0.8, 1.0)  # 1 = the canvas itself
SMILE_LEVELS = (-0.25, 0.15, 0.55, 0.95)
OPEN_LEVELS = (0.0, 0.45, 0.9)


def _nearest(levels: tuple[float, ...], value: float) -> float:
    return min(levels, key=lambda level: abs(level - value))


def _eyes_box(idp: IdentityParams, openness: float) -> Box:
    return _box_around(_MID, idp.eye_y, idp.eye_dx + idp.eye_rx + 1.5, idp.eye_ry + 1.5)


def _draw_eyelids(layer: _Layer, idp: IdentityParams, openness: float) -> None:
    """Lower the upper lids over the open eyes of the canvas (squint, blink)."""
    lid = idp.eye_y - idp.eye_ry + 2.0 * idp.eye_ry * (1.0 - openness)
    skin = np.asarray(idp.skin)
    for side in (-1.0, 1.0):
        cu = _MID + side * idp.eye_dx
        rows, cols = layer.window(_box_around(cu, idp.eye_y, idp.eye_rx + 1.5, idp.eye_ry + 1.5))
        eye = _ellipse(cu, idp.eye_y, idp.eye_rx + 0.6, idp.eye_ry + 0.6, -side * idp.eye_tilt)
        layer.blend(rows, cols, layer.coverage(rows, cols, lambda u, v, f=eye: np.maximum(f(u, v), v - lid)),
                    skin * 0.92)
        lash = layer.coverage(rows, cols, lambda u, v, f=eye: np.maximum(f(u, v), np.abs(v - lid) - 0.5))
        layer.blend(rows, cols, lash, skin * 0.3)


def _mouth_box(idp: IdentityParams, smile: float, opening: float) -> Box:
    lift, gap = 3.5 * smile, 3.0 * opening
    top, bottom = idp.mouth_y - gap - idp.lip_upper - max(lift, 0.0), idp.mouth_y + gap + idp.lip_lower - min(lift, 0.0)
    return _MID - idp.mouth_w - 1, _MID + idp.mouth_w + 1, top - 1, bottom + 1


def _draw_mouth(layer: _Layer, idp: IdentityParams, smile: float, opening: float) -> None:
    """Lips around a centre line whose corners rise with `smile`; `opening` parts them."""
    half, lift, gap = idp.mouth_w, 3.5 * smile, 3.0 * opening
    rows, cols = layer.window(_mouth_box(idp, smile, opening))
    u, v = layer.fu[rows, cols], layer.fv[rows, cols]
    t = (u - _MID) / half
    q = np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))  # lips thin out towards the corners
    y = v - idp.mouth_y + lift * t * t  # vertical offset from the centre line
    ends = np.abs(u - _MID) - half

    def band(lo: float, hi: float) -> np.ndarray:
        """Coverage of lo*q <= y <= hi*q."""
        dist = np.maximum(np.maximum(lo * q - y, y - hi * q), ends)
        return np.clip(0.5 - dist * layer.per_unit, 0.0, 1.0)

    lips = np.asarray(idp.lips)
    layer.blend(rows, cols, band(-gap - idp.lip_upper, -gap), lips)
    layer.blend(rows, cols, band(gap, gap + idp.lip_lower), lips * 1.08)
    if gap > 0.3:
        layer.blend(rows, cols, band(-gap, gap), (0.22, 0.08, 0.08))
        layer.blend(rows, cols, band(-gap, -0.3 * gap), (0.9, 0.88, 0.82))
    else:
        layer.blend(rows, cols, band(-0.4, 0.4), lips * 0.45)


def _occluder_box(idp: IdentityParams, kind: str) -> Box:
    w = idp.face_w
    if kind == "mask":
        return _MID - w - 3, _MID + w + 3, idp.ear_y - 8, idp.face_cy + idp.face_h + 3
    if kind == "cap":
        return _MID - w - 7, _MID + w + 7, -_MARGIN, idp.eye_y - idp.brow_gap - 5
    return _MID - w - 3, _MID + w + 3, idp.eye_y - idp.eye_rx - 4, idp.eye_y + idp.eye_rx + 4  # glasses


def _draw_occluder(layer: _Layer, idp: IdentityParams, kind: str) -> None:
    """Draw an occluder in white-based greys; each image tints it with its own colour."""
    rows, cols = layer.window(_occluder_box(idp, kind))
    paint, w = np.ones(3, np.float32), idp.face_w

    def cover(sdf: SdfFn) -> np.ndarray:
        return layer.coverage(rows, cols, sdf)

    if kind == "mask":
        top, face = idp.nose_y - 9.0, _face_sdf(idp)
        mask = cover(lambda u, v: np.maximum(face(u, v) - 1.5, top + 3.0 * ((u - _MID) / w) ** 2 - v))
        layer.blend(rows, cols, mask, paint)
        for fold in (top + 6.0, top + 11.0, top + 16.0):
            pleat = cover(lambda u, v, f=fold: np.abs(v - f - 2.0 * ((u - _MID) / w) ** 2) - 0.6)
            layer.scale(rows, cols, mask * pleat, 0.12)
        for side in (-1.0, 1.0):
            strap = _segment((_MID + side * (w - 3), top + 3), (_MID + side * (w + 1), idp.ear_y - 5), 1.2)
            layer.blend(rows, cols, cover(strap), paint * 0.95)
    elif kind == "cap":
        brim = idp.eye_y - idp.brow_gap - 7.0
        crown = _ellipse(_MID, idp.face_cy - 8.0, w + 5.0, idp.face_h + 6.0)
        layer.blend(rows, cols, cover(lambda u, v: np.maximum(crown(u, v), v - brim)), paint)
        layer.scale(rows, cols, cover(lambda u, v: np.maximum(crown(u, v), np.abs(v - brim + 1.5) - 1.5)), 0.3)
    else:
        dark = kind == "sunglasses"
        rim = paint * 0.4 if dark else paint
        a, b, cv = idp.eye_rx + 3.5, 0.75 * idp.eye_rx + 2.0, idp.eye_y + 1.0
        for side in (-1.0, 1.0):
            cu = _MID + side * idp.eye_dx
            lens = _ellipse(cu, cv, a, b)
            glass = (0.05, 0.05, 0.07) if dark else (0.8, 0.85, 0.9)
            layer.blend(rows, cols, cover(lens) * (0.9 if dark else 0.15), glass)
            layer.blend(rows, cols, cover(lambda u, v, f=lens: np.abs(f(u, v)) - 0.7), rim)
            temple = _segment((cu + side * a, cv - 1.0), (_MID + side * (w + 1.0), cv + 1.0), 1.3)
            layer.blend(rows, cols, cover(temple), rim)
        layer.blend(rows, cols, cover(_segment((_MID - idp.eye_dx + a, cv - 1), (_MID + idp.eye_dx - a, cv - 1), 1.3)),
                    rim)


# ----------------------------------------------------------------------------- per-image rendering

@lru_cache(maxsize=8)
def _output_grid(size: int) -> dict[str, np.ndarray]:
    """Template coordinates of every output pixel, depth/shading maps and fixed noise banks."""
    axis = ((np.arange(size, dtype=np.float32) + 0.5) * (TEMPLATE / size)).astype(np.float32)
    tu, tv = np.meshgrid(axis, axis)
    head = np.clip(1.0 - ((tu - _MID) / 40.0) ** 2 - ((tv - 66.0) / 52.0) ** 2, 0.0, 1.0)
    nose = np.exp(-((tu - _MID) ** 2 + (tv - 68.0) ** 2) / 60.0)
    rng = np.random.default_rng(20240607)  # fixed: the banks belong to the generator, not to the seed
    bank = 2 * size
    return {
        "tu": tu, "tv": tv, "depth": (np.sqrt(head) + 0.5 * nose).astype(np.float32),
        "nx": np.clip((tu - _MID) / 40.0, -1.0, 1.0), "ny": np.clip((tv - 62.0) / 50.0, -1.0, 1.0),
        "gx": (tu - _MID) / TEMPLATE, "gy": (tv - _MID) / TEMPLATE,
        "bg": _smooth_noise(rng, (10, 10), (bank, bank)),
        "noise": rng.standard_normal((3, bank, bank)).astype(np.float32),
    }


def _crop(bank: np.ndarray, offset: tuple[float, float], size: int) -> np.ndarray:
    """A size x size window of a (..., bank, bank) array, `offset` in [0, 1) of the room left."""
    room = bank.shape[-1] - size
    y, x = int(offset[0] * room), int(offset[1] * room)
    return bank[..., y:y + size, x:x + size]


def _pose_index(grid: dict[str, np.ndarray], nu: NuisanceParams, per_unit: float, n: int) -> np.ndarray:
    """Flat canvas index seen by every output pixel: similarity transform plus the depth warp.

    Face point f is seen at template point t = pivot + shift + scale * R(roll) (f - pivot),
    then points at depth z move by (yaw, pitch) * _DEPTH_SHIFT * z: a cheap stand-in for a
    head turning (the nose moves more than the cheeks, the outline stays).
    """
    cos, sin = math.cos(nu.roll) / nu.scale * per_unit, math.sin(nu.roll) / nu.scale * per_unit
    pu, pv = _PIVOT
    cu, cv = pu + nu.shift[0], pv + nu.shift[1]
    base_u, base_v = (pu + _MARGIN) * per_unit, (pv + _MARGIN) * per_unit
    tu, tv, depth = grid["tu"], grid["tv"], grid["depth"]
    col = cos * tu + sin * tv + (base_u - cos * cu - sin * cv) - (nu.yaw * _DEPTH_SHIFT * per_unit) * depth
    row = cos * tv - sin * tu + (base_v - cos * cv + sin * cu) - (nu.pitch * _DEPTH_SHIFT * per_unit) * depth
    col = np.clip(col, 0, n - 1, out=col).astype(np.int32)
    row = np.clip(row, 0, n - 1, out=row).astype(np.int32)
    row *= n
    row += col
    return row


def _check_size(size: int) -> None:
    if not (isinstance(size, (int, np.integer)) and 16 <= size <= 1024):
        raise UnitsfaceError(f"image size must be an integer in 16..1024, got {size!r}")


def render_face(identity: IdentityParams, nuisance: NuisanceParams, size: int = 112) -> np.ndarray:
    """Render one face as an (size, size, 3) uint8 RGB array (before JPEG encoding)."""
    _check_size(size)
    nu, grid, art = nuisance, _output_grid(size), _identity_art(identity, size)
    face = art.sample(nu, _pose_index(grid, nu, art.layer.per_unit, art.canvas.shape[1]))

    cast = np.asarray(nu.cast, np.float32).reshape(3, 1, 1)
    light = (nu.gain * nu.shade_x) * grid["nx"] + (nu.gain * nu.shade_y) * grid["ny"] + nu.gain
    c0, c1 = (np.asarray(c, np.float32).reshape(3, 1, 1) * 255.0 for c in nu.background)
    ramp = math.cos(nu.background_angle) * grid["gx"] + math.sin(nu.background_angle) * grid["gy"] + 0.5
    ramp += nu.background_texture * _crop(grid["bg"], nu.background_offset, size)
    clear = 1.0 - face[3] / np.float32(255.0)  # the background shows where the head does not
    image = face[:3] * (light * cast) + ((c1 - c0) * ramp + c0) * clear
    for _ in range(round(nu.blur * (size / TEMPLATE) ** 2)):
        image = _binomial_blur(image)
    if nu.noise > 0.0:
        image += nu.noise * _crop(grid["noise"], nu.noise_offset, size)
    np.clip(image, 0, 255, out=image)
    out = np.empty((size, size, 3), np.uint8)
    for channel in range(3):  # per-plane stores are much faster than one transposed copy
        out[..., channel] = image[channel]
    return out


def _binomial_blur(planes: np.ndarray) -> np.ndarray:
    """One pass of the separable [1, 2, 1] / 4 filter (a Gaussian of variance 0.5 pixel^2).

    Works on the flattened planes so every slice is contiguous; horizontally the first and
    last pixel of a row see each other's row, which only touches the 1-pixel frame.
    """
    c, h, w = planes.shape
    flat = planes.reshape(c, h * w)
    across = flat * 2.0
    across[:, 1:] += flat[:, :-1]
    across[:, :-1] += flat[:, 1:]
    across[:, 0] += flat[:, 0]
    across[:, -1] += flat[:, -1]
    down = across * 2.0
    down[:, w:] += across[:, :-w]
    down[:, :-w] += across[:, w:]
    down[:, :w] += across[:, :w]
    down[:, -w:] += across[:, -w:]
    return (down * np.float32(1.0 / 16.0)).reshape(c, h, w)


# ----------------------------------------------------------------------------- data set writer

def _render_jpegs(job: tuple[int, int, int, tuple[int, ...], int, float]) -> list[bytes]:
    """JPEG bytes of some images of one identity (one task for a worker process)."""
    seed, split, identity, images, size, difficulty = job
    idp = identity_params(seed, split, identity)
    out = []
    for image in images:
        nu = nuisance_params(seed, split, identity, image, difficulty)
        out.append(encode_jpeg(render_face(idp, nu, size), nu.jpeg_quality))
    return out


def _run_jobs(jobs: list[tuple], workers: int) -> Iterator[list[bytes]]:
    """Results of `_render_jpegs` in job order, in this process or in `workers` spawned ones."""
    if workers <= 1:
        yield from map(_render_jpegs, jobs)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(_render_jpegs, jobs, chunksize=max(1, len(jobs) // (8 * workers)))


def render_identities(seed: int, split: int, identities: int, images: int, size: int = 112,
                      difficulty: float = DEFAULT_DIFFICULTY) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×size×size×3 faces of identities 0..identities−1 of a render stream, `images` each, and their
    labels — the same pixels as the decoded JPEGs minus the compression (used in memory by benchmarks)."""
    faces, labels = [], []
    for i in range(identities):
        idp = identity_params(seed, split, i)
        for j in range(images):
            faces.append(render_face(idp, nuisance_params(seed, split, i, j, difficulty), size))
            labels.append(i)
    return np.stack(faces), np.asarray(labels)


def _write_identity_folder(out: Path, seed: int, split: int, identities: int, images: int, size: int,
                           difficulty: float, workers: int) -> None:
    """`out/<id NNNN>/<NN>.jpg`: every image of identities 0..identities−1 of a render stream."""
    jobs = [(seed, split, i, tuple(range(images)), size, difficulty) for i in range(identities)]
    for i, jpegs in enumerate(_run_jobs(jobs, workers)):
        folder = out / f"id{i:04d}"
        folder.mkdir(parents=True)
        for j, jpeg in enumerate(jpegs):
            (folder / f"{j:02d}.jpg").write_bytes(jpeg)


def pair_plan(seed: int, identities: int, pairs: int) -> np.ndarray:
    """(pairs, 3) int array of (identity a, identity b, same) in LFW fold order.

    10 contiguous folds, each `pairs/20` genuine pairs then as many impostor pairs; genuine
    pairs cycle through shuffled identities so that every identity is used evenly.
    """
    rng = _generator(seed, _PAIRS)
    half = pairs // 20
    genuine = np.concatenate([rng.permutation(identities) for _ in range(pairs // 2 // identities + 1)])
    rows = []
    for fold in range(10):
        rows += [(a, a, 1) for a in genuine[fold * half:(fold + 1) * half]]
        rows += [tuple(rng.choice(identities, 2, replace=False)) + (0,) for _ in range(half)]
    return np.asarray(rows, dtype=np.int64)


def _check_arguments(seed: int, counts: dict[str, tuple[int, int]], size: int, workers: int) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise UnitsfaceError(f"synthetic data set: seed must be an integer >= 0, got {seed!r}")
    for name, (value, low) in {**counts, "workers": (workers, 1)}.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise UnitsfaceError(f"synthetic data set: {name} must be an integer >= {low}, got {value!r}")
    if counts["val_pairs"][0] % 20:
        raise UnitsfaceError("synthetic data set: val_pairs must be a multiple of 20 (10 folds of same + "
                             f"different pairs), got {counts['val_pairs'][0]}")
    _check_size(size)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_sha256(root: Path) -> str:
    """One digest of a folder: every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(_sha256(path)))
    return digest.hexdigest()


def write_synthetic_dataset(out_dir: str | os.PathLike, identities: int, images_per_identity: int, seed: int,
                            image_size: int = 112, val_identities: int | None = None, val_pairs: int | None = None,
                            heldout_identities: int = 100, heldout_images: int = 8,
                            difficulty: float = DEFAULT_DIFFICULTY, workers: int = 1,
                            overwrite: bool = False) -> dict:
    """Write `train.rec`/`train.idx`/`property`, `val.bin`, the held-out identity set `heldout/` and
    `manifest.json`; return the manifest.

    Validation identities (`val.bin`, VAL_SPLIT) and held-out identities (`heldout/<id>/<img>.jpg`,
    HELDOUT_SPLIT) come from their own seed streams, so they are disjoint from the training identities
    and from each other. `heldout/` is scored all-pairs: 100 identities × 8 images give 316,800
    impostor pairs, enough to read FAR 1e-4, where val.bin's pairs stop near 1e-3. Everything is
    written to a temp folder beside `out_dir` and renamed at the end: an interrupted run leaves no
    half-written data set.
    """
    val_identities = max(20, identities // 4) if val_identities is None else val_identities
    pairs = 600 if val_pairs is None else val_pairs
    _check_arguments(seed, {"identities": (identities, 1), "images_per_identity": (images_per_identity, 1),
                            "val_identities": (val_identities, 2), "val_pairs": (pairs, 20),
                            "heldout_identities": (heldout_identities, 2), "heldout_images": (heldout_images, 2)},
                     image_size, workers)
    sample_nuisance(np.random.default_rng(0), difficulty)  # validates difficulty before any work
    out = Path(out_dir)
    if out.exists() and not (overwrite and out.is_dir()) and (not out.is_dir() or any(out.iterdir())):
        raise UnitsfaceError(f"{out} already exists and is not empty; pass overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.parent / f".{out.name}.{what}-{os.getpid()}" for what in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        train_jobs = [(seed, TRAIN_SPLIT, i, tuple(range(images_per_identity)), image_size, difficulty)
                      for i in range(identities)]
        items = ((label, jpeg) for label, jpegs in enumerate(_run_jobs(train_jobs, workers)) for jpeg in jpegs)
        write_face_dataset(tmp, items, name="train")

        plan = pair_plan(seed, val_identities, pairs)
        slots = plan[:, :2].reshape(-1)  # image 2k, 2k+1 of pair k; the slot is also the image index
        used = np.unique(slots)
        val_jobs = [(seed, VAL_SPLIT, int(i), tuple(int(s) for s in np.flatnonzero(slots == i)), image_size,
                     difficulty) for i in used]
        images: list[bytes] = [b""] * len(slots)
        for job, jpegs in zip(val_jobs, _run_jobs(val_jobs, workers)):
            for slot, jpeg in zip(job[3], jpegs):
                images[slot] = jpeg
        save_bin(tmp / "val.bin", images, plan[:, 2].astype(bool))
        _write_identity_folder(tmp / HELDOUT_FOLDER, seed, HELDOUT_SPLIT, heldout_identities, heldout_images,
                               image_size, difficulty, workers)

        manifest = {
            "generator": "unitsface.data.synthetic", "version": GENERATOR_VERSION, "seed": seed,
            "image_size": image_size, "difficulty": difficulty,
            "train": {"split": TRAIN_SPLIT, "identities": identities, "images_per_identity": images_per_identity,
                      "images": identities * images_per_identity},
            "val": {"split": VAL_SPLIT, "identities": val_identities, "identities_used": int(used.size),
                    "pairs": pairs, "genuine": int(plan[:, 2].sum()), "folds": 10},
            "heldout": {"split": HELDOUT_SPLIT, "folder": HELDOUT_FOLDER, "identities": heldout_identities,
                        "images_per_identity": heldout_images,
                        "impostor_pairs": heldout_images ** 2 * heldout_identities * (heldout_identities - 1) // 2,
                        "sha256": _tree_sha256(tmp / HELDOUT_FOLDER)},
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())
                      if p.is_file()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


# ----------------------------------------------------------------------------- preview

def contact_sheet(seed: int = 0, identities: int = 6, images: int = 8, size: int = 112,
                  difficulty: float = DEFAULT_DIFFICULTY, split: int = TRAIN_SPLIT) -> np.ndarray:
    """A grid of faces as stored in a data set (rows = identities, columns = images), 2-pixel white gaps."""
    if identities < 1 or images < 1:
        raise UnitsfaceError(f"contact sheet needs at least one row and one column, got {identities}x{images}")
    step = size + 2
    sheet = np.full((identities * step, images * step, 3), 255, np.uint8)
    for i in range(identities):
        for j, jpeg in enumerate(_render_jpegs((seed, split, i, tuple(range(images)), size, difficulty))):
            sheet[i * step:i * step + size, j * step:j * step + size] = decode(jpeg)
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unitsface.data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--preview", required=True, metavar="FILE.png", help="write a contact sheet here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identities", type=int, default=6, help="rows")
    parser.add_argument("--images", type=int, default=8, help="columns")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--difficulty", type=float, default=DEFAULT_DIFFICULTY)
    args = parser.parse_args(argv)

    def write() -> str:
        sheet = contact_sheet(args.seed, args.identities, args.images, args.size, args.difficulty)
        with atomic_open(args.preview) as handle:
            Image.fromarray(sheet).save(handle, format="PNG")
        return args.preview

    return run_script(write)


if __name__ == "__main__":
    raise SystemExit(main())
