"""Face detection and dense (478-point) landmarks, from MediaPipe 0.10.21's bundled models.

Why MediaPipe: it is the one package here that ships both a detector and a dense mesh with
their weights (FACTS.md: 478 points with iris refinement, ~3 ms/frame on this CPU, every
frame of the real clips detected). dlib's 68 points are too sparse for lips and too slow to
detect (11-49 ms).

Two models are combined:
- the *full-range* BlazeFace detector finds every face in the whole frame, also small ones
  (a full-body shot whose face is 12 % of the height);
- the face mesh runs on a square region of interest (ROI) around the chosen face, in video
  mode so that it tracks from frame to frame (less jitter, no per-frame detection cost).
The ROI is moved only when the face nears its edge (hysteresis), so it stays still while the
head moves a little.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from engine.errors import FaceTooSmallError, ImageTooLargeError, MultipleFacesError, NoFaceError

N_LANDMARKS = 478  # face mesh 468 + 10 iris points (refine_landmarks=True)


def _import_mediapipe():
    """Import MediaPipe lazily, with its C++ logging (GLOG/absl) limited to errors."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import mediapipe as mp

    return mp


@dataclass(frozen=True)
class FaceOptions:
    """How faces are found and which are accepted."""

    min_face_px: int = 48  # a detected face box shorter than this is refused (too small)
    max_image_pixels: int = 40_000_000  # larger images are refused before any work
    on_multiple: str = "largest"  # "largest": pick the biggest face and say so; "refuse": raise
    min_detection_confidence: float = 0.5  # detector score threshold
    min_tracking_confidence: float = 0.5  # face-mesh presence threshold while tracking
    roi_scale: float = 2.0  # ROI side as a multiple of the face's larger side
    roi_margin: float = 0.15  # move the ROI when the face comes this close (fraction) to its edge


