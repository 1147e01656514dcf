"""Face masks drawn onto aligned 112×112 faces: the MFR probes and the training augmentation.

insightface renders its MFR masks through a fitted 3D face model (BFM), which cannot ship for
licence reasons. This renderer needs only the five landmarks every aligned face already has
(the ArcFace template when an image has none): they fix a face frame in which v = 0 is the eye
line, v = 1 the mouth line and one unit of u the distance between the eyes. A mask is a region
of that frame bounded by a top curve under the eyes, a bottom curve that follows the jaw up
from the chin, and the sides of the face; each type (surgical with pleats, cloth, N95, KN95) is
a set of curve and texture parameters, so one vectorised formula draws a whole batch of mixed
types. Colours follow insightface's augmentation: white, blue, black, green at 0.4/0.4/0.1/0.1.
The mask takes the face's own light (a plane fitted to the luminance it covers), a cylinder-like
falloff to the sides, fabric texture from fixed noise banks, and an anti-aliased edge.

Every random choice is drawn by `sample_masks` from the generator it is given, so a seed fixes
the result; work is restricted to the rows and columns the batch's masks can reach, and pixels
outside a mask are returned bit for bit.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
from PIL import Image

from unitsface.align import ARCFACE_TEMPLATE
from unitsface.data.images import list_images, load_image
from unitsface.data.synthetic import HELDOUT_SPLIT, render_identities
from unitsface.errors import UnitsfaceError, run_script
from unitsface.io import atomic_open

KINDS = ("surgical", "cloth", "n95", "kn95")
# insightface's MFR augmentation: white, blue, black, green with p = 0.4, 0.4, 0.1, 0.1 (RGB in [0, 1]).
COLOURS = {"white": (0.93, 0.93, 0.92), "blue": (0.53, 0.70, 0.86), "black": (0.11, 0.11, 0.13),
           "green": (0.45, 0.68, 0.60)}
COLOUR_P = (0.4, 0.4, 0.1, 0.1)
EDGE_SOFTNESS = 1.4  # pixels over which the edge goes from opaque to clear
_BANK = 256  # side of the texture banks (pixels)

# Shape (frame units) and texture of each kind: top(u) = top + top_peak·|u| + top_curve·u²,
# bottom(u) = bottom − bottom_point·|u| − bottom_curve·u², |u| <= half_width. Template landmarks
# put the nose tip at v ≈ 0.49, the mouth corners at (±0.41, 1) and the chin near v ≈ 1.5.
_STYLES = {
    #            top   peak  curve  bottom point curve  width pleats weave fold  rim  grain
    "surgical": (0.27, 0.00, 0.12, 1.55, 0.00, 0.55, 0.98, 0.16, 0.00, 0.00, 0.06, 0.05),
    "cloth":    (0.25, 0.00, 0.25, 1.60, 0.00, 0.75, 0.95, 0.00, 0.10, 0.10, 0.04, 0.07),
    "n95":      (0.22, 0.00, 0.35, 1.52, 0.00, 0.80, 0.88, 0.00, 0.00, 0.00, 0.22, 0.05),
    "kn95":     (0.17, 0.26, 0.00, 1.62, 0.45, 0.20, 0.95, 0.00, 0.00, 0.22, 0.08, 0.04),
}
_JITTER = np.array([0.03, 0.0, 0.03, 0.06, 0.0, 0.05, 0.04, 0.0, 0.0, 0.0, 0.0, 0.0])  # uniform ± per field
_TABLE = np.array([_STYLES[kind] for kind in KINDS])
_COLOUR_TABLE = np.array(list(COLOURS.values()))
_COLOUR_CDF = np.cumsum(COLOUR_P)


@dataclass(frozen=True)
class MaskParams:
    """Per-face mask parameters (one row per face), as `sample_masks` draws them."""

    kind: np.ndarray  # int index into KINDS
    colour: np.ndarray  # (n, 3) RGB in [0, 1]
    shape: np.ndarray  # (n, 12) the _STYLES fields after jitter
    offset: np.ndarray  # (n, 2) int, where each face's texture is cut from the banks

    def __len__(self) -> int:
        return len(self.kind)

    @classmethod
    def concat(cls, parts: list[MaskParams]) -> MaskParams:
        """One parameter set for several faces drawn separately (e.g. one generator per image)."""
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


def sample_masks(rng: np.random.Generator, n: int, kinds: tuple[str, ...] = KINDS) -> MaskParams:
    """Draw `n` masks: a kind (uniform over `kinds`), an insightface colour with a little variation,
    shape jitter and a texture offset."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UnitsfaceError(f"unknown mask kind {unknown[0]!r}; known: {', '.join(KINDS)}" if unknown
                             else "no mask kind given")
    kind = np.asarray([KINDS.index(k) for k in kinds])[rng.integers(0, len(kinds), n)]
    pick = np.minimum(np.searchsorted(_COLOUR_CDF, rng.random(n), side="right"), len(COLOURS) - 1)
    colour = np.clip(_COLOUR_TABLE[pick] * rng.uniform(0.92, 1.06, (n, 1)) + rng.normal(0.0, 0.015, (n, 3)), 0.0, 1.0)
    shape = _TABLE[kind] + rng.uniform(-1.0, 1.0, (n, len(_JITTER))) * _JITTER
    return MaskParams(kind, colour, shape, rng.integers(0, _BANK - 112, (n, 2)))


