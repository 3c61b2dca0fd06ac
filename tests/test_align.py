"""Face alignment: the Umeyama similarity, 68 -> 5 points, the bilinear warp, and round trips on transformed crops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import ImageFilter

import facecore
from facecore.data.align import (
    ARCFACE_TEMPLATE,
    align_face,
    alignment_matrix,
    five_points,
    reduce_68_to_5,
    similarity_transform,
    template,
    transform_points,
    warp_affine,
)
from facecore.data.synthetic import render_sample
from facecore.data.synthetic_ijb import loose_crop
from facecore.errors import DataError


def similarity(scale: float, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), shift[0]],
                     [scale * math.sin(a), scale * math.cos(a), shift[1]]])


@pytest.mark.parametrize("seed", range(5))
def test_umeyama_recovers_an_exact_similarity(seed):
    rng = np.random.default_rng(seed)
    truth = similarity(rng.uniform(0.3, 3), rng.uniform(-180, 180), tuple(rng.uniform(-100, 100, 2)))
    src = rng.uniform(0, 200, (5, 2))
    np.testing.assert_allclose(similarity_transform(src, transform_points(truth, src)), truth, atol=1e-9)


def test_umeyama_is_the_least_squares_similarity():
    # the same minimum as the linear least squares over [[a, -b, tx], [b, a, ty]]
    rng = np.random.default_rng(7)
    src = rng.uniform(0, 100, (5, 2))
    dst = transform_points(similarity(1.7, 25, (10, -4)), src) + rng.normal(0, 3, (5, 2))
    rows = []
    for (x, y) in src:
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), dst.reshape(-1), rcond=None)[0]
    expected = np.array([[a, -b, tx], [b, a, ty]])
    np.testing.assert_allclose(similarity_transform(src, dst), expected, atol=1e-9)


def test_umeyama_never_reflects():
    src = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.3]])
    mirrored = src * np.array([-1.0, 1.0])  # only a reflection maps src onto this exactly
    m = similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


def test_degenerate_landmarks_are_a_data_error():
    with pytest.raises(DataError, match="all lie on one point"):
        similarity_transform(np.ones((5, 2)), ARCFACE_TEMPLATE)


def test_68_points_reduce_to_eye_centres_nose_tip_and_mouth_corners():
    pts = np.arange(136, dtype=float).reshape(68, 2)
    five = reduce_68_to_5(pts)
    np.testing.assert_allclose(five[0], pts[36:42].mean(0))
    np.testing.assert_allclose(five[1], pts[42:48].mean(0))
    np.testing.assert_allclose(five[2:], pts[[30, 48, 54]])
    np.testing.assert_allclose(five_points(pts.ravel()), five)


def test_five_points_rejects_other_counts_and_nan():
    assert five_points(np.arange(10)).shape == (5, 2)
    with pytest.raises(DataError, match="5 or 68"):
        five_points(np.arange(12))
    with pytest.raises(DataError, match="NaN"):
        five_points([1, 2, 3, 4, 5, 6, 7, 8, 9, float("nan")])


def test_warp_shifts_interpolates_and_fills():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = warp_affine(img, similarity(1, 0, (5, 7)), (30, 20))  # an integer shift is exact
    assert out.shape == (20, 30, 3)
    assert np.array_equal(out[7:, 5:], img[:13, :25])
    assert not out[:7].any() and not out[:, :5].any()  # uncovered pixels are the fill (black)
    half = warp_affine(img, similarity(1, 0, (0.5, 0)), (30, 20)).astype(int)
    mean = (img[:, :-1].astype(int) + img[:, 1:]) / 2
    assert np.abs(half[:, 1:] - mean).max() <= 0.5  # bilinear, rounded to the nearest level
    grey = warp_affine(img[:, :, 0], similarity(1, 0, (0, 0)), (30, 20), fill=9)
    assert np.array_equal(grey, img[:, :, 0])


def smooth_face(n: int) -> np.ndarray:
    """A synthetic 112x112 face, slightly blurred so that interpolation alone loses little."""
    image, _ = render_sample(3, n, 0)
    return np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)))


@pytest.mark.parametrize("seed", range(4))
def test_aligning_undoes_a_random_similarity(seed):
    rng = np.random.default_rng(seed)
    face = smooth_face(seed)
    crop, landmarks, matrix = loose_crop(face, rng, scale=(0.9, 2.2), max_roll=35)
    assert crop.shape[0] > 112
    interior = np.s_[8:104, 8:104]
    error = np.abs(align_face(crop, landmarks).astype(int) - face)[interior].mean()
    assert error < 2.0, error  # within a couple of grey levels
    # the check has teeth: landmarks one aligned pixel off give a clearly worse crop
    off = align_face(crop, landmarks + matrix[:, 0]).astype(int)
    assert np.abs(off - face)[interior].mean() > 2 * error


def test_68_point_landmarks_align_like_their_5_points():
    rng = np.random.default_rng(3)
    face = smooth_face(5)
    crop, five, _ = loose_crop(face, rng)
    pts68 = np.zeros((68, 2))
    pts68[36:42], pts68[42:48], pts68[30], pts68[48], pts68[54] = five[0], five[1], five[2], five[3], five[4]
    np.testing.assert_array_equal(align_face(crop, pts68), align_face(crop, five))
    np.testing.assert_allclose(alignment_matrix(five, 224)[:, :2], 2 * alignment_matrix(five)[:, :2])
    assert align_face(crop, five, img_size=96).shape == (96, 96, 3)


def test_template_and_public_module():
    np.testing.assert_allclose(template()[0], (38.2946, 51.6963))
    import facecore.align as public

    assert public.align_face is align_face
    assert facecore.align.similarity_transform is similarity_transform
