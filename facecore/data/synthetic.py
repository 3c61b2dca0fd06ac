"""Procedural synthetic "faces" for the quick start: identities that a small CNN can learn,
in images where pose, background and lighting dominate raw-pixel similarity.

An identity is a random parameter vector (face shape, colours, feature geometry, marks,
glasses, beard); an image of it adds per-image nuisance (rotation, yaw, pitch, scale,
translation, expression, clutter, occluders, hats, lighting, blur, noise). Everything is
deterministic from (seed, stream, identity index, image index). numpy + Pillow only.
See docs/synthetic-data.md for the design and the measured baselines.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..core.runtime import collect_before_fork
from ..errors import ConfigError, DataError

GENERATOR_VERSION = 1
TRAIN_STREAM, TEST_STREAM = 0, 1
LABEL_NOISE_STREAM = 3  # 2 is degrade.py's
LABEL_NOISE_FILE = "label_noise.tsv"
SUPERSAMPLE = 2  # draw at twice the size, then downsample: smooth edges without resampling blur

HAIR_COLOURS = [(25, 20, 20), (55, 38, 28), (105, 70, 42), (140, 62, 30), (205, 170, 105),
                (225, 205, 150), (150, 150, 150), (228, 226, 220)]
IRIS_COLOURS = [(70, 45, 25), (120, 85, 40), (60, 110, 60), (60, 100, 170), (120, 130, 140), (30, 25, 25)]
FRAME_COLOURS = [(15, 15, 15), (100, 60, 30), (200, 170, 60), (170, 30, 40), (30, 60, 160), (230, 230, 230)]
HAIR_STYLES = ("bald", "short", "side", "long", "fringe", "bun", "afro")
EARRING_COLOURS = [(230, 190, 60), (200, 200, 210), (200, 30, 60), (40, 160, 200)]
BEARDS = ("none", "full", "goatee", "moustache")


@dataclass(frozen=True)
class Identity:
    """The fixed appearance of one synthetic person; lengths are in face half-heights."""

    face_w: float
    squareness: float
    jaw: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: str
    hairline: float
    parting: float
    eye_y: float
    eye_gap: float
    eye_w: float
    eye_h: float
    iris: tuple[int, int, int]
    brow_thick: float
    brow_tilt: float
    brow_gap: float
    nose_len: float
    nose_w: float
    nose_tip: float
    mouth_y: float
    mouth_w: float
    lip_thick: float
    lip: tuple[int, int, int]
    ear: float
    moles: tuple[tuple[float, float, float], ...]
    freckles: tuple[tuple[float, float], ...]
    patch: tuple[float, float, float, float] | None
    patch_colour: tuple[int, int, int]
    glasses: str
    frame: tuple[int, int, int]
    beard: str
    blush: float
    earring: tuple[int, int, int] | None


def _colour(rng: np.random.Generator, base: Sequence[int], jitter: float) -> tuple[int, int, int]:
    c = np.asarray(base, float) + rng.normal(0, jitter, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def random_identity(rng: np.random.Generator) -> Identity:
    """Draw one identity's parameters."""
    tone, warmth = rng.uniform(0, 1), rng.uniform(-1, 1)
    skin = np.array([70, 42, 28]) + tone * np.array([180, 175, 165]) + warmth * np.array([14, -2, -16])
    skin = _colour(rng, skin, 10)
    hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))]
    if rng.random() < 0.08:  # dyed
        hair = tuple(int(v) for v in rng.integers(20, 235, 3))
    n_moles = rng.choice([0, 1, 1, 2, 3])
    moles = tuple(
        (float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.3, 0.75)), float(rng.uniform(0.02, 0.045)))
        for _ in range(n_moles)
    )
    freckles: tuple[tuple[float, float], ...] = ()
    if rng.random() < 0.2:
        freckles = tuple((float(rng.uniform(0.12, 0.5) * rng.choice([-1, 1])), float(rng.uniform(0.05, 0.35)))
                         for _ in range(rng.integers(8, 20)))
    patch = None
    if rng.random() < 0.12:
        patch = (float(rng.uniform(-0.45, 0.45)), float(rng.uniform(-0.5, 0.5)),
                 float(rng.uniform(0.08, 0.2)), float(rng.uniform(0.05, 0.15)))
    return Identity(
        face_w=float(rng.uniform(0.6, 0.86)),
        squareness=float(rng.uniform(2.0, 3.2)),
        jaw=float(rng.uniform(0.0, 0.4)),
        skin=skin,
        hair=_colour(rng, hair, 18),
        hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
        hairline=float(rng.uniform(-0.75, -0.4)),
        parting=float(rng.uniform(-0.5, 0.5)),
        eye_y=float(rng.uniform(-0.22, 0.02)),
        eye_gap=float(rng.uniform(0.24, 0.42)),
        eye_w=float(rng.uniform(0.11, 0.18)),
        eye_h=float(rng.uniform(0.35, 0.7)),
        iris=_colour(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 12),
        brow_thick=float(rng.uniform(0.025, 0.08)),
        brow_tilt=float(rng.uniform(-0.2, 0.2)),
        brow_gap=float(rng.uniform(0.1, 0.2)),
        nose_len=float(rng.uniform(0.22, 0.45)),
        nose_w=float(rng.uniform(0.08, 0.2)),
        nose_tip=float(rng.uniform(0.3, 1.0)),
        mouth_y=float(rng.uniform(0.45, 0.66)),
        mouth_w=float(rng.uniform(0.17, 0.38)),
        lip_thick=float(rng.uniform(0.03, 0.09)),
        lip=_colour(rng, np.array(skin) * 0.7 + np.array([60, 0, 10]), 12),
        ear=float(rng.uniform(0.14, 0.28)),
        moles=moles,
        freckles=freckles,
        patch=patch,
        patch_colour=_colour(rng, np.array(skin) * rng.uniform(0.55, 0.85), 20),
        glasses=str(rng.choice(["none", "none", "none", "round", "square"])),
        frame=_colour(rng, FRAME_COLOURS[rng.integers(len(FRAME_COLOURS))], 10),
        beard=str(rng.choice(BEARDS, p=[0.7, 0.12, 0.1, 0.08])),
        blush=float(rng.uniform(0.5, 0.9)) if rng.random() < 0.3 else 0.0,
        earring=EARRING_COLOURS[rng.integers(len(EARRING_COLOURS))] if rng.random() < 0.2 else None,
    )


