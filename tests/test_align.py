"""Alignment: Umeyama recovers known similarities, the warp inverts a known warp, the template is §9.1's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unitsface.align import ARCFACE_TEMPLATE, align_face, estimate_similarity, template, warp_affine
from unitsface.errors import UnitsfaceError


def similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), tx], [scale * math.sin(a), scale * math.cos(a), ty]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def smooth_face(size: int = 112, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image: bilinear interpolation error on it is small, so a round trip is checkable."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 3, 3)
        channels.append(127.5 + 100 * np.sin(2 * math.pi * (fx * xs + fy * ys) + phase))
    return np.clip(np.rint(np.stack(channels, axis=2)), 0, 255).astype(np.uint8)


def test_template_values_and_the_96_to_112_shift():
    # The 96×112 template shifted right by 8 px (formats.md §9.1).
    old_x = np.array([30.2946, 65.5318, 48.0252, 33.5493, 62.7299])
    np.testing.assert_allclose(ARCFACE_TEMPLATE[:, 0], old_x + 8)
    np.testing.assert_allclose(template(224), ARCFACE_TEMPLATE * 2)
    np.testing.assert_allclose(template(128), ARCFACE_TEMPLATE + [8.0, 0.0])
    with pytest.raises(UnitsfaceError, match="multiple of 112 or 128"):
        template(100)


def test_umeyama_recovers_an_exact_similarity():
    matrix = similarity(1.7, -23.0, 40.5, -12.25)
    src = ARCFACE_TEMPLATE
    np.testing.assert_allclose(estimate_similarity(src, apply(matrix, src)), matrix, atol=1e-10)


def test_umeyama_is_the_least_squares_optimum_and_never_reflects():
    rng = np.random.default_rng(3)
    src = ARCFACE_TEMPLATE
    dst = apply(similarity(0.8, 12.0, 5.0, 9.0), src) + rng.normal(0, 2.0, src.shape)
    best = estimate_similarity(src, dst)
    cost = ((apply(best, src) - dst) ** 2).sum()
    # Any perturbation of the four similarity parameters (a, b, tx, ty) increases the residual.
    a, b = best[0, 0], best[1, 0]
    for delta in np.eye(4) * 1e-3:
        for sign in (1, -1):
            pa, pb, ptx, pty = np.array([a, b, best[0, 2], best[1, 2]]) + sign * delta
            other = np.array([[pa, -pb, ptx], [pb, pa, pty]])
            assert ((apply(other, src) - dst) ** 2).sum() > cost
    mirrored = src * [-1.0, 1.0]
    assert np.linalg.det(estimate_similarity(mirrored, src)[:, :2]) > 0


def test_landmarks_on_the_template_give_the_identity():
    face = smooth_face()
    np.testing.assert_array_equal(align_face(face, ARCFACE_TEMPLATE), face)


def test_align_recovers_a_face_warped_by_a_known_similarity():
    face = smooth_face(seed=1)
    to_photo = similarity(2.1, 17.0, 90.0, 35.0)  # template frame -> photo frame
    photo = warp_affine(face, to_photo, (400, 360))  # the whole face lands inside
    landmarks = apply(to_photo, ARCFACE_TEMPLATE)
    aligned = align_face(photo, landmarks)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    # Two bilinear resamplings of a smooth image: small error everywhere, not only on average
    # (the outermost pixels were blended with the photo's black surround, so they are left out).
    error = np.abs(aligned.astype(int) - face.astype(int))[2:-2, 2:-2]
    assert error.mean() < 0.3 and error.max() <= 2


def test_warp_samples_bilinearly_with_a_black_border():
    image = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    half_shift = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]])  # out(x, y) = in(x + 0.5, y)
    out = warp_affine(image, half_shift, (2, 2))
    np.testing.assert_array_equal(out, [[50, 50], [228, 128]])  # right column: half from the black border


def test_bad_inputs_are_named():
    with pytest.raises(UnitsfaceError, match="5×2"):
        align_face(np.zeros((10, 10, 3), np.uint8), np.zeros((4, 2)))
    with pytest.raises(UnitsfaceError, match="uint8"):
        align_face(np.zeros((10, 10, 3), np.float32), ARCFACE_TEMPLATE)
    with pytest.raises(UnitsfaceError, match="degenerate"):
        align_face(np.zeros((10, 10, 3), np.uint8), np.ones((5, 2)))
