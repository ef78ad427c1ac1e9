"""`lipsync synth`: a generated corpus whose mouths FaceMesh can follow, with known timing and offsets."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import phonemes as ph
from pipeline.landmarks import FaceMeshTracker, mouth_openness
from pipeline.media import probe, read_audio, read_frames
from pipeline.offset import lagged_correlations
from pipeline.synth import SynthConfig, run

LIPSYNC = [sys.executable, "-m", "lipsync.cli"]


def measure(video: Path, tracker: FaceMeshTracker) -> tuple[np.ndarray, np.ndarray, list[ph.Phoneme]]:
    """(n_faces per frame, inner-lip opening per frame, the clip's audio-time phoneme timeline)."""
    track = tracker.track(read_frames(str(video), fps=25.0))
    timeline = json.loads(video.with_suffix(".phonemes.json").read_text())["phonemes"]
    return track.n_faces, mouth_openness(track.landmarks), ph.timeline_from_json(timeline)


def peak_lag(opening: np.ndarray, timeline: list[ph.Phoneme], max_lag: int = 10) -> tuple[int, float]:
    """Lag L maximising corr(opening(t), timeline_openness(t + L)); and the correlation at lag 0 (the
    timeline as the mouth shows it: MOUTH_LEAD_MS ahead of the sound)."""
    expected = ph.openness_per_frame(timeline, len(opening), fps=25.0, shift_ms=-ph.MOUTH_LEAD_MS)
    ok = np.isfinite(opening)
    corr = lagged_correlations(np.where(ok, opening, np.nanmean(opening)), expected, max_lag)
    return int(np.argmax(corr)) - max_lag, float(corr[max_lag])


def test_corpus_layout_and_manifest(synth_corpus: Path) -> None:
    rows = list(csv.DictReader((synth_corpus / "manifest.csv").open(encoding="utf-8")))
    assert len(rows) == 6
    assert {r["language"] for r in rows} == {"en", "es", "hi"}
    for row in rows:
        video = synth_corpus / row["video"]
        lang, speaker, _ = Path(row["video"]).parts
        assert (lang, speaker) == (row["language"], row["speaker"])
        info = probe(str(video))
        assert (info.video_codec, info.fps, info.has_audio) == ("h264", 25.0, True)
        assert abs(info.duration_s - 4.0) < 0.1
        assert row["injected_offset_frames"] == "0"
        assert (synth_corpus / row["timeline"]).is_file()
        assert row["transcript"]


def test_facemesh_follows_the_mouth(synth_corpus: Path, tracker: FaceMeshTracker) -> None:
    """Exactly one face in >= 99% of frames; inner-lip opening vs timeline openness: Pearson >= 0.8 at lag 0."""
    for video in sorted(synth_corpus.glob("*/*/*.mp4")):
        n_faces, opening, timeline = measure(video, tracker)
        assert np.mean(n_faces == 1) >= 0.99, video
        lag, r0 = peak_lag(opening, timeline)
        assert r0 >= 0.8, (video, r0)
        assert abs(lag) <= 1, (video, lag)


@pytest.mark.parametrize("offset", range(-6, 7))
def test_injected_offset_moves_the_correlation_peak(
    offset: int, tmp_path: Path, tracker: FaceMeshTracker
) -> None:
    language = ("en", "es", "hi")[offset % 3]
    cfg = SynthConfig(languages=(language,), speakers=1, clips_per_speaker=1, offset_frames=offset, seed=11)
    run(cfg, str(tmp_path))
    row = next(csv.DictReader((tmp_path / "manifest.csv").open(encoding="utf-8")))
    assert int(row["injected_offset_frames"]) == offset
    _, opening, timeline = measure(tmp_path / row["video"], tracker)
    lag, _ = peak_lag(opening, timeline)
    assert abs(lag - offset) <= 1, (language, offset, lag)


def _speech_bounds_ms(pcm: np.ndarray, sample_rate: int) -> tuple[float, float]:
    hop = sample_rate // 100
    n = len(pcm) // hop
    rms = np.sqrt((pcm[: n * hop].reshape(n, hop).astype(np.float64) ** 2).mean(axis=1))
    active = np.flatnonzero(rms > 0.05 * rms.max())
    return active[0] * 10.0, (active[-1] + 1) * 10.0


def test_timeline_covers_the_clip_audio(synth_corpus: Path) -> None:
    for video in sorted(synth_corpus.glob("*/*/*.mp4")):
        phonemes = json.loads(video.with_suffix(".phonemes.json").read_text())["phonemes"]
        onset, offset = _speech_bounds_ms(read_audio(str(video), 16000), 16000)
        assert abs(phonemes[0]["start_ms"] - onset) <= 300, video
        assert abs(phonemes[-1]["end_ms"] - offset) <= 300, video


def test_two_speakers_of_a_language_look_different(synth_corpus: Path, tracker: FaceMeshTracker) -> None:
    first, second = (read_frames(str(v), fps=25.0)[:5] for v in sorted(synth_corpus.glob("en/*/clip000.mp4")))
    pixel_difference = np.abs(first.astype(np.float32) - second.astype(np.float32)).mean()
    assert pixel_difference > 25, pixel_difference
    faces = [np.nanmean(tracker.track(f).landmarks[..., :2], axis=(0, 1)) for f in (first, second)]
    assert np.linalg.norm(faces[0] - faces[1]) > 5  # the face sits elsewhere in the frame


def test_same_seed_gives_byte_identical_manifests(tmp_path: Path) -> None:
    cfg = SynthConfig(languages=("es",), speakers=2, clips_per_speaker=1, seconds=2.0, seed=5)
    run(cfg, str(tmp_path / "a"))
    run(cfg, str(tmp_path / "b"))
    a, b = ((tmp_path / d / "manifest.csv").read_bytes() for d in "ab")
    assert a == b
    run(
        SynthConfig(languages=("es",), speakers=2, clips_per_speaker=1, seconds=2.0, seed=6),
        str(tmp_path / "c"),
    )
    assert (tmp_path / "c" / "manifest.csv").read_bytes() != a


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LIPSYNC, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120
    )


def test_cli_json_output(tmp_path: Path) -> None:
    done = _cli(
        "synth",
        str(tmp_path),
        "--languages",
        "en",
        "--speakers",
        "1",
        "--clips-per-speaker",
        "1",
        "--seconds",
        "2",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["clips"] == 1 and Path(result["manifest"]).is_file()


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--languages", "en,xx-nope"], {}, "xx-nope"),
        (["--languages", "en", "--speakers", "0"], {}, "--speakers"),
        ([], {"LIPSYNC_ESPEAK_LIB": "/nonexistent/libespeak-ng.so.1"}, "espeak-ng is not installed"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    done = _cli("synth", str(tmp_path / "out"), *args, env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr


def test_unwritable_out_is_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = _cli("synth", str(blocker / "out"), "--languages", "en")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "cannot write" in done.stderr
