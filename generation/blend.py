"""Blending: a feathered mask over the mouth (from landmarks, inside the lower half of the face crop),
colour matching of the generated crop to the frame, and pasting back through
`pipeline.crops.paste_back_transform`, done on 4:2:0 frames (`blend_i420`) so that every sample the
mask does not reach keeps its decoded value and only pays x264's quantisation on re-encoding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.crops import crop_face, paste_back_transform
from pipeline.landmarks import (
    CHIN_POINT,
    LIPS_POINTS,
    NOSE_TIP_POINT,
)

# Mesh points the blend mask is built from, in this order: the lips, then the nose tip, then the chin.
MOUTH_POINTS: tuple[int, ...] = (*LIPS_POINTS, NOSE_TIP_POINT, CHIN_POINT)

BLEND_REGIONS = ("mouth", "jaw")
JAW_HALF_WIDTH = 0.42  # the jaw region's half-width as a share of the crop side


@dataclass(frozen=True)
class BlendConfig:
    """How the generated crop goes back into the frame."""

    mouth_scale: float = 1.5  # mask half-width as a multiple of half the mouth-corner distance
    feather: float = 0.05  # Gaussian feather sigma as a fraction of the crop side
    color_match: bool = True  # match the generated skin's LAB mean/std to the source's under the mask
    max_gain: float = 1.5  # limit on the colour match's std ratio (either way)
    # mouth: an ellipse around the lips down to the source's chin (sharpest; the source's jaw still moves
    # with the source's speech). jaw: down to the crop's bottom and JAW_HALF_WIDTH wide, so the generated
    # chin and jaw replace the source's, as the reference's whole-crop paste does.
    region: str = "mouth"


def mouth_mask(points: np.ndarray, size: int, cfg: BlendConfig) -> np.ndarray:
    """(size, size) float32 mask in [0, 1]: a feathered ellipse from below the nose to the chin (region
    mouth) or to the crop's bottom edge and most of its width (region jaw).

    `points` are MOUTH_POINTS in crop pixels (lips, nose tip, chin). The mask is exactly 0 in the upper
    half of the crop, so only the half Wav2Lip redraws is touched; the mouth region also stays 0 near the
    crop's sides, the jaw region fades to a few per cent there.
    """
    lips, nose, chin = points[: len(LIPS_POINTS), :2], points[-2, :2], points[-1, :2]
    sigma = max(cfg.feather * size, 0.5)
    margin = 2.0 * sigma
    half_w = 0.5 * (lips[:, 0].max() - lips[:, 0].min()) * cfg.mouth_scale
    cx = float(np.clip(lips[:, 0].mean(), margin, size - margin))
    half_w = min(half_w, cx - margin, size - margin - cx)
    top = max(0.5 * (nose[1] + lips[:, 1].min()), size / 2 + margin)
    bottom = min(max(chin[1], lips[:, 1].max()), size - margin)
    if cfg.region == "jaw":
        half_w = min(JAW_HALF_WIDTH * size, cx - margin, size - margin - cx)
        bottom = size - margin
    mask = np.zeros((size, size), np.float32)
    if half_w <= 1 or bottom - top <= 2 or not np.isfinite([cx, half_w, top, bottom]).all():
        return mask
    centre = (int(round(cx * 16)), int(round((top + bottom) / 2 * 16)))
    axes = (int(round(half_w * 16)), int(round((bottom - top) / 2 * 16)))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 1.0, -1, lineType=cv2.LINE_AA, shift=4)
    mask = cv2.GaussianBlur(mask, (0, 0), sigma)
    mask[: size // 2] = 0.0
    mask[mask < 1e-3] = 0.0
    return mask


MOUTH_AREA_SCALE = 1.25  # the colour statistics leave out the lips' box, this much wider than the lips
MOUTH_AREA_DROP = 0.6  # and reaching this share of the lips-to-chin distance below the lips (an open jaw)
MIN_SKIN_WEIGHT = 16.0  # pixels of skin below which the whole mask's statistics are used


def skin_weights(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """`mask` with the mouth left out: the colour match's statistics come from the skin around it.

    Matched under the whole mask, an open generated mouth (dark inside) read as a darker face and was
    brightened towards the source frame's mouth, open or closed at that moment: the source's speech leaked
    into the generated mouth's contrast (demo seed 0's synth faces, one checkpoint: openness-envelope r
    0.30/0.49/0.66 for en/es/hi with the whole mask, 0.35/0.54/0.65 without any colour match, 0.35/0.53/0.69
    with the skin's; no real-video figure, as no trained full-size model exists here). On the 11 real dev
    clips the skin left is 26-1155 pixels of a 96 px crop per frame (first 50 frames each), so the whole
    mask's fallback (`MIN_SKIN_WEIGHT`) does not switch in and out from frame to frame. `points` are
    MOUTH_POINTS in crop pixels.
    """
    lips, chin = points[: len(LIPS_POINTS), :2], points[-1, :2]
    if not np.isfinite(lips).all() or not np.isfinite(chin).all():
        return mask
    cx, half_w = lips[:, 0].mean(), 0.5 * (lips[:, 0].max() - lips[:, 0].min()) * MOUTH_AREA_SCALE
    top, bottom = lips[:, 1].min(), lips[:, 1].max()
    bottom += MOUTH_AREA_DROP * max(chin[1] - bottom, 0.0)
    margin = 0.25 * max(bottom - top, 1.0)
    size_y, size_x = mask.shape
    rows = slice(max(0, int(top - margin)), min(size_y, int(math.ceil(bottom)) + 1))
    cols = slice(max(0, int(cx - half_w)), min(size_x, int(math.ceil(cx + half_w)) + 1))
    skin = mask.copy()
    skin[rows, cols] = 0.0
    return skin


def mask_support(mask: np.ndarray, margin: int = 2) -> tuple[slice, slice] | None:
    """Rows and columns of `mask`'s non-zero pixels, widened by `margin` (clipped); None when all zero.

    A bilinear warp of the crop reads at most one pixel beyond where its warped mask is non-zero (the
    default margin keeps one more), so a colour change confined to this box pastes exactly as one over
    the whole crop would.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    height, width = mask.shape
    return (
        slice(max(0, rows[0] - margin), min(height, rows[-1] + 1 + margin)),
        slice(max(0, cols[0] - margin), min(width, cols[-1] + 1 + margin)),
    )


