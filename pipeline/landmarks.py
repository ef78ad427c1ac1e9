"""Face landmarks, one-face tracking, temporal smoothing and clip segmentation.

Written once and imported by preprocessing, generation and scoring. Everything is a plain function on
numpy arrays except :class:`FaceMeshTracker`, which loads mediapipe once (an actor holds it).

Coordinates: landmarks are (T, 468, 3) float32 in pixels of the input frames (x, y in pixels, z in the
same scale as x, i.e. MediaPipe's normalised z times the frame width); NaN where no face was found.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np

from core.errors import BadInput

N_LANDMARKS = 468

# MediaPipe FaceMesh topology (from mediapipe.solutions.face_mesh_connections).
LIP_GAP_POINTS: tuple[int, int] = (13, 14)  # inner upper lip, inner lower lip (centre)
EYE_CORNER_POINTS: tuple[int, int] = (33, 263)  # outer corners of the right and left eye
MOUTH_CORNER_POINTS: tuple[int, int] = (61, 291)
FOREHEAD_POINT = 10
CHIN_POINT = 152
NOSE_TIP_POINT = 1
LIPS_POINTS: tuple[int, ...] = (
    0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181,
    185, 191, 267, 269, 270, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415,
)  # fmt: skip
RIGHT_EYE_POINTS: tuple[int, ...] = (
    7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246,
)  # fmt: skip
LEFT_EYE_POINTS: tuple[int, ...] = (
    249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466,
)  # fmt: skip
RIGHT_BROW_POINTS: tuple[int, ...] = (46, 52, 53, 55, 63, 65, 66, 70, 105, 107)
LEFT_BROW_POINTS: tuple[int, ...] = (276, 282, 283, 285, 293, 295, 296, 300, 334, 336)
UPPER_FACE_POINTS: tuple[int, ...] = tuple(
    sorted(set(RIGHT_EYE_POINTS + LEFT_EYE_POINTS + RIGHT_BROW_POINTS + LEFT_BROW_POINTS))
)
UPPER_FACE_OVAL_POINTS: tuple[int, ...] = (
    10, 21, 54, 67, 103, 109, 127, 162, 234, 251, 284, 297, 332, 338, 356, 389, 454,
)  # fmt: skip  # the face outline from ear to ear over the forehead: the jaw does not move it
FACE_OVAL_POINTS: tuple[int, ...] = (
    10, 21, 54, 58, 67, 93, 103, 109, 127, 132, 136, 148, 149, 150, 152, 162, 172, 176, 234, 251,
    284, 288, 297, 323, 332, 338, 356, 361, 365, 377, 378, 379, 389, 397, 400, 454,
)  # fmt: skip

SECOND_FACE_AREA_RATIO = 0.3  # another face at least this fraction of the tracked face's bbox area
_CONTINUE_IOU = 0.2  # a face overlapping the previous tracked box this much continues the track
_MAX_TRACK_GAP = 3  # frames without a face after which the previous box is forgotten


@dataclass
class FaceTrack:
    """One face track over a clip (per-frame arrays of length T).

    Pass ``np.flatnonzero(switched)`` to :func:`split_segments` with the scene cuts so no segment spans
    two people.
    """

    landmarks: np.ndarray  # (T, 468, 3) float32 pixels, NaN where no face
    found: np.ndarray  # (T,) bool
    n_faces: np.ndarray  # (T,) int, faces detected in the frame
    second_face: np.ndarray  # (T,) bool, another face with bbox area >= 0.3 x the tracked one
    face_size: np.ndarray  # (T,) float, bbox width of the tracked face in px, NaN without face
    switched: np.ndarray  # (T,) bool, the track jumped to a face not overlapping the last one: a break

    def __len__(self) -> int:
        return len(self.found)

    @classmethod
    def concatenate(cls, pieces: Sequence[FaceTrack]) -> FaceTrack:
        """One track from consecutive pieces (e.g. chunks tracked with ``resume=True``)."""
        if len(pieces) == 1:
            return pieces[0]
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in pieces]) for f in fields(cls)})

    @property
    def found_fraction(self) -> float:
        """Fraction of frames with the tracked face."""
        return float(self.found.mean()) if len(self.found) else 0.0

    @property
    def multi_face_fraction(self) -> float:
        """Fraction of face frames where a second sizeable face is present."""
        n = int(self.found.sum())
        return float((self.second_face & self.found).sum() / n) if n else 0.0


def _bbox(points: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1) of (N, 2+) points."""
    return np.concatenate([points[:, :2].min(0), points[:, :2].max(0)])