@dataclass(frozen=True)
class Nuisance:
    """How strongly images of one identity vary; the defaults are the calibrated quick-start level."""

    roll_std: float = 7.0  # in-plane rotation, degrees (clipped at 2.5 std)
    yaw: float = 0.25  # sine of the head turn, uniform in +-yaw
    pitch: float = 0.2
    scale: tuple[float, float] = (0.85, 1.1)
    shift: float = 0.06  # translation, fraction of the image size
    clutter: tuple[int, int] = (3, 12)  # background shapes
    hat: float = 0.03  # probabilities of a hat (hides the hair) and of an occluding object
    occluder: float = 0.04
    contrast: tuple[float, float] = (0.7, 1.2)
    gain: tuple[float, float] = (0.6, 1.3)
    cast: float = 0.08  # per-channel gain spread (colour of the light)
    light_gradient: float = 0.6
    gamma: tuple[float, float] = (0.8, 1.25)
    grey: float = 0.01  # probability of a greyscale image
    blur: float = 0.3  # probability of a Gaussian blur
    noise: float = 8.0  # max sensor noise std, grey levels


NUISANCE = Nuisance()


@dataclass(frozen=True)
class Pose:
    """Per-image geometry: in-plane rotation (degrees), yaw/pitch (sines), scale, shift (fraction of size)."""

    roll: float
    yaw: float
    pitch: float
    scale: float
    dx: float
    dy: float


def random_pose(rng: np.random.Generator, nz: Nuisance) -> Pose:
    """Draw one image's pose within the ranges of ``nz``."""
    return Pose(
        roll=float(np.clip(rng.normal(0, nz.roll_std), -2.5 * nz.roll_std, 2.5 * nz.roll_std)),
        yaw=float(rng.uniform(-nz.yaw, nz.yaw)),
        pitch=float(rng.uniform(-nz.pitch, nz.pitch)),
        scale=float(rng.uniform(*nz.scale)),
        dx=float(rng.uniform(-nz.shift, nz.shift)),
        dy=float(rng.uniform(-nz.shift, nz.shift) * 0.8),
    )


def pose_matrix(pose: Pose, size: int) -> np.ndarray:
    """2x3 matrix from canonical face coordinates (half-height 1, centred) to pixels of a ``size`` image."""
    unit = 0.36 * size * pose.scale
    a = math.radians(pose.roll)
    c, s = math.cos(a) * unit, math.sin(a) * unit
    return np.array([[c, -s, size * (0.5 + pose.dx)], [s, c, size * (0.52 + pose.dy)]])


class _Painter:
    """Draws canonical-coordinate shapes, with per-point depth for yaw/pitch, onto a posed image."""

    def __init__(self, draw: ImageDraw.ImageDraw, matrix: np.ndarray, pose: Pose):
        self.draw = draw
        self.m = matrix
        self.pose = pose
        self.unit = math.hypot(matrix[0, 0], matrix[1, 0])

    def project(self, pts: np.ndarray, depth: float) -> list[tuple[float, float]]:
        pts = np.asarray(pts, float).reshape(-1, 2)
        x = pts[:, 0] * (1 - 0.15 * abs(self.pose.yaw)) + depth * self.pose.yaw
        y = pts[:, 1] + depth * self.pose.pitch * 0.6
        out = self.m[:, :2] @ np.stack([x, y]) + self.m[:, 2:3]
        return [tuple(p) for p in out.T]

    def poly(self, pts: np.ndarray, fill: tuple, depth: float = 0.0) -> None:
        self.draw.polygon(self.project(pts, depth), fill=fill)

    def line(self, pts: np.ndarray, fill: tuple, width: float, depth: float = 0.0) -> None:
        self.draw.line(self.project(pts, depth), fill=fill, width=max(1, int(round(width * self.unit))),
                       joint="curve")

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: tuple, depth: float = 0.0,
                n: int = 20) -> None:
        self.poly(ellipse_points(cx, cy, rx, ry, n), fill, depth)


