"""The invisible watermark: a tiled spread-spectrum pattern in the luma, found again by correlation.

Embedding (``Watermarker``). A *tile* of 32 x 32 chips carries the pattern: 256 chips are a fixed
pseudo-random sync code, the other 768 carry the 48 code bits of the payload (16 chips a bit,
spread over the tile, each with a pseudo-random sign). The tile repeats over the frame on a grid
of chips whose size is the frame's long side / 128 (4 px at 512, 10 px at 1280): 4 tiles along the
long side, so the pattern scales with the frame and a rescaled video keeps it. The chip grid is
upsampled bilinearly to the frame, weighted by the portrait's texture (stronger on hair and
clothes, weaker on flat skin and background; the weight is fixed once per frame size from
``prepare(reference)`` (the pipeline gives the portrait) or else the first frame, so the pattern is
the same in every frame and costs no per-frame analysis), and added to R, G and B alike (a pure
luma change, the chroma untouched). Per frame that is two saturating uint8 additions of a
precomputed image: 0.05 ms at 512 x 512, 0.4 ms at 1280 x 1280 (docs/benchmarks/watermark.json).

Detection (``detect``). Frames are reduced to their luma at a working size (long side 256 px, 2 px
a chip for an untouched video) and averaged: the pattern is static, so averaging removes codec
noise and moving content, never the pattern. Then:
1. Scale search: the tiling makes the pattern periodic, so a rescale, a crop or letterboxing only
   changes its period (Px, Py) at the working size and its origin. Periods from 32 to 100 px are
   tried on a 1 % grid (isotropic; if nothing decodes, also stretched by 5 and 11 %), the best
   three refined on a 0.25 % grid.
2. Fold: for a candidate period the mean is resampled so the period is 64 px, its residual taken
   as sign(y - median3(y)) (a sign correlator: content predicted by its 3 x 3 median), and every
   tile summed into one 64 x 64 tile (the pattern adds coherently, the content does not).
3. Correlate: cyclic cross-correlation (FFT) of the folded tile with the sync code and with each
   code bit's chips, each in units of its own spread over all origins (z). The pattern score at
   an origin is the sum of the 49 squared z: about chi-square(49) on unmarked content (the
   maximum over a search is 100-130), several hundred on marked content. The best origin wins.
4. Bits: each code bit's z at that origin; its sign is the bit. The payload counts only if its
   CRC-16 and version check out (``engine.provenance.payload``): a random word passes with
   probability 2^-20. If the hard decision fails, the 8 least reliable bits are flipped one at a
   time (``decode_bits``); every CRC evaluation is counted in ``Detection.trials``, and
   trials x 2^-20 bounds the chance of a false detection.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import scipy.fft

from engine.provenance.payload import CODE_BITS, Payload

GRID_CELLS = 128  # chips along the frame's long side
TILE_CHIPS = 32  # the pattern repeats every TILE_CHIPS chips on both axes
SYNC_CHIPS = 256  # of the tile's 1024 chips; the rest carry the code bits (16 chips a bit)
KEY = 0x5EED_17  # seeds the chip layout and signs: the detector must use the same
WORK_LONG_PX = 256  # detection: the frame's long side at the working size (2 px a chip untouched)
FOLD_PX = 64  # detection: the folded tile, 2 px a chip


@dataclass(frozen=True)
class WatermarkConfig:
    strength: float = 2.3  # target RMS of the luma change, in 8-bit levels (PSNR = 20 log10(255 / RMS): about 41 dB)
    adaptive: bool = True  # weight by the reference frame's local texture (same RMS, less visible on flat areas)
    texture_sigma_px: float = 2.0  # local texture: RMS of the high-passed luma over this radius (in chips)
    weight_range: tuple[float, float] = (0.5, 1.5)  # the texture weight is clipped to this range (before the RMS is set)


def _layout() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sync (T, T) in {-1, 0, +1}, bit_of (T, T) int: the code bit a chip carries or -1, sign (T, T) in {-1, +1})."""
    rng = np.random.default_rng(KEY)
    n = TILE_CHIPS * TILE_CHIPS
    order = rng.permutation(n)
    sign = rng.choice(np.array([-1, 1], np.int8), size=n)
    bit_of = np.full(n, -1, np.int64)
    data = order[SYNC_CHIPS:]
    bit_of[data] = np.arange(len(data)) % CODE_BITS  # each bit on 16 chips scattered over the tile
    sync = np.zeros(n, np.int8)
    sync[order[:SYNC_CHIPS]] = sign[order[:SYNC_CHIPS]]
    t = (TILE_CHIPS, TILE_CHIPS)
    return sync.reshape(t), bit_of.reshape(t), sign.reshape(t)