def _area(box: np.ndarray) -> float:
    return float(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = _area(np.concatenate([np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])]))
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def select_face(faces: list[np.ndarray], prev_box: np.ndarray | None) -> tuple[int, bool]:
    """Index of the face to track and whether a second face of >= 0.3x its area is present.

    The face overlapping ``prev_box`` most (IoU >= 0.2) continues the track; otherwise the largest.
    """
    boxes = [_bbox(f) for f in faces]
    areas = np.array([_area(b) for b in boxes])
    idx = int(np.argmax(areas))
    if prev_box is not None:
        ious = np.array([_iou(b, prev_box) for b in boxes])
        if ious.max() >= _CONTINUE_IOU:
            idx = int(np.argmax(ious))
    others = np.delete(areas, idx)
    second = bool(np.any(others >= SECOND_FACE_AREA_RATIO * areas[idx]))
    return idx, second


class FaceMeshTracker:
    """Loads a MediaPipe face landmark model once; :meth:`track` runs it in tracking mode per clip.

    Without ``model_path`` the legacy FaceMesh bundled in the mediapipe wheel is used (468 points, no
    iris refinement). With ``model_path`` a user-supplied ``face_landmarker.task`` is loaded with the
    Tasks API (VIDEO mode; its 478 points are cut to the 468 mesh points). Nothing is downloaded.
    """

    def __init__(
        self, max_faces: int = 2, min_detection_confidence: float = 0.5, model_path: str | None = None
    ) -> None:
        self.max_faces = max_faces
        self.min_detection_confidence = min_detection_confidence
        self.model_path = model_path
        self._mesh = None
        self._task_model: bytes | None = None
        self._last_box: np.ndarray | None = None  # the previous call's last face box, for `resume`
        self._last_t = -(10**9)  # its frame index, relative to the next call's first frame
        if model_path is None:
            from mediapipe.python.solutions import face_mesh

            self._mesh = face_mesh.FaceMesh(
                static_image_mode=False,
                max_num_faces=max_faces,
                refine_landmarks=False,
                min_detection_confidence=min_detection_confidence,
            )
        else:
            self._task_model = _read_task_model(model_path)
            self._new_landmarker().close()  # fail now, in the constructor, if mediapipe rejects it

    def _new_landmarker(self):
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_buffer=self._task_model),
            running_mode=vision.RunningMode.VIDEO,
            num_faces=self.max_faces,
            min_face_detection_confidence=self.min_detection_confidence,
        )
        try:
            return vision.FaceLandmarker.create_from_options(options)
        except (RuntimeError, ValueError) as e:
            raise BadInput(f"face landmarker model {self.model_path}: mediapipe cannot load it ({e})") from e

    def close(self) -> None:
        """Release the mediapipe graph."""
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None

    def __enter__(self) -> FaceMeshTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _faces_per_frame(
        self, frames: np.ndarray, fps: float, reset: bool = True
    ) -> Iterator[list[np.ndarray]]:
        """Yield, per frame, a list of (468, 3) pixel landmark arrays (fresh tracking state if `reset`)."""
        h, w = frames.shape[1:3]
        scale = np.array([w, h, w], np.float32)
        if self._task_model is None:
            if self._mesh is None:
                raise RuntimeError("FaceMeshTracker is closed")
            if reset:
                self._mesh.reset()
            for frame in frames:
                result = self._mesh.process(np.ascontiguousarray(frame))
                faces = result.multi_face_landmarks or []
                yield [_to_pixels([(p.x, p.y, p.z) for p in f.landmark], scale) for f in faces]
            return
        import mediapipe as mp

        with self._new_landmarker() as landmarker:
            for t, frame in enumerate(frames):
                image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))
                result = landmarker.detect_for_video(image, int(round(t * 1000.0 / fps)))
                yield [
                    _to_pixels([(p.x, p.y, p.z) for p in f[:N_LANDMARKS]], scale)
                    for f in result.face_landmarks
                ]

    def track(self, frames: np.ndarray, fps: float = 25.0, resume: bool = False) -> FaceTrack:
        """Track one face through a clip of (T, H, W, 3) uint8 RGB frames.

        The largest face starts the track; when several are present the one overlapping the previous
        frame's tracked face continues it. ``fps`` only sets the Tasks API timestamps. ``resume``
        continues the previous call's track (its last face box and, for the bundled FaceMesh, mediapipe's
        tracking state), so a clip tracked chunk by chunk gives what tracking it whole gives.
        """
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
        t_len = len(frames)
        track = FaceTrack(
            landmarks=np.full((t_len, N_LANDMARKS, 3), np.nan, np.float32),
            found=np.zeros(t_len, bool),
            n_faces=np.zeros(t_len, int),
            second_face=np.zeros(t_len, bool),
            face_size=np.full(t_len, np.nan),
            switched=np.zeros(t_len, bool),
        )
        prev_box, prev_t = (self._last_box, self._last_t) if resume else (None, -(10**9))
        for t, faces in enumerate(self._faces_per_frame(frames, fps, reset=not resume)):
            track.n_faces[t] = len(faces)
            if not faces:
                continue
            recent = prev_box if t - prev_t <= _MAX_TRACK_GAP else None
            idx, track.second_face[t] = select_face(faces, recent)
            box = _bbox(faces[idx])
            track.switched[t] = recent is not None and _iou(box, recent) == 0.0
            track.landmarks[t] = faces[idx]
            track.found[t] = True
            track.face_size[t] = box[2] - box[0]
            prev_box, prev_t = box, t
        self._last_box, self._last_t = prev_box, prev_t - t_len
        return track