def ellipse_points(cx: float, cy: float, rx: float, ry: float, n: int = 20, a0: float = 0.0,
                   a1: float = 2 * math.pi) -> np.ndarray:
    """``n`` points of an ellipse (or of its arc from angle a0 to a1), as an (n, 2) array."""
    t = np.linspace(a0, a1, n, endpoint=(a1 - a0) < 2 * math.pi)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def face_outline(ident: Identity, n: int = 40) -> np.ndarray:
    """A superellipse whose lower half narrows towards the chin."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    p = ident.squareness
    r = (np.abs(c) ** p + np.abs(s) ** p) ** (-1 / p)
    x = ident.face_w * r * c * (1 - ident.jaw * np.clip(s, 0, None) ** 2)
    return np.stack([x, r * s], 1)


def _shade(colour: Sequence[int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v * factor))) for v in colour)


def _draw_background(rng: np.random.Generator, size: int, clutter: tuple[int, int]) -> Image.Image:
    """A gradient with low-frequency colour noise, then random shapes."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1, 1, 8)
    t = (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]) * 0.5 + 0.5
    small = c0 + (c1 - c0) * t[..., None] + rng.normal(0, rng.uniform(5, 35), (8, 8, 3))
    img = np.clip(small, 0, 255).astype(np.uint8)
    out = Image.fromarray(img).resize((size, size), Image.BILINEAR)
    draw = ImageDraw.Draw(out)
    for _ in range(rng.integers(clutter[0], clutter[1] + 1)):
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * size
        w, h = rng.uniform(0.08, 0.6, 2) * size
        kind = rng.integers(4)
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
        elif kind == 2:
            pts = rng.uniform(-0.1, 1.1, (rng.integers(3, 6), 2)) * size
            draw.polygon([tuple(p) for p in pts], fill=fill)
        else:
            draw.line([(x0, y0), (x0 + w, y0 + h)], fill=fill, width=int(rng.integers(2, 12)))
    return out


