"""Evaluation: the LSE protocol, model-free sync, quality measures, scoring at scale and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support.evaluation import _faceless_video

from core.errors import BadInput
from evaluation.clip_scorer import ClipScorer
from evaluation.inputs import discover_inputs
from evaluation.score_config import ScoreConfig
from evaluation.sync import align_transcript, openness_envelope_r, viseme_agreement
from models.syncnet_v2 import SyncNetV2, load_syncnet_v2, mfcc, mfcc_windows
from pipeline import phonemes as ph
from pipeline.lse import (
    lse_from_embeddings,
    pairwise_distances,
    window_count,
)
from pipeline.sentences import SENTENCES

LIPSYNC = [sys.executable, "-m", "lipsync.cli"]


def _one_hot(n: int, dim: int) -> np.ndarray:
    return np.eye(dim)[:n]


def _expected_mean_distances(audio_of_video: list[int | None], n: int, vshift: int) -> np.ndarray:
    """Brute force: video window i is audio window audio_of_video[i] (None: a vector matching nothing)."""
    out = np.zeros(2 * vshift + 1)
    for j, s in enumerate(range(-vshift, vshift + 1)):
        total = 0.0
        for i, match in enumerate(audio_of_video):
            k = i + s
            if not 0 <= k < n:
                total += 1.0  # distance of a unit vector to the zero padding
            else:
                total += 0.0 if match == k else np.sqrt(2.0)  # orthogonal unit vectors
        out[j] = total / n
    return out


@pytest.mark.parametrize("offset", [-7, -1, 0, 3, 12])
def test_lse_on_one_hot_embeddings_gives_the_known_offset_distance_and_confidence(offset: int) -> None:
    n, vshift = 40, 15
    audio = _one_hot(n, 2 * n)
    audio_of_video = [i + offset if 0 <= i + offset < n else None for i in range(n)]
    video = np.stack(
        [audio[m] if m is not None else np.eye(2 * n)[n + i] for i, m in enumerate(audio_of_video)]
    )
    result = lse_from_embeddings(video, audio, vshift)
    expected = _expected_mean_distances(audio_of_video, n, vshift)
    assert result.av_offset_frames == offset  # video i shows what audio i + offset says: the audio lags
    assert result.lse_d == pytest.approx(expected.min(), abs=1e-4)
    assert result.lse_d == pytest.approx(abs(offset) / n, abs=1e-4)  # only the unmatched windows cost
    assert result.lse_c == pytest.approx(np.median(expected) - expected.min(), abs=1e-4)
    np.testing.assert_allclose(result.mean_distances, expected, atol=1e-4)
    assert result.n_windows == n


def test_lse_confidence_falls_as_the_embeddings_get_noisier() -> None:
    rng = np.random.default_rng(0)
    n, dim, offset = 60, 64, -4
    audio = rng.normal(size=(n, dim))
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    confidences = []
    for noise in (0.1, 0.5, 1.0):
        video = np.roll(audio, -offset, axis=0) + noise * rng.normal(size=(n, dim)) / np.sqrt(dim)
        result = lse_from_embeddings(video, audio)
        assert result.av_offset_frames == offset
        confidences.append(result.lse_c)
    assert confidences[0] > confidences[1] > confidences[2] > 0


def test_distances_match_syncnet_python_calc_pdist() -> None:
    """Row i, column j: ||video[i] - audio[i + j - vshift]|| with zero padding, as the reference's loop."""
    rng = np.random.default_rng(1)
    video, audio = rng.normal(size=(9, 5)), rng.normal(size=(9, 5))
    vshift = 3
    padded = np.concatenate([np.zeros((vshift, 5)), audio, np.zeros((vshift, 5))])
    expected = np.array(
        [[np.linalg.norm(video[i] - padded[i + j] + 1e-6) for j in range(2 * vshift + 1)] for i in range(9)]
    )
    np.testing.assert_allclose(pairwise_distances(video, audio, vshift), expected)