def _to_pixels(points: list[tuple[float, float, float]], scale: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float32) * scale


def _read_task_model(path: str) -> bytes:
    """Bytes of a face_landmarker.task bundle, or BadInput naming the file and what is wrong."""
    if not os.path.isfile(path):
        reason = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise BadInput(f"face landmarker model {path} {reason}")
    if not zipfile.is_zipfile(path):
        raise BadInput(f"face landmarker model {path} is not a MediaPipe .task bundle (not a zip archive)")
    with zipfile.ZipFile(path) as bundle:
        names = set(bundle.namelist())
    missing = {"face_detector.tflite", "face_landmarks_detector.tflite"} - names
    if missing:
        raise BadInput(
            f"face landmarker model {path} is not a face_landmarker.task (lacks {sorted(missing)})"
        )
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------------
# Smoothing and measures


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) half-open runs of True in a 1-D bool array."""
    padded = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def fill_gaps(landmarks: np.ndarray, found: np.ndarray, max_gap: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Linearly interpolate runs of at most ``max_gap`` missing frames between two found frames.

    Returns (landmarks, found) copies; longer gaps and gaps at the clip's ends stay NaN / False.
    """
    out = np.array(landmarks, np.float32, copy=True)
    filled = np.array(found, bool, copy=True)
    t_len = len(filled)
    for start, end in _runs(~filled):
        if start == 0 or end == t_len or end - start > max_gap:
            continue
        a, b = out[start - 1], out[end]
        w = (np.arange(start, end) - (start - 1)) / (end - (start - 1))
        out[start:end] = a[None] + w[:, None, None].astype(np.float32) * (b - a)[None]
        filled[start:end] = True
    return out, filled


def smooth_landmarks(
    landmarks: np.ndarray, found: np.ndarray, window: int = 5, polyorder: int = 2, max_gap: int = 3
) -> np.ndarray:
    """Reduce landmark jitter over time without lagging the mouth.

    Gaps of at most ``max_gap`` frames are interpolated, then each run of face frames is filtered with a
    Savitzky-Golay filter (zero-phase, so peaks keep their timing; window 5 / order 2 passes 4 Hz mouth
    motion at 25 fps at 93 %). Frames without a face stay NaN. Use ``~np.isnan(out[:, 0, 0])`` as the
    found mask after gap filling.
    """
    from scipy.signal import savgol_filter  # here: scipy.signal costs 0.8 s to import

    out, filled = fill_gaps(landmarks, found, max_gap)
    out[~filled] = np.nan
    for start, end in _runs(filled):
        n = end - start
        win = min(window, n if n % 2 else n - 1)
        if win > polyorder:
            out[start:end] = savgol_filter(out[start:end], win, polyorder, axis=0, mode="interp")
    return out


