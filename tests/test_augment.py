"""Batch augmentations: the pipeline's random numbers, the bundled augmentations, their schemas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import facecore
from facecore import ConfigError, PluginError, hookimpl
from facecore.core.config import validate_config
from facecore.core.runtime import DistInfo
from facecore.train.augment import Augmenter, Step
from helpers import former_flip

BASE = {"model": {"backbone": "fastcontextface"}, "data": {"root": "/data"}}
EVERYTHING = ["flip", {"name": "random_crop", "p": 0.5}, {"name": "random_crop", "p": 0.5, "mode": "pad"},
              {"name": "low_resolution", "p": 0.5}, {"name": "photometric", "p": 0.5}, {"name": "grayscale", "p": 0.3},
              {"name": "blur", "p": 0.5}]


def augmenter(specs: list) -> Augmenter:
    return Augmenter.from_config(validate_config({**BASE, "data": {"root": "/data", "augment": specs}}))


def one(name: str, **options) -> Augmenter:
    """An augmenter applying ``name`` to every image."""
    return Augmenter([Step(name, 1.0, facecore.create("augmentations", name, **options))])


def images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (upsampled noise), so resampling has structure to work on."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    return F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)


# --- the pipeline --------------------------------------------------------------------------


def test_the_default_list_is_the_former_flip():
    config = validate_config(BASE)
    assert config["data"]["augment"] == ["flip"]
    aug, x = Augmenter.from_config(config), images(16)
    for info in (DistInfo(), DistInfo(rank=1, world_size=3)):
        for seed, epoch, batch in ((0, 0, 0), (7, 2, 5), (123, 19, 4000)):
            assert torch.equal(aug(x, seed, epoch, batch, info), former_flip(x, seed, epoch, batch, info))


@pytest.mark.parametrize("ranks", [2, 3])
def test_an_image_is_augmented_alike_whatever_the_number_of_ranks(ranks: int):
    """Rank r of w holds global positions r, r + w, ...: each gets the single process's augmentation."""
    aug, x = augmenter(EVERYTHING), images(6 * ranks)
    single = aug(x, 3, 1, 9, DistInfo())
    for rank in range(ranks):
        part = aug(x[rank::ranks], 3, 1, 9, DistInfo(rank=rank, world_size=ranks))
        torch.testing.assert_close(part, single[rank::ranks], atol=1e-6, rtol=0)
    assert not torch.allclose(single, x)


def test_augmentations_are_pure_functions_of_seed_epoch_and_batch():
    aug, x = augmenter(EVERYTHING), images(8)
    first = aug(x, 5, 0, 3, DistInfo())
    assert torch.equal(first, aug(x, 5, 0, 3, DistInfo()))
    for other in ((6, 0, 3), (5, 1, 3), (5, 0, 4)):
        assert not torch.equal(first, aug(x, *other, DistInfo()))


def test_the_input_batch_is_left_alone_unless_inplace():
    aug, x = augmenter(EVERYTHING), images(8)
    original = x.clone()
    out = aug(x, 5, 0, 3, DistInfo())
    assert torch.equal(x, original) and not torch.equal(out, x)
    assert torch.equal(aug(x, 5, 0, 3, DistInfo(), inplace=True), out)


def test_p_is_the_chance_per_image():
    x = images(400, size=8)
    for p, low, high in ((0.0, 0, 0), (1.0, 400, 400), (0.2, 60, 100)):
        out = augmenter([{"name": "grayscale", "p": p}])(x, 1, 0, 0, DistInfo())
        changed = int((out != x).flatten(1).any(1).sum())
        assert low <= changed <= high, (p, changed)


def test_the_list_applies_in_order():
    x = images(4)
    crop_then_flip = augmenter([{"name": "random_crop", "p": 1.0, "mode": "pad"}, {"name": "flip", "p": 1.0}])
    # a flip first draws the crop's numbers from stream 1, so compare against the two steps run by hand
    crop = Augmenter([crop_then_flip.steps[0]])(x, 2, 0, 0, DistInfo())
    assert torch.equal(crop_then_flip(x, 2, 0, 0, DistInfo()), crop.flip(3))


def test_an_augmentation_that_changes_the_shape_is_named():
    class Shrinks:
        draws = 0

        def __call__(self, images, u):
            return images[:, :, :4]

    with pytest.raises(PluginError, match="augmentation 'shrinks' must return images of the shape, dtype and device"):
        Augmenter([Step("shrinks", 1.0, Shrinks())])(images(2), 0, 0, 0, DistInfo())
    bad = Shrinks()
    bad.draws = -1
    with pytest.raises(PluginError, match="'draws' attribute must be an integer >= 0"):
        Augmenter([Step("bad", 1.0, bad)])


