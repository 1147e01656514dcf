"""Face alignment to the 112×112 ArcFace 5-point template (formats.md §9.1), in numpy only.

Every model unitsface trains or loads expects faces aligned exactly like its training data:
a least-squares similarity (rotation, uniform scale, translation; Umeyama) from the five detected
landmarks to the template, then a bilinear warp with a black border. Doing it in numpy keeps
OpenCV out of the dependencies; coordinates follow OpenCV's convention (pixel centres at
integers), which is the convention the template itself was written in.
"""

from __future__ import annotations

import numpy as np

from unitsface.errors import UnitsfaceError

# Left eye, right eye, nose tip, left and right mouth corners (image left/right), 112×112 pixels.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def template(size: int = 112) -> np.ndarray:
    """The 5×2 template for a size×size crop, scaled the way insightface scales it.

    Multiples of 112 scale by size/112; multiples of 128 scale by size/128 and move x right by
    8·size/128 (the 112 template centred in a 128 crop). Other sizes have no agreed template.
    """
    if size > 0 and size % 112 == 0:
        return ARCFACE_TEMPLATE * (size / 112)
    if size > 0 and size % 128 == 0:
        scale = size / 128
        return ARCFACE_TEMPLATE * scale + np.array([8.0 * scale, 0.0])
    raise UnitsfaceError(f"alignment size must be a multiple of 112 or 128, got {size}")


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2×3 similarity matrix M minimising Σ‖M·[src;1] − dst‖² (Umeyama 1991, no reflection).

    A reflection would mirror the face, so the rotation is forced to det +1 as in Umeyama's
    paper and scikit-image's `SimilarityTransform`.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise UnitsfaceError(f"expected two matching N×2 point sets (N ≥ 2), got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise UnitsfaceError("landmarks are degenerate: all points coincide")
    cov = dst_c.T @ src_c / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = (sigma * sign).sum() / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Warp `image` (H×W or H×W×C, uint8) by the 2×3 forward `matrix` into a (height, width) canvas.

    Each output pixel samples the input at M⁻¹·(x, y) bilinearly; neighbours outside the image
    count as 0, which gives the black border of the reference warp (OpenCV BORDER_CONSTANT).
    """
    image = np.asarray(image)
    height, width = size
    forward = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    if abs(np.linalg.det(forward)) < 1e-12:
        raise UnitsfaceError("alignment transform is singular (landmarks collapse to a point)")
    inverse = np.linalg.inv(forward)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = sx - x0, sy - y0
    pixels = image.astype(np.float64)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    out = np.zeros((height, width, pixels.shape[2]))
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            px, py = x0 + dx, y0 + dy
            inside = (px >= 0) & (px < image.shape[1]) & (py >= 0) & (py < image.shape[0])
            values = pixels[np.clip(py, 0, image.shape[0] - 1), np.clip(px, 0, image.shape[1] - 1)]
            out += (wy * wx * inside)[:, :, None] * values
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out[:, :, 0] if image.ndim == 2 else out


def align_face(image: np.ndarray, landmarks5: np.ndarray, size: int = 112) -> np.ndarray:
    """The size×size aligned crop of `image` (uint8 H×W×C, RGB for models) given its five landmarks.

    `landmarks5`: 5×2 (x, y) pixel coordinates in template order — left eye, right eye, nose
    tip, left mouth corner, right mouth corner, left/right as seen in the image.
    """
    return align_face_landmarks(image, landmarks5, size)[0]


def align_face_landmarks(image: np.ndarray, landmarks5: np.ndarray, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """`align_face` plus where the five landmarks land in the crop (near, not on, the template: the
    similarity is a least-squares fit), for anything drawn onto the face afterwards (masks)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise UnitsfaceError(f"expected a uint8 H×W or H×W×C image, got {image.dtype} with shape {image.shape}")
    points = np.asarray(landmarks5, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise UnitsfaceError(f"expected 5×2 finite landmarks (x, y), got shape {points.shape}")
    matrix = estimate_similarity(points, template(size))
    return warp_affine(image, matrix, (size, size)), points @ matrix[:, :2].T + matrix[:, 2]
