"""An avatar: a portrait prepared once (face found, aligned, its mouth-region latent encoded)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from engine.errors import UnreadableMediaError
from engine.face.align import AlignConfig, fit_transform, warp_to_crop
from engine.face.landmarks import FaceOptions, landmarks_for_image
from engine.face.region import LOWER_FACE, Region, extract_patch, patch_mask, to_patch_units

MAX_SIDE_PX = 1280  # portraits are scaled down to this longest side (the output video's size)


def load_portrait(path: str | Path, *, max_side_px: int = MAX_SIDE_PX) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3) with even sides, scaled down to ``max_side_px``."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableMediaError(f"{path}: no such portrait file")
    return decode_portrait(np.fromfile(path, dtype=np.uint8), what=str(path), max_side_px=max_side_px)


def decode_portrait(data: bytes | np.ndarray, *, what: str = "portrait", max_side_px: int = MAX_SIDE_PX) -> np.ndarray:
    """Encoded image bytes (an upload, a file's content) as :func:`load_portrait` returns them."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if bgr is None:
        raise UnreadableMediaError(f"{what}: not a readable image (PNG, JPEG, WebP, BMP, ...)")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    s = min(1.0, max_side_px / max(h, w))
    if s < 1.0:
        rgb = cv2.resize(rgb, (int(w * s), int(h * s)), interpolation=cv2.INTER_AREA)
    h, w = rgb.shape[:2]
    return np.ascontiguousarray(rgb[: h - h % 2, : w - w % 2])


@dataclass
class Avatar:
    image: np.ndarray  # (H, W, 3) uint8 RGB, the full portrait (every output frame starts from it)
    affine: np.ndarray  # (2, 3) image -> crop similarity
    crop: np.ndarray  # (S, S, 3) uint8 aligned crop
    landmarks: np.ndarray  # (478, 2) landmarks in crop units
    latent: torch.Tensor  # (1, C, s, s) the patch's latent
    notes: list[str]
    region: Region = field(default=LOWER_FACE)  # the generated patch (the bundle's)

    @property
    def crop_size_px(self) -> int:
        return self.crop.shape[0]

    def landmarks_patch_units(self) -> np.ndarray:
        """All landmarks in landmark units (the lower_face square's, whatever the region)."""
        return to_patch_units(self.landmarks)

    def mask(self) -> np.ndarray:
        """The region's repaint mask (P, P) of the portrait itself."""
        return patch_mask(self.landmarks * self.crop_size_px, self.crop_size_px, region=self.region)

    def patch(self) -> np.ndarray:
        """The region's patch (P, P, 3) of the aligned crop."""
        return extract_patch(self.crop, self.region)


def encode_patch(runtime, patch: np.ndarray) -> torch.Tensor:
    """(P, P, 3) uint8 mouth-region patch -> its latent (1, C, s, s), by the runtime's encoder graph."""
    x = np.ascontiguousarray(patch, dtype=np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0  # (1, 3, P, P) in [-1, 1]
    return torch.from_numpy(runtime["encoder"].infer({"image": x.astype(np.float32)})["z"])


def prepare_avatar(image: np.ndarray, runtime, *, crop_size_px: int | None = None, opts: FaceOptions = FaceOptions(),
                   what: str = "portrait") -> Avatar:
    """Find the face (raises NoFaceError, MultipleFacesError, FaceTooSmallError...), align, encode
    (``runtime``: an ``engine.runtime.Runtime``). The crop size and the region are the runtime's
    bundle's (``crop_size_px`` overrides the size; 256 without a bundle)."""
    bundle = getattr(runtime, "bundle", None)
    region = bundle.region if bundle is not None else LOWER_FACE
    if crop_size_px is None:
        crop_size_px = bundle.crop_size_px if bundle is not None else 256
    lm, notes = landmarks_for_image(image, opts, what=what)
    cfg = AlignConfig(crop_size_px=crop_size_px, stabilise_sigma_frames=0.0)
    m = fit_transform(lm, cfg)
    crop = warp_to_crop(image, m, cfg)
    lm_crop = (lm[:, :2] @ m[:, :2].T + m[:, 2]) / crop_size_px
    return Avatar(image, m, crop, lm_crop.astype(np.float32), encode_patch(runtime, extract_patch(crop, region)), notes, region)
