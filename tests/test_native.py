"""The native-resolution path (issue 13) and the motion layers (issue 14): pixel warp, mouth-interior
compositor, articulation layer, replayed head motion, articulation metrics. No shared data needed:
the landmarks are the canonical template's, the image a synthetic texture."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engine.compositor import InteriorConfig, interior_mask, mouth_opening
from engine.eval.articulation import articulation, closures, summarise
from engine.face.geometry import OPENING_PAIRS, template
from engine.face.pixel_warp import PixelWarpConfig, PortraitWarp
from engine.face.region import moving_indices, warp_indices
from engine.motion.articulation import Articulation, ArticulationConfig
from engine.motion.head import HeadMotion, HeadMotionLibrary, trajectory_from_affines

S = 256


def _jaw_down(lm: np.ndarray, dy: float) -> np.ndarray:
    """The lower lip and the jaw (the moving landmarks not on the upper lip) moved down by ``dy``."""
    from engine.face.pixel_warp import UPPER_LIP

    out = lm.copy()
    low = np.setdiff1d(moving_indices(), UPPER_LIP)
    out[low, 1] += dy
    return out


def _scene(scale: float = 2.0):
    """A textured 'portrait' (H, W, 3) whose canonical crop is its centre square scaled by ``scale``."""
    rng = np.random.default_rng(0)
    h = w = int(S * scale)
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    affine = np.array([[1.0 / scale, 0.0, 0.0], [0.0, 1.0 / scale, 0.0]])  # image -> crop
    lm = template()[:, :2].astype(np.float32)  # (478, 2) crop units
    return img, affine, lm


@pytest.mark.parametrize("method", ["gaussian", "delaunay"])
def test_pixel_warp_with_unmoved_landmarks_is_the_portrait(method: str) -> None:
    img, affine, lm = _scene()
    pw = PortraitWarp(img, affine, lm, S, warp_indices(), PixelWarpConfig(method=method), moving=moving_indices())
    out = pw.warp(lm)
    assert out.shape == img.shape
    assert np.array_equal(out, img)


def test_pixel_warp_moves_the_lips_and_leaves_the_rest_untouched() -> None:
    img, affine, lm = _scene()
    pw = PortraitWarp(img, affine, lm, S, warp_indices(), moving=moving_indices())
    target = _jaw_down(lm, 0.02)  # the lower lip and jaw down by 0.02 crop units (10 px here)
    out = pw.warp(target)
    x0, y0, x1, y1 = pw.box
    outside = np.ones(img.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(out[outside], img[outside])  # nothing outside the box changes
    assert not np.array_equal(out[y0:y1, x0:x1], img[y0:y1, x0:x1])
    # border rows and columns of the box meet the untouched image: no seam
    assert np.abs(out[y0, x0:x1].astype(int) - img[y0, x0:x1]).max() <= 1
    # on a vertical ramp, the pixel at the moved lower lip shows a row 7-11 px above it (backward flow;
    # the Gaussian flow is a weighted mean, so still neighbours take a little of the displacement)
    ramp = np.repeat(np.repeat((np.arange(img.shape[0]) // 2).astype(np.uint8)[:, None], img.shape[1], 1)[..., None], 3, 2)
    pr = PortraitWarp(ramp, affine, lm, S, warp_indices(), moving=moving_indices())
    px = (target[14, :2] * S * 2.0).round().astype(int)
    shown_row = 2.0 * float(pr.warp(target)[px[1], px[0], 0])
    assert 7.0 <= px[1] - shown_row <= 11.0


@pytest.mark.parametrize("cubic", [True, False])
def test_pixel_warp_resamples_only_what_moves_and_equals_the_whole_box_remap(cubic: bool) -> None:
    """warp() resamples only the part of the box its coarse grid says moves: the same frame as one remap
    of the whole box with the full maps (a still pixel maps to itself, whichever the sampling)."""
    import cv2

    img, affine, lm = _scene()
    pw = PortraitWarp(img, affine, lm, S, warp_indices(), PixelWarpConfig(cubic=cubic), moving=moving_indices())
    assert pw.cubic is cubic
    for dy in (0.004, 0.02):
        target = _jaw_down(lm, dy)
        mx, my = pw.maps(target)
        whole = img.copy()
        x0, y0, x1, y1 = pw.box
        whole[y0:y1, x0:x1] = cv2.remap(pw.box_pixels, mx, my, cv2.INTER_CUBIC if cubic else cv2.INTER_LINEAR,
                                         borderMode=cv2.BORDER_REPLICATE)
        out = pw.warp(target)
        assert np.abs(out.astype(int) - whole).max() <= 1  # sub-0.01 px shifts left as they were


def test_pixel_warp_samples_a_small_box_bicubic_and_a_large_one_bilinear() -> None:
    img, affine, lm = _scene()
    large = PortraitWarp(img, affine, lm, S, warp_indices(), moving=moving_indices())  # a 338 px box at scale 2
    assert not large.cubic
    img1, affine1, lm1 = _scene(scale=0.5)  # an 85 px box
    assert PortraitWarp(img1, affine1, lm1, S, warp_indices(), moving=moving_indices()).cubic


def test_pixel_warp_refuses_unknown_method() -> None:
    img, affine, lm = _scene()
    with pytest.raises(ValueError, match="method"):
        PortraitWarp(img, affine, lm, S, warp_indices(), PixelWarpConfig(method="bogus"))


def test_interior_mask_is_empty_for_a_closed_mouth_and_covers_an_open_one() -> None:
    lm = template()[:, :2].astype(np.float32)
    closed = lm.copy()
    for u, l in OPENING_PAIRS:
        closed[l, 1] = closed[u, 1]
    assert mouth_opening(closed) == pytest.approx(0.0, abs=1e-6)
    assert not interior_mask(closed, S).any()
    opened = closed.copy()
    for _, l in OPENING_PAIRS:
        opened[l, 1] += 0.03
    m = interior_mask(opened, S, InteriorConfig())
    centre = ((opened[13, :2] + opened[14, :2]) / 2 * S).astype(int)
    assert m[centre[1], centre[0]] > 0.95
    assert m.max() <= 1.0 and m[:20].max() == 0.0  # nothing near the top of the crop


def test_articulation_layer_gain_crossing_and_clamp() -> None:
    idx = moving_indices()
    pos = {int(i): k for k, i in enumerate(idx)}
    ref = template()[idx, :2].astype(np.float32)
    lm = np.repeat(ref[None], 3, axis=0)
    up, lo = pos[13], pos[14]
    lm[0, lo, 1] += 0.01  # a small opening
    lm[1, lo, 1] = lm[1, up, 1] - 0.01  # crossed lips
    lm[2, lo, 1] += 0.5  # an impossible opening
    assert np.allclose(Articulation(ArticulationConfig(gain=1.0, max_opening_ratio=0.0), idx, ref)(lm[:1]), lm[:1])
    out = Articulation(ArticulationConfig(gain=2.0, max_opening_ratio=0.6), idx, ref)(lm)
    assert out[0, lo, 1] - ref[lo, 1] == pytest.approx(0.02, abs=1e-6)  # displacement doubled
    assert out[1, lo, 1] >= out[1, up, 1]  # no crossing
    width = np.linalg.norm(out[2, pos[291]] - out[2, pos[61]])
    ups, los = [pos[u] for u, _ in OPENING_PAIRS], [pos[l] for _, l in OPENING_PAIRS]
    assert (out[2, los, 1] - out[2, ups, 1]).mean() <= 0.6 * width + 1e-5


def test_articulation_closes_an_open_portraits_mouth_along_the_basis() -> None:
    idx = moving_indices()
    pos = {int(i): k for k, i in enumerate(idx)}
    closed = template()[idx, :2].astype(np.float32)
    ups, los = [pos[u] for u, _ in OPENING_PAIRS], [pos[l] for _, l in OPENING_PAIRS]
    closed[los, 1] = closed[ups, 1]  # the lips meet
    jaw = np.zeros_like(closed)
    jaw[los, 1] = 1.0  # a motion that opens the mouth: the lower inner lip down
    side = np.zeros_like(closed)
    side[pos[61], 0], side[pos[291], 0] = -1.0, 1.0  # one that does not: the corners apart
    basis = np.stack([jaw.ravel() / np.linalg.norm(jaw), side.ravel() / np.linalg.norm(side)])
    open_ref = closed + 0.03 * jaw + 0.02 * side  # a smile, mouth open
    cfg = ArticulationConfig(gain=1.0, max_opening_ratio=0.0, basis=tuple(map(tuple, basis)),
                             basis_mean=tuple(np.zeros(basis.shape[1])), close_reference=True)
    art = Articulation(cfg, idx, open_ref)
    assert art.opening(open_ref) == pytest.approx(0.03, abs=1e-6)
    assert art.opening(art.reference) == pytest.approx(0.0, abs=1e-6)  # closed ...
    assert np.allclose(art.reference, closed + 0.02 * side, atol=1e-6)  # ... by the opening motion alone: the smile's width stays
    assert np.allclose(art(art.reference[None])[0], art.reference, atol=1e-6)  # displacements start from the closed mouth
    shut = Articulation(cfg, idx, closed)
    assert np.array_equal(shut.reference, closed)  # a closed mouth is left as it is
    assert np.array_equal(Articulation(replace(cfg, close_reference=False), idx, open_ref).reference, open_ref)


def _library(seed: int = 0) -> HeadMotionLibrary:
    rng = np.random.default_rng(seed)
    segs = [np.cumsum(rng.normal(0, 0.05, (200, 4)), axis=0) for _ in range(5)]
    return HeadMotionLibrary(25.0, [s - s.mean(0) for s in segs], "synthetic")


def test_head_motion_is_deterministic_calmer_in_silence_and_round_trips(tmp_path) -> None:
    lib = _library()
    lib.save(tmp_path / "h.json")
    lib2 = HeadMotionLibrary.load(tmp_path / "h.json")
    assert len(lib2.segments) == 5 and np.allclose(lib2.segments[0], lib.segments[0], atol=1e-4)
    a = HeadMotion(lib2, (100.0, 100.0), 200.0, 25, seed=3)
    b = HeadMotion(lib2, (100.0, 100.0), 200.0, 25, seed=3)
    pa = np.array([a.pose(i, True) for i in range(1500)])  # a minute: several cross-faded segments
    pb = np.array([b.pose(i, True) for i in range(1500)])
    assert np.array_equal(pa, pb)
    c = HeadMotion(lib2, (100.0, 100.0), 200.0, 25, seed=3)
    pc = np.array([c.pose(i, False) for i in range(1500)])
    assert pc[100:].std(0).mean() < 0.7 * pa[100:].std(0).mean()
    assert np.abs(np.diff(pa, axis=0)).max() < 0.5  # cross-fades: no jumps
    img = np.zeros((64, 64, 3), np.uint8)
    assert a.apply(img, 1500, True).shape == img.shape


def test_head_trajectory_from_affines_removes_drift() -> None:
    f = 300
    t = np.arange(f) / 25.0
    ang = np.radians(2.0 * np.sin(2 * np.pi * t / 2.0))  # a 2 s roll
    drift = np.linspace(0, 50, f)  # a slow pan of 50 px
    aff = np.zeros((f, 2, 3))
    aff[:, 0, 0] = aff[:, 1, 1] = np.cos(ang)
    aff[:, 0, 1], aff[:, 1, 0] = np.sin(ang), -np.sin(ang)
    aff[:, 0, 2] = -drift
    tr = trajectory_from_affines(aff, 256, fps=25.0)
    assert tr.shape == (f, 4)
    assert 1.0 < tr[50:-50, 0].std() < 2.0  # the 2 degree roll survives
    assert np.abs(tr[50:-50, 1]).max() < 0.02  # the pan (0.2 face sizes) is gone


def test_articulation_metrics_on_known_series() -> None:
    t = np.arange(200)
    gt = 5 + 4 * np.sin(2 * np.pi * t / 12.0)
    r = articulation(gt.copy(), gt)
    assert r["amplitude_ratio"] == pytest.approx(1.0) and r["speed_ratio"] == pytest.approx(1.0)
    assert r["correlation"] == pytest.approx(1.0) and r["closure_hit_rate"] == 1.0
    half_late = 5 + 2 * np.sin(2 * np.pi * (t - 1) / 12.0)
    r2 = articulation(half_late, gt)
    assert r2["amplitude_ratio"] == pytest.approx(0.5, abs=0.02)
    assert r2["correlation_lag_frames"] == 1.0 and r2["correlation"] > 0.99
    assert r2["closure_hit_rate"] < 1.0  # half the opening never closes as far
    ev, thr = closures(gt)
    assert len(ev) == pytest.approx(200 / 12, abs=2)
    s = summarise([r, r2, {}])
    assert s["amplitude_ratio"] == pytest.approx(0.75, abs=0.02)
    assert articulation(gt[:5], gt[:5]) == {}


def test_crop_maps_follow_the_same_flow_and_new_interior_keeps_the_portraits_own() -> None:
    from engine.compositor import new_interior

    img, affine, lm = _scene()
    pw = PortraitWarp(img, affine, lm, S, warp_indices(), moving=moving_indices())
    mx, my = pw.crop_maps(lm, S)
    xs = np.arange(S, dtype=np.float32)
    assert np.allclose(mx, xs[None, :]) and np.allclose(my, xs[:, None])  # nothing moves: identity
    target = _jaw_down(lm, 0.02)
    mx, my = pw.crop_maps(target, S)
    c = (target[14, :2] * S).astype(int)
    assert c[1] - 5.5 <= my[c[1], c[0]] <= c[1] - 3.5  # the moved lower lip samples ~5 px above it (backward flow)
    u = (target[13, :2] * S).astype(int)
    assert abs(my[u[1] - 1, u[0]] - (u[1] - 1)) < 1.0  # the upper lip, above the line, stays
    t = np.ones((4, 4), np.float32)
    assert np.array_equal(new_interior(t, np.zeros_like(t)), t) and not new_interior(t, np.ones_like(t)).any()
