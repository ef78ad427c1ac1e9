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
    return _fitted_rig(image, landmarks, size, max_opening)


def _fitted_rig(image: np.ndarray, landmarks: np.ndarray, size: int, max_opening: float) -> FaceRig:
    """A rig whose mouth width and jaw-warp region are measured on `landmarks`."""
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


# Base expressions: FaceMesh points moved by (outward, up) in inter-ocular units. "Outward" is away from the
# mouth centre for lip points and towards the face's side for brows; the jaw then follows the speech.
_CORNERS = (61, 291, 78, 308)
_NEAR_CORNERS = (146, 91, 375, 321, 185, 40, 409, 270, 95, 191, 324, 415)
_CHEEKS = (50, 280, 205, 425, 187, 411, 123, 352, 117, 346, 118, 347, 101, 330, 36, 266)
_LOWER_LIDS = (145, 374, 153, 380, 144, 373)
_UPPER_LIDS = (159, 386, 158, 385, 160, 387, 157, 384, 161, 388)
_INNER_BROWS = (55, 285, 107, 336, 65, 295, 66, 296)
_MID_BROWS = (52, 282, 53, 283, 105, 334)
_OUTER_BROWS = (46, 276, 70, 300, 63, 293)
EXPRESSIONS: dict[str, tuple[tuple[tuple[int, ...], float, float], ...]] = {
    "neutral": (),
    "happy": (
        (_CORNERS, 0.15, 0.30),
        (_NEAR_CORNERS, 0.08, 0.17),
        (_CHEEKS, 0.0, 0.12),
        (_LOWER_LIDS, 0.0, 0.02),
    ),
    "sad": (
        (_CORNERS, -0.02, -0.27),
        (_NEAR_CORNERS, 0.0, -0.15),
        (_INNER_BROWS, -0.03, 0.18),
        (_MID_BROWS, 0.0, 0.08),
        (_OUTER_BROWS, 0.0, -0.04),
    ),
    "surprised": (
        (_INNER_BROWS + _MID_BROWS + _OUTER_BROWS, 0.0, 0.30),
        (_UPPER_LIDS, 0.0, 0.10),
        (_LOWER_LIDS, 0.0, -0.03),
    ),
}
EMOTIONS = tuple(EXPRESSIONS)
_WARP_SIGMA = 0.14  # inter-ocular units: how far a moved point drags the skin around it
_ANCHOR_WEIGHT = 0.25


def _expression_moves(landmarks: np.ndarray, emotion: str) -> np.ndarray:
    """(468, 2) pixel displacement of every landmark for `emotion` (zero for points it does not move)."""
    iod = float(np.linalg.norm(landmarks[33] - landmarks[263]))
    mouth_x = float(landmarks[[13, 14], 0].mean())
    face_x = float(landmarks[[33, 263], 0].mean())
    moves = np.zeros_like(landmarks, dtype=np.float64)
    for points, outward, up in EXPRESSIONS[emotion]:
        for p in points:
            centre = mouth_x if p in _CORNERS or p in _NEAR_CORNERS else face_x
            side = np.sign(landmarks[p, 0] - centre)
            moves[p] = (side * outward * iod, -up * iod)
    return moves


def express(rig: FaceRig, emotion: str) -> FaceRig:
    """The rig with a base expression (EXPRESSIONS) warped into its photograph and landmarks, held while
    `open_mouth` drops the jaw. The skin between landmarks follows a Gaussian-weighted blend of the
    points' moves (unmoved points hold their skin still)."""
    if emotion not in EXPRESSIONS:
        raise ValueError(f"unknown emotion {emotion!r}; known: {', '.join(EMOTIONS)}")
    if not EXPRESSIONS[emotion]:
        return rig
    lm = rig.landmarks.astype(np.float64)
    moves = _expression_moves(lm, emotion)
    sigma = _WARP_SIGMA * float(np.linalg.norm(lm[33] - lm[263]))

    # Unmoved points pull with a quarter of a moved one's weight: a moved group carries the skin between
    # its points whole, and the move fades out over the unmoved points around it.
    pull = np.where(np.abs(moves).sum(1) > 0, 1.0, _ANCHOR_WEIGHT)

    def field(points: np.ndarray) -> np.ndarray:
        d2 = ((points[:, None, :] - lm[None, :, :]) ** 2).sum(-1)
        w = np.exp(-d2 / (2 * sigma**2)) * pull
        return (w @ moves) / (w.sum(1, keepdims=True) + 1e-3)

    size = rig.image.shape[0]
    lo = np.maximum(np.floor(lm.min(0) - 3 * sigma), 0).astype(int)
    hi = np.minimum(np.ceil(lm.max(0) + 3 * sigma), size).astype(int)
    gx, gy = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]))
    grid = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float64)
    back = grid - field(grid)
    for _ in range(3):  # the inverse warp: the source pixel p whose move lands on the grid point, p + d(p)
        back = grid - field(back)
    back = back.astype(np.float32).reshape(*gx.shape, 2)
    image = rig.image.copy()
    image[lo[1] : hi[1], lo[0] : hi[0]] = cv2.remap(
        rig.image, back[..., 0], back[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101
    )
    landmarks = (lm + field(lm)).astype(np.float32)
    return _fitted_rig(image, landmarks, size, rig.max_opening)
