"""The synthetic face rig: a photo's FaceMesh points warped per speaker look, a mouth opened by an
openness value, blinks and head motion, rendered frame by frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np


@dataclass(frozen=True)
class SpeakerLook:
    """How one synthetic speaker differs from the photograph."""

    mirror: bool
    face_fraction: float  # face width as a fraction of the frame width
    centre: tuple[float, float]  # face centre in frame fractions
    hue_shift: int
    saturation: float
    brightness: float
    background: tuple[int, int, int]


_UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)


_LOWER_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)


_EYES = ((33, 133, 159, 145), (362, 263, 386, 374))  # corners, upper lid, lower lid


@lru_cache(maxsize=1)
def _photo_and_landmarks() -> tuple[np.ndarray, np.ndarray]:
    """The astronaut photograph (RGB) and its 468 FaceMesh landmarks in pixels, found once per process."""
    import mediapipe as mp
    from skimage import data

    photo = np.ascontiguousarray(data.astronaut())
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1) as mesh:
        result = mesh.process(photo)
    if not result.multi_face_landmarks:
        raise RuntimeError("FaceMesh found no face in skimage's astronaut photograph")
    h, w = photo.shape[:2]
    pts = np.array([[p.x * w, p.y * h] for p in result.multi_face_landmarks[0].landmark], np.float32)
    return photo, pts


@dataclass
class FaceRig:
    """One speaker's still face and the geometry needed to open the jaw and close the eyes."""

    image: np.ndarray  # (S,S,3) uint8 RGB
    landmarks: np.ndarray  # (468,2) in image pixels
    mouth_width: float
    max_opening: float
    roi: tuple[int, int, int, int] = field(default=(0, 0, 0, 0))  # x0,y0,x1,y1 of the jaw warp

    @property
    def centre(self) -> tuple[float, float]:
        return tuple(self.landmarks.mean(axis=0))  # type: ignore[return-value]


def _look_transform(look: SpeakerLook, photo_pts: np.ndarray, size: int) -> np.ndarray:
    """2x3 affine from photograph to frame: zoom the face to `face_fraction`, centre it, mirror."""
    lo, hi = photo_pts.min(axis=0), photo_pts.max(axis=0)
    scale = look.face_fraction * size / float(hi[0] - lo[0])
    cx, cy = (lo + hi) / 2
    tx, ty = look.centre[0] * size, look.centre[1] * size
    m = np.array([[scale, 0, tx - scale * cx], [0, scale, ty - scale * cy]], np.float64)
    if look.mirror:
        m = np.array([[-1, 0, size], [0, 1, 0]], np.float64) @ np.vstack([m, [0, 0, 1]])
    return m


def _recolour(image: np.ndarray, look: SpeakerLook, face_hull: np.ndarray) -> np.ndarray:
    """Hue/saturation/brightness change, and a new background outside the head."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + look.hue_shift) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * look.saturation, 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * look.brightness, 0, 255)
    out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    # Background: pale low-saturation pixels (the studio backdrop) away from the face get a new colour.
    s, v = hsv[..., 1], hsv[..., 2]
    backdrop = ((s < 60) & (v > 150)).astype(np.uint8)
    head = np.zeros_like(backdrop)
    hull = cv2.convexHull(face_hull.astype(np.int32))
    centre, axes = hull.mean(axis=(0, 1)), np.ptp(hull.reshape(-1, 2), axis=0)
    cv2.ellipse(
        head,
        (int(centre[0]), int(centre[1] - 0.15 * axes[1])),
        (int(axes[0] * 0.85), int(axes[1] * 0.95)),
        0,
        0,
        360,
        1,
        -1,
    )
    mask = cv2.GaussianBlur((backdrop & (1 - head)).astype(np.float32), (0, 0), 2.0)[..., None]
    gradient = np.linspace(0.8, 1.1, out.shape[0], dtype=np.float32)[:, None, None]
    bg = np.clip(np.array(look.background, np.float32)[None, None, :] * gradient, 0, 255)
    return np.clip(out * (1 - mask) + bg * mask, 0, 255).astype(np.uint8)


def build_rig(look: SpeakerLook, size: int, max_opening: float) -> FaceRig:
    """Place the photograph in a size×size frame with the speaker's look; landmarks follow."""
    photo, pts = _photo_and_landmarks()
    m = _look_transform(look, pts, size)
    image = cv2.warpAffine(photo, m, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT101)
    landmarks = (np.hstack([pts, np.ones((len(pts), 1), np.float32)]) @ m.T).astype(np.float32)
    image = _recolour(image, look, landmarks)
    mouth_width = float(np.linalg.norm(landmarks[61] - landmarks[291]))
    rig = FaceRig(image=image, landmarks=landmarks, mouth_width=mouth_width, max_opening=max_opening)
    cx = float(landmarks[[13, 14], 0].mean())
    top = float(landmarks[list(_UPPER_INNER), 1].min()) - 2
    chin = float(landmarks[152, 1])
    rig.roi = (
        max(0, int(cx - 1.6 * mouth_width)),
        max(0, int(top)),
        min(size, int(cx + 1.6 * mouth_width) + 1),
        min(size, int(chin + 1.2 * mouth_width) + 1),
    )
    return rig


def _curve_y(points: np.ndarray, xs: np.ndarray) -> np.ndarray:
    order = np.argsort(points[:, 0])
    return np.interp(xs, points[order, 0], points[order, 1])