@dataclass(frozen=True)
class FaceBox:
    """An axis-aligned face box in image pixels, with the detector's score."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


def check_image_size(rgb: np.ndarray, opts: FaceOptions, *, what: str = "image") -> None:
    """Refuse an image whose pixel count exceeds ``opts.max_image_pixels``."""
    h, w = rgb.shape[:2]
    if h * w > opts.max_image_pixels:
        raise ImageTooLargeError(
            f"{what} is {w}x{h} = {h * w / 1e6:.1f} MP, over the limit of "
            f"{opts.max_image_pixels / 1e6:.1f} MP; downscale it first"
        )


class FaceDetector:
    """Every face in a frame, largest first.

    BlazeFace full-range first (small faces in large frames); where it finds nothing, the
    short-range model (close-ups), then the full-range model on the frame padded by half its
    size on each side (very tight crops whose face fills the frame, as in VoxCeleb2 clips).
    """

    def __init__(self, opts: FaceOptions = FaceOptions()) -> None:
        mp = _import_mediapipe()
        self.opts = opts
        conf = opts.min_detection_confidence
        self._full = mp.solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=conf)
        self._short = mp.solutions.face_detection.FaceDetection(model_selection=0, min_detection_confidence=conf)

    @staticmethod
    def _run(det, rgb: np.ndarray, pad: int) -> list[FaceBox]:
        h, w = rgb.shape[:2]
        res = det.process(np.ascontiguousarray(rgb))
        boxes = []
        for d in res.detections or []:
            b = d.location_data.relative_bounding_box
            boxes.append(
                FaceBox(
                    x0=b.xmin * w - pad,
                    y0=b.ymin * h - pad,
                    x1=(b.xmin + b.width) * w - pad,
                    y1=(b.ymin + b.height) * h - pad,
                    score=float(d.score[0]),
                )
            )
        return boxes

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        boxes = self._run(self._full, rgb, 0) or self._run(self._short, rgb, 0)
        if not boxes:
            pad = max(rgb.shape[:2]) // 2
            padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)))
            boxes = self._run(self._full, padded, pad)
        return sorted(boxes, key=lambda b: b.area, reverse=True)

    def close(self) -> None:
        self._full.close()
        self._short.close()


def select_face(boxes: list[FaceBox], opts: FaceOptions, *, what: str = "image") -> tuple[FaceBox, str | None]:
    """Choose the face to animate; returns the box and a note for the user (or None).

    Raises NoFaceError, MultipleFacesError (when ``opts.on_multiple == "refuse"``) or
    FaceTooSmallError.
    """
    if not boxes:
        raise NoFaceError(f"no face found in {what}")
    note = None
    if len(boxes) > 1:
        if opts.on_multiple == "refuse":
            raise MultipleFacesError(
                f"{len(boxes)} faces found in {what}; crop the image to one face or allow "
                "picking the largest"
            )
        note = f"{len(boxes)} faces found in {what}; picked the largest ({boxes[0].height:.0f} px tall)"
    box = boxes[0]
    if box.height < opts.min_face_px:
        raise FaceTooSmallError(
            f"the face in {what} is {box.height:.0f} px tall, under the minimum of "
            f"{opts.min_face_px} px; use a larger or closer image"
        )
    return box, note


def _square_roi(cx: float, cy: float, side: float) -> tuple[int, int, int]:
    """A square ROI centred on (cx, cy): (x0, y0, side) in pixels; it may leave the image."""
    side_i = max(int(round(side)), 8)
    return int(round(cx - side_i / 2)), int(round(cy - side_i / 2)), side_i


def _extract_square(rgb: np.ndarray, roi: tuple[int, int, int]) -> np.ndarray:
    """The ROI's pixels, zero-padded where it leaves the image (the mesh wants a square)."""
    x0, y0, side = roi
    h, w = rgb.shape[:2]
    out = np.zeros((side, side, 3), dtype=rgb.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return out


class FaceTracker:
    """Dense landmarks for the frames of one video (or one still image, ``static=True``).

    ``track(rgb)`` returns (478, 3) float32 landmarks in image pixels (x, y, and z on the
    same scale as x, relative depth) or None where the face is lost. Call ``reset()`` at a
    camera cut so that the next frame is detected afresh.
    """

    def __init__(self, opts: FaceOptions = FaceOptions(), *, static: bool = False) -> None:
        mp = _import_mediapipe()

        self.opts = opts
        self._static = static
        self._mp = mp
        self._detector = FaceDetector(opts)
        self._mesh = self._new_mesh()
        self._roi: tuple[int, int, int] | None = None  # (x0, y0, side) in image pixels
        self._box_px = 0.0  # height of the last detected face box
        self.notes: list[str] = []  # user-facing notes (several faces, ...), most recent last

    def _new_mesh(self):
        return self._mp.solutions.face_mesh.FaceMesh(
            static_image_mode=self._static,
            max_num_faces=1,
            refine_landmarks=True,
            min_detection_confidence=self.opts.min_detection_confidence,
            min_tracking_confidence=self.opts.min_tracking_confidence,
        )

    def reset(self) -> None:
        """Forget the tracked face (after a camera cut or a lost face)."""
        self._roi = None
        self._mesh.close()
        self._mesh = self._new_mesh()

    def _acquire(self, rgb: np.ndarray, what: str) -> None:
        box, note = select_face(self._detector.detect(rgb), self.opts, what=what)
        if note:
            self.notes.append(note)
        self._box_px = box.height
        side = self.opts.roi_scale * max(box.width, box.height)
        self._roi = _square_roi((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2, side)

    def track(self, rgb: np.ndarray, *, what: str = "frame") -> np.ndarray | None:
        """Landmarks of the chosen face, or None when it is lost (then re-detected next call).

        For a still image (``static=True``) a missing face raises instead of returning None.
        A face shorter than ``min_face_px`` (by its landmarks, forehead to chin) raises
        FaceTooSmallError in both modes.
        """
        check_image_size(rgb, self.opts, what=what)
        if self._roi is None:
            try:
                self._acquire(rgb, what)
            except NoFaceError:
                if self._static:
                    raise
                return None
        x0, y0, side = self._roi
        res = self._mesh.process(_extract_square(rgb, self._roi))
        if not res.multi_face_landmarks:
            self.reset()
            if self._static and self._box_px < 2 * self.opts.min_face_px:
                raise FaceTooSmallError(
                    f"the face in {what} is about {self._box_px:.0f} px tall, too small to fit landmarks; "
                    f"faces of at least {2 * self.opts.min_face_px} px work reliably"
                )
            if self._static:
                raise NoFaceError(f"a face was detected in {what} but its landmarks could not be fitted")
            return None
        lm = res.multi_face_landmarks[0].landmark
        pts = np.array([(p.x * side + x0, p.y * side + y0, p.z * side) for p in lm], dtype=np.float32)  # (478, 3)
        self._maybe_move_roi(pts)
        face_px = float(np.ptp(pts[:, 1]))  # forehead to chin, in image pixels
        if face_px < self.opts.min_face_px:
            raise FaceTooSmallError(
                f"the face in {what} is {face_px:.0f} px tall, under the minimum of "
                f"{self.opts.min_face_px} px; use a larger or closer image"
            )
        return pts

    def _maybe_move_roi(self, pts: np.ndarray) -> None:
        """Re-centre the ROI when the face nears its edge or its scale changed a lot."""
        x0, y0, side = self._roi
        fx0, fy0 = pts[:, 0].min(), pts[:, 1].min()
        fx1, fy1 = pts[:, 0].max(), pts[:, 1].max()
        want_side = self.opts.roi_scale * max(fx1 - fx0, fy1 - fy0)
        m = self.opts.roi_margin * side
        near_edge = min(fx0 - x0, fy0 - y0, x0 + side - fx1, y0 + side - fy1) < m
        if near_edge or not (0.75 < want_side / side < 1.33):
            self._roi = _square_roi((fx0 + fx1) / 2, (fy0 + fy1) / 2, want_side)

    def close(self) -> None:
        self._mesh.close()
        self._detector.close()

    def __enter__(self) -> "FaceTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def landmarks_for_image(rgb: np.ndarray, opts: FaceOptions = FaceOptions(), *, what: str = "image") -> tuple[np.ndarray, list[str]]:
    """(478, 3) landmarks of the chosen face in a still image, and notes for the user."""
    with FaceTracker(opts, static=True) as tr:
        pts = tr.track(rgb, what=what)
        return pts, list(tr.notes)