def _draw_face(p: _Painter, ident: Identity, rng: np.random.Generator, hat_p: float) -> None:
    skin, hair = ident.skin, ident.hair
    smile = rng.uniform(-0.3, 1.0)
    mouth_open = rng.uniform(0.0, 0.6) if rng.random() < 0.3 else 0.0
    blink = rng.random() < 0.1
    brow_raise = rng.uniform(-0.04, 0.04)
    hat = rng.random() < hat_p
    clothes = tuple(int(v) for v in rng.integers(0, 256, 3))

    # Shoulders and neck, long hair behind the head, ears.
    p.poly(np.array([[-1.6, 2.2], [-1.3, 1.35], [1.3, 1.35], [1.6, 2.2]]), clothes, -0.3)
    p.poly(np.array([[-0.3, 0.7], [0.3, 0.7], [0.35, 1.45], [-0.35, 1.45]]), _shade(skin, 0.85), -0.3)
    if ident.hair_style == "afro":
        p.ellipse(0, -0.35, ident.face_w + 0.45, 1.0, hair, -0.4, n=28)
    if ident.hair_style == "long":
        p.poly(np.array([[-ident.face_w - 0.2, -0.6], [ident.face_w + 0.2, -0.6], [ident.face_w + 0.3, 1.3],
                         [-ident.face_w - 0.3, 1.3]]), _shade(hair, 0.85), -0.4)
    for side in (-1, 1):
        p.ellipse(side * (ident.face_w - 0.02), 0.02, ident.ear * 0.55, ident.ear, _shade(skin, 0.92), -0.6)
        if ident.earring is not None:
            p.ellipse(side * (ident.face_w + 0.02), ident.ear + 0.06, 0.05, 0.05, ident.earring, -0.6, n=10)

    # Face, beard, texture marks.
    outline = face_outline(ident)
    p.poly(outline, skin, 0.0)
    if ident.beard in ("full", "goatee"):
        lower = outline[outline[:, 1] > (0.25 if ident.beard == "full" else 0.55)]
        if ident.beard == "goatee":
            lower = lower[np.abs(lower[:, 0]) < 0.3]
        pts = np.concatenate([lower, [[-0.22, ident.mouth_y - 0.05], [0.22, ident.mouth_y - 0.05]]])
        centre = pts.mean(0)
        order = np.argsort(np.arctan2(pts[:, 1] - centre[1], pts[:, 0] - centre[0]))
        p.poly(pts[order], _shade(hair, 0.9), 0.2)
    if ident.blush:
        for side in (-1, 1):
            p.ellipse(side * ident.face_w * 0.55, ident.eye_y + 0.35, 0.13, 0.08,
                      _shade((235, 120, 130), ident.blush * sum(skin) / 600 + 0.35), 0.4)
    if ident.patch is not None:
        x, y, rx, ry = ident.patch
        p.ellipse(x, y, rx, ry, ident.patch_colour, 0.3)
    for x, y in ident.freckles:
        p.ellipse(x, y, 0.012, 0.012, _shade(skin, 0.7), 0.4, n=6)
    for x, y, r in ident.moles:
        p.ellipse(x, y, r, r, (60, 35, 25), 0.35, n=10)

    # Eyes, with per-eye width shrinking on the side turned away.
    for side in (-1, 1):
        cx, cy = side * ident.eye_gap, ident.eye_y
        squeeze = 1 - 0.45 * max(0.0, side * p.pose.yaw)
        w, h = ident.eye_w * squeeze, ident.eye_w * ident.eye_h
        p.ellipse(cx, cy, w, h, (235, 235, 230), 0.35)
        look = rng.uniform(-0.3, 0.3) * w
        p.ellipse(cx + look, cy, h * 0.85, h * 0.85, ident.iris, 0.37, n=14)
        p.ellipse(cx + look, cy, h * 0.38, h * 0.38, (10, 10, 10), 0.38, n=10)
        if blink:
            p.ellipse(cx, cy, w * 1.1, h * 1.3, _shade(skin, 0.93), 0.39)
        by = cy - h - ident.brow_gap + brow_raise
        tilt = ident.brow_tilt * side
        brow = np.array([[cx - w * 1.1, by + tilt * 0.5 * w], [cx, by - 0.02], [cx + w * 1.1, by - tilt * 0.5 * w]])
        if side < 0:
            brow = brow[::-1]
        p.line(brow, _shade(hair, 0.8), ident.brow_thick, 0.35)

    # Nose (a shaded wedge) and mouth.
    top, tip = ident.eye_y + 0.05, ident.eye_y + 0.05 + ident.nose_len
    nose = np.array([[-0.03, top], [0.03, top], [ident.nose_w, tip], [0.0, tip + 0.05 * ident.nose_tip],
                     [-ident.nose_w, tip]])
    p.poly(nose, _shade(skin, 0.82), 0.6)
    p.ellipse(-ident.nose_w * 0.5, tip, 0.03, 0.018, _shade(skin, 0.45), 0.65, n=8)
    p.ellipse(ident.nose_w * 0.5, tip, 0.03, 0.018, _shade(skin, 0.45), 0.65, n=8)
    my, mw, lt = ident.mouth_y, ident.mouth_w, ident.lip_thick
    curve = 0.08 * smile
    upper = np.array([[-mw, my - curve], [-mw * 0.4, my - lt], [0, my - lt * 0.7], [mw * 0.4, my - lt],
                      [mw, my - curve]])
    lower = np.array([[mw, my - curve], [mw * 0.5, my + lt + mouth_open * 0.5 * lt],
                      [-mw * 0.5, my + lt + mouth_open * 0.5 * lt], [-mw, my - curve]])
    p.poly(np.concatenate([upper, lower]), ident.lip, 0.45)
    if mouth_open > 0.05:
        p.ellipse(0, my + 0.2 * lt, mw * 0.6, lt * mouth_open, (40, 15, 15), 0.46)
    if ident.beard == "moustache" or ident.beard == "full":
        p.line(np.array([[-mw * 1.05, my - lt * 0.6], [0, my - lt * 1.6], [mw * 1.05, my - lt * 0.6]]),
               _shade(hair, 0.85), 0.06, 0.5)

    # Hair on top (cap down to the hairline, parting, fringe), or a hat.
    fw = ident.face_w
    if hat:
        hat_colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        p.poly(ellipse_points(0, -0.55, fw * 1.1, 0.6, 20, math.pi, 2 * math.pi), hat_colour, 0.0)
        p.poly(np.array([[-fw * 1.3, -0.6], [fw * 1.3, -0.6], [fw * 1.3, -0.48], [-fw * 1.3, -0.48]]),
               _shade(hat_colour, 0.8), 0.1)
    elif ident.hair_style != "bald":
        hl = ident.hairline
        cap = ellipse_points(0, hl, fw * 1.06, 1.05 + hl + 0.12, 24, math.pi, 2 * math.pi)
        p.poly(np.concatenate([cap, [[fw * 1.06, hl + 0.12], [-fw * 1.06, hl + 0.12]]]), hair, -0.1)
        if ident.hair_style == "fringe":
            p.poly(np.array([[-fw * 0.95, hl - 0.05], [fw * 0.95, hl - 0.05], [fw * 0.8, hl + 0.22],
                             [-fw * 0.8, hl + 0.22]]), hair, 0.1)
        if ident.hair_style == "side":
            p.poly(np.array([[ident.parting * fw, -1.05], [fw * 1.1, hl - 0.1], [fw * 1.05, 0.1],
                             [fw * 0.85, hl + 0.2]]), _shade(hair, 1.1), 0.0)
        if ident.hair_style == "bun":
            p.ellipse(0, -1.15, 0.3, 0.22, _shade(hair, 0.9), -0.2)
        p.line(np.array([[ident.parting * fw, -1.02], [ident.parting * fw * 0.9, hl - 0.02]]),
               _shade(hair, 0.6), 0.02, 0.0)

    if ident.glasses != "none":
        r = ident.eye_w * 1.35
        for side in (-1, 1):
            cx = side * ident.eye_gap
            if ident.glasses == "round":
                pts = ellipse_points(cx, ident.eye_y, r, r * 0.85, 18)
            else:
                pts = np.array([[cx - r, ident.eye_y - r * 0.7], [cx + r, ident.eye_y - r * 0.7],
                                [cx + r, ident.eye_y + r * 0.75], [cx - r, ident.eye_y + r * 0.75]])
            p.line(np.concatenate([pts, pts[:1]]), ident.frame, 0.025, 0.45)
        p.line(np.array([[-ident.eye_gap + r, ident.eye_y], [ident.eye_gap - r, ident.eye_y]]),
               ident.frame, 0.025, 0.5)