def inter_ocular(landmarks: np.ndarray) -> np.ndarray:
    """Distance between the outer eye corners (33-263) in pixels; shape (...,)."""
    a, b = EYE_CORNER_POINTS
    return np.linalg.norm(landmarks[..., a, :2] - landmarks[..., b, :2], axis=-1)


def mouth_openness(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap (13-14) over the inter-ocular distance (33-263): scale-invariant, NaN without face.

    Accepts (T, 468, 3) or (468, 3) landmarks; returns (T,) or a scalar array.
    """
    up, low = LIP_GAP_POINTS
    gap = np.linalg.norm(landmarks[..., up, :2] - landmarks[..., low, :2], axis=-1)
    return gap / inter_ocular(landmarks)


# Lip shape: the AV-sync meter's view of the mouth (pipeline.offset)
INNER_LIP_RING: tuple[int, ...] = (
    78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95,
)  # fmt: skip
OUTER_LIP_RING: tuple[int, ...] = (
    61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146,
)  # fmt: skip
INNER_LIP_PAIRS = ((13, 14), (82, 87), (312, 317), (81, 178), (311, 402), (80, 88), (310, 318))
OUTER_LIP_PAIRS = ((0, 17), (37, 84), (267, 314), (39, 181), (269, 405))
LIP_SHAPE_POINTS = (0, 13, 14, 17, 61, 291, 78, 308, 152)  # lip centres and corners, chin
LIP_SHAPE_FEATURES = 9 + 2 * len(LIP_SHAPE_POINTS)


def _ring_area(points: np.ndarray) -> np.ndarray:
    """Shoelace area of (T, N, 2) polygons."""
    x, y = points[..., 0], points[..., 1]
    return 0.5 * np.abs(np.sum(x * np.roll(y, -1, -1) - y * np.roll(x, -1, -1), axis=-1))


def lip_shape(landmarks: np.ndarray) -> np.ndarray:
    """(T, 27) float32 shape of the lips per frame, in inter-ocular units; NaN rows without a face.

    Nine measures (inner and outer lip height, each the mean of several upper/lower pairs; outer and
    inner width; inner and outer lip area; nose tip to chin; upper and lower lip thickness), then x and y
    of the lip centres, lip corners and chin relative to the nose tip, in a frame aligned with the eye line.
    Every feature is invariant to the face's size, position and in-plane rotation.
    """
    lm = np.asarray(landmarks, np.float64)[..., :2]
    iod = inter_ocular(lm)

    def dist(a: int, b: int) -> np.ndarray:
        return np.linalg.norm(lm[:, a] - lm[:, b], axis=-1) / iod

    measures = [
        np.mean([dist(a, b) for a, b in INNER_LIP_PAIRS], axis=0),
        np.mean([dist(a, b) for a, b in OUTER_LIP_PAIRS], axis=0),
        dist(*MOUTH_CORNER_POINTS),
        dist(78, 308),
        _ring_area(lm[:, INNER_LIP_RING]) / iod**2,
        _ring_area(lm[:, OUTER_LIP_RING]) / iod**2,
        dist(NOSE_TIP_POINT, CHIN_POINT),
        dist(0, 13),
        dist(14, 17),
    ]
    a, b = EYE_CORNER_POINTS
    x_axis = (lm[:, b] - lm[:, a]) / iod[:, None]
    y_axis = np.stack([-x_axis[:, 1], x_axis[:, 0]], axis=1)
    rel = lm[:, LIP_SHAPE_POINTS] - lm[:, NOSE_TIP_POINT : NOSE_TIP_POINT + 1]
    xs = np.einsum("tpc,tc->tp", rel, x_axis) / iod[:, None]
    ys = np.einsum("tpc,tc->tp", rel, y_axis) / iod[:, None]
    return np.concatenate([np.stack(measures, axis=1), xs, ys], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Scene cuts and segments

SCENE_THUMB_SIDE = 128
"""Frames are compared at this longer side: the detectors' thresholds were chosen for it (smaller thumbnails
give noisier histograms, so false cuts on the shared clips; larger ones only cost time)."""
FLASH_FRAMES = 3
"""A change that goes back within this many frames (a camera flash, a blink of light) is not a cut."""


def _scene_thumbs(frames: np.ndarray) -> list[np.ndarray]:
    """BGR thumbnails of at most SCENE_THUMB_SIDE on the longer side (PySceneDetect takes BGR)."""
    h, w = frames.shape[1:3]
    scale = min(1.0, SCENE_THUMB_SIDE / max(h, w))
    size = (max(2, round(w * scale)), max(2, round(h * scale)))
    return [
        cv2.cvtColor(cv2.resize(f, size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR) for f in frames
    ]


Detector = Callable[[], Any]  # a new PySceneDetect detector, every frame allowed to start a shot


def _detect(thumbs: list[np.ndarray], make: Detector) -> list[int]:
    """The cuts one detector reports, flashes dropped."""
    detector = make()
    # Frames are numbered from 1: the detectors take frame number 0 for "no frame yet".
    cuts = [t - 1 for i, thumb in enumerate(thumbs) for t in detector.process_frame(i + 1, thumb)]
    return [t for t in cuts if not _is_flash(thumbs, t, make)]


def _same_shot(a: np.ndarray, b: np.ndarray, make: Detector) -> bool:
    """Whether the detector sees no cut going straight from picture a to picture b."""
    detector = make()
    return not (detector.process_frame(1, a) + detector.process_frame(2, b))


def _is_flash(thumbs: list[np.ndarray], t: int, make: Detector) -> bool:
    """Whether the picture before the change at `t` comes back within FLASH_FRAMES frames."""
    for j in range(FLASH_FRAMES + 1):
        for k in range(FLASH_FRAMES + 1 - j):
            before, after = t - 1 - j, t + k
            if (
                (j or k)
                and before >= 0
                and after < len(thumbs)
                and _same_shot(thumbs[before], thumbs[after], make)
            ):
                return True
    return False


def scene_cuts(frames: np.ndarray, threshold: float = 0.15, content_threshold: float = 27.0) -> list[int]:
    """Frame indices t where a new shot starts (the picture changes between t-1 and t).

    Two PySceneDetect detectors on 128-px thumbnails; a frame either reports starts a shot:
    - HistogramDetector: consecutive frames' luma histograms correlate below 1 - `threshold`. It finds
      cross-fades (one cut per blended frame that changes enough; those frames become pieces too short to
      keep) but not cuts whose pictures share most of their histogram (letterbox bars, big flat backgrounds).
    - ContentDetector: the mean per-pixel change of hue, saturation and lightness exceeds
      `content_threshold` (of 255). It finds those cuts but not gradual fades.
    Every frame may start a shot (a cut at a window's second frame is found); a change that goes back within
    FLASH_FRAMES frames (a flash) is dropped. On real clips joined with known events
    (benchmarks/scene_cuts.py) it finds every hard cut, letterboxed or not, every unboxed fade and no flash;
    the shared clips, which have no cut, give none.
    """
    from scenedetect.detectors import ContentDetector, HistogramDetector
    from scenedetect.scene_detector import FlashFilter

    thumbs = _scene_thumbs(frames)
    by_histogram = _detect(thumbs, lambda: HistogramDetector(threshold=threshold, min_scene_len=1))
    suppress = FlashFilter.Mode.SUPPRESS  # report a cut at the frame it happens (MERGE reports it late)
    by_content = _detect(
        thumbs, lambda: ContentDetector(threshold=content_threshold, min_scene_len=1, filter_mode=suppress)
    )
    return sorted(set(by_histogram) | set(by_content))


def split_segments(
    found: np.ndarray, cuts: list[int] | np.ndarray, max_frames: int, min_frames: int
) -> list[tuple[int, int]]:
    """Half-open (start, end) segments of consecutive face frames.

    Segments break where the face is lost and at scene cuts (a cut at t starts a new segment at t); longer
    than ``max_frames`` they are split evenly into the fewest pieces that fit; pieces shorter than
    ``min_frames`` are dropped.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    mask = np.asarray(found, bool)
    breaks = sorted({int(c) for c in cuts if 0 < int(c) < len(mask)})
    segments: list[tuple[int, int]] = []
    for start, end in _runs(mask):
        bounds = [start, *[c for c in breaks if start < c < end], end]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            segments.extend(_split_even(a, b, max_frames))
    return [(a, b) for a, b in segments if b - a >= min_frames]


def _split_even(start: int, end: int, max_frames: int) -> list[tuple[int, int]]:
    pieces = -(-(end - start) // max_frames)
    edges = np.linspace(start, end, pieces + 1).round().astype(int).tolist()
    return list(zip(edges[:-1], edges[1:], strict=True))