SYNC, BIT_OF, SIGN = _layout()


def tile_chips(bits: np.ndarray) -> np.ndarray:
    """(T, T) float32 in {-1, +1}: the tile for the code bits ``bits`` ((48,) in {-1, +1})."""
    data = np.where(BIT_OF >= 0, SIGN * np.asarray(bits)[np.maximum(BIT_OF, 0)], 0)
    return (SYNC + data).astype(np.float32)


def chip_px(h: int, w: int) -> float:
    return max(h, w) / GRID_CELLS


def pattern(bits: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h, w) float32: the tiled chips upsampled bilinearly to the frame (values in [-1, 1])."""
    c = chip_px(h, w)
    gh, gw = int(np.ceil(h / c)) + 1, int(np.ceil(w / c)) + 1
    reps = (gh // TILE_CHIPS + 1, gw // TILE_CHIPS + 1)
    grid = np.tile(tile_chips(bits), reps)[:gh, :gw]
    big = cv2.resize(grid, (int(round(gw * c)), int(round(gh * c))), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(big[:h, :w])


def _luma(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb


def texture_weight(luma: np.ndarray, config: WatermarkConfig) -> np.ndarray:
    """(h, w) float32: local texture (RMS of the high-passed luma), normalised to mean 1 and clipped.
    Computed at 2 px a chip (cheap at any frame size), then upsampled."""
    h, w = luma.shape
    small = (max(8, int(round(w * 2 / chip_px(h, w)))), max(8, int(round(h * 2 / chip_px(h, w)))))
    y = cv2.resize(luma, small, interpolation=cv2.INTER_AREA).astype(np.float32)
    s = 2.0 * config.texture_sigma_px
    hp = y - cv2.GaussianBlur(y, (0, 0), s)
    rms = np.sqrt(cv2.GaussianBlur(hp * hp, (0, 0), 2 * s))
    wgt = np.clip(rms / max(float(rms.mean()), 1e-3), *config.weight_range).astype(np.float32)
    return cv2.resize(wgt, (w, h), interpolation=cv2.INTER_LINEAR)


@dataclass
class _Plan:
    pos: np.ndarray  # (h, w, 3) uint8: the positive part of the luma change
    neg: np.ndarray  # (h, w, 3) uint8: the negative part


class Watermarker:
    """``Watermarker(payload).embed(rgb) -> rgb`` with the payload's pattern added (a new array).

    The pattern for a frame size is made once, from ``prepare(reference)`` or else the first frame of
    that size (the texture weight comes from it), and reused: every frame costs two saturating uint8
    additions.
    """

    def __init__(self, payload: Payload, config: WatermarkConfig = WatermarkConfig()):
        self.payload, self.config = payload, config
        self.bits = payload.code_bits()
        self._plans: dict[tuple[int, int], _Plan] = {}

    def delta(self, image: np.ndarray) -> np.ndarray:
        """(h, w) float32: the luma change for a frame like ``image`` (RMS = config.strength)."""
        h, w = image.shape[:2]
        d = pattern(self.bits, h, w)
        if self.config.adaptive:
            d *= texture_weight(_luma(image), self.config)
        rms = float(np.sqrt(np.mean(d * d)))
        return d * (self.config.strength / max(rms, 1e-6))

    def _plan(self, image: np.ndarray) -> _Plan:
        key = image.shape[:2]
        plan = self._plans.get(key)
        if plan is None:
            d = self.delta(image)
            pos = cv2.convertScaleAbs(np.maximum(d, 0.0))  # rounded, saturated to uint8
            neg = cv2.convertScaleAbs(np.minimum(d, 0.0))
            if image.ndim == 3:
                pos, neg = cv2.merge([pos] * image.shape[2]), cv2.merge([neg] * image.shape[2])
            plan = self._plans[key] = _Plan(pos, neg)
        return plan

    def prepare(self, reference: np.ndarray) -> None:
        """Make the pattern for frames of ``reference``'s size with its texture weight (the pipeline gives the
        portrait, so the pattern does not depend on which frame happens to come first)."""
        self._plan(reference)

    def embed(self, image: np.ndarray) -> np.ndarray:
        if image.dtype != np.uint8:
            raise TypeError(f"frames are uint8, got {image.dtype}")
        plan = self._plan(image)
        out = cv2.add(image, plan.pos)
        return cv2.subtract(out, plan.neg, dst=out)


# ---------------------------------------------------------------------------------------- detection


@dataclass
class Detection:
    payload: Payload | None  # the decoded payload when its CRC and version check out, else None
    score: float  # pattern score: sum of the squared z-scores of the sync and the 48 code bits at the best origin
    sync_z: float  # the sync code's correlation there, in standard deviations of its surface
    bit_z: np.ndarray  # (48,) the code bits' z-scores there (sign = bit)
    period_px: tuple[float, float]  # tile period found at the working size (x, y); 64 for an untouched video
    frames: int  # frames averaged
    trials: int  # CRC trials made (each passes by chance with probability 2^-20)

    @property
    def found(self) -> bool:
        return self.payload is not None

    @property
    def bit_margin(self) -> float:
        """Mean z of the code bits in the decoded direction (mean |z|): about 0.8 for noise, above 3 for a clear mark."""
        return float(np.mean(np.abs(self.bit_z))) if len(self.bit_z) else 0.0

    @property
    def false_alarm_p(self) -> float:
        """Upper bound on the chance that unmarked content decodes to a payload passing the CRC and the
        version check in these trials (each pass is a 2^-20 event for random bits)."""
        return min(1.0, max(self.trials, 1) * 2.0**-20)

    @property
    def confidence(self) -> float:
        """Found: 1 - false_alarm_p (how sure that this video carries the mark). Not found: 0."""
        return 1.0 - self.false_alarm_p if self.found else 0.0

    @property
    def strength(self) -> str:
        """How much margin the mark had: "strong" (bit margin >= 3 sd), "moderate" (>= 2), "weak"."""
        m = self.bit_margin
        return "strong" if m >= 3.0 else "moderate" if m >= 2.0 else "weak"


def _fold_templates() -> np.ndarray:
    """(49, F, F): the sync code, then the 48 code-bit chip sets (with their signs), as they appear in a
    folded tile at 2 px a chip (the embedder's bilinear upsampling, cyclic)."""

    def up(chips: np.ndarray) -> np.ndarray:
        t = TILE_CHIPS
        big = cv2.resize(np.tile(chips.astype(np.float32), (3, 3)), (6 * t, 6 * t), interpolation=cv2.INTER_LINEAR)
        return big[2 * t : 4 * t, 2 * t : 4 * t]

    return np.stack([up(SYNC)] + [up(np.where(BIT_OF == i, SIGN, 0)) for i in range(CODE_BITS)])


def _spectra(t: np.ndarray) -> np.ndarray:
    return np.conj(scipy.fft.rfft2(t - t.mean(axis=(1, 2), keepdims=True))).astype(np.complex64)


_TEMPLATES = _fold_templates()
_TEMPLATES_F = _spectra(_TEMPLATES)  # (49, F, F // 2 + 1)
_COARSE_F = _spectra(_TEMPLATES.reshape(-1, FOLD_PX // 2, 2, FOLD_PX // 2, 2).mean(axis=(2, 4)))  # the same at 1 px a chip (the search)


class Accumulator:
    """The running mean of frames' luma at the working size (feed frames, then ``detect_mean(acc.mean())``)."""

    def __init__(self) -> None:
        self.sum: np.ndarray | None = None
        self.n = 0
        self.size: tuple[int, int] | None = None  # (w, h) at the working size

    def add(self, frame: np.ndarray) -> None:
        """``frame``: (h, w) uint8 luma or (h, w, 3) uint8 RGB."""
        y = _luma(frame)
        h, w = y.shape
        if self.size is None:
            s = WORK_LONG_PX / max(h, w)
            self.size = (max(8, int(round(w * s))), max(8, int(round(h * s))))
        if (w, h) != self.size:
            interp = cv2.INTER_AREA if max(h, w) > WORK_LONG_PX else cv2.INTER_LINEAR
            y = cv2.resize(y, self.size, interpolation=interp)
        y = y.astype(np.float32)
        self.sum = y if self.sum is None else self.sum + y
        self.n += 1

    def mean(self) -> np.ndarray:
        if self.sum is None:
            raise ValueError("no frames")
        return self.sum / self.n


def residual(y: np.ndarray) -> np.ndarray:
    """sign(y - median3(y)): the content predicted by its 3 x 3 median, only the residual's sign kept
    (a sign correlator: robust to the heavy-tailed residual of edges and texture; measured 2.5x the
    bit margin of a Gaussian high-pass normalised by its local RMS on the demo portrait)."""
    y = np.ascontiguousarray(y, np.float32)
    return np.sign(y - cv2.medianBlur(y, 3)).astype(np.float32)


def fold(y: np.ndarray, px: float, py: float) -> np.ndarray:
    """(F, F): the mean luma ``y`` resampled (exactly, by an affine warp) so the tile period is F px, its
    residual, every tile summed into one (mean per pixel)."""
    h, w = y.shape
    sx, sy = FOLD_PX / px, FOLD_PX / py
    nw, nh = max(FOLD_PX, int(np.ceil(w * sx))), max(FOLD_PX, int(np.ceil(h * sy)))
    if max(sx, sy) < 0.75:  # a strong reduction: average first, as a resize by area would
        k = 1.0 / max(sx, sy)
        y = cv2.GaussianBlur(y, (0, 0), 0.5 * k)
    m = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]], np.float32)  # pixel centres onto pixel centres
    y = cv2.warpAffine(np.ascontiguousarray(y, np.float32), m, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    valid = cv2.warpAffine(np.ones((h, w), np.float32), m, (nw, nh), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    r = residual(y) * valid
    ph, pw = -nh % FOLD_PX, -nw % FOLD_PX
    r = np.pad(r, ((0, ph), (0, pw)))
    cnt = np.pad(valid, ((0, ph), (0, pw)))
    ty, tx = r.shape[0] // FOLD_PX, r.shape[1] // FOLD_PX
    s = r.reshape(ty, FOLD_PX, tx, FOLD_PX).sum(axis=(0, 2))
    n = cnt.reshape(ty, FOLD_PX, tx, FOLD_PX).sum(axis=(0, 2))
    return s / np.maximum(n, 1.0)


def correlate(f: np.ndarray, *, coarse: bool = False) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Correlation surfaces (49, F, F) of a folded tile with the sync and bit templates at every cyclic
    origin, each in units of its own spread (z); the best pattern score (sum of z^2 over the 49) and the
    origin (dy, dx) where it is. ``coarse``: on the tile reduced to 1 px a chip (4x cheaper; the scale search)."""
    if coarse:
        f = f.reshape(FOLD_PX // 2, 2, FOLD_PX // 2, 2).mean(axis=(1, 3))
    spec = scipy.fft.rfft2((f - f.mean()).astype(np.float32), workers=1)
    c = scipy.fft.irfft2(spec[None] * (_COARSE_F if coarse else _TEMPLATES_F), s=f.shape, workers=1)  # (49, F, F): c[d] = sum f[y + d] t[y]
    sd = np.sqrt((c * c).mean(axis=(1, 2), keepdims=True)) + 1e-12  # the mean over origins is 0 (f is centred)
    z = c / sd
    t = np.einsum("kyx,kyx->yx", z, z)
    at = np.unravel_index(int(np.argmax(t)), t.shape)
    return z, float(t[at]), (int(at[0]), int(at[1]))


PERIOD_RANGE_PX = (32.0, 100.0)  # isotropic tile periods searched: the content from 0.5x of the frame (letterbox) to a 36 % crop
PERIOD_STEP = 0.01  # relative step of the search (the fold tolerates about +-0.7 % over 4 tiles)


def _periods(w: int, h: int) -> np.ndarray:
    lo, hi = PERIOD_RANGE_PX
    hi = min(hi, max(w, h) / 2.0)  # at least two tiles along the long side
    n = int(np.floor(np.log(hi / lo) / np.log1p(PERIOD_STEP))) + 1
    grid = lo * (1 + PERIOD_STEP) ** np.arange(max(n, 1))
    return np.unique(np.concatenate([grid, [float(FOLD_PX)]]))  # the untouched period exactly


ASPECTS = (1.0 / 1.11, 1.0 / 1.05, 1.05, 1.11)  # py / px tried when the isotropic search finds nothing (a video stretched on one axis)


def _search(mean_luma: np.ndarray, aspects: tuple[float, ...]) -> list[tuple[float, float, float]]:
    """(coarse score, px, py) for every period on the search grid and aspect, best first."""
    h, w = mean_luma.shape
    scored = []
    for a in aspects:
        for p in _periods(w, h):
            _, t, _ = correlate(fold(mean_luma, p, p * a), coarse=True)
            scored.append((t, p, p * a))
    scored.sort(reverse=True)
    return scored


CHASE_BITS = 8  # if the hard decision fails its CRC, each of this many least reliable bits is flipped in turn (Chase-1)


def decode_bits(bit_z: np.ndarray) -> tuple[Payload | None, int]:
    """(payload, CRC trials made): the hard decision, then single flips of the ``CHASE_BITS`` least
    reliable bits (a soft-decision decoder that fixes the commonest failure, one weak bit, at the price
    of up to 1 + CHASE_BITS trials; each trial passes random bits with probability 2^-20)."""
    p = Payload.from_code_bits(bit_z)
    if p is not None:
        return p, 1
    n = 1
    for i in np.argsort(np.abs(bit_z))[:CHASE_BITS]:
        z = bit_z.copy()
        z[i] = -z[i]
        n += 1
        p = Payload.from_code_bits(z)
        if p is not None:
            return p, n
    return None, n


def _try(mean_luma: np.ndarray, scored, candidates: int, frames: int, tried: list, counter: list[int]) -> Detection | None:
    """Refine and decode the best-scoring distinct periods (at most ``candidates`` of them); the first that
    decodes, or the best seen. ``counter[0]`` counts the CRC trials."""
    best: Detection | None = None
    n0 = len(tried)
    for _, px, py in scored:
        if len(tried) - n0 >= candidates:
            break
        if any(abs(px / qx - 1) < 2.5 * PERIOD_STEP and abs(py / qy - 1) < 2.5 * PERIOD_STEP for qx, qy in tried):
            continue  # a neighbour of a period already tried
        tried.append((px, py))
        steps = (-0.005, -0.0025, 0.0, 0.0025, 0.005)
        _, period = max((correlate(fold(mean_luma, px * (1 + ex), py * (1 + ey)), coarse=True)[1], (px * (1 + ex), py * (1 + ey)))
                        for ey in steps for ex in steps)
        z, t, at = correlate(fold(mean_luma, *period))
        bit_z = z[1:, at[0], at[1]]
        payload, n = decode_bits(bit_z)
        counter[0] += n
        det = Detection(payload, t, float(z[0, at[0], at[1]]), bit_z, period, frames, 0)
        if det.found:
            return det
        if best is None or det.score > best.score:
            best = det
    return best


def detect_mean(mean_luma: np.ndarray, *, frames: int = 1, candidates: int = 3, anisotropic: bool = True) -> Detection:
    """Detect in a mean luma at the working size (``Accumulator.mean()``): the tile period by a search
    (isotropic; then, if nothing decodes and ``anisotropic``, stretched by ``ASPECTS``), then the best
    ``candidates`` periods of each pass refined on a +-0.5 % grid and decoded (``decode_bits``).
    ``Detection.trials`` counts the CRC trials: at most 3 x 9 = 27 isotropic, 54 with the stretched pass."""
    tried: list[tuple[float, float]] = []
    counter = [0]
    det = _try(mean_luma, _search(mean_luma, (1.0,)), candidates, frames, tried, counter)
    if not (det and det.found) and anisotropic:
        other = _try(mean_luma, _search(mean_luma, ASPECTS), candidates, frames, tried, counter)
        if other is not None and (det is None or other.found or other.score > det.score):
            det = other
    if det is None:
        det = Detection(None, 0.0, 0.0, np.zeros(CODE_BITS), (0.0, 0.0), frames, 0)
    det.trials = counter[0]
    return det


def detect(frames, *, candidates: int = 3, anisotropic: bool = True) -> Detection:
    """Detect in an iterable of frames ((h, w) luma or (h, w, 3) RGB, uint8) of one video."""
    acc = Accumulator()
    for fr in frames:
        acc.add(fr)
    return detect_mean(acc.mean(), frames=acc.n, candidates=candidates, anisotropic=anisotropic)