def test_a_third_party_augmentation_gets_its_uniforms(register_plugin):
    seen = []

    class Invert:
        draws = 2

        def __call__(self, images, u):
            seen.append(u)
            return -images

    class Plugin:
        @hookimpl
        def register_augmentations(self, register):
            register("t-invert", Invert, description="test")

    register_plugin(Plugin())
    assert "t-invert" in facecore.available("augmentations")
    x = images(64, size=8)
    out = augmenter([{"name": "t-invert", "p": 0.5}])(x, 0, 0, 0, DistInfo())
    (u,) = seen
    changed = (out != x).flatten(1).any(1)
    assert u.shape == (int(changed.sum()), 2) and u.device.type == "cpu" and 0 <= float(u.min()) < float(u.max()) < 1
    assert torch.equal(out[changed], -x[changed]) and torch.equal(out[~changed], x[~changed])


# --- the bundled augmentations ---------------------------------------------------------------


def test_flip_mirrors():
    x = images(3)
    assert torch.equal(one("flip")(x, 0, 0, 0, DistInfo()), x.flip(3))


def test_random_crop_boxes_follow_the_scale_and_ratio_ranges():
    crop = facecore.create("augmentations", "random_crop")
    u = torch.rand(2000, crop.draws, generator=torch.Generator().manual_seed(0))
    top, left, h, w = crop.boxes(u, 112, 112)
    area = h * w / 112**2
    assert float(area.min()) >= 0.19 and float(area.max()) <= 1.0 and float(area.mean()) < 0.7
    assert float((w / h).min()) >= 0.74 and float((w / h).max()) <= 1.35
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 112) & (left + w <= 112)).all())
    assert len(set(top.tolist())) > 50  # positions vary


def test_random_crop_pad_keeps_the_box_in_place_and_blackens_the_rest():
    x = images(16, size=32)
    aug = one("random_crop", mode="pad")
    out = aug(x, 0, 0, 0, DistInfo())
    u = aug.draw(0, 0, 0, 0, 16, DistInfo())[1]
    top, left, h, w = aug.steps[0].aug.boxes(u, 32, 32)
    for i in range(16):
        t, l, hh, ww = int(top[i]), int(left[i]), int(h[i]), int(w[i])
        assert torch.equal(out[i, :, t:t + hh, l:l + ww], x[i, :, t:t + hh, l:l + ww])
        mask = torch.ones(32, 32, dtype=torch.bool)
        mask[t:t + hh, l:l + ww] = False
        assert bool((out[i][:, mask] == -1).all())


def test_random_crop_resize_zooms_into_the_box():
    x = images(4, size=32)
    full = one("random_crop", scale=[1.0, 1.0], ratio=[1.0, 1.0])(x, 0, 0, 0, DistInfo())
    torch.testing.assert_close(full, x, atol=1e-5, rtol=0)  # the whole image: unchanged
    quarter = facecore.create("augmentations", "random_crop", scale=[0.25, 0.25], ratio=[1.0, 1.0])
    u = torch.zeros(1, quarter.draws)  # top-left 16 x 16 box
    out = quarter(x[:1], u)
    expected = F.interpolate(x[:1, :, :16, :16], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("down", ["nearest", "bilinear", "area"])
@pytest.mark.parametrize("up", ["nearest", "bilinear", "bicubic"])
def test_low_resolution_at_full_size_changes_nothing(down: str, up: str):
    x = images(3)
    out = one("low_resolution", scale=[1.0, 1.0], down=[down], up=[up])(x, 0, 0, 0, DistInfo())
    torch.testing.assert_close(out, x, atol=1e-4, rtol=0)  # area: float32 sums, ~1e-5 (1/700 of a grey level)


def test_low_resolution_area_then_nearest_is_block_averaging():
    x = images(3, size=32)
    out = one("low_resolution", scale=[0.25, 0.25], down=["area"], up=["nearest"])(x, 0, 0, 0, DistInfo())
    blocks = F.avg_pool2d(x, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    torch.testing.assert_close(out, blocks, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", [16, 20, 7])
@pytest.mark.parametrize("up", ["bilinear", "bicubic"])
def test_low_resolution_matches_interpolate_without_antialiasing(side: int, up: str):
    """Bilinear down, then bilinear or bicubic up: torch's (and cv2's) half-pixel resize, edges repeated."""
    x = images(4, size=32)
    aug = one("low_resolution", scale=[side / 32, side / 32], down=["bilinear"], up=[up])
    expected = F.interpolate(F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False),
                             size=(32, 32), mode=up, align_corners=False).clamp(-1, 1)
    torch.testing.assert_close(aug(x, 0, 0, 0, DistInfo()), expected, atol=2e-5, rtol=0)


def test_low_resolution_loses_detail_in_proportion_to_the_scale():
    x = images(8, size=64) + 0.3 * (torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)) - 0.5)
    errors = []
    for scale in (0.8, 0.4, 0.2):
        out = one("low_resolution", scale=[scale, scale], down=["bilinear"], up=["bilinear"])(x, 0, 0, 0, DistInfo())
        assert float(out.min()) >= -1 and float(out.max()) <= 1
        errors.append(float((out - x).abs().mean()))
    assert errors[0] < errors[1] < errors[2]