def _draw_occluder(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    """A random object in front of part of the face."""
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    cx, cy = size * rng.uniform(0.25, 0.75), size * rng.uniform(0.3, 0.9)
    w, h = size * rng.uniform(0.12, 0.3), size * rng.uniform(0.1, 0.3)
    if rng.random() < 0.5:
        draw.ellipse([cx - w, cy - h, cx + w, cy + h], fill=fill)
    else:
        draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)


def _relight(img: np.ndarray, rng: np.random.Generator, nz: Nuisance) -> np.ndarray:
    """Contrast, brightness, colour cast and gamma (one lookup table per channel), a directional
    light gradient, sometimes greyscale, and sensor noise."""
    size = img.shape[0]
    v = np.arange(256, dtype=np.float32) / 255
    mean = np.float32(img.mean() / 255)
    gains = rng.uniform(*nz.gain) * rng.uniform(1 - nz.cast, 1 + nz.cast, 3)
    contrast, gamma = rng.uniform(*nz.contrast), rng.uniform(*nz.gamma)
    luts = [np.clip(((v - mean) * contrast + mean) * g, 0, 1) ** gamma * 255 for g in gains]
    x = np.stack([luts[c][img[..., c]] for c in range(3)], -1)
    if rng.random() < nz.grey:
        x = np.repeat(x.mean(2, keepdims=True), 3, 2)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    grad = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    x = x * (1 + np.float32(rng.uniform(0, nz.light_gradient)) * grad)[..., None]
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(rng.uniform(0, nz.noise))
    return np.clip(x, 0, 255).astype(np.uint8)


def render(ident: Identity, rng: np.random.Generator, img_size: int = 112,
           nuisance: Nuisance | None = None) -> tuple[Image.Image, np.ndarray]:
    """One image of ``ident`` with fresh nuisance; also the 2x3 canonical-to-pixel matrix of its pose."""
    nz = nuisance or NUISANCE
    big = img_size * SUPERSAMPLE
    pose = random_pose(rng, nz)
    canvas = _draw_background(rng, big, nz.clutter)
    draw = ImageDraw.Draw(canvas)
    _draw_face(_Painter(draw, pose_matrix(pose, big), pose), ident, rng, nz.hat)
    if rng.random() < nz.occluder:
        _draw_occluder(draw, rng, big)
    image = canvas.reduce(SUPERSAMPLE)
    if rng.random() < nz.blur:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.1)))
    image = Image.fromarray(_relight(np.asarray(image), rng, nz))
    return image, pose_matrix(pose, img_size)


def identity_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The random stream that fixes identity ``index``'s appearance."""
    return np.random.default_rng([seed, stream, index])


def image_rng(seed: int, stream: int, index: int, n: int) -> np.random.Generator:
    """The random stream of image ``n`` of identity ``index`` (its nuisance)."""
    return np.random.default_rng([seed, stream, index, n + 1])


def render_sample(seed: int, index: int, n: int, *, stream: int = TRAIN_STREAM,
                  img_size: int = 112) -> tuple[Image.Image, np.ndarray]:
    """Image ``n`` of identity ``index`` (and its pose matrix), exactly as the folder writer makes it."""
    ident = random_identity(identity_rng(seed, stream, index))
    return render(ident, image_rng(seed, stream, index, n), img_size)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of an image (quality 90, as the folder writer stores them)."""
    buf = BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_identity(job: tuple[str, int, int, int, int, int, Nuisance | None]) -> int:
    out_dir, seed, stream, index, count, img_size, nuisance = job
    folder = Path(out_dir) / f"{index:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    ident = random_identity(identity_rng(seed, stream, index))
    for n in range(count):
        image, _ = render(ident, image_rng(seed, stream, index, n), img_size, nuisance)
        (folder / f"{n:03d}.jpg").write_bytes(encode_jpeg(image))
    return count


def _progress(iterable: Iterable, total: int, desc: str, progress: bool) -> Iterable:
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="id", disable=not progress or not sys.stderr.isatty())


def generate_identity_folder(out_dir: str | os.PathLike, identities: int, images_per_identity: int, *,
                             seed: int, img_size: int = 112, first_identity: int = 0, stream: int = TRAIN_STREAM,
                             nuisance: Nuisance | None = None, workers: int | None = None,
                             progress: bool = True) -> int:
    """Write ``out_dir/<id:05d>/<n:03d>.jpg`` for identities ``first_identity ..``; returns the image count.

    Output depends only on (seed, stream, identity, image index), not on ``workers``; the
    demo uses stream 0 for training and 1 for held-out identities. ``nuisance`` overrides
    the variation levels (default ``NUISANCE``).
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    jobs = [(str(out_dir), seed, stream, first_identity + i, images_per_identity, img_size, nuisance)
            for i in range(identities)]
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    if workers <= 1 or identities < 8:
        return sum(_progress(map(_write_identity, jobs), len(jobs), "identities", progress))
    collect_before_fork()
    with ProcessPoolExecutor(workers) as pool:
        return sum(_progress(pool.map(_write_identity, jobs, chunksize=4), len(jobs), "identities", progress))


