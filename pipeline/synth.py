"""A generated multilingual talking-face corpus with known ground truth (`lipsync synth`).

Speech is espeak-ng (per-speaker voice variant, rate and pitch); the face is a real photograph that ships
inside scikit-image (`skimage.data.astronaut`), turned into distinct "speakers" (zoom, position, mirror,
colour, background) with small head motion and blinks. The jaw and lips follow the viseme openness of the
phoneme timeline espeak-ng reported, smoothed for co-articulation and 80 ms ahead of the sound, as real
mouths are (`SynthConfig.mouth_lead_ms`). `--offset-frames K` delays (K > 0) or
advances (K < 0) the audio against the mouth by K video frames; the manifest records it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.config import config_hash
from core.errors import BadInput
from pipeline import phonemes as ph
from pipeline.sentences import SENTENCES

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "video",
    "audio",
    "language",
    "speaker",
    "transcript",
    "accent",
    "emotion",
    "split",
    "injected_offset_frames",
    "timeline",
    "seconds",
    "voice",
)


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Deterministic for a given seed."""

    languages: tuple[str, ...] = ("en", "es", "hi")
    speakers: int = 2
    clips_per_speaker: int = 2
    seconds: float = 4.0
    offset_frames: int = 0
    seed: int = 0
    fps: int = 25
    frame_size: int = 256
    max_opening: float = 0.45  # jaw drop at openness 1, as a fraction of the mouth width
    # The mouth shapes each phoneme this long before it sounds, as real speakers do (ph.MOUTH_LEAD_MS),
    # so "in sync" means the same for the synth corpus, real video and everything trained on either.
    mouth_lead_ms: float = ph.MOUTH_LEAD_MS
    ray_min_clips: int = 24  # run clips as Ray tasks from this many clips on (or when --address is given)


# --- speakers -----------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: an id, a look and a voice."""

    speaker_id: str
    language: str
    look: SpeakerLook
    voice: ph.VoiceStyle


_VARIANTS = ("m1", "f2", "m3", "f3", "m2", "f1", "m4", "f4")


def make_speaker(language: str, index: int, seed: int) -> Speaker:
    """Deterministic speaker `index` of a language: look and voice drawn from a seeded generator."""
    rng = np.random.default_rng([seed, index, int(hashlib.md5(language.encode()).hexdigest()[:8], 16)])
    look = SpeakerLook(
        mirror=bool(index % 2),
        face_fraction=float(rng.uniform(0.36, 0.5)),
        centre=(float(rng.uniform(0.42, 0.58)), float(rng.uniform(0.42, 0.52))),
        hue_shift=int(rng.integers(-14, 15)),
        saturation=float(rng.uniform(0.75, 1.25)),
        brightness=float(rng.uniform(0.85, 1.12)),
        background=tuple(int(v) for v in rng.integers(30, 226, size=3)),
    )
    voice = ph.VoiceStyle(
        variant=_VARIANTS[(index + seed) % len(_VARIANTS)],
        rate_wpm=int(rng.integers(140, 176)),
        pitch=int(rng.integers(30, 71)),
        pitch_range=int(rng.integers(40, 80)),
    )
    return Speaker(f"{language}-spk{index:02d}", language, look, voice)


# --- the face rig -------------------------------------------------------------------------------
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


# --- clips --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipJob:
    """One clip to make: which speaker, which clip, where."""

    speaker: Speaker
    clip_index: int
    out_dir: str
    cfg: SynthConfig

    @property
    def relative_video(self) -> str:
        return f"{self.speaker.language}/{self.speaker.speaker_id}/clip{self.clip_index:03d}.mp4"


def _pick_text(language: str, rng: np.random.Generator, count: int) -> str:
    sentences = SENTENCES[language]
    order = rng.permutation(len(sentences))
    return " ".join(sentences[i] for i in order[:count])


def speech_for_clip(job: ClipJob, rng: np.random.Generator) -> tuple[ph.Speech, float, float]:
    """Speech that fits the clip: returns (speech, lead-in seconds, usable speech seconds)."""
    cfg = job.cfg
    margin = 0.1 + max(0.3, abs(cfg.offset_frames) / cfg.fps)
    span = cfg.seconds - 2 * margin
    if span <= 0.5:
        raise BadInput(f"--seconds {cfg.seconds} is too short for --offset-frames {cfg.offset_frames}")
    speech = ph.synthesize(_pick_text(job.speaker.language, rng, 1), job.speaker.language, job.speaker.voice)
    count = 1
    while speech.duration_ms / 1000 < 0.7 * span and count < 4:
        count += 1
        speech = ph.synthesize(
            _pick_text(job.speaker.language, rng, count), job.speaker.language, job.speaker.voice
        )
    return speech, margin, span