def test_window_count_follows_the_reference() -> None:
    assert window_count(100, 64000, 16000, 25.0) == 95  # min(frames, len(audio) // 640) - 5
    assert window_count(100, 32000, 16000, 25.0) == 45
    assert window_count(4, 64000, 16000, 25.0) == 0


def test_syncnet_v2_loads_a_state_dict_and_matches_the_reference_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SyncNetV2().eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Keys and shapes of joonson/syncnet_python's S (SyncNetModel.py), i.e. of syncnet_v2.model.
    assert shapes["netcnnaud.0.weight"] == (64, 1, 3, 3)
    assert shapes["netcnnaud.18.weight"] == (512, 256, 5, 4)
    assert shapes["netcnnlip.0.weight"] == (96, 3, 5, 7, 7)
    assert shapes["netcnnlip.18.weight"] == (512, 256, 1, 6, 6)
    assert shapes["netfcaud.3.weight"] == shapes["netfclip.3.weight"] == (1024, 512)
    path = tmp_path / "syncnet_v2.model"
    torch.save(model.state_dict(), path)
    loaded = load_syncnet_v2(str(path))
    lips = torch.rand(2, 3, 5, 224, 224) * 255  # two windows: BatchNorm1d in eval mode takes any batch
    mfccs = torch.randn(2, 1, 13, 20)
    with torch.inference_mode():
        assert loaded.forward_lip(lips).shape == (2, 1024)
        torch.testing.assert_close(loaded.forward_aud(mfccs), model.forward_aud(mfccs))
        torch.testing.assert_close(loaded.forward_lip(lips), model.forward_lip(lips))


def test_syncnet_v2_loader_refuses_wrong_files(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="do not exist"):
        load_syncnet_v2(str(tmp_path / "missing.model"))
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(BadInput, match="cannot be read"):
        load_syncnet_v2(str(garbage))
    other = tmp_path / "other.model"
    torch.save(torch.nn.Linear(3, 3).state_dict(), other)
    with pytest.raises(BadInput, match="do not fit"):
        load_syncnet_v2(str(other))


def test_mfcc_follows_python_speech_features_framing() -> None:
    sr = 16000
    t = np.arange(sr) / sr
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    ceps = mfcc(pcm, sr)
    assert ceps.shape == (13, 1 + int(np.ceil((sr - 400) / 160)))  # 25 ms frames every 10 ms, end padded
    frames = np.lib.stride_tricks.sliding_window_view(np.append(pcm[0], pcm[1:] - 0.97 * pcm[:-1]), 400)[
        ::160
    ]
    energy = (np.abs(np.fft.rfft(frames * 32768.0, 512)) ** 2 / 512).sum(axis=1)
    np.testing.assert_allclose(ceps[0, : len(energy)], np.log(energy), rtol=1e-4)  # c0 = log frame energy
    windows = mfcc_windows(pcm, 20, sr, 25.0)
    assert windows.shape == (20, 1, 13, 20)
    np.testing.assert_array_equal(windows[3, 0], ceps[:, 12:32])  # window i starts at MFCC frame 4 i


def _timeline() -> list[ph.Phoneme]:
    return ph.phoneme_timeline("Papa bought a big map of Bombay.", "en")


def test_viseme_agreement_is_high_in_sync_and_falls_when_the_mouth_is_shifted() -> None:
    phonemes = _timeline()
    n = int(phonemes[-1].end_ms / 40) + 10
    mouth = ph.openness_per_frame(phonemes, n, 25.0, shift_ms=-ph.MOUTH_LEAD_MS)  # as a mouth leads
    in_sync = viseme_agreement(mouth, phonemes)
    assert in_sync.n_bilabial >= 6 and in_sync.n_open_vowel >= 3
    assert in_sync.agreement >= 0.9
    for shift in (-5, 5):
        late = viseme_agreement(np.roll(mouth, shift), phonemes)
        assert late.agreement < in_sync.agreement - 0.2