def write_pairs(image_dir: str | os.PathLike, pairs_file: str | os.PathLike, pairs: int, *, seed: int) -> int:
    """A balanced ``path_a path_b 0|1`` list over ``image_dir/<id>/<img>``; same and different pairs alternate,
    so any 10 contiguous folds are balanced. Paths are relative to the pairs file's folder."""
    image_dir, pairs_file = Path(image_dir), Path(pairs_file)
    people = {d.name: sorted(f.name for f in d.iterdir() if f.suffix == ".jpg")
              for d in sorted(image_dir.iterdir()) if d.is_dir()}
    names = [n for n in people if people[n]]
    if len(names) < 2 or all(len(people[n]) < 2 for n in names):
        raise DataError(f"{image_dir}: need at least 2 identities, one with 2+ images, to make pairs")
    rng = random.Random(seed)
    rel = os.path.relpath(image_dir, pairs_file.parent)
    path = lambda who, img: f"{rel}/{who}/{img}".replace(os.sep, "/")  # noqa: E731
    n_same = pairs // 2
    candidates = [(who, a, b) for who in names for i, a in enumerate(people[who]) for b in people[who][i + 1:]]
    if len(candidates) >= n_same:
        chosen = rng.sample(candidates, n_same)
    else:  # fewer distinct same-identity pairs than asked: some repeat
        chosen = [rng.choice(candidates) for _ in range(n_same)]
    same = [f"{path(who, a)} {path(who, b)} 1" for who, a, b in chosen]
    diff = []
    while len(diff) < pairs - n_same:
        x, y = rng.sample(names, 2)
        diff.append(f"{path(x, rng.choice(people[x]))} {path(y, rng.choice(people[y]))} 0")
    lines = [line for pair in zip(diff, same) for line in pair] + diff[len(same):]
    pairs_file.write_text("\n".join(lines) + "\n")
    return len(lines)


def verification_accuracy(scores: Sequence[float], issame: Sequence[bool]) -> float:
    """10-fold accuracy of pair similarity scores, by the same ``verification`` metric the trainer reports.

    Each cosine score becomes a pair of unit 2-vectors with that cosine, so the metric's
    squared-distance thresholds act exactly as thresholds on the score.
    """
    from .. import create

    c = np.clip(np.asarray(scores, dtype=np.float64), -1.0, 1.0)
    emb = np.zeros((2 * c.size, 2))
    emb[0::2, 0] = 1.0
    emb[1::2, 0], emb[1::2, 1] = c, np.sqrt(1.0 - c**2)
    return float(create("metrics", "verification")(emb, np.asarray(issame, dtype=bool))["accuracy"])


