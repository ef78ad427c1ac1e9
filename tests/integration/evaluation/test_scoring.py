"""Evaluation: the LSE protocol, model-free sync, quality measures, scoring at scale and the report."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support.evaluation import _faceless_video

from evaluation import quality
from evaluation.score_config import ScoreConfig
from evaluation.sync import align_transcript, landmark_sync, timeline_from_document
from models.syncnet_v2 import SyncNetV2
from pipeline.landmarks import FaceMeshTracker, smooth_landmarks
from pipeline.lse import (
    SyncNetEmbedder,
    SyncNetV2Embedder,
    lse_of_clip,
)
from pipeline.media import read_audio, read_frames, shift_audio

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
    for row in rows:
        row["source"], row["emotion"] = "", ""
    rows[0]["source"], rows[0]["emotion"] = rows[0]["video"], "neutral"  # scored against itself
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
    assert ok["expr_smile"].notna().all() and ok["expr_class"].ne("").all()  # every face has an expression
    itself = ok[ok["expr_smile_mad"].notna()]  # only the row scored against a source has the paired columns
    assert (
        len(itself) == 1 and itself["expr_smile_mad"].iloc[0] < 0.5
    )  # corner lift: the same face, unchanged
    assert summary["emotions"]["neutral"]["scored"] == 1
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
    assert [r["name"] for r in doc["emotion_table"]["rows"]] == ["corpus / neutral", "corpus / untagged"]
    assert "Facial expression" in (tmp_path / "report" / "report.html").read_text()
    _check_report_in_chromium(tmp_path / "report" / "report.html", tmp_path / "report" / "screenshot.png")


OFFSETS = (-6, -4, -2, 0, 2, 4, 6)


def pooled_viseme_agreement(table: pd.DataFrame) -> pd.Series:
    """Viseme agreement per (language, K) over all its clips' phonemes: closed bilabials over all bilabials and
    open vowels over all open vowels, then their mean. A mean of per-clip agreements lets a clip with one
    bilabial swing a whole language by half a point."""
    hits = table.assign(
        closed=table["bilabial_closed"].fillna(0) * table["n_bilabial"],
        opened=table["open_vowel_open"].fillna(0) * table["n_open_vowel"],
    )
    sums = hits.groupby(["language", "injected_offset_frames"])[
        ["closed", "n_bilabial", "opened", "n_open_vowel"]
    ].sum()
    return (sums["closed"] / sums["n_bilabial"] + sums["opened"] / sums["n_open_vowel"]) / 2


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
    agreement = pooled_viseme_agreement(table).unstack()
    for language, by_k in agreement.iterrows():
        for k in (-6, -4, 4, 6):
            assert by_k[0] > by_k[k], (language, by_k.to_dict())


@pytest.mark.slow
@pytest.mark.media
def test_real_clips_with_shifted_audio_move_the_estimate(
    shared_media: Path, tracker: FaceMeshTracker
) -> None:
    """The real clips with their audio shifted by K frames: the landmark estimate moves by K +- 1. Decoded
    as scoring decodes (its size cap, the first 10 s), not at full resolution."""
    from evaluation.clip_scorer import decode

    misses = []
    for video in sorted(shared_media.glob("*.mp4")):
        frames, pcm = decode(str(video), ScoreConfig(max_seconds=10.0))
        track = tracker.track(frames)
        smooth = smooth_landmarks(track.landmarks, track.found)
        base = landmark_sync(smooth, pcm, 16000, 25.0)[1]["landmark_offset_frames"]
        for k in (-6, -3, 3, 6):
            moved = landmark_sync(smooth, shift_audio(pcm, 16000, k / 25.0), 16000, 25.0)[1]
            if abs(moved["landmark_offset_frames"] - base - k) > 1:
                misses.append((video.name, k, base, moved["landmark_offset_frames"]))
    assert not misses, misses
