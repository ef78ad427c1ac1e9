"""`lipsync generate` with a random-weight checkpoint on generated clips, plus its post-processing parts.

One generation run (module fixture, through the CLI) covers: a 25 fps clip with longer mp3 audio
(ping-pong extension), a 30 fps clip with shorter 8 kHz audio (trim), a 720x1280 portrait clip whose
face is hidden by a black box for some frames, and three pairs that must fail with reasons."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support.generation import psnr
from support.tools import ffmpeg_cli, require_tool

from core.config import config_hash, load_config
from core.errors import BadInput
from generation.calibration import (
    save_calibration,
)
from generation.config import GenerateConfig, PostprocessConfig
from generation.correction import correct_offset, lip_shape_measure
from generation.extension import source_indices
from lipsync.cli import main
from pipeline.crops import crop_boxes
from pipeline.landmarks import FaceMeshTracker, smooth_landmarks
from pipeline.media import probe, read_audio, read_frames

SECONDS = 0.8


HIDDEN = range(6, 12)  # portrait frames with a black box over the face


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
    ffmpeg_cli("-i", face, "-t", str(SECONDS), *codec, str(d / "face25.mp4"))
    ffmpeg_cli("-i", other, "-vn", "-t", "1.2", "-ar", "44100", "-ac", "2", str(d / "speech.mp3"))
    ffmpeg_cli("-i", face, "-vf", "fps=30", "-t", str(SECONDS), *codec, str(d / "face30.mp4"))
    ffmpeg_cli("-i", other, "-vn", "-t", "0.6", "-ar", "8000", str(d / "short.wav"))
    x, y, w, h = _face_box(d / "face25.mp4", scale=720 / 256, top=280)
    box = f"drawbox={x}:{y}:{w}:{h}:color=black:t=fill:enable='between(n,{HIDDEN[0]},{HIDDEN[-1]})'"
    portrait = f"scale=720:720,pad=720:1280:0:280,{box}"
    ffmpeg_cli("-i", face, "-vf", portrait, "-t", str(SECONDS), *codec, str(d / "portrait.mp4"))
    lavfi = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-f", "lavfi", "-i", "sine=frequency=300"]
    ffmpeg_cli(*lavfi, "-t", str(SECONDS), *codec, str(d / "faceless.mp4"))
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
        k = int(source_indices(j, 1, n)[0])
        assert k == 2 * (n - 1) - j
        upper = slice(0, output.shape[1] // 3)
        assert psnr(output[j, upper], source[k, upper]) > 38.0, (j, k)


def test_hidden_face_frames_are_passed_through(generated: dict) -> None:
    row = _ok(generated, "portrait")
    source = read_frames(generated["dir"] / "portrait.mp4", fps=25.0)
    output = read_frames(row["output"], fps=25.0)
    for t in HIDDEN:
        assert psnr(output[t], source[t]) > 45.0, t


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


def test_face_stream_in_chunks_equals_tracking_and_smoothing_whole(synth_corpus: Path) -> None:
    """Chunk by chunk, the stream continues one track (no fresh face detection per chunk) and emits what
    tracking and smoothing the whole clip gives."""
    from generation.prepare import FaceStream

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
    from generation.prepare import FaceStream

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


def test_offset_correction_cancels_a_known_lag(synth_corpus: Path) -> None:
    """A synth clip's audio delayed by 4 frames: the landmark meter reads it and the correction cancels it."""
    from pipeline.landmarks import lip_shape
    from pipeline.media import shift_audio

    video = str(synth_corpus / pd.read_csv(synth_corpus / "manifest.csv")["video"][0])
    track = FaceMeshTracker(max_faces=1).track(read_frames(video, 25.0))
    lips = lip_shape(smooth_landmarks(track.landmarks, track.found))
    pcm = shift_audio(read_audio(video), 16000, 4 / 25.0)
    cfg = PostprocessConfig(min_seconds=3.0)
    fix = correct_offset(lip_shape_measure(lips, pcm, 16000, 25.0, cfg), len(lips), 25.0, cfg)
    assert abs(fix.before.offset_frames - 4) <= 1 and fix.shift_frames == fix.before.offset_frames
    assert abs(fix.after.offset_frames) < abs(fix.before.offset_frames)


def test_offset_is_measured_on_the_first_seconds_only(synth_corpus: Path, tmp_path: Path) -> None:
    """CompositeStage tracks only chunks starting inside post.measure_seconds; finalize_pair estimates on
    those frames and still writes the whole video (0 measures every frame)."""
    from generation.composite import CompositeStage
    from generation.config import validate
    from generation.finalize import finalize_pair
    from generation.pairs import PAIR_COLUMNS
    from generation.rows import new_row, pack

    video = str(synth_corpus / pd.read_csv(synth_corpus / "manifest.csv")["video"][0])
    info = probe(video)
    n_out, size = 100, 25
    common = dict(n_frames=size, n_out=n_out, n_source=n_out, fps=info.fps, source=video)
    pair = {name: "" for name in PAIR_COLUMNS} | {"id": "p", "video": video, "language": "en"}
    measured = {}
    for seconds in (1.0, 0.0):
        cfg = GenerateConfig(post=PostprocessConfig(measure_seconds=seconds, min_seconds=1.0))
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
        validate(GenerateConfig(post=PostprocessConfig(measure_seconds=3.0, min_seconds=6.0)))


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
    from generation.finalize import PairProgress
    from generation.pairs import PAIR_COLUMNS
    from generation.run import _finished

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
    from generation.config import ModelConfig
    from generation.run import model_resources

    assert model_resources(ModelConfig(device="cpu", cpus_per_actor=0.75)) == {"cpus": 0.75}
    if not ray_session.cluster_resources().get("GPU"):
        assert model_resources(ModelConfig(device="auto")) == {"cpus": 1.0}
        with pytest.raises(BadInput, match="no GPU"):
            model_resources(ModelConfig(device="cuda"))


def test_the_cpu_layout_fits_a_two_core_node() -> None:
    """Its reservations must leave room for every stage at once, or Ray Data waits for CPUs forever."""
    from core.plan import Cluster, fit
    from generation.run import stage_asks

    path = Path(__file__).resolve().parents[3] / "configs" / "generate_cpu.yaml"
    cfg = load_config(GenerateConfig, path)
    two_cores = Cluster(now={"CPU": 2.0}, limit={"CPU": 2.0}, largest_node={"CPU": 2.0})
    asks = fit(stage_asks(cfg, pairs=4, gpu=False), two_cores, "generate")
    assert cfg.model.actors == 2 and cfg.model.device == "cpu" and asks[0].cpus == cfg.model.cpus_per_actor
    assert sum(a.total("CPU") for a in asks) <= 2.0


def test_executor_poll_interval_is_set_for_the_run_and_put_back() -> None:
    from ray.data._internal.execution import streaming_executor_state as state

    from core.ray import executor_poll_interval
    from generation.config import ResourcesConfig, validate
    from generation.run import _data_context

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
