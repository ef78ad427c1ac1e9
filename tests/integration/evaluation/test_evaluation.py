"""Evaluation: the LSE protocol, model-free sync, quality measures, scoring at scale and the report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.errors import BadInput
from evaluation import quality
from evaluation.clip_scorer import ClipScorer
from evaluation.inputs import discover_inputs
from evaluation.score_config import ScoreConfig
from evaluation.sync import align_transcript, landmark_sync, timeline_from_document, viseme_agreement
from models.syncnet_v2 import SyncNetV2, load_syncnet_v2, mfcc, mfcc_windows
from pipeline import phonemes as ph
from pipeline.landmarks import FaceMeshTracker, smooth_landmarks
from pipeline.lse import (
    SyncNetEmbedder,
    SyncNetV2Embedder,
    lse_from_embeddings,
    lse_of_clip,
    pairwise_distances,
    window_count,
)
from pipeline.media import read_audio, read_frames, shift_audio, write_video

LIPSYNC = [sys.executable, "-m", "lipsync.cli"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


# --- LSE on embeddings built so the answer is known --------------------------------------------------------
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


# --- syncnet_v2 port ---------------------------------------------------------------------------------------
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


def _clip(corpus: Path, index: int = 0) -> tuple[Path, dict[str, str]]:
    rows = list(csv.DictReader((corpus / "manifest.csv").open(encoding="utf-8")))
    return corpus / rows[index]["video"], rows[index]


@pytest.fixture(scope="module")
def tracker() -> FaceMeshTracker:
    return FaceMeshTracker(max_faces=1)


def test_lse_of_a_clip_runs_both_syncnets_with_random_weights(
    synth_corpus: Path, tmp_path: Path, tracker: FaceMeshTracker
) -> None:
    from models.checkpoint import checkpoint_payload, save_checkpoint
    from models.registry import build_model

    torch.manual_seed(0)
    ours = save_checkpoint(
        str(tmp_path / "syncnet"), checkpoint_payload(build_model("syncnet"), "syncnet", 96, 0)
    )
    v2 = tmp_path / "syncnet_v2.model"
    torch.save(SyncNetV2().state_dict(), v2)
    video, _ = _clip(synth_corpus)
    frames, pcm = read_frames(str(video), 25.0)[:30], read_audio(str(video))[: 30 * 640]
    track = tracker.track(frames)
    landmarks = smooth_landmarks(track.landmarks, track.found)
    # syncnet_v2's 3-D convolutions at 224 px are slow on CPU: a few windows are enough here
    for embedder, n_frames in (
        (SyncNetEmbedder(ours, batch=16), 30),
        (SyncNetV2Embedder(str(v2), batch=4), 10),
    ):
        result = lse_of_clip(
            embedder, frames[:n_frames], landmarks[:n_frames], pcm[: n_frames * 640], vshift=3
        )
        assert result.n_windows == n_frames - 5 and len(result.mean_distances) == 7
        assert np.isfinite(result.lse_d) and result.lse_c >= 0 and abs(result.av_offset_frames) <= 3


# --- model-free sync ---------------------------------------------------------------------------------------
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


def test_landmark_sync_recovers_a_shift_of_the_audio(synth_corpus: Path, tracker: FaceMeshTracker) -> None:
    """Synth clips with their audio delayed or advanced by k frames: the meter reads k +- 1, and it is
    confident on most of them (4 s clips are near its limit)."""
    confident = []
    for index in range(6):
        video, _ = _clip(synth_corpus, index)
        frames, pcm = read_frames(str(video), 25.0), read_audio(str(video))
        track = tracker.track(frames)
        smooth = smooth_landmarks(track.landmarks, track.found)
        for k in (0, -4, 3):
            est, scores = landmark_sync(smooth, shift_audio(pcm, 16000, k / 25.0), 16000, 25.0)
            assert abs(scores["landmark_offset_frames"] - k) <= 1, (video, k, scores)
            assert scores["landmark_abstained"] == est.abstained
            confident.append(est.confident)
        if index == 0:
            assert landmark_sync(smooth, pcm, 16000, 25.0)[1]["openness_envelope_correlation"] > 0.3
    assert np.mean(confident) >= 0.8, confident


def test_transcript_alignment_lands_on_the_clip_timeline(synth_corpus: Path) -> None:
    """espeak-ng's default voice, warped onto a synth speaker's audio, matches the clip's own timeline."""
    for index in (0, 2, 4):  # en, es, hi
        video, row = _clip(synth_corpus, index)
        truth = timeline_from_document((synth_corpus / row["timeline"]).read_text())
        aligned = align_transcript(row["transcript"], row["language"], read_audio(str(video)), 16000)
        kept = [a for a in aligned if a.start_ms <= truth[-1].end_ms + 100][: len(truth)]
        errors = [abs(a.start_ms - b.start_ms) for a, b in zip(kept, truth, strict=False)]
        assert np.median(errors) < 40, (row["language"], np.median(errors))


