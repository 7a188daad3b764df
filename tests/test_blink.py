"""The blink prior: fitting on known series, the streaming sampler, and the eyelid warp."""
from __future__ import annotations

import numpy as np
import pytest

from engine.face.geometry import template
from engine.motion.blink import BlinkPrior, BlinkSampler, close_eyes, eye_opening, fit_blink_prior


def _face_with_openings(openings: np.ndarray) -> np.ndarray:
    """Template landmarks (F, 478, 2) whose lid gaps follow ``openings`` (fraction of the template's)."""
    t = template()[:, :2].astype(np.float64) * 256
    lm = np.repeat(t[None], len(openings), axis=0)
    for up, lo in ((159, 145), (386, 374)):
        mid = (t[up, 1] + t[lo, 1]) / 2
        half = (t[lo, 1] - t[up, 1]) / 2
        lm[:, up, 1] = mid - half * openings
        lm[:, lo, 1] = mid + half * openings
    return lm


def test_fit_finds_the_blink_rate_of_a_known_series():
    fps, minutes = 25, 2
    op = np.ones(fps * 60 * minutes)
    onsets = np.arange(50, len(op) - 10, 100)  # one blink every 4 s: 15 per minute
    for o in onsets:
        op[o : o + 4] = [0.6, 0.2, 0.1, 0.5]
    prior = fit_blink_prior([(_face_with_openings(op), fps)])
    assert prior.rate_per_min == pytest.approx(15.0, rel=0.05)
    assert prior.fitted_on_frames == len(op)
    assert max(prior.profile) == pytest.approx(1.0)


def test_fit_falls_back_to_defaults_without_enough_data():
    assert fit_blink_prior([(_face_with_openings(np.ones(100)), 25)]) == BlinkPrior()


def test_sampler_is_deterministic_and_keeps_its_rate(tmp_path):
    prior = BlinkPrior(rate_per_min=20.0)
    a = [BlinkSampler(prior, 25, seed=3).next() for _ in range(10)]
    s1, s2 = BlinkSampler(prior, 25, seed=3), BlinkSampler(prior, 25, seed=3)
    seq1 = np.array([s1.next() for _ in range(25 * 600)])  # 10 minutes
    seq2 = np.array([s2.next() for _ in range(25 * 600)])
    assert np.array_equal(seq1, seq2) and a == list(seq1[:10])
    starts = np.flatnonzero((seq1[1:] > 0) & (seq1[:-1] == 0))
    assert 150 <= len(starts) <= 250  # ~20 a minute for 10 minutes
    assert seq1.max() == pytest.approx(1.0) and seq1.min() == 0.0
    prior.save(tmp_path / "p.json")
    assert BlinkPrior.load(tmp_path / "p.json") == prior


def test_close_eyes_changes_only_the_eyes():
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    lm = template()[:, :2] * 256
    same, m0 = close_eyes(crop, lm, 0.0)
    assert same is crop and not m0.any()
    out, mask = close_eyes(crop, lm, 1.0)
    changed = np.any(out != crop, axis=-1)
    assert changed.any()
    ys, xs = np.nonzero(changed)
    eyes = lm[[33, 133, 263, 362, 159, 145, 386, 374]]
    assert ys.min() >= eyes[:, 1].min() - 30 and ys.max() <= eyes[:, 1].max() + 5  # ... around the eyes
    assert np.all(mask[changed] > 0)  # and the paste mask covers every changed pixel
    assert eye_opening(lm[None])[0] > 0


def test_head_sway_is_small_smooth_and_deterministic():
    from engine.motion.sway import HeadSway

    a, b = HeadSway((256, 240), 300, 25, seed=3), HeadSway((256, 240), 300, 25, seed=3)
    pts = np.array([[256, 240, 1], [100, 100, 1], [400, 450, 1]], float).T  # face centre, two corners

    def where(s, k):
        return s.affine(k) @ pts  # (2, 3)

    path = np.stack([where(a, k) for k in range(25 * 20)])  # 20 s
    assert np.array_equal(path[17], where(b, 17))  # same seed, same motion
    assert not np.array_equal(path[17], where(HeadSway((256, 240), 300, 25, seed=4), 17))
    disp = np.linalg.norm(path - pts[:2][None], axis=1)  # (T, 3) distance from rest
    assert disp[:, 0].max() < 0.02 * 300  # the face centre moves by under 2 % of the face size
    assert disp.max() < 10  # nothing in a 512 px image moves by more than a few pixels
    step = np.linalg.norm(np.diff(path, axis=0), axis=1)
    assert step.max() < 0.6  # smooth: under 0.6 px from one frame to the next
    assert disp[:, 0].std() > 0.2  # and it does move
