"""The portrait's own pixels moved to the target landmarks at its native resolution (issue 13).

A backward flow, zero on the border of the warped box (so the box is pasted back without a seam),
evaluated on a coarse grid over the box, upsampled, and applied with one ``cv2.remap`` of the
full-resolution portrait (only the rows and columns that move): lips, chin and cheeks keep the
portrait's texture at its own scale, whatever the size of the face in the image. What warping
cannot show (the mouth interior) is painted by the compositor (engine/compositor.py).

The flows (``PixelWarpConfig.method``), measured on held-out clips with the A2L's landmarks
(MediaPipe on warped frames against the landmarks they were warped to):
  - ``lips`` (default): two normalised Gaussian flows, one steered by the upper lip (and the still
    face above it), one by the lower lip and the jaw, blended across the target's lip line; the
    mesh points of the lower face below the nose follow the lips and jaw instead of anchoring
    them. The rendered opening follows the landmarks' (correlation 0.93-0.98, 0.7-1.2x their
    amplitude).
  - ``gaussian``: one normalised Gaussian flow (that of engine/models/warp.py, in crop units). With
    a closed mouth in the portrait the two lips' opposite offsets cancel at the lip line and still
    neighbours dilute the rest: the mouth opened only 0.05-0.26x as far as its landmarks.
  - ``rbf``: Gaussian radial-basis interpolation, exact at the landmarks, but with bumps between
    the sparse jaw points (a rippled jaw line).
  - ``delaunay``: piecewise-affine over the Delaunay triangulation of the target landmarks (scipy),
    exact at every landmark but as jagged as the landmarks are (torn lip edges).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

from engine.face.align import invert_transform
from engine.face.region import PATCH_SIZE, PATCH_X0, PATCH_Y0


@dataclass(frozen=True)
class PixelWarpConfig:
    method: str = "lips"  # "lips", "gaussian", "rbf" or "delaunay" (module docstring)
    line_soft: float = 0.002  # lips: softness of the lip-line step between the mouth's corners, crop units
    line_soft_outside: float = 0.03  # lips: the softness it reaches beyond the corners
    line_soft_reach: float = 0.03  # lips: over this distance beyond a corner (crop units)
    rbf_ridge: float = 0.05  # rbf: ridge added to the kernel matrix (smoothness against exactness)
    grid_cells: int = 64  # the flow is computed on this many cells per side of the box, then upsampled
    sigma: float = 0.02  # gaussian, lips: radius of a landmark's influence, crop units
    wide_weight: float = 0.0  # gaussian, lips: weight of a second, wider kernel (0: none)
    wide_scale: float = 3.0  # its radius in sigmas
    floor: float = 1e-2  # gaussian: weight mass below which the flow fades to zero
    box_margin: float = 0.08  # the warped box: the lower-face patch grown by this (crop units) on every side
    anchors_per_side: int = 12  # zero-offset anchors on each side of the box
    # bicubic or bilinear sampling (None: by the warped box's size). Bilinear's sub-pixel blur costs a small face its
    # detail (the demo, a 113 px box: sharpness ratio 0.83 against 1.05 bicubic, at native resolution), while on a
    # large box bicubic costs much more for little (hallo 1, a 591 px box: the warp takes 12.0 against 5.3 ms of CPU,
    # docs/benchmarks/mouth/frame_parts.json; sharpness 1.02 against 0.91, docs/eval/mouth/closeups.json; held out at
    # 512 px, warp only: ST-LPIPS 0.1446 bicubic, 0.1444 bilinear)
    cubic: bool | None = None
    cubic_max_box_px: int = 250 * 250  # with cubic None: bicubic up to this many pixels in the box, bilinear above


# MediaPipe face-mesh ids: the upper lip (outer and inner contours, corners included) and the pairs
# (upper, lower) whose midpoints trace the lip line (corners count for both lips)
LIP_CORNERS = (61, 291, 78, 308)
UPPER_LIP = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIP_LINE_PAIRS = ((78, 78), (191, 95), (80, 88), (81, 178), (82, 87), (13, 14), (312, 317), (311, 402), (310, 318), (415, 324), (308, 308))


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


class PortraitWarp:
    """Warps the lower face of ``image`` (H, W, 3) whose landmarks are ``landmarks`` (478, 2) in
    crop units of the similarity ``affine`` (image -> crop of ``crop_size_px``).

    ``indices``: the landmarks that steer the flow (the moving ones and their still neighbours);
    ``moving``: those of them that targets may move (default: all); the others must keep their place.
    """

    def __init__(self, image: np.ndarray, affine: np.ndarray, landmarks: np.ndarray, crop_size_px: int, indices: np.ndarray,
                 config: PixelWarpConfig = PixelWarpConfig(), moving: np.ndarray | None = None):
        self.image, self.config = image, config
        self.indices = np.asarray(indices)
        self.inv = invert_transform(affine)  # crop px -> image px
        s = float(crop_size_px)
        self.crop_size_px = crop_size_px
        h, w = image.shape[:2]
        g = config.box_margin
        corners = np.array([[PATCH_X0 - g, PATCH_Y0 - g], [PATCH_X0 + PATCH_SIZE + g, PATCH_Y0 - g],
                            [PATCH_X0 - g, PATCH_Y0 + PATCH_SIZE + g], [PATCH_X0 + PATCH_SIZE + g, PATCH_Y0 + PATCH_SIZE + g]]) * s
        c = _apply(self.inv, corners)
        self.x0, self.y0 = max(int(np.floor(c[:, 0].min())), 0), max(int(np.floor(c[:, 1].min())), 0)
        self.x1, self.y1 = min(int(np.ceil(c[:, 0].max())), w), min(int(np.ceil(c[:, 1].max())), h)
        if self.x1 - self.x0 < 8 or self.y1 - self.y0 < 8:
            raise ValueError("the face's lower half lies outside the image")
        bw, bh = self.x1 - self.x0, self.y1 - self.y0
        # source landmarks in box pixels
        self.src = _apply(self.inv, landmarks[self.indices, :2] * s) - (self.x0, self.y0)  # (K, 2)
        t = np.linspace(0.0, 1.0, config.anchors_per_side, endpoint=False)
        border = np.concatenate([np.stack([t * bw, np.zeros_like(t)], 1), np.stack([np.full_like(t, bw), t * bh], 1),
                                 np.stack([bw - t * bw, np.full_like(t, bh)], 1), np.stack([np.zeros_like(t), bh - t * bh], 1)])
        self.anchors = border.astype(np.float64)  # (4A, 2) zero-offset points on the box border
        if config.method not in ("lips", "gaussian", "rbf", "delaunay"):
            raise ValueError(f"PixelWarpConfig.method must be lips, gaussian, rbf or delaunay, got {config.method!r}")
        gx = np.linspace(0.0, bw - 1, config.grid_cells)
        gy = np.linspace(0.0, bh - 1, config.grid_cells)
        self.grid = np.stack(np.meshgrid(gx, gy), axis=-1)  # (G, G, 2) box pixels
        self.affine = np.asarray(affine, np.float64)
        self.src_crop = landmarks[self.indices, :2].astype(np.float64)  # (K, 2) crop units
        box_to_crop = self.affine.copy()
        box_to_crop[:, 2] += box_to_crop[:, :2] @ np.array([self.x0, self.y0], np.float64)
        self.grid_crop = (_apply(box_to_crop, self.grid.reshape(-1, 2)) / s).astype(np.float32)  # (G*G, 2) crop units
        self.crop_to_box_linear = self.inv[:, :2] * s  # crop-unit offsets -> box-pixel offsets
        # the border cells' flow is forced to zero (the box meets the untouched image there)
        edge = np.ones((config.grid_cells, config.grid_cells), np.float32)
        edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = 0.0
        self.edge = edge[..., None]
        # gaussian: only the landmarks that move (``moving``) change the flow; the weight of the still
        # ones at each grid point is the same every frame, so it is summed once here
        self.moving = np.isin(self.indices, np.asarray(moving if moving is not None else self.indices))
        # anchors: the landmarks that do not move; with "lips", the mesh points of the lower face below the
        # nose (chin, the skin around the mouth) are not anchors: they follow the lips and the jaw
        anchor = ~self.moving
        if config.method == "lips":
            anchor &= self.src_crop[:, 1] <= landmarks[2, 1]  # landmark 2: under the nose
        still = self.src_crop[anchor].astype(np.float32)
        self.still_weight = self._weights(still).sum(1, keepdims=True) if len(still) else np.zeros((len(self.grid_crop), 1), np.float32)
        self.src_moving = self.src_crop[self.moving].astype(np.float32)  # (M, 2)
        # "lips": which moving landmarks steer the flow above the lip line and which below it
        mv = self.indices[self.moving]
        self.upper_sel = np.isin(mv, UPPER_LIP)
        self.lower_sel = ~np.isin(mv, UPPER_LIP) | np.isin(mv, LIP_CORNERS)
        self.line_pairs = np.array(LIP_LINE_PAIRS)  # (P, 2) landmark ids
        # the same flow on a grid over the whole crop, for masks in crop space (crop_maps)
        cc = (np.arange(config.grid_cells, dtype=np.float32) + 0.5) / config.grid_cells
        self.crop_grid = np.stack(np.meshgrid(cc, cc), axis=-1).reshape(-1, 2)  # (G*G, 2) crop units
        # crop_maps of the last few frames: a frame's latent stage and its compose stage (other threads, one
        # frame apart in the live pipeline) both need them
        self._crop_maps_cache: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._crop_maps_lock = threading.Lock()
        self.crop_still_weight = self._weights(still, grid=self.crop_grid).sum(1, keepdims=True) if len(still) \
            else np.zeros((len(self.crop_grid), 1), np.float32)
        xs, ys = np.meshgrid(np.arange(bw, dtype=np.float32), np.arange(bh, dtype=np.float32))
        self.identity = (xs, ys)
        self.box_pixels = np.ascontiguousarray(image[self.y0 : self.y1, self.x0 : self.x1])
        self.cubic = bool(config.cubic) if config.cubic is not None else bw * bh <= config.cubic_max_box_px

    def _weights(self, pts: np.ndarray, cells: np.ndarray | None = None, grid: np.ndarray | None = None) -> np.ndarray:
        """Gaussian weights (G*G, N) float32 of points (N, 2) in crop units at the grid points (or at ``cells`` of them)."""
        p = self.grid_crop if grid is None else grid
        p = p if cells is None else p[cells]
        d2 = np.maximum((p * p).sum(1)[:, None] - 2.0 * p @ pts.T + (pts * pts).sum(1)[None, :], 0.0)  # (G*G, N)
        w = np.exp(-np.minimum(d2 / np.float32(2.0 * self.config.sigma ** 2), 80.0))
        if self.config.wide_weight > 0:  # a wider, weaker second scale carries the motion across sparse regions (the chin)
            ws = self.config.wide_scale * self.config.sigma
            w = w + self.config.wide_weight * np.exp(-np.minimum(d2 / np.float32(2.0 * ws ** 2), 80.0))
        return w.astype(np.float32)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the warped box in image pixels."""
        return self.x0, self.y0, self.x1, self.y1

    def target_points(self, landmarks: np.ndarray) -> np.ndarray:
        """(478, 2) target landmarks in crop units -> the steering points in box pixels (K, 2)."""
        return _apply(self.inv, landmarks[self.indices, :2] * float(self.crop_size_px)) - (self.x0, self.y0)

    def _disp(self, landmarks: np.ndarray) -> np.ndarray:
        """The flow's backward offsets (G, G, 2) in box pixels on the coarse grid, for target ``landmarks``."""
        g = self.config.grid_cells
        if self.config.method != "delaunay":
            off = self._offsets(landmarks, self.grid_crop, self.still_weight)  # (G*G, 2) crop units
            return (off @ self.crop_to_box_linear.T.astype(np.float32)).reshape(g, g, 2) * self.edge
        from scipy.interpolate import LinearNDInterpolator  # scipy: installed with mediapipe (jax); only this variant needs it

        dst = self.target_points(landmarks)
        pts = np.concatenate([dst, self.anchors])  # (K + 4A, 2)
        vals = np.concatenate([self.src - dst, np.zeros_like(self.anchors)])  # backward offsets: where to sample
        return LinearNDInterpolator(pts, vals, fill_value=0.0)(self.grid).astype(np.float32)  # (G, G, 2)

    def maps(self, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``cv2.remap`` maps (bh, bw) float32 of the box for target ``landmarks`` (478, 2), crop units."""
        bh, bw = self.box_pixels.shape[:2]
        disp = cv2.resize(self._disp(landmarks), (bw, bh), interpolation=cv2.INTER_LINEAR)  # (bh, bw, 2)
        return self.identity[0] + disp[..., 0], self.identity[1] + disp[..., 1]

    def _offsets(self, landmarks: np.ndarray, grid: np.ndarray, still_weight: np.ndarray) -> np.ndarray:
        """The flow's backward offsets (G*G, 2) in crop units at ``grid`` (crop units)."""
        if self.config.method == "rbf":
            return self._rbf_offsets(landmarks, grid)
        if self.config.method == "gaussian":
            return self._gauss(landmarks, grid, still_weight, np.ones(int(self.moving.sum()), bool))
        # "lips": one flow for what lies above the lip line (upper lip, cheeks, nose), one for what lies
        # below it (lower lip, chin, jaw), blended across the line of the target mouth
        up = self._gauss(landmarks, grid, still_weight, self.upper_sel)
        lo = self._gauss(landmarks, grid, still_weight, self.lower_sel)
        w = self._below_lip_line(landmarks, grid)[:, None]  # (G*G, 1) in [0, 1]
        return up * (1.0 - w) + lo * w

    def _gauss(self, landmarks: np.ndarray, grid: np.ndarray, still_weight: np.ndarray, sel: np.ndarray) -> np.ndarray:
        """Normalised Gaussian flow of the moving landmarks ``sel`` (a mask over them) and the still ones."""
        dst = landmarks[self.indices[self.moving][sel], :2].astype(np.float32)  # (M, 2) crop units
        src = self.src_moving[sel]
        # cells farther than 5 sigma from every moving landmark get no flow: only the others are computed
        pts = np.concatenate([dst, src])
        lo, hi = pts.min(0) - 5 * self.config.sigma, pts.max(0) + 5 * self.config.sigma
        active = np.nonzero(np.all((grid >= lo) & (grid <= hi), axis=1))[0]
        w = self._weights(dst, active, grid)  # (A, M)
        off = np.zeros((len(grid), 2), np.float32)
        off[active] = (w @ (src - dst)) / (w.sum(1, keepdims=True) + still_weight[active] + self.config.floor)
        return off

    def _below_lip_line(self, landmarks: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """Per grid point, how far it belongs to the lower face (0 above the target's lip line, 1 below):
        a sharp step between the lips' corners, softening to ``line_soft_outside`` beyond them."""
        pts = landmarks[self.line_pairs, :2]  # (P, 2, 2) upper and lower point of each pair
        mid = pts.mean(axis=1)  # (P, 2)
        order = np.argsort(mid[:, 0])
        xs, ys = mid[order, 0], mid[order, 1]
        y_line = np.interp(grid[:, 0], xs, ys)
        outside = np.maximum(np.maximum(xs[0] - grid[:, 0], grid[:, 0] - xs[-1]), 0.0)  # crop units beyond a corner
        soft = self.config.line_soft + outside / max(self.config.line_soft_reach, 1e-6) * self.config.line_soft_outside
        return (1.0 / (1.0 + np.exp(-(grid[:, 1] - y_line) / np.minimum(soft, self.config.line_soft_outside)))).astype(np.float32)

    def _rbf_offsets(self, landmarks: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """Gaussian RBF interpolation: offsets that equal (source - target) at every steering landmark
        (up to the ridge ``rbf_ridge``, which also merges coincident points) and decay to zero away
        from them. Unlike the normalised Gaussian mean, a landmark's own displacement is not diluted by
        its still or opposite-moving neighbours (the lips of a closed mouth move apart in full)."""
        dst = landmarks[self.indices, :2].astype(np.float64)  # (K, 2) crop units
        d = self.src_crop - dst  # (K, 2)
        keep = self.moving | np.any(np.linalg.norm(dst[:, None] - dst[self.moving][None], axis=-1) < 4 * self.config.sigma, axis=1)
        dst, d = dst[keep], d[keep]
        k = np.exp(-((dst[:, None] - dst[None]) ** 2).sum(-1) / (2 * self.config.sigma ** 2))  # (N, N)
        alpha = np.linalg.solve(k + self.config.rbf_ridge * np.eye(len(dst)), d)  # (N, 2)
        lo, hi = dst.min(0) - 5 * self.config.sigma, dst.max(0) + 5 * self.config.sigma
        active = np.nonzero(np.all((grid >= lo) & (grid <= hi), axis=1))[0]
        off = np.zeros((len(grid), 2), np.float32)
        off[active] = self._weights(dst.astype(np.float32), active, grid) @ alpha.astype(np.float32)
        return off

    def crop_maps(self, landmarks: np.ndarray, size_px: int) -> tuple[np.ndarray, np.ndarray]:
        """``cv2.remap`` maps (S, S) of the same flow in the crop's own pixels (``size_px``), for moving
        masks drawn in crop space with the portrait (e.g. its mouth interior). The last 4 are kept: read-only."""
        key = (np.ascontiguousarray(landmarks, np.float32).tobytes(), int(size_px))
        with self._crop_maps_lock:
            hit = self._crop_maps_cache.get(key)
            if hit is not None:
                self._crop_maps_cache.move_to_end(key)
                return hit
        maps = self._crop_maps(landmarks, size_px)
        for m in maps:
            m.flags.writeable = False
        with self._crop_maps_lock:
            self._crop_maps_cache[key] = maps
            while len(self._crop_maps_cache) > 4:
                self._crop_maps_cache.popitem(last=False)
        return maps

    def _crop_maps(self, landmarks: np.ndarray, size_px: int) -> tuple[np.ndarray, np.ndarray]:
        g = self.config.grid_cells
        off = (self._offsets(landmarks, self.crop_grid, self.crop_still_weight) * size_px).reshape(g, g, 2)
        off = cv2.resize(off, (size_px, size_px), interpolation=cv2.INTER_LINEAR)
        xs = np.arange(size_px, dtype=np.float32)
        return xs[None, :] + off[..., 0], xs[:, None] + off[..., 1]

    def warp(self, landmarks: np.ndarray) -> np.ndarray:
        """The full portrait (a new array) with its lower face moved to ``landmarks`` (478, 2), crop units."""
        g = self.config.grid_cells
        disp = self._disp(landmarks)  # (G, G, 2)
        out = self.image.copy()
        # only the part of the box where something moves is resampled (a still pixel maps to itself): found on the
        # coarse grid, grown by a cell (a pixel of the bilinear upsampling reads the two nearest cells per axis)
        live = np.abs(disp).max(axis=2) > 0.01
        rows, cols = np.nonzero(live.any(1))[0], np.nonzero(live.any(0))[0]
        if len(rows) == 0:
            return out
        bh, bw = self.box_pixels.shape[:2]
        r0, r1 = max(int(np.floor((rows[0] - 1) * bh / g)), 0), min(int(np.ceil((rows[-1] + 2) * bh / g)), bh)
        c0, c1 = max(int(np.floor((cols[0] - 1) * bw / g)), 0), min(int(np.ceil((cols[-1] + 2) * bw / g)), bw)
        d = cv2.resize(disp, (bw, bh), interpolation=cv2.INTER_LINEAR)[r0:r1, c0:c1]
        mx, my = self.identity[0][r0:r1, c0:c1] + d[..., 0], self.identity[1][r0:r1, c0:c1] + d[..., 1]
        interp = cv2.INTER_CUBIC if self.cubic else cv2.INTER_LINEAR
        out[self.y0 + r0 : self.y0 + r1, self.x0 + c0 : self.x0 + c1] = cv2.remap(self.box_pixels, mx, my, interp,
                                                                                   borderMode=cv2.BORDER_REPLICATE)
        return out
