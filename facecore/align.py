"""``facecore.align``: face alignment for your own photos (5 or 68 landmarks -> the 112x112 ArcFace crop).

The public name of :mod:`facecore.data.align`, where the code lives with the other data tools.

    import facecore.align
    crop = facecore.align.align_face(image, landmarks)     # (112, 112, 3) uint8
"""

from .data.align import (  # noqa: F401  (re-exported)
    ARCFACE_TEMPLATE,
    align_face,
    alignment_matrix,
    five_points,
    invert_affine,
    reduce_68_to_5,
    similarity_transform,
    template,
    transform_points,
    warp_affine,
)
from .data.align import __all__  # noqa: F401
