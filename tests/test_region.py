"""The generated region (engine/face/region.py): the mouth region's geometry, and a bundle that
generates it (512 px crops) running through the avatar, the generator and both compositors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.avatar import load_portrait, prepare_avatar
from engine.bundle import BundleError, load_bundle
from engine.cli import DEMO
from engine.face.geometry import index_sets, template
from engine.face.region import LOWER_FACE, MOUTH, from_patch_units, patch_box, region_named, to_patch_units
from engine.generator import FrameGenerator
from engine.runtime import load_runtime
from tests.tiny import tiny_bundle


def test_mouth_region_geometry():
    assert patch_box(512, MOUTH) == (192, 288, 128)
    assert patch_box(256, LOWER_FACE) == (64, 112, 128)  # the first bundles' patch, unchanged
    lips = to_patch_units(template()[index_sets()["lips"], :2].astype(np.float32), MOUTH)
    assert lips.min() > 0.05 and lips.max() < 0.95  # the whole mouth inside, away from the border
    assert lips[:, 1].mean() == pytest.approx(0.5, abs=0.1)  # centred on the lips
    pts = np.random.default_rng(0).random((20, 2)).astype(np.float32)
    np.testing.assert_allclose(from_patch_units(to_patch_units(pts, MOUTH), MOUTH), pts, atol=1e-6)
    assert region_named(None) is LOWER_FACE and region_named("mouth") is MOUTH
    with pytest.raises(ValueError, match="unknown region"):
        region_named("eyes")


def test_a_mouth_region_needs_a_crop_whose_patch_fits_the_autoencoder(tmp_path):
    with pytest.raises(BundleError, match="mouth patch of a 256 px crop"):
        load_bundle(tiny_bundle(tmp_path / "b", region="mouth", crop_size_px=256))


@pytest.fixture(scope="module")
def mouth_runtime(tmp_path_factory):
    return load_runtime(tiny_bundle(tmp_path_factory.mktemp("mouth") / "b", region="mouth", crop_size_px=512), "torch", threads=1)


@pytest.mark.parametrize("compositor", ["patch", "native"])
def test_a_mouth_region_bundle_generates_inside_its_region(mouth_runtime, compositor):
    img = load_portrait(DEMO / "astronaut.jpg")
    av = prepare_avatar(img, mouth_runtime)
    assert av.crop_size_px == 512 and av.region is MOUTH
    assert tuple(av.latent.shape) == (1, 4, 32, 32) and av.patch().shape == (128, 128, 3)
    gen = FrameGenerator(mouth_runtime, av, steps=1, blinks=False, compositor=compositor)
    lm = gen.ref_moving[0].clone()
    lips = index_sets()["lips"]
    lower = np.isin(gen.moving, lips) & (gen.ref_all[0, gen.moving, 1].numpy() > gen.ref_all[0, 13, 1].item())
    lm[torch.from_numpy(lower), 1] += 0.06  # the lower lip well down: an open mouth
    feats = torch.zeros(8, mouth_runtime.bundle.configs["audio_encoder"].feature_dim)
    out = gen.frame(lm, gen.audio_tokens(feats, 0))
    assert out.shape == img.shape and out.dtype == np.uint8
    changed = np.abs(out.astype(np.int16) - img.astype(np.int16)).max(-1) > 0
    assert changed.any()
    # every changed pixel maps into the crop's lower half: the region's patch, or (native) the pixel warp's box
    ys, xs = np.nonzero(changed)
    crop_pts = np.stack([xs, ys], 1) @ av.affine[:, :2].T + av.affine[:, 2]
    x0, y0, side = patch_box(512, MOUTH) if compositor == "patch" else patch_box(512, LOWER_FACE)
    margin = 4
    assert crop_pts[:, 0].min() >= x0 - margin and crop_pts[:, 0].max() <= x0 + side + margin
    assert crop_pts[:, 1].min() >= y0 - margin and crop_pts[:, 1].max() <= y0 + side + margin


def test_an_avatar_of_another_region_is_refused(mouth_runtime, tmp_path):
    other = load_runtime(tiny_bundle(tmp_path / "lf"), "torch", threads=1)
    av = prepare_avatar(load_portrait(DEMO / "astronaut.jpg"), other)
    with pytest.raises(ValueError, match="lower_face region, the bundle generates mouth"):
        FrameGenerator(mouth_runtime, av)


def test_masks_computed_in_a_window_equal_the_whole_square():
    from engine.compositor import InteriorConfig
    from engine.face.mask import grow_and_feather

    rng = np.random.default_rng(1)
    lm = template()[:, :2].astype(np.float32)
    for s in (256, 512):
        for _ in range(3):
            pts = lm + rng.normal(0, 0.004, lm.shape).astype(np.float32)
            lips = pts[index_sets()["lips"]] * s
            for convex, k, sigma in ((True, int(round(0.04 * s)), 0.02 * s), (False, int(round(InteriorConfig().dilate * s)), 3.0)):
                a = grow_and_feather(lips, s, dilate_px=k, sigma_px=sigma, convex=convex)
                b = grow_and_feather(lips, s, dilate_px=k, sigma_px=sigma, convex=convex, window=False)
                assert np.abs(a - b).max() < 1e-5
    # a polygon at the crop's edge: the window is clamped, still equal
    edge = np.array([[0, 0], [40, 2], [35, 30], [2, 25]], np.float32)
    np.testing.assert_allclose(grow_and_feather(edge, 128, dilate_px=4, sigma_px=3.0),
                               grow_and_feather(edge, 128, dilate_px=4, sigma_px=3.0, window=False), atol=1e-5)


def test_the_denoisers_reference_shows_a_mouths_colour_inside_the_interior(mouth_runtime):
    """InteriorConfig.reference_colour: inside the target interior the reference latent is the encoded
    interior colour, outside it is the portrait's warped latent; None leaves the warped latent alone."""
    import dataclasses

    from engine.compositor import InteriorConfig, interior_mask

    av = prepare_avatar(load_portrait(DEMO / "astronaut.jpg"), mouth_runtime)
    gen = FrameGenerator(mouth_runtime, av, steps=1, blinks=False, compositor="native")
    plain = FrameGenerator(mouth_runtime, av, steps=1, blinks=False, compositor="native",
                           interior=dataclasses.replace(InteriorConfig(), reference_colour=None))
    assert gen.cavity_latent is not None and gen.cavity_latent.shape == tuple(av.latent.shape) and plain.cavity_latent is None
    lm = gen.ref_all[0].clone()
    lower = np.isin(np.arange(478), index_sets()["lips"]) & (lm[:, 1].numpy() > lm[13, 1].item())
    lm[torch.from_numpy(lower), 1] += 0.06
    lm_crop = from_patch_units(lm.numpy())
    warped = plain._latent_reference(lm_crop)
    filled = gen._with_cavity(warped, lm_crop)
    x0, y0, side = patch_box(512, MOUTH)
    m = interior_mask(lm_crop, 512, gen.interior)[y0 : y0 + side, x0 : x0 + side]
    cells = m.reshape(32, 4, 32, 4).mean(axis=(1, 3))  # the mask pooled to latent cells
    inside, outside = cells > 0.999, cells == 0
    assert inside.any() and outside.any()
    np.testing.assert_allclose(filled[0][:, inside], gen.cavity_latent[0][:, inside], atol=2e-3)  # the mask is 1 - 1e-3 there
    np.testing.assert_array_equal(filled[0][:, outside], warped[0][:, outside])
    from engine.face.geometry import OPENING_PAIRS

    closed = from_patch_units(gen.ref_all[0].numpy())
    for u, l in OPENING_PAIRS:
        closed[l, 1] = closed[u, 1]
    assert gen._with_cavity(warped, closed) is warped  # a closed mouth: nothing to fill
    # what the denoiser is given, each way (a wrong branch once handed both the latent warp instead)
    from engine.face.region import to_patch_units

    moving = torch.from_numpy(to_patch_units(lm_crop[gen.moving]).astype(np.float32))
    tokens = torch.zeros(1, gen.den_cfg.audio_tokens, gen.enc_cfg.feature_dim)
    for g, expected in ((gen, filled), (plain, warped)):
        seen, graph = [], g.g_den
        g.g_den = type("Spy", (), {"infer": staticmethod(lambda feeds, graph=graph, seen=seen: (seen.append(feeds["reference"]), graph.infer(feeds))[1])})()
        g.latent(moving, tokens)
        g.g_den = graph
        np.testing.assert_allclose(seen[0], expected, atol=1e-6)
    encoder_ref = FrameGenerator(mouth_runtime, av, steps=1, blinks=False, compositor="native", pixel_reference="encode")
    seen, graph = [], encoder_ref.g_den
    encoder_ref.g_den = type("Spy", (), {"infer": staticmethod(lambda feeds: (seen.append(feeds["reference"]), graph.infer(feeds))[1])})()
    encoder_ref.latent(moving, tokens)
    lm_all = encoder_ref.ref_all.clone()
    lm_all[:, encoder_ref.moving] = moving[None]
    latent_warp = encoder_ref.g_warp.infer({"x": av.latent.numpy(), "src": encoder_ref._region_units(encoder_ref.ref_all[:, encoder_ref.warp_idx]),
                                            "dst": encoder_ref._region_units(lm_all[:, encoder_ref.warp_idx])})["warped"]
    assert np.abs(seen[0] - latent_warp).max() > 0.1  # the encoded warped crop, not the latent warp
    # its interior encodes the mouth colour: nearer the cavity latent there than the portrait's warped latent is
    assert np.abs(seen[0][0][:, inside] - gen.cavity_latent[0][:, inside]).mean() < np.abs(warped[0][:, inside] - gen.cavity_latent[0][:, inside]).mean()