# --- quality -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def face_clip(synth_corpus: Path, tracker: FaceMeshTracker) -> tuple[np.ndarray, np.ndarray]:
    video, _ = _clip(synth_corpus, 1)
    frames = read_frames(str(video), 25.0)[:60]
    track = tracker.track(frames)
    return frames, smooth_landmarks(track.landmarks, track.found)


def test_psnr_ssim_against_a_reference(face_clip: tuple[np.ndarray, np.ndarray]) -> None:
    frames, _ = face_clip
    same = quality.psnr_ssim(frames, frames)
    assert same == {"psnr": quality.PSNR_CAP, "ssim": pytest.approx(1.0)}
    noisy = np.clip(frames + np.random.default_rng(0).normal(0, 8, frames.shape), 0, 255).astype(np.uint8)
    worse = quality.psnr_ssim(noisy, frames)
    assert 25 < worse["psnr"] < 40 and worse["ssim"] < 0.95


def test_a_blurred_mouth_loses_sharpness_against_the_face(face_clip: tuple[np.ndarray, np.ndarray]) -> None:
    import cv2

    frames, landmarks = face_clip
    blurred = frames.copy()
    for t in range(len(frames)):
        x0, y0, x1, y1 = quality.region_box(landmarks[t, list(quality.LIPS_POINTS)]).astype(int)
        blurred[t, y0:y1, x0:x1] = cv2.GaussianBlur(frames[t, y0:y1, x0:x1], (9, 9), 3)
    sharp, soft = quality.sharpness(frames, landmarks), quality.sharpness(blurred, landmarks)
    assert soft["mouth_sharpness"] < 0.5 * sharp["mouth_sharpness"]
    assert soft["upper_face_sharpness"] == pytest.approx(sharp["upper_face_sharpness"])
    assert soft["mouth_to_face_sharpness"] < 0.5 * sharp["mouth_to_face_sharpness"]


def test_jitter_and_flicker_grow_with_added_instability(face_clip: tuple[np.ndarray, np.ndarray]) -> None:
    frames, landmarks = face_clip
    rng = np.random.default_rng(0)
    shaky = landmarks + rng.normal(0, 1.5, landmarks.shape).astype(np.float32)
    assert quality.landmark_jitter(shaky) > 3 * quality.landmark_jitter(landmarks)
    flickering = frames.astype(np.int16)
    flickering[1::2] += 25  # every other frame brighter
    flickering = np.clip(flickering, 0, 255).astype(np.uint8)
    assert quality.mouth_flicker(flickering, landmarks) > 2 * quality.mouth_flicker(frames, landmarks)


def test_upper_face_consistency_sees_a_flattened_expression(face_clip: tuple[np.ndarray, np.ndarray]) -> None:
    _, landmarks = face_clip
    same = quality.upper_face_consistency(landmarks, landmarks)
    assert same["upper_face_shape_distance"] == pytest.approx(0.0, abs=1e-9)
    assert same["upper_face_motion_ratio"] == pytest.approx(1.0)
    moving = landmarks.copy()
    lift = 0.04 * quality.inter_ocular(landmarks)[:, None] * np.sin(np.arange(len(landmarks)) / 3.0)[:, None]
    brows = list(quality.RIGHT_BROW_POINTS + quality.LEFT_BROW_POINTS)
    moving[:, brows, 1] -= lift  # the source raises its brows rhythmically
    frozen = landmarks.copy()  # the output keeps them still
    result = quality.upper_face_consistency(frozen, moving)
    assert result["upper_face_motion_ratio"] < 0.5
    assert quality.upper_face_consistency(moving, moving)["brow_motion_correlation"] == pytest.approx(1.0)


