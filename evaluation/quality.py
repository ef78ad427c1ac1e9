"""Visual quality of a talking-face video: fidelity, mouth sharpness, temporal stability, upper-face consistency.

All functions take RGB frames (T, H, W, 3) uint8 and FaceMesh landmarks (T, 468, 3) in frame pixels (NaN
where no face), as `pipeline.landmarks` produces them. Regions (mouth, upper face) are cut per frame from
the landmarks and resized to a fixed size, so numbers compare across resolutions and face sizes.

- PSNR / SSIM against a reference video (e.g. the ground-truth frames of a re-dubbed clip).
- Mouth sharpness: variance of the Laplacian of the mouth region; as a ratio to the same measure on the
  source video's mouth (a generator that blurs the mouth scores < 1), and to the output's own eye region.
- Temporal stability: landmark jitter (distance of the raw landmarks from their temporally smoothed track,
  in inter-ocular units) and mouth flicker (mean absolute second temporal difference of the aligned mouth
  region: smooth motion is near zero, frame-to-frame flicker is not).
- Upper-face consistency with the source: the mean shape of brows and eyes (aligned on the eye corners,
  inter-ocular units) and how brow raises and eye openness move (correlation, and the ratio of their
  ranges: below 1 means the output flattened the expression).
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np
from scipy.signal import savgol_filter

from evaluation.sync import pearson
from pipeline.expression import aligned
from pipeline.landmarks import (
    LEFT_BROW_POINTS,
    LEFT_EYE_POINTS,
    LIPS_POINTS,
    RIGHT_BROW_POINTS,
    RIGHT_EYE_POINTS,
    UPPER_FACE_POINTS,
    inter_ocular,
)

REGION_SIZE = (96, 48)  # (width, height) every measured region is resized to
EYE_LIDS = ((159, 145), (386, 374))  # (upper, lower) lid centre of the right and left eye
PSNR_CAP = 100.0  # identical frames give +inf; capped so tables and Parquet stay finite


def sample_indices(n: int, max_frames: int) -> np.ndarray:
    """At most `max_frames` evenly spaced frame indices of 0..n-1."""
    if n <= max_frames:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_frames).round().astype(int))


# --- fidelity -------------------------------------------------------------------------------------------
def psnr_ssim(frames: np.ndarray, reference: np.ndarray, max_frames: int = 50) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM over frames common to both videos (reference resized to the frames' size)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    n = min(len(frames), len(reference))
    if n == 0:
        return {"psnr": float("nan"), "ssim": float("nan")}
    h, w = frames.shape[1:3]
    psnrs, ssims = [], []
    for i in sample_indices(n, max_frames):
        ref = reference[i]
        if ref.shape[:2] != (h, w):
            ref = cv2.resize(ref, (w, h), interpolation=cv2.INTER_AREA)
        psnrs.append(min(peak_signal_noise_ratio(ref, frames[i], data_range=255), PSNR_CAP))
        ssims.append(structural_similarity(ref, frames[i], channel_axis=-1, data_range=255))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}


# --- regions --------------------------------------------------------------------------------------------
def region_box(points: np.ndarray, margin: float = 0.25) -> np.ndarray:
    """(x0, y0, x1, y1) around (N, 2+) points, widened by `margin` x the width on every side."""
    lo, hi = points[:, :2].min(axis=0), points[:, :2].max(axis=0)
    pad = margin * (hi[0] - lo[0])
    return np.array([lo[0] - pad, lo[1] - pad, hi[0] + pad, hi[1] + pad])


def region_crops(
    frames: np.ndarray, landmarks: np.ndarray, points: tuple[int, ...], indices: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Grey (N, h, w) float32 crops of a landmark region resized to REGION_SIZE, and the frame indices used."""
    indices = np.arange(len(frames)) if indices is None else indices
    height, width = frames.shape[1:3]
    crops, used = [], []
    for t in indices:
        pts = landmarks[t, list(points)]
        if not np.isfinite(pts[:, :2]).all():
            continue
        x0, y0, x1, y1 = region_box(pts).round().astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        grey = cv2.cvtColor(np.ascontiguousarray(frames[t, y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
        crops.append(cv2.resize(grey, REGION_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32))
        used.append(t)
    empty = np.zeros((0, REGION_SIZE[1], REGION_SIZE[0]), np.float32)
    return (np.stack(crops) if crops else empty), np.asarray(used, int)


def laplacian_variance(crops: np.ndarray) -> float:
    """Mean over crops of the variance of the Laplacian (focus measure; higher is sharper)."""
    if len(crops) == 0:
        return float("nan")
    return float(np.mean([cv2.Laplacian(c, cv2.CV_32F).var() for c in crops]))


def sharpness(frames: np.ndarray, landmarks: np.ndarray, max_frames: int = 50) -> dict[str, float]:
    """Sharpness of the mouth and of the upper face (brows and eyes) over sampled frames."""
    idx = sample_indices(len(frames), max_frames)
    mouth, _ = region_crops(frames, landmarks, LIPS_POINTS, idx)
    upper, _ = region_crops(frames, landmarks, UPPER_FACE_POINTS, idx)
    m, u = laplacian_variance(mouth), laplacian_variance(upper)
    return {"mouth_sharpness": m, "upper_face_sharpness": u, "mouth_to_face_sharpness": _ratio(m, u)}


def _ratio(a: float, b: float) -> float:
    return float(a / b) if np.isfinite(a) and np.isfinite(b) and b > 1e-9 else float("nan")


# --- temporal stability ---------------------------------------------------------------------------------
def landmark_jitter(landmarks: np.ndarray, window: int = 7) -> float:
    """Median over frames of the mean distance of raw landmarks from a smoothed track, in inter-ocular units."""
    xy = landmarks[..., :2].astype(np.float64)
    valid = np.isfinite(xy).all(axis=(1, 2))
    runs = _runs(valid)
    residuals = []
    for a, b in runs:
        if b - a < window:
            continue
        smooth = savgol_filter(xy[a:b], window, 2, axis=0, mode="interp")
        dist = np.linalg.norm(xy[a:b] - smooth, axis=-1).mean(axis=1)
        residuals.append(dist / inter_ocular(landmarks[a:b]))
    return float(np.median(np.concatenate(residuals))) if residuals else float("nan")


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def mouth_flicker(frames: np.ndarray, landmarks: np.ndarray) -> float:
    """Mean |x[t+1] - 2 x[t] + x[t-1]| / 255 of the aligned mouth region over consecutive face frames."""
    crops, used = region_crops(frames, landmarks, LIPS_POINTS)
    if len(crops) < 3:
        return float("nan")
    consecutive = (np.diff(used[:-1]) == 1) & (np.diff(used[1:]) == 1)
    second = np.abs(crops[2:] - 2 * crops[1:-1] + crops[:-2]).mean(axis=(1, 2))[consecutive]
    return float(second.mean() / 255.0) if len(second) else float("nan")


# --- upper face -----------------------------------------------------------------------------------------
def brow_raise(landmarks: np.ndarray) -> np.ndarray:
    """(T,) mean height of each brow above its eye, in inter-ocular units."""
    sides = ((RIGHT_BROW_POINTS, RIGHT_EYE_POINTS), (LEFT_BROW_POINTS, LEFT_EYE_POINTS))
    heights = [
        aligned(landmarks, eye)[..., 1].mean(1) - aligned(landmarks, brow)[..., 1].mean(1)
        for brow, eye in sides
    ]
    return np.mean(heights, axis=0)


def eye_openness(landmarks: np.ndarray) -> np.ndarray:
    """(T,) mean lid gap of both eyes, in inter-ocular units."""
    iod = inter_ocular(landmarks)
    gaps = [np.linalg.norm(landmarks[:, a, :2] - landmarks[:, b, :2], axis=1) for a, b in EYE_LIDS]
    return np.mean(gaps, axis=0) / iod


def expression_motion(landmarks: np.ndarray) -> float:
    """How much the upper face moves: std of brow raise plus std of eye openness (face frames only)."""
    return float(np.nanstd(brow_raise(landmarks)) + np.nanstd(eye_openness(landmarks)))


def upper_face_consistency(output: np.ndarray, source: np.ndarray) -> dict[str, float]:
    """Brow/eye geometry and motion of the output's landmarks against the source's (frame t with frame t)."""
    n = min(len(output), len(source))
    out, src = output[:n], source[:n]
    with warnings.catch_warnings():  # frames without a face are NaN and skipped
        warnings.simplefilter("ignore", RuntimeWarning)
        shape_out = np.nanmean(aligned(out, UPPER_FACE_POINTS), axis=0)
        shape_src = np.nanmean(aligned(src, UPPER_FACE_POINTS), axis=0)
    return {
        "upper_face_shape_distance": float(np.linalg.norm(shape_out - shape_src, axis=1).mean()),
        "brow_motion_correlation": pearson(brow_raise(out), brow_raise(src)),
        "eye_motion_correlation": pearson(eye_openness(out), eye_openness(src)),
        "upper_face_motion_ratio": _ratio(expression_motion(out), expression_motion(src)),
    }
