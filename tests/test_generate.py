"""`lipsync generate` with a random-weight checkpoint on generated clips, plus its post-processing parts.

One generation run (module fixture, through the CLI) covers: a 25 fps clip with longer mp3 audio
(ping-pong extension), a 30 fps clip with shorter 8 kHz audio (trim), a 720x1280 portrait clip whose
face is hidden by a black box for some frames, and three pairs that must fail with reasons.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import require_tool

from core.config import config_hash, load_config
from core.errors import BadInput
from evaluation import postprocess as pp
from evaluation.calibration import (
    Calibration,
    calibration_from_offsets,
    load_calibration,
    save_calibration,
)
from evaluation.generate import GenerateConfig, read_pairs
from lipsync.cli import main
from pipeline.crops import crop_boxes
from pipeline.landmarks import FaceMeshTracker, smooth_landmarks
from pipeline.media import MediaError, iter_frames, probe, read_audio, read_frames
from pipeline.offset import OffsetEstimate

SECONDS = 0.8
HIDDEN = range(6, 12)  # portrait frames with a black box over the face


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _face_box(video: Path, scale: float, top: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) covering the face of a clip's first frame with a margin, scaled and shifted down."""
    track = FaceMeshTracker(max_faces=1).track(read_frames(video, fps=None)[:1])
    assert track.found[0], "no face in the synth clip"
    points = track.landmarks[0, :, :2]
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    margin = 0.25 * (x1 - x0)
    x0, y0, x1, y1 = x0 - margin, y0 - margin, x1 + margin, y1 + margin
    return int(x0 * scale), int(y0 * scale) + top, int((x1 - x0) * scale), int((y1 - y0) * scale)