def open_mouth(rig: FaceRig, openness: float) -> np.ndarray:
    """The rig's face with the jaw dropped by `openness` (0..1): lower lip and chin move down, the gap
    between the lips shows the dark mouth interior (upper teeth stay with the upper lip)."""
    frame = rig.image.copy()
    if openness <= 1e-3:
        return frame
    x0, y0, x1, y1 = rig.roi
    lm = rig.landmarks
    mw = rig.mouth_width
    xs = np.arange(x0, x1, dtype=np.float32)
    ys = np.arange(y0, y1, dtype=np.float32)
    gx, gy = np.meshgrid(xs, ys)
    cx = float(lm[[13, 14], 0].mean())
    left, right = sorted((float(lm[78, 0]), float(lm[308, 0])))
    half_inner = max((right - left) / 2, 1.0)
    amplitude = openness * rig.max_opening * mw
    u = np.clip((xs - cx) / half_inner, -1, 1)
    gap = amplitude * np.sqrt(np.clip(1 - u**2, 0, 1)) * (np.abs(xs - cx) < half_inner)  # lens-shaped opening
    jaw = amplitude * np.cos(np.clip((xs - cx) / (1.5 * mw), -1, 1) * np.pi / 2) ** 2  # chin drop, wider
    lower_lip = _curve_y(lm[list(_LOWER_INNER)], xs)
    chin = float(lm[152, 1])
    below = gy - lower_lip[None, :]
    ramp = np.clip(below / (0.6 * mw), 0, 1)
    shift = gap[None, :] + (jaw - gap)[None, :] * ramp
    fade = 1 - np.clip((gy - chin) / (0.9 * mw), 0, 1)
    shift = shift * fade
    in_gap = (below >= 0) & (below < gap[None, :])
    map_y = np.where(below < 0, gy, np.where(in_gap, lower_lip[None, :], gy - shift)).astype(np.float32)
    roi = cv2.remap(frame, gx, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # Mouth interior with soft edges, darker at the centre.
    alpha = (np.clip(np.minimum(below, gap[None, :] - below) + 0.5, 0, 1) * (gap[None, :] > 0.5))[..., None]
    depth = np.clip(1 - np.abs(below - gap[None, :] / 2) / (gap[None, :] / 2 + 1e-3), 0, 1)[..., None]
    interior = np.array([95, 38, 42], np.float32) * (1 - 0.6 * depth)
    roi = roi.astype(np.float32) * (1 - alpha) + interior * alpha
    frame[y0:y1, x0:x1] = np.clip(roi, 0, 255).astype(np.uint8)
    return frame


def close_eyes(frame: np.ndarray, rig: FaceRig, amount: float) -> np.ndarray:
    """Lower both upper eyelids by `amount` (0 open .. 1 closed) with skin colour from above the eye."""
    if amount <= 1e-3:
        return frame
    lm = rig.landmarks
    h, w = frame.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for a, b, top, bottom in _EYES:
        cx, half_w = (lm[a, 0] + lm[b, 0]) / 2, abs(lm[a, 0] - lm[b, 0]) * 0.6
        y_top, y_bottom = float(lm[top, 1]), float(lm[bottom, 1])
        eye_h = max(y_bottom - y_top, 2.0)
        cy = (y_top + y_bottom) / 2
        cheek = frame[
            int(y_bottom + eye_h * 1.5) : int(y_bottom + eye_h * 2) + 1,
            int(cx - half_w / 3) : int(cx + half_w / 3) + 1,
        ]
        skin = np.median(cheek.reshape(-1, 3), axis=0) if cheek.size else np.array([200, 160, 140])
        inside = ((xx - cx) / half_w) ** 2 + ((yy - cy) / (eye_h * 1.1)) ** 2 <= 1
        lid_edge = y_top - 0.3 * eye_h + amount * 1.6 * eye_h
        lid = (inside & (yy <= lid_edge)).astype(np.float32)
        alpha = cv2.GaussianBlur(lid, (0, 0), 0.8)[..., None]
        frame = (frame * (1 - alpha) + 0.85 * skin.astype(np.float32) * alpha).astype(np.uint8)
    return frame


def head_motion(n_frames: int, fps: float, rng: np.random.Generator) -> np.ndarray:
    """Small natural head motion: (n_frames, 3) of rotation degrees, dx, dy pixels as smooth sinusoid sums."""
    t = np.arange(n_frames) / fps
    out = np.zeros((n_frames, 3), np.float64)
    for k, amp in enumerate((1.5, 2.0, 1.5)):
        for _ in range(2):
            f, phase = rng.uniform(0.15, 0.6), rng.uniform(0, 2 * np.pi)
            out[:, k] += amp / 2 * np.sin(2 * np.pi * f * t + phase)
    return out


def blink_track(n_frames: int, fps: float, rng: np.random.Generator) -> np.ndarray:
    """Eyelid closure per frame: a blink (about 160 ms) every 2 to 5 seconds."""
    closure = np.zeros(n_frames)
    t = rng.uniform(0.5, 2.0)
    while t * fps < n_frames:
        centre = t * fps
        idx = np.arange(n_frames)
        closure = np.maximum(closure, np.clip(1 - np.abs(idx - centre) / (0.08 * fps), 0, 1))
        t += rng.uniform(2.0, 5.0)
    return closure


def render_frames(rig: FaceRig, openness: np.ndarray, blinks: np.ndarray, motion: np.ndarray) -> np.ndarray:
    """All frames of a clip: jaw opening, blinks, then the whole head moved slightly."""
    size = rig.image.shape[0]
    cx, cy = rig.centre
    frames = np.empty((len(openness), size, size, 3), np.uint8)
    for i, (o, b, (rot, dx, dy)) in enumerate(zip(openness, blinks, motion, strict=True)):
        face = close_eyes(open_mouth(rig, float(o)), rig, float(b))
        m = cv2.getRotationMatrix2D((cx, cy), rot, 1.0)
        m[:, 2] += (dx, dy)
        frames[i] = cv2.warpAffine(
            face, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101
        )
    return frames
