"""A generated multilingual talking-face corpus with known ground truth (`lipsync synth`).

Speech is espeak-ng (per-speaker voice variant, rate and pitch); the face is a real photograph that ships
inside scikit-image (`skimage.data.astronaut`), turned into distinct "speakers" (zoom, position, mirror,
colour, background) with small head motion and blinks. The jaw and lips follow the viseme openness of the
phoneme timeline espeak-ng reported, smoothed for co-articulation and 80 ms ahead of the sound, as real
mouths are (`SynthConfig.mouth_lead_ms`). `--offset-frames K` delays (K > 0) or
advances (K < 0) the audio against the mouth by K video frames; the manifest records it."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.config import config_hash
from core.errors import BadInput
from pipeline import phonemes as ph
from pipeline.face_rig import (
    EMOTIONS,
    SpeakerLook,
    blink_track,
    build_rig,
    express,
    head_motion,
    render_frames,
)
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
    # base expressions, given to the clips in turn (pipeline.face_rig.EXPRESSIONS); "neutral" is the photo
    emotions: tuple[str, ...] = ("neutral",)
    # every speaker's look overridden (SpeakerLook fields: hue_shift, brightness, face_fraction, background,
    # ...): speakers that look unlike the training corpus's, for held-out tests
    look: dict[str, Any] = field(default_factory=dict)
    ray_min_clips: int = 24  # run clips as Ray tasks from this many clips on (or when --address is given)


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


@dataclass(frozen=True)
class ClipJob:
    """One clip to make: which speaker, which clip, where."""

    speaker: Speaker
    clip_index: int
    out_dir: str
    cfg: SynthConfig
    emotion: str = "neutral"

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
    mouth_timeline = ph.shift_timeline(kept, lead_in * 1000)  # what the face says, in clip time
    offset_s = cfg.offset_frames / cfg.fps
    audio = shift_audio(audio, sr, offset_s)
    heard_timeline = ph.shift_timeline(mouth_timeline, offset_s * 1000)  # what the audio says

    rig = express(build_rig(spk.look, cfg.frame_size, cfg.max_opening), job.emotion)
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
        "emotion": job.emotion,
        "split": "",
        "injected_offset_frames": cfg.offset_frames,
        "timeline": str(timeline_path.relative_to(job.out_dir)),
        "seconds": cfg.seconds,
        "voice": f"{spk.language}+{spk.voice.variant}",
    }


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
    unknown = [e for e in cfg.emotions if e not in EMOTIONS]
    if unknown or not cfg.emotions:
        raise BadInput(f"--emotions: unknown {', '.join(unknown) or '(empty)'}; known: {', '.join(EMOTIONS)}")
    known = {f.name for f in dataclasses.fields(SpeakerLook)}
    if set(cfg.look) - known:
        raise BadInput(
            f"look: unknown {', '.join(sorted(set(cfg.look) - known))}; known: {', '.join(sorted(known))}"
        )
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
    """Every clip to make, in a stable order; the emotions go round the clips in that order."""
    keys = [
        (lang, s, c)
        for lang in cfg.languages
        for s in range(cfg.speakers)
        for c in range(cfg.clips_per_speaker)
    ]
    return [
        ClipJob(
            with_look(make_speaker(lang, s, cfg.seed), cfg.look),
            c,
            out,
            cfg,
            cfg.emotions[i % len(cfg.emotions)],
        )
        for i, (lang, s, c) in enumerate(keys)
    ]


def with_look(speaker: Speaker, look: dict[str, Any]) -> Speaker:
    """`speaker` with the SynthConfig's look overrides (tuples for the background and centre)."""
    if not look:
        return speaker
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in look.items()}
    return dataclasses.replace(speaker, look=dataclasses.replace(speaker.look, **changes))


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