def read_pair_images(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """Encoded images (two per pair, in order) and issame from a ``.bin`` pair set or a pairs text file."""
    path = Path(path)
    if path.suffix == ".bin":
        from .binfile import load_bin

        return load_bin(path)
    from .packing import read_pairs

    images, issame = [], []
    for a, b, same, number in read_pairs(path):
        for file in (a, b):
            try:
                images.append(file.read_bytes())
            except OSError as exc:
                raise DataError(f"{path} line {number}: image {file} cannot be read ({exc.strerror})") from None
        issame.append(same)
    return images, np.asarray(issame, dtype=bool)


def decode(data: bytes) -> np.ndarray:
    """Encoded image bytes to a float32 (H, W, 3) array in [-1, 1], the networks' input scale."""
    with Image.open(BytesIO(data)) as im:
        x = np.asarray(im.convert("RGB"), dtype=np.float32)
    return (x - 127.5) / 127.5


def raw_pixel_scores(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of the two images' raw [-1, 1] pixel vectors for each pair, and issame."""
    images, issame = read_pair_images(path)
    scores = np.empty(len(issame))
    for i in range(len(issame)):
        a, b = decode(images[2 * i]).ravel(), decode(images[2 * i + 1]).ravel()
        scores[i] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)
    return scores, issame


def raw_pixel_baseline(path: str | os.PathLike) -> float:
    """10-fold verification accuracy of raw-pixel cosine similarity on a pairs file or ``.bin`` pair set."""
    return verification_accuracy(*raw_pixel_scores(path))


OUTPUTS = ("train_images", "train", "test_images", "test_pairs.txt", "test.bin")
DEGRADED_OUTPUTS = ("test_degraded_images", "test_degraded_pairs.txt", "test_degraded.bin")
MANIFEST = "manifest.json"


def _check_sizes(train_identities: int, images_per_identity: int, test_identities: int,
                 test_images_per_identity: int, pairs: int, label_noise: float = 0.0) -> None:
    errors = []
    count, movable = noisy_count(train_identities, images_per_identity, label_noise), train_identities * (
        images_per_identity - 1)
    if not 0 <= label_noise < 1:
        errors.append(f"label_noise: {label_noise} must be a fraction in [0, 1)")
    elif count > movable:
        errors.append(f"label_noise: {label_noise} relabels {count} images, but only {movable} may change (each "
                      "identity keeps its first image under its own label); lower label_noise or raise "
                      "images_per_identity")
    if train_identities < 2:
        errors.append(f"train_identities: {train_identities} is too few; margin training needs at least 2 classes")
    if images_per_identity < 1:
        errors.append(f"images_per_identity: {images_per_identity} must be at least 1")
    if test_identities < 2:
        errors.append(f"test_identities: {test_identities} is too few; different-identity pairs need at least 2")
    if test_images_per_identity < 2:
        errors.append(f"test_images_per_identity: {test_images_per_identity} must be at least 2 "
                      "for same-identity pairs")
    if pairs < 20:
        errors.append(f"pairs: {pairs} is too few for 10-fold verification; use at least 20")
    available = test_identities * (test_images_per_identity * (test_images_per_identity - 1) // 2)
    if not errors and pairs // 2 > available:
        errors.append(f"pairs: {pairs} needs {pairs // 2} distinct same-identity pairs, but {test_identities} test "
                      f"identities x {test_images_per_identity} images give only {available}; lower pairs or raise "
                      "test_identities / test_images_per_identity")
    if errors:
        raise ConfigError(errors, "the demo-data settings")


def noisy_count(identities: int, images_per_identity: int, fraction: float) -> int:
    """How many training images ``fraction`` label noise relabels: the nearest whole number."""
    return int(round(fraction * identities * images_per_identity))


def choose_label_noise(identities: int, images_per_identity: int, fraction: float,
                       seed: int) -> list[tuple[int, int, int]]:
    """``(true identity, image index, given identity)`` of the images that get a wrong label, sorted.

    :func:`noisy_count` images are drawn without replacement from every identity's images but
    its first (so no identity is left without an image), each given another identity drawn
    uniformly; deterministic from ``seed`` (stream ``LABEL_NOISE_STREAM``).
    """
    count = noisy_count(identities, images_per_identity, fraction)
    if count == 0:
        return []
    rng = np.random.default_rng([seed, LABEL_NOISE_STREAM])
    slots = np.sort(rng.choice(identities * (images_per_identity - 1), size=count, replace=False))
    true, image = slots // (images_per_identity - 1), slots % (images_per_identity - 1) + 1
    given = (true + rng.integers(1, identities, size=count)) % identities
    return [(int(t), int(n), int(g)) for t, n, g in zip(true, image, given)]


def noisy_name(true: int, image: int) -> str:
    """The file name an image relabelled by label noise gets in its given identity's folder."""
    return f"noisy-{true:05d}-{image:03d}.jpg"


def relabel_images(image_dir: Path, noise: list[tuple[int, int, int]]) -> None:
    """Move each chosen image into its given identity's folder (under :func:`noisy_name`), so packing labels it so."""
    for true, image, given in noise:
        os.replace(image_dir / f"{true:05d}" / f"{image:03d}.jpg", image_dir / f"{given:05d}" / noisy_name(true, image))


def write_label_noise(image_dir: Path, noise: list[tuple[int, int, int]], path: Path) -> None:
    """The truth beside a noisy set packed from ``image_dir``: ``key, given_label, true_label`` per relabelled record.

    Keys and labels are the packer's: image ``j`` of :func:`~facecore.data.images.list_image_folder`'s order is
    record ``j + 1``, and an identity's label is its folder's place among the folders.
    """
    from .images import list_image_folder

    classes, items = list_image_folder(image_dir)
    label = {name: c for c, name in enumerate(classes)}
    key_of = {(file.parent.name, file.name): key for key, (file, _) in enumerate(items, 1)}
    rows = sorted((key_of[(f"{given:05d}", noisy_name(true, image))], label[f"{given:05d}"], label[f"{true:05d}"])
                  for true, image, given in noise)
    path.write_text("key\tgiven_label\ttrue_label\n" + "".join(f"{k}\t{g}\t{t}\n" for k, g, t in rows))


def read_label_noise(path: str | os.PathLike) -> dict[int, tuple[int, int]]:
    """``{record key: (given label, true label)}`` from a :func:`write_label_noise` file."""
    rows = Path(path).read_text().splitlines()[1:]
    return {int(k): (int(g), int(t)) for k, g, t in (row.split("\t") for row in rows if row)}


def make_demo_data(out_dir: str | os.PathLike, *, train_identities: int = 500, images_per_identity: int = 20,
                   test_identities: int = 100, test_images_per_identity: int = 10, pairs: int = 3000,
                   seed: int = 0, force: bool = False, workers: int | None = None, progress: bool = True,
                   degraded: bool = False, label_noise: float = 0.0) -> dict:
    """Generate the quick-start data set under ``out_dir`` and return a summary.

    Writes ``train_images/`` (an image folder) packed into ``train/`` (train.rec, train.idx,
    property), held-out identities in ``test_images/`` with a balanced ``test_pairs.txt``
    packed into ``test.bin``, and ``manifest.json``. With ``degraded``, also a low-quality copy
    of the held-out images (``facecore.data.degrade``) in ``test_degraded_images/`` with the same
    pairs, packed into ``test_degraded.bin``. With ``label_noise`` (a fraction), that share of the
    training images is moved to another identity's folder before packing (:func:`choose_label_noise`)
    and ``train/label_noise.tsv`` lists them (:func:`write_label_noise`). When the manifest shows the
    same parameters (and ``force`` is False) nothing is regenerated.
    """
    from .packing import pack_bin, pack_rec

    _check_sizes(train_identities, images_per_identity, test_identities, test_images_per_identity, pairs, label_noise)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; demo-data needs a folder to write into")
    params = {"generator": GENERATOR_VERSION, "train_identities": train_identities,
              "images_per_identity": images_per_identity, "test_identities": test_identities,
              "test_images_per_identity": test_images_per_identity, "pairs": pairs, "seed": seed,
              "degraded": degraded}
    if label_noise:  # only then: manifests written before label noise existed still match
        params["label_noise"] = label_noise
    outputs = OUTPUTS + (DEGRADED_OUTPUTS if degraded else ()) + ((f"train/{LABEL_NOISE_FILE}",) if label_noise else ())
    manifest = out / MANIFEST
    old = _read_manifest(manifest)
    if not force and old is not None and old.get("params") == params and all((out / n).exists() for n in outputs):
        return {**old["summary"], "reused": True}
    known = (*OUTPUTS, *DEGRADED_OUTPUTS, MANIFEST)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in known) if out.is_dir() else []
    if old is None and foreign and not force:
        raise DataError(f"{out} holds other files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) "
                        "and no manifest.json from `facecore demo-data`; choose a new or empty folder, or pass "
                        "--force to write the demo data beside them")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # an interrupted run must not look complete
    for name in OUTPUTS + DEGRADED_OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    n_train = generate_identity_folder(out / "train_images", train_identities, images_per_identity, seed=seed,
                                       stream=TRAIN_STREAM, workers=workers, progress=progress)
    noise = choose_label_noise(train_identities, images_per_identity, label_noise, seed)
    relabel_images(out / "train_images", noise)
    packed = pack_rec(out / "train_images", out / "train", progress=progress)
    if label_noise:
        write_label_noise(out / "train_images", noise, out / "train" / LABEL_NOISE_FILE)
    n_test = generate_identity_folder(out / "test_images", test_identities, test_images_per_identity, seed=seed,
                                      first_identity=train_identities, stream=TEST_STREAM, workers=workers,
                                      progress=progress)
    n_pairs = write_pairs(out / "test_images", out / "test_pairs.txt", pairs, seed=seed)
    pack_bin(out / "test_pairs.txt", out / "test.bin", progress=progress)
    summary = {
        "out_dir": str(out),
        "train_rec": str(out / "train"),
        "train_identities": packed["identities"],
        "train_images": n_train,
        "test_bin": str(out / "test.bin"),
        "test_pairs": str(out / "test_pairs.txt"),
        "test_identities": test_identities,
        "test_images": n_test,
        "pairs": n_pairs,
        "raw_pixel_accuracy": raw_pixel_baseline(out / "test.bin"),
    }
    if label_noise:
        summary["label_noise_images"] = len(noise)
        summary["label_noise_file"] = str(out / "train" / LABEL_NOISE_FILE)
    if degraded:
        from .degrade import degrade_folder

        degrade_folder(out / "test_images", out / "test_degraded_images", seed=seed)
        write_pairs(out / "test_degraded_images", out / "test_degraded_pairs.txt", pairs, seed=seed)
        pack_bin(out / "test_degraded_pairs.txt", out / "test_degraded.bin", progress=progress)
        summary["test_degraded_bin"] = str(out / "test_degraded.bin")
        summary["raw_pixel_accuracy_degraded"] = raw_pixel_baseline(out / "test_degraded.bin")
    summary["seconds"] = round(time.perf_counter() - start, 1)
    manifest.write_text(json.dumps({"params": params, "summary": summary}, indent=2) + "\n")
    return {**summary, "reused": False}


def _read_manifest(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "params" in data and "summary" in data else None