@lru_cache(maxsize=1)
def _banks() -> tuple[np.ndarray, np.ndarray]:
    """(grain, weave): fixed float32 texture banks, zero mean. They belong to the renderer, not to a
    seed, so that a face's texture is decided by its drawn offset alone."""
    rng = np.random.default_rng(20251111)
    coarse = rng.standard_normal((_BANK // 8 + 2, _BANK // 8 + 2))
    ys = np.arange(_BANK) / 8.0
    i0, f = ys.astype(int), (ys % 1.0)
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]  # bilinear upsampling of coarse noise
    smooth = rows[:, i0] * (1 - f) + rows[:, i0 + 1] * f
    grain = 0.5 * smooth + 0.5 * rng.standard_normal((_BANK, _BANK))
    y, x = np.mgrid[0:_BANK, 0:_BANK]
    weave = np.sin(x * 2.1) * np.sin(y * 2.1) + 0.3 * rng.standard_normal((_BANK, _BANK))
    return ((grain - grain.mean()) / grain.std()).astype(np.float32), (weave / weave.std()).astype(np.float32)


def _frames(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per face: the affine map pixel (x, y, 1) -> (u, v) as a (n, 2, 3) array, and the pixels per
    unit of u and of v (for edge widths in pixels)."""
    eyes = landmarks[:, :2].mean(1)
    mouth = landmarks[:, 3:].mean(1)
    across = landmarks[:, 1] - landmarks[:, 0]
    spacing = np.sqrt(np.einsum("ij,ij->i", across, across))
    if not (spacing > 1e-6).all():
        raise UnitsfaceError("mask landmarks are degenerate: the two eyes coincide")
    ex = across / spacing[:, None]
    ey = np.stack([-ex[:, 1], ex[:, 0]], 1)  # 90° clockwise in image coordinates: pointing down the face
    height = np.einsum("ij,ij->i", mouth - eyes, ey)
    if not (height > 1e-6).all():
        raise UnitsfaceError("mask landmarks are degenerate: the mouth is not below the eyes")
    centre = (landmarks[:, 2] + mouth) / 2.0  # the nose and mouth fix the centre line (it follows a turned head)
    frame = np.empty((len(landmarks), 2, 3))
    frame[:, 0, :2] = ex / spacing[:, None]
    frame[:, 0, 2] = -np.einsum("ij,ij->i", centre, ex) / spacing
    frame[:, 1, :2] = ey / height[:, None]
    frame[:, 1, 2] = -np.einsum("ij,ij->i", eyes, ey) / height
    return frame, spacing, height


def _window(frame: np.ndarray, spacing: np.ndarray, height: np.ndarray, shape: np.ndarray,
            size: int) -> tuple[slice, slice]:
    """Rows and columns every mask of the batch can touch: the corners of each mask's (u, v) box mapped
    back to pixels (the frame's axes are orthogonal: p = spacing·(u − u₀)·ex + height·(v − v₀)·ey),
    widened by the edge softness."""
    width = shape[:, 6]
    top = np.minimum(shape[:, 0], shape[:, 0] + shape[:, 1] * width + shape[:, 2] * width**2)
    ex, ey = frame[:, 0, :2] * spacing[:, None], frame[:, 1, :2] * height[:, None]
    pixels = np.concatenate([((s * width - frame[:, 0, 2]) * spacing)[:, None] * ex
                             + ((v - frame[:, 1, 2]) * height)[:, None] * ey
                             for s in (-1, 1) for v in (top, shape[:, 3])])
    lo = np.floor(pixels.min(0) - 2 * EDGE_SOFTNESS).astype(int)
    hi = np.ceil(pixels.max(0) + 2 * EDGE_SOFTNESS).astype(int) + 1
    x0, y0 = np.clip(lo, 0, size)
    x1, y1 = np.clip(hi, 0, size)
    return slice(int(y0), int(max(y0, y1))), slice(int(x0), int(max(x0, x1)))


def _as_landmarks(landmarks: np.ndarray | None, n: int) -> np.ndarray:
    if landmarks is None:
        return np.broadcast_to(ARCFACE_TEMPLATE, (n, 5, 2))
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape == (5, 2):
        points = np.broadcast_to(points, (n, 5, 2))
    if points.shape != (n, 5, 2) or not np.isfinite(points).all():
        raise UnitsfaceError(f"mask landmarks must be finite, 5×2 or {n}×5×2 (x, y); got shape {points.shape}")
    return points


def render_masks(images: np.ndarray, params: MaskParams, landmarks: np.ndarray | None = None,
                 return_alpha: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Masked copies of N×S×S×3 uint8 RGB aligned faces (or one S×S×3 face).

    `landmarks`: N×5×2 (or one 5×2 for all) pixel coordinates in template order — left eye, right
    eye, nose tip, left and right mouth corner as seen in the image; None uses the ArcFace template
    scaled to S. With `return_alpha`, also the N×S×S float32 coverage in [0, 1] (1 = mask).
    """
    single = np.ndim(images) == 3
    batch = np.asarray(images)[None] if single else np.asarray(images)
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3 or batch.shape[1] != batch.shape[2]:
        raise UnitsfaceError(f"masks are drawn on uint8 N×S×S×3 RGB faces, got {batch.dtype} {batch.shape}")
    n, size = len(batch), batch.shape[1]
    if len(params) != n:
        raise UnitsfaceError(f"{len(params)} mask parameter rows for {n} faces")
    points = _as_landmarks(landmarks, n) if landmarks is not None else _as_landmarks(None, n) * (size / 112.0)
    out = batch.copy()
    alpha_full = np.zeros((n, size, size), np.float32) if return_alpha else None
    if n:
        frame, spacing, height = _frames(points)
        rows, cols = _window(frame, spacing, height, params.shape, size)
        if rows.start < rows.stop and cols.start < cols.stop:
            alpha = _draw(out, frame, spacing, height, params, rows, cols)
            if alpha_full is not None:
                alpha_full[:, rows, cols] = alpha
    result = out[0] if single else out
    if alpha_full is None:
        return result
    return result, (alpha_full[0] if single else alpha_full)


def _draw(out: np.ndarray, frame: np.ndarray, spacing: np.ndarray, height: np.ndarray, params: MaskParams,
          rows: slice, cols: slice) -> np.ndarray:
    """Composite the masks into out[:, rows, cols] in place; returns their coverage there."""
    f32 = np.float32

    def per_face(values: np.ndarray) -> np.ndarray:
        return np.asarray(values, f32).reshape(-1, 1, 1)

    ys = np.arange(rows.start, rows.stop, dtype=f32)[None, :, None]
    xs = np.arange(cols.start, cols.stop, dtype=f32)[None, None, :]
    fr = frame.astype(f32)
    u = per_face(fr[:, 0, 0]) * xs + per_face(fr[:, 0, 1]) * ys + per_face(fr[:, 0, 2])
    v = per_face(fr[:, 1, 0]) * xs + per_face(fr[:, 1, 1]) * ys + per_face(fr[:, 1, 2])
    top, peak, curve, bottom, point, chin, width, pleats, weave, fold, rim, grain = \
        params.shape.T.astype(f32)[:, :, None, None]
    au = np.abs(u)
    u2 = u * u
    sv, su = per_face(height), per_face(spacing)
    # Signed distance in pixels (negative inside) to the intersection of the three constraints.
    sdf = (top + peak * au + curve * u2 - v) * sv
    np.maximum(sdf, (v - bottom + point * au + chin * u2) * sv, out=sdf)
    np.maximum(sdf, (au - width) * su, out=sdf)
    alpha = np.clip(0.5 - sdf / f32(EDGE_SOFTNESS), 0.0, 1.0)

    region = out[:, rows, cols].astype(f32)
    luminance = region[..., 0] + region[..., 1]
    luminance += region[..., 2]
    luminance *= f32(1.0 / 3.0)
    light = _fitted_light(luminance, alpha, u, v)
    # Fabric: cylinder falloff to the sides, horizontal pleats following the top edge, a centre
    # fold or seam, a darker rim, and grain/weave from the banks.
    shade = 1.0 - 0.22 * u2
    phase = (v - top - curve * u2) * f32(3.2)
    phase -= np.floor(phase)
    shade -= pleats * np.abs(2.0 * phase - 1.0)
    shade -= fold * np.clip(1.0 - au * f32(25.0), 0.0, 1.0)
    shade -= rim * np.clip(1.0 + sdf / f32(2.5), 0.0, 1.0)
    shade += _texture(params, grain, weave, rows, cols)
    shade *= light
    colour = params.colour.astype(f32)[:, None, None, :] * f32(255.0)
    target = colour * shade[..., None]
    region += alpha[..., None] * (target - region)
    np.clip(region, 0.0, 255.0, out=region)
    out[:, rows, cols] = np.rint(region, out=region)
    return alpha


def _fitted_light(luminance: np.ndarray, alpha: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The face's light over the mask: a plane a + b·u + c·v fitted (weighted by coverage) to the
    luminance the mask hides, relative to its mean and kept within [0.55, 1.3], so a mask on a face
    lit from one side is lit from that side too."""
    n = len(alpha)
    basis = np.stack(np.broadcast_arrays(np.float32(1.0), u, v, luminance)).reshape(4, n, -1)
    weighted = basis[:3] * alpha.reshape(1, n, -1)
    moments = np.einsum("anp,bnp->nab", weighted, basis).astype(np.float64)  # Σ w·{1,u,v}·{1,u,v,L}
    normal = moments[:, :, :3] + 1e-6 * np.eye(3)
    coef = np.linalg.solve(normal, moments[:, :, 3:])[..., 0]
    mean = np.maximum(moments[:, 0, 3] / (moments[:, 0, 0] + 1e-6), 1.0)  # weighted mean luminance
    rel = (coef / mean[:, None]).astype(np.float32)
    plane = rel[:, 0, None, None] + rel[:, 1, None, None] * u + rel[:, 2, None, None] * v
    # A dark face gives a darker mask, but only partly: masks are brighter than skin in most photos.
    level = np.clip(mean / 150.0, 0.35, 1.15).astype(np.float32)[:, None, None]
    return np.clip(plane, 0.55, 1.3) * (0.4 + 0.6 * level)


def _texture(params: MaskParams, grain: np.ndarray, weave: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """Per face: grain·bank + weave·bank, cut from the banks at the face's offset."""
    grain_bank, weave_bank = _banks()
    h, w = rows.stop - rows.start, cols.stop - cols.start
    out = np.empty((len(params), h, w), np.float32)
    for i, (oy, ox) in enumerate(params.offset):
        window = (slice(oy + rows.start, oy + rows.stop), slice(ox + cols.start, ox + cols.stop))
        np.multiply(grain_bank[window], grain[i, 0, 0], out=out[i])
        if weave[i, 0, 0]:
            out[i] += weave[i, 0, 0] * weave_bank[window]
    return out


def mask_faces(images: np.ndarray, seed: int | np.random.Generator = 0, landmarks: np.ndarray | None = None,
               kinds: tuple[str, ...] = KINDS) -> np.ndarray:
    """`render_masks` with masks drawn from a seed (or generator): the one-call form."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n = 1 if np.ndim(images) == 3 else len(images)
    return render_masks(images, sample_masks(rng, n, kinds), landmarks)


def contact_sheet(faces: np.ndarray, seed: int = 0, landmarks: np.ndarray | None = None) -> np.ndarray:
    """One row per mask kind over the same faces, unmasked faces on top; 2-pixel white gaps."""
    n, size = len(faces), faces.shape[1]
    step = size + 2
    sheet = np.full(((len(KINDS) + 1) * step, n * step, 3), 255, np.uint8)
    rows = [faces] + [mask_faces(faces, np.random.default_rng([seed, k]), landmarks, (kind,))
                      for k, kind in enumerate(KINDS)]
    for r, row in enumerate(rows):
        for c, face in enumerate(row):
            sheet[r * step:r * step + size, c * step:c * step + size] = face
    return sheet


def main(argv: list[str] | None = None) -> int:
    """`python -m unitsface.data.masks --sheet FILE.png`: masks of every kind on held-out synthetic
    faces, or on the aligned 112×112 faces of --images (a folder, searched recursively)."""
    parser = argparse.ArgumentParser(prog="python -m unitsface.data.masks", description=main.__doc__.splitlines()[0])
    parser.add_argument("--sheet", required=True, metavar="FILE.png", help="write the contact sheet here")
    parser.add_argument("--images", default=None, help="a folder of aligned 112×112 faces (default: synthetic)")
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--colours", type=int, default=0,
                        help="quantise the PNG to this many colours (0 = full colour) to keep it small")
    args = parser.parse_args(argv)

    def write() -> str:
        if args.images:
            paths = list_images(args.images)
            step = max(1, len(paths) // args.columns)
            faces = np.stack([load_image(p) for p in paths[::step][: args.columns]])
            if faces.shape[1:3] != (112, 112):
                raise UnitsfaceError(f"--images must be aligned 112×112 faces, got {faces.shape[1]}×{faces.shape[2]}")
        else:
            faces, _ = render_identities(args.seed, HELDOUT_SPLIT, args.columns, 1)
        image = Image.fromarray(contact_sheet(faces, args.seed))
        if args.colours:
            image = image.quantize(args.colours, dither=Image.Dither.NONE)
        with atomic_open(args.sheet) as handle:
            image.save(handle, format="PNG", optimize=True)
        return args.sheet

    return run_script(write)


if __name__ == "__main__":
    raise SystemExit(main())
