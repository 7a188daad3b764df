"""Face front end: landmarks, alignment, paste-back exactness, masks, pose, bad images."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.errors import FaceTooSmallError, ImageTooLargeError, MultipleFacesError, NoFaceError
from engine.face.align import AlignConfig, apply_transform, fit_transform, warp_to_crop
from engine.face.geometry import head_pose_deg, index_sets, template, umeyama
from engine.face.landmarks import FaceOptions, landmarks_for_image
from engine.face.mask import region_mask
from engine.face.paste import paste_back
from tests.synth import load_rgb

PORTRAIT = "portraits/hallo__examples_reference_images_2.jpg"
OTHER_PORTRAIT = "portraits/SadTalker__examples_source_image_people_0.png"


@pytest.fixture
def portrait(shared_data: Path) -> np.ndarray:
    return load_rgb(shared_data / PORTRAIT)


# -- geometry without any detector -------------------------------------------------------

def test_umeyama_recovers_similarity() -> None:
    rng = np.random.default_rng(0)
    src = rng.normal(size=(30, 2))
    ang = 0.3
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    dst = 2.5 * src @ rot.T + [4.0, -1.0]
    s, r, t = umeyama(src, dst)
    assert s == pytest.approx(2.5)
    np.testing.assert_allclose(r, rot, atol=1e-9)
    np.testing.assert_allclose(t, [4.0, -1.0], atol=1e-9)


def _rot(yaw: float, pitch: float, roll: float) -> np.ndarray:
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


@pytest.mark.parametrize("angles", [(0, 0, 0), (20, 0, 0), (0, -15, 0), (0, 0, 10), (25, 10, -8)])
def test_head_pose_recovers_known_rotation(angles: tuple[float, float, float]) -> None:
    tpl = template()
    posed = 300.0 * (tpl - tpl.mean(0)) @ _rot(*angles).T + [200.0, 150.0, 0.0]
    np.testing.assert_allclose(head_pose_deg(posed), angles, atol=0.5)


def test_paste_back_leaves_outside_of_mask_untouched_synthetic() -> None:
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    ang, scale = 0.2, 0.8
    m = np.array([[scale * np.cos(ang), -scale * np.sin(ang), -60.0], [scale * np.sin(ang), scale * np.cos(ang), -20.0]])
    crop = 255 - warp_to_crop(frame, m, AlignConfig(crop_size_px=128))  # a visibly different crop
    mask = np.zeros((128, 128), np.float32)
    cv2.circle(mask, (64, 80), 30, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 4)
    mask[mask < 1 / 255] = 0
    out = paste_back(frame, crop, m, mask)
    inv = cv2.invertAffineTransform(m)
    alpha = cv2.warpAffine(mask, inv, (400, 300), flags=cv2.INTER_LINEAR, borderValue=0)
    outside = alpha < 1 / 255
    assert outside.sum() > 0.8 * outside.size
    np.testing.assert_array_equal(out[outside], frame[outside])
    assert np.abs(out[alpha > 0.99].astype(int) - frame[alpha > 0.99]).mean() > 50  # inside really changed


# -- with the real detector on shared portraits -----------------------------------------

@pytest.mark.shared_data
def test_align_then_paste_back_is_exact_outside_mask(portrait: np.ndarray) -> None:
    lm, notes = landmarks_for_image(portrait)
    assert lm.shape == (478, 3) and notes == []
    cfg = AlignConfig(crop_size_px=256)
    m = fit_transform(lm, cfg)
    crop = warp_to_crop(portrait, m, cfg)
    lm_crop = apply_transform(m, lm)
    # the canonical layout: eyes near (0.5, 0.40) of the crop
    eyes = lm_crop[np.concatenate([index_sets()["right_eye"], index_sets()["left_eye"]])].mean(0) / 256
    np.testing.assert_allclose(eyes, [0.5, 0.40], atol=0.03)
    mask = region_mask(lm_crop, 256)
    generated = np.zeros_like(crop)  # a "generated" mouth region that is plainly different
    out = paste_back(portrait, generated, m, mask)
    inv = cv2.invertAffineTransform(m)
    alpha = cv2.warpAffine(mask, inv, portrait.shape[1::-1], flags=cv2.INTER_LINEAR, borderValue=0)
    outside = alpha < 1 / 255
    np.testing.assert_array_equal(out[outside], portrait[outside])
    assert (out[alpha > 0.99] < 5).all()
    # pasting the unmodified crop back changes the inside by interpolation error only
    same = paste_back(portrait, crop, m, mask)
    np.testing.assert_array_equal(same[outside], portrait[outside])
    assert np.abs(same.astype(int) - portrait).max() < 60 and np.abs(same.astype(int) - portrait).mean() < 0.5


@pytest.mark.shared_data
def test_mask_covers_lips_not_eyes(portrait: np.ndarray) -> None:
    lm, _ = landmarks_for_image(portrait)
    m = fit_transform(lm, AlignConfig())
    lc = apply_transform(m, lm)
    for kind in ("lower_face", "mouth"):
        mask = region_mask(lc, 256, kind=kind)
        assert mask.dtype == np.float32 and 0 <= mask.min() and mask.max() <= 1
        lips = lc[index_sets()["lips_inner"]].round().astype(int)
        eyes = lc[index_sets()["right_eye"]].round().astype(int)
        assert mask[lips[:, 1], lips[:, 0]].min() > 0.9
        assert mask[eyes[:, 1], eyes[:, 0]].max() < 0.05
    with pytest.raises(ValueError, match="unknown mask kind"):
        region_mask(lc, 256, kind="eyes")


JITTER_BOUND_PX = 0.3  # mean per-landmark std on a 256 px crop, still portrait + sensor noise


@pytest.mark.shared_data
def test_landmark_jitter_on_still_portrait_is_bounded(portrait: np.ndarray) -> None:
    """40 frames of one still portrait with Gaussian noise (sigma 2 grey levels), tracked as video."""
    from benchmarks.face_jitter import jitter

    j = jitter(portrait, sigma=2.0)
    assert j["mean_px"] < JITTER_BOUND_PX, f"mean landmark jitter {j['mean_px']:.3f} px"
    assert j["worst_px"] < 1.0, f"worst landmark jitter {j['worst_px']:.3f} px"
    assert j["crop_shift_std_px"] < 0.5  # the crop itself stays put


@pytest.mark.shared_data
def test_several_faces_pick_largest_or_refuse(shared_data: Path) -> None:
    a = load_rgb(shared_data / PORTRAIT)
    b = cv2.resize(load_rgb(shared_data / OTHER_PORTRAIT), (a.shape[0] // 2, a.shape[0] // 2))
    b = np.pad(b, ((0, a.shape[0] - b.shape[0]), (0, 0), (0, 0)))
    both = np.concatenate([b, a], 1)
    lm, notes = landmarks_for_image(both)
    assert len(notes) == 1 and "picked the largest" in notes[0]
    assert lm[:, 0].min() > b.shape[1]  # the larger face, on the right
    with pytest.raises(MultipleFacesError, match="2 faces"):
        landmarks_for_image(both, FaceOptions(on_multiple="refuse"))


@pytest.mark.shared_data
def test_no_face_too_small_too_large(portrait: np.ndarray) -> None:
    with pytest.raises(NoFaceError, match="no face"):
        landmarks_for_image(np.full((256, 256, 3), 127, np.uint8))
    with pytest.raises(FaceTooSmallError, match="under the minimum"):
        landmarks_for_image(portrait, FaceOptions(min_face_px=2000))
    with pytest.raises(ImageTooLargeError, match="MP"):
        landmarks_for_image(portrait, FaceOptions(max_image_pixels=100_000))
    # a genuinely small face: the portrait at 112 px (face ~41 px tall) in a large canvas
    tiny = np.zeros((900, 900, 3), np.uint8)
    tiny[400:512, 400:512] = cv2.resize(portrait, (112, 112), interpolation=cv2.INTER_AREA)
    with pytest.raises(FaceTooSmallError, match="px tall"):
        landmarks_for_image(tiny)