def _fit(speech: ph.Speech, span: float) -> tuple[np.ndarray, list[ph.Phoneme]]:
    """Cut speech longer than `span` seconds at the last phoneme end inside it (with a 20 ms fade)."""
    pcm = speech.pcm.astype(np.float32) / 32768.0
    limit_ms = span * 1000
    kept = [p for p in speech.phonemes if p.end_ms <= limit_ms]
    if len(kept) == len(speech.phonemes):
        return pcm, kept
    cut = int(kept[-1].end_ms * speech.sample_rate / 1000) if kept else 0
    pcm = pcm[:cut].copy()
    fade = min(len(pcm), int(0.02 * speech.sample_rate))
    if fade:
        pcm[-fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    return pcm, kept


def _shift_phonemes(phonemes: list[ph.Phoneme], ms: float) -> list[ph.Phoneme]:
    return [ph.Phoneme(p.phoneme, p.start_ms + ms, p.end_ms + ms, p.viseme, p.openness) for p in phonemes]


def make_clip(job: ClipJob) -> dict[str, Any]:
    """Render, speak and encode one clip; write its phoneme timeline; return its manifest row."""
    from pipeline.media import shift_audio, write_video

    cfg, spk = job.cfg, job.speaker
    rng = np.random.default_rng(
        [cfg.seed, job.clip_index, int(hashlib.md5(spk.speaker_id.encode()).hexdigest()[:8], 16)]
    )
    speech, lead_in, span = speech_for_clip(job, rng)
    pcm, kept = _fit(speech, span)
    sr = speech.sample_rate
    n_frames = int(round(cfg.seconds * cfg.fps))
    n_samples = int(round(cfg.seconds * sr))
    audio = np.zeros(n_samples, np.float32)
    start = int(lead_in * sr)
    audio[start : start + len(pcm)] = pcm[: n_samples - start]
    mouth_timeline = _shift_phonemes(kept, lead_in * 1000)  # what the face says, in clip time
    offset_s = cfg.offset_frames / cfg.fps
    audio = shift_audio(audio, sr, offset_s)
    heard_timeline = _shift_phonemes(mouth_timeline, offset_s * 1000)  # what the audio says

    rig = build_rig(spk.look, cfg.frame_size, cfg.max_opening)
    openness = ph.openness_per_frame(mouth_timeline, n_frames, cfg.fps, shift_ms=-cfg.mouth_lead_ms)
    frames = render_frames(
        rig, openness, blink_track(n_frames, cfg.fps, rng), head_motion(n_frames, cfg.fps, rng)
    )

    video_path = Path(job.out_dir) / job.relative_video
    video_path.parent.mkdir(parents=True, exist_ok=True)
    write_video(str(video_path), frames, cfg.fps, audio=audio, sample_rate=sr)
    timeline_path = video_path.with_suffix(".phonemes.json")
    timeline = {
        "video": job.relative_video,
        "language": spk.language,
        "speaker": spk.speaker_id,
        "text": speech.text,
        "fps": cfg.fps,
        "injected_offset_frames": cfg.offset_frames,
        "mouth_lead_ms": cfg.mouth_lead_ms,
        "note": (
            "phonemes are in audio time; the mouth follows them shifted by -injected_offset_frames"
            " and shapes each one mouth_lead_ms before it sounds"
        ),
        "cadence": ph.cadence(kept),
        "phonemes": ph.timeline_to_json(heard_timeline),
    }
    timeline_path.write_text(json.dumps(timeline, ensure_ascii=False, indent=1))
    return {
        "video": job.relative_video,
        "audio": "",
        "language": spk.language,
        "speaker": spk.speaker_id,
        "transcript": speech.text,
        "accent": "",
        "emotion": "neutral",
        "split": "",
        "injected_offset_frames": cfg.offset_frames,
        "timeline": str(timeline_path.relative_to(job.out_dir)),
        "seconds": cfg.seconds,
        "voice": f"{spk.language}+{spk.voice.variant}",
    }


# --- the command --------------------------------------------------------------------------------
def validate(cfg: SynthConfig) -> None:
    """Fail fast with one line on a bad language list or numbers."""
    if not cfg.languages:
        raise BadInput("--languages is empty")
    voices = ph.list_voices()
    for lang in cfg.languages:
        if lang not in voices:
            raise BadInput(f"--languages: espeak-ng has no voice {lang!r}; available: {', '.join(voices)}")
        if lang not in SENTENCES:
            raise BadInput(
                f"--languages: no built-in sentences for {lang!r}; supported: {', '.join(sorted(SENTENCES))}"
            )
    if cfg.speakers < 1 or cfg.clips_per_speaker < 1:
        raise BadInput("--speakers and --clips-per-speaker must be at least 1")
    if abs(cfg.offset_frames) > 15:
        raise BadInput("--offset-frames must be within -15..15")


def _prepare_out(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise BadInput(f"cannot write to output directory {out}: {exc.strerror or exc}") from exc
    return path


def plan(cfg: SynthConfig, out: str) -> list[ClipJob]:
    """Every clip to make, in a stable order."""
    return [
        ClipJob(make_speaker(lang, s, cfg.seed), c, out, cfg)
        for lang in cfg.languages
        for s in range(cfg.speakers)
        for c in range(cfg.clips_per_speaker)
    ]


def _run_on_ray(jobs: list[ClipJob], address: str | None) -> list[dict[str, Any]]:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(make_clip)
    return ray.get([remote.remote(job) for job in jobs])


def run(cfg: SynthConfig, out: str, address: str | None = None) -> dict[str, Any]:
    """Generate the corpus into `out`; returns the paths written."""
    validate(cfg)
    out_path = _prepare_out(out)
    jobs = plan(cfg, str(out_path.resolve()))
    log.info("synth: %d clips (%s) into %s", len(jobs), ",".join(cfg.languages), out)
    if address or len(jobs) >= cfg.ray_min_clips:
        rows = _run_on_ray(jobs, address)
    else:
        rows = [make_clip(job) for job in jobs]
    manifest = out_path / "manifest.csv"
    tmp = manifest.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["video"]))
    os.replace(tmp, manifest)
    return {
        "out": str(out_path),
        "manifest": str(manifest),
        "clips": len(rows),
        "config_hash": config_hash(cfg),
    }
