"""Square, temporally stable face crops from smoothed landmarks, and the affine to paste them back.

A box is (x0, y0, x1, y1) in frame pixels (x1 - x0 == y1 - y0). Crop pixel (u, v) of a ``size`` crop maps
to frame point (x0 + u * s, y0 + v * s) with s = (x1 - x0) / size; :func:`crop_faces`,
:func:`landmarks_in_crop` and :func:`paste_back_transform` all use this one mapping.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from pipeline.landmarks import NOSE_TIP_POINT, UPPER_FACE_OVAL_POINTS

_BORDERS = {"edge": cv2.BORDER_REPLICATE, "black": cv2.BORDER_CONSTANT}


def _finite_runs(valid: np.ndarray) -> list[tuple[int, int]]:
    padded = np.concatenate([[False], valid, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


# Forehead-to-chin height over forehead-to-nose-tip height with the mouth closed: median of the closed-mouth
# (lowest-openness fifth) frames per clip, 1.71-1.96 over the 11 real dev clips (median 1.82), 1.70-1.75 on synth.
CHIN_OVER_NOSE = 1.8


def raw_boxes(landmarks: np.ndarray, pad_bottom: float = 0.1, scale: float = 1.0) -> np.ndarray:
    """Per-frame square boxes (T, 4) from the points the jaw does not move; NaN without a face.

    Top: the forehead. Bottom: an estimated closed-mouth chin, ``CHIN_OVER_NOSE`` x forehead-to-nose-tip, plus
    ``pad_bottom`` x that height. Width: the face outline from ear to ear. The side is the larger of height
    and width, times ``scale``. Deriving the box from the real chin would move and resize it as the mouth
    opens, so the unmasked upper half of a crop would tell a generator how open the mouth is (measured on the
    demo corpus: eye height in the crop vs lip gap, median r -0.72), a cue it learns instead of the audio.
    Known cost on real video: a chin that drops below 1.98 x forehead-to-nose-tip (wide-open mouths on long
    faces) falls outside the crop: 16 % of frames over the 11 dev clips (worst clip 65 %; 0.2 % with
    chin-based boxes); the lips stay in the lower half (their top is >= 1.15 x, the half line 0.99 x).
    """
    xy = landmarks[..., :2].astype(np.float64)
    valid = np.isfinite(xy).all(axis=(1, 2))
    outline = xy[:, list(UPPER_FACE_OVAL_POINTS)]
    top = np.full(len(xy), np.nan)
    left, right = top.copy(), top.copy()
    top[valid] = outline[valid, :, 1].min(axis=1)
    left[valid], right[valid] = outline[valid, :, 0].min(axis=1), outline[valid, :, 0].max(axis=1)
    height = CHIN_OVER_NOSE * (xy[:, NOSE_TIP_POINT, 1] - top)
    bottom = top + (1 + pad_bottom) * height
    side = np.maximum(bottom - top, right - left) * scale
    cx, cy = (left + right) / 2, (top + bottom) / 2
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1)


def crop_boxes(
    landmarks_smoothed: np.ndarray,
    frame_shape: tuple[int, ...],
    pad_bottom: float = 0.1,
    scale: float = 1.0,
    window: int = 9,
) -> np.ndarray:
    """Stable square crop boxes (T, 4) float (x0, y0, x1, y1), like Wav2Lip's face box made square.

    Forehead to an estimated closed-mouth chin with ``pad_bottom`` x face height below it (see
    :func:`raw_boxes`: the box does not follow the jaw), so the mouth lies in the lower half. Centre and side
    are averaged over a centred ``window`` of frames within each run of face frames (a line is fitted at the
    run's ends, so steady motion is followed without lag). Boxes may extend past the frame; ``crop_faces`` pads. NaN without a face.
    ``frame_shape`` (H, W, ...) is accepted for callers that clamp or check; the boxes are not clipped.
    """
    from scipy.signal import savgol_filter  # here: scipy.signal costs 0.8 s to import

    del frame_shape  # boxes are deliberately not clipped: cropping pads instead, keeping them square
    boxes = raw_boxes(landmarks_smoothed, pad_bottom, scale)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = boxes[:, 2] - boxes[:, 0]
    valid = np.isfinite(side)
    for start, end in _finite_runs(valid):
        n = end - start
        w = min(window, n if n % 2 else n - 1)
        if w >= 3:  # a moving average inside the run, a fitted line at its ends (no lag at clip edges)
            centre[start:end] = savgol_filter(centre[start:end], w, 1, axis=0, mode="interp")
            side[start:end] = savgol_filter(side[start:end], w, 1, mode="interp")
    half = side[:, None] / 2
    return np.concatenate([centre - half, centre + half], axis=1)


def paste_back_transform(box: np.ndarray, size: int) -> np.ndarray:
    """2x3 affine taking crop pixel coordinates to frame coordinates.

    ``cv2.warpAffine(crop, M, (W, H))`` places a crop in frame space (use a warped mask to blend).
    """
    x0, y0, x1, _ = (float(v) for v in box)
    s = (x1 - x0) / size
    return np.array([[s, 0.0, x0], [0.0, s, y0]])


def crop_transform(box: np.ndarray, size: int) -> np.ndarray:
    """2x3 affine taking frame coordinates to crop pixel coordinates (inverse of paste_back_transform)."""
    return cv2.invertAffineTransform(paste_back_transform(box, size))


def landmarks_in_crop(landmarks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Landmarks (T, N, 2+) in frame pixels -> crop pixels of ``size`` crops; z is scaled like x."""
    boxes = np.asarray(boxes, np.float64)
    s = (size / (boxes[:, 2] - boxes[:, 0]))[:, None, None]
    out = np.array(landmarks, np.float64, copy=True)
    out[..., :2] = (out[..., :2] - boxes[:, None, :2]) * s
    out[..., 2:] = out[..., 2:] * s
    return out.astype(np.float32)


def crop_face(frame: np.ndarray, box: np.ndarray, size: int = 96, border: str = "edge") -> np.ndarray:
    """One (size, size, 3) crop; area-averages first when shrinking so small crops do not alias."""
    mode = _BORDERS[border]
    x0, y0, x1, y1 = (float(v) for v in box)
    s = size / (x1 - x0)
    if s >= 1.0:
        return cv2.warpAffine(
            frame, crop_transform(box, size), (size, size), flags=cv2.INTER_LINEAR, borderMode=mode
        )
    # Cut an integer region around the box (padded where it leaves the frame), area-shrink it to about
    # the crop's scale, then warp the small remainder with the exact sub-pixel mapping.
    ix0, iy0 = math.floor(x0) - 1, math.floor(y0) - 1
    ix1, iy1 = math.ceil(x1) + 2, math.ceil(y1) + 2
    region = _padded_region(frame, ix0, iy0, ix1, iy1, mode)
    rw, rh = max(1, round((ix1 - ix0) * s)), max(1, round((iy1 - iy0) * s))
    small = cv2.resize(region, (rw, rh), interpolation=cv2.INTER_AREA)
    sx, sy = rw / (ix1 - ix0), rh / (iy1 - iy0)
    # small pixel j has centre at region coordinate (j + 0.5) / sx - 0.5 (cv2.resize convention)
    m = np.array(
        [
            [s / sx, 0.0, (ix0 - 0.5 - x0) * s + 0.5 * s / sx],
            [0.0, s / sy, (iy0 - 0.5 - y0) * s + 0.5 * s / sy],
        ]
    )
    return cv2.warpAffine(small, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=mode)


def _padded_region(frame: np.ndarray, x0: int, y0: int, x1: int, y1: int, mode: int) -> np.ndarray:
    """frame[y0:y1, x0:x1] with out-of-frame parts filled by ``mode`` (edge replicate or black)."""
    h, w = frame.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx0 >= cx1 or cy0 >= cy1:  # box entirely outside the frame: nothing to show
        return np.zeros((y1 - y0, x1 - x0, frame.shape[2]), frame.dtype)
    inner = frame[cy0:cy1, cx0:cx1]
    return cv2.copyMakeBorder(inner, cy0 - y0, y1 - cy1, cx0 - x0, x1 - cx1, mode, value=0)


def crop_faces(frames: np.ndarray, boxes: np.ndarray, size: int = 96, border: str = "edge") -> np.ndarray:
    """(T, size, size, 3) uint8 crops of (T, H, W, 3) frames; frames whose box is NaN give black crops.

    ``border`` is how parts of a box outside the frame are filled: "edge" (replicate) or "black".
    """
    if border not in _BORDERS:
        raise ValueError(f"border must be one of {sorted(_BORDERS)}, got {border!r}")
    out = np.zeros((len(frames), size, size, frames.shape[-1]), np.uint8)
    for t, (frame, box) in enumerate(zip(frames, boxes, strict=True)):
        if np.all(np.isfinite(box)):
            out[t] = crop_face(frame, box, size, border)
    return out
