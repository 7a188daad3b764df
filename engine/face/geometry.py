"""Landmark index sets, the canonical face template, similarity fits and head pose.

Landmark indices are those of MediaPipe's 478-point face mesh; the sets are derived from
MediaPipe's own connection lists so that they are not retyped by hand.

The canonical template (``assets/face_template.npy``, (478, 3) float32) is the generalised
Procrustes mean of face-mesh landmarks over frames of the shared talking-head clips, turned
so that the eye line is horizontal and the face looks along -z, then normalised so that in
canonical 2-D coordinates (x, y in [0, 1] of the crop) the eye midpoint sits at
``EYE_CENTRE`` and the chin is ``EYE_TO_CHIN`` below it. ``scripts/build_face_template.py``
rebuilds it. Only the template's *shape* comes from data; nothing identifying is stored.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent / "assets"
TEMPLATE_PATH = ASSETS / "face_template.npy"

EYE_CENTRE = (0.5, 0.40)  # canonical (x, y) of the midpoint between the eyes, in crop units
EYE_TO_CHIN = 0.45  # canonical distance from the eye midpoint down to the chin (landmark 152)


def _indices(connections) -> np.ndarray:
    return np.array(sorted({i for edge in connections for i in edge}), dtype=np.int64)


# (upper, lower) inner-lip landmark pairs whose vertical distance is the mouth opening
OPENING_PAIRS = ((13, 14), (82, 87), (312, 317), (81, 178), (311, 402))


@lru_cache(maxsize=1)
def index_sets() -> dict[str, np.ndarray]:
    """Named landmark index sets (lips, inner lips, eyes, irises, oval, nose, alignment)."""
    from engine.face.landmarks import _import_mediapipe

    fm = _import_mediapipe().solutions.face_mesh
    lips = _indices(fm.FACEMESH_LIPS)
    inner = np.array([78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191])
    oval = _indices(fm.FACEMESH_FACE_OVAL)
    sets = {
        "lips": lips,
        "lips_inner": inner,
        "lips_outer": np.setdiff1d(lips, inner),
        "right_eye": _indices(fm.FACEMESH_RIGHT_EYE),
        "left_eye": _indices(fm.FACEMESH_LEFT_EYE),
        "right_iris": _indices(fm.FACEMESH_RIGHT_IRIS),
        "left_iris": _indices(fm.FACEMESH_LEFT_IRIS),
        "right_brow": _indices(fm.FACEMESH_RIGHT_EYEBROW),
        "left_brow": _indices(fm.FACEMESH_LEFT_EYEBROW),
        "oval": oval,
        "nose": _indices(fm.FACEMESH_NOSE),
    }
    # Points that do not move when the mouth opens or the eyes blink: the rigid upper face
    # (eye corners, nose bridge, temples, forehead). Used for the similarity alignment.
    sets["rigid"] = np.array([33, 133, 362, 263, 168, 6, 197, 195, 5, 4, 1, 127, 356, 234, 454, 10, 109, 338, 151, 9, 8, 70, 300, 105, 334])
    # Lower face for the mouth mask: the oval below the nose line plus the lips.
    return sets


def eye_centres(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) eye centres (subject's right is image left) as the mean of each eye ring."""
    s = index_sets()
    return lm[s["right_eye"], :].mean(0), lm[s["left_eye"], :].mean(0)


def umeyama(src: np.ndarray, dst: np.ndarray, *, allow_reflection: bool = False) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (scale s, rotation R, translation t) with dst ~ s R src + t.

    Umeyama 1991, "Least-squares estimation of transformation parameters between two point
    patterns", eqs. (38)-(42). Works in 2-D and 3-D: src, dst are (N, D).
    """
    n, d = src.shape
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs**2).sum() / n  # (40)
    cov = xd.T @ xs / n  # (38): (D, D)
    u, sig, vt = np.linalg.svd(cov)
    sgn = np.ones(d)
    if not allow_reflection and np.linalg.det(u) * np.linalg.det(vt) < 0:  # (39)
        sgn[-1] = -1
    rot = u @ np.diag(sgn) @ vt  # (40)
    scale = float((sig * sgn).sum() / var_s)  # (42)
    trans = mu_d - scale * rot @ mu_s  # (41)
    return scale, rot, trans


@lru_cache(maxsize=1)
def template() -> np.ndarray:
    """The canonical (478, 3) template: x, y in crop units [0, 1], z on the same scale."""
    if not TEMPLATE_PATH.is_file():
        raise FileNotFoundError(f"face template missing at {TEMPLATE_PATH}; run scripts/build_face_template.py")
    return np.load(TEMPLATE_PATH).astype(np.float64)


def normalise_template(mean3d: np.ndarray) -> np.ndarray:
    """Turn a Procrustes mean (478, 3) into canonical pose and units (see module docstring)."""
    r_eye, l_eye = eye_centres(mean3d)
    chin = mean3d[152]
    x_axis = l_eye - r_eye  # subject's right eye is on the image left
    x_axis /= np.linalg.norm(x_axis)
    down = chin - (r_eye + l_eye) / 2
    y_axis = down - x_axis * (down @ x_axis)
    y_axis /= np.linalg.norm(y_axis)
    z_axis = np.cross(x_axis, y_axis)
    rot = np.stack([x_axis, y_axis, z_axis])  # rows: new axes in old coordinates
    pts = (mean3d - (r_eye + l_eye) / 2) @ rot.T
    scale = EYE_TO_CHIN / pts[152, 1]
    pts = pts * scale
    pts[:, 0] += EYE_CENTRE[0]
    pts[:, 1] += EYE_CENTRE[1]
    return pts.astype(np.float32)


def head_pose_deg(lm: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) in degrees of 3-D landmarks (478, 3) relative to the template.

    The rotation R is the Umeyama fit of the template's rigid points onto the frame's (the
    mesh's coordinates are weak-perspective, so no camera model is needed), decomposed as
    R = Rz(roll) @ Rx(pitch) @ Ry(yaw) in image axes (x right, y down, z away from the
    camera). Seen on the shared clips: positive yaw is a face turned towards the image left,
    positive roll tilts the face clockwise on screen.
    """
    idx = index_sets()["rigid"]
    _, rot, _ = umeyama(template()[idx], lm[idx].astype(np.float64))
    # third row of Rz Rx Ry is (-cos p sin y, sin p, cos p cos y); R[0,1] = -sin r cos p, R[1,1] = cos r cos p
    yaw = np.degrees(np.arctan2(-rot[2, 0], rot[2, 2]))
    pitch = np.degrees(np.arcsin(np.clip(rot[2, 1], -1.0, 1.0)))
    roll = np.degrees(np.arctan2(-rot[0, 1], rot[1, 1]))
    return np.array([yaw, pitch, roll], dtype=np.float32)