def _input(video: str, **fields: str) -> dict[str, str]:
    row = {k: "" for k in ("audio", "speaker", "split", "transcript", "timeline", "phonemes", "source")}
    row.update(reference="", input_status="", input_reason="", injected_offset_frames="")
    return {**row, "id": Path(video).stem, "video": video, "language": "en", "system": "test", **fields}


def test_unscorable_videos_are_rows_with_a_reason(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(4096))
    scorer = ClipScorer(ScoreConfig())
    rows = {
        "corrupt": scorer.score(_input(str(corrupt))),
        "missing": scorer.score(_input(str(tmp_path / "missing.mp4"))),
        "faceless": scorer.score(_input(str(_faceless_video(tmp_path / "faceless.mp4")))),
        "not_generated": scorer.score(_input("", id="x", input_status="failed", input_reason="no_face")),
    }
    assert {k: (r["status"], r["reason"]) for k, r in rows.items()} == {
        "corrupt": ("failed", "unreadable"),
        "missing": ("failed", "not_found"),
        "faceless": ("failed", "no_face"),
        "not_generated": ("skipped", "no_face"),
    }
    assert all(r["message"] for r in rows.values())


def test_inputs_from_generation_outputs(tmp_path: Path) -> None:
    pd.DataFrame(
        {
            "id": ["a", "b"],
            "video": ["/src/a.mp4", "/src/b.mp4"],
            "audio": ["/speech/a.wav", "/speech/b.wav"],
            "language": ["hi", "es"],
            "speaker": ["", ""],
            "status": ["ok", "failed"],
            "reason": ["", "no_face"],
            "output": ["videos/a.mp4", ""],
        }
    ).to_parquet(tmp_path / "outputs.parquet")
    rows = discover_inputs(str(tmp_path))
    assert [(r["id"], r["video"], r["source"], r["audio"], r["input_status"]) for r in rows] == [
        ("a", str(tmp_path / "videos" / "a.mp4"), "/src/a.mp4", "", "ok"),
        ("b", "", "/src/b.mp4", "", "failed"),
    ]
    assert {r["system"] for r in rows} == {tmp_path.name}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIPSYNC, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["score", "/nonexistent/videos", "OUT"], "/nonexistent/videos"),
        (["report", "/nonexistent/scores", "OUT"], "do not exist"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    done = _cli(*[a.replace("OUT", str(tmp_path / "out")) for a in args], "--json")
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["exit_code"] == 2


@pytest.mark.parametrize("fps", [25.0, 50.0])
def test_openness_is_read_against_the_envelope_at_the_mouths_lead(fps: float) -> None:
    rng = np.random.default_rng(0)
    envelope = np.convolve(rng.standard_normal(400), np.hanning(9), "same")  # syllable-rate wobble
    lead = round(ph.MOUTH_LEAD_MS * fps / 1000)
    ahead = np.concatenate([envelope[lead:], np.zeros(lead)])  # the mouth shapes each sound before it
    behind = np.concatenate([np.zeros(lead), envelope[:-lead]])
    assert openness_envelope_r(ahead, envelope, fps) > 0.99
    assert openness_envelope_r(envelope, envelope, fps) < 0.9  # no lead: marked down
    assert openness_envelope_r(behind, envelope, fps) < openness_envelope_r(envelope, envelope, fps)


def test_a_transcript_aligns_the_same_whatever_was_spoken_before() -> None:
    """Scoring's transcript timeline (and so viseme agreement) must not depend on the order clips are
    scored in: espeak-ng speaks each transcript from the same state."""
    import librosa

    text = SENTENCES["en"][0]
    clip = ph.synthesize(text, "en", ph.VoiceStyle("m3", rate_wpm=150, pitch=40))
    audio = librosa.resample(clip.pcm.astype(np.float32) / 32768.0, orig_sr=clip.sample_rate, target_sr=16000)
    first = align_transcript(text, "en", audio, 16000)
    ph.synthesize(SENTENCES["es"][0], "es", ph.VoiceStyle("f2", rate_wpm=190, pitch=70))
    assert align_transcript(text, "en", audio, 16000) == first
