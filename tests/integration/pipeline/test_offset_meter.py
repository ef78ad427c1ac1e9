"""The AV-sync meter (pipeline.offset) and the meter choice (pipeline.meters), without Ray."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import BadInput
from pipeline.landmarks import FaceMeshTracker, lip_shape, smooth_landmarks
from pipeline.media import read_audio, read_frames, shift_audio, write_video
from pipeline.meters import LandmarkMeter, MeterConfig, NetworkMeter, build_meter
from pipeline.offset import (
    LOW_CONFIDENCE,
    NO_FACE,
    NO_SPEECH,
    TOO_SHORT,
    SyncProjection,
    estimate_offset,
    fit_projection,
    load_projection,
)

LIPSYNC = [sys.executable, "-m", "lipsync.cli"]


@pytest.fixture(scope="module")
def tracked(synth_corpus: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(frames, smoothed landmarks, pcm) of the six 4 s synth clips."""
    tracker = FaceMeshTracker(max_faces=1)
    out = []
    for row in csv.DictReader((synth_corpus / "manifest.csv").open(encoding="utf-8")):
        video = str(synth_corpus / row["video"])
        frames = read_frames(video, 25.0)
        track = tracker.track(frames)
        out.append((frames, smooth_landmarks(track.landmarks, track.found), read_audio(video)))
    return out


def test_lip_shape_is_invariant_to_face_size_position_and_rotation(tracked) -> None:  # noqa: ANN001
    _, landmarks, _ = tracked[0]
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = landmarks.copy()
    moved[..., :2] = 2.5 * landmarks[..., :2] @ rotation.T + np.array([300.0, -40.0])
    np.testing.assert_allclose(lip_shape(moved), lip_shape(landmarks), atol=1e-4)
    opening = lip_shape(landmarks)[:, 0]
    assert opening.std() > 0.02, "the inner-lip height must move with the synth jaw"


def test_shifts_are_read_in_frames_of_any_rate(tracked) -> None:  # noqa: ANN001
    """The meter runs at 25 fps inside; a 50 fps copy of the lips reads the shift in 50 fps frames."""
    _, landmarks, pcm = tracked[1]
    lips = lip_shape(landmarks)
    for k in (-5, 0, 4):
        at25 = estimate_offset(lips, shift_audio(pcm, 16000, k / 25.0), 16000, 25.0)
        at50 = estimate_offset(np.repeat(lips, 2, axis=0), shift_audio(pcm, 16000, k / 25.0), 16000, 50.0)
        assert abs(at25.offset_frames - k) <= 1 and abs(at50.offset_frames - 2 * k) <= 2, (k, at25, at50)


def test_abstains_on_no_speech_no_face_and_too_short(tracked) -> None:  # noqa: ANN001
    _, landmarks, pcm = tracked[2]
    lips = lip_shape(landmarks)
    silent = estimate_offset(lips, np.zeros_like(pcm), 16000, 25.0)
    hum = estimate_offset(lips, 1e-4 * np.random.default_rng(0).standard_normal(len(pcm)), 16000, 25.0)
    faceless = estimate_offset(np.full_like(lips, np.nan), pcm, 16000, 25.0)
    short = estimate_offset(lips[:20], pcm[: 20 * 640], 16000, 25.0)
    assert (silent.reason, hum.reason, faceless.reason, short.reason) == (
        NO_SPEECH,
        NO_SPEECH,
        NO_FACE,
        TOO_SHORT,
    )
    for est in (silent, hum, faceless, short):
        assert est.abstained and not est.confident and est.confidence == 0.0
    noise = np.random.default_rng(1).standard_normal(len(pcm)).astype(np.float32) * 0.1
    unrelated = estimate_offset(lips, noise, 16000, 25.0)  # sound, but nothing the mouth says
    assert unrelated.abstained and unrelated.reason == LOW_CONFIDENCE, unrelated.to_dict()