# --- scoring -----------------------------------------------------------------------------------------------
def _faceless_video(path: Path) -> Path:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(40, 128, 128, 3), dtype=np.uint8)
    audio = (0.2 * rng.normal(size=16000 * 40 // 25)).astype(np.float32)
    write_video(str(path), frames, 25.0, audio=audio)
    return path


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


def _check_report_in_chromium(html: Path, screenshot: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian chromium is missing: apt-get install -y chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(html.resolve().as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)"
            )
            page.screenshot(path=str(screenshot), full_page=True)
            title = page.title()
        finally:
            browser.close()
    assert not errors, errors
    assert len(widths) >= 4 and all(w > 0 for w in widths), widths
    assert title == "Lip-sync evaluation report"
    assert screenshot.stat().st_size > 10_000


def test_score_on_an_actor_pool_then_report(synth_corpus: Path, tmp_path: Path, ray_session) -> None:  # noqa: ANN001
    from evaluation.report import run as report
    from evaluation.score import run as score

    corpus = tmp_path / "corpus"
    rows = list(csv.DictReader((synth_corpus / "manifest.csv").open(encoding="utf-8")))
    for row in rows:
        row["video"] = str(synth_corpus / row["video"])
        row["timeline"] = str(synth_corpus / row["timeline"])
    rows.append({**rows[0], "video": str(_faceless_video(tmp_path / "faceless.mp4")), "timeline": ""})
    corpus.mkdir()
    with (corpus / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    out = tmp_path / "scores"
    cfg = ScoreConfig(calibration_min_clips=1)
    result = score(cfg, str(corpus / "manifest.csv"), str(out), calibration_out=str(out / "calibration.json"))
    table = pd.read_parquet(out / "scores.parquet")
    assert len(table) == 7 and result["scored"] == 6
    assert table.loc[table["status"] != "ok", "reason"].tolist() == ["no_face"]
    ok = table[table["status"] == "ok"]
    assert ok["landmark_offset_frames"].abs().max() <= 1
    assert ok["timeline_source"].eq("json").all() and ok["viseme_agreement"].notna().all()
    assert ok["worker_pid"].nunique() == 2 and os.getpid() not in set(ok["worker_pid"])  # two actors
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["languages"]) == {"en", "es", "hi"} and summary["overall"]["videos"] == 7
    assert summary["systems"]["corpus"]["not_scored_by_reason"] == {"no_face": 1}
    calibration = json.loads((out / "calibration.json").read_text())
    assert set(calibration["languages"]) == {"en", "es", "hi"}
    assert all(abs(e["offset_frames"]) <= 1 for e in calibration["languages"].values())

    mos = tmp_path / "mos.json"
    mos.write_text(json.dumps({"systems": {"corpus": {"sync": {"mos": 4.0, "ci95": [3.8, 4.2], "n": 20}}}}))
    written = report(str(out), str(tmp_path / "report"), mos=str(mos))
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    system = doc["systems"]["corpus"]
    objective = system["coverage"] * np.mean(list(system["components"].values()))
    assert system["overall"] == pytest.approx(100 * (0.5 * objective + 0.5 * 0.75), abs=0.02)
    assert written["systems"] == {"corpus": system["overall"]}
    _check_report_in_chromium(tmp_path / "report" / "report.html", tmp_path / "report" / "screenshot.png")


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


# --- acceptance on generated and real clips (minutes) -------------------------------------------------------
OFFSETS = (-6, -4, -2, 0, 2, 4, 6)


@pytest.mark.slow
def test_synth_offsets_landmark_sync_and_viseme_agreement(tmp_path: Path, ray_session) -> None:  # noqa: ANN001
    """Synth clips made with --offset-frames K: the landmark offset is K +- 1 for >= 95 % of clips, and viseme
    agreement is higher at K = 0 than at every |K| >= 4, in every language."""
    from evaluation.score import run as score
    from pipeline.synth import SynthConfig
    from pipeline.synth import run as synth

    rows = []
    for k in OFFSETS:
        corpus = tmp_path / f"k{k}"
        synth(
            SynthConfig(
                languages=("en", "es", "hi"), speakers=3, clips_per_speaker=1, offset_frames=k, seed=7
            ),
            str(corpus),
        )
        for row in csv.DictReader((corpus / "manifest.csv").open(encoding="utf-8")):
            rows.append(
                {
                    **row,
                    "video": str(corpus / row["video"]),
                    "timeline": str(corpus / row["timeline"]),
                    "system": f"K={k}",
                }
            )
    manifest = tmp_path / "all.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    score(ScoreConfig(), str(manifest), str(tmp_path / "out"))
    table = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert (table["status"] == "ok").all()
    error = (table["landmark_offset_frames"] - table["injected_offset_frames"]).abs()
    assert (error <= 1).mean() >= 0.95, table[["system", "language", "landmark_offset_frames"]]
    agreement = table.groupby(["language", "injected_offset_frames"])["viseme_agreement"].mean().unstack()
    for language, by_k in agreement.iterrows():
        for k in (-6, -4, 4, 6):
            assert by_k[0] > by_k[k], (language, by_k.to_dict())


@pytest.mark.slow
@pytest.mark.media
def test_real_clips_with_shifted_audio_move_the_estimate(
    shared_media: Path, tracker: FaceMeshTracker
) -> None:
    """The real clips with their audio shifted by K frames: the landmark estimate moves by K +- 1."""
    misses = []
    for video in sorted(shared_media.glob("*.mp4")):
        frames = read_frames(str(video), 25.0)[:250]
        pcm = read_audio(str(video))[: len(frames) * 640]
        track = tracker.track(frames)
        smooth = smooth_landmarks(track.landmarks, track.found)
        base = landmark_sync(smooth, pcm, 16000, 25.0)[1]["landmark_offset_frames"]
        for k in (-6, -3, 3, 6):
            moved = landmark_sync(smooth, shift_audio(pcm, 16000, k / 25.0), 16000, 25.0)[1]
            if abs(moved["landmark_offset_frames"] - base - k) > 1:
                misses.append((video.name, k, base, moved["landmark_offset_frames"]))
    assert not misses, misses