def test_photometric_factors_scale_brightness_contrast_and_saturation():
    x = images(6)
    assert torch.allclose(one("photometric", brightness=0, contrast=0, saturation=0)(x, 0, 0, 0, DistInfo()), x,
                          atol=1e-6)
    bright = one("photometric", brightness=0.5, contrast=0, saturation=0)(x, 0, 0, 0, DistInfo())
    ratio = ((bright + 1) / (x + 1)).flatten(1)
    unclipped = (bright > -1) & (bright < 1)
    for i in range(6):  # one brightness factor per image, within [0.5, 1.5]
        r = ratio[i][unclipped[i].flatten()]
        assert float(r.max() - r.min()) < 1e-4 and 0.5 <= float(r.mean()) <= 1.5
    grey = x[:, :1].repeat(1, 3, 1, 1)  # no colour: saturation has nothing to change (luma weights sum to 0.9999)
    torch.testing.assert_close(one("photometric", brightness=0, contrast=0, saturation=0.5)(grey, 0, 0, 0, DistInfo()),
                               grey, atol=2e-4, rtol=0)
    flat = one("photometric", brightness=0, contrast=0.5, saturation=0)(x, 0, 0, 0, DistInfo())
    assert not torch.allclose(flat, x)


def test_grayscale_uses_luma_in_every_channel():
    x = images(2)
    out = one("grayscale")(x, 0, 0, 0, DistInfo())
    luma = 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(out[:, c], luma, atol=1e-3, rtol=0)


def test_blur_keeps_flat_images_and_smooths_others():
    flat = torch.full((2, 3, 16, 16), 0.25)
    torch.testing.assert_close(one("blur")(flat, 0, 0, 0, DistInfo()), flat, atol=1e-6, rtol=0)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    weak = one("blur", sigma=[0.3, 0.3])(x, 0, 0, 0, DistInfo())
    strong = one("blur", sigma=[2.0, 2.0])(x, 0, 0, 0, DistInfo())
    assert float(strong.std()) < float(weak.std()) < float(x.std())
    torch.testing.assert_close(strong.mean((2, 3)), x.mean((2, 3)), atol=0.05, rtol=0)


# --- config -------------------------------------------------------------------------------


def _errors(augment) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config({**BASE, "data": {"root": "/data", "augment": augment}})
    return info.value.errors


@pytest.mark.parametrize(
    "augment, expected",
    [
        (["flip", {"name": "random_crop", "scale": [-0.1, 1.0]}], "data.augment[1].scale[0]: must be > 0, got -0.1"),
        ([{"name": "random_crop", "scale": [0.5]}], "data.augment[0].scale: must have at least 2 items"),
        ([{"name": "random_crop", "mode": "stretch"}], 'data.augment[0].mode: must be one of "resize", "pad"'),
        ([{"name": "low_resolution", "down": ["cubic"]}], "data.augment[0].down[0]: must be one of"),
        ([{"name": "photometric", "brightnes": 0.2}], 'data.augment[0].brightnes: unknown key; did you mean "brightness"?'),
        ([{"name": "photometric", "contrast": 2}], "data.augment[0].contrast: must be <= 1, got 2"),
        ([{"name": "blur", "sigma": [0.5, 20]}], "data.augment[0].sigma[1]: must be <= 10, got 20"),
        ([{"name": "grayscale", "p": 1.5}], "data.augment[0].p: must be <= 1, got 1.5"),
        ([{"name": "flip", "strength": 1}], "data.augment[0].strength: unknown key"),
        (["flipp"], "data.augment[0]: unknown augmentation 'flipp': did you mean 'flip'?"),
        ("flip", "data.augment: must be a list"),
    ],
)
def test_bad_augmentation_options_are_reported_with_their_path(augment, expected):
    errors = _errors(augment)
    assert any(e.startswith(expected) for e in errors), errors


def test_p_defaults_to_one_half_and_is_not_passed_to_the_plugin():
    aug = augmenter(["grayscale", {"name": "blur", "p": 0.1, "sigma": [1.0, 1.5]}])
    assert [(s.name, s.p) for s in aug.steps] == [("grayscale", 0.5), ("blur", 0.1)]
    assert aug.steps[1].aug.sigma == (1.0, 1.5)


def test_an_empty_list_turns_augmentation_off():
    x = images(4)
    assert len(augmenter([])) == 0 and torch.equal(augmenter([])(x, 0, 0, 0, DistInfo()), x)


def test_create_validates_options_like_the_config():
    with pytest.raises(ConfigError, match="random_crop.mode"):
        facecore.create("augmentations", "random_crop", mode="zoom")
    assert math.isclose(facecore.create("augmentations", "random_crop").ratio[1], 4 / 3)