def _make_inputs(corpus: Path, d: Path) -> None:
    manifest = pd.read_csv(corpus / "manifest.csv")
    face = str(corpus / manifest["video"][0])
    other = str(corpus / manifest["video"][len(manifest) - 1])
    codec = ["-c:v", "libx264", "-crf", "18", "-pix_fmt", "yuv420p", "-c:a", "aac"]
    _ffmpeg("-i", face, "-t", str(SECONDS), *codec, str(d / "face25.mp4"))
    _ffmpeg("-i", other, "-vn", "-t", "1.2", "-ar", "44100", "-ac", "2", str(d / "speech.mp3"))
    _ffmpeg("-i", face, "-vf", "fps=30", "-t", str(SECONDS), *codec, str(d / "face30.mp4"))
    _ffmpeg("-i", other, "-vn", "-t", "0.6", "-ar", "8000", str(d / "short.wav"))
    x, y, w, h = _face_box(d / "face25.mp4", scale=720 / 256, top=280)
    box = f"drawbox={x}:{y}:{w}:{h}:color=black:t=fill:enable='between(n,{HIDDEN[0]},{HIDDEN[-1]})'"
    portrait = f"scale=720:720,pad=720:1280:0:280,{box}"
    _ffmpeg("-i", face, "-vf", portrait, "-t", str(SECONDS), *codec, str(d / "portrait.mp4"))
    lavfi = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-f", "lavfi", "-i", "sine=frequency=300"]
    _ffmpeg(*lavfi, "-t", str(SECONDS), *codec, str(d / "faceless.mp4"))
    (d / "not_audio.wav").write_text("this is not audio\n")
    rows = [
        "id,video,audio,language,transcript",
        "a25,face25.mp4,speech.mp3,en,Hello world",
        "b30,face30.mp4,short.wav,es,",
        "portrait,portrait.mp4,,hi,",
        "missing,nowhere.mp4,speech.mp3,en,",
        "noaudio,face25.mp4,not_audio.wav,en,",
        "faceless,faceless.mp4,,en,",
    ]
    (d / "pairs.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from models.checkpoint import checkpoint_payload, save_checkpoint
    from models.registry import build_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt")
    return Path(
        save_checkpoint(str(d), checkpoint_payload(build_model("wav2lip", 96), "wav2lip", 96, step=0))
    )


@pytest.fixture(scope="module")
def generated(synth_corpus: Path, checkpoint: Path, ray_session, tmp_path_factory) -> dict:
    """One `lipsync generate --json` run over every pair (small chunks so pairs span several)."""
    require_tool("ffmpeg")
    d = tmp_path_factory.mktemp("generate")
    _make_inputs(synth_corpus, d)
    (d / "generate.yaml").write_text("chunk_seconds: 0.4\nmodel:\n  batch_size: 16\n")
    save_calibration(str(d / "calibration.json"), {"languages": {"es": {"offset_frames": 1}}})
    args = ["generate", str(d / "pairs.csv"), str(d / "out"), "--checkpoint", str(checkpoint)]
    args += ["--config", str(d / "generate.yaml"), "--calibration", str(d / "calibration.json"), "--json"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(args)
    assert code == 0, stdout.getvalue()
    result = json.loads(stdout.getvalue().strip().splitlines()[-1])
    outputs = pd.read_parquet(result["outputs"]).set_index("id")
    return {"dir": d, "result": result, "outputs": outputs}


def _ok(generated: dict, pair: str) -> pd.Series:
    row = generated["outputs"].loc[pair]
    assert row["status"] == "ok", row["message"]
    return row


# --- end to end ---------------------------------------------------------------------------------


def test_failed_pairs_are_rows_with_reasons(generated: dict) -> None:
    out = generated["outputs"]
    assert generated["result"]["ok"] == 3 and generated["result"]["failed"] == 3
    expected = {
        "missing": ("video", "not_found"),
        "noaudio": ("audio", "unreadable"),
        "faceless": ("track", "no_face"),
    }
    for pair, (stage, reason) in expected.items():
        assert (out.loc[pair, "status"], out.loc[pair, "stage"], out.loc[pair, "reason"]) == (
            "failed",
            stage,
            reason,
        )
        assert out.loc[pair, "message"]
    assert not any((generated["dir"] / "out").glob("_parts/*")), "chunk files are cleaned up"


@pytest.mark.parametrize("pair", ["a25", "b30", "portrait"])
def test_duration_fps_and_size_follow_audio_and_source(generated: dict, pair: str) -> None:
    row = _ok(generated, pair)
    d = generated["dir"]
    source = probe(d / {"a25": "face25.mp4", "b30": "face30.mp4", "portrait": "portrait.mp4"}[pair])
    audio = d / {"a25": "speech.mp3", "b30": "short.wav", "portrait": "portrait.mp4"}[pair]
    audio_seconds = len(read_audio(audio, 16000)) / 16000
    info = probe(row["output"])
    assert abs(info.fps - source.fps) < 1e-3 and not info.is_vfr
    assert (info.width, info.height) == (source.width, source.height)
    assert info.has_audio and info.audio_stream is not None
    frames = len(read_frames(row["output"], fps=None))
    assert frames == row["frames"] == round(audio_seconds * source.fps)
    assert abs(info.duration_s - audio_seconds) <= 1.0 / source.fps
    assert row["faces_found"] == row["frames"] - (len(HIDDEN) if pair == "portrait" else 0)


def test_audio_longer_extends_by_ping_pong(generated: dict) -> None:
    row = _ok(generated, "a25")
    source = read_frames(generated["dir"] / "face25.mp4", fps=25.0)
    output = read_frames(row["output"], fps=25.0)
    assert row["source_frames"] == len(source) and len(output) > len(source)
    n = len(source)
    for j in range(n, len(output)):  # the upper (untouched) half follows the mirrored source frame
        k = int(pp.source_indices(j, 1, n)[0])
        assert k == 2 * (n - 1) - j
        upper = slice(0, output.shape[1] // 3)
        assert _psnr(output[j, upper], source[k, upper]) > 38.0, (j, k)


def test_hidden_face_frames_are_passed_through(generated: dict) -> None:
    row = _ok(generated, "portrait")
    source = read_frames(generated["dir"] / "portrait.mp4", fps=25.0)
    output = read_frames(row["output"], fps=25.0)
    for t in HIDDEN:
        assert _psnr(output[t], source[t]) > 45.0, t


def test_only_the_mouth_region_changes(generated: dict) -> None:
    for pair, video in (("a25", "face25.mp4"), ("portrait", "portrait.mp4")):
        source = read_frames(generated["dir"] / video, fps=25.0)
        output = read_frames(_ok(generated, pair)["output"], fps=25.0)[: len(source)]
        track = FaceMeshTracker(max_faces=1).track(source)
        boxes = crop_boxes(smooth_landmarks(track.landmarks, track.found), source.shape)
        outside = np.ones(source.shape[:3], bool)
        inside = np.zeros(source.shape[:3], bool)
        for t, (x0, y0, x1, y1) in enumerate(boxes):
            if np.isfinite(x0):
                pad = 0.1 * (x1 - x0)  # boxes here come from a different tracking run than the pipeline's
                ys, xs = (
                    slice(max(0, int((y0 + y1) / 2 - pad)), int(y1 + pad)),
                    slice(max(0, int(x0 - pad)), int(x1 + pad)),
                )
                outside[t, ys, xs] = False
                inside[t, int((y0 + y1) / 2) + int(pad) : int(y1 - pad), int(x0 + pad) : int(x1 - pad)] = True
        diff = np.abs(output.astype(np.float64) - source).mean(axis=-1)
        assert diff[outside].mean() < 2.0, pair
        assert diff[inside].mean() > 4.0, pair  # the random generator did repaint the mouth


def test_scoring_columns_are_passed_through(generated: dict) -> None:
    outputs = generated["outputs"]
    assert _ok(generated, "a25")["transcript"] == "Hello world"
    assert outputs.loc["b30", "transcript"] == "" and outputs.loc["missing", "transcript"] == ""
    assert {"system", "timeline"} <= set(outputs.columns)


def test_lineage_calibration_and_offsets_recorded(generated: dict, checkpoint: Path) -> None:
    out = generated["outputs"]
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    cfg = load_config(
        GenerateConfig,
        generated["dir"] / "generate.yaml",
        {"calibration": str(generated["dir"] / "calibration.json")},
    )
    assert set(out["checkpoint_sha256"]) == {digest} and set(out["config_hash"]) == {config_hash(cfg)}
    assert out.loc["b30", "mel_offset_frames"] == 1 and out.loc["a25", "mel_offset_frames"] == 0
    for pair in ("a25", "b30", "portrait"):
        row = out.loc[pair]
        assert np.isfinite(row["offset_before"]) and np.isfinite(row["offset_after"])
        assert row["offset_shift_frames"] == 0  # clips under post.min_seconds are never shifted
        assert row["offset_frames_measured"] == row["frames"]  # all of it: shorter than post.measure_seconds
        assert row["seconds"] > 0 and row["stabilised"] == "off"


# --- parts, without Ray ------------------------------------------------------------------------


def test_source_indices_pingpong_loop_freeze() -> None:
    assert pp.source_indices(0, 10, 4).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert pp.source_indices(3, 4, 4, "loop").tolist() == [3, 0, 1, 2]
    assert pp.source_indices(2, 4, 4, "freeze").tolist() == [2, 3, 3, 3]
    assert pp.source_indices(0, 3, 1).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        pp.source_indices(0, 3, 4, "bounce")


@pytest.fixture(scope="module")
def lavfi_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ranges")
    clips = {}
    for name, rate, ext in (("v25", 25, "mp4"), ("v30", 30, "mp4"), ("ts", 25, "ts")):
        clips[name] = d / f"{name}.{ext}"
        _ffmpeg(
            "-f",
            "lavfi",
            "-i",
            f"testsrc2=size=96x64:rate={rate}",
            "-t",
            "3",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            str(clips[name]),
        )
    return clips


@pytest.mark.parametrize("name", ["v25", "v30"])
def test_read_frame_range_equals_full_decode(lavfi_clips: dict[str, Path], name: str) -> None:
    path = str(lavfi_clips[name])
    fps = probe(path).fps
    full = np.concatenate(list(iter_frames(path, fps=fps)))
    for start in (0, 1, fps - 1, 2 * fps - 3, len(full) - 5):
        start = int(start)
        np.testing.assert_array_equal(
            pp.read_frame_range(path, start, start + 5, fps), full[start : start + 5]
        )
    yuv = pp.read_frame_range(path, 10, 12, fps, pix_fmt="yuv420p")
    assert yuv.shape == (2, 64 * 3 // 2, 96)
    assert _psnr(pp.i420_to_rgb(yuv[0]), full[10]) > 35


@pytest.mark.parametrize("name", ["v25", "v30"])
def test_frame_range_reader_runs_on_between_consecutive_ranges(
    lavfi_clips: dict[str, Path], name: str
) -> None:
    """Consecutive ranges come from one ffmpeg; a jump back, another pixel format or the end restarts it;
    every range equals `read_frame_range`'s."""
    path = str(lavfi_clips[name])
    info = probe(path)
    fps = info.fps
    reader = pp.FrameRangeReader()
    ranges = [(0, 10), (10, 27), (27, 40), (20, 30), (30, 33)]
    for i, (start, stop) in enumerate(ranges):
        got = reader.read(path, start, stop, fps, info, pix_fmt="yuv420p")
        np.testing.assert_array_equal(got, pp.read_frame_range(path, start, stop, fps, pix_fmt="yuv420p"))
        assert reader.starts == (1 if i < 3 else 2), (start, stop)  # (20, 30) jumped back
    rgb = reader.read(path, 33, 35, fps, info, pix_fmt="rgb24")
    np.testing.assert_array_equal(rgb, pp.read_frame_range(path, 33, 35, fps))
    assert reader.starts == 3
    n = len(np.concatenate(list(iter_frames(path, fps=fps))))
    with pytest.raises(MediaError) as err:
        reader.read(path, 35, n + 5, fps, info, pix_fmt="rgb24")
    assert err.value.reason == "truncated"
    np.testing.assert_array_equal(
        reader.read(path, n - 3, n, fps, info, pix_fmt="rgb24"), pp.read_frame_range(path, n - 3, n, fps)
    )
    dropped = pp.FrameRangeReader()
    dropped.read(path, 0, 2, fps, info, pix_fmt="rgb24")
    ffmpeg_pid = dropped._running[0].proc.pid  # the ffmpeg left running for the next range
    del dropped  # a reader dropped without close() (an actor's last pair) does not leave ffmpeg behind
    gc.collect()
    assert not Path(f"/proc/{ffmpeg_pid}").exists()


def test_face_stream_in_chunks_equals_tracking_and_smoothing_whole(synth_corpus: Path) -> None:
    """Chunk by chunk, the stream continues one track (no fresh face detection per chunk) and emits what
    tracking and smoothing the whole clip gives."""
    from evaluation.generate import FaceStream

    video = synth_corpus / pd.read_csv(synth_corpus / "manifest.csv")["video"][0]
    frames = read_frames(video, fps=25.0)[:60]
    with FaceMeshTracker(max_faces=1) as tracker:
        whole = tracker.track(frames, 25.0)
        smoothed = smooth_landmarks(whole.landmarks, whole.found)
        stream = FaceStream(tracker, 25.0)
        pieces = [p for start in range(0, 60, 13) for p in stream.push(frames[start : start + 13])]
        pieces += stream.flush()
    assert whole.found.all() and [p.start for p in pieces] == sorted({p.start for p in pieces})
    np.testing.assert_array_equal(np.concatenate([p.frames for p in pieces]), frames)
    np.testing.assert_array_equal(np.concatenate([p.landmarks for p in pieces]), smoothed)
    np.testing.assert_array_equal(
        np.concatenate([p.boxes for p in pieces]), crop_boxes(smoothed, frames.shape)
    )


def test_a_shot_cut_restarts_the_face_stream_s_track_and_smoothing(synth_corpus: Path) -> None:
    """Two speakers joined by a hard cut that falls inside a chunk: the stream finds the cut, tracks the
    second shot afresh and smooths each shot on its own, as if each were streamed alone."""
    from evaluation.generate import FaceStream

    manifest = pd.read_csv(synth_corpus / "manifest.csv")
    other = manifest[manifest["speaker"] != manifest["speaker"][0]]["video"].iloc[-1]
    shots = [read_frames(synth_corpus / v, fps=25.0)[:30] for v in (manifest["video"][0], other)]
    joined = np.concatenate(shots)
    with FaceMeshTracker(max_faces=1) as tracker:
        alone = [
            smooth_landmarks(t.landmarks, t.found) for t in (tracker.track(shot, 25.0) for shot in shots)
        ]
        stream = FaceStream(tracker, 25.0)
        pieces = [p for start in range(0, 60, 13) for p in stream.push(joined[start : start + 13])]
        pieces += stream.flush()
    assert stream.cuts == [30]  # inside the chunk of frames 26-38
    landmarks = np.concatenate([p.landmarks for p in pieces])
    np.testing.assert_array_equal(landmarks[:30], alone[0])
    np.testing.assert_array_equal(landmarks[30:], alone[1])
    boxes = np.concatenate([p.boxes for p in pieces])
    np.testing.assert_array_equal(boxes[30:], crop_boxes(alone[1], shots[1].shape))


def test_mpegts_is_remuxed_to_a_seekable_container(lavfi_clips: dict[str, Path], tmp_path: Path) -> None:
    path = str(lavfi_clips["ts"])
    assert pp.container_format(path) not in pp.SEEKABLE_FORMATS
    remuxed = pp.remux_video(path, probe(path), str(tmp_path / "v.mkv"))
    assert pp.container_format(remuxed) in pp.SEEKABLE_FORMATS
    full = np.concatenate(list(iter_frames(path, fps=25.0)))
    np.testing.assert_array_equal(pp.read_frame_range(remuxed, 40, 45, 25.0), full[40:45])


def _mouth_points(size: int) -> np.ndarray:
    """MOUTH_POINTS-shaped points: a lip ellipse at 70 % height, nose at 55 %, chin at 90 %."""
    angles = np.linspace(0, 2 * np.pi, len(pp.MOUTH_POINTS) - 2, endpoint=False)
    lips = np.stack([0.5 * size + 0.15 * size * np.cos(angles), 0.7 * size + 0.05 * size * np.sin(angles)], 1)
    return np.concatenate([lips, [[0.5 * size, 0.55 * size], [0.5 * size, 0.9 * size]]]).astype(np.float32)


def test_mouth_mask_is_feathered_inside_the_lower_half() -> None:
    mask = pp.mouth_mask(_mouth_points(96), 96, pp.BlendConfig())
    assert mask[:48].max() == 0.0 and mask.max() > 0.95
    assert mask[:, :3].max() == 0.0 and mask[:, -3:].max() == 0.0
    row = mask[int(0.7 * 96)]
    assert 0.0 < row[row > 0].min() < 0.2  # soft edge, no visible box


def test_blend_changes_only_masked_pixels_and_matches_colour() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(60, 200, (120, 160, 3), dtype=np.uint8)
    frame = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
    original = frame.copy()
    box = np.array([40.0, 10.0, 136.0, 106.0])
    generated = np.full((96, 96, 3), (250, 20, 20), np.uint8)  # far off in colour
    mask = pp.mouth_mask(_mouth_points(96), 96, pp.BlendConfig())
    pp.blend_i420(frame, generated, box, mask, pp.BlendConfig())
    y_changed = frame[:120] != original[:120]
    assert y_changed.any()
    assert not y_changed[:58].any() and not y_changed[:, :40].any() and not y_changed[:, 138:].any()
    after = pp.i420_to_rgb(frame)[75:95, 75:100].astype(float).mean(axis=(0, 1))
    assert np.abs(after - rgb[75:95, 75:100].mean(axis=(0, 1))).max() < 30  # colour-matched, not red


def _reinhard_over_whole_crop(generated: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The colour match written plainly: LAB mean/std under the mask, every pixel of the crop moved."""
    lab_g = cv2.cvtColor(generated.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    lab_r = cv2.cvtColor(reference.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    w = mask.astype(np.float64)[..., None] / mask.sum()
    stats = [
        ((lab * w).sum((0, 1)), np.sqrt((np.square(lab - (lab * w).sum((0, 1))) * w).sum((0, 1))) + 1e-3)
        for lab in (lab_g.astype(np.float64), lab_r.astype(np.float64))
    ]
    (mean_g, std_g), (mean_r, std_r) = stats
    gain = np.clip(std_r / std_g, 1 / 1.5, 1.5)
    rgb = cv2.cvtColor(((lab_g - mean_g) * gain + mean_r).astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)


def test_colour_match_on_the_mask_support_pastes_as_over_the_whole_crop() -> None:
    """Converting only the mask's support (plus the warp's one-pixel reach) matches the whole crop's colour
    match there, and the pixels left unconverted outside it cannot reach the pasted frame."""
    rng = np.random.default_rng(3)
    generated = cv2.GaussianBlur(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), (0, 0), 2)
    reference = cv2.GaussianBlur(rng.integers(40, 220, (96, 96, 3), dtype=np.uint8), (0, 0), 2)
    hard_edged = np.zeros((96, 96), np.float32)
    hard_edged[60:80, 30:70] = 1.0  # no feather: a leak at the support's edge would show at full weight
    for mask in (pp.mouth_mask(_mouth_points(96), 96, pp.BlendConfig()), hard_edged):
        matched = pp.color_match(generated, reference, mask, 1.5)
        rows, cols = pp.mask_support(mask)
        outside = np.ones(mask.shape, bool)
        outside[rows, cols] = False
        assert outside.any() and (matched[outside] == generated[outside]).all()
        whole = _reinhard_over_whole_crop(generated, reference, mask)
        assert np.abs(matched[rows, cols].astype(int) - whole[rows, cols]).max() <= 1
        inverted_outside = np.where(outside[..., None], 255 - generated, matched)
        for box in ([40.0, 10.0, 136.0, 106.0], [33.3, 7.6, 180.9, 155.2], [52.5, 20.2, 110.7, 78.4]):
            pasted = [np.full((200, 220, 3), 128, np.uint8) for _ in range(2)]
            pp.paste_mouth(pasted[0], matched, np.array(box), mask)
            pp.paste_mouth(pasted[1], inverted_outside, np.array(box), mask)
            assert (pasted[0] != 128).any(), box
            np.testing.assert_array_equal(pasted[0], pasted[1], err_msg=f"outside the support leaks: {box}")


def _reading(offset: int, confident: bool = True) -> OffsetEstimate:
    return OffsetEstimate(offset, 5.0 if confident else 1.0, reason="" if confident else "low_confidence")


def test_offset_correction_is_applied_only_when_confident_and_toward_zero() -> None:
    """The decision: shift by the confident reading; never on an abstention, a short output, or when the
    re-measured offset would not be closer to 0 than before."""
    cfg = pp.PostprocessConfig(min_seconds=4.0)

    def meter(true_offset: int, confident: bool = True):  # noqa: ANN202 - reads true_offset - shift
        return lambda shift: _reading(true_offset - shift, confident)

    fix = pp.correct_offset(meter(4), 250, 25.0, cfg)
    assert (fix.before.offset_frames, fix.shift_frames, fix.after.offset_frames) == (4, 4, 0)
    assert pp.correct_offset(meter(4, confident=False), 250, 25.0, cfg).shift_frames == 0
    assert pp.correct_offset(meter(4), 50, 25.0, cfg).shift_frames == 0  # 2 s < min_seconds
    assert pp.correct_offset(meter(1), 250, 25.0, cfg).shift_frames == 0  # below min_abs_offset
    assert pp.correct_offset(meter(12), 250, 25.0, cfg).shift_frames == 0  # beyond max_abs_offset
    unfixed = pp.correct_offset(meter(4), 250, 25.0, replace(cfg, correct_offset=False))
    assert unfixed.shift_frames == 0 and unfixed.after == unfixed.before
    worse = pp.correct_offset(lambda shift: _reading(5 if shift else 4), 250, 25.0, cfg)
    assert worse.shift_frames == 0 and worse.after.offset_frames == 5


def test_offset_correction_cancels_a_known_lag(synth_corpus: Path) -> None:
    """A synth clip's audio delayed by 4 frames: the landmark meter reads it and the correction cancels it."""
    from pipeline.landmarks import lip_shape
    from pipeline.media import shift_audio

    video = str(synth_corpus / pd.read_csv(synth_corpus / "manifest.csv")["video"][0])
    track = FaceMeshTracker(max_faces=1).track(read_frames(video, 25.0))
    lips = lip_shape(smooth_landmarks(track.landmarks, track.found))
    pcm = shift_audio(read_audio(video), 16000, 4 / 25.0)
    cfg = pp.PostprocessConfig(min_seconds=3.0)
    fix = pp.correct_offset(pp.lip_shape_measure(lips, pcm, 16000, 25.0, cfg), len(lips), 25.0, cfg)
    assert abs(fix.before.offset_frames - 4) <= 1 and fix.shift_frames == fix.before.offset_frames
    assert abs(fix.after.offset_frames) < abs(fix.before.offset_frames)


def test_offset_is_measured_on_the_first_seconds_only(synth_corpus: Path, tmp_path: Path) -> None:
    """CompositeStage tracks only chunks starting inside post.measure_seconds; finalize_pair estimates on
    those frames and still writes the whole video (0 measures every frame)."""
    from evaluation.generate import PAIR_COLUMNS, CompositeStage, finalize_pair, new_row, pack, validate

    video = str(synth_corpus / pd.read_csv(synth_corpus / "manifest.csv")["video"][0])
    info = probe(video)
    n_out, size = 100, 25
    common = dict(n_frames=size, n_out=n_out, n_source=n_out, fps=info.fps, source=video)
    pair = {name: "" for name in PAIR_COLUMNS} | {"id": "p", "video": video, "language": "en"}
    measured = {}
    for seconds in (1.0, 0.0):
        cfg = GenerateConfig(post=pp.PostprocessConfig(measure_seconds=seconds, min_seconds=1.0))
        validate(cfg)
        out = tmp_path / f"measure{seconds}"
        stage = CompositeStage(cfg, str(out))
        chunks = [
            stage.composite(
                new_row("p", start=start, source_index=pack(np.arange(start, start + size)), **common)
            )
            for start in range(0, n_out, size)
        ]
        assert all(c["status"] == "ok" for c in chunks), chunks
        tracked = [c["start"] for c in chunks if c["lips"]]
        assert tracked == ([0] if seconds else [0, 25, 50, 75])
        row = finalize_pair(cfg, str(out), pair, chunks)
        assert row["status"] == "ok", row
        assert row["frames"] == n_out and probe(row["output"]).n_frames == n_out
        measured[seconds] = row["offset_frames_measured"]
    assert measured == {1.0: 25, 0.0: 100}
    with pytest.raises(BadInput, match="measure_seconds"):
        validate(GenerateConfig(post=pp.PostprocessConfig(measure_seconds=3.0, min_seconds=6.0)))


@pytest.mark.parametrize("stabilise", ["off", "deshake", "auto"])
def test_mux_joins_parts_with_audio_at_exact_length(tmp_path: Path, stabilise: str) -> None:
    rng = np.random.default_rng(0)
    frames = np.stack(
        [cv2.cvtColor(f, cv2.COLOR_RGB2YUV_I420) for f in rng.integers(0, 255, (23, 64, 96, 3), np.uint8)]
    )
    spans = [(0, 2), (2, 12), (12, 23)]  # a 2-frame chunk too: chunks of any length join on the frame grid
    parts = [
        pp.write_i420(str(tmp_path / f"{a}.mp4"), frames[a:b], 30.0, crf=16, preset="veryfast")
        for a, b in spans
    ]
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=200:sample_rate=48000", "-t", "2", str(tmp_path / "a.wav"))
    out = pp.mux_output(
        parts,
        [b - a for a, b in spans],
        str(tmp_path / "a.wav"),
        30.0,
        str(tmp_path / "out.mp4"),
        pp.PostprocessConfig(stabilise=stabilise),
        0.1,
    )
    info = probe(out)
    assert (info.fps, info.n_frames, info.width, info.height) == (30.0, 23, 96, 64)
    assert abs(info.duration_s - 23 / 30) < 1 / 30


# --- manifest and calibration ------------------------------------------------------------------


def test_read_pairs_resolves_paths_and_ids(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text(
        '{"video": "a/v.mp4", "audio": "s.wav", "language": "es", "transcript": "Hola", "timeline": "t.json",'
        ' "system": "mine"}\n{"video": "/abs/w.mp4", "id": "x y"}\n'
    )
    pairs = read_pairs(str(tmp_path / "p.jsonl"))
    assert pairs[0]["video"] == str(tmp_path / "a/v.mp4") and pairs[0]["audio"] == str(tmp_path / "s.wav")
    assert pairs[0]["id"].startswith("v-") and pairs[0]["language"] == "es"
    assert (pairs[0]["transcript"], pairs[0]["system"]) == ("Hola", "mine")
    assert pairs[0]["timeline"] == str(tmp_path / "t.json")
    empty = {"speaker": "", "system": "", "transcript": "", "timeline": ""}
    assert pairs[1] == {"id": "x_y", "video": "/abs/w.mp4", "audio": "", "language": "und"} | empty
    (tmp_path / "dup.csv").write_text("video,id\na.mp4,x\nb.mp4,x\n")
    with pytest.raises(BadInput, match="duplicate"):
        read_pairs(str(tmp_path / "dup.csv"))
    with pytest.raises(BadInput, match="does not exist"):
        read_pairs(str(tmp_path / "none.csv"))


def test_calibration_round_trip_lookup_and_sign(tmp_path: Path) -> None:
    cal = Calibration(
        languages={"en": {"offset_frames": 1}},
        speakers={"s1": {"offset_frames": -2}},
        default_offset_frames=0,
    )
    uri = save_calibration(str(tmp_path / "c.json"), cal)
    loaded = load_calibration(uri)
    assert (
        loaded.offset_for("en-US") == 1
        and loaded.offset_for("en", "s1") == -2
        and loaded.offset_for("fr") == 0
    )
    fitted = calibration_from_offsets({"en": [2, 2, 3]}, used=loaded)
    assert fitted.offset_for("en") == 1 - 2 and fitted.languages["en"]["clips"] == 3
    (tmp_path / "bad.json").write_text('{"languages": {"en": {"offset_frames": "one"}}}')
    with pytest.raises(BadInput, match="offset_frames"):
        load_calibration(str(tmp_path / "bad.json"))
    assert load_calibration(None).offset_for("en") == 0


def test_bad_checkpoint_or_manifest_exit_2(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "pairs.csv").write_text("video\nv.mp4\n")
    assert (
        main(["generate", str(tmp_path / "pairs.csv"), str(tmp_path / "o"), "--checkpoint", "/no/such"]) == 2
    )
    assert (
        main(["generate", str(tmp_path / "none.csv"), str(tmp_path / "o"), "--checkpoint", str(checkpoint)])
        == 2
    )
    (tmp_path / "bad.yaml").write_text("extension: bounce\n")
    args = ["generate", str(tmp_path / "pairs.csv"), str(tmp_path / "o"), "--checkpoint", str(checkpoint)]
    assert main([*args, "--config", str(tmp_path / "bad.yaml")]) == 2


def test_a_finalize_that_dies_or_raises_is_a_failed_row(ray_session) -> None:
    """A finalize actor lost for good (or a bug in finalize) fails its pair, not the run."""
    from evaluation.generate import PAIR_COLUMNS, PairProgress, _finished

    @ray_session.remote(num_cpus=0, max_restarts=0)
    class Finalizer:
        def dies(self) -> None:
            os._exit(1)

        def raises(self) -> None:
            raise KeyError("lips")

    progress = PairProgress({name: "" for name in PAIR_COLUMNS} | {"id": "p"})
    died = _finished(progress, Finalizer.remote().dies.remote())
    raised = _finished(progress, Finalizer.remote().raises.remote())
    assert (died["status"], died["stage"], died["reason"]) == ("failed", "finalize", "worker_died")
    assert (raised["status"], raised["reason"]) == ("failed", "error")
    assert "lips" in raised["message"] and died["id"] == raised["id"] == "p"


def test_model_actor_resources(ray_session) -> None:
    from evaluation.generate import ModelConfig, model_resources

    assert model_resources(ModelConfig(device="cpu", cpus_per_actor=0.75)) == {"cpus": 0.75}
    if not ray_session.cluster_resources().get("GPU"):
        assert model_resources(ModelConfig(device="auto")) == {"cpus": 1.0}
        with pytest.raises(BadInput, match="no GPU"):
            model_resources(ModelConfig(device="cuda"))


def test_cpu_threads_split_the_node_among_the_actors(monkeypatch: pytest.MonkeyPatch) -> None:
    from evaluation.generate import ModelConfig, cpu_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert cpu_threads(ModelConfig(actors=1)) == 8
    assert cpu_threads(ModelConfig(actors=2)) == 4
    assert cpu_threads(ModelConfig(actors=16)) == 1
    assert cpu_threads(ModelConfig(actors=2, threads=3)) == 3


def test_the_cpu_layout_fits_a_two_core_node() -> None:
    """Its reservations must leave room for every stage at once, or Ray Data waits for CPUs forever."""
    from core.plan import Cluster, fit
    from evaluation.generate import stage_asks

    path = Path(__file__).resolve().parents[1] / "configs" / "generate_cpu.yaml"
    cfg = load_config(GenerateConfig, path)
    two_cores = Cluster(now={"CPU": 2.0}, limit={"CPU": 2.0}, largest_node={"CPU": 2.0})
    asks = fit(stage_asks(cfg, pairs=4, gpu=False), two_cores, "generate")
    assert cfg.model.actors == 2 and cfg.model.device == "cpu" and asks[0].cpus == cfg.model.cpus_per_actor
    assert sum(a.total("CPU") for a in asks) <= 2.0


def test_configs_generate_yaml_lists_the_defaults() -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / "generate.yaml"
    assert load_config(GenerateConfig, path) == GenerateConfig()


def test_executor_poll_interval_is_set_for_the_run_and_put_back() -> None:
    from ray.data._internal.execution import streaming_executor_state as state

    from core.ray import executor_poll_interval
    from evaluation.generate import ResourcesConfig, _data_context, validate

    def poll() -> float:
        return state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S

    ray_default = poll()
    with _data_context(ResourcesConfig(poll_seconds=0.7)):
        assert poll() == 0.7
    assert poll() == ray_default
    with pytest.raises(RuntimeError), executor_poll_interval(2.0):
        raise RuntimeError("a failed run")
    assert poll() == ray_default
    with pytest.raises(BadInput, match="poll_seconds"):
        validate(GenerateConfig(resources=ResourcesConfig(poll_seconds=0)))