def color_match(
    generated: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray,
    max_gain: float,
    stats_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Generated RGB crop with its LAB mean/std under `stats_mask` (default: `mask`) moved to the reference
    crop's (Reinhard); `skin_weights` leaves the mouth out of them.

    Only the mask's support (see `mask_support`) is converted; pixels outside it keep their values. With
    under `MIN_SKIN_WEIGHT` pixels of `stats_mask` the whole mask's statistics are used.
    """
    support = mask_support(mask)
    weights = mask[support].reshape(-1) if support else None
    if weights is None or weights.sum() < 1.0:
        return generated
    if stats_mask is not None:
        skin = stats_mask[support].reshape(-1)
        weights = skin if skin.sum() >= MIN_SKIN_WEIGHT else weights
    w = weights / weights.sum()
    region = generated[support]
    lab_g, lab_r = _lab(region).reshape(-1, 3), _lab(reference[support]).reshape(-1, 3)
    mean_g, mean_r = w @ lab_g, w @ lab_r
    std_g = np.sqrt(w @ np.square(lab_g - mean_g)) + 1e-3
    std_r = np.sqrt(w @ np.square(lab_r - mean_r)) + 1e-3
    gain = np.clip(std_r / std_g, 1.0 / max_gain, max_gain)
    matched = ((lab_g - mean_g) * gain + mean_r).reshape(region.shape).astype(np.float32)
    rgb = cv2.cvtColor(matched, cv2.COLOR_LAB2RGB)
    out = generated.copy()
    out[support] = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def _lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 CIELAB (L in 0..100)."""
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def paste_mouth(frame: np.ndarray, generated: np.ndarray, box: np.ndarray, mask: np.ndarray) -> None:
    """Blend a generated (size, size, 3) crop into `frame` in place through the feathered `mask`.

    Only the lower half of the face box is touched; pixels where the warped mask is 0 keep their values.
    """
    size = generated.shape[0]
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    rx0, rx1 = max(0, math.floor(x0)), min(width, math.ceil(x1) + 1)
    ry0, ry1 = max(0, math.floor((y0 + y1) / 2)), min(height, math.ceil(y1) + 1)
    if rx1 <= rx0 or ry1 <= ry0:
        return
    m = paste_back_transform(box, size)
    m[0, 2] -= rx0
    m[1, 2] -= ry0
    roi_size = (rx1 - rx0, ry1 - ry0)
    warped = cv2.warpAffine(generated, m, roi_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(mask, m, roi_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    alpha = alpha[..., None]
    roi = frame[ry0:ry1, rx0:rx1]
    blended = roi.astype(np.float32) * (1.0 - alpha) + warped.astype(np.float32) * alpha
    roi[:] = np.where(alpha > 0, np.clip(blended + 0.5, 0, 255), roi).astype(np.uint8)


def _even_roi(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Even-aligned (x0, y0, x1, y1) covering a box, clipped to the frame (4:2:0 chroma stays whole)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    rx0, ry0 = max(0, math.floor(x0)) & ~1, max(0, math.floor(y0)) & ~1
    rx1, ry1 = min(width, math.ceil(x1) + 2) & ~1, min(height, math.ceil(y1) + 2) & ~1
    return rx0, ry0, rx1, ry1


def _planes(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, U, V views of an I420 frame (H * 3 / 2, W)."""
    height, width = frame.shape[0] * 2 // 3, frame.shape[1]
    flat = frame.reshape(-1)
    quarter = (height // 2) * (width // 2)
    y = flat[: height * width].reshape(height, width)
    u = flat[height * width : height * width + quarter].reshape(height // 2, width // 2)
    v = flat[height * width + quarter :].reshape(height // 2, width // 2)
    return y, u, v


def blend_i420(
    frame: np.ndarray,
    generated: np.ndarray,
    box: np.ndarray,
    mask: np.ndarray,
    cfg: BlendConfig,
    stats_mask: np.ndarray | None = None,
) -> None:
    """Colour-match (statistics under `stats_mask`, default `mask`) and paste a generated RGB crop into an
    I420 frame in place.

    Only the face box is converted to RGB and back; Y/U/V samples whose pixels the paste did not change
    keep their decoded values exactly.
    """
    y, u, v = _planes(frame)
    rx0, ry0, rx1, ry1 = _even_roi(box, y.shape[1], y.shape[0])
    if rx1 - rx0 < 2 or ry1 - ry0 < 2:
        return
    cy0, cy1, cx0, cx1 = ry0 // 2, ry1 // 2, rx0 // 2, rx1 // 2
    i420 = np.concatenate(
        [y[ry0:ry1, rx0:rx1].ravel(), u[cy0:cy1, cx0:cx1].ravel(), v[cy0:cy1, cx0:cx1].ravel()]
    )
    rgb = cv2.cvtColor(i420.reshape(-1, rx1 - rx0), cv2.COLOR_YUV2RGB_I420)
    local = np.asarray(box, np.float64) - [rx0, ry0, rx0, ry0]
    size = generated.shape[0]
    if cfg.color_match:
        generated = color_match(generated, crop_face(rgb, local, size), mask, cfg.max_gain, stats_mask)
    before = rgb.copy()
    paste_mouth(rgb, generated, local, mask)
    changed = (rgb != before).any(axis=2)
    if not changed.any():
        return
    ny, nu, nv = _planes(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420))
    y[ry0:ry1, rx0:rx1][changed] = ny[changed]
    chroma = changed.reshape(changed.shape[0] // 2, 2, changed.shape[1] // 2, 2).any(axis=(1, 3))
    u[cy0:cy1, cx0:cx1][chroma] = nu[chroma]
    v[cy0:cy1, cx0:cx1][chroma] = nv[chroma]


def i420_to_rgb(frame: np.ndarray) -> np.ndarray:
    """(H * 3 / 2, W) I420 -> (H, W, 3) RGB (BT.601, as ffmpeg decodes untagged video)."""
    return cv2.cvtColor(frame, cv2.COLOR_YUV2RGB_I420)