def test_abstentions_from_video_files(tmp_path: Path, synth_corpus: Path) -> None:
    """A clip with no speech, a face-less clip and a clip shorter than 1 s: an abstention with its reason."""
    rng = np.random.default_rng(0)
    video = str(next(synth_corpus.glob("en/*/clip000.mp4")))
    frames = read_frames(video, 25.0)
    silent, faceless, short = (tmp_path / f"{n}.mp4" for n in ("silent", "faceless", "short"))
    write_video(str(silent), frames, 25.0, audio=np.zeros(len(frames) * 640, np.float32), sample_rate=16000)
    noise = rng.integers(0, 255, frames.shape, dtype=np.uint8)
    write_video(str(faceless), noise, 25.0, audio=read_audio(video), sample_rate=16000)
    write_video(str(short), frames[:20], 25.0, audio=read_audio(video)[: 20 * 640], sample_rate=16000)
    reasons = {}
    for path in (silent, faceless, short):
        done = subprocess.run([*LIPSYNC, "offset", str(path), "--json"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["abstained"] and result["confidence"] == 0.0
        reasons[path.stem] = result["reason"]
    assert reasons == {"silent": NO_SPEECH, "faceless": NO_FACE, "short": TOO_SHORT}


def test_projection_round_trips_and_a_fit_recovers_the_sync_direction(tracked, tmp_path: Path) -> None:  # noqa: ANN001
    """fit_projection on in-sync clips gives a projection that reads their held-out sibling's shifts."""
    items = [(lip_shape(lm), pcm, 16000, 25.0) for _, lm, pcm in tracked[:5]]
    projection = fit_projection(items, names=[f"clip{i}" for i in range(5)])
    assert projection.video.shape == (27 * 5, 3) and projection.audio.shape == (18 * 5, 3)
    assert projection.weights[0] > 0.3, projection.weights
    path = tmp_path / "projection.json"
    path.write_text(json.dumps(projection.to_json()))
    again = load_projection(str(path))
    np.testing.assert_allclose(again.video, projection.video, atol=1e-6)
    _, landmarks, pcm = tracked[5]
    for k in (-6, 0, 5):
        est = estimate_offset(
            lip_shape(landmarks), shift_audio(pcm, 16000, k / 25.0), 16000, 25.0, projection=again
        )
        assert abs(est.offset_frames - k) <= 1, (k, est.to_dict())
    with pytest.raises(BadInput, match="projection"):
        load_projection(str(tmp_path / "missing.json"))


def test_the_shipped_projection_is_the_fit_the_benchmark_writes() -> None:
    shipped = load_projection()
    assert isinstance(shipped, SyncProjection)
    assert any(name.startswith("synth/") for name in shipped.fitted_on)
    assert sum(not name.startswith("synth/") for name in shipped.fitted_on) >= 11  # the real clips


def _syncnet_v2_weights(path: Path) -> str:
    """A syncnet_v2.model-format state dict (random weights: the loading path is what is tested)."""
    from models.syncnet_v2 import SyncNetV2

    torch.manual_seed(0)
    torch.save(SyncNetV2().state_dict(), path)
    return str(path)


def test_meter_choice(tmp_path: Path, tracked) -> None:  # noqa: ANN001
    """build_meter gives each meter; network meters read SyncNet's protocol with their own threshold."""
    from pipeline.lse import SyncNetV2Embedder, lse_of_clip

    assert isinstance(build_meter(MeterConfig()), LandmarkMeter)
    with pytest.raises(BadInput, match="needs weights"):
        build_meter(MeterConfig("syncnet_v2"))
    with pytest.raises(BadInput, match="unknown meter"):
        build_meter(MeterConfig("syncnet_v3"))
    with pytest.raises(BadInput, match="do not exist"):
        build_meter(MeterConfig("syncnet_v2", weights=str(tmp_path / "none.model")))
    weights = _syncnet_v2_weights(tmp_path / "syncnet_v2.model")
    meter = build_meter(MeterConfig("syncnet_v2", weights=weights))
    assert isinstance(meter, NetworkMeter) and meter.min_confidence == 3.0
    frames, landmarks, pcm = tracked[0]
    frames, landmarks, pcm = frames[:40], landmarks[:40], pcm[: 40 * 640]
    est = meter.measure(frames, landmarks, pcm, 16000, 25.0, max_lag=4)
    reference = lse_of_clip(SyncNetV2Embedder(weights), frames, landmarks, pcm, 16000, 25.0, vshift=4)
    assert est.meter == "syncnet_v2" and est.offset_frames == reference.av_offset_frames
    assert est.confidence == pytest.approx(reference.lse_c) and est.abstained == (reference.lse_c < 3.0)
